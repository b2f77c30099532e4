"""The students the demo trains, the texts each one sees, and the corpus's head and tail concepts they are scored on
(read by run.py, which trains them, and report.py, which reports them)."""
from __future__ import annotations

from typing import Any

VARIANTS = ("realsyn", "realsyn_text1", "realsyn_text1_3", "realsyn_random_sampling", "adjacent_text",
            "random_pairing")
# The texts each variant trains on (data.text_keys); the text ablation trains on the RealSyn shards as built.
TEXT_KEYS = {"realsyn_text1": ["text1"], "realsyn_text1_3": ["text1", "text2", "text3"]}
ALL_TEXTS = ["text1", "text2", "text3", "syn_text"]


def head_tail(cfg: Any) -> tuple[list[str], list[str]]:
    """The corpus's concepts ("colour shape") of a DemoConfig, most frequent first, split into the head (its
    `head_concepts` most frequent) and the tail."""
    from realsyn_pl.demo.corpus import concept_weights

    ranked = [f"{c} {s}" for (c, s), _ in sorted(concept_weights(cfg.corpus).items(), key=lambda kv: -kv[1])]
    return ranked[:cfg.head_concepts], ranked[cfg.head_concepts:]
