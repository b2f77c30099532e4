"""Build open_clip models, transforms and tokenizers by name, custom config, open_clip tag or local checkpoint."""
from __future__ import annotations

import json
import os
import pickle
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlparse

import open_clip
import open_clip.pretrained as oc_pretrained
import torch
from omegaconf import DictConfig, OmegaConf

from realsyn_pl.config import ConfigError, ModelConfig

_REGISTERED: dict[str, str] = {}
LIGHTNING_PREFIX = "model."


class NotWeightsOnly(ConfigError):
    """A checkpoint, cache entry or weights file that holds more than tensors and plain containers."""

    @classmethod
    def at(cls, path: Any) -> "NotWeightsOnly":
        return cls(f"{path}: not a weights-only checkpoint; refusing to unpickle it")


def load_weights_only(path: Any, mmap: bool = False) -> Any:
    """torch.load of tensors and plain containers only. Anything else is refused in one line, never retried
    with weights_only=False as torch's own error suggests: that would run whatever code the file carries."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # what the weights-only unpickler raises for any object it will not build
        raise NotWeightsOnly.at(path) from None


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


def register_model_config(name: str, cfg: Mapping[str, Any]) -> None:
    """Make a custom open_clip architecture creatable by name (open_clip only reads configs from JSON files)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    text = json.dumps(cfg, sort_keys=True)
    if _REGISTERED.get(name) == text:
        return
    if name in open_clip.list_models() and name not in _REGISTERED:
        raise ConfigError(f"model.name={name!r} is a built-in open_clip model; give the custom config another name")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ConfigError(f"model.custom needs '{key}' (an open_clip model config)")
    from realsyn_pl.models.custom_config import check_custom_config

    check_custom_config(cfg)
    # open_clip reads the file once into its registry and skips vanished paths on later rescans, so the file need
    # not outlive this call (one leaked folder per process would pile up in /tmp).
    with tempfile.TemporaryDirectory(prefix="realsyn_pl_model_cfg_") as folder:
        (Path(folder) / f"{name}.json").write_text(text)
        open_clip.add_model_config(Path(folder) / f"{name}.json")
    _REGISTERED[name] = text


def lightning_to_open_clip_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The open_clip state dict inside a realsyn_pl Lightning checkpoint."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}


def load_weights(model: torch.nn.Module, path: str, name: str = "") -> None:
    """Load a local checkpoint: a realsyn_pl Lightning .ckpt or anything open_clip.load_checkpoint reads. Weights
    of another architecture than `name` are one ConfigError line."""
    if not Path(path).is_file():
        raise ConfigError(f"model.pretrained: no such file: {path}")
    if path.endswith(".ckpt"):
        ckpt = load_weights_only(path)
        state = lightning_to_open_clip_state_dict(ckpt) if isinstance(ckpt, dict) else {}
        if not state:
            raise ConfigError(f"{path} holds no realsyn_pl CLIP weights (no '{LIGHTNING_PREFIX}*' keys)")
        _load_state(model, state, path, name)
    else:
        try:
            open_clip.load_checkpoint(model, path, weights_only=True)
        except pickle.UnpicklingError:
            raise NotWeightsOnly.at(path) from None
        except RuntimeError as err:  # load_state_dict's size mismatch / missing keys: another architecture
            raise _mismatch(path, name, err) from None


def _mismatch(path: str, name: str, err: RuntimeError) -> ConfigError:
    detail = " ".join(str(err).split())[:300]
    if "loading state_dict" not in detail:  # not torch's key/shape check: a truncated or foreign file
        return ConfigError(f"model.pretrained={path}: cannot load these weights ({detail})")
    return ConfigError(f"model.pretrained={path}: these weights do not fit model {name or 'this model'} ({detail}); "
                       "set model.name (and model.custom) to the architecture they were trained with (eval: "
                       "model.name=auto reads a fit export's <name>.json beside the weights)")


def _load_state(model: torch.nn.Module, state: Mapping[str, Any], path: str, name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _mismatch(path, name, err) from None


def _hf_cached(hf_hub: str) -> bool:
    from huggingface_hub import hf_hub_download

    repo, filename = os.path.split(hf_hub)
    filename = filename or oc_pretrained.HF_WEIGHTS_NAME
    # The names open_clip's download_pretrained_from_hf tries, in its order.
    for name in [*oc_pretrained._get_safe_alternatives(filename), filename]:
        try:
            hf_hub_download(repo_id=repo, filename=name, local_files_only=True)
            return True
        except Exception:  # huggingface_hub raises several types for "not in the cache"
            continue
    return False


def _reachable(url: str) -> bool:
    try:
        socket.create_connection((urlparse(url).hostname or "", 443), timeout=3).close()
        return True
    except OSError:
        return False


def check_pretrained_tag(name: str, tag: str) -> None:
    """Refuse a tag open_clip does not know for `name`, or one whose weights are neither cached nor downloadable,
    before the model is built: open_clip builds it first and then retries the hub for ~50 s when offline."""
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigError(f"model.pretrained={tag!r} is not an open_clip tag for {name} (its tags: {tags}); "
                          "or give a local file path")
    if "file" in pcfg:
        return
    # open_clip prefers the hub when huggingface_hub is installed, else the plain URL (pretrained.download_pretrained).
    if pcfg.get("hf_hub") and oc_pretrained.has_hf_hub():
        from huggingface_hub import constants

        if _hf_cached(pcfg["hf_hub"]) or (not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)):
            return
        where = f"hf-hub {pcfg['hf_hub']}"
    else:
        url = pcfg.get("url", "")
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if cached.is_file() or _reachable(url):
            return
        where = url
    raise ConfigError(f"model.pretrained={tag!r}: the {name} weights ({where}) are not in the local cache and the "
                      "network is offline; download them elsewhere and give a local file path")


def create_clip(cfg: ModelConfig, context_length: Optional[int] = None) -> ClipBundle:
    if cfg.custom is not None:
        register_model_config(cfg.name, cfg.custom)
    elif cfg.name not in open_clip.list_models() and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"unknown open_clip model {cfg.name!r} (see open_clip.list_models(), or set model.custom)")
    local = cfg.pretrained is not None and (Path(cfg.pretrained).exists() or "/" in cfg.pretrained)
    if cfg.pretrained is not None and not local and not cfg.name.startswith(("hf-hub:", "local-dir:")):
        check_pretrained_tag(cfg.name, cfg.pretrained)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.name,
            pretrained=None if local else cfg.pretrained,
            force_context_length=context_length,
        )
    except (RuntimeError, OSError) as err:
        if local or cfg.pretrained is None:
            raise
        # open_clip downloads tagged weights from the hub: offline, or with a wrong tag, say so in one line.
        reason = str(err).splitlines()[0][:300]
        raise ConfigError(f"model.pretrained={cfg.pretrained!r}: open_clip could not load these weights ({reason}); "
                          "offline, download them elsewhere and give a local file path") from None
    if local:
        load_weights(model, cfg.pretrained, cfg.name)
    elif cfg.pretrained is None and hasattr(model, "logit_scale"):
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.log(torch.tensor(1.0 / cfg.init_temperature))))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(cfg.name, context_length=context_length)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer)
