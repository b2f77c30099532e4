"""Text from a hostile corpus must neither stall nor crash `extract` and `sentence_filter`: long paragraphs, long
tokens, wrongly typed fields, text that cannot be written as UTF-8. No Ray: the extract function on tiny files."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from realsyn_pl.construct.engine.config import BuildConfig, SentenceFilterConfig
from realsyn_pl.construct.engine.records import iter_rows
from realsyn_pl.construct.engine.stage import Stage, StageError
from realsyn_pl.construct.extract import documents
from realsyn_pl.construct.extract.sentence_filters import has_url, pieces, quality_reason, split_sentences
from realsyn_pl.data.interleaved import BadRow, Document, read_documents

CAT_OFF = SentenceFilterConfig(cat_rule="off")


def extract(tmp_path, fmt: str, path, **sentence_filter):
    """extract_file on one input file: (counts, sentence texts, image rows)."""
    cfg = BuildConfig(stage="extract", work_dir=str(tmp_path / "work"), progress=False)
    cfg.input.format = fmt
    for k, v in sentence_filter.items():
        setattr(cfg.sentence_filter, k, v)
    stage = Stage(cfg.work_dir, "extract", {}, [])
    stage.dir.mkdir(parents=True)
    counts = documents.extract_file(cfg, stage, 0, path)
    sentences = [r["text"] for r in iter_rows([stage.path("sentences", 0)])]
    return counts, sentences, list(iter_rows([stage.path("images", 0)]))


def jsonl(path, rows, raw_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw_lines))
    return path


# ---- long text: bounded before pysbd

def test_a_1mb_paragraph_is_split_in_pieces_with_every_sentence(tmp_path):
    # long sentences: pysbd's time also has a per-sentence part (it compiles a regex for each)
    sents = [f"The red car number {i} is parked near the old mill, where a group of children in yellow coats are "
             "feeding the ducks by the river while their teachers watch from a wooden bench under the tall oak trees."
             for i in range(5_000)]
    para = " ".join(sents)
    assert len(para) > 1_000_000 and "\n" not in para
    counts, out, _ = extract(tmp_path, "local", jsonl(tmp_path / "a.jsonl", [{"texts": [para]}]))
    assert (counts.n_in, counts.n_out, counts.produced["sentences"]) == (1, 1, 5_000)
    assert out == sents  # cut at sentence ends: the same sentences as pysbd gives them one by one


def test_paragraphs_up_to_split_chars_are_split_as_before():
    text = "Dr. Smith saw a dog. It ran away.\nNew line"
    assert split_sentences(text, split_chars=len("Dr. Smith saw a dog. It ran away.")) == [
        "Dr. Smith saw a dog.", "It ran away.", "New line"]
    assert list(pieces("Short text. Two sentences.", 4000)) == ["Short text. Two sentences."]


def test_pieces_cut_at_a_sentence_end_else_whitespace_else_hard():
    assert list(pieces("Aa bb. Cc dd ee ff", 12)) == ["Aa bb. ", "Cc dd ee ff"]   # sentence end first
    assert list(pieces("aa bb cc dd ee", 10)) == ["aa bb cc ", "dd ee"]           # then the last whitespace
    assert list(pieces("abcdefghij" * 3, 12)) == ["abcdefghijab", "cdefghijabcd", "efghij"]  # then a hard cut
    quoted = "Done! \u201cQuoted.\u201d Next one here"  # closing quotes stay with their sentence
    assert list(pieces(quoted, 20)) == ["Done! \u201cQuoted.\u201d ", "Next one here"]
    cjk = "\u4e00\u4e8c\u3002\u4e09\u56db\u4e94\u516d"  # an ideographic full stop needs no space after it
    assert list(pieces(cjk, 5)) == [cjk[:3], cjk[3:]]
    with pytest.raises(ValueError, match="split_chars must be at least 1, got 0"):
        list(pieces("abc", 0))


@pytest.mark.parametrize("unit,n", [
    ("x", 1_000_000),                             # one token, no whitespace: hard cuts
    ("word " * 500 + "x" * 3000 + " ", 100),      # long tokens between spaces
    (". ", 500_000),                              # nothing but sentence ends
], ids=["one-token", "long-tokens", "sentence-ends"])
def test_pieces_are_bounded_and_lose_nothing(unit, n):
    text = unit * n
    got = list(pieces(text, 4000))
    assert "".join(got) == text and all(0 < len(p) <= 4000 for p in got)


def test_split_chars_below_one_is_one_line(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"texts": ["A cat."]}])
    cfg = BuildConfig(stage="extract", work_dir=str(tmp_path / "work"), progress=False)
    cfg.input.paths = [str(path)]
    cfg.sentence_filter.split_chars = 0
    with pytest.raises(StageError, match="sentence_filter.split_chars must be at least 1, got 0"):
        documents.run(cfg, None)


# ---- the URL rule is linear; what it matches

@pytest.mark.parametrize("unit,n,reason", [("a-", 100_000, "too_many_words"), ("a.", 100_000, "too_many_words"),
                                            ("a.-", 70_000, "too_many_words"), ("-", 200_000, None)],
                         ids=["hyphens", "dots", "dots-hyphens", "dashes"])
def test_url_test_is_linear_on_long_tokens(unit, n, reason):
    # the quadratic pattern took 59 s on 48 KB of "a-a-..."; on these 200 KB it would take about 17 minutes
    token = unit * n + ("x" if unit == "-" else "")
    assert not has_url(token)
    assert quality_reason(f"a cat sat {token} here", CAT_OFF) == "too_long"
    assert quality_reason(f"a cat sat {token} here", SentenceFilterConfig(cat_rule="off", max_chars=10**6)) == reason


@pytest.mark.parametrize("text", [
    "a cat sits on https://x.org/cat mat", "see www.cats.com for a cat", "read more at example.com now",
    "images at cdn.example.co.uk/x?y=1 today", "Visit Example.COM today", "mail bob@my-shop.info please",
    "the site a-b.io/x", "host 10.0.0.1.de here", "(see news.bbc.co.uk)", "Müller.de is a shop", "site.com.",
    "ftp://files.server/path"])
def test_url_positive(text):
    assert has_url(text)


@pytest.mark.parametrize("text", [
    "the ratio is 3.5 to 1 overall", "e.g. this one", "the dot.community page", "U.S.A. is big", "no-dot-here",
    "comma,com and more", "a.b.c", "Mr. Com said", "-.com", "the shop.-.com", "version 2.0.1 of com tools"])
def test_url_negative(text):
    assert not has_url(text)


@pytest.mark.parametrize("n,reason", [(1000, None), (1001, "too_long")])
def test_sentences_over_max_chars_never_reach_the_parser(n, reason):
    text = "a b c " + "(" * (n - 6)  # spaCy's tokenizer is quadratic in such a run
    assert len(text) == n and quality_reason(text, SentenceFilterConfig(cat_rule="parser")) == reason
    assert quality_reason("a cat sat " + "x" * 30, SentenceFilterConfig(cat_rule="off", max_chars=30)) == "too_long"


# ---- wrongly typed fields: a counted malformed_row, the other rows kept

GOOD = {"texts": ["A red car is parked near the mill."], "images": [{"url": "http://x/a.png"}]}


@pytest.mark.parametrize("fmt,bad", [
    ("obelics", {"texts": [5, None], "images": [None, "http://x/a.png"]}),
    ("obelics", {"texts": [True, None], "images": [None, "http://x/a.png"]}),
    ("obelics", {"texts": ["A cat.", None], "images": [None, {"bytes": None, "path": None}],
                 "metadata": json.dumps([None, {"src": 12}])}),
    ("obelics", {"texts": ["A cat.", None], "images": [None, "http://x/a.png"], "metadata": '{"a": 1}'}),
    ("obelics", {"texts": ["A cat.", None], "images": [None, "http://x/a.png"], "metadata": "[" * 100_000}),
    ("local", {"texts": ["A cat."], "images": [{"bytes": 12}]}),
    ("local", {"texts": ["A cat."], "images": [{"url": 12}]}),
    ("local", {"texts": ["A cat."], "images": [{"path": ["x.png"]}]}),
    ("local", {"texts": ["A cat."], "images": "x.png"}),      # a string, not a list of entries
    ("local", {"texts": ["A cat."], "images": {"path": "x.png"}}),
    ("local", {"texts": ["A cat.", 5]}),
    ("mmc4", {"text_list": ["A cat.", 5], "image_info": []}),
    ("mmc4", {"text_list": ["A cat."], "image_info": [{"raw_url": 12}]}),
    ("mmc4", {"text_list": ["A cat."], "image_info": [{"raw_url": "http://x/a.png", "image_name": 7}]}),
    ("mmc4", {"text_list": ["A cat."], "image_info": {"raw_url": "http://x/a.png"}}),
    ("mmc4", {"text_list": "A cat.", "image_info": []}),
])
def test_wrongly_typed_fields_are_a_malformed_row(tmp_path, fmt, bad):
    good = {"obelics": {"texts": [GOOD["texts"][0], None], "images": [None, "http://x/a.png"]},
            "mmc4": {"text_list": GOOD["texts"], "image_info": [{"raw_url": "http://x/a.png"}]}}.get(fmt, GOOD)
    path = jsonl(tmp_path / "c.jsonl", [good, bad, good])
    counts, sentences, images = extract(tmp_path, fmt, path)
    assert (counts.n_in, counts.n_out, counts.dropped) == (3, 2, {"malformed_row": 1})
    assert sentences == GOOD["texts"] * 2
    assert [(r["doc_id"], r["url"]) for r in images] == [("doc-00000-000000", "http://x/a.png"),
                                                         ("doc-00000-000002", "http://x/a.png")]


def test_obelics_parquet_with_binary_texts_is_malformed(tmp_path):
    t = pa.table({"texts": pa.array([[b"A cat.", None], [None]], pa.list_(pa.binary())),
                  "images": pa.array([[None, "http://x/a.png"], ["http://x/b.png"]], pa.list_(pa.string()))})
    pq.write_table(t, tmp_path / "o.parquet")
    counts, sentences, images = extract(tmp_path, "obelics", tmp_path / "o.parquet")
    assert (counts.n_in, counts.n_out, counts.dropped) == (2, 1, {"malformed_row": 1})
    assert sentences == [] and [r["url"] for r in images] == ["http://x/b.png"]


def test_json_the_parser_cannot_take_is_a_malformed_row(tmp_path):
    too_deep, too_long_int = "[" * 100_000, '{"texts": ["A cat."], "n": ' + "1" * 5000 + "}"
    path = jsonl(tmp_path / "c.jsonl", [GOOD], raw_lines=[too_deep, too_long_int])
    counts, sentences, _ = extract(tmp_path, "local", path)
    assert (counts.n_in, counts.n_out, counts.dropped) == (3, 1, {"malformed_row": 2})
    assert sentences == GOOD["texts"]


# ---- text that cannot be written as UTF-8

def test_lone_surrogates_from_json_escapes_are_not_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"texts": ["A cat \\ud800 sat."]}\n'
                    + '{"texts": ["A cat."], "images": [{"url": "http://x/\\udc00.png"}]}\n' + json.dumps(GOOD) + "\n")
    counts, sentences, images = extract(tmp_path, "local", path)
    assert (counts.n_in, counts.n_out, counts.dropped) == (4, 2, {"not_utf8": 2})
    assert sentences == GOOD["texts"] * 2 and len(images) == 2


def test_invalid_utf8_in_a_parquet_string_is_not_utf8_for_that_row_only(tmp_path):
    texts = pa.array([[b"A red car."], [b"caf\xe9 au lait"], [b"A blue bus."]], pa.list_(pa.binary()))
    t = pa.table({"texts": texts.cast(pa.list_(pa.string()), safe=False)})  # arrow does not validate the bytes
    pq.write_table(t, tmp_path / "l.parquet")
    items = list(read_documents("local", tmp_path / "l.parquet", batch_rows=8))
    assert items == [Document(texts=["A red car."]), BadRow("not_utf8"), Document(texts=["A blue bus."])]


def test_mmc4_image_name_too_long_for_the_file_system_falls_back_to_its_url(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"text_list": ["A cat."],
                                          "image_info": [{"raw_url": "http://x/a.png", "image_name": "n" * 5000}]}])
    (item,) = read_documents("mmc4", path, image_root=str(tmp_path))
    assert item.images[0].url == "http://x/a.png" and item.images[0].path is None
