"""Each stage-1 filter at and around its threshold, with hand-made cases."""
import math

import pytest

from realsyn_pl.construct.engine.config import ImageFilterConfig, SentenceFilterConfig
from realsyn_pl.construct.extract.cat_rule import analyse
from realsyn_pl.construct.extract.entropy import entropy_reason, sentence_entropy, tokens
from realsyn_pl.construct.extract.image_filter import inspect, size_reason
from realsyn_pl.construct.extract.model_stages import ppl_reason
from realsyn_pl.construct.extract.sentence_filters import quality_reason, split_sentences, words
from support import CORRUPT, bomb_png, png

IMG = ImageFilterConfig()


@pytest.mark.parametrize("w,h,reason", [
    (100, 100, None), (99, 100, "too_small"), (100, 99, "too_small"), (300, 100, None), (301, 100, "bad_aspect"),
    (100, 300, None), (100, 301, "bad_aspect"), (299, 100, None)])
def test_image_size_and_aspect_thresholds(w, h, reason):
    assert size_reason(w, h, IMG) == reason
    assert inspect(png(w, h), IMG) == (reason or (w, h))


def test_corrupt_truncated_and_bomb_images_are_rejected_with_reasons():
    assert inspect(CORRUPT, IMG) == "decode_error"
    assert inspect(png(200, 200)[:-30], IMG) == "decode_error"  # truncated file
    assert inspect(b"", IMG) == "decode_error"
    assert inspect(bomb_png(), IMG) == "decompression_bomb"
    assert inspect(png(200, 200), ImageFilterConfig(max_pixels=200 * 200 - 1)) == "decompression_bomb"


CAT_OFF = SentenceFilterConfig(cat_rule="off")
CAT_APPROX = SentenceFilterConfig(cat_rule="approximate")


@pytest.mark.parametrize("n,reason", [(2, "too_few_words"), (3, None), (81, None), (82, "too_many_words")])
def test_word_count_bounds(n, reason):
    assert quality_reason(" ".join(["word"] * n), CAT_OFF) == reason


def test_emoji_url_and_words():
    assert quality_reason("a cat sits on a mat \U0001F431", CAT_OFF) == "emoji"
    assert quality_reason("a cat sits on https://x.org/cat mat", CAT_OFF) == "url"
    assert quality_reason("see www.cats.com for a cat", CAT_OFF) == "url"
    assert quality_reason("read more at example.com now", CAT_OFF) == "url"
    assert quality_reason("the ratio is 3.5 to 1 overall", CAT_OFF) is None  # a number is not a URL
    assert words("don't stop -- it's 3 o'clock!") == ["don't", "stop", "it's", "3", "o'clock"]
    assert split_sentences("Dr. Smith saw a dog. It ran away.\nNew line") == [
        "Dr. Smith saw a dog.", "It ran away.", "New line"]


@pytest.mark.parametrize("text", [
    "A man riding a red bike on the street.", "Two dogs play in the green park.", "The cat is sleeping.",
    "Children running across a sandy beach.", "A woman holding an umbrella walks down the road."])
def test_approximate_cat_rule_positive(text):
    assert quality_reason(text, CAT_APPROX) is None


@pytest.mark.parametrize("text", [
    "The best hotel in Paris.",            # objects and a relation, no action
    "Our new collection is available now.",  # no action
    "A building in the city.",             # -ing noun after a determiner is not an action
    "It is running.",                      # action but no object (complexity 0)
    "Click here to subscribe."])
def test_approximate_cat_rule_negative(text):
    assert quality_reason(text, CAT_APPROX) == "cat_rule"
    assert quality_reason(text, CAT_OFF) is None  # switchable


def test_cat_complexity_counts_edges():
    assert analyse("a red vintage car".split()).complexity == 2
    assert analyse("a dog on a sofa".split()).complexity == 1
    assert not analyse("a dog on a sofa".split()).has_action
    r = analyse("a dog sleeping".split())
    assert r.has_action and r.complexity == 1
    assert not r.passes(2, True) and r.passes(1, True)


def test_entropy_formula_and_threshold():
    p = {"a": 0.5, "b": 0.25, "c": 0.25}
    theta = sentence_entropy(["a", "b", "b"], p)
    assert theta == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert sentence_entropy(["a", "b"], p, "2") == pytest.approx(0.5 + 0.5)
    assert sentence_entropy(["zzz"], p) == 0.0  # unseen word contributes nothing
    assert tokens("The THE the", True) == ["the"] * 3
    assert [entropy_reason(t, 0.3) for t in (0.2999, 0.3, 0.3001)] == ["low_entropy", None, None]
    p2 = {"x": 0.1}  # -0.1 ln 0.1 = 0.230 (dropped); twice = 0.461 (kept)
    assert entropy_reason(sentence_entropy(["x"], p2), 0.3) == "low_entropy"
    assert entropy_reason(sentence_entropy(["x", "x"], p2), 0.3) is None


@pytest.mark.parametrize("ppl,reason", [(29.999, "ppl_low"), (30.0, None), (120.0, None), (200.0, None),
                                        (200.001, "ppl_high"), (float("nan"), "ppl_high"),
                                        (float("inf"), "ppl_high")])
def test_perplexity_bounds(ppl, reason):
    assert ppl_reason(ppl, 30.0, 200.0) == reason


def test_perplexity_disabled_passes_every_sentence_and_says_so(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.engine.pipeline import run_build
    from realsyn_pl.construct.engine.schemas import SCORED_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage

    rows = [{"id": f"d/s-{i}", "doc_id": "d", "text": f"a red ball number {i} is rolling", "entropy": 1.0}
            for i in range(5)]
    upstream = Stage(str(tmp_path), "entropy", {}, [])
    upstream.begin()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORED_SENTENCES), upstream.path("sentences", 0))
    counts = Counts()
    counts.keep(5)
    upstream.mark_shard_done(0, counts, 0.0)
    assert upstream.finalize([0], 0.0)
    cfg = BuildConfig(stage="perplexity", work_dir=str(tmp_path), progress=False)
    cfg.perplexity.enabled = False
    run_build(cfg)
    out = pq.read_table(tmp_path / "perplexity" / "sentences-00000.parquet").to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in rows] and all(r["ppl"] is None for r in out)
    manifest = json.loads((tmp_path / "perplexity" / "manifest.json").read_text())
    assert manifest["config"]["enabled"] is False and manifest["counts"]["n_out"] == 5


@pytest.mark.parametrize("parts", [1, 5])
def test_entropy_stage_looks_its_words_up_in_hash_partitions_of_the_vocabulary(tmp_path, parts):
    """The vocabulary is reduced over key ranges and looked up per shard: every sentence's theta is the one of the
    whole pool's word probabilities in one dict, whatever the number of partitions."""
    import json

    import numpy as np
    import pyarrow.parquet as pq

    from realsyn_pl.cli import main
    from realsyn_pl.construct.engine.records import write_records
    from realsyn_pl.construct.engine.schemas import SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage
    from realsyn_pl.construct.extract.entropy import corpus_probabilities
    from support import write_stage

    rng = np.random.default_rng(parts)
    vocab = [f"w{j}" for j in range(300)]
    shards = [[" ".join(rng.choice(vocab, size=rng.integers(1, 12), p=None)) for _ in range(40)] for _ in range(3)]
    work = tmp_path / "w"
    st = Stage(work, "sentence_filter", {})

    def shard(i):
        write_records(st.path("sentences", i), [{"id": f"d{i}/s-{j}", "doc_id": f"d{i}", "text": t}
                                                 for j, t in enumerate(shards[i])], SENTENCES)
        c = Counts()
        c.keep(len(shards[i]))
        return c

    write_stage(st, range(3), shard)
    ov = [f"work_dir={work}", "progress=false", f"entropy.partitions={parts}", "entropy.threshold=0.1"]
    assert main(["build", "wordcount"] + ov) == 0 and main(["build", "entropy"] + ov) == 0
    prob = corpus_probabilities(work / "wordcount", range(3))
    want = [(f"d{i}/s-{j}", sentence_entropy(tokens(t, True), prob)) for i in range(3) for j, t in enumerate(shards[i])]
    got = {r["id"]: r["entropy"] for i in range(3)
           for r in pq.read_table(work / "entropy" / f"sentences-{i:05d}.parquet").to_pylist()}
    kept = [(k, v) for k, v in want if v >= 0.1]
    assert 0 < len(kept) < len(want) and sorted(got.items()) == sorted(kept)
    m = json.loads((work / "entropy" / "manifest.json").read_text())
    assert m["counts"]["dropped"]["low_entropy"] == len(want) - len(kept)
