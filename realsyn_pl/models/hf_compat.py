"""transformers API differences between the versions a GPU cluster image may bring (>= 4.45) and the CPU pin."""
from __future__ import annotations

from typing import Any, Optional

from packaging.version import Version

# from_pretrained's dtype argument is `dtype` from 4.56 on; before that it is `torch_dtype` and `dtype` reaches the
# model's __init__ as an unknown keyword (a TypeError)
DTYPE_KWARG_SINCE = Version("4.56.0")


def dtype_kwargs(dtype: Any, version: Optional[str] = None) -> dict[str, Any]:
    """{name: dtype} for from_pretrained in the installed transformers (or `version`); {} for dtype None."""
    if dtype is None:
        return {}
    if version is None:
        import transformers

        version = transformers.__version__
    return {"dtype" if Version(version) >= DTYPE_KWARG_SINCE else "torch_dtype": dtype}
