"""Which orderings a demo run shows: each comparison the paper makes (and the demo's own baselines), the two zero-shot
accuracies, and whether their difference is beyond noise. Written to `orderings.json` beside the report, so that
a test or a user reads verdicts instead of parsing markdown.

Noise: every student is scored on the same held-out images, so twice the standard error of a difference of two
independent binomial accuracies (sqrt(pa(1-pa)/n + pb(1-pb)/n)) is a conservative margin for the evaluation noise.
It does not cover the training noise (another seed gives another student), which is why the demo's test asserts
only the orderings that hold by a margin here.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Claim:
    name: str
    better: str  # the variant the claim puts above
    worse: str
    key: str  # the zero-shot set: shapes (uniform) or shapes_tail (the corpus's rare concepts)
    source: str


CLAIMS = (
    Claim("RealSyn above adjacent text", "realsyn", "adjacent_text", "shapes",
          "the paper's premise: retrieved texts beat the image's own page text"),
    Claim("RealSyn above random pairing", "realsyn", "random_pairing", "shapes", "sanity"),
    Claim("adjacent text above random pairing", "adjacent_text", "random_pairing", "shapes", "sanity"),
    Claim("text1-3 above text1", "realsyn_text1_3", "realsyn_text1", "shapes", "the paper's Table 6"),
    Claim("text1-3 + syn_text above text1-3", "realsyn", "realsyn_text1_3", "shapes", "the paper's Table 6"),
    Claim("balance above random sampling", "realsyn", "realsyn_random_sampling", "shapes", "the paper's Table 5"),
    Claim("balance above random sampling on tail concepts", "realsyn", "realsyn_random_sampling", "shapes_tail",
          "what balance sampling is for"),
)


@dataclass
class Ordering:
    claim: str
    better: str
    worse: str
    key: str
    source: str
    better_acc: float  # zero-shot top-1, percent
    worse_acc: float
    margin: float  # twice the standard error of the difference, percent
    verdict: str  # holds | reversed | within noise


def zero_shot(results: list[Any], key: str) -> Optional[float]:
    for r in results:
        if r.task == "zeroshot_classification" and r.key == key and r.status == "ok" and "acc1" in r.metrics:
            return 100 * r.metrics["acc1"]
    return None


def judge(a: float, b: float, n: int) -> tuple[float, str]:
    """(margin, verdict) for accuracy a claimed above accuracy b, both percentages over n images."""
    pa, pb = a / 100, b / 100
    margin = 200 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / max(n, 1))
    if a - b > margin:
        return margin, "holds"
    if b - a > margin:
        return margin, "reversed"
    return margin, "within noise"


def orderings(results: dict[str, list[Any]], n: int) -> list[Ordering]:
    """The claims whose two variants this run trained and evaluated."""
    out = []
    for c in CLAIMS:
        if c.better not in results or c.worse not in results:
            continue
        a, b = zero_shot(results[c.better], c.key), zero_shot(results[c.worse], c.key)
        if a is None or b is None:
            continue
        margin, verdict = judge(a, b, n)
        out.append(Ordering(c.name, c.better, c.worse, c.key, c.source, round(a, 2), round(b, 2), round(margin, 2),
                            verdict))
    return out


def write(path: Path, found: list[Ordering]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([asdict(o) for o in found], indent=1) + "\n")
    tmp.replace(path)


def read(path: Path) -> dict[str, Ordering]:
    return {o["claim"]: Ordering(**o) for o in json.loads(path.read_text())}


def markdown(found: list[Ordering], n: int) -> list[str]:
    if not found:
        return []
    lines = ["## Which orderings this run shows", "",
             f"Zero-shot top-1 over {n} held-out images per set. An ordering *holds* when the difference exceeds "
             "twice its standard error (the margin), is *reversed* when it exceeds it the other way, and is *within "
             "noise* otherwise; the margin covers the evaluation noise, not the training noise (another seed trains "
             "another student). The demo's test asserts the orderings that hold here. Also in orderings.json.", "",
             "| claim | source | set | above | below | difference | margin | verdict |", "|---|---|---|---|---|---|---|---|"]
    for o in found:
        lines.append(f"| {o.claim} | {o.source} | {o.key} | {o.better_acc:.1f} | {o.worse_acc:.1f} | "
                     f"{o.better_acc - o.worse_acc:+.1f} | {o.margin:.1f} | {o.verdict} |")
    return lines + [""]
