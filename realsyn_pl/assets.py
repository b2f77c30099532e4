"""Where the repository's top-level folders `configs/` and `eval/` are, in a source checkout and in an installed wheel.

A checkout (or an editable install) reads them in place, so an edited preset takes effect at once; a wheel carries
copies as the packages realsyn_pl._configs and realsyn_pl._eval (see setup.py).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_MARKERS = {"configs": "fit", "eval": "suites"}  # a subfolder that tells the real folder from a same-named stranger


def asset_dir(name: str) -> Path:
    """The folder `configs` or `eval`; raises FileNotFoundError naming both places looked in."""
    in_repo = _REPO / name
    if (in_repo / _MARKERS[name]).is_dir():
        return in_repo
    spec = importlib.util.find_spec(f"realsyn_pl._{name}")
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(list(spec.submodule_search_locations)[0])
        if (packaged / _MARKERS[name]).is_dir():
            return packaged
    raise FileNotFoundError(f"realsyn_pl's {name}/ folder is missing: not at {in_repo} and not installed as "
                            f"realsyn_pl._{name} (reinstall with `pip install -e .` from a clone)")


def find_preset(name: str) -> Path | None:
    """A config preset by name, for `--config fit/tiny_cpu` outside the repository: configs/<name>[.yaml]."""
    rel = name[len("configs/"):] if name.startswith("configs/") else name
    try:
        root = asset_dir("configs")
    except FileNotFoundError:
        return None
    for candidate in (root / rel, root / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def preset_names() -> list[str]:
    """Every packaged preset as `<command>/<name>`, for error messages and --help."""
    try:
        root = asset_dir("configs")
    except FileNotFoundError:
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))
