"""Stage reuse is never stale and killed or failing runs leave nothing behind: a model stage's fingerprint covers its
weights' content and its precision; temp files of killed writers go when the stage runs again; a full disk is one
line naming the stage, the unit and the file."""
import errno
import json
import os

import pyarrow as pa
import pytest
import torch

from conftest import TINY_CLIP, TINY_NAME
from generate_support import image_stage, stage3_overrides
from realsyn_pl.cli import main
from realsyn_pl.construct.engine.config import BuildConfig, RayConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.predict import weight_locations, weights_identity
from realsyn_pl.construct.engine.records import ShardWriter, write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.float64())])


def _clip_weights(path, seed):
    """A tiny CLIP's state dict, random with `seed`, saved at `path` (overwriting what is there)."""
    from realsyn_pl.config import ModelConfig
    from realsyn_pl.models.factory import create_clip

    torch.manual_seed(seed)
    torch.save(create_clip(ModelConfig(name=TINY_NAME, custom=TINY_CLIP)).model.state_dict(), path)


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_new_weights_at_the_same_path_or_another_precision_refuse_the_embedding_stage(tmp_path, capsys):
    work, weights = tmp_path / "w", tmp_path / "teacher.pt"
    image_stage(work, 1, 2, name="image_filter")
    _clip_weights(weights, seed=0)
    ov = stage3_overrides(work, **{"embed.model.pretrained": str(weights), "embed.workers": 0,
                                   "embed.dtype": "float32"})
    assert main(["build", "embed_images"] + ov) == 0
    emb = (work / "embed_images" / "emb-00000.npy").read_bytes()
    where = f"stage 'embed_images' in {work / 'embed_images'}"
    again = "rerun with force=embed_images to rebuild it and every stage after it"

    assert main(["build", "embed_images"] + ov + ["trainer.precision=bf16-mixed"]) == 2
    assert _error_line(capsys) == (f"error: {where}: it ran in precision '32' and would now run in 'bf16-mixed'; "
                                   f"{again}")

    _clip_weights(weights, seed=1)  # other weights, same path and size
    assert main(["build", "embed_images"] + ov) == 2
    assert _error_line(capsys) == f"error: {where}: the model weights at {weights} changed since it was built; {again}"
    assert (work / "embed_images" / "emb-00000.npy").read_bytes() == emb  # refused: nothing was touched

    assert main(["build", "embed_images"] + ov + ["force=embed_images"]) == 0  # rebuilt from the new weights
    assert (work / "embed_images" / "emb-00000.npy").read_bytes() != emb
    capsys.readouterr()
    assert main(["build", "embed_images"] + ov) == 0 and "embed_images: complete, skipped" in capsys.readouterr().out

    # weights this machine cannot read (a worker node's own copy, or deleted since): unknown is not a change
    weights.rename(tmp_path / "elsewhere.pt")
    assert main(["build", "embed_images"] + ov) == 0 and "embed_images: complete, skipped" in capsys.readouterr().out


def test_every_model_stage_names_its_weights_and_their_content_moves_its_identity(tmp_path):
    from realsyn_pl.construct.extract.model_stages import EmbedTask, PerplexityTask
    from realsyn_pl.construct.generate.caption import CaptionTask
    from realsyn_pl.construct.generate.rewrite import RewriteTask
    from realsyn_pl.construct.generate.tag import TagTask

    lm, adapter, teacher = tmp_path / "lm", tmp_path / "adapter", tmp_path / "teacher.pt"
    for folder in (lm, adapter):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(os.urandom(3 << 20))  # larger than the two MiB hashed
        (folder / ".cache").mkdir()
        (folder / ".cache" / "lock").write_text("x")
    teacher.write_bytes(b"weights")
    cfg = BuildConfig(work_dir=str(tmp_path / "w"))
    cfg.embed.model.pretrained, cfg.perplexity.model, cfg.caption.model = str(teacher), str(lm), str(lm)
    cfg.rewrite.model, cfg.rewrite.adapter = str(lm), str(adapter)
    stored = {"path": "encoded", "reason": "test"}
    configs = {"embed": EmbedTask.config_of(cfg), "perplexity": PerplexityTask.config_of(cfg),
               "caption": CaptionTask.config_of(cfg), "rewrite": RewriteTask.config_of(cfg),
               "tag": TagTask.config_of(cfg, ["dog"], stored)}
    assert {k: weight_locations(c) for k, c in configs.items()} == {
        "embed": [(str(teacher), cfg.embed.model.name)], "perplexity": [(str(lm), None)],
        "caption": [(str(lm), None)], "rewrite": [(str(lm), None), (str(adapter), None)],
        "tag": [(str(teacher), cfg.embed.model.name)]}
    before = weights_identity(configs["rewrite"])
    assert set(before) == {str(lm), str(adapter)} and None not in before.values()
    (adapter / ".cache" / "lock").write_text("changed")  # hidden files are not the model's
    assert weights_identity(configs["rewrite"]) == before
    (adapter / "config.json").write_text('{"r": 8}')  # a config file changes the output as the weights do
    after = weights_identity(configs["rewrite"])
    assert after[str(lm)] == before[str(lm)] and after[str(adapter)] != before[str(adapter)]
    assert weights_identity({"model": str(tmp_path / "gone")}) == {str(tmp_path / "gone"): None}
    assert weight_locations({"model": {"name": "hf-hub:org/clip", "pretrained": None}}) == [("hf-hub:org/clip", None)]


def test_a_hub_name_is_identified_by_its_cached_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--org--tiny"  # the hub cache's layout: snapshot files link to blobs
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "b1").write_bytes(b"weights")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to(repo / "blobs" / "b1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    first = weights_identity({"model": "org/tiny"})["org/tiny"]
    assert first is not None and weights_identity({"model": "org/other"}) == {"org/other": None}
    (repo / "blobs" / "b1").write_bytes(b"WEIGHTS")  # the same revision downloaded again, other bytes
    assert weights_identity({"model": "org/tiny"})["org/tiny"] not in (None, first)


def _work(stage):
    def work(i):
        rows = [{"id": f"s{i}-{j}", "x": float(j)} for j in range(i + 2)]
        write_records(stage.path("rec", i), rows, SCHEMA)
        c = Counts()
        c.keep(len(rows))
        return c
    return work


@pytest.fixture
def local():
    with Executor(RayConfig(in_process=True), progress=False) as ex:
        yield ex


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in ("manifest.json", "_config.json") and "_done" not in p.parts}


def test_a_resumed_stage_removes_what_killed_writers_left(tmp_path, local):
    clean = Stage(tmp_path / "clean", "toy", {})
    assert run_sharded(local, clean, range(4), _work(clean))

    st = Stage(tmp_path / "killed", "toy", {})
    st.begin()
    st.mark_shard_done(1, _work(st)(1), 0.0)  # a run that finished unit 1 and was killed in units 0 and 2
    planted = [st.dir / ".rec-00000.parquet.4242-0badcafe.tmp", st.dir / ".rec-00002.parquet.4243.tmp",
               st.dir / "_done" / ".00002.json.4243-12ab34cd.tmp", st.dir / ".manifest.json.4244-deadbeef.tmp"]
    for p in planted:
        p.write_bytes(b"half a file")
    (st.dir / "_spill").mkdir()  # a model stage's memory-mapped outputs of a shard that never finished
    (st.dir / "_spill" / "00002-embedding.npy").write_bytes(b"\x93NUMPY half")
    aside = st.dir.with_name(".toy.replaced-4245")  # a wipe killed before it removed the old directory
    (aside / "_done").mkdir(parents=True)
    (st.dir / "notes.tmp").write_text("not ours")  # not a temp name the stage makes: kept
    assert run_sharded(local, Stage(tmp_path / "killed", "toy", {}), range(4), _work(st))
    assert not [p for p in planted if p.exists()] and not aside.exists() and not (st.dir / "_spill").exists()
    assert sorted(p.name for p in st.dir.rglob("*.tmp")) == ["notes.tmp"]
    (st.dir / "notes.tmp").unlink()
    assert _files(st.dir) == _files(clean.dir)  # byte for byte what an uninterrupted run wrote


def _no_space_for(name, original):
    """A pyarrow write that fails as a full disk makes it fail (a plain OSError whose message holds the errno) for
    files named `name`, after leaving half a temp file."""
    def write(table, where, **kw):
        if os.path.basename(str(where)).startswith(f".{name}."):
            with open(where, "wb") as fh:
                fh.write(b"PAR1 half")
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
        return original(table, where, **kw)
    return write


def test_a_full_disk_in_a_unit_is_one_line_naming_the_stage_unit_and_file(tmp_path, local, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", _no_space_for("rec-00002.parquet", pq.write_table))
    st = Stage(tmp_path, "toy", {})
    with pytest.raises(StageError) as err:
        run_sharded(local, st, range(4), _work(st))
    line = str(err.value)
    assert "\n" not in line and line.startswith(
        f"toy: unit 2 failed: cannot write {st.path('rec', 2)}: no space left on device; traceback in ")  # not retried
    assert [i for i in range(4) if st.shard_done(i)] == [0, 1, 3] and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert run_sharded(local, st, range(4), _work(st)) and st.manifest()["counts"]["n_out"] == 14


def test_a_full_disk_at_a_marker_or_the_manifest_is_one_line(tmp_path, local, monkeypatch):
    from pathlib import Path

    original = Path.write_text

    def full_for(names):
        def write_text(self, data, *a, **kw):
            if any(self.name.startswith(f".{n}.") for n in names) or self.parent.name == "_errors":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(self, data, *a, **kw)
        return write_text

    st = Stage(tmp_path, "toy", {})
    monkeypatch.setattr(Path, "write_text", full_for(["00001.json"]))  # the unit's done marker; no room for errors
    with pytest.raises(StageError) as err:
        run_sharded(local, st, range(3), _work(st))
    assert str(err.value) == (f"toy: unit 1 failed: cannot write {st.marker(1)}: no space left on device; its "
                              f"traceback could not be saved (No space left on device); the units that finished are "
                              f"kept, rerun the same command to redo the rest")
    monkeypatch.setattr(Path, "write_text", full_for(["manifest.json"]))  # the driver's write once all are done
    with pytest.raises(StageError, match=f"^cannot write {st.dir / 'manifest.json'}: no space left on device$"):
        run_sharded(local, st, range(3), _work(st))
    assert not list(tmp_path.rglob("*.tmp")) and st.manifest() is None
    monkeypatch.undo()
    assert run_sharded(local, st, range(3), _work(st)) and json.loads((st.dir / "manifest.json").read_text())["done"]


def test_a_streamed_shard_that_meets_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    class Full(pq.ParquetWriter):
        def write_table(self, *a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "ParquetWriter", Full)
    with pytest.raises(StageError, match=f"^cannot write {tmp_path / 'rec-00000.parquet'}: no space left on device$"):
        with ShardWriter(tmp_path / "rec-00000.parquet", SCHEMA, rows_per_group=1) as w:
            w.write({"id": "a", "x": 1.0})
    assert os.listdir(tmp_path) == []
