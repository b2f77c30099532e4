"""Which caption supervises a sample: one of text1..3 / syn_text, drawn anew each time the sample is read."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from realsyn_pl.config import ConfigError


def parse_metadata(raw: Optional[bytes]) -> Optional[dict[str, Any]]:
    """The sample's .json member as a dict; None when absent. Raises ValueError when it is not a JSON object."""
    if raw is None:
        return None
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def available_texts(txt: Optional[str], meta: Optional[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, str]:
    """Non-empty texts of a sample by key. `text1` is the .txt member (img2dataset's caption column); the others
    are read from the .json member, at top level or under a nested "text" dict."""
    found: dict[str, str] = {}
    nested = meta.get("text") if meta and isinstance(meta.get("text"), Mapping) else None
    for key in keys:
        value: Any = None
        if key == "text1" and txt is not None:
            value = txt
        elif meta is not None and key in meta:
            value = meta[key]
        elif nested is not None and key in nested:
            value = nested[key]
        if isinstance(value, str) and value.strip():
            found[key] = value.strip()
    return found


@dataclass(frozen=True)
class TextChooser:
    keys: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def create(cls, keys: Sequence[str], weights: Optional[Sequence[float]]) -> "TextChooser":
        if not keys:
            raise ConfigError("data.text_keys must name at least one text")
        if weights is None:
            weights = [1.0] * len(keys)
        if len(weights) != len(keys):
            raise ConfigError(f"data.text_weights has {len(weights)} values for {len(keys)} data.text_keys")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("data.text_weights must be non-negative with a positive sum")
        return cls(tuple(keys), tuple(float(w) for w in weights))

    def choose(self, texts: Mapping[str, str], rng: random.Random) -> Optional[str]:
        """Draw one available text, weights renormalised over what the sample has; None if it has none."""
        options = [(texts[k], w) for k, w in zip(self.keys, self.weights) if k in texts and w > 0]
        if not options:
            return None
        return rng.choices([t for t, _ in options], weights=[w for _, w in options], k=1)[0]
