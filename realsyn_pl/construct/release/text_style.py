"""How `write` spells the realistic texts text1-3: natural (as extracted, the default) or official (as the published
RealSyn parquet files: lower-cased and space-tokenised, `it 's`, `do n't`, `( red )`). syn_text is never changed:
the official syn_text is normally cased and punctuated.

official = spaCy's rule-based English tokenizer (spacy.blank("en"): no model download) on the text as written, the
tokens lower-cased and joined by single spaces. Tokenising before lower-casing keeps the case-sensitive exceptions
whole (`U.S.` -> `u.s.`, `Dr.` -> `dr.`). Known differences from the official texts (data_build/README.md): spaCy
splits hyphenated words (`e-mail` -> `e - mail`), and the official texts sometimes split digits (`2 0 2 0`), which
this does not do; the authors' tokenizer is not published.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

TEXT_STYLES = ("natural", "official")


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    import spacy

    return spacy.blank("en").tokenizer


def official_text(text: Optional[str]) -> Optional[str]:
    """`text` lower-cased and space-tokenised like the released text1-3; None stays None."""
    if text is None:
        return None
    return " ".join(t.text.lower() for t in _tokenizer()(text) if not t.is_space)


def styled(text: Optional[str], style: str) -> Optional[str]:
    return official_text(text) if style == "official" else text
