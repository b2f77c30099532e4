"""One CLIPModule training step on a fixed global batch of 8; each rank takes its slice (split into ACCUM
micro-batches). Saves rank 0's view of the (DDP-averaged) parameter gradients and the logged loss. Run directly
(1 process) or under torchrun."""
import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import TINY_CLIP, TINY_NAME  # noqa: E402
from realsyn_pl.models.clip import CLIPModule  # noqa: E402
from realsyn_pl.training.environment import close_process_group  # noqa: E402


class Capture(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            torch.save({"grads": self.grads, "loss": trainer.callback_metrics["train/loss"].detach()}, self.path)


def main(out):
    torch.manual_seed(0)
    module = CLIPModule(model={"name": TINY_NAME, "custom": TINY_CLIP}, optim={"scheduler": "constant"},
                        loss={"local_loss": os.environ.get("LOCAL_LOSS", "1") == "1", "gather_with_grad": True},
                        schedule_steps=1, accumulate=int(os.environ.get("ACCUM", "1")))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    texts = module.tokenizer([f"a {c} thing number {i}" for i, c in enumerate("rgbycmkw")])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    n = 8 // world
    batch = {"image": images[rank * n:(rank + 1) * n], "text": texts[rank * n:(rank + 1) * n], "skipped": {}}
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture(out)],
                        use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
