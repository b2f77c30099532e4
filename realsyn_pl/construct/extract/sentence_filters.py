"""Sentence splitting and the per-sentence quality rules (emoji, URL, word count, CAT).

Splitting uses pysbd, not NLTK punkt as the paper did: punkt's model must be fetched with nltk.download() at run
time (no downloads here, and a hidden network dependency in a pipeline), while pysbd is rule based, ships all its
rules in the wheel, is deterministic and passes the "Golden Rules" segmentation suite for English. Paragraph breaks
(newlines) always end a sentence. pysbd's time grows faster than linearly with the text it is given (it searches the
whole text once per sentence to find the sentence's span), so a paragraph longer than sentence_filter.split_chars
is first cut into pieces of at most that many characters (at the last sentence end in reach, else the last
whitespace, else a hard cut) and each piece is split on its own.

Sentences longer than sentence_filter.max_chars characters are dropped (too_long) before the word count and before
spaCy sees them (its tokenizer is quadratic in long punctuation runs).

Words (for the 3..81 length rule and for entropy) are maximal runs of letters/digits, allowing inner apostrophes
(`don't` is one word); punctuation is not a word. The paper does not say which word tokenizer it used.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterator

from realsyn_pl.construct.engine.config import SentenceFilterConfig
from realsyn_pl.construct.extract.cat_rule import analyse

WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# A scheme or www. prefix, or a host name: a run of letters, digits, dots and hyphens holding a letter or digit then
# a dot and a common TLD that ends at a word boundary ("example.com", "cdn.example.co.uk/x"). A match starts only where
# such a run starts and scans it once, so the search is linear in the text: a pattern that let the host start
# anywhere re-scanned the rest of a long hyphen-joined token from each of its positions, quadratic in its length.
URL_RE = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)\S|(?<![a-z0-9.-])[a-z0-9.-]*[a-z0-9]"
                    r"\.(?:com|org|net|edu|gov|io|co|uk|de|fr|ru|cn|jp|info|biz|ly|me|tv)\b")
# Where a long paragraph is best cut: after sentence-ending punctuation (and closing quotes or brackets) that is
# followed by whitespace, or after CJK sentence-ending punctuation, which needs none.
SENTENCE_END_RE = re.compile(r"[.!?\u2026]['\"\u2019\u201d)\]]*\s+"
                             r"|[\u3002\uff01\uff1f]['\"\u2019\u201d\u300d\u300f)\]]*\s*")
WHITESPACE_RE = re.compile(r"\s+")
# Emoji and pictographs (the blocks emoji live in), regional-indicator flags, variation selector 16, ZWJ sequences.
EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U00002B00-\U00002BFF"
                      "\U0000FE0F\U0000200D\U00002300-\U000023FF]")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


@lru_cache(maxsize=4)
def _segmenter(language: str):
    import pysbd

    return pysbd.Segmenter(language=language, clean=False)


def _last_end(pattern: re.Pattern[str], text: str, start: int, stop: int) -> int:
    """The end of the last match of `pattern` in text[start:stop] that starts after `start`, else 0 (no cut)."""
    last = 0
    for m in pattern.finditer(text, start, stop):
        if m.start() > start:
            last = m.end()
    return last


def pieces(text: str, max_chars: int) -> Iterator[str]:
    """`text` cut into consecutive pieces of at most `max_chars` characters: each cut after the last sentence end
    within reach, else after the last whitespace, else at max_chars. Linear: a window is cut after its last sentence
    end (else its last whitespace), so the text the next window scans again holds none of them, and no character is
    scanned more than three times."""
    if max_chars < 1:
        raise ValueError(f"sentence_filter.split_chars must be at least 1, got {max_chars}")
    start = 0
    while len(text) - start > max_chars:
        stop = start + max_chars
        cut = _last_end(SENTENCE_END_RE, text, start, stop) or _last_end(WHITESPACE_RE, text, start, stop) or stop
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_sentences(text: str, language: str = "en", split_chars: int = 4000) -> list[str]:
    """Sentences of `text`, whitespace-normalised; paragraphs longer than `split_chars` are split piece by piece."""
    out: list[str] = []
    seg = _segmenter(language)
    for para in text.splitlines():
        for piece in pieces(para.strip(), split_chars):
            piece = piece.strip()
            if not piece:
                continue
            for s in seg.segment(piece):
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
    if len(text) > cfg.max_chars:
        return "too_long"
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
