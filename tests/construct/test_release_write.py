"""The writer: shards in the released layout that `realsyn_pl fit` and open_clip_train both train on, a parquet index
with the released schema (which `build release` reads back, fetching images from a local server), atomic tars
that a rerun completes after a kill, and the dataset card."""
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_CLIP, fit_overrides
from realsyn_pl.construct.engine.pipeline import run_build
from realsyn_pl.construct.release.write import RELEASED
from support import open_clip_train_log
from test_balance import cfg_for, planted_pairs

REPO = Path(__file__).resolve().parents[2]


def write_cfg(work, **over):
    cfg = cfg_for(work, **over)
    cfg.write.cap, cfg.write.samples_per_shard = 35, 40
    for key, value in over.items():
        if key.startswith("write."):
            setattr(cfg.write, key.split(".")[1], value)
    return cfg


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    work = tmp_path_factory.mktemp("write")
    planted_pairs(work)
    for stage in ("balance", "write"):
        cfg = write_cfg(work)
        cfg.stage = stage
        run_build(cfg)
    return work


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_sizes_and_selection(written):
    out = written / "write"
    sizes = json.loads((out / "sizes.json").read_text())
    bal = json.loads((written / "balance" / "manifest.json").read_text())
    assert sum(sizes.values()) == bal["caps"]["35"]
    n = len(sizes)
    assert sorted(sizes) == [f"{t:05d}.tar" for t in range(n)] and all(v == 40 for v in list(sizes.values())[:-1])
    got = members(out / "00000.tar")
    keys = sorted({k.rsplit(".", 1)[0] for k in got})
    for key in keys:
        meta = json.loads(got[f"{key}.json"])
        assert got[f"{key}.txt"].decode() == meta["caption"] == f"text one of {meta['image_id']}"
        assert meta["text2"] == f"text two of {meta['image_id']}" and "syn_text" in meta
        assert meta["cluster_rank"] < 35 and 0.4 <= meta["similarity"] <= 0.7
        with Image.open(io.BytesIO(got[f"{key}.jpg"])) as im:
            assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
    assert not list(out.glob("*.tmp"))
    card = (out / "card.md").read_text()
    assert "| balance |" in card and "cap t=35" in card and "not to syn_text" in card
    for png in ("card_image_text_similarity.png", "card_cluster_sizes_before.png", "card_cluster_sizes_after.png"):
        assert (out / png).stat().st_size > 1000


def test_parquet_index_has_the_released_schema(written, tmp_path):
    out = written / "write"
    table = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("?????.parquet"))])
    assert table.num_rows == sum(json.loads((out / "sizes.json").read_text()).values())
    released = table.select(list(RELEASED))
    assert released.schema == pa.schema([(c, pa.string()) for c in RELEASED])
    pq.write_table(released, tmp_path / "train-00000-of-00001.parquet")  # as the HF files
    back = pq.read_table(tmp_path / "train-00000-of-00001.parquet")
    assert back.equals(released) and back.column("text1").null_count == 0


def test_shards_train_in_realsyn_fit(written, tmp_path):
    from realsyn_pl.config import FitConfig, load_config, to_object
    from realsyn_pl.training.fit import run_fit

    out = written / "write"
    over = fit_overrides(out, tmp_path / "fit", **{"trainer.max_steps": 1, "data.batch_size": 4, "optim.scheduler": "constant",
                                                    "checkpoint.export_open_clip": "false"})
    over.append(f"model.custom={json.dumps(TINY_CLIP)}")
    run_fit(to_object(load_config(FitConfig, [], over)))
    metrics = (next((tmp_path / "fit" / "csv").glob("version_*/metrics.csv"))).read_text()
    assert "train/loss" in metrics


@pytest.mark.slow
def test_shards_train_in_open_clip_train(written, tmp_path):
    out = written / "write"
    n = len(json.loads((out / "sizes.json").read_text()))
    log = open_clip_train_log(f"{out}/{{00000..{n - 1:05d}}}.tar", tmp_path, 8)
    assert "Train Epoch: 0" in log and "Loss" in log


def test_killed_writer_leaves_no_corrupt_tar_and_rerun_completes(written, tmp_path):
    import shutil

    work = tmp_path / "w"
    for name in ("dedup_images", "retrieve", "balance"):
        shutil.copytree(written / name, work / name)
    shutil.copytree(written / "write", work / "write")
    out = work / "write"
    # what a kill mid-shard leaves: a done shard set with a missing tar, a half temp tar, no manifest, no sizes
    (out / "manifest.json").unlink()
    (out / "sizes.json").unlink()
    (out / "_done" / "00001.json").unlink()
    (out / "00001.tar").unlink()
    (out / "00001.tar.tmp").write_bytes(b"half a tar")
    for t in sorted(out.glob("?????.tar")):
        members(t)  # every finished tar reads whole
    run_build(write_cfg(work, stage="write"))
    for name in json.loads((out / "sizes.json").read_text()):
        assert members(out / name) == members(written / "write" / name)


def _bytes_in_download(src, work, per_group=8):
    """`src`'s planted stages with the image bytes moved to download/images-i.parquet (rows reversed, small row
    groups) and dedup_images records that point at them (src_row, bytes null): image_filter.keep_bytes=false."""
    import shutil

    from realsyn_pl.construct.engine.image_source import download_path
    from realsyn_pl.construct.engine.records import ShardWriter
    from realsyn_pl.construct.engine.schemas import IMAGES

    for name in ("dedup_images", "retrieve", "balance"):
        shutil.copytree(src / name, work / name)
    for path in sorted((work / "dedup_images").glob("images-?????.parquet")):
        t = pq.read_table(path)
        n, i = t.num_rows, int(path.name[7:12])
        with ShardWriter(download_path(work, i), IMAGES, per_group) as out:
            for r in reversed(t.select(IMAGES.names).to_pylist()):
                out.write(r)
        t = t.set_column(t.schema.get_field_index("bytes"), "bytes", pa.nulls(n, pa.binary()))
        src_row = pa.array(range(n - 1, -1, -1), pa.int64())
        t = t.drop_columns([c for c in ("src_row",) if c in t.schema.names]).append_column("src_row", src_row)
        pq.write_table(t, path)
    return work


def _outputs(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("?????.*"))}


def test_bytes_from_download_rows_write_the_same_tars_and_index(written, tmp_path, monkeypatch):
    """The old path (bytes inline in dedup_images, as image_filter.keep_bytes=true) and the new one give the same
    tar and parquet bytes, reading download's row groups at most once per tar and never a whole download shard;
    a download row that vanished is a counted no_image_data."""
    from collections import Counter

    work = _bytes_in_download(written, tmp_path / "w")
    assert pq.read_table(work / "dedup_images" / "images-00000.parquet").column("bytes").null_count > 0
    from realsyn_pl.construct.release import write as write_mod

    groups, whole, tar = Counter(), [], [None]
    init, read_group, read_table, write_tar = (pq.ParquetFile.__init__, pq.ParquetFile.read_row_group, pq.read_table,
                                               write_mod.write_tar)

    def opened(self, source, *a, **k):
        self.test_source = str(source)
        init(self, source, *a, **k)

    def counted(self, g, *a, **k):
        if "/download/" in self.test_source:
            groups[(tar[0], self.test_source, g)] += 1
        return read_group(self, g, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "__init__", opened)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    monkeypatch.setattr(pq, "read_table", lambda p, *a, **k: whole.append(str(p)) or read_table(p, *a, **k))
    monkeypatch.setattr(write_mod, "write_tar", lambda c, st, plan, t: tar.__setitem__(0, t) or write_tar(c, st, plan, t))
    cfg = write_cfg(work, stage="write")
    cfg.ray.in_process = True  # the reads are counted in this process: every unit runs here
    run_build(cfg)
    monkeypatch.undo()
    old = _outputs(written / "write")
    n = len(json.loads((work / "write" / "sizes.json").read_text()))
    assert _outputs(work / "write") == old and len(old) == 2 * n + 1 and n > 1  # tars, parquets, sizes.json
    # per tar each needed download row group is read once; no download shard is read whole
    assert groups and max(groups.values()) == 1 and {t for t, _, _ in groups} == set(range(n))
    assert not [p for p in whole if "/download/" in p]
    # shard 1's download is gone and one record of shard 0 points past its download shard's end
    import shutil

    shutil.rmtree(work / "write")
    (work / "download" / "images-00001.parquet").unlink()
    path = work / "dedup_images" / "images-00000.parquet"
    t = pq.read_table(path)
    rows = t.column("src_row").to_numpy().copy()
    index = pa.concat_tables([pq.read_table(p) for p in sorted((written / "write").glob("?????.parquet"))])
    written_ids = set(index.column("image_id").to_pylist())
    ids0 = t.column("id").to_pylist()
    k = next(j for j, i in enumerate(ids0) if i in written_ids)
    rows[k] = 10 ** 6
    pq.write_table(t.set_column(t.schema.get_field_index("src_row"), "src_row", pa.array(rows)), path)
    lost = {ids0[k]} | (set(pq.read_table(work / "dedup_images" / "images-00001.parquet").column("id").to_pylist())
                        & written_ids)
    run_build(write_cfg(work, stage="write"))
    m = json.loads((work / "write" / "manifest.json").read_text())
    assert m["counts"]["dropped"] == {"no_image_data": len(lost)} and len(lost) > 1
    got = pa.concat_tables([pq.read_table(p) for p in sorted((work / "write").glob("?????.parquet"))])
    assert set(got.column("image_id").to_pylist()) == written_ids - lost


class _Images(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.server.count += 1
        if self.path.startswith("/img/"):
            buf = io.BytesIO()
            Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, format="PNG")
            body, code = buf.getvalue(), 200
        else:
            body, code = b"gone", 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_release_recipe_fetches_like_img2dataset(written, tmp_path):
    """Without img2dataset: the released parquet (from our own index) with URLs on a local server -> shards `fit`
    reads, in img2dataset's layout (the builtin fallback)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    httpd.count = 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        table = pq.read_table(written / "write" / "00000.parquet").select(list(RELEASED)).slice(0, 12)
        urls = [f"{base}/img/{i}.png" if i % 4 else f"{base}/missing/{i}.png" for i in range(12)]
        table = table.set_column(0, "raw_image_url", pa.array(urls, pa.string()))
        pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
        cfg = write_cfg(tmp_path / "work", stage="release")
        cfg.release.paths = [str(tmp_path / "train-*.parquet")]
        cfg.release.samples_per_shard = 5
        cfg.download.retries, cfg.download.timeout_s = 0, 5.0
        cfg.download.fetcher = "builtin"  # the fallback; img2dataset's own run: test_download_img2dataset.py
        run_build(cfg)
        assert httpd.count == 12  # bounded: one request per row, no retries on 404
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = tmp_path / "work" / "release"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 3, "00001.tar": 4, "00002.tar": 2}  # rows 0, 4, 8 are 404s
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats == {"count": 5, "successes": 3, "failed_to_download": 2, "failed_to_resize": 0}
    got = members(out / "00000.tar")
    meta = json.loads(got["000000001.json"])
    assert got["000000001.txt"].decode() == table.column("text1")[1].as_py() == meta["caption"]
    assert meta["text2"] == table.column("text2")[1].as_py() and "syn_text" in meta
    with Image.open(io.BytesIO(got["000000001.jpg"])) as im:  # keep_ratio: shorter side 200 -> 224? no: only if bigger
        assert im.size == (300, 200) and im.format == "JPEG"
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["dropped"] == {"fetch_http_404": 3} and m["samples"] == 9
    idx = pq.read_table(out / "00000.parquet")
    assert idx.column("status").to_pylist() == ["failed_to_download", "success", "success", "success",
                                                "failed_to_download"]


def test_release_resize_rules():
    from realsyn_pl.construct.release.imaging import prepare_image

    def img(w, h, fmt):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format=fmt)
        return buf.getvalue()

    big = prepare_image(img(600, 400, "PNG"))
    assert (big.width, big.height, big.original_width) == (336, 224, 600)  # shorter side -> 224, ratio kept
    small_jpeg = img(200, 100, "JPEG")
    assert prepare_image(small_jpeg).jpg == small_jpeg  # no resize needed + JPEG: bytes kept (skip_reencode)
    assert prepare_image(img(200, 100, "PNG"), only_if_bigger=False).height == 224
    with pytest.raises(ValueError):
        prepare_image(b"not an image")
