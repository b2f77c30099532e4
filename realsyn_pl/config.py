"""Typed config schemas and the one loading path: YAML preset(s) -> dotlist overrides -> dataclass validation.

Every command takes a dataclass from here. A misspelled key or a wrong type is reported as a one-line
`ConfigError` naming the key, never a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Type, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """Enum-like string settings are checked when the config loads, before any model or data is touched."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")


PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64", "64-true", "16", "bf16")


@dataclass
class ModelConfig:
    # Any open_clip model name (ViT-B-32, ...), or a new name together with `custom` (an open_clip model config dict).
    name: str = "ViT-B-32"
    # open_clip pretrained tag (needs the hub) or a local path to a state dict / open_clip checkpoint.
    pretrained: Optional[str] = None
    # An open_clip model config ({embed_dim, vision_cfg, text_cfg}) registered under `name`; lets tests and demos
    # use tiny models without adding files to open_clip.
    custom: Optional[Any] = None
    init_temperature: float = 0.07
    grad_checkpointing: bool = False


@dataclass
class SourceConfig:
    # Brace-expanded shard list, e.g. "data/realsyn15m/{00000..00389}.tar", or a glob of local shards expanded sorted
    # at start ("data/realsyn15m/*.tar": every tar a download wrote); several lists can be joined with "::".
    urls: str = "???"
    # Upsampling factor of this source's shards (resampled=true only), open_clip's --train-data-upsampling-factors:
    # shards are drawn in proportion to weight, so a source's share is weight x its shard count.
    weight: float = 1.0
    # Samples in this source; if unset, read from sizes.json / _info.json beside the shards.
    num_samples: Optional[int] = None


@dataclass
class DataConfig:
    train: List[SourceConfig] = field(default_factory=list)
    # Texts a sample may be supervised with: "text1" is the .txt member, the rest are looked up in the .json member
    # (top level, or under "text" as some writers nest it). One is drawn per sample each time it is read (LaCLIP-style).
    text_keys: List[str] = field(default_factory=lambda: ["text1", "text2", "text3", "syn_text"])
    # Relative weights for text_keys (renormalised over the texts a sample actually has); null = uniform.
    text_weights: Optional[List[float]] = None
    image_keys: List[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    batch_size: int = 256  # per device
    workers: int = 4
    # resampled=false: every sample once per epoch, shards split by node and worker (needs shards >= ranks x workers).
    # resampled=true: shards drawn with replacement (weighted by source), epoch length = num_samples.
    resampled: bool = False
    # Samples per epoch (all ranks together). Required for resampled mode unless sizes are known.
    num_samples: Optional[int] = None
    shuffle_buffer: int = 1000
    seed: int = 0
    # Images with more pixels (width x height, read from the header) are skipped undecoded, as the build rejects them.
    max_pixels: int = 89_478_485


@dataclass
class LossConfig:
    # open_clip's defaults for large-scale runs; with both true the DDP gradient equals the single-process one.
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    # onecycle (the paper) | cosine (linear warm-up then cosine, open_clip's default) | constant
    scheduler: str = "onecycle"
    pct_start: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal_strategy: str = "cos"
    # OneCycleLR would otherwise cycle Adam's beta1 between 0.85 and 0.95; the paper fixes beta1 = 0.9.
    cycle_momentum: bool = False
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_choice("optim.scheduler", self.scheduler, ("onecycle", "cosine", "constant"))
        check_choice("optim.anneal_strategy", self.anneal_strategy, ("cos", "linear"))


@dataclass
class TrainerConfig:
    max_epochs: int = 32
    # If > 0 training stops here (the LR schedule then ends here too).
    max_steps: int = -1
    # Length of the LR schedule in optimizer steps when it should outlast this run (a run split into parts).
    schedule_steps: Optional[int] = None
    accelerator: str = "auto"
    devices: Any = "auto"
    # null = from the launcher (torchrun: WORLD_SIZE / LOCAL_WORLD_SIZE, SLURM: SLURM_NNODES), else 1.
    num_nodes: Optional[int] = None
    strategy: str = "auto"
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_choice("trainer.precision", str(self.precision), PRECISIONS)
        if self.accumulate_grad_batches < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1; got {self.accumulate_grad_batches}")


@dataclass
class InferenceTrainerConfig:
    """The Trainer of inference commands (build's predict stages, eval): where and how many processes."""
    accelerator: str = "auto"
    devices: Any = "auto"  # 'auto' = from the launcher (torchrun / SLURM), else 1
    num_nodes: Optional[int] = None
    strategy: str = "auto"
    # "32" matches clip-benchmark --no_amp; a *-mixed precision matches its default autocast.
    precision: str = "32"


@dataclass
class CheckpointConfig:
    every_n_train_steps: Optional[int] = None
    every_n_epochs: int = 1
    save_top_k: int = 1
    # Also write an open_clip-loadable state dict (open_clip.create_model_and_transforms(name, pretrained=PATH)).
    export_open_clip: bool = True


@dataclass
class LoggingConfig:
    # auto: online when W&B credentials exist, offline otherwise | online | offline | disabled
    wandb: str = "auto"
    project: str = "realsyn_pl"
    run_name: Optional[str] = None
    csv: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        check_choice("logging.wandb", self.wandb, ("auto", "online", "offline", "disabled"))


@dataclass
class FitEvalConfig:
    # An eval preset (configs/eval/*.yaml) whose zero-shot tasks run during fit and are logged; null = none.
    config: Optional[str] = None
    # key=value overrides applied to that preset (e.g. ["dataset_root=/data/eval/{dataset_cleaned}"]).
    overrides: List[str] = field(default_factory=list)
    every_n_epochs: int = 1


@dataclass
class FitConfig:
    output_dir: str = "runs/fit"
    seed: int = 0
    # null | "last" or "latest" (the newest of output_dir/checkpoints/last.ckpt and SLURM's hpc_ckpt_*.ckpt) | a path
    resume: Optional[str] = None
    # Start over in an output_dir that has checkpoints (deletes them, the CSV log, export/ and the W&B run id);
    # without it such a run is refused.
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: FitEvalConfig = field(default_factory=FitEvalConfig)


@dataclass
class ShardsConfig:
    """`shards`: your own images and captions -> webdataset shards for `fit` (realsyn_pl/data/own/)."""
    # A folder of images with a caption file of the same stem (a.jpg + a.txt; .jpeg, .png, .webp too), or a table
    # (.csv, .tsv, .parquet, .jsonl) with an image path (relative to the table's folder) or http(s) URL per row.
    input: str = "???"
    output_dir: str = "???"
    # Table columns; null = the first of url, path, image, image_path, filepath, file, file_name / of caption,
    # text, txt, title that the table has.
    url_col: Optional[str] = None
    caption_col: Optional[str] = None
    # More text columns, kept in each sample's .json (fit trains on them with data.text_keys=[text1, <column>]).
    extra_cols: List[str] = field(default_factory=list)
    # img2dataset's recipe (as the release): the shorter side scaled down to image_size, never up.
    image_size: int = 224
    samples_per_shard: int = 10_000
    # Local images are read only under this folder; null = the input folder, or the table's folder.
    image_root: Optional[str] = None
    # auto (img2dataset when installed, else builtin) | img2dataset | builtin
    fetcher: str = "auto"
    processes: int = 1  # img2dataset's processes_count
    threads: int = 16   # images read at once (per img2dataset process)
    # Replace the shards of an earlier run in output_dir (other files there are never deleted).
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("fetcher", self.fetcher, ("auto", "img2dataset", "builtin"))
        for key in ("image_size", "samples_per_shard", "processes", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1; got {getattr(self, key)}")


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).strip().splitlines()[0]
    key = getattr(err, "full_key", None)
    if key and key not in msg:
        msg = f"{msg} (key: {key})"
    from realsyn_pl.config_help import with_shape_hint

    return with_shape_hint(msg, err)  # an element of a documented list (eval's datasets): its keys and an example


def resolve_config_file(path: str) -> Path:
    """A YAML file by path, else a shipped preset by name (`fit/tiny_cpu`, `configs/fit/tiny_cpu.yaml`)."""
    from realsyn_pl.assets import find_preset, preset_names

    p = Path(path)
    if p.is_file():
        return p
    preset = find_preset(path)
    if preset is None:
        raise ConfigError(f"config file not found: {path} (nor a preset: {', '.join(preset_names())})")
    return preset


def _yaml_problem(err: Exception) -> str:
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)  # type: ignore[return-value]
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None


def _merge_override(cfg: DictConfig, override: str) -> DictConfig:
    """One `key=value` at a time, so a bad value or path is reported with its key."""
    key, _, value = override.partition("=")
    from realsyn_pl.override_hint import flow_hint

    squeezed = flow_hint(key, value)  # `{a:1}`: YAML reads `a:1` as one word; say so before any merge uses it
    if squeezed is not None:
        raise ConfigError(squeezed)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))  # type: ignore[return-value]
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse the value {value!r}: {_yaml_problem(err)}") from None
    except OmegaConfBaseException:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as err:
        hint = ""
        parts = key.split(".")
        if any(part.isdigit() for part in parts):
            list_key = ".".join(parts[: next(i for i, q in enumerate(parts) if q.isdigit())])
            from realsyn_pl.config_help import list_example

            hint = f"; a list is set whole, e.g. {list_key}=[{list_example(OmegaConf.select(cfg, list_key))}]"
        raise ConfigError(f"{key}: cannot set {override!r} ({err}){hint}") from None


def load_config(schema: Type[T], files: List[str] | None = None, overrides: List[str] | None = None,
                base: Optional[dict] = None) -> DictConfig:
    """Merge `base` (defaults set in code), YAML files and `key=value` overrides over the schema's defaults;
    validate keys and types."""
    cfg = OmegaConf.structured(schema)
    try:
        if base:
            cfg = OmegaConf.merge(cfg, base)
        for path in files or []:
            cfg = OmegaConf.merge(cfg, _load_yaml(resolve_config_file(path)))
        for override in overrides or []:
            cfg = _merge_override(cfg, override)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """The validated config as its dataclass instance."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def describe(schema: Type[Any]) -> str:
    """The schema's keys with their defaults, as YAML, for --help."""
    return OmegaConf.to_yaml(OmegaConf.structured(schema))
