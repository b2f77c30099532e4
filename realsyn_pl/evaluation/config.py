"""The `eval` command's config schema (loaded like every other command: YAML preset(s) -> dotlist -> validation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from realsyn_pl.config import ConfigError, InferenceTrainerConfig, ModelConfig, check_choice
from realsyn_pl.models.export_arch import resolve_auto

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
METRICS = ("acc1", "mean_per_class_recall", "roc_auc", "recall")


@dataclass
class EvalDataset:
    """One element of `datasets` (and of a suite's list): a mapping of the keys below."""
    # For --help and the one-line error about a malformed element (realsyn_pl.config_help).
    ELEMENT_OF: ClassVar[str] = "datasets"
    EXAMPLE: ClassVar[str] = ("{key: food101, dataset: wds/food101, root: data/eval/food101, "
                              "tasks: [zeroshot_classification, linear_probe]}")

    # Short name: the report column and the key in eval/reference/*.yaml (e.g. "food101").
    key: str = "???"
    # clip-benchmark dataset name: "cifar10", "fgvc_aircraft", ... or "wds/<name>" for its webdataset layout.
    # Empty = "wds/<key>".
    dataset: str = ""
    # Folder holding it; empty = the run's dataset_root template ({dataset}, {dataset_cleaned}, {key}).
    root: str = ""
    # Any of zeroshot_classification, zeroshot_retrieval, linear_probe.
    tasks: List[str] = field(default_factory=lambda: ["zeroshot_classification"])
    # The number the report shows: acc1 | mean_per_class_recall | roc_auc (classification), recall (retrieval).
    metric: str = "acc1"
    split: str = "test"
    train_split: str = "train"
    # Linear probe: the regulariser sweep (weight decay, or C for lbfgs) on this split, or on this share of the train
    # split; neither = no sweep (weight decay 0, or scikit-learn's default C = 1).
    val_split: Optional[str] = None
    val_proportion: Optional[float] = None
    # Key of this dataset in the template set (the SLIP set names some datasets differently); empty = key.
    template_key: str = ""
    # Retrieval datasets read by clip-benchmark's builders (flickr30k, mscoco_captions) may need an annotation file.
    annotation_file: Optional[str] = None
    # Class names for a wds dataset without classnames.txt: a list under eval/classnames/ (birdsnap, ucf101,
    # hateful_memes) or a file, one name per line in label order; empty = the dataset's own (which wins if present).
    classnames: str = ""


LP_PROTOCOLS = ("clip_benchmark", "lbfgs")


@dataclass
class LinearProbeConfig:
    # clip_benchmark: its AdamW-trained linear layer, weight decay swept on the validation split (lr, epochs,
    # batch_size below). lbfgs: CLIP's protocol, L2 logistic regression by L-BFGS with C swept over [1e-6, 1e6] on
    # the validation split, then refit on train + val (max_iter, tol, dtype below; realsyn_pl/evaluation/lbfgs_probe.py).
    protocol: str = "clip_benchmark"
    # clip-benchmark's defaults: AdamW on a linear layer (logistic regression), cosine LR, 10 epochs.
    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    fewshot_k: int = -1  # -1 = the whole train split
    seed: int = 0
    normalize: bool = True  # L2-normalise image features
    # Where the classifier trains: auto = the first CUDA device if any, else cpu.
    device: str = "auto"
    # Features are cached under cache_dir/<model>/<weights hash>/<dataset>/<split>.pt; {output_dir} = the run's
    # output_dir; null = no cache.
    cache_dir: Optional[str] = "{output_dir}/feature_cache"
    # lbfgs: iteration cap of each fit (CLIP's 1000) and its stopping tolerance on the largest gradient entry of
    # sum(cross-entropy) + ||W||^2 / (2 C) (scikit-learn's tol as of the versions CLIP used; >= 1.2 divides by n).
    max_iter: int = 1000
    tol: float = 1e-4
    # lbfgs: float64 (default) agrees with scikit-learn to ~1e-6; float32 halves the memory for ImageNet-size sets
    # at the cost of that agreement.
    dtype: str = "float64"

    def __post_init__(self) -> None:
        check_choice("linear_probe.protocol", self.protocol, LP_PROTOCOLS)
        check_choice("linear_probe.dtype", self.dtype, ("float64", "float32"))
        if self.max_iter < 1:
            raise ConfigError(f"linear_probe.max_iter must be >= 1; got {self.max_iter}")


EvalTrainerConfig = InferenceTrainerConfig  # one schema for every inference Trainer


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    # model.name=auto (the default): with model.pretrained=<fit run>/export/open_clip_model.pt the architecture fit
    # exported beside it (<name>.json), else ViT-B-32.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="auto"))
    # Several models in one run (clip-benchmark's --pretrained_model list), each a name + weights (+ custom);
    # non-empty replaces `model`.
    models: List[ModelConfig] = field(default_factory=list)
    # clip-benchmark's default: features and metrics under torch.autocast(<device>) (bf16 on a CPU, fp16 on CUDA);
    # false = fp32, as `clip_benchmark eval --no_amp`. Needs trainer.precision "32" (the autocast is ours).
    amp: bool = True
    # Per-(model, dataset, task) result file under <output_dir>/results (an absolute path is kept), clip-benchmark's
    # --output template: {model} {pretrained} {pretrained_full_path} {dataset} {language} {task}, plus {key}.
    output: str = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
    # Skip a (model, dataset, task) whose result file exists (read it back into the report), as clip-benchmark's
    # --skip_existing; a model whose results all exist is not even loaded.
    skip_existing: bool = False
    # A suite name under eval/suites/ (paper20, retrieval, robustness, smoke) or a path to a suite YAML; null = none.
    suite: Optional[str] = None
    # Datasets evaluated after the suite's; in a YAML preset, one `- key: ...` mapping per dataset.
    datasets: List[EvalDataset] = field(default_factory=list)
    # Keep only these dataset keys / these tasks of the suite (empty = all).
    only: List[str] = field(default_factory=list)
    only_tasks: List[str] = field(default_factory=list)
    # Folder template for datasets without a root.
    dataset_root: str = "data/eval/{dataset_cleaned}"
    # Zero-shot templates: "dataset" (the dataset's own / clip-benchmark's), "slip" (eval/templates/slip.json),
    # or a JSON file {template_key: [templates with {c}]}.
    templates: str = "dataset"
    language: str = "en"
    batch_size: int = 64
    # DataLoader workers per process; for wds data also the `clip_benchmark eval --num_workers` whose batches and
    # sample order are reproduced exactly (4 = its default), whatever the number of processes.
    workers: int = 4
    recall_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    trainer: EvalTrainerConfig = field(default_factory=EvalTrainerConfig)
    # Reference rows shown beside ours: those whose model matches (e.g. "ViT-B/32"); null = all rows.
    reference_model: Optional[str] = "ViT-B/32"
    # auto | online | offline | disabled: log the report as a W&B table (also whenever a W&B run is already active).
    wandb: str = "disabled"
    # Progress within a dataset (feature batches, zero-shot class names): a bar when stdout and stderr are terminals,
    # else a plain line every progress_s seconds (a log file never gets carriage-return bars). false = none.
    progress_bar: bool = False
    progress_s: float = 30.0  # seconds between progress lines when the output is not a terminal
    # One process on one device (fp32, or *-mixed on CUDA) runs the predict step in a plain loop instead of
    # Trainer.predict: the same features and metrics, without Lightning's start-up. false = always the Trainer.
    plain_single_process: bool = True
    # OpenMP idle-thread policy, set for this process before torch loads (only when OMP_WAIT_POLICY is unset):
    # "passive" = idle threads sleep instead of spinning, which keeps CPU inference fast when loader workers or
    # other jobs share the cores; null = the runtime's default. Changes no result.
    omp_wait_policy: Optional[str] = "passive"

    def __post_init__(self) -> None:
        # resolved here, before result file names and the report use the model's name
        self.model = resolve_auto(self.model)
        self.models = [resolve_auto(m) for m in self.models]
