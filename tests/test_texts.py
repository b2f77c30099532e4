import random
from collections import Counter

import pytest

from realsyn_pl.config import ConfigError
from realsyn_pl.data.texts import TextChooser, available_texts, parse_metadata

KEYS = ["text1", "text2", "text3", "syn_text"]


def test_each_of_four_texts_drawn_about_a_quarter():
    meta = {"text2": "b", "text3": "c", "syn_text": "d"}
    chooser = TextChooser.create(KEYS, None)
    rng = random.Random(0)
    n = 40_000
    counts = Counter(chooser.choose(available_texts("a", meta, KEYS), rng) for _ in range(n))
    assert set(counts) == {"a", "b", "c", "d"}
    for text in "abcd":
        assert abs(counts[text] / n - 0.25) < 0.01, counts


def test_txt_only_sample_uses_text1():
    chooser = TextChooser.create(KEYS, None)
    assert {chooser.choose(available_texts("only caption", None, KEYS), random.Random(i)) for i in range(50)} == {
        "only caption"
    }


def test_weights_renormalise_over_available_and_blank_texts_do_not_count():
    chooser = TextChooser.create(KEYS, [1, 0, 0, 3])
    texts = available_texts("a", {"text2": "b", "syn_text": "  "}, KEYS)
    assert texts == {"text1": "a", "text2": "b"}
    assert {chooser.choose(texts, random.Random(i)) for i in range(50)} == {"a"}
    counts = Counter(chooser.choose(available_texts("a", {"syn_text": "s"}, KEYS), random.Random(i)) for i in range(4000))
    assert abs(counts["s"] / 4000 - 0.75) < 0.03


def test_nested_text_dict_and_no_text():
    chooser = TextChooser.create(KEYS, None)
    assert available_texts(None, {"text": {"syn_text": "x"}}, KEYS) == {"syn_text": "x"}
    assert chooser.choose(available_texts(None, {"url": "u"}, KEYS), random.Random(0)) is None


def test_bad_weights_and_metadata():
    with pytest.raises(ConfigError):
        TextChooser.create(KEYS, [1, 1])
    with pytest.raises(ValueError):
        parse_metadata(b"[1, 2]")
