"""Stage framework: records/arrays shards, manifests, resume by shard, rank sharding, the generic predict runner."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard, write_array_shard
from realsyn_pl.construct.engine.config import PredictTrainerConfig
from realsyn_pl.construct.engine.predict import BuildPredictModule, PredictTask, SkipRow, run_predict_task
from realsyn_pl.construct.engine.records import doc_id, image_id, iter_rows, sentence_id, write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, run_sharded

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


def _work(stage, log):
    def work(i):
        log.append(i)
        rows = [{"id": f"s{i}-{j}", "x": float(j)} for j in range(i + 1)]
        write_records(stage.path("rec", i), [r for r in rows if r["x"] != 0], SCHEMA)
        c = Counts()
        for r in rows:
            c.keep() if r["x"] != 0 else c.drop("zero")
        return c
    return work


def test_stage_manifest_skip_and_config_check(tmp_path):
    log = []
    st = Stage(tmp_path, "toy", {"a": 1})
    assert run_sharded(st, [0, 1, 2], _work(st, log), progress=False)
    m = st.manifest()
    assert m["done"] and m["counts"] == {"n_in": 6, "n_out": 3, "dropped": {"zero": 3}, "produced": {}}
    assert set(m["versions"]) >= {"torch", "pyarrow"} and m["num_shards"] == 3
    assert run_sharded(st, [0, 1, 2], _work(st, log), progress=False) and log == [0, 1, 2]  # skipped
    with pytest.raises(StageError, match="another config"):
        st2 = Stage(tmp_path, "toy", {"a": 2})
        run_sharded(st2, [0], _work(st2, log), progress=False)
    with pytest.raises(StageError, match="do not balance"):
        Stage(tmp_path, "bad", {}).mark_shard_done(0, Counts(n_in=2, n_out=1), 0.0)


def test_rank_sharding_and_resume(tmp_path, monkeypatch):
    log = []
    st = Stage(tmp_path, "toy", {})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not run_sharded(st, range(5), _work(st, log), progress=False)  # rank 1 alone cannot finish
    assert log == [1, 3] and st.manifest() is None
    monkeypatch.setenv("RANK", "0")
    assert run_sharded(st, range(5), _work(st, log), progress=False)
    assert log == [1, 3, 0, 2, 4] and st.manifest()["counts"]["n_in"] == 15


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
    st = Stage(tmp_path, "toy", {})
    run_sharded(st, range(5), _work(st, []), progress=False)  # shard 0 is empty, shard 4 has x = 1..4


def test_predict_runner_writes_resumes_and_skips(tmp_path):
    _toy_input(tmp_path)
    cfg = PredictTrainerConfig(accelerator="cpu", devices=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_predict_task(ToyTask(fail_on=3), tmp_path, cfg, progress=False)
    stage = Stage(tmp_path, "toy_pred", ToyTask().stage_config(), ["toy"])
    done_before = {i for i in range(5) if stage.shard_done(i)}
    assert 3 not in done_before and done_before  # some shards finished before the crash
    assert run_predict_task(ToyTask(), tmp_path, cfg, progress=False)
    m = stage.manifest()
    assert m["counts"] == {"n_in": 10, "n_out": 8, "dropped": {"three": 2}, "produced": {}}
    ids, y = ArrayReader.open(stage.dir, "emb").load()
    assert ids == ["s1-1", "s2-1", "s2-2", "s3-1", "s3-2", "s4-1", "s4-2", "s4-4"]
    np.testing.assert_array_equal(y[:, 0], [2, 2, 4, 2, 4, 2, 4, 8])
    assert run_predict_task(ToyTask(fail_on=0), tmp_path, cfg, progress=False)  # complete: skipped, no crash


def test_input_globs_and_faiss_gpu_setting_fail_with_the_config_key(tmp_path):
    from realsyn_pl.construct.engine.stage import expand_paths
    from realsyn_pl.construct.retrieve import kmeans

    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    pats = [str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]
    assert expand_paths(pats, "input.paths") == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]  # sorted, no repeats
    with pytest.raises(StageError, match=r"^input.paths: nothing matches .*typo"):
        expand_paths([str(tmp_path / "typo*.parquet")], "input.paths")
    assert kmeans.use_gpu("false", "cluster.gpu") is False
    assert kmeans.use_gpu("auto", "cluster.gpu") is False  # faiss-cpu
    with pytest.raises(StageError, match=r"^balance.gpu=true but this faiss has no GPUs"):
        kmeans.use_gpu("true", "balance.gpu")
    with pytest.raises(StageError, match=r"^cluster.gpu must be auto, true or false, got 'yes'"):
        kmeans.use_gpu("yes", "cluster.gpu")


def test_build_all_waits_for_other_ranks_between_stages_but_not_after_the_last(tmp_path, monkeypatch):
    """A rank that finished its share of a stage waits for the others before the next stage; after the last stage
    there is nothing to wait for (and `write` may keep its manifest outside work_dir, write.output_dir)."""
    from realsyn_pl.construct.engine import pipeline
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.generate.config import RewriteConfig

    template = RewriteConfig(backend="template")  # the stages are stubs: no rewriter to check

    ran, waited = [], []
    monkeypatch.setattr(pipeline, "_stages", lambda: {n: (lambda cfg, n=n: ran.append(n) or False)
                                                      for n in pipeline.STAGE_ORDER})
    monkeypatch.setattr(Stage, "wait_complete_any", lambda self, *a, **k: waited.append(self.name))
    pipeline.run_build(BuildConfig(work_dir=str(tmp_path), stage="all", rewrite=template, progress=False))
    assert ran == list(pipeline.STAGE_ORDER)
    assert waited == list(pipeline.STAGE_ORDER[:-1])
    ran.clear(), waited.clear()
    pipeline.run_build(BuildConfig(work_dir=str(tmp_path), stage="all", rewrite=template, until="cluster", progress=False))
    order = list(pipeline.STAGE_ORDER)
    assert ran == order[:order.index("cluster") + 1] and waited == order[:order.index("cluster")]


@pytest.mark.parametrize("stage", ["embed_images", "embed_sentences", "embed_syn_text"])
def test_every_embedding_stage_rejects_a_bad_dtype_before_loading_the_model(tmp_path, stage):
    from realsyn_pl.construct.balance.syn_embed import SynTextEmbedTask
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.extract.model_stages import EmbedTask

    cfg = BuildConfig(work_dir=str(tmp_path))
    cfg.embed.dtype = "int8"
    with pytest.raises(StageError, match="embed.dtype must be one of float16, float32, got 'int8'"):
        SynTextEmbedTask(cfg) if stage == "embed_syn_text" else EmbedTask(cfg, stage)
