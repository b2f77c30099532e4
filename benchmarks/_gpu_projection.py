"""GPU-hours of the paper's build from benchmarks/gpu_throughput.py's rows: each stage's item count (from the paper,
as /work/shared/spec/realsyn.md transcribes it) over the measured rate, beside the paper's figures and public
anchors. The counts are the paper's; what each stage processes is the project's stage order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from _gpu_parts import Row, finite

# output tokens per syn_text: the released RealSyn sets average 36-40 tokens per text (the paper's Table 15)
SYN_TOKENS = 40


@dataclass
class Stage:
    name: str
    count: float        # items the stage processes in the paper's build
    source: str         # where the count comes from
    part: str           # the benchmark rows it is projected from ...
    unit: str           # ... their unit
    scale: float = 1.0  # units per item (rewrite: output tokens per text)


STAGES = [
    Stage("embed_images (image dedup input)", 285e6, "336M extracted - 51M by the quality filter (§3.1)", "embed",
          "images/s"),
    Stage("perplexity", 1.82e9, "sentences after the quality filter (§3.1, 2.13B -> 1.82B); an upper bound where "
          "entropy drops some first", "perplexity", "sentences/s"),
    Stage("embed_sentences (sentence dedup input)", 1.16e9, "after the semantic filter (§3.1, 1.82B -> 1.16B)",
          "embed", "sentences/s"),
    Stage("dedup pair blocks, images", 285e6, "as embed_images", "dedup", "items/s"),
    Stage("dedup pair blocks, sentences", 1.16e9, "as embed_sentences", "dedup", "items/s"),
    Stage("retrieve: centre probe", 198e6, "images after dedup (§3.1, 285M -> 198M)", "retrieval", "images/s"),
    Stage("retrieve: intra-cluster top-3", 198e6, "images after dedup", "retrieval", "images/s"),
    Stage("caption", 198e6, "images after dedup (§3.2)", "caption", "images/s"),
    Stage("rewrite (syn_text)", 198e6, f"one syn_text per image, {SYN_TOKENS} output tokens each (Table 15: 36-40 "
          "tokens per text)", "rewrite", "output tokens/s", SYN_TOKENS),
    Stage("embed_syn_text (balance window)", 198e6, "one syn_text per image (§3.3; image embeddings reused)",
          "embed", "sentences/s"),
]

# what the rows above are compared with; each line says where it comes from
PAPER = [
    "Paper: hierarchical retrieval of 198M images against 0.84B sentences takes ~40 GPU-hours on 8xA100 (brute "
    "force: >10,000); it gives no total for the model stages. An outside estimate of the whole build (from the "
    "paper's counts and its models' sizes, not in the paper): roughly 9,000 A100-hours of model inference plus ~40 "
    "GPU-hours of clustering and retrieval.",
    "Not measured here: k-means (cluster: 2M centres over 0.84B sentences; balance: 1M over 168M images: faiss, "
    "benchmarks/kmeans_scale.py), tagging (tag: a CLIP-sized model, within the embed rows' order), downloads.",
]


# perplexity.precision of the paper preset: the projection uses that row, not the fastest
PRESET_PPL_PRECISION = "32"


def best(rows: list[Row], part: str, unit: str, model: str = "") -> Optional[Row]:
    """The fastest measured row of a part in a unit (the precision and batch a GPU build would be set to)."""
    got = [r for r in rows if r.part == part and r.unit == unit and finite(r.value) and model in r.model]
    return max(got, key=lambda r: r.value) if got else None


def projection(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(stage, count and source, rate used, GPU-hours) per stage, then the total."""
    out, total, missing = [], 0.0, []
    for st in STAGES:
        key = ("probe" if "probe" in st.name else "intra" if "intra" in st.name else "")
        r = best(rows, st.part, st.unit, key)
        if st.part == "perplexity":  # the presets score in fp32 until bf16-fp32-logits holds its bound on a GPU
            r = best([x for x in rows if x.precision == PRESET_PPL_PRECISION], st.part, st.unit, key)
        if r is None:
            out.append((st.name, f"{st.count:,.0f}: {st.source}", "no measurement", "-"))
            missing.append(st.name)
            continue
        hours = st.count * st.scale / r.value / 3600
        total += hours
        out.append((st.name, f"{st.count:,.0f}: {st.source}",
                    f"{r.value:,.1f} {r.unit} ({r.precision}, batch {r.batch})", f"{hours:,.1f}"))
    note = f"without {', '.join(missing)}" if missing else "the stages above"
    out.append(("total", "", note, f"{total:,.1f}"))
    return out


def projection_table(rows: list[Row], gpu: str) -> str:
    lines = [f"| stage | items (source) | rate on {gpu} | GPU-hours |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in projection(rows)]
    lines += ["| paper: hierarchical retrieval | 198M images x 0.84B sentences | 8xA100 | ~40 (A100) |",
              "| estimate (not the paper's), whole build | model inference + clustering and retrieval | A100 | ~9,000 + ~40 "
              "(A100) |"]
    return "\n".join(lines)


def measured(rows: list[Row], part: str, unit: str, model: str = "") -> str:
    """The measured rows of a part in a unit, as `value (model tail, precision, batch)`, or why there are none."""
    got = [r for r in rows if r.part == part and r.unit == unit and model in r.model]
    if not got:
        return "not run"
    return "; ".join(f"{r.value:,.0f} ({r.model}, {r.precision}, batch {r.batch})"
                     if finite(r.value) else f"skipped: {r.skip}" for r in got)


def anchors_table(rows: list[Row], gpu: str) -> str:
    """The public anchors beside this run's rows for the same work (per GPU)."""
    lines = [f"| anchor | its figure | this run, {gpu} |", "|---|---|---|",
             f"| open_clip ViT-B/32 training | ~785 samples/s per A100-40GB | "
             f"{measured(rows, 'fit', 'samples/s')} |",
             f"| NeMo Curator semantic dedup (nightly floor) | >= 183k items/s per 8-GPU node (~23k per GPU) | "
             f"{measured(rows, 'dedup', 'items/s')} |",
             "| faiss k-means, 50M points into 1M centres | 899 s on a multi-GPU machine | not measured here |",
             f"| 8B rewriter (datatrove's inference sweep) | ~6.4k output tokens/s per H100 | "
             f"{measured(rows, 'rewrite', 'output tokens/s')} |"]
    return "\n".join(lines)
