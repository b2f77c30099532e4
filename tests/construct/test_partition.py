import numpy as np

from realsyn_pl.construct.engine.partition import hash64, key_range, read_range, save_sorted

REC = np.dtype([("key", np.uint64), ("shard", np.int64), ("row", np.int64)])


def test_partitions_cover_every_key_once_across_files(tmp_path):
    rng = np.random.default_rng(0)
    files, all_keys = [], []
    for s in range(3):
        r = np.zeros(500, REC)
        r["key"] = rng.integers(0, 2 ** 64 - 1, 500, dtype=np.uint64, endpoint=True)
        r["key"][:3] = [0, 2 ** 64 - 1, 2 ** 63]  # the ends of the key space and a partition border
        r["shard"], r["row"] = s, np.arange(500)
        files.append(save_sorted(tmp_path / f"k-{s}.npy", r, "key"))
        all_keys.append(r["key"])
    got = [read_range(files, "key", *key_range(p, 7), REC) for p in range(7)]
    for p, part in enumerate(got):
        lo, hi = key_range(p, 7)
        assert (part["key"] >= lo).all() and (hi is None or (part["key"] < hi).all())
    merged = np.sort(np.concatenate([g["key"] for g in got]))
    np.testing.assert_array_equal(merged, np.sort(np.concatenate(all_keys)))


def test_read_range_by_shard_returns_that_shards_rows_in_row_order(tmp_path):
    r = np.zeros(6, REC)
    r["shard"], r["row"] = [2, 0, 1, 0, 2, 1], [5, 3, 0, 1, 0, 2]
    f = save_sorted(tmp_path / "x.npy", r, ["shard", "row"])
    got = read_range([f], "shard", 1, 2, REC)
    assert got["row"].tolist() == [0, 2] and (got["shard"] == 1).all()
    assert len(read_range([f], "shard", 3, None, REC)) == 0


def test_hash64_is_stable_and_salted():
    a = hash64([b"abc", b"abd"])
    assert a.dtype == np.uint64 and a[0] != a[1]
    assert hash64([b"abc"])[0] == a[0] and hash64([b"abc"], b"1")[0] != a[0]
