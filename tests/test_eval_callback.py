"""The eval-during-fit callback logs the same zero-shot numbers `realsyn_pl eval` gives for those weights."""

import lightning as L
import open_clip
import torch

from eval_support import NAME, classification_entry, make_data, overrides, result_file, tiny_checkpoint
from realsyn_pl.cli import main
from realsyn_pl.config import load_config, to_object
from realsyn_pl.evaluation.callback import ZeroShotEval
from realsyn_pl.evaluation.config import EvalConfig


class TinyClip(L.LightningModule):
    def __init__(self, ckpt):
        super().__init__()
        self.model, _, self.preprocess_val = open_clip.create_model_and_transforms(NAME, pretrained=str(ckpt))
        self.tokenizer = open_clip.get_tokenizer(NAME)

    def training_step(self, batch, batch_idx):
        image = self.model.encode_image(batch[0], normalize=True)
        return (image @ image.T).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.5)


def test_callback_logs_eval_metrics(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path)
    args = overrides(ckpt, tmp_path / "cb", f"[{classification_entry(data['classification'])}]")
    cfg = to_object(load_config(EvalConfig, [], args))
    callback = ZeroShotEval(cfg, every_n_epochs=2)
    module = TinyClip(ckpt)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[callback])
    trainer.fit(module, loader)
    logged = float(trainer.callback_metrics["eval/colours/acc1"])
    # the weights moved during fit; `eval` on the final weights must give the logged number
    final = tmp_path / "final.pt"
    torch.save(module.model.state_dict(), final)
    assert not torch.equal(torch.load(final)["visual.conv1.weight"], torch.load(ckpt)["visual.conv1.weight"])
    out = tmp_path / "after"
    assert main(["eval"] + overrides(final, out, f"[{classification_entry(data['classification'])}]")) == 0
    ref = result_file(out, "colours", "zeroshot_classification")["metrics"]
    assert abs(logged - ref["acc1"]) < 1e-6
    assert callback.last["eval/colours/acc1"] == ref["acc1"]
