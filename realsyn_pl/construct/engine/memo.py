"""Things a task loads once per worker process (a parser, a vocabulary): Ray runs many units in one worker."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, TypeVar

T = TypeVar("T")
KEEP = 4  # entries kept per process: a worker serves one build at a time, a test session several
_CACHE: "OrderedDict[str, Any]" = OrderedDict()


def per_process(key: str, make: Callable[[], T]) -> T:
    """`make()` the first time `key` is asked for in this process, the same object after. The key must name
    everything the value depends on (a stage's hash does)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = make()
    _CACHE[key] = value
    while len(_CACHE) > KEEP:
        _CACHE.popitem(last=False)
    return value
