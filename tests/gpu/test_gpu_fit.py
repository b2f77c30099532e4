"""Training on a target: bf16-mixed through a 1-process DDP group (NCCL on CUDA, gloo on the dry run): a step, a
checkpoint, a resume that continues to step 2, every loss finite, an export open_clip loads; and contrastive
accumulation equal to one big batch on the target's device. CUDA: open_clip ViT-B-32 (random init); dry run: the
tiny CLIP."""
from __future__ import annotations

import json
import math

import lightning as L
import open_clip
import torch

from conftest import TINY_CLIP, TINY_NAME
from fit_helpers import metrics, write_fit_config
from realsyn_pl.cli import main
from realsyn_pl.models.clip import CLIPModule
from realsyn_pl.models.factory import load_weights


def _fit(tmp_path, shards, out, target, max_steps: int, **extra) -> None:
    model = {"name": "ViT-B-32", "custom": None} if target.cuda else {"name": TINY_NAME, "custom": TINY_CLIP}
    cfg = write_fit_config(tmp_path / f"fit{max_steps}.yaml", shards, out, model=model,
                           **{"trainer.accelerator": target.accelerator, "trainer.strategy": "ddp",
                              "trainer.precision": "bf16-mixed", "trainer.max_steps": max_steps,
                              "trainer.schedule_steps": 4, "checkpoint.every_n_train_steps": 1,
                              "data.batch_size": 16 if target.cuda else 4}, **extra)
    assert main(["fit", "--config", str(cfg)]) == 0


def test_fit_ddp_bf16_checkpoint_resume_export(target, world_shards, tmp_path):
    out = tmp_path / "run"
    _fit(tmp_path, world_shards, out, target, 1)
    assert json.loads((out / "summary.json").read_text())["global_step"] == 1
    assert (out / "checkpoints" / "last.ckpt").is_file()
    _fit(tmp_path, world_shards, out, target, 2, resume="last")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 2  # the resumed run went on from step 1, not from 0
    losses = {step: row["train/loss"] for step, row in metrics(out).items() if "train/loss" in row}
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    export = out / "export"
    name = "ViT-B-32" if target.cuda else TINY_NAME
    if (export / f"{name}.json").is_file():
        open_clip.add_model_config(export / f"{name}.json")
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(export / "open_clip_model.pt"))
    reference = open_clip.create_model(name)
    load_weights(reference, str(out / "checkpoints" / "last.ckpt"))
    px = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    image = torch.randn(2, 3, px, px)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(image), reference.eval().encode_image(image),
                                   rtol=0, atol=1e-6)


class _Grads(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.detach().float().cpu().clone() for n, p in module.named_parameters()
                      if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss = trainer.callback_metrics["train/loss"].detach().cpu()


def _step(target, accum: int) -> _Grads:
    """One fp32 step of a global batch of 8 in `accum` micro-batches (tests/scripts/ddp_step.py, in process)."""
    torch.manual_seed(0)
    module = CLIPModule(model={"name": TINY_NAME, "custom": TINY_CLIP}, optim={"scheduler": "constant"},
                        loss={"local_loss": True, "gather_with_grad": True}, schedule_steps=1, accumulate=accum)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g),
             "text": module.tokenizer([f"a {c} thing number {i}" for i, c in enumerate("rgbycmkw")]), "skipped": {}}
    grads = _Grads()
    trainer = L.Trainer(accelerator=target.accelerator, devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[grads], use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    return grads


def test_accumulation_equals_one_big_batch(target):
    # 4 micro-batches of 2: the same loss (every sample scored against all 7 others) and the same gradients
    one, many = _step(target, 1), _step(target, 4)
    torch.testing.assert_close(many.loss, one.loss, rtol=0, atol=1e-5)
    assert many.grads.keys() == one.grads.keys() and len(one.grads) > 10
    for name in one.grads:
        torch.testing.assert_close(many.grads[name], one.grads[name], rtol=0, atol=1e-5, msg=name)
