"""Stage 3 tagger: planted geometry returns the planted tags; vocabulary files; tag mining from the sentence pool;
the tag stage on one Ray actor or two, and kill/resume."""
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from generate_support import (
    IMAGE_ROWS,
    image_stage,
    kill_when_shards_done,
    stage3_overrides,
    stage_rows,
)
from realsyn_pl.cli import main
from realsyn_pl.config import load_config, to_object
from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.predict import PredictJob
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.stage import Counts, Stage
from realsyn_pl.construct.generate.tag import TagTask, confident_tags
from realsyn_pl.models.tagger import read_vocab, select_tags, tag_text_embeddings
from support import write_stage

PLANTED_TAGS = ["zebra", "lighthouse", "violin", "cactus", "anchor", "pizza", "kite", "owl"]
TEMPLATES = ["a photo of a {}.", "a picture of {}."]
STRIPE = 4  # an image is 8 vertical stripes of 4 px: stripe k bright <=> tag k planted


class WordTokenizer:
    def __init__(self, texts):
        self.vocab = {"<pad>": 0}
        for t in texts:
            for w in re.findall(r"\w+", t.lower()):
                self.vocab.setdefault(w, len(self.vocab))

    def __call__(self, texts):
        rows = [[self.vocab[w] for w in re.findall(r"\w+", t.lower())] for t in texts]
        out = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
        for j, r in enumerate(rows):
            out[j, :len(r)] = torch.tensor(r)
        return out


class PlantedClip(torch.nn.Module):
    """Text: sum of fixed random word vectors (64-d, nearly orthogonal tags). Image: the stripe brightnesses weight
    the tags' own text embeddings, so an image with stripes {a, b} embeds at t_a + t_b -- planted geometry."""

    def __init__(self, tokenizer: WordTokenizer):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.words = torch.nn.Embedding(len(tokenizer.vocab), 64, padding_idx=0)
        with torch.no_grad():
            self.words.weight.copy_(torch.randn(len(tokenizer.vocab), 64, generator=g))
            self.words.weight[0] = 0
            # template words ("a photo of") are shared by every prompt: keep them small so the tag word decides
            tag_ids = [tokenizer.vocab[t] for t in PLANTED_TAGS]
            scale = torch.full((len(tokenizer.vocab), 1), 0.05)
            scale[tag_ids] = 1.0
            self.words.weight.mul_(scale)
        self.register_buffer("tag_matrix", torch.zeros(len(PLANTED_TAGS), 64))

    def encode_text(self, tokens):
        return self.words(tokens).sum(1)

    def encode_image(self, images):
        stripes = images[:, 0].mean(1).view(len(images), len(PLANTED_TAGS), STRIPE).mean(-1)  # (n, 8) in [0, 1]
        return stripes @ self.tag_matrix


@dataclass
class Bundle:
    model: Any
    tokenizer: Any
    preprocess_val: Any


def planted_bundle() -> Bundle:
    from torchvision.transforms import ToTensor

    tok = WordTokenizer([t.format(tag) for tag in PLANTED_TAGS for t in TEMPLATES])
    model = PlantedClip(tok)
    with torch.no_grad():
        model.tag_matrix.copy_(tag_text_embeddings(model.encode_text, tok, PLANTED_TAGS, TEMPLATES,
                                                   torch.device("cpu")))
    return Bundle(model, tok, ToTensor())


def stripes_png(planted: list[int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 20, (32, 32, 3)).astype(np.uint8)  # a little noise
    for k in planted:
        img[:, k * STRIPE:(k + 1) * STRIPE, 0] = 235 + rng.integers(0, 20)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def here():
    """The executor in this process: what the tagger computes (its Ray actors are test_tag_stage_on_two_actors_...)."""
    from realsyn_pl.construct.engine.config import RayConfig
    from realsyn_pl.construct.engine.executor import Executor

    return Executor(RayConfig(in_process=True), progress=False)


def test_tagger_on_planted_geometry_returns_the_planted_tags(tmp_path, here):
    work = tmp_path / "w"
    plants = {f"img-{j}": sorted({j % 8, (3 * j + 1) % 8}) for j in range(12)}
    stage = Stage(work, "dedup_images", {})

    def shard(i):
        rows = [{"id": k, "bytes": stripes_png(v, j), "path": None} for j, (k, v) in enumerate(plants.items())
                if j % 2 == i]
        write_records(stage.path("images", i), rows, IMAGE_ROWS)
        c = Counts()
        c.keep(len(rows))
        return c
    write_stage(stage, range(2), shard)
    ov = stage3_overrides(work, **{"tag.threshold": 0.5, "tag.top_n": 5, "tag.templates": json.dumps(TEMPLATES)})
    cfg = to_object(load_config(BuildConfig, [], ov))
    task = TagTask(cfg, bundle=planted_bundle(), tags=PLANTED_TAGS)
    assert run_predict_task(PredictJob.of(task), here, work, cfg.trainer)
    rows = {r["id"]: r for r in stage_rows(work, "tag", "tags")}
    assert set(rows) == set(plants)
    for k, planted in plants.items():
        assert sorted(rows[k]["tags"]) == sorted(PLANTED_TAGS[i] for i in planted), (k, rows[k])
        assert rows[k]["tag_scores"] == sorted(rows[k]["tag_scores"], reverse=True)


def test_select_tags_threshold_and_top_n():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.0, 0.0, 0.0, 0.0]])
    tags, vals = select_tags(scores, ["a", "b", "c", "d"], threshold=0.4, top_n=2)
    assert tags == [["b", "d"], []] and vals[0] == pytest.approx([0.9, 0.7])


def test_confident_tags_keep_the_tags_above_the_first_clear_drop():
    tags = ["a", "b", "c", "d"]
    assert confident_tags(tags, [0.9, 0.5, 0.45, 0.4], 0.0, 0.1, 3) == (["a"], [0.9])
    assert confident_tags(tags, [0.9, 0.88, 0.5, 0.45], 0.0, 0.1, 3) == (["a", "b"], [0.9, 0.88])
    assert confident_tags(tags, [0.9, 0.85, 0.8, 0.75], 0.0, 0.1, 3) == ([], [])  # no tag stands out
    assert confident_tags(tags, [0.9, 0.85, 0.8, 0.6], 0.0, 0.1, 2) == ([], [])  # the drop comes after top_n
    assert confident_tags(tags, [0.9, 0.85, 0.8, 0.6], 0.0, 0.1, 3) == (["a", "b", "c"], [0.9, 0.85, 0.8])
    assert confident_tags(tags, [0.9, 0.3, 0.1, 0.0], 0.5, 0.1, 3) == (["a"], [0.9])  # the threshold still applies
    assert confident_tags(tags[:1], [0.9], 0.0, 0.1, 3) == ([], [])  # nothing to compare with


def test_tag_select_margin_on_planted_geometry_keeps_only_the_clear_tags(tmp_path, here):
    work = tmp_path / "w"
    # one bright stripe, two, none (noise: every tag scores alike)
    plants = {"one": [2], "two": [1, 5], "none": []}
    stage = Stage(work, "dedup_images", {})

    def shard(i):
        write_records(stage.path("images", i),
                      [{"id": k, "bytes": stripes_png(v, j), "path": None} for j, (k, v) in enumerate(plants.items())],
                      IMAGE_ROWS)
        c = Counts()
        c.keep(len(plants))
        return c
    write_stage(stage, range(1), shard)
    ov = stage3_overrides(work, **{"tag.top_n": 3, "tag.templates": json.dumps(TEMPLATES)})
    for select, want in (("top_n", {"one": 3, "two": 3, "none": 3}), ("margin", {"one": 1, "two": 2, "none": 0})):
        cfg = to_object(load_config(BuildConfig, [], ov + [f"tag.select={select}", "tag.margin=0.2", "force=true"]))
        assert run_predict_task(PredictJob.of(TagTask(cfg, bundle=planted_bundle(), tags=PLANTED_TAGS)), here, work,
                                cfg.trainer, force=True)
        rows = {r["id"]: r for r in stage_rows(work, "tag", "tags")}
        assert {k: len(r["tags"]) for k, r in rows.items()} == want, (select, rows)
        if select == "margin":
            assert rows["one"]["tags"] == ["violin"] and sorted(rows["two"]["tags"]) == ["lighthouse", "pizza"]
            produced = json.loads((work / "tag" / "manifest.json").read_text())["counts"]["produced"]
            assert produced == {"no_confident_tags": 1, "no_tags": 1}


def test_unknown_tag_select_is_a_one_line_error(tmp_path, capsys):
    assert main(["build", "tag", *stage3_overrides(tmp_path / "w"), "tag.select=best"]) != 0
    err = capsys.readouterr().err
    assert "tag.select must be one of top_n, margin" in err and "Traceback" not in err


def test_builtin_vocabulary_is_shipped_and_clean():
    tags = read_vocab("builtin:general")
    assert len(tags) >= 1000 and len({t.lower() for t in tags}) == len(tags)
    assert "dog" in tags and "traffic light" in tags and all(t == t.strip() and "#" not in t for t in tags)


SENTS = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string())])


def _sentences(work, texts_by_shard):
    stage = Stage(work, "dedup_sentences", {})

    def shard(i):
        rows = [{"id": f"doc-{i:05d}-000000/s-{k}", "doc_id": "d", "text": t} for k, t in enumerate(texts_by_shard[i])]
        write_records(stage.path("sentences", i), rows, SENTS)
        c = Counts()
        c.keep(len(rows))
        return c
    write_stage(stage, range(len(texts_by_shard)), shard)


def test_mine_tags_finds_frequent_noun_phrases_and_feeds_the_tagger(tmp_path):
    work = tmp_path / "w"
    texts = (["A man riding a vintage tractor on the farm."] * 4 + ["Two tractors parked near the old barn."] * 3
             + ["Light through the stained glass window at sunset."] * 3 + ["It is very good and we like it."] * 5 + ["A gazebo."] * 2)
    _sentences(work, [texts[:8], texts[8:]])
    ov = [f"work_dir={work}", "progress=false", "mine_tags.min_count=3", "mine_tags.top_k=50"]
    assert main(["build", "mine_tags"] + ov + ["mine_tags.exclude_general=false"]) == 0
    mined = read_vocab(work / "mine_tags" / "tags.txt")
    assert mined[0] == "tractor"  # 4 + 3 ("tractors" folds into "tractor")
    assert {"vintage tractor", "farm", "window", "glass window", "sunset"} <= set(mined)
    assert not {"good", "it", "like", "gazebo"} & set(mined)  # adjectives, pronouns, verbs, rare (2 < min_count)
    for parts in (1, 7):  # the hash-partitioned reduce: a plural meets its singular, the same tags in the same order
        assert main(["build", "mine_tags", "force=true", f"mine_tags.partitions={parts}"] + ov
                    + ["mine_tags.exclude_general=false"]) == 0
        assert read_vocab(work / "mine_tags" / "tags.txt") == mined, parts
    assert main(["build", "mine_tags", "force=true"] + ov) == 0  # default: tags of the general list are not re-added
    mined = read_vocab(work / "mine_tags" / "tags.txt")
    assert {"vintage tractor", "glass window"} <= set(mined) and not {"tractor", "window", "farm"} & set(mined)
    m = json.loads((work / "mine_tags" / "manifest.json").read_text())
    assert m["counts"]["n_in"] == len(texts) and m["num_tags"] == len(mined)
    # the tag stage's vocabulary = general list + mined tags
    image_stage(work, 1, 2)
    assert main(["build", "tag"] + stage3_overrides(work, **{"tag.use_mined": "true"})) == 0
    vocab_size = json.loads((work / "tag" / "manifest.json").read_text())["config"]["vocab_size"]
    assert vocab_size == len(read_vocab("builtin:general")) + len(mined)


def test_use_mined_without_mine_tags_is_a_one_line_error(tmp_path, capsys):
    image_stage(tmp_path / "w", 1, 2)
    assert main(["build", "tag"] + stage3_overrides(tmp_path / "w", **{"tag.use_mined": "true"})) == 2
    assert "mine_tags" in capsys.readouterr().err


@pytest.mark.slow
def test_tag_stage_on_two_actors_equals_a_killed_and_resumed_one_actor_run(tmp_path):
    """Every readable image tagged once, the undecodable one a counted drop; two actors and a run killed after 2
    shards then resumed on one actor give the same tags."""
    bad = "doc-00002-000001/img-0"
    results = {}
    for name in ("two", "killed"):
        work = tmp_path / name
        ids = image_stage(work, 12, 2, bad={bad: b"junk"})
        ov = stage3_overrides(work, **{"tag.batch_size": 1, "ray.in_process": "false"})
        if name == "two":
            assert main(["predict", "tag"] + ov + ["ray.max_actors=2"]) == 0
        else:
            assert kill_when_shards_done(["predict", "tag"] + ov, work / "tag" / "_done", 2) < 12
            assert main(["predict", "tag"] + ov) == 0
        rows = stage_rows(work, "tag", "tags")
        assert sorted(r["id"] for r in rows) == sorted(set(ids) - {bad})
        counts = json.loads((work / "tag" / "manifest.json").read_text())["counts"]
        assert counts["n_in"] == len(ids) and sum(counts["dropped"].values()) == 1, counts
        results[name] = {r["id"]: (r["tags"], r["tag_scores"]) for r in rows}
    assert results["two"].keys() == results["killed"].keys()
    for k, (tags, scores) in results["two"].items():
        assert results["killed"][k][0] == tags and np.allclose(results["killed"][k][1], scores, atol=1e-5)


def _filtered_images(work, shards=2, per=5, bad=()):
    """A completed image_filter stage (FILTERED_IMAGES records, the embed_images input); `bad` ids get junk bytes."""
    import hashlib

    from generate_support import image_id, png_bytes
    from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES

    stage = Stage(work, "image_filter", {"test": "images"})

    def shard(i):
        rows = []
        for j in range(per):
            iid = image_id(i, j)
            data = b"junk" if iid in bad else png_bytes(i * 100 + j)
            rows.append({"id": iid, "doc_id": iid.split("/")[0], "url": None, "path": None, "bytes": data,
                         "width": 40, "height": 40, "sha256": hashlib.sha256(data).hexdigest()})
        write_records(stage.path("images", i), rows, FILTERED_IMAGES)
        c = Counts()
        c.keep(len(rows))
        return c
    write_stage(stage, range(shards), shard)


@pytest.mark.parametrize("image_stage", ["dedup_images", "image_filter"])
def test_tagger_reuses_stored_embeddings_and_tags_equal_the_reencoding_path(tmp_path, image_stage):
    import shutil

    bad = {"doc-00001-000002/img-0"}
    base = tmp_path / "base"
    _filtered_images(base, bad=bad)
    ov = stage3_overrides(base, **{"embed.dtype": "float32", "embed.batch_size": 3, "embed.workers": 0,
                                   "dedup.semantic": "false", "tag.image_stage": image_stage, "tag.top_n": 5})
    assert main(["build", "embed_images"] + ov) == 0 and main(["build", "dedup_images"] + ov) == 0
    runs = {}
    for path in ("stored", "encoded"):
        work = tmp_path / path
        shutil.copytree(base, work)
        extra = [f"work_dir={work}"] + (["tag.reuse_embeddings=false"] if path == "encoded" else [])
        assert main(["build", "tag"] + ov + extra) == 0
        m = json.loads((work / "tag" / "manifest.json").read_text())
        assert m["config"]["image_embeddings"]["path"] == path
        runs[path] = ({r["id"]: r for r in stage_rows(work, "tag", "tags")}, m["counts"])
    (stored, c_stored), (encoded, c_encoded) = runs["stored"], runs["encoded"]
    if image_stage == "dedup_images":  # the junk image was dropped by embed_images, so it is not an input here
        assert c_stored == c_encoded and c_stored["dropped"] == {}
        assert json.loads((tmp_path / "stored" / "tag" / "manifest.json").read_text())["config"][
            "image_embeddings"]["source"] == "dedup_images/emb"
    else:  # image_filter still has it: the stored path has no embedding for it, the encoding path cannot decode it
        assert c_stored["dropped"] == {"no_embedding": 1} and c_encoded["dropped"] == {"decode_error": 1}
    assert set(stored) == set(encoded) and len(stored) == 9 and not bad & set(stored)
    for i, r in stored.items():
        assert r["tags"] == encoded[i]["tags"] and len(r["tags"]) == 5
        assert np.allclose(r["tag_scores"], encoded[i]["tag_scores"], atol=1e-5)


def test_tagger_encodes_images_when_the_stored_embeddings_are_another_models(tmp_path):
    work = tmp_path / "w"
    _filtered_images(work, shards=1, per=3)
    ov = stage3_overrides(work, **{"embed.dtype": "float32", "embed.workers": 0, "dedup.semantic": "false"})
    assert main(["build", "embed_images"] + ov) == 0 and main(["build", "dedup_images"] + ov) == 0
    assert main(["build", "tag"] + ov + ["seed=1"]) == 0  # a random-init model with another seed: another model
    src = json.loads((work / "tag" / "manifest.json").read_text())["config"]["image_embeddings"]
    assert src["path"] == "encoded" and "another model" in src["reason"]
