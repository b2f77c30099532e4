"""Stage framework: records/arrays shards, manifests, resume by unit on Ray, the generic predict runner, the open
files a process keeps."""

import os
import pickle
import resource
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.arrays import (
    MAX_OPEN_MAPS,
    ArrayReader,
    MappedShards,
    read_array_shard,
    write_array_shard,
)
from realsyn_pl.construct.engine.config import PredictTrainerConfig
from realsyn_pl.construct.engine.executor import run_sharded
from realsyn_pl.construct.engine.predict import BuildPredictModule, PredictJob, PredictTask, SkipRow
from realsyn_pl.construct.engine.records import doc_id, image_id, iter_rows, sentence_id, write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.float64())])


def test_ids_and_record_roundtrip(tmp_path):
    d = doc_id(3, 123)
    assert d == "doc-00003-000123" and image_id(d, 4) == d + "/img-4" and sentence_id(d, 17) == d + "/s-17"
    rows = [{"id": f"r{i}", "x": float(i)} for i in range(5)]
    write_records(tmp_path / "a.parquet", rows, SCHEMA)
    write_records(tmp_path / "empty.parquet", [], SCHEMA)
    assert list(iter_rows([tmp_path / "a.parquet", tmp_path / "empty.parquet"], batch_size=2)) == rows
    assert not list(tmp_path.glob(".*tmp"))


def test_array_shards_fp16_aligned(tmp_path):
    a = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    write_array_shard(tmp_path, "emb", 0, [f"i{j}" for j in range(7)], a)
    write_array_shard(tmp_path, "emb", 2, ["z"], a[:1])
    ids, arr = read_array_shard(tmp_path, "emb", 0)
    assert arr.dtype == np.float16 and ids[3] == "i3"
    np.testing.assert_allclose(arr, a, atol=2e-3)
    reader = ArrayReader.open(tmp_path, "emb")
    assert reader.indices == [0, 2] and len(reader) == 8
    all_ids, full = reader.load()
    assert all_ids[-1] == "z" and full.shape == (8, 4)
    with pytest.raises(ValueError):
        write_array_shard(tmp_path, "emb", 3, ["a"], a)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_mapped_shards_keep_at_most_their_limit_of_maps_open(tmp_path):
    for i in range(300):  # row j of shard i holds 10 i + j
        write_array_shard(tmp_path, "emb", i, [f"{i}-{j}" for j in range(3)],
                          np.add.outer(10 * i + np.arange(3), np.zeros(2)), "float32")
    shards = MappedShards(tmp_path, "emb", range(300), max_open=16)
    before = open_fds()
    for _ in range(2):  # the second pass maps the dropped shards again
        for s in range(300):
            np.testing.assert_array_equal(shards[s][:, 1], 10 * s + np.arange(3))
    assert open_fds() - before <= 16 and shards.open_maps() == 16
    first = shards[0]
    for s in range(285, 300):  # 15 other maps: shard 0 stays open (used more recently than the rest)
        shards[s]
    assert shards[0] is first
    for s in range(1, 17):  # 16 others: shard 0 is the least recently used and goes
        shards[s]
    del first
    assert shards[0][2, 0] == 2 and shards.open_maps() == 16
    again = pickle.loads(pickle.dumps(shards))  # travels to a task as its paths, maps nothing until used
    assert again.max_open == 16 and again.open_maps() == 0 and again[299][1, 0] == 2991
    assert MappedShards(tmp_path, "emb", [0]).max_open == MAX_OPEN_MAPS


RAISE = ("import resource, sys\nfrom realsyn_pl.construct.engine.runtime import raise_open_files_limit as r\n"
         "r(say=None) if sys.argv[1] == 'silent' else r()\nr()\nprint(*resource.getrlimit(resource.RLIMIT_NOFILE))")


@pytest.mark.parametrize("soft, say", [(256, "say"), (None, "say"), (256, "silent")])
def test_raise_open_files_limit_sets_soft_to_hard_once(soft, say):
    """A process whose soft limit is below its hard limit raises it, saying so once (twice called); one already at
    its hard limit says nothing, and a worker's call (say=None) is silent."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    limits = (soft or hard, hard)
    proc = subprocess.run([sys.executable, "-c", RAISE, say], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits))
    assert proc.returncode == 0, proc.stderr
    raised = f"[build] open files: soft limit raised from {soft} to {hard} (hard limit)\n"
    printed = raised if soft is not None and say == "say" else ""
    assert proc.stdout == f"{printed}{hard} {hard}\n"


def _ran(stage):
    """The units whose work ran (in any process), in the order they started."""
    log = stage.work_dir / f"{stage.name}.ran"
    return [int(x) for x in log.read_text().split()] if log.is_file() else []


def _work(stage):
    def work(i):
        with open(stage.work_dir / f"{stage.name}.ran", "a") as fh:
            fh.write(f"{i}\n")
        rows = [{"id": f"s{i}-{j}", "x": float(j)} for j in range(i + 1)]
        write_records(stage.path("rec", i), [r for r in rows if r["x"] != 0], SCHEMA)
        c = Counts()
        for r in rows:
            c.keep() if r["x"] != 0 else c.drop("zero")
        return c
    return work


def test_stage_manifest_skip_and_config_check(tmp_path, ex):
    st = Stage(tmp_path, "toy", {"a": 1})
    assert run_sharded(ex, st, [0, 1, 2], _work(st))
    m = st.manifest()
    assert m["done"] and m["counts"] == {"n_in": 6, "n_out": 3, "dropped": {"zero": 3}, "produced": {}}
    assert set(m["versions"]) >= {"torch", "pyarrow"} and m["num_shards"] == 3
    assert run_sharded(ex, st, [0, 1, 2], _work(st)) and sorted(_ran(st)) == [0, 1, 2]  # complete: skipped
    with pytest.raises(StageError, match="another config"):
        st2 = Stage(tmp_path, "toy", {"a": 2})
        run_sharded(ex, st2, [0], _work(st2))
    with pytest.raises(StageError, match="do not balance"):
        Stage(tmp_path, "bad", {}).mark_shard_done(0, Counts(n_in=2, n_out=1), 0.0)


def test_units_done_before_are_not_resubmitted(tmp_path, ex):
    st = Stage(tmp_path, "toy", {})
    st.begin()
    for i in (1, 3):  # an earlier run finished these two, then died
        st.mark_shard_done(i, _work(st)(i), 0.0)
    assert run_sharded(ex, st, range(5), _work(st))
    assert _ran(st)[:2] == [1, 3] and sorted(_ran(st)[2:]) == [0, 2, 4]
    assert st.manifest()["counts"]["n_in"] == 15


# ---- generic predict runner with a toy model stage


class Doubler(BuildPredictModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 3)
        torch.nn.init.constant_(self.lin.weight, 2.0)
        torch.nn.init.zeros_(self.lin.bias)

    def infer(self, inputs):
        return {"y": self.lin(inputs)}


class ToyTask(PredictTask):
    name, input_stage, input_kind, columns, batch_size = "toy_pred", "toy", "rec", ["id", "x"], 2

    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def stage_config(self):
        return {"toy": 1}

    def load(self, row):
        if row["x"] == 3.0:
            raise SkipRow("three")
        return torch.tensor([row["x"]], dtype=torch.float32)

    def collate(self, items):
        return torch.stack(items)

    def build_module(self):
        return Doubler()

    def write(self, stage, input_path, result):
        if result.index == self.fail_on:
            raise RuntimeError("simulated crash")
        y = result.outputs.get("y", np.zeros((0, 3), np.float32))
        write_array_shard(stage.dir, "emb", result.index, result.ids, y, dtype="float32")
        c = result.skip_counts()
        c.keep(len(result.ids))
        return c


def _toy_input(tmp_path):
    from support import write_stage

    st = Stage(tmp_path, "toy", {})
    write_stage(st, range(5), _work(st))  # shard 0 is empty, shard 4 has x = 1..4


def test_predict_runner_writes_resumes_and_skips(tmp_path, ex):
    _toy_input(tmp_path)
    cfg = PredictTrainerConfig(accelerator="cpu")
    # a shard that fails every time: the others finish, then one line names the stage and the shard
    with pytest.raises(StageError, match=r"^toy_pred: unit 3 failed after 3 tries: RuntimeError: simulated crash; "
                                         r"traceback in .*_errors/3\.txt"):
        run_predict_task(PredictJob.of(ToyTask(fail_on=3)), ex, tmp_path, cfg)
    stage = Stage(tmp_path, "toy_pred", ToyTask().stage_config(), ["toy"])
    assert {i for i in range(5) if stage.shard_done(i)} == {0, 1, 2, 4}
    assert "simulated crash" in (stage.dir / "_errors" / "3.txt").read_text()
    assert run_predict_task(PredictJob.of(ToyTask()), ex, tmp_path, cfg)
    assert not (stage.dir / "_errors" / "3.txt").exists()  # the traceback of a unit that now succeeded goes
    m = stage.manifest()
    assert m["counts"] == {"n_in": 10, "n_out": 8, "dropped": {"three": 2}, "produced": {}}
    ids, y = ArrayReader.open(stage.dir, "emb").load()
    assert ids == ["s1-1", "s2-1", "s2-2", "s3-1", "s3-2", "s4-1", "s4-2", "s4-4"]
    np.testing.assert_array_equal(y[:, 0], [2, 2, 4, 2, 4, 2, 4, 8])
    assert run_predict_task(PredictJob.of(ToyTask(fail_on=0)), ex, tmp_path, cfg)  # complete: skipped


def test_input_globs_and_faiss_gpu_setting_fail_with_the_config_key(tmp_path):
    from realsyn_pl.construct.clustering import kmeans
    from realsyn_pl.construct.engine.stage import expand_paths

    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    pats = [str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]
    assert expand_paths(pats, "input.paths") == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]  # sorted, no repeats
    with pytest.raises(StageError, match=r"^input.paths: nothing matches .*typo"):
        expand_paths([str(tmp_path / "typo*.parquet")], "input.paths")
    assert kmeans.use_gpu("false", "cluster.gpu", 8) is False
    assert kmeans.use_gpu("auto", "cluster.gpu", 8) is False  # faiss-cpu: no GPU support whatever the cluster has
    with pytest.raises(StageError, match=r"^balance.gpu=true but this faiss has no GPU support"):
        kmeans.use_gpu("true", "balance.gpu", 8)
    with pytest.raises(StageError, match=r"^cluster.gpu must be auto, true or false, got 'yes'"):
        kmeans.use_gpu("yes", "cluster.gpu", 0)


def test_build_all_runs_the_stages_in_order_on_one_executor(tmp_path):
    """The driver runs every stage of `all` (or up to `until`) in order, each with the same executor, and ends with
    a line saying what to run next."""
    from realsyn_pl.construct.engine import pipeline
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.engine.order import STAGE_ORDER
    from realsyn_pl.construct.generate.config import RewriteConfig

    template = RewriteConfig(backend="template")  # the stages are stubs: no rewriter to check
    ran, executors = [], set()

    def stub(name):
        return lambda cfg, ex: ran.append(name) or executors.add(id(ex)) or True

    import unittest.mock

    with unittest.mock.patch.object(pipeline, "_stages", lambda: {n: stub(n) for n in STAGE_ORDER}), \
            unittest.mock.patch.object(pipeline, "_preflight", dict):  # stub stages read no input files
        pipeline.run_build(BuildConfig(work_dir=str(tmp_path), stage="all", rewrite=template, progress=False))
        assert ran == list(STAGE_ORDER) and len(executors) == 1
        ran.clear()
        pipeline.run_build(BuildConfig(work_dir=str(tmp_path), stage="all", rewrite=template, until="cluster",
                                       progress=False))
    assert ran == list(STAGE_ORDER[:STAGE_ORDER.index("cluster") + 1])


@pytest.mark.parametrize("stage", ["embed_images", "embed_sentences", "embed_syn_text"])
def test_every_embedding_stage_rejects_a_bad_dtype_before_loading_the_model(tmp_path, stage):
    from realsyn_pl.construct.balance.syn_embed import SynTextEmbedTask
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.extract.model_stages import EmbedTask

    cfg = BuildConfig(work_dir=str(tmp_path))
    cfg.embed.dtype = "int8"
    with pytest.raises(StageError, match="embed.dtype must be one of float16, float32, got 'int8'"):
        SynTextEmbedTask(cfg) if stage == "embed_syn_text" else EmbedTask(cfg, stage)
