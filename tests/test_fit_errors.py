"""`fit` failures a user meets outside the config: a checkpoint that is not a weights-only pickle is refused (never
unpickled), and a full disk while saving is one line and a non-zero exit, not a traceback."""
import errno
import io
import os
import re

import pytest
import torch

from fit_helpers import write_fit_config
from realsyn_pl.cli import main
from realsyn_pl.config import ConfigError
from realsyn_pl.training import callbacks  # Lightning first imported here, not under a test's (later closed) capsys


class Planted:
    """What a planted pickle does when unpickled: run a command (here it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_resume_from_a_checkpoint_that_is_not_weights_only_is_refused(world_shards, tmp_path, capsys):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "planted.ckpt"
    torch.save({"global_step": 3, "epoch": 0, "callbacks": Planted(marker)}, ckpt)
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run")
    assert main(["fit", "--config", str(cfg), f"resume={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {ckpt}: not a weights-only checkpoint; refusing to unpickle it"
    assert "Traceback" not in err and not marker.exists()


def test_resume_from_a_weights_only_file_that_is_no_checkpoint_is_one_line(world_shards, tmp_path, capsys):
    ckpt = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), ckpt)
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run")
    assert main(["fit", "--config", str(cfg), f"resume={ckpt}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: resume: {ckpt} is not a Lightning checkpoint (it holds a Tensor)")


def test_a_full_disk_during_a_checkpoint_save_is_one_line(world_shards, tmp_path, capsys, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    monkeypatch.setattr(torch_io, "_atomic_save", _no_space)  # Lightning's write of the checkpoint file
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out,
                           **{"checkpoint.export_open_clip": False, "trainer.max_steps": 4})
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {re.escape(str(out / 'checkpoints'))}/[^ ]+\.ckpt: no space left on device; "
                        r"checkpoint not saved \(.*resume=last\)", err.strip().splitlines()[-1])
    assert "Traceback" not in err
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_full_disk_during_the_export_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "open_clip_model.pt"
    callbacks.atomic_torch_save({"w": torch.ones(2)}, path)

    def half_written(obj, fh):
        fh.write(b"PK partial")
        _no_space()

    monkeypatch.setattr(callbacks.torch, "save", half_written)
    with pytest.raises(ConfigError, match=f"^{path}: no space left on device; export not saved"):
        callbacks.atomic_torch_save({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert list(tmp_path.iterdir()) == [path]  # the partial temporary file is gone


class FullDisk(io.BytesIO):
    """A file on a full disk: every write fails with ENOSPC, as the OS reports it."""

    def write(self, data):
        _no_space()


def test_a_write_error_of_the_export_file_keeps_its_errno(tmp_path, monkeypatch):
    """The export is written through a Python file, so the OS's ENOSPC reaches us (torch.save to a path reports
    only its own "unexpected pos")."""
    monkeypatch.setattr(callbacks, "open", lambda path, mode: FullDisk(), raising=False)
    with pytest.raises(ConfigError, match="no space left on device; export not saved"):
        callbacks.atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "open_clip_model.pt")
