"""Reports: one clip-benchmark-compatible JSON per (dataset, task), summary.json, and report.md with our numbers
beside the paper's rows. Averages are taken only over the datasets that ran, and the report says which did not."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from realsyn_pl.evaluation.suites import Suite, load_reference

TASK_TITLES = {"zeroshot_classification": "Zero-shot classification", "linear_probe": "Linear probe",
               "zeroshot_retrieval": "Zero-shot retrieval"}


@dataclass
class TaskResult:
    key: str
    dataset: str
    task: str
    metric: str
    status: str = "ok"  # ok | missing | failed
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    num_samples: Optional[int] = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def columns(self) -> dict[str, float]:
        """The numbers this result contributes to the report (fractions), by column name."""
        if self.status != "ok":
            return {}
        if self.task == "zeroshot_retrieval":
            return {f"{self.key}/{k}": v for k, v in self.metrics.items() if "_retrieval_recall@" in k}
        name = self.metric if self.task == "zeroshot_classification" else f"lp_{self.metric}"
        return {self.key: self.metrics[name]} if name in self.metrics else {}


def clip_benchmark_json(result: TaskResult, model: str, pretrained: Optional[str], language: str) -> dict:
    """The fields `clip_benchmark eval` writes (dataset, model, pretrained, task, metrics, language), plus ours."""
    return {"dataset": result.dataset, "model": model, "pretrained": pretrained or "", "task": result.task,
            "metrics": result.metrics, "language": language, "key": result.key, "main_metric": result.metric,
            "num_samples": result.num_samples, "seconds": round(result.seconds, 3), **result.extra}


def _fmt(percent: Optional[float]) -> str:
    return "—" if percent is None or math.isnan(percent) else f"{percent:.1f}"


def _pct(fraction: Optional[float]) -> str:
    return _fmt(None if fraction is None else 100 * fraction)


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _table(title: str, columns: list[str], ours: dict[str, float], ran: list[str], missing: list[str],
           reference: Optional[dict], reference_model: Optional[str], label: str, averaged: bool) -> list[str]:
    ref_rows = []
    if reference:
        ref_rows = [r for r in reference["rows"] if reference_model is None or r["model"] == reference_model]
    lines = [f"### {title}", ""]
    head = ["Model", "Data"] + columns
    if averaged:
        head += [f"Avg over ran ({len(ran)}/{len(columns)})"] + (["Avg (paper, all)"] if ref_rows else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    row = [label, "ours"] + [_pct(ours.get(c)) for c in columns]
    if averaged:
        row += [_pct(_mean([ours[c] for c in ran]))] + (["—"] if ref_rows else [])
    lines.append("| " + " | ".join(row) + " |")
    for r in ref_rows:
        vals = r["values"]
        row = [r["model"], f"{r['data']} {r['scale']} (paper)"] + [_fmt(vals.get(c)) for c in columns]
        if averaged:
            row += [_fmt(_mean([vals[c] for c in ran if c in vals])), _fmt(r.get("avg"))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if averaged and missing:
        lines.append(f"Averages are over the {len(ran)} of {len(columns)} datasets that ran; not run: "
                     f"{', '.join(missing)} (reasons below)."
                     + (f" The paper's Avg is over all {len(columns)}." if ref_rows else ""))
        lines.append("")
    return lines


def build_markdown(results: list[TaskResult], suite: Suite, label: str, reference_model: Optional[str],
                   header: list[str]) -> tuple[str, list[dict]]:
    """report.md text and the tables as {title, columns, rows} (for W&B)."""
    lines = ["# realsyn_pl eval", ""] + header + [""]
    tables = []
    for task in ("zeroshot_classification", "linear_probe", "zeroshot_retrieval"):
        task_results = [r for r in results if r.task == task]
        if not task_results:
            continue
        table_name = suite.tables.get(task)
        reference = load_reference(table_name) if table_name else None
        ours: dict[str, float] = {}
        for r in task_results:
            ours.update(r.columns())
        if task == "zeroshot_retrieval":
            columns = list(reference["columns"]) if reference else []
            columns += [c for c in ours if c not in columns]
            ran, missing, averaged = [c for c in columns if c in ours], [], False
        else:
            keys = [r.key for r in task_results]
            columns = list(reference["columns"]) if reference else keys
            columns += [k for k in keys if k not in columns]
            ran = [c for c in columns if c in ours]
            missing = [c for c in columns if c not in ours]
            averaged = True
        title = TASK_TITLES[task] + (f" — beside {reference['title']}" if reference else "")
        lines += _table(title, columns, ours, ran, missing, reference, reference_model, label, averaged)
        tables.append({"title": TASK_TITLES[task], "columns": ["row"] + columns,
                       "rows": [[label] + [ours.get(c) for c in columns]]})
    problems = [r for r in results if r.status != "ok"]
    if problems:
        lines += ["### Not run", "", "| Dataset | Task | Status | Reason |", "|---|---|---|---|"]
        lines += [f"| {r.key} | {r.task} | {r.status} | {r.reason} |" for r in problems]
        lines.append("")
    ok = [r for r in results if r.status == "ok"]
    lines += [f"{len(ok)} of {len(results)} (dataset, task) runs completed; {len(problems)} not run.", ""]
    return "\n".join(lines), tables


def write(out_dir: Path, results: list[TaskResult], suite: Suite, model: str, pretrained: Optional[str],
          language: str, reference_model: Optional[str], header: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task = out_dir / "results"
    per_task.mkdir(exist_ok=True)
    for r in results:
        if r.status == "ok":
            path = per_task / f"{r.key}_{r.task}.json"
            path.write_text(json.dumps(clip_benchmark_json(r, model, pretrained, language), indent=1, default=_nan_safe))
    label = model if not pretrained else f"{model} ({Path(pretrained).name})"
    text, tables = build_markdown(results, suite, label, reference_model, header)
    (out_dir / "report.md").write_text(text)
    summary = {"model": model, "pretrained": pretrained, "suite": suite.name,
               "results": [asdict(r) for r in results],
               "missing": [{"key": r.key, "task": r.task, "reason": r.reason} for r in results if r.status == "missing"],
               "failed": [{"key": r.key, "task": r.task, "reason": r.reason} for r in results if r.status == "failed"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_nan_safe))
    _log_wandb(tables)
    return out_dir / "report.md"


def _nan_safe(obj: Any) -> Any:
    return str(obj)


def _log_wandb(tables: list[dict]) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    for t in tables:
        wandb.run.log({f"eval/{t['title']}": wandb.Table(columns=t["columns"], data=t["rows"])})
