"""Sentence splitting and the per-sentence quality rules (emoji, URL, word count, CAT).

Splitting uses pysbd, not NLTK punkt as the paper did: punkt's model must be fetched with nltk.download() at run
time (no downloads here, and a hidden network dependency in a pipeline), while pysbd is rule based, ships all its
rules in the wheel, is deterministic and passes the "Golden Rules" segmentation suite for English. Paragraph breaks
(newlines) always end a sentence.

Words (for the 3..81 length rule and for entropy) are maximal runs of letters/digits, allowing inner apostrophes
(`don't` is one word); punctuation is not a word. The paper does not say which word tokenizer it used.
"""
from __future__ import annotations

import re
from functools import lru_cache

from realsyn_pl.construct.engine.config import SentenceFilterConfig
from realsyn_pl.construct.extract.cat_rule import analyse

WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
URL_RE = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)\S+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|gov|io|"
                    r"co|uk|de|fr|ru|cn|jp|info|biz|ly|me|tv)(?:/\S*)?\b")
# Emoji and pictographs (the blocks emoji live in), regional-indicator flags, variation selector 16, ZWJ sequences.
EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U00002B00-\U00002BFF"
                      "\U0000FE0F\U0000200D\U00002300-\U000023FF]")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


@lru_cache(maxsize=4)
def _segmenter(language: str):
    import pysbd

    return pysbd.Segmenter(language=language, clean=False)


def split_sentences(text: str, language: str = "en") -> list[str]:
    out: list[str] = []
    seg = _segmenter(language)
    for para in text.splitlines():
        para = para.strip()
        if not para:
            continue
        for s in seg.segment(para):
            s = " ".join(s.split())
            if s:
                out.append(s)
    return out


def has_url(text: str) -> bool:
    return URL_RE.search(text) is not None


def has_emoji(text: str) -> bool:
    return EMOJI_RE.search(text) is not None


CAT_RULES = ("parser", "approximate", "off")


def quality_reason(text: str, cfg: SentenceFilterConfig) -> str | None:
    """None if the sentence passes the quality filter, else the drop reason (checked in this order). With
    cat_rule=parser the CAT rule is not checked here: the stage parses the survivors in batches (cat_parse.py)."""
    if cfg.drop_emoji and has_emoji(text):
        return "emoji"
    if cfg.drop_urls and has_url(text):
        return "url"
    w = words(text)
    if len(w) < cfg.min_words:
        return "too_few_words"
    if len(w) > cfg.max_words:
        return "too_many_words"
    if cfg.cat_rule == "approximate":
        if not analyse([x.lower() for x in w]).passes(cfg.cat_min_complexity, cfg.cat_require_action):
            return "cat_rule"
    elif cfg.cat_rule not in CAT_RULES:
        raise ValueError(f"sentence_filter.cat_rule must be one of {', '.join(CAT_RULES)}, got {cfg.cat_rule!r}")
    return None
