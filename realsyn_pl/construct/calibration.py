"""The paper's removal fractions in one place, the band a build's removal may stray in before a stage stops (an
absolute threshold) or the dataset card warns (any filter), and the config keys that set each step's removal.

Similarity scales differ between models (CLIP-class models put matching web pairs near cosine 0.3, the paper's
window [0.51, 0.61] is EVA02-E's), so the paper's thresholds carry over as removal fractions, not as values.
"""
from __future__ import annotations

# RealSyn Fig. 2 / §3.1 (filters) and §3.3 (window: 29.7M of 198M pairs)
IMAGE_DEDUP = 0.305
SENTENCE_DEDUP = 0.276
WINDOW = 0.15

# (card label, the stages that make up the step here, the paper's fraction)
PAPER_REMOVAL = (
    ("images: quality (size, aspect, corrupt)", ("image_filter",), 0.152),
    ("images: dedup (exact + semantic)", ("dedup_images",), IMAGE_DEDUP),
    ("sentences: quality (emoji, URL, length, CAT)", ("sentence_filter",), 0.146),
    ("sentences: semantic (entropy, perplexity)", ("entropy", "perplexity"), 0.363),
    ("sentences: dedup (exact + semantic)", ("dedup_sentences",), SENTENCE_DEDUP),
)
# the keys that set each step's removal, named where it is far from the paper's
STEP_KEYS = {
    ("image_filter",): "image_filter.min_side / min_aspect / max_aspect",
    ("dedup_images",): "dedup.mode / dedup.threshold / dedup.quantile",
    ("sentence_filter",): "sentence_filter.min_words / max_words / drop_emoji / drop_urls / cat_rule",
    ("entropy", "perplexity"): "entropy.threshold / entropy.log_base / entropy.mode / perplexity.min_ppl / max_ppl",
    ("dedup_sentences",): "dedup_text.mode / threshold / quantile (dedup.* where dedup_text is null)",
}
WINDOW_KEYS = "balance.window.mode / low / high (quantile mode: q_low / q_high)"

BAND = (0.5, 2.0)  # removal within [0.5x, 2x] the paper's passes


def outside_band(removal: float, paper: float) -> bool:
    return not BAND[0] * paper <= removal <= BAND[1] * paper


def band_text(paper: float) -> str:
    """'the paper 30.5 %, accepted 15.2 %-61.0 %'."""
    return f"the paper {paper:.1%}, accepted {BAND[0] * paper:.1%}-{BAND[1] * paper:.1%}"
