"""`python -m realsyn_pl fit-rewriter --config ...`: fine-tune a causal LM as the stage-3 rewriter.

Writes `output_dir/adapter/` (LoRA: peft adapter + tokenizer, what `rewrite.adapter` loads) or `output_dir/model/`
(full fine-tuning: a complete model for `rewrite.model`), and `output_dir/fit_rewriter.json` with the data counts and
the mean target loss over the training examples before and after training.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from realsyn_pl.config import ConfigError
from realsyn_pl.construct.generate.config import RewriterFitConfig

METHODS = ("lora", "full")


def run_fit_rewriter(cfg: RewriterFitConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from realsyn_pl.models.rewriter import load_tokenizer
    from realsyn_pl.models.rewriter_sft import (
        ExampleDataset,
        RewriterSFT,
        apply_lora,
        collate_examples,
        load_examples,
        mean_loss,
    )

    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if not Path(cfg.data).is_file():
        raise ConfigError(f"instruction data not found: {cfg.data}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        tok = load_tokenizer(cfg.model)
        lm = AutoModelForCausalLM.from_pretrained(cfg.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model={cfg.model!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"model={cfg.model!r}: its tokenizer has no chat_template")
    data = load_examples(cfg.data, tok, cfg.max_length, cfg.system_prompt)
    if not data.examples:
        raise ConfigError(f"no usable examples in {cfg.data} (skipped: {data.skipped})")
    if cfg.method == "lora":
        lm = apply_lora(lm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    loss_before = mean_loss(lm, data.examples, tok.pad_token_id, cfg.batch_size)

    loader = DataLoader(ExampleDataset(data.examples), batch_size=cfg.batch_size, shuffle=True,
                        collate_fn=partial(collate_examples, pad_id=tok.pad_token_id),
                        generator=torch.Generator().manual_seed(cfg.seed))
    out = Path(cfg.output_dir)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                        precision=cfg.precision, max_epochs=cfg.epochs, max_steps=cfg.max_steps,
                        accumulate_grad_batches=cfg.accumulate_grad_batches, logger=L.pytorch.loggers.CSVLogger(
                            out, name="logs"), enable_checkpointing=False, enable_progress_bar=cfg.progress,
                        enable_model_summary=False, log_every_n_steps=1)
    module = RewriterSFT(lm, cfg.lr, cfg.weight_decay, cfg.warmup_steps)
    trainer.fit(module, loader)

    report = {"examples": len(data.examples), "skipped": data.skipped, "method": cfg.method, "model": cfg.model,
              "steps": trainer.global_step}
    if trainer.is_global_zero:
        lm = module.lm
        report["loss_before"] = loss_before
        report["loss_after"] = mean_loss(lm, data.examples, tok.pad_token_id, cfg.batch_size)
        target = out / ("adapter" if cfg.method == "lora" else "model")
        lm.save_pretrained(target)
        tok.padding_side = "right"  # the saved tokenizer is for training-style use; the rewriter re-pads left
        tok.save_pretrained(target)
        report["saved"] = str(target)
        (out / "fit_rewriter.json").write_text(json.dumps(report, indent=1))
        print(f"[fit-rewriter] {len(data.examples)} examples, loss {loss_before:.4f} -> {report['loss_after']:.4f}; "
              f"saved {target}", flush=True)
    trainer.strategy.barrier()
    return report
