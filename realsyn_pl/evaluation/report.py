"""Reports: one clip-benchmark-compatible JSON per (dataset, task), summary.json, and report.md with our numbers
beside the paper's rows. Averages are taken only over the datasets that ran, and the report says which did not."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from realsyn_pl.config import ConfigError
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
    file: str = ""  # the per-task result JSON (clip-benchmark's --output template)
    reused: bool = False  # read back from `file` (skip_existing), not computed in this run

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


def result_path(template: str, out_dir: Path, model: str, pretrained: Optional[str], dataset: str, key: str,
                task: str, language: str) -> Path:
    """clip-benchmark's --output naming (cli.py: the weights file's basename, dataset without wds/ and with / as _),
    under <out_dir>/results unless the template is an absolute path."""
    pretrained = pretrained or "none"
    is_file = os.path.isfile(pretrained)
    short = dataset.replace("wds/", "", 1)
    try:
        name = template.format(model=model, pretrained=os.path.basename(pretrained) if is_file else pretrained,
                               pretrained_full_path=pretrained.replace("/", "_") if is_file else pretrained,
                               dataset=short.replace("/", "_"), key=key, task=task, language=language)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"output: bad template {template!r} ({type(err).__name__}: {err}); fields: model, "
                          "pretrained, pretrained_full_path, dataset, key, language, task") from None
    return out_dir / "results" / name


def result_paths(cfg: Any, models: list, runs: list) -> dict[tuple, list[Path]]:
    """(model name, pretrained) -> the result file of each run, checked to be distinct across the whole run."""
    out = Path(cfg.output_dir)
    paths: dict[tuple, list[Path]] = {}
    owner: dict[Path, str] = {}
    for m in models:
        mine = paths.setdefault((m.name, m.pretrained), [])
        if mine:
            raise ConfigError(f"models: {m.name} with weights {m.pretrained} is listed twice")
        for entry, task in runs:
            path = result_path(cfg.output, out, m.name, m.pretrained, entry.dataset or f"wds/{entry.key}", entry.key,
                               task, cfg.language)
            what = f"{m.name}/{m.pretrained}/{entry.key}/{task}"
            if path in owner:
                raise ConfigError(f"output: {cfg.output!r} names {path} for both {owner[path]} and {what}; "
                                  "add {key} (or {model}/{pretrained}) to the template")
            owner[path] = what
            mine.append(path)
    return paths


def write_result(result: TaskResult, model: str, pretrained: Optional[str], language: str) -> None:
    """One run's clip-benchmark-style JSON at result.file (atomically: a killed run leaves no partial file)."""
    path = Path(result.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(clip_benchmark_json(result, model, pretrained, language), indent=1, default=_nan_safe))
    os.replace(tmp, path)


def read_result(path: Path) -> TaskResult:
    """A result file of an earlier run, back as a TaskResult (skip_existing)."""
    try:
        data = json.loads(path.read_text())
        result = TaskResult(data.get("key", ""), data["dataset"], data["task"], data.get("main_metric", ""),
                            metrics=data["metrics"], num_samples=data.get("num_samples"),
                            seconds=float(data.get("seconds", 0.0)))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"skip_existing: cannot read {path} ({type(err).__name__}: {err}); delete it to rerun") from None
    known = set(clip_benchmark_json(result, "", None, "")) | {"pretrained", "model", "language"}
    result.extra = {k: v for k, v in data.items() if k not in known}
    result.file, result.reused = str(path), True
    return result


def _fmt(percent: Optional[float]) -> str:
    return "—" if percent is None or math.isnan(percent) else f"{percent:.1f}"


def _pct(fraction: Optional[float]) -> str:
    return _fmt(None if fraction is None else 100 * fraction)


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def not_comparable(results: list[TaskResult], reference: Optional[dict]) -> dict[str, str]:
    """Linear-probe columns whose run differs from the paper's protocol (Table 8 split sizes, the weight-decay sweep,
    few-shot), with why: their numbers are not the paper's measurement even on the paper's model."""
    splits = (reference or {}).get("splits") or {}
    marks = {}
    for r in results:
        if r.task != "linear_probe" or r.status != "ok":
            continue
        why = []
        fit, test = r.extra.get("num_fit"), r.extra.get("num_test")
        if fit is None:
            why.append(f"few-shot (fewshot_k={r.metrics.get('fewshot_k')})")
        if r.key in splits:
            p_train, p_test = splits[r.key]
            if (fit, test) != (p_train, p_test):
                why.append(f"train {'—' if fit is None else f'{fit:,}'} / test {test:,} here vs {p_train:,} / "
                           f"{p_test:,} in the paper's Table 8")
        if not r.extra.get("weight_decay_sweep", True):
            swept = "C" if r.metrics.get("protocol") == "lbfgs" else "weight-decay"
            why.append(f"no {swept} sweep (set val_split or val_proportion)")
        if why:
            marks[r.key] = "; ".join(why)
    return marks


def _table(title: str, columns: list[str], ours: dict[str, float], ran: list[str], missing: list[str],
           reference: Optional[dict], reference_model: Optional[str], label: str, averaged: bool,
           marks: Optional[dict[str, str]] = None) -> list[str]:
    """marks (linear probe): the columns not comparable with the paper; the table then has two averages, over the
    comparable columns that ran and over all that ran (None: one average, over all that ran)."""
    two = marks is not None
    marks = marks or {}
    comparable = [c for c in ran if c not in marks]
    ref_rows = []
    if reference:
        ref_rows = [r for r in reference["rows"] if reference_model is None or r["model"] == reference_model]
    lines = [f"### {title}", ""]
    head = ["Model", "Data"] + columns
    if averaged:
        head += ([f"Avg, comparable ({len(comparable)}/{len(columns)})"] if two else [])
        head += [f"Avg over ran ({len(ran)}/{len(columns)})"] + (["Avg (paper, all)"] if ref_rows else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    row = [label, "ours"] + [_pct(ours.get(c)) + (" †" if c in marks else "") for c in columns]
    if averaged:
        row += ([_pct(_mean([ours[c] for c in comparable]))] if two else [])
        row += [_pct(_mean([ours[c] for c in ran]))] + (["—"] if ref_rows else [])
    lines.append("| " + " | ".join(row) + " |")
    for r in ref_rows:
        vals = r["values"]
        row = [r["model"], f"{r['data']} {r['scale']} (paper)"] + [_fmt(vals.get(c)) for c in columns]
        if averaged:
            row += ([_fmt(_mean([vals[c] for c in comparable if c in vals]))] if two else [])
            row += [_fmt(_mean([vals[c] for c in ran if c in vals])), _fmt(r.get("avg"))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if marks:
        lines.append("† not comparable with the paper's numbers: "
                     + "; ".join(f"{c}: {why}" for c, why in marks.items() if c in columns) + ".")
        lines.append("")
    if averaged and two:
        lines.append(f"Two averages: \"comparable\" over the {len(comparable)} columns that ran as the paper's "
                     f"Table 8 measures them (no †), \"over ran\" over all {len(ran)} that ran; the paper's rows "
                     "are averaged over the same columns.")
        lines.append("")
    if averaged and missing:
        lines.append(f"Averages are over the {len(ran)} of {len(columns)} datasets that ran; not run: "
                     f"{', '.join(missing)} (reasons below)."
                     + (f" The paper's Avg is over all {len(columns)}." if ref_rows else ""))
        lines.append("")
    return lines


def protocol_note(results: list[TaskResult]) -> list[str]:
    """Which linear-probe classifier produced the numbers (the paper does not name its own)."""
    names = {"lbfgs": "CLIP's protocol: L2 logistic regression by L-BFGS, C swept on the validation split, refit on "
                      "train + val",
             "clip_benchmark": "clip-benchmark's: a linear layer trained by AdamW, weight decay swept on the "
                               "validation split"}
    used = sorted({r.metrics.get("protocol", "clip_benchmark") for r in results if r.status == "ok"})
    if not used:
        return []
    return ["Classifier (linear_probe.protocol): " + "; ".join(f"{p} = {names.get(p, p)}" for p in used)
            + ". The paper does not name its classifier; CLIP's L-BFGS protocol is the usual one.", ""]


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
        marks = not_comparable(task_results, reference) if task == "linear_probe" else None
        lines += _table(title, columns, ours, ran, missing, reference, reference_model, label, averaged, marks)
        if task == "linear_probe":
            lines += protocol_note(task_results)
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


def write(out_dir: Path, per_model: list[tuple[str, Optional[str], list[TaskResult]]], suite: Suite, language: str,
          reference_model: Optional[str], header: list[str]) -> Path:
    """report.md (one section per model when there are several) and summary.json; the result files were written
    by `write_result` as each run finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, summaries, all_tables = [], [], []
    for model, pretrained, results in per_model:
        label = model if not pretrained else f"{model} ({Path(pretrained).name})"
        text, tables = build_markdown(results, suite, label, reference_model, header if len(per_model) == 1 else [])
        sections.append(text if len(per_model) == 1 else text.replace("# realsyn_pl eval", f"## {label}", 1))
        all_tables += tables
        summaries.append({"model": model, "pretrained": pretrained, "suite": suite.name,
                          "results": [asdict(r) for r in results],
                          "missing": [{"key": r.key, "task": r.task, "reason": r.reason} for r in results
                                      if r.status == "missing"],
                          "failed": [{"key": r.key, "task": r.task, "reason": r.reason} for r in results
                                     if r.status == "failed"]})
    if len(per_model) == 1:
        text, summary = sections[0], summaries[0]
    else:
        text = "\n".join(["# realsyn_pl eval", ""] + header + [""] + sections)
        summary = {"suite": suite.name, "models": summaries}
    (out_dir / "report.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_nan_safe))
    _log_wandb(all_tables)
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
