"""One copy of the image bytes: image_filter/dedup_images records point at download's rows (src_row) and every reader
gets the bytes through engine/image_source.py, reading only the row groups it needs; the model stages give the same
outputs as with image_filter.keep_bytes=true; a vanished download row is a counted no_image_data."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from generate_support import image_id, png_bytes, stage3_overrides, stage_rows, tiny_captioner
from realsyn_pl.cli import main
from realsyn_pl.construct.engine import image_source
from realsyn_pl.construct.engine.image_source import ImageSource, iter_take, record_bytes, take_rows
from realsyn_pl.construct.engine.records import ShardWriter, write_records
from realsyn_pl.construct.engine.schemas import IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage
from support import write_stage

REC = pa.schema([("id", pa.string()), ("bytes", pa.binary()), ("path", pa.string()), ("src_row", pa.int64())])


def _download(work, shard, n, per_group=4):
    """download/images-{shard}.parquet with n rows, ids d-k, bytes b"img-k", `per_group` rows per row group."""
    with ShardWriter(image_source.download_path(work, shard), IMAGES, per_group) as out:
        for k in range(n):
            out.write({"id": f"d-{k}", "bytes": f"img-{k}".encode()})


def test_bytes_inline_then_download_row_then_path_and_vanished_rows_are_none(tmp_path, monkeypatch):
    _download(tmp_path, 0, 20)
    local = tmp_path / "local.jpg"
    local.write_bytes(b"from-path")
    recs = pa.Table.from_pylist([
        {"id": "d-17", "bytes": None, "path": None, "src_row": 17},
        {"id": "x", "bytes": b"inline", "path": None, "src_row": None},
        {"id": "d-2", "bytes": None, "path": None, "src_row": 2},
        {"id": "d-3", "bytes": None, "path": None, "src_row": 99},          # out of range: vanished
        {"id": "d-5", "bytes": None, "path": None, "src_row": 6},           # row 6 is another image now
        {"id": "p", "bytes": None, "path": str(local), "src_row": None},
        {"id": "d-18", "bytes": None, "path": str(local), "src_row": 18},   # the download row wins over the path
        {"id": "gone", "bytes": None, "path": str(tmp_path / "no.jpg"), "src_row": None},
        {"id": "d-16", "bytes": b"", "path": None, "src_row": 16},          # empty inline bytes are no bytes
    ], schema=REC)
    want = [b"img-17", b"inline", b"img-2", None, None, b"from-path", b"img-18", None, b"img-16"]
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, *a, **k: reads.append(g) or real(self, g, *a, **k))
    src = ImageSource(tmp_path, 0)
    assert src.bytes_of(recs) == want
    assert sorted(reads) == [0, 1, 4]  # rows 2 | 6 | 16, 17, 18: each needed group once, no other
    reads.clear()
    assert [ImageSource(tmp_path, 0).row(r) for r in recs.to_pylist()] == want
    assert sorted(set(reads)) == [0, 1, 4]  # per row, through the row-group cache
    # a download shard that is missing: only inline bytes and the paths of records without a src_row remain; d-18's
    # bytes were in its download row, and its path (never vetted by download) is not read in their place
    assert ImageSource(tmp_path, 1).bytes_of(recs) == [None, b"inline", None, None, None, b"from-path",
                                                       None, None, None]
    assert [ImageSource(tmp_path, 1).row(r) for r in recs.to_pylist()] == [None, b"inline", None, None, None,
                                                                            b"from-path", None, None, None]


def test_take_rows_reads_only_the_needed_row_groups_in_the_given_order(tmp_path, monkeypatch):
    _download(tmp_path, 0, 30, per_group=5)
    path = image_source.download_path(tmp_path, 0)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, *a, **k: reads.append(g) or real(self, g, *a, **k))
    got = take_rows(path, np.array([27, 3, 26, 3]), ["id"])
    assert got.column("id").to_pylist() == ["d-27", "d-3", "d-26", "d-3"] and sorted(reads) == [0, 5]
    assert [k.tolist() for k, _ in iter_take(path, np.array([29, 30, -1, 0]), ["id"])] == [[3], [0]]
    with pytest.raises(IndexError):
        take_rows(path, np.array([30]), ["id"])
    # record_bytes: inline bytes of the record shard, the rest through the download rows
    rec = tmp_path / "images-00000.parquet"
    write_records(rec, [{"id": "d-4", "bytes": None, "src_row": 4}, {"id": "q", "bytes": b"inline"},
                        {"id": "d-9", "src_row": 9}], REC)
    assert sorted(record_bytes(rec, np.array([2, 1, 0, 2]), tmp_path, 0)) == [
        (0, b"img-9"), (1, b"inline"), (2, b"img-4"), (3, b"img-9")]


def _extract_stage(work, shards=2, per=6):
    """A completed `extract` stage whose image records arrive with their bytes (as from local/parquet inputs)."""
    stage = Stage(work, "extract", {"test": "images"})

    def shard(i):
        rows = [{"id": image_id(i, j), "doc_id": image_id(i, j).split("/")[0], "url": None, "path": None,
                 "bytes": png_bytes(i * 100 + j, size=40 + 4 * j)} for j in range(per)]
        rows[1]["bytes"] = b"not an image" if i == 0 else rows[1]["bytes"]
        write_records(stage.path("images", i), rows, IMAGES)
        c = Counts()
        c.keep(len(rows))
        return c

    write_stage(stage, range(shards), shard)


STAGES = ["download", "image_filter", "embed_images", "dedup_images", "caption", "tag"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same small build with image_filter.keep_bytes=false (the default) and =true."""
    root = tmp_path_factory.mktemp("src")
    cap = tiny_captioner(root / "cap")
    _extract_stage(root / "base")
    works = {}
    for keep in ("false", "true"):
        work = root / f"keep_{keep}"
        shutil.copytree(root / "base", work)
        ov = stage3_overrides(work, cap, **{"image_filter.min_side": 10, "image_filter.keep_bytes": keep,
                                            "embed.dtype": "float32", "embed.batch_size": 4, "embed.workers": 0,
                                            "dedup.semantic": "false", "tag.reuse_embeddings": "false",
                                            "download.fetcher": "builtin"})
        for st in STAGES:
            assert main(["build" if st not in ("caption", "tag") else "predict", st] + ov) == 0, st
        works[keep] = work
    return works


def test_only_download_holds_the_bytes_by_default(both):
    work = both["false"]
    for i in range(2):
        dl = pq.ParquetFile(work / "download" / f"images-{i:05d}.parquet")
        assert dl.metadata.num_row_groups == 1 and dl.read().column("bytes").null_count == 0  # 6 rows < 64
        ids = dl.read(columns=["id"]).column("id").to_pylist()
        for st in ("image_filter", "dedup_images"):
            t = pq.read_table(work / st / f"images-{i:05d}.parquet")
            assert t.num_rows > 0 and t.column("bytes").null_count == t.num_rows, st
            assert [ids[r] for r in t.column("src_row").to_pylist()] == t.column("id").to_pylist(), st
    kept = pq.read_table(both["true"] / "image_filter" / "images-00000.parquet")
    assert kept.column("bytes").null_count == 0 and kept.column("src_row").null_count == 0


def test_model_stages_give_the_same_outputs_as_with_keep_bytes(both):
    a, b = both["false"], both["true"]
    for st, kind in (("image_filter", "images"), ("dedup_images", "images")):
        ta, tb = (pq.read_table(w / st / f"{kind}-00000.parquet").drop_columns(["bytes"]) for w in (a, b))
        assert ta.equals(tb), st
    for i in range(2):
        ea, eb = (np.load(w / "embed_images" / f"emb-{i:05d}.npy") for w in (a, b))
        assert ea.shape[0] > 0 and np.array_equal(ea, eb)
    for st, kind in (("caption", "captions"), ("tag", "tags")):
        assert stage_rows(a, st, kind) == stage_rows(b, st, kind) and stage_rows(a, st, kind), st
    for st in STAGES[1:]:
        ca, cb = (json.loads((w / st / "manifest.json").read_text())["counts"] for w in (a, b))
        assert ca == cb, st
    assert json.loads((a / "image_filter" / "manifest.json").read_text())["counts"]["dropped"] == {
        "decode_error": 1}


def test_a_vanished_download_row_is_a_counted_no_image_data(both, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(both["false"], work)
    path = work / "dedup_images" / "images-00000.parquet"
    t = pq.read_table(path)
    rows = t.column("src_row").to_numpy().copy()
    rows[0] = 10 ** 6  # out of range
    pq.write_table(t.set_column(t.schema.get_field_index("src_row"), "src_row", pa.array(rows)), path)
    (work / "download" / "images-00001.parquet").unlink()  # a download shard that is gone
    n1 = pq.read_metadata(work / "dedup_images" / "images-00001.parquet").num_rows
    shutil.rmtree(work / "tag")
    ov = stage3_overrides(work, None, **{"tag.reuse_embeddings": "false"})
    assert main(["predict", "tag"] + ov) == 0
    c = json.loads((work / "tag" / "manifest.json").read_text())["counts"]
    assert c["n_in"] == t.num_rows + n1 and c["dropped"] == {"no_image_data": 1 + n1} and c["n_out"] == t.num_rows - 1
