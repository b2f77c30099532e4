import numpy as np
import pytest

from realsyn_pl.construct.engine.partition import hash64, key_range, lower_bound, read_range, save_sorted

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


# few distinct keys (every bound repeated many times), the ends of the uint64 space among them
KEYS = np.array([0, 1, 2, 3, 5, 8, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1], np.uint64)
BOUNDS = [0, 1, 2, 4, 5, 8, 9, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1]


# 20-byte records, as exact dedup's keys: the key field's view is unaligned
PACKED = np.dtype([("key", np.uint64), ("shard", np.int32), ("row", np.int64)])


@pytest.mark.parametrize("rec", [REC, PACKED])
def test_read_range_equals_a_plain_filter_over_random_files_and_ranges(tmp_path, rec):
    rng = np.random.default_rng(1)
    files, plain = [], []
    for f in range(30):
        n = int(rng.choice([0, 0, 1, 2, 7, 60, 500]))  # empty files too
        r = np.zeros(n, rec)
        r["key"], r["shard"], r["row"] = rng.choice(KEYS, n), f, np.arange(n)
        files.append(save_sorted(tmp_path / f"r-{f}.npy", r, "key"))
        plain.append(np.load(files[-1]))
    for lo in BOUNDS:
        for hi in [*BOUNDS, None]:  # hi <= lo and lo above every key of a file included
            got = read_range(files, "key", lo, hi, rec)
            want = np.concatenate([r[(r["key"] >= lo) & ((r["key"] < hi) if hi is not None else True)]
                                   for r in plain])
            assert got.dtype == rec and got.tolist() == want.tolist(), (lo, hi)


class CountingColumn:
    """A column that counts the elements read from it."""

    def __init__(self, values: np.ndarray):
        self.values, self.reads = values, 0

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.values[i]


def test_lower_bound_reads_log_n_elements_and_matches_searchsorted():
    values = np.repeat(np.arange(0, 2_000_000, 2, dtype=np.uint64), 2)  # every value twice
    for v in (0, 1, 2, 777_777, 1_999_998, 1_999_999, 2 ** 64 - 1):
        col = CountingColumn(values)
        assert lower_bound(col, v) == int(np.searchsorted(values, np.uint64(v), "left"))
        assert col.reads <= 22  # ceil(log2(2M)) + 1: the column is never copied or scanned


def test_hash64_is_stable_and_salted():
    a = hash64([b"abc", b"abd"])
    assert a.dtype == np.uint64 and a[0] != a[1]
    assert hash64([b"abc"])[0] == a[0] and hash64([b"abc"], b"1")[0] != a[0]
