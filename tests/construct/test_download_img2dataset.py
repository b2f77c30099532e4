"""img2dataset as the fetcher of `build release` and of the `download` stage, against images served on 127.0.0.1:
good, big (resized), 404, corrupt, slow (timeout) and opted out (`X-Robots-Tag: noai`). Every URL is accounted
for by reason, opted-out images are dropped, the release output is img2dataset's own layout and trains in `fit`."""
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_CLIP, TINY_NAME
from realsyn_pl.cli import main
from realsyn_pl.construct.engine.records import iter_rows
from support import ImageServer, build_overrides, open_clip_train_log

pytest.importorskip("img2dataset")

# per 10 URLs: 4 good, 1 big, 2 missing, 1 corrupt, 1 opted out, 1 slow (answers after 6 s: a timeout)
KINDS = ["good", "big", "404", "good", "corrupt", "good", "optout", "404", "good", "stall"]
FAST = {"download.timeout_s": 3, "download.retries": 0, "download.processes": 2, "download.threads": 8}


def urls(srv, n):
    return [srv.urls[KINDS[i % len(KINDS)]] + f"?i={i}" for i in range(n)]


def kind(url):
    return url.rsplit("/", 1)[1].split(".")[0]


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    with ImageServer() as srv:
        u = urls(srv, 60)
        for f, part in (("train-00000-of-00002.parquet", slice(0, 30)), ("train-00001-of-00002.parquet",
                                                                           slice(30, 60))):
            rows = range(60)[part]
            pq.write_table(pa.table({"raw_image_url": u[part], "text1": [f"text one {i}" for i in rows],
                                     "text2": [f"text two {i}" for i in rows],
                                     "text3": [f"text three {i}" for i in rows],
                                     "syn_text": [f"syn text {i}" for i in rows]}), tmp / f)
        work = tmp / "work"
        ov = [f"work_dir={work}", "progress=false", f"release.paths=[{tmp}/train-*.parquet]",
              "release.samples_per_shard=20"] + [f"{k}={v}" for k, v in FAST.items()]
        assert main(["build", "release"] + ov) == 0
        agents = set(srv.httpd.agents)
        assert main(["build", "release"] + ov) == 0  # complete: skipped, nothing fetched again
    return work, u, agents


def test_release_accounts_for_every_url_and_drops_opt_outs(released):
    work, u, agents = released
    m = json.loads((work / "release" / "manifest.json").read_text())
    c = m["counts"]
    n = {k: sum(kind(x) == k for x in u) for k in set(KINDS)}
    assert c["n_in"] == 60 == c["n_out"] + sum(c["dropped"].values())
    assert c["dropped"] == {"fetch_http_404": n["404"], "decode_error": n["corrupt"], "fetch_opted_out": n["optout"],
                            "fetch_timeout": n["stall"]}
    assert c["n_out"] == n["good"] + n["big"] == m["samples"]
    assert m["config"]["fetcher"] == "img2dataset"
    assert agents == {"Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
                      "(compatible; img2dataset; +https://github.com/rom1504/img2dataset)"}


def test_release_has_img2dataset_layout(released):
    work, u, _ = released
    out = work / "release" / "shards"
    # 2 files of 30 rows at 20 per shard: img2dataset shards each file on its own -> 4 shards
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{t:05d}{ext}" for t in range(4) for ext in (".tar", ".parquet", "_stats.json")])
    sizes = json.loads((work / "release" / "sizes.json").read_text())
    for t, (lo, hi) in enumerate([(0, 20), (20, 30), (30, 50), (50, 60)]):
        stats = json.loads((out / f"{t:05d}_stats.json").read_text())
        good = [i for i in range(lo, hi) if kind(u[i]) in ("good", "big")]
        assert stats["count"] == hi - lo and stats["successes"] == len(good) == sizes[f"{t:05d}.tar"]
        assert stats["failed_to_resize"] == sum(kind(u[i]) == "corrupt" for i in range(lo, hi))
        idx = pq.read_table(out / f"{t:05d}.parquet").to_pylist()
        # img2dataset's keys: shard id (5 digits) then row, in ceil(log10(20)) = 2 digits
        assert sorted(r["key"] for r in idx) == [f"{t:05d}{i:02d}" for i in range(hi - lo)]
        assert {"url", "caption", "text2", "text3", "syn_text", "status", "error_message", "width", "height",
                "original_width", "original_height", "sha256"} <= set(idx[0])
        got = members(out / f"{t:05d}.tar")
        keys = sorted({k.rsplit(".", 1)[0] for k in got})
        assert keys == sorted(r["key"] for r in idx if r["status"] == "success") and len(keys) == len(good)
        for key in keys:
            i = lo + int(key[5:])
            meta = json.loads(got[f"{key}.json"])
            assert got[f"{key}.txt"].decode() == f"text one {i}" == meta["caption"]
            assert (meta["text2"], meta["text3"], meta["syn_text"]) == (f"text two {i}", f"text three {i}",
                                                                        f"syn text {i}")
            assert meta["url"] == u[i] and meta["key"] == key and meta["status"] == "success"
            with Image.open(io.BytesIO(got[f"{key}.jpg"])) as im:
                # keep_ratio, shorter side 224 only if bigger: 600x400 -> 336x224, 150x120 kept
                assert im.format == "JPEG" and im.size == ((336, 224) if kind(u[i]) == "big" else (150, 120))
                assert im.size == (meta["width"], meta["height"])


def test_release_shards_train_one_step_in_fit(released, tmp_path):
    from realsyn_pl.config import FitConfig, load_config, to_object
    from realsyn_pl.training.fit import run_fit

    out = released[0] / "release" / "shards"
    over = {"output_dir": str(tmp_path / "fit"), "model.name": TINY_NAME, "model.custom": json.dumps(TINY_CLIP),
            "data.train": f"[{{urls: '{out}/{{00000..00003}}.tar'}}]", "data.batch_size": 4, "data.workers": 0,
            "data.shuffle_buffer": 8, "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.max_steps": 1,
            "trainer.max_epochs": 1, "trainer.log_every_n_steps": 1, "logging.wandb": "disabled",
            "logging.progress_bar": False, "optim.scheduler": "constant", "checkpoint.export_open_clip": "false"}
    run_fit(to_object(load_config(FitConfig, [], [f"{k}={v}" for k, v in over.items()])))
    metrics = next((tmp_path / "fit" / "csv").glob("version_*/metrics.csv")).read_text()
    assert "train/loss" in metrics


@pytest.mark.slow
def test_release_shards_train_in_open_clip_train(released, tmp_path):
    out = released[0] / "release" / "shards"
    samples = json.loads((released[0] / "release" / "manifest.json").read_text())["samples"]
    log = open_clip_train_log(f"{out}/{{00000..00003}}.tar", tmp_path, min(8, samples))
    assert "Train Epoch: 0" in log and "Loss" in log


def obelics_docs(folder, u):
    """Two OBELICS files (two extract shards), one image URL and one paragraph per document."""
    folder.mkdir(parents=True)
    paths = []
    for f, part in enumerate((u[:len(u) // 2], u[len(u) // 2:])):
        t = pa.table({"texts": [[None, "A man riding a red bike on the street."] for _ in part],
                      "images": [[x, None] for x in part], "metadata": ["[]"] * len(part)})
        paths.append(folder / f"obelics-{f:03d}.parquet")
        pq.write_table(t, paths[-1])
    return paths


def test_download_stage_through_img2dataset(tmp_path):
    with ImageServer() as srv:
        u = urls(srv, 80)
        paths = obelics_docs(tmp_path / "docs", u)
        work = tmp_path / "work"
        ov = build_overrides(work, paths, fmt="obelics", **FAST)
        for st in ("extract", "download", "image_filter"):
            assert main(["build", st] + ov) == 0
        # what a kill in shard 1 leaves: no marker, no manifest, no outputs, img2dataset's half-done folder
        dl = work / "download"
        before = {n: (dl / n).read_bytes() for n in ("images-00001.parquet", "fetch-00001.parquet")}
        counts_before = json.loads((dl / "manifest.json").read_text())["counts"]
        for n in ("_done/00001.json", "manifest.json", *before):
            (dl / n).unlink()
        (dl / "_img2dataset" / "00001" / "out").mkdir(parents=True)
        (dl / "_img2dataset" / "00001" / "out" / "00000.parquet").write_bytes(b"half")
        assert main(["build", "download"] + ov) == 0
        assert {n: (dl / n).read_bytes() for n in before} == before  # redone alike, nothing lost or doubled
        assert json.loads((dl / "manifest.json").read_text())["counts"] == counts_before
    m = json.loads((work / "download" / "manifest.json").read_text())
    c = m["counts"]
    n = {k: sum(kind(x) == k for x in u) for k in set(KINDS)}
    assert c["n_in"] == 80 == c["n_out"] + sum(c["dropped"].values())
    assert c["dropped"] == {"fetch_http_404": n["404"], "fetch_decode_error": n["corrupt"],
                            "fetch_opted_out": n["optout"], "fetch_timeout": n["stall"]}
    assert m["fetch_stats"]["fetcher"] == "img2dataset" and m["fetch_stats"]["ok"] == c["n_out"]
    assert m["num_shards"] == 2
    for i in range(2):  # one output shard per input shard, in input order, every URL with its status
        ins = list(iter_rows(work / "extract" / f"images-{i:05d}.parquet"))
        st = list(iter_rows(work / "download" / f"fetch-{i:05d}.parquet"))
        assert [r["id"] for r in st] == [r["id"] for r in ins]
        ok = [r for r in st if r["status"] == "ok"]
        assert all(len(r["sha256"]) == 64 and r["width"] for r in ok)
        assert {kind(r["url"]) for r in ok} == {"good", "big"}
        assert [r["id"] for r in iter_rows(work / "download" / f"images-{i:05d}.parquet")] == [r["id"] for r in ok]
    assert not (work / "download" / "_img2dataset").exists() or not any((work / "download" / "_img2dataset").iterdir())
    big = [r for r in iter_rows(sorted((work / "download").glob("fetch-*.parquet"))) if kind(r["url"]) == "big"]
    assert {(r["width"], r["height"], r["original_width"]) for r in big} == {(336, 224, 600)}  # resized at download
    f = json.loads((work / "image_filter" / "manifest.json").read_text())["counts"]
    assert (f["n_in"], f["n_out"]) == (c["n_out"], c["n_out"])


def test_distributor_settings_are_one_line_errors(tmp_path, capsys):
    """img2dataset's ray distributor is refused (the build is on Ray already); a distributor whose package is missing
    (pyspark is not a dependency) and an unknown fetcher are one line each, before any download."""
    import importlib.util

    with ImageServer() as srv:
        paths = obelics_docs(tmp_path / "docs", urls(srv, 4))
        ov = build_overrides(tmp_path / "work", paths, fmt="obelics")
        assert main(["build", "extract"] + ov) == 0
        assert main(["build", "download"] + ov + ["download.distributor=ray"]) == 2
        assert main(["build", "download"] + ov + ["download.fetcher=wget"]) == 2
        if importlib.util.find_spec("pyspark") is None:
            assert main(["build", "download"] + ov + ["download.distributor=pyspark"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: download.distributor=ray is not needed: the build runs on Ray itself")
    assert err[1] == "error: download.fetcher must be one of auto, img2dataset, builtin, got 'wget'"
    assert len(err) == 2 or err[2] == "error: download.distributor=pyspark needs the pyspark package (pip install pyspark)"
    assert not (tmp_path / "work" / "download" / "_done").exists()


def test_release_recipe_uses_release_retries_not_download_retries(released, tmp_path):
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.release.via_img2dataset import recipe_args

    cfg = BuildConfig()
    assert cfg.download.retries == 2  # the download stage's default must not leak into the authors' recipe
    assert recipe_args(cfg, tmp_path / "in", tmp_path / "out")["retries"] == 0
    cfg.release.retries = 3
    assert recipe_args(cfg, tmp_path / "in", tmp_path / "out")["retries"] == 3
    assert json.loads((released[0] / "release" / "manifest.json").read_text())["config"]["retries"] == 0


def test_img2dataset_route_sends_project_url_and_prints_no_notice(capsys):
    """img2dataset fetches through extract/fetch.py (img2dataset_run.bounded_fetch), so download.project_url reaches
    publishers on that route too, and no notice says otherwise."""
    from realsyn_pl.construct.engine.config import DownloadConfig
    from realsyn_pl.construct.extract import img2dataset_run as i2d

    d = DownloadConfig(project_url="https://example.org/crawl", timeout_s=3)
    i2d.check(d)
    assert capsys.readouterr().out == ""
    with ImageServer() as srv:
        key, stream, err = i2d.bounded_fetch(d)((7, srv.urls["good"]), 10, 0)
        missing = i2d.bounded_fetch(d)((8, srv.urls["404"]), 10, 0)
        agents = set(srv.httpd.agents)
    assert (key, err) == (7, None) and Image.open(stream).size == (150, 120)
    assert missing == (8, None, "fetch failed: http_404") and i2d.reason("failed_to_download", missing[2]) == "http_404"
    assert agents == {"Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
                      "(compatible; img2dataset; +https://example.org/crawl)"}
