"""`model.custom` checked against open_clip's own schema (CLIP's arguments, CLIPVisionCfg, CLIPTextCfg) before
open_clip builds it: a misspelled field or a float where an int belongs is one line naming the field, not a
TypeError from deep inside a tower's constructor."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Mapping

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

from realsyn_pl.config import ConfigError

# Keys open_clip's create_model reads itself rather than passing to the model class.
_FACTORY_KEYS = {"custom_text": bool}
_TOWERS = {"vision_cfg": CLIPVisionCfg, "text_cfg": CLIPTextCfg}


def _model_arguments() -> dict[str, Any]:
    """The model config's top-level keys and their types: the arguments of CLIP / CustomTextCLIP."""
    fields: dict[str, Any] = dict(_FACTORY_KEYS)
    for cls in (CLIP, CustomTextCLIP):
        hints = typing.get_type_hints(cls.__init__)
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "cast_dtype", "output_dict") or param.kind is param.VAR_KEYWORD:
                continue
            fields.setdefault(name, hints.get(name, Any))
    return fields


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, typing.Tuple):
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_type_name(args[0])}s" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin in (tuple, typing.Tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_fits, value, args))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a valid float (YAML writes 4.0 as 4 often enough)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _check_fields(where: str, cfg: Mapping[str, Any], fields: dict[str, Any], schema: str) -> None:
    for key, value in cfg.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}.{key} is not a field of open_clip's {schema} config; {hint}"
                              f"its fields: {', '.join(fields)}")
        tp = fields[key]
        # open_clip's own configs set fields that do not apply to a tower to null (an RN50's patch_size)
        if value is None:
            continue
        if not _fits(value, tp):
            raise ConfigError(f"{where}.{key} must be {_type_name(tp)} (open_clip {schema}.{key}); got {value!r} "
                              f"({type(value).__name__})")


def _dataclass_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_custom_config(cfg: Mapping[str, Any]) -> None:
    """Raise a one-line ConfigError for the first key of `cfg` (an open_clip model config) that open_clip's schema
    does not have, or whose value has the wrong type."""
    # The towers are checked field by field below; CoCa's multimodal_cfg is left to open_clip's coca_model.
    top_fields = {**_model_arguments(), **{k: Any for k in _TOWERS}, "multimodal_cfg": Any}
    _check_fields("model.custom", cfg, top_fields, "CLIP")
    for key in _TOWERS:
        value = cfg.get(key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"model.custom.{key} must be a mapping of {_TOWERS[key].__name__} fields; got {value!r}")
        _check_fields(f"model.custom.{key}", value, _dataclass_fields(_TOWERS[key]), _TOWERS[key].__name__)
