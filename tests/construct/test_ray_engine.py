"""The build's Ray engine: loopback only, retries, a unit that fails for good (one line, exit 2, nothing half-written
marked done), model actors that ignore a launcher's environment, and batches that do not depend on loader workers."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import assert_loopback
from realsyn_pl.cli import main
from realsyn_pl.construct.engine.actors import PredictActor, plain_environment, run_predict_task
from realsyn_pl.construct.engine.arrays import ArrayReader
from realsyn_pl.construct.engine.config import PredictTrainerConfig
from realsyn_pl.construct.engine.executor import run_sharded
from realsyn_pl.construct.engine.predict import PredictJob
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError
from support import build_overrides, local_corpus
from test_engine import ToyTask, _toy_input


def test_every_node_of_the_test_instance_is_on_loopback(ray_local, ex):
    assert_loopback()
    assert ex.session.address.startswith("127.0.0.1:") and not ex.session.embedded and ex.session.cpus == 2


def _flaky(stage, fails):
    """Work that raises the first `fails` times each unit runs (counted in files: the tries run in other processes)."""
    def work(i):
        tries = stage.work_dir / f"tries-{i}"
        n = int(tries.read_text()) if tries.is_file() else 0
        tries.write_text(str(n + 1))
        if n < fails:
            raise OSError(f"transient failure {n + 1} of unit {i}")
        c = Counts()
        c.keep(i)
        return c
    return work


def test_a_unit_that_fails_is_retried_and_the_retries_are_printed(tmp_path, ex, capsys):
    st = Stage(tmp_path, "flaky", {})
    assert run_sharded(ex, st, range(4), _flaky(st, 2))
    assert st.manifest()["counts"]["n_in"] == 0 + 1 + 2 + 3
    assert [int((tmp_path / f"tries-{i}").read_text()) for i in range(4)] == [3, 3, 3, 3]
    out = capsys.readouterr().out
    for i in range(4):
        assert f"[build] flaky: unit {i} failed (try 1 of 3), retrying: OSError: transient failure 1 of unit {i}" in out
        assert f"unit {i} failed (try 2 of 3)" in out and f"unit {i} failed (try 3" not in out
    assert not (st.dir / "_errors").exists()


def test_ray_max_retries_bounds_the_tries(tmp_path, ex):
    from realsyn_pl.construct.engine.config import RayConfig
    from realsyn_pl.construct.engine.executor import Executor

    st = Stage(tmp_path, "flaky", {})
    with pytest.raises(StageError, match=r"^flaky: unit 0 failed after 2 tries: OSError: transient failure 2 of unit 0; "
                                         r"3 more failed too \(1, 2, 3\); traceback in .*_errors/0\.txt"):
        run_sharded(Executor(RayConfig(max_retries=1), progress=False), st, range(4), _flaky(st, 2))
    assert st.pending(range(4)) == [0, 1, 2, 3] and st.manifest() is None
    assert run_sharded(ex, st, range(4), _flaky(st, 2))  # the third try of each unit succeeds


def _refusing(stage):
    def work(i):
        tries = stage.work_dir / f"tries-{i}"
        tries.write_text(str(int(tries.read_text()) + 1 if tries.is_file() else 1))
        if i == 2:
            raise StageError(f"shard {i} was written by another version; rerun with force=refusing")
        c = Counts()
        c.keep(1)
        return c
    return work


def test_a_stage_error_in_a_unit_is_not_retried(tmp_path, ex):
    st = Stage(tmp_path, "refusing", {})
    with pytest.raises(StageError, match=r"^refusing: unit 2 failed: shard 2 was written by another version; rerun "
                                         r"with force=refusing; traceback in "):
        run_sharded(ex, st, range(4), _refusing(st))
    assert [(tmp_path / f"tries-{i}").read_text() for i in range(4)] == ["1", "1", "1", "1"]
    assert st.pending(range(4)) == [2]


def test_bad_input_that_fails_every_time_stops_the_build_in_one_line_with_exit_2(tmp_path, capsys):
    """A download unit whose input shard is corrupt fails every try; the other unit finishes, the build stops with
    one line naming the stage and the unit, exit code 2, and nothing of the failed unit is marked done. Once the
    input is repaired, a rerun does only that unit."""
    corpus, img_dir = local_corpus(tmp_path / "corpus")
    ov = build_overrides(tmp_path / "w", corpus, **{"input.image_root": img_dir, "download.fetcher": "builtin"})
    assert main(["build", "extract"] + ov) == 0
    bad = tmp_path / "w" / "extract" / "images-00001.parquet"
    good = bad.read_bytes()
    bad.write_bytes(b"PAR1 this is not a parquet file PAR1")
    capsys.readouterr()
    assert main(["build", "download"] + ov) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: download: unit 1 failed after 3 tries: ArrowInvalid: ") and "_errors/1.txt" in err[0]
    out = tmp_path / "w" / "download"
    assert (out / "_done" / "00000.json").is_file() and not (out / "_done" / "00001.json").exists()
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(("images-00001", ".images-00001"))]
    assert "ArrowInvalid" in (out / "_errors" / "1.txt").read_text()
    done_before = (out / "_done" / "00000.json").stat().st_mtime_ns
    bad.write_bytes(good)
    assert main(["build", "download"] + ov) == 0
    assert (out / "_done" / "00000.json").stat().st_mtime_ns == done_before  # not redone
    assert json.loads((out / "manifest.json").read_text())["done"] and not (out / "_errors").exists()


def test_build_started_as_several_ranks_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    corpus, img_dir = local_corpus(tmp_path / "corpus")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["build", "extract"] + build_overrides(tmp_path / "w", corpus)) == 2
    err = capsys.readouterr().err
    assert "run as one driver on Ray, but this process is rank 1 of WORLD_SIZE=2 (torchrun)" in err
    assert "ray_slurm.sbatch" in err and not (tmp_path / "w").exists()


def test_plain_environment_drops_the_launcher_variables(monkeypatch):
    for k, v in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1", "SLURM_PROCID": "3",
                 "SLURM_NTASKS": "8", "TORCHELASTIC_RUN_ID": "x", "KEEP_ME": "1"}.items():
        monkeypatch.setenv(k, v)
    gone = plain_environment()
    assert sorted(gone) == ["LOCAL_RANK", "MASTER_ADDR", "RANK", "SLURM_NTASKS", "SLURM_PROCID",
                            "TORCHELASTIC_RUN_ID", "WORLD_SIZE"]
    assert os.environ["KEEP_ME"] == "1" and "RANK" not in os.environ


def test_an_actor_started_under_a_launchers_environment_predicts_on_its_own_device(tmp_path, ray_local):
    """A worker that inherited RANK/WORLD_SIZE/SLURM_* (Ray started under torchrun or srun) would make Lightning
    build a 4-rank job and wait for the other ranks; the actor drops them and predicts alone."""
    ray = ray_local
    _toy_input(tmp_path)
    job = PredictJob.of(ToyTask())
    stage = Stage(tmp_path, job.name, job.config, job.inputs)
    stage.begin()
    launcher = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29591", "SLURM_NTASKS": "4", "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "build", "SLURM_NNODES": "1"}
    actor = ray.remote(PredictActor).options(num_cpus=1, runtime_env={"env_vars": launcher}).remote()
    try:
        assert ray.get(actor.load.remote(job, stage, PredictTrainerConfig(accelerator="cpu"), 1), timeout=120) is None
        assert ray.get([actor.run.remote(i) for i in range(5)], timeout=120) == [0, 1, 2, 3, 4]
    finally:
        ray.kill(actor)
    ids, y = ArrayReader.open(stage.dir, "emb").load()
    assert ids == ["s1-1", "s2-1", "s2-2", "s3-1", "s3-2", "s4-1", "s4-2", "s4-4"]
    np.testing.assert_array_equal(y[:, 0], [2, 2, 4, 2, 4, 2, 4, 8])


class TwoWorkerToy(ToyTask):
    workers = 2


def test_loader_workers_do_not_change_what_a_row_is_batched_with(tmp_path, ex):
    """Batch c of a shard is rows c*B..(c+1)*B-1 whatever the DataLoader workers: 0 and 2 workers write the same
    bytes (a skipped row leaves its batch smaller instead of pulling the next row in)."""
    _toy_input(tmp_path)
    cfg = PredictTrainerConfig(accelerator="cpu")
    assert run_predict_task(PredictJob.of(ToyTask()), ex, tmp_path, cfg)
    first = tmp_path / "first"
    shutil.copytree(tmp_path / "toy_pred", first)
    shutil.rmtree(tmp_path / "toy_pred")
    assert run_predict_task(PredictJob.of(TwoWorkerToy()), ex, tmp_path, cfg)
    files = sorted(p.name for p in first.glob("emb-*"))
    assert len(files) == 10 and files == sorted(p.name for p in (tmp_path / "toy_pred").glob("emb-*"))
    assert all((first / f).read_bytes() == (tmp_path / "toy_pred" / f).read_bytes() for f in files)
