"""The dataset card of a build: `card.md` with a warning first when the build was a smoke run (card_notes.py), counts
per stage, the balance window and caps, PNG histograms (retrieval similarity, image-text similarity with the window
marked, image cluster sizes before/after the cap: a log count axis only where the bars span a decade) and example
rows; logged to W&B when a run is active. Reads only the stage directories' manifests and side files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq

from realsyn_pl.construct.calibration import PAPER_REMOVAL
from realsyn_pl.construct.engine.histogram import Histogram
from realsyn_pl.construct.release.card_notes import (
    fewer_than_k_note,
    random_init_stages,
    removal_warnings,
    smoke_warnings,
)
from realsyn_pl.construct.release.write import selected_rows

# the paper's fractions live in construct/calibration.py (PAPER_REMOVAL, re-exported here)
__all__ = ["PAPER_REMOVAL", "removal_rows", "write_card"]


def _notes(manifests: dict[str, dict[str, Any]], stages: tuple[str, ...]) -> str:
    """What makes a step's fraction not comparable with the paper's: a filter of the step that was switched off."""
    return ", ".join(f"{s} off" for s in stages if (manifests[s].get("config") or {}).get("enabled") is False)


def removal_rows(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: each filtering step's removal fraction here beside the paper's (and a note when one of its
    filters was off, e.g. perplexity.enabled=false: its sentences passed unscored), then each drop reason's."""
    # the note is a last column so the first five keep their text whatever the config (the demo test matches them)
    rows = ["| step | stages | in | removed here | paper | note |", "|---|---|---|---|---|---|"]
    for label, stages, paper in PAPER_REMOVAL:
        found = [manifests[s]["counts"] for s in stages if s in manifests]
        if len(found) != len(stages) or not found[0]["n_in"]:
            continue
        n_in, n_out = found[0]["n_in"], found[-1]["n_out"]
        rows.append(f"| {label} | {', '.join(stages)} | {n_in} | {1 - n_out / n_in:.1%} | {paper:.1%} | "
                    f"{_notes(manifests, stages)} |")
    rows += ["", "| stage | drop reason | removed | of the stage's input |", "|---|---|---|---|"]
    for _, stages, _ in PAPER_REMOVAL:
        for s in stages:
            c = (manifests.get(s) or {}).get("counts")
            for reason, n in sorted((c or {}).get("dropped", {}).items()):
                rows.append(f"| {s} | {reason} | {n} | {n / c['n_in']:.1%} |")
    return rows


def _dropped(m: dict[str, Any]) -> str:
    c = m.get("counts") or {}
    return f"{1 - c['n_out'] / c['n_in']:.1%} of its input" if c.get("n_in") else "nothing in"


def _thresholds(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """Each threshold both ways: the value it was applied at and the fraction it removed (a quantile-mode value was
    found from the fraction; an absolute one gave it)."""
    out = []
    ent = (manifests.get("entropy") or {}).get("entropy_threshold")
    if ent:
        out.append(f"- entropy ({ent['mode']}, log base {ent['log_base']}): drop theta < {ent['threshold']:.4f}: "
                   f"dropped {_dropped(manifests['entropy'])}")
    ppl = (manifests.get("perplexity") or {}).get("config") or {}
    if ppl.get("enabled") is not False and "min_ppl" in ppl:
        out.append(f"- perplexity: keep {ppl['min_ppl']:g} <= PPL <= {ppl['max_ppl']:g}: dropped "
                   f"{_dropped(manifests['perplexity'])}")
    for s in ("dedup_images", "dedup_sentences"):
        m = manifests.get(s) or {}
        t, c = m.get("semantic_threshold"), m.get("counts") or {}
        if t and t.get("threshold") is not None and c.get("n_in"):
            exact, near = (c["dropped"].get(r, 0) / c["n_in"] for r in ("exact_duplicate", "near_duplicate"))
            out.append(f"- {s} ({t['mode']}): cosine distance < {t['threshold']:.4f}: removed {exact + near:.1%} of "
                       f"its input (exact {exact:.1%} + semantic {near:.1%})")
    win = (manifests.get("balance") or {}).get("window") or {}
    if "below_low" in win:
        out.append(f"- balance window ({win['mode']}): similarity [{win['low']:.4f}, {win['high']:.4f}] = quantiles "
                   f"[{win['below_low']:.3f}, {1 - win['above_high']:.3f}] of the pairs' similarities: "
                   f"{win['below_low']:.1%} below, {win['above_high']:.1%} above, removed {win['outside_of_sims']:.1%}")
    return out


def _manifests(work: Path) -> list[tuple[str, dict[str, Any]]]:
    from realsyn_pl.construct.engine.order import STAGE_ORDER

    order = {n: i for i, n in enumerate(STAGE_ORDER)}
    found = []
    for m in work.glob("*/manifest.json"):
        d = json.loads(m.read_text())
        if d.get("done"):
            found.append((m.parent.name, d))
    return sorted(found, key=lambda x: (order.get(x[0], len(order)), x[0]))


BINS = 50  # bars of a histogram of a k-sized array


def wide_range(values: np.ndarray) -> bool:
    """Whether the bars of a histogram of `values` span a decade or more, which a log count axis is for; on bars of
    1-2 (a small build's clusters) it squeezes them into the bottom of a 10^0..10^1 axis, so those get a linear one."""
    counts = np.histogram(values[np.isfinite(values)], bins=BINS)[0] if values.size else np.zeros(0)
    counts = counts[counts > 0]
    return bool(counts.size) and bool(counts.max() >= 10 * counts.min())


def _hist(path: Path, values: np.ndarray | Histogram, title: str, xlabel: str, lines: tuple = (),
          log: bool = False) -> Path:
    """A histogram plot of `values` (a k-sized array) or of a Histogram filled in a stream (a pool-sized one)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if isinstance(values, Histogram):
        counts, edges = values.coarse()
        ax.hist(edges[:-1], bins=edges, weights=counts, color="#4477aa", log=log)
    else:
        ax.hist(values[np.isfinite(values)], bins=BINS, color="#4477aa", log=log)
    for x, label in lines:
        ax.axvline(x, color="#cc3311", linestyle="--", label=label)
    if lines:
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def random_subset_sizes(work: Path, k: int, cap: int) -> np.ndarray:
    """Pairs per image cluster in the random subset of cap `cap` (balance.sampling=random), shard by shard."""
    out = np.zeros(k, np.int64)
    for f in sorted((work / "balance").glob("balanced-*.parquet")):
        cluster = pq.read_table(f, columns=["image_cluster"]).column("image_cluster").to_numpy()
        out += np.bincount(cluster[selected_rows(f, cap, "random")].astype(np.int64), minlength=k)[:k]
    return out


def write_card(work: Path, out_dir: Path, cap: Optional[int], sampling: str = "balanced") -> Path:
    work, out_dir = Path(work), Path(out_dir)
    plots: dict[str, Path] = {}
    manifests = _manifests(work)
    lines = ["# RealSyn build: dataset card", ""]
    warnings = smoke_warnings(dict(manifests))
    if warnings:  # first, so nobody takes a smoke build's shards for data
        what = "not a dataset" if random_init_stages(dict(manifests)) else "not the paper's pipeline"
        lines += [f"> **Warning: {what}.** " + " ".join(warnings), ""]
    lines += [f"Build directory: `{work}`; shards: `{out_dir}`.", "",
              "## Counts per stage", "", "| stage | in | kept | dropped (by reason) | made |", "|---|---|---|---|---|"]
    for name, m in manifests:
        c = m["counts"]
        drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items()) or "-"
        made = ", ".join(f"{k} {v}" for k, v in c.get("produced", {}).items()) or "-"
        lines.append(f"| {name} | {c['n_in']} | {c['n_out']} | {drops} | {made} |")
    for note in fewer_than_k_note(dict(manifests)):
        lines += ["", note]
    lines += ["", "## Filters: removal fractions beside the paper's", "", *removal_rows(dict(manifests)),
              "", *_thresholds(dict(manifests))]
    far = removal_warnings(dict(manifests))
    if far:  # the paper's thresholds carry over as fractions, not values (construct/calibration.py)
        lines += ["", "> **Warning: removal far from the paper's** (outside 0.5x-2x). " + " ".join(far)]
    syn_cfg = (dict(manifests).get("syn_text") or {}).get("config", {})
    if syn_cfg.get("zero_shot"):
        lines += ["", f"**Note: syn_text was written zero-shot** by `{syn_cfg.get('model')}` (rewrite.backend="
                  f"{syn_cfg.get('backend')}, no rewrite.adapter, rewrite.allow_zero_shot=true); the paper fine-tunes "
                  "its rewriter."]
    retrieval = Histogram()  # filled one shard at a time: the pool's similarities are never all in memory
    for f in sorted((work / "retrieve").glob("retrieved-*.parquet")):
        retrieval.add(pq.read_table(f, columns=["sims"]).column("sims").combine_chunks().flatten().to_numpy())
    if retrieval.n:
        plots["retrieval"] = _hist(out_dir / "card_retrieval_similarity.png", retrieval,
                                   "retrieval similarity (all kept texts)", "cosine(image, text)")
    bal = dict(manifests).get("balance")
    if bal is not None and (work / "balance" / "similarity.npy").is_file():
        win = bal["window"]
        sim = np.load(work / "balance" / "similarity.npy", mmap_mode="r", allow_pickle=False)
        window = Histogram()
        for lo in range(0, len(sim), 1 << 22):  # 16 MB of float32 at a time
            window.add(np.asarray(sim[lo:lo + (1 << 22)]))
        plots["window"] = _hist(out_dir / "card_image_text_similarity.png", window,
                                f"image-{win['similarity_text']} similarity", "cosine",
                                ((win["low"], f"low {win['low']:.3f}"), (win["high"], f"high {win['high']:.3f}")))
        every = np.load(work / "balance" / "image_cluster_sizes.npy")
        sizes = every[every > 0]
        if sampling == "random" and cap is not None:  # what was written: big clusters keep more than t
            after = random_subset_sizes(work, len(every), cap)[every > 0]
        else:
            after = np.minimum(sizes, cap) if cap is not None else sizes
        plots["clusters_before"] = _hist(out_dir / "card_cluster_sizes_before.png", sizes.astype(float),
                                         "image cluster sizes before the cap", "pairs per cluster",
                                         log=wide_range(sizes.astype(float)))
        plots["clusters_after"] = _hist(out_dir / "card_cluster_sizes_after.png", after.astype(float),
                                        f"image cluster sizes after cap t={cap} ({sampling} sampling)",
                                        "pairs per cluster",
                                        log=wide_range(after.astype(float)))
        lines += ["", "## Semantic balance", "",
                  f"- window on {win['similarity_text']} similarity ({win['mode']}): "
                  f"[{win['low']:.4f}, {win['high']:.4f}], removed fraction {win['removed_fraction']:.4f}",
                  *([f"- note: {win['note']}"] if "note" in win else []),
                  f"- image clusters: {bal['image_clusters']['non_empty']} non-empty, largest "
                  f"{bal['image_clusters']['max']}",
                  *[f"- cap t={t}: {n} pairs" for t, n in bal["caps"].items()],
                  *([f"- random sampling (Table 5's ablation, balance.sampling=random): cap t={t}: {n} pairs drawn "
                     "uniformly from the same in-window pool" for t, n in bal.get("random_caps", {}).items()]),
                  f"- written: cap {cap}, {sampling} sampling"]
    lines += ["", "## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()]
    index = sorted(out_dir.glob("?????.parquet"))
    if index:
        rows = pq.read_table(index[0]).slice(0, 5).to_pylist()
        lines += ["", "## Example rows", "", "| key | text1 | text2 | text3 | syn_text | sim(text1) |",
                  "|---|---|---|---|---|---|"]
        esc = lambda s: (s or "").replace("|", "\\|").replace("\n", " ")[:120]  # noqa: E731
        for r in rows:
            lines.append(f"| {r['key']} | {esc(r['text1'])} | {esc(r['text2'])} | {esc(r['text3'])} | "
                         f"{esc(r['syn_text'])} | {r['sims'][0]:.3f} |")
    card = out_dir / "card.md"
    card.write_text("\n".join(lines) + "\n")
    _log_wandb(card, plots)
    return card


def _log_wandb(card: Path, plots: dict[str, Path]) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:  # only when a run is attached
        return
    wandb.log({f"dataset_card/{k}": wandb.Image(str(p)) for k, p in plots.items()})
    wandb.log({"dataset_card/markdown": wandb.Html(f"<pre>{card.read_text()}</pre>")})
