"""The prediction writer puts a shard back together from batches in any order, skipped rows left out, with array
outputs spilled to disk batch by batch: the sink gets the rows in order and in the stored dtype, a worker's heap
holds a batch, not a shard, and no spill file is left."""
import tracemalloc
from pathlib import Path

import numpy as np

from realsyn_pl.data.writers import ShardPredictionWriter


class _Stage:
    def __init__(self, folder: Path):
        self.dir, self.done = folder, {}

    def mark_shard_done(self, index, counts, seconds):
        self.done[index] = counts


def _batches(n_rows, batch, width, skip, rng):
    full = rng.normal(size=(n_rows, width)).astype(np.float32)
    order = rng.permutation(range(0, n_rows, batch))  # batches arrive out of order (several loader workers)
    return full, [int(lo) for lo in order], skip


def _prediction(full, lo, batch, skip):
    rows = list(range(lo, min(lo + batch, len(full))))
    kept = [r for r in rows if r not in skip]
    return {"shard": 3, "n_rows": len(full), "rows": rows, "ids": [f"id{r}" for r in rows],
            "skipped": {r: "decode_error" for r in rows if r in skip},
            "outputs": {"embedding": full[kept], "note": [f"n{r}" for r in kept]} if kept else {}}


def test_batches_in_any_order_give_the_shard_in_row_order_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    full, order, skip = _batches(1000, 64, 8, {5, 6, 640, 641, 642, 999}, rng)
    skip |= set(range(128, 192))  # a whole batch skipped
    got = {}

    def sink(result):
        got["ids"], got["emb"] = list(result.ids), np.array(result.outputs["embedding"])
        got["note"], got["skipped"] = list(result.outputs["note"]), dict(result.skipped)
        c = result.skip_counts()
        c.keep(len(result.ids))
        return c

    stage = _Stage(tmp_path)
    w = ShardPredictionWriter(stage, sink, {"embedding": np.float16})
    for lo in order:
        w.write_on_batch_end(None, None, _prediction(full, lo, 64, skip), None, None, 0)
    kept = [r for r in range(1000) if r not in skip]
    assert got["ids"] == [f"id{r}" for r in kept] and got["note"] == [f"n{r}" for r in kept]
    assert got["emb"].dtype == np.float16
    np.testing.assert_array_equal(got["emb"], full[kept].astype(np.float16))
    assert got["skipped"] == {r: "decode_error" for r in skip}
    assert stage.done[3].dropped == {"decode_error": len(skip)} and 3 in w.written
    assert not list((tmp_path / "_spill").glob("*"))  # the spill file went with the shard


def test_a_shard_is_not_held_in_memory(tmp_path):
    """20 batches of 1,000 x 256 float32 (a 20 MB shard, 10 MB in fp16): the writer's heap stays near one batch."""
    rng = np.random.default_rng(1)
    n, batch, width = 20_000, 1_000, 256
    seen = {}

    def sink(result):
        emb = result.outputs["embedding"]
        seen["sum"] = float(emb[:, 0].astype(np.float64).sum())
        seen["rows"] = len(emb)
        return result.skip_counts()

    w = ShardPredictionWriter(_Stage(tmp_path), sink, {"embedding": np.float16})
    col0 = []
    tracemalloc.start()
    try:
        for lo in range(0, n, batch):
            emb = rng.standard_normal((batch, width), dtype=np.float32)
            rows = list(range(lo, lo + batch))
            col0.append(emb[:, 0].astype(np.float16).astype(np.float64).sum())
            pred = {"shard": 0, "n_rows": n, "rows": rows, "ids": [f"id{r}" for r in rows], "skipped": {},
                    "outputs": {"embedding": emb}}
            w.write_on_batch_end(None, None, pred, None, None, 0)
            del pred, emb
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen["rows"] == n and np.isclose(seen["sum"], sum(col0))
    assert peak < 4 * batch * width * 4, peak  # a shard buffered in memory would be 20 MB, twice that concatenated
