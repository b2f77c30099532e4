"""The demo report: stage counts (checked to conserve), the comparison table in the paper's shape, how often each
dataset's text names the image's true object, and example rows with thumbnails."""
from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from realsyn_pl.demo.baselines import Corpus, names_label

CHANCE = 1 / 24


def stage_rows(work: Path) -> list[dict[str, Any]]:
    """One row per built stage, in build order, with its counts and whether kept + dropped = input."""
    from realsyn_pl.construct.engine.pipeline import STAGE_ORDER

    rows = []
    for name in STAGE_ORDER:
        path = work / name / "manifest.json"
        if not path.is_file():
            continue
        c = json.loads(path.read_text())["counts"]
        dropped = c.get("dropped", {})
        rows.append({"stage": name, "in": c["n_in"], "kept": c["n_out"], "dropped": dropped,
                     "produced": c.get("produced", {}), "conserved": c["n_in"] == c["n_out"] + sum(dropped.values())})
    return rows


def shard_samples(folder: Path) -> Iterator[dict[str, Any]]:
    """{key, jpg, txt, json} per sample of a folder's tars (no decoding beyond JSON)."""
    for tar_path in sorted(folder.glob("*.tar")):
        groups: dict[str, dict[str, Any]] = defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                groups[key][ext] = data
        for key, parts in groups.items():
            yield {"key": key, "jpg": parts.get("jpg"), "txt": parts.get("txt", b"").decode("utf-8"),
                   "json": json.loads(parts["json"]) if "json" in parts else {}}


def text_accuracy(folder: Path, corpus: Corpus) -> dict[str, float]:
    """Share of samples whose text names the image's true colour and shape, per text field."""
    hits: dict[str, int] = defaultdict(int)
    n = 0
    for s in shard_samples(folder):
        label = corpus.label(s["json"]["url"])
        n += 1
        hits["text1"] += names_label(s["txt"], label)
        for k in ("text2", "text3", "syn_text"):
            if s["json"].get(k):
                hits[k] += names_label(s["json"][k], label)
    return {k: v / max(n, 1) for k, v in hits.items()} | {"n": n}


def _metric(results: list[Any], task: str, name: str) -> str:
    for r in results:
        if r.task == task and r.status == "ok" and name in r.metrics:
            return f"{100 * r.metrics[name]:.1f}"
    return "n/a"


def examples(folder: Path, corpus: Corpus, out_dir: Path, k: int = 4) -> list[str]:
    lines = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(shard_samples(folder)):
        if i >= k:
            break
        thumb = out_dir / f"example_{i}.png"
        with Image.open(io.BytesIO(s["jpg"])) as im:
            im.convert("RGB").resize((96, 96)).save(thumb)
        j = s["json"]
        lines += [f"### Example {i + 1}: true object *{corpus.label(j['url'])}*", "",
                  f"![example {i + 1}]({thumb.parent.name}/{thumb.name})", "",
                  f"- text1: {s['txt']}", f"- text2: {j.get('text2', '')}", f"- text3: {j.get('text3', '')}",
                  f"- syn_text: {j.get('syn_text', '')}", ""]
    return lines


def write_report(cfg: Any, work: Path, corpus_dir: Path, realsyn_dir: Path, results: dict[str, list[Any]]) -> Path:
    out = Path(cfg.output_dir)
    corpus = Corpus(corpus_dir)
    lines = ["# realsyn_pl demo: RealSyn on a generated interleaved corpus", "",
             f"{cfg.corpus.documents} documents (seed {cfg.seed}); teacher: "
             f"{'trained here on ' + str(cfg.teacher_pairs) + ' clean pairs' if cfg.teacher_model is None else cfg.teacher_model.name}; "
             f"student: {cfg.student.model.name}, {cfg.student.trainer.max_epochs} epochs, batch "
             f"{cfg.student.data.batch_size}, the same for every row.", "",
             "## Stage counts", "",
             "| stage | in | kept | dropped (by reason) | produced | kept + dropped = in |", "|---|---|---|---|---|---|"]
    rows = stage_rows(work)
    for r in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items())) or "-"
        produced = ", ".join(f"{k} {v}" for k, v in sorted(r["produced"].items())) or "-"
        lines.append(f"| {r['stage']} | {r['in']} | {r['kept']} | {dropped} | {produced} | "
                     f"{'yes' if r['conserved'] else '**NO**'} |")
    lines += ["", "Perplexity is not filtered here (no pretrained LM offline; the paper keeps GPT-2 large PPL in "
              "[30, 200]); captions are off and syn_text is the template merge of text1 with the teacher's tags "
              "(no captioner or LLM offline), marked backend=template in each sample's syn_meta.", ""]

    lines += ["## Students on each dataset (held-out images, uniform over the 24 concepts)", "",
              "| training data | pairs | text1 names the object | zero-shot top-1 | zero-shot mean per class | "
              "linear probe top-1 | image→text R@1 | text→image R@1 |", "|---|---|---|---|---|---|---|---|"]
    realsyn_acc = text_accuracy(realsyn_dir, corpus)
    for name, res in results.items():
        acc = realsyn_acc if name == "realsyn" else text_accuracy(out / "variants" / name, corpus)
        lines.append(
            f"| {name} | {acc['n']} | {100 * acc['text1']:.1f}% | "
            f"{_metric(res, 'zeroshot_classification', 'acc1')} | "
            f"{_metric(res, 'zeroshot_classification', 'mean_per_class_recall')} | "
            f"{_metric(res, 'linear_probe', 'lp_acc1')} | "
            f"{_metric(res, 'zeroshot_retrieval', 'text_retrieval_recall@1')} | "
            f"{_metric(res, 'zeroshot_retrieval', 'image_retrieval_recall@1')} |")
    lines += ["", f"Chance: zero-shot top-1 {100 * CHANCE:.1f}. Numbers are percentages from `realsyn_pl eval` "
              f"(per-variant reports under {out / 'eval'}). The dataset card with its plots: {realsyn_dir / 'card.md'}.",
              ""]
    lines += ["How often each RealSyn text names the image's true colour and shape: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in realsyn_acc.items() if k != "n") + ".", "", "## Example rows", ""]
    lines += examples(realsyn_dir, corpus, out / "report_files")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
