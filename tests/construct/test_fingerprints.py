"""The fingerprint chain: a stage's hash covers its inputs' fingerprints, so a stage built from an input that was
rebuilt since is refused with one line naming the input, and a stage further down with one line naming the chain;
`force=<stage>` rebuilds that stage and the stale stages after it (byte-identical to a clean build) and touches
nothing else."""
import json
from unittest.mock import ANY

import pytest

from realsyn_pl.cli import main
from realsyn_pl.config import load_config, to_object
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import run_sharded
from realsyn_pl.construct.engine.stage import REPLACED, Counts, Stage, is_stale, parse_force, stale_chain
from support import IN_PROCESS, build_overrides, local_corpus, tiny_lm

STAGE1 = ["extract", "download", "image_filter", "embed_images", "dedup_images", "sentence_filter", "wordcount",
          "entropy", "perplexity", "embed_sentences", "dedup_sentences"]
UNTIL = "until=dedup_sentences"
# 3 of the 6 sentences the filter keeps have fewer than 7 words; max_aspect 3.5 keeps the 301x100 image
NEW_SENTENCE_FILTER = "sentence_filter.min_words=7"
NEW_IMAGE_FILTER = "image_filter.max_aspect=3.5"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return local_corpus(tmp_path_factory.mktemp("corpus"))


def overrides(work, corpus, lm):
    files, img = corpus
    return build_overrides(work, files, **{"input.image_root": str(img), "perplexity.model": str(lm),
                                           "dedup.threshold": 1e-6, "sentence_filter.cat_rule": "'off'",
                                           **IN_PROCESS})


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def data_files(work, stages=STAGE1) -> dict[str, bytes]:
    """Every file of the stage dirs but the manifest and the per-shard done markers (they hold timings)."""
    out = {}
    for st in stages:
        for f in sorted((work / st).rglob("*")):
            rel = f.relative_to(work)
            if f.is_file() and f.name != "manifest.json" and "_done" not in rel.parts:
                out[str(rel)] = f.read_bytes()
    return out


def snapshot(work, stages) -> dict[str, tuple]:
    """mtime and bytes of every file (manifest included) of the stage dirs."""
    return {str(f.relative_to(work)): (f.stat().st_mtime_ns, f.read_bytes())
            for st in stages for f in sorted((work / st).rglob("*")) if f.is_file()}


def test_a_stage_built_from_a_rebuilt_input_is_refused_naming_it(tmp_path, corpus, lm, capsys):
    work = tmp_path / "w"
    ov = overrides(work, corpus, lm)
    assert main(["build", "all", UNTIL] + ov) == 0
    assert not is_stale(work / "wordcount", work)
    assert main(["build", "sentence_filter", "force=true", NEW_SENTENCE_FILTER] + ov) == 0
    capsys.readouterr()
    assert is_stale(work / "wordcount", work) and is_stale(work / "entropy", work)
    # downstream of entropy nothing moved in the manifests, yet every stage is stale through it
    assert stale_chain(work / "perplexity", work) == (["entropy"], {"sentence_filter": ANY})
    assert stale_chain(work / "dedup_sentences", work)[0] == ["embed_sentences", "perplexity", "entropy"]
    assert all(is_stale(work / st, work) for st in STAGE1[6:]) and not is_stale(work / "dedup_images", work)
    later = snapshot(work, STAGE1[8:])
    for cmd, via in [(["build", "perplexity"], "entropy"), (["build", "perplexity", "force=perplexity"], "entropy"),
                     (["build", "dedup_sentences"], "embed_sentences <- perplexity <- entropy")]:
        assert main(cmd + ov) == 2, cmd
        assert one_line_error(capsys) == \
            f"error: stage {cmd[1]!r} in {work / cmd[1]} reads a stale input: 'sentence_filter' was rebuilt since " \
            f"'entropy' was built from it (via {via}); rerun with force=sentence_filter to rebuild it and every " \
            "stage after it"
    assert snapshot(work, STAGE1[8:]) == later  # refused, force included: nothing wiped or rewritten
    for cmd in (["build", "wordcount"], ["build", "all", UNTIL, NEW_SENTENCE_FILTER]):
        assert main(cmd + ov) == 2
        err = one_line_error(capsys)
        assert f"stage 'wordcount' in {work / 'wordcount'} was built from another 'sentence_filter' (it was rebuilt " \
               "since); rerun with force=sentence_filter to rebuild it and every stage after it, or " \
               "force=wordcount" in err
    # an own-config change keeps its message
    assert main(["build", "sentence_filter"] + ov) == 2
    assert "stage 'sentence_filter'" in (err := one_line_error(capsys)) and "built with another config" in err
    # entropy reads both rebuilt stages (once wordcount is rebuilt too)
    assert main(["build", "wordcount", "force=wordcount"] + ov) == 0
    capsys.readouterr()
    entropy = snapshot(work, ["entropy"])
    assert main(["build", "entropy"] + ov) == 2
    assert "was built from another 'sentence_filter' and 'wordcount' (they were rebuilt since)" in \
        one_line_error(capsys)
    assert snapshot(work, ["entropy"]) == entropy  # refused: left as it was


def test_force_stage_rebuilds_it_and_the_stale_stages_after_it_only(tmp_path, corpus, lm, capsys):
    work, clean = tmp_path / "w", tmp_path / "clean"
    ov = overrides(work, corpus, lm)
    assert main(["build", "all", UNTIL] + ov) == 0
    before = snapshot(work, STAGE1)
    # 1. image_filter: embed_images and dedup_images follow it; the sentence stages (later in the order, not
    #    downstream) are skipped, extract and download (upstream) are not touched
    capsys.readouterr()
    assert main(["build", "all", UNTIL, "force=image_filter", NEW_IMAGE_FILTER] + ov) == 0
    out = capsys.readouterr().out
    after = snapshot(work, STAGE1)
    for st in ["extract", "download"] + STAGE1[5:]:
        assert {k: v for k, v in after.items() if k.startswith(st + "/")} == \
            {k: v for k, v in before.items() if k.startswith(st + "/")}, st
        assert f"[build] {st}: complete, skipped" in out
    for st, images in [("image_filter", 2), ("embed_images", 2), ("dedup_images", 1)]:  # the 2 are both red
        m = json.loads((work / st / "manifest.json").read_text())
        assert m["counts"]["n_out"] == images and m["config"]["stage"] == st, st
        assert before[f"{st}/manifest.json"][1] != after[f"{st}/manifest.json"][1], st
    assert json.loads((work / "dedup_images" / "manifest.json").read_text())["counts"]["n_in"] == 2
    assert "[build] embed_images: image_filter changed since it was built: rebuilt (force=image_filter)" in out
    # 2. sentence_filter: every sentence stage after it is stale and rebuilt; the image stages are skipped
    assert main(["build", "all", UNTIL, "force=sentence_filter", NEW_IMAGE_FILTER, NEW_SENTENCE_FILTER] + ov) == 0
    again = snapshot(work, STAGE1)
    for st in STAGE1[:5]:
        assert {k: v for k, v in again.items() if k.startswith(st + "/")} == \
            {k: v for k, v in after.items() if k.startswith(st + "/")}, st
    assert json.loads((work / "dedup_sentences" / "manifest.json").read_text())["counts"]["n_in"] == 3
    assert not list(work.rglob(REPLACED)) and not list(work.glob(".*replaced*"))
    # the same bytes (and the same config hashes: _config.json) as a clean build with the new config
    assert main(["build", "all", UNTIL, NEW_IMAGE_FILTER, NEW_SENTENCE_FILTER] + overrides(clean, corpus, lm)) == 0
    got, want = data_files(work), data_files(clean)
    assert sorted(got) == sorted(want) and any(k.endswith(".npy") for k in got)
    assert [k for k in got if got[k] != want[k]] == []
    # and now everything is complete
    capsys.readouterr()
    assert main(["build", "all", UNTIL, NEW_IMAGE_FILTER, NEW_SENTENCE_FILTER] + ov) == 0
    assert capsys.readouterr().out.count("complete, skipped") == len(STAGE1)


def test_bad_force_values_are_one_line_errors(tmp_path, corpus, lm, capsys):
    ov = overrides(tmp_path / "w", corpus, lm)
    assert main(["build", "all", UNTIL, "force=bogus"] + ov) == 2
    err = one_line_error(capsys)
    assert err == f"error: force must be true, false or a stage of this run: {', '.join(STAGE1)}; got 'bogus'"
    assert main(["build", "all", "until=download", "force=cluster"] + ov) == 2
    assert "force=cluster: stage 'cluster' is not part of this run (build all until=download)" in \
        one_line_error(capsys)
    assert main(["build", "extract", "force=download"] + ov) == 2
    assert "is not part of this run (build extract); force takes true, false or a stage of this run: extract" in \
        one_line_error(capsys)
    assert not (tmp_path / "w").exists()  # refused before any stage ran


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("False", False), ("0", False), ("off", False),
                                         ("cluster", "cluster"), ("rewrite", "rewrite")])
def test_force_reads_booleans_from_the_command_line_and_yaml(tmp_path, text, value):
    assert parse_force(to_object(load_config(BuildConfig, [], [f"force={text}"])).force) == value
    preset = tmp_path / "p.yaml"
    preset.write_text(f"force: {text}\n")
    assert parse_force(to_object(load_config(BuildConfig, [str(preset)])).force) == value
    assert parse_force(BuildConfig().force) is False and parse_force(True) is True


def _toy(stage):
    def work(i):
        c = Counts()
        c.keep(i + 1)
        return c
    return work


def test_force_wipes_the_stage_and_a_killed_rebuild_stays_stale_until_done(tmp_path, ex):
    st = Stage(tmp_path, "toy", {"a": 1})
    assert run_sharded(ex, st, range(2), _toy(st)) and st.is_complete()
    assert not st.skip_complete("true")
    st.begin(True)  # a forced rebuild that is killed right after the wipe
    assert not st.is_complete() and (st.dir / REPLACED).is_file() and not st.shard_done(0)
    assert is_stale(st.dir, tmp_path)  # a directory being replaced is rebuilt by force=<an earlier stage> too
    assert run_sharded(ex, st, range(2), _toy(st))
    assert st.is_complete() and not (st.dir / REPLACED).exists()  # the new manifest ends the rebuild
