"""A hint for the commonest slip in a `key=value` flow value: `{a:1}` without the space YAML needs after the colon.

YAML reads `a:1` inside a flow mapping or list as one plain word, so `ray.stages={embed_images:{gpus:1}}` either fails
to parse ("found unexpected ':'") or yields a key "gpus:1" with no value, which the schema then rejects under a name
the user never wrote (or, under an untyped key, accepts silently).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import yaml

HINT = "write {a: 1} (a space after the colon)"
# a word, a colon, then no space: not a URL's "://" nor a Windows drive's ":/"
SQUEEZED = re.compile(r"^[A-Za-z_][\w.\-]*:[^\s/]")
SQUEEZED_IN_TEXT = re.compile(r"[{\[,]\s*([A-Za-z_][\w.\-]*:[^\s/{}\[\],]+)")


def _first(node: Any) -> Optional[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and SQUEEZED.match(k):
                return k
            if (hit := _first(v)) is not None:
                return hit
    elif isinstance(node, list):
        for v in node:
            if (hit := _first(v)) is not None:
                return hit
    elif isinstance(node, str) and SQUEEZED.match(node):
        return node
    return None


def squeezed_colon(value: str) -> Optional[str]:
    """The first `key:value` written without a space in the flow value `value` ({...} or [...]), or None."""
    text = value.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:  # `{a:{b:1}}` does not parse at all: look at the text
        m = SQUEEZED_IN_TEXT.search(text)
        return m.group(1) if m else None
    return _first(parsed)


def flow_hint(key: str, value: str) -> Optional[str]:
    """The one line for an override whose flow value has a squeezed `key:value`, or None."""
    hit = squeezed_colon(value)
    if hit is None:
        return None
    return f"{key}: {value!r} holds {hit!r}, which YAML reads as one word: {HINT}"
