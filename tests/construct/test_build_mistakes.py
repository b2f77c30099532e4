"""A new user's mistakes with `build`, each one line on stderr and exit code 2 before any work, and what a build
says when it ends, resumes or writes a card. In-process and on tiny generated files: no Ray, no model."""
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from realsyn_pl.cli import main
from realsyn_pl.construct.engine.config import BuildConfig, RayConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.pipeline import next_step
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, write_json
from realsyn_pl.construct.release import card
from realsyn_pl.data.interleaved import FORMATS, Document, parse_row
from support import GOOD, IN_PROCESS, build_overrides

ROOT = Path(__file__).resolve().parents[2]
ALL = ["build", "all", "--config", "build/tiny_cpu"]  # every stage, offline models (its rewriter needs no LLM)
MMC4_ROW = {"text_list": [GOOD[0], GOOD[1]], "image_info": [{"raw_url": "http://127.0.0.1:9/a.png",
                                                             "image_name": "a.jpg"}]}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- input files: the layout, what a file is, a build that keeps nothing

@pytest.mark.parametrize("fmt", ["local", "obelics"])
def test_mmc4_corpus_read_with_another_format_stops_before_any_work(tmp_path, capsys, fmt):
    path = jsonl(tmp_path / "mmc4-000.jsonl", [MMC4_ROW] * 3)
    work = tmp_path / "work"
    assert main(ALL + build_overrides(work, [path], fmt=fmt, **IN_PROCESS)) == 2
    assert one_error_line(capsys) == (
        f"error: input.format={fmt} but {path} looks like mmc4 (keys text_list, image_info); set input.format=mmc4 "
        "(the layouts: data_build/README.md)")
    assert not work.exists()


@pytest.mark.parametrize("name,content,says", [
    ("docs.parquet", b"this is a text file\n", "not a readable parquet file (Parquet magic bytes not found"),
    ("docs.jsonl", b"url,caption\n/a.jpg,a cat\n", "not JSON lines (one JSON object per line); its first line reads "
                                                    "'url,caption'"),
    ("docs.json", b'[\n  {"texts": ["A cat."]}\n]\n', "not JSON lines"),  # one JSON document, not one per line
    ("docs.jsonl.gz", b'{"texts": ["A cat."]}\n', "cannot be read as JSON lines (gzip): Not a gzipped file"),
], ids=["text-as-parquet", "csv-as-jsonl", "json-array", "plain-as-gz"])
def test_file_that_is_not_what_its_name_says_is_one_line_before_work(tmp_path, capsys, name, content, says):
    good = jsonl(tmp_path / "a.jsonl", [{"texts": [GOOD[0]]}])
    bad = tmp_path / name
    bad.write_bytes(content)
    work = tmp_path / "work"
    assert main(ALL + build_overrides(work, [good, bad], **IN_PROCESS)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {bad}: ") and says in line, line
    assert not work.exists()


def test_damaged_row_group_in_a_parquet_that_opens_is_a_counted_skip(tmp_path, capsys):
    rows = {"texts": [[GOOD[0], None]] * 40, "images": [[None, "http://127.0.0.1:9/a.png"]] * 40}
    good, damaged = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table(rows), good)
    pq.write_table(pa.table(rows), damaged, row_group_size=20)
    data = bytearray(damaged.read_bytes())
    start = pq.read_metadata(damaged).row_group(1).column(0).data_page_offset
    data[start:start + 40] = b"\xff" * 40  # the second row group's first page; the footer still reads
    damaged.write_bytes(bytes(data))
    work = tmp_path / "work"
    assert main(["build", "extract", "input.batch_rows=20"] + build_overrides(work, [good, damaged], fmt="obelics",
                                                                               **IN_PROCESS)) == 0
    c = json.loads((work / "extract" / "manifest.json").read_text())["counts"]
    assert (c["n_out"], c["dropped"]) == (60, {"truncated_file": 1})


def test_extract_that_keeps_no_document_stops_the_build_naming_why(tmp_path, capsys):
    path = jsonl(tmp_path / "docs.jsonl", [{"texts": [], "images": []}] * 3 + [{"texts": "not a list"}])
    work = tmp_path / "work"
    ov = build_overrides(work, [path], **IN_PROCESS)
    assert main(ALL + ov) == 2
    expected = ("error: extract kept no document of the 4 read (dropped: empty_document 3, malformed_row 1); check "
                "input.format=local against the layouts in data_build/README.md, then rerun with force=extract")
    assert one_error_line(capsys) == expected
    assert (work / "extract" / "manifest.json").is_file() and not (work / "download").exists()
    assert main(ALL + ov) == 2  # a rerun skips the complete stage and stops the same way
    assert one_error_line(capsys) == expected


def test_readme_example_rows_parse_in_their_layout_only(tmp_path):
    text = (ROOT / "data_build" / "README.md").read_text()
    section = text[text.index("## Input layouts"):text.index("## Resume and scale")]
    examples = dict(re.findall(r"\*\*(obelics|mmc4|local)\*\*.*?```json\n(.*?)\n```", section, re.S))
    assert sorted(examples) == sorted(FORMATS)
    for fmt, row in examples.items():
        row = json.loads(row)
        assert isinstance(parse_row(fmt, row, str(tmp_path)), Document), fmt
        others = [f for f in FORMATS if f != fmt and isinstance(parse_row(f, row, str(tmp_path)), Document)]
        # an obelics row also reads as local (nulls skipped); nothing else reads as another layout
        assert others == (["local"] if fmt == "obelics" else []), fmt


# ---- build release: what it takes

def release_parquet(path: Path, urls: list[str]) -> Path:
    n = len(urls)
    pq.write_table(pa.table({"raw_image_url": urls, "text1": ["a cat"] * n, "text2": [""] * n, "text3": [""] * n,
                             "syn_text": [""] * n}), path)
    return path


@pytest.mark.parametrize("case", ["csv", "local_paths", "file_urls_without_root"])
def test_release_input_that_cannot_work_is_one_line_before_work(tmp_path, capsys, case):
    if case == "csv":
        path = tmp_path / "train.csv"
        path.write_text("raw_image_url,text1\nhttp://x/a.jpg,a cat\n")
    else:
        urls = ["/data/img/a.jpg", "/data/img/b.jpg"] if case == "local_paths" else ["file:///data/img/a.jpg"]
        path = release_parquet(tmp_path / "train.parquet", urls)
    work = tmp_path / "work"
    ov = [f"work_dir={work}", f"release.paths=[{path}]", "download.fetcher=builtin", "progress=false",
          "ray.in_process=true"]
    assert main(["build", "release"] + ov) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {path}: "), line
    assert {"csv": "not a parquet file (Parquet magic bytes not found in footer",
            "local_paths": "column raw_image_url holds local paths, not URLs (first row: '/data/img/a.jpg')",
            "file_urls_without_root": "holds file:// URLs but download.image_root is not set"}[case] in line
    assert ("release.paths takes parquet" in line) if case == "csv" else (
        "set download.image_root to the folder that holds them" in line)
    assert not work.exists()


# ---- the end of a build, the card

def fake_write(work: Path, pretrained, samples: int = 19) -> Path:
    out = work / "write"
    write_json(out / "manifest.json", {"done": True, "samples": samples, "num_shards": 1, "tars": 1,
                                       "urls": f"{out}/{{00000..00000}}.tar", "card": str(out / "card.md")})
    write_json(work / "embed_images" / "manifest.json", {"done": True, "config": {
        "model": {"name": "tiny", "pretrained": pretrained}}})
    return out


@pytest.mark.parametrize("pretrained,preset", [(None, "fit/tiny_cpu"), ("/w/clip.pt", "fit/realsyn15m_vitb32")])
def test_build_all_ends_with_the_shards_the_card_and_the_fit_command(tmp_path, capsys, pretrained, preset):
    work = tmp_path / "my work"  # a space: the command must still paste into a shell
    out = fake_write(work, pretrained)
    lines = next_step(BuildConfig(work_dir=str(work)), ["balance", "write"]).splitlines()
    urls = f"{out}/{{00000..00000}}.tar"
    assert lines[0] == f"[build] done: 19 samples in 1 shard(s) {urls}"
    assert lines[1] == f"[build] dataset card: {out / 'card.md'}"
    assert ("random-init" in lines[2]) is (pretrained is None)
    command = f"python -m realsyn_pl fit --config {preset} \"data.train=[{{urls: '{urls}'}}]\""
    assert lines[-1] == f"[build] next: {command}"
    argv = shlex.split(command)[3:]
    assert main(argv + ["--print-config"]) == 0  # the line is a valid fit command with these shards
    printed = yaml.safe_load(capsys.readouterr().out)  # parsed: YAML folds a long value with a space in it
    assert printed["data"]["train"][0]["urls"] == urls


def test_card_of_a_smoke_build_warns_first_and_explains_fewer_than_k(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    tiny = {"name": "tiny", "pretrained": None}
    manifests = {
        "embed_images": {"config": {"model": tiny}, "counts": Counts(24, 24).to_dict()},
        "cluster": {"config": {"k": 16}, "counts": Counts(50, 50).to_dict()},
        "retrieve": {"config": {"k": 3, "nprobe": 1}, "counts": Counts(24, 24, {}, {"fewer_than_k_texts": 24}).to_dict()},
        "syn_text": {"config": {"backend": "template", "captions": False}, "counts": Counts(24, 24).to_dict()},
        "balance": {"counts": Counts(24, 19).to_dict(), "caps": {"20": 19},
                    "window": {"similarity_text": "syn_text", "mode": "quantile", "low": 0.1, "high": 0.9,
                               "removed_fraction": 0.2}, "image_clusters": {"non_empty": 8, "max": 2}},
    }
    for name, m in manifests.items():
        write_json(work / name / "manifest.json", {"done": True, **m})
    np.save(work / "balance" / "similarity.npy", np.linspace(0, 1, 24, dtype=np.float32))
    np.save(work / "balance" / "image_cluster_sizes.npy", np.array([1, 2, 1, 2, 1, 1, 2, 2, 0]))
    out.mkdir()
    logs = {}
    monkeypatch.setattr(card, "_hist", lambda path, values, title, xlabel, lines=(), log=False:
                        logs.setdefault(path.name, log) is None or path)
    text = card.write_card(work, out, cap=20).read_text().splitlines()
    assert text[2].startswith("> **Warning: not a dataset.** The embedding model is random-init (no weights; "
                              "embed_images)")
    assert "template merge" in text[2] and "No captioner ran" in text[2]
    note = next(line for line in text if line.startswith("`fewer_than_k_texts`"))
    assert "(24 images, retrieve): not a drop" in note and "retrieve.k=3" in note and "3.1 per cluster" in note
    # cluster sizes 1-2 over 8 clusters: bars of 4 and 4, a linear count axis
    assert logs["card_cluster_sizes_before.png"] is False and logs["card_cluster_sizes_after.png"] is False
    assert card.wide_range(np.array([1.0] * 200 + [500.0] * 3))  # bars of 200 and 3: a log axis


# ---- progress: resumed steps, sub-steps, logs

def test_resumed_step_says_what_an_earlier_run_did_and_counts_the_rest(tmp_path, capsys):
    stage = Stage(tmp_path, "download", {})
    first = {"run": True}

    def work(i: int) -> Counts:
        if first["run"] and i > 0:
            raise StageError("killed")  # not retried: the first run finishes unit 0 only
        return Counts(1, 1)

    with Executor(RayConfig(in_process=True), progress=True) as ex:
        stage.begin()
        with pytest.raises(StageError):
            ex.map(stage, [0, 1, 2, 3], work)
        capsys.readouterr()
        first["run"] = False
        assert run_sharded(ex, stage, range(4), work)
    out = capsys.readouterr().out
    assert "[build] download: 1 of 4 units already done (kept from an earlier run); running the other 3\n" in out
    assert "[build] download: 3/3 units" in out and "\r" not in out


def test_a_step_that_only_makes_things_says_what_it_made(tmp_path, capsys):
    sub = Stage(tmp_path, "dedup_images", {}).sub("_keys", {})
    sub.begin()
    sub.mark_shard_done(0, Counts(produced={"keys": 26}), 0.1)
    assert sub.finalize([0], time.time())
    assert capsys.readouterr().out == "[build] dedup_images/_keys: made keys 26\n"


def test_a_redirected_build_log_gets_no_carriage_return_bars(tmp_path, capsys, monkeypatch):
    from tqdm import tqdm

    from realsyn_pl.construct.extract import documents

    extract_file = documents.extract_file

    def with_a_bar(*args):  # what img2dataset or a hub download draws inside a unit
        for _ in tqdm(range(20), file=sys.stdout, mininterval=0):
            pass
        return extract_file(*args)

    monkeypatch.setattr(documents, "extract_file", with_a_bar)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    path = jsonl(tmp_path / "a.jsonl", [{"texts": [GOOD[0]]}])
    assert main(["build", "extract"] + build_overrides(tmp_path / "w", [path], **IN_PROCESS) + ["progress=true"]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err and "[build] extract: 1/1 units" in out.out
    assert "TQDM_DISABLE" not in __import__("os").environ  # restored once the build ended


# ---- the command line

def test_build_help_lists_the_stages_in_order(capsys):
    from realsyn_pl.construct.engine.order import STAGE_ORDER

    assert main(["build", "--help"]) == 0
    out = capsys.readouterr().out
    listed = out[out.index("stages (build <stage> runs one"):out.index("--config FILE   YAML")]
    assert re.findall(r"[a-z_]+", listed.split("\n", 1)[1].split("release:")[0]) == list(STAGE_ORDER)
    assert "release: the published RealSyn parquet files -> shards (not part of all)" in listed


@pytest.mark.parametrize("argv,squeezed", [
    (["build", "ray.stages={embed_images:{gpus:1}}"], "gpus:1"),   # not YAML at all
    (["build", "ray.stages={embed_images: {gpus:1}}"], "gpus:1"),  # YAML, with a key "gpus:1"
    (["fit", "data.train=[{urls:x.tar}]"], "urls:x.tar"),
])
def test_flow_value_without_a_space_after_the_colon_gets_the_hint(capsys, argv, squeezed):
    assert main(argv + ["--print-config"]) == 2
    key, value = argv[1].split("=", 1)
    assert one_error_line(capsys) == (f"error: {key}: {value!r} holds {squeezed!r}, which YAML reads as one word: "
                                      "write {a: 1} (a space after the colon)")
    assert main(["build", "ray.stages={embed_images: {gpus: 1}}", "release.paths=[s3://b/x.parquet]",
                 "--print-config"]) == 0
