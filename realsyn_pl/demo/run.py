"""`realsyn_pl demo`: the built-in default run, on CPU with no downloads.

Today: the shape world is written as RealSyn-layout shards (text1..3 + syn_text), a small CLIP is pretrained on
them with the same `fit` code path used at scale (zero-shot accuracy logged every epoch), then `eval` runs the
generated smoke suite (zero-shot classification, linear probe, retrieval) on the exported weights. The
interleaved-document build stages join this run as they land (issue 7).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from realsyn_pl.config import DataConfig, FitConfig, LoggingConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig
from realsyn_pl.demo import world

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


HEADLINE = ("acc1", "mean_per_class_recall", "lp_acc1", "lp_mean_per_class_recall")


def tiny_fit_config() -> FitConfig:
    return FitConfig(
        model=ModelConfig(name="realsyn-tiny", custom=TINY_CLIP),
        data=DataConfig(batch_size=128, workers=1, shuffle_buffer=500),
        optim=OptimConfig(lr=3e-4, weight_decay=0.1),
        trainer=TrainerConfig(max_epochs=8, accelerator="cpu", devices=1, log_every_n_steps=5),
        logging=LoggingConfig(wandb="disabled"),
    )


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    train_samples: int = 4000
    samples_per_shard: int = 500
    # Held-out evaluation sets from the same world (a different seed).
    eval_train: int = 480
    eval_test: int = 240
    fit: FitConfig = field(default_factory=tiny_fit_config)


def _eval_config(cfg: DemoConfig, eval_dir: Path, weights: str | None):
    from realsyn_pl.evaluation.config import EvalConfig, EvalDataset, EvalTrainerConfig, LinearProbeConfig

    return EvalConfig(
        output_dir=str(Path(cfg.output_dir) / "eval"),
        model=ModelConfig(name=cfg.fit.model.name, custom=cfg.fit.model.custom, pretrained=weights),
        datasets=[
            EvalDataset(key="shapes", dataset="wds/shapes", root=str(eval_dir / "shapes"),
                        tasks=["zeroshot_classification", "linear_probe"], val_split="val"),
            EvalDataset(key="shapes_captions", dataset="wds/shapes_captions", root=str(eval_dir / "shapes_captions"),
                        tasks=["zeroshot_retrieval"], metric="recall"),
        ],
        workers=0,
        reference_model=None,
        linear_probe=LinearProbeConfig(cache_dir=None),
        trainer=EvalTrainerConfig(accelerator="cpu", devices=1),
    )


def run_demo(cfg: DemoConfig) -> Path:
    from realsyn_pl.evaluation import synthetic
    from realsyn_pl.evaluation.run import run_eval
    from realsyn_pl.training.fit import run_fit

    out = Path(cfg.output_dir)
    shards, eval_dir = out / "shards", out / "eval_data"
    if not (shards / "sizes.json").is_file():
        world.write_world_shards(shards, cfg.train_samples, cfg.samples_per_shard, seed=cfg.seed)
    if not (eval_dir / "shapes_captions" / "dataset_type.txt").is_file():
        seed = cfg.seed + 10_000  # held out: images the student never trained on
        synthetic.write_classification(eval_dir / "shapes", {"train": cfg.eval_train, "val": cfg.eval_train // 4,
                                                             "test": cfg.eval_test}, seed=seed)
        synthetic.write_retrieval(eval_dir / "shapes_captions", cfg.eval_test, seed=seed + 1)
    n_shards = len(json.loads((shards / "sizes.json").read_text()))
    fit = cfg.fit
    fit.output_dir = str(out / "fit")
    fit.seed = cfg.seed
    fit.data.train = [SourceConfig(urls=str(shards / f"{{00000..{n_shards - 1:05d}}}.tar"))]
    run_fit(fit, eval_cfg=_eval_config(cfg, eval_dir, None))
    weights = str(out / "fit" / "export" / "open_clip_model.pt")
    results = run_eval(_eval_config(cfg, eval_dir, weights))
    summary = json.loads((out / "fit" / "summary.json").read_text())
    lines = [
        "# realsyn_pl demo", "",
        f"- train pairs: {cfg.train_samples} (shape world in the RealSyn layout: text1..3 + syn_text, one drawn per read)",
        f"- student: {fit.model.name}, {summary['global_step']} steps, final loss {summary['final_loss']:.3f}, "
        f"{summary['wall_time_s']} s",
        f"- evaluation on held-out images (full tables: {out / 'eval' / 'report.md'}):", "",
        "| dataset | task | metric | value |", "|---|---|---|---|",
    ]
    for r in results:
        if r.status == "ok":
            for name, value in r.metrics.items():
                if name in HEADLINE or "recall@" in name:
                    lines.append(f"| {r.key} | {r.task} | {name} | {value:.3f} |")
    zs = next(r for r in results if r.task == "zeroshot_classification" and r.status == "ok")
    lines += ["", f"Chance for the 24-class zero-shot task is {1 / 24:.3f}."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"demo done: zero-shot top-1 {zs.metrics['acc1']:.1%} (chance {1 / 24:.1%}); report: {report}")
    return report
