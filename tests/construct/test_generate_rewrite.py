"""Stage 3 rewriter: the paper's prompt (golden), output cleaning, the syn_text stage (hf and template backends),
joins by image id, counted drops, one actor or two, kill/resume."""
import json
import shutil

import pytest

from generate_support import (
    image_id,
    image_stage,
    kill_when_shards_done,
    retrieval_stage,
    stage3_overrides,
    stage_rows,
    tiny_captioner,
    tiny_chat_lm,
    word_tokenizer,
)
from realsyn_pl.cli import main
from realsyn_pl.models.prompt import RewriteInput, clean_output, render_chat, render_prompt, template_merge

# App. A.2 of arXiv 2502.12513, typed from the paper (line breaks joined), slots filled by hand.
GOLDEN = (
    "Please merge the information from the given raw text and the synthetic caption with the help of the highly "
    "relevant detection tags. The raw caption offers detailed real-world information, yet it suffers from flaws in "
    "sentence structure and grammar. The synthetic caption exhibits impeccable sentence structure but often lacks "
    "in-depth realworld details and may contain false information. The highly relevant detection tags are provided "
    "to enrich the semantic information of the raw caption, while some are redundant and noisy. You are a great "
    "information integration and summary expert, you are also good at enriching semantic information. Ensure a "
    "well-structured sentence while retaining the detailed real-world information provided in the raw caption. "
    "Avoid simply concatenating the sentences and avoid adding external information to describe. Correct and "
    "simplify sentences finally. Raw caption:the 2019 tour de france peloton climbs the col du tourmalet, "
    "synthetic caption:a group of cyclists riding up a mountain road, and highly relevant detection tags:bicycle, "
    "cyclist, mountain, road"
)
RECORD = RewriteInput("the 2019 tour de france peloton climbs the col du tourmalet",
                      "a group of cyclists riding up a mountain road", ["bicycle", "cyclist", "mountain", "road"])


def test_prompt_golden():
    assert render_prompt(RECORD) == GOLDEN


def test_prompt_in_chat_template_and_slot_text_not_resubstituted():
    tok = word_tokenizer()
    chat = render_chat(tok, RECORD, system_prompt="be brief")
    assert chat == f"<|system|> be brief <|end|> <|user|> {GOLDEN} <|end|> <|assistant|>"
    tricky = RewriteInput("raw <synthetic caption> text", "cap <detection tags>", ["t"])
    out = render_prompt(tricky)
    assert "Raw caption:raw <synthetic caption> text, synthetic caption:cap <detection tags>, and highly " \
           "relevant detection tags:t" in out


@pytest.mark.parametrize("raw,text,reason,edit", [
    ('Here is the merged caption: "A cyclist climbs the Col du Tourmalet."', "A cyclist climbs the Col du Tourmalet.",
     None, "preamble"),
    ("Sure! Merged caption: Riders climb a steep road.\n\nThis merges the raw caption and tags.",
     "Riders climb a steep road.", None, "extra_paragraphs"),
    ('"Riders climb a steep mountain road."', "Riders climb a steep mountain road.", None, "quotes"),
    ("   ", None, "empty", None),
    ("Two riders.", None, "too_short", None),
    (" ".join(["word"] * 80), None, "too_long", None),
    ("Raw caption: riders, synthetic caption: road", None, "prompt_echo", None),
])
def test_clean_output(raw, text, reason, edit):
    c = clean_output(raw, min_words=3, max_words=77)
    assert c.text == text and c.reason == reason
    if edit:
        assert edit in c.edits


def test_template_merge_is_deterministic_and_marked_by_stage(tmp_path):
    x = RewriteInput("the peloton climbs the col du tourmalet", "a group of cyclists on a road",
                     ["bicycle", "road", "mountain"])
    assert template_merge(x) == "A group of cyclists on a road, the peloton climbs the col du tourmalet, " \
                                "with bicycle and mountain."
    work = tmp_path / "w"
    cap = tiny_captioner(tmp_path / "cap")
    ids = image_stage(work, 2, 3)
    retrieval_stage(work, {0: ids[:3], 1: ids[3:]})
    ov = stage3_overrides(work, cap)
    assert main(["build", "caption"] + ov) == 0
    assert main(["build", "tag"] + ov) == 0
    assert main(["predict", "rewrite"] + ov + ["rewrite.backend=template"]) == 0
    rows = stage_rows(work, "syn_text", "images")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for r in rows:
        meta = json.loads(r["syn_meta"])
        assert meta["backend"] == "template" and meta["model"] is None
        assert r["syn_text"] == template_merge(RewriteInput(
            f"a man riding a red bike on street number {ids.index(r['id']) % 3}", r["caption"], r["tags"]))


def _prepared(tmp_path, name, shards=3, per=4, bad=None):
    work = tmp_path / name
    ids = image_stage(work, shards, per, bad=bad)
    by_shard = {i: [x for x in ids if x.startswith(f"doc-{i:05d}")] for i in range(shards)}
    retrieval_stage(work, by_shard)
    return work, ids


def test_syn_text_stage_hf_joins_by_id_and_counts_drops(tmp_path):
    cap, lm = tiny_captioner(tmp_path / "cap"), tiny_chat_lm(tmp_path / "lm")
    work, ids = _prepared(tmp_path, "w", bad={image_id(1, 2): b"not an image"})
    # retrieval shards laid out differently from the image shards: the join must still find every caption
    import shutil

    from realsyn_pl.construct.engine.stage import Stage
    shutil.rmtree(work / "retrieve")
    retrieval_stage(work, {0: ids[6:], 1: ids[:6]})
    ov = stage3_overrides(work, cap, lm, **{"rewrite.on_reject": "drop", "rewrite.min_words": 1})
    for st in ("caption", "tag", "syn_text"):
        assert main(["build", st] + ov) == 0
    rows = stage_rows(work, "syn_text", "images")
    m = json.loads((work / "syn_text" / "manifest.json").read_text())["counts"]
    assert m["n_in"] == 12 and m["n_out"] == len(rows) and m["dropped"].get("no_caption") == 1
    assert m["n_in"] == m["n_out"] + sum(m["dropped"].values())
    assert len({r["id"] for r in rows}) == len(rows) and image_id(1, 2) not in {r["id"] for r in rows}
    caps = {r["id"]: r["caption"] for r in stage_rows(work, "caption", "captions")}
    tags = {r["id"]: r["tags"] for r in stage_rows(work, "tag", "tags")}
    for r in rows:
        assert r["caption"] == caps[r["id"]] and r["tags"] == tags[r["id"]][:10]
        meta = json.loads(r["syn_meta"])
        assert meta["backend"] == "hf" and meta["model"] == str(lm) and meta["finish"] in ("eos", "length")
        assert meta["zero_shot"] is True  # no adapter, allowed by rewrite.allow_zero_shot=true
        assert r["syn_text"] and r["syn_text"] == r["syn_text"].strip()
    config = Stage(work, "syn_text", {}).manifest()["config"]
    assert config["backend"] == "hf" and config["zero_shot"] is True


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_zero_shot_llm_rewrite_is_refused_before_loading_a_model(tmp_path, capsys, backend):
    work, _ = _prepared(tmp_path, "w", shards=1, per=2)
    # no model exists at this path: had it been loaded, the error would be another one
    ov = stage3_overrides(work, lm=tmp_path / "no-model-here", **{"rewrite.backend": backend})
    assert main(["build", "syn_text"] + ov + ["rewrite.allow_zero_shot=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rewrite.adapter" in err and "rewrite.allow_zero_shot=true" in err and len(err.splitlines()) == 1
    assert not (work / "syn_text").exists()


def test_paper_preset_refuses_its_zero_shot_default(tmp_path, capsys):
    from generate_support import ROOT

    work, _ = _prepared(tmp_path, "w", shards=1, per=2)
    assert main(["build", "syn_text", "--config", str(ROOT / "configs/build/paper_obelics.yaml"),
                 f"work_dir={work}"]) == 2
    err = capsys.readouterr().err
    assert "rewrite.adapter" in err and "rewrite.allow_zero_shot=true" in err and "Llama-3-8B" in err
    # `build all` refuses at once, before stage 1 has run (not days later when syn_text is reached)
    fresh = tmp_path / "fresh"
    assert main(["build", "all", "--config", str(ROOT / "configs/build/paper_obelics.yaml"), f"work_dir={fresh}",
                 f"input.paths=[{tmp_path / 'docs.parquet'}]"]) == 2
    assert "rewrite.allow_zero_shot=true" in capsys.readouterr().err and not fresh.exists()


def test_zero_shot_is_what_ran_and_a_full_fine_tune_is_not(tmp_path):
    from realsyn_pl.construct.generate.config import RewriteConfig
    from realsyn_pl.construct.generate.rewrite import zero_shot

    assert zero_shot(RewriteConfig(backend="hf")) and zero_shot(RewriteConfig(backend="vllm"))
    assert not zero_shot(RewriteConfig(backend="hf", adapter="runs/rewriter/adapter"))
    assert not zero_shot(RewriteConfig(backend="template"))
    full = tmp_path / "fit" / "model"
    full.mkdir(parents=True)
    (tmp_path / "fit" / "fit_rewriter.json").write_text(json.dumps({"method": "full"}))
    assert not zero_shot(RewriteConfig(backend="hf", model=str(full)))
    (tmp_path / "fit" / "fit_rewriter.json").write_text(json.dumps({"method": "lora"}))
    assert zero_shot(RewriteConfig(backend="hf", model=str(full)))


@pytest.mark.parametrize("zero", [True, False])
def test_card_says_when_syn_text_was_written_zero_shot(tmp_path, zero):
    from realsyn_pl.construct.engine.stage import Stage
    from realsyn_pl.construct.release.card import write_card
    from support import write_stage

    work = tmp_path / "w"
    write_stage(Stage(work, "syn_text", {"backend": "hf", "model": "some/llm", "zero_shot": zero}), [], lambda i: None)
    (tmp_path / "out").mkdir()
    card = write_card(work, tmp_path / "out", cap=None).read_text()
    assert ("syn_text was written zero-shot" in card and "some/llm" in card) is zero


def test_prompt_too_long_is_dropped_not_truncated(tmp_path):
    cap, lm = tiny_captioner(tmp_path / "cap"), tiny_chat_lm(tmp_path / "lm")
    work, ids = _prepared(tmp_path, "w", shards=1, per=3)
    ov = stage3_overrides(work, cap, lm, **{"rewrite.max_input_tokens": 20})
    for st in ("caption", "tag", "syn_text"):
        assert main(["build", st] + ov) == 0
    m = json.loads((work / "syn_text" / "manifest.json").read_text())["counts"]
    assert m["dropped"] == {"prompt_too_long": 3} and m["n_out"] == 0


def test_missing_inputs_and_vllm_without_vllm_are_one_line_errors(tmp_path, capsys):
    work, _ = _prepared(tmp_path, "w", shards=1, per=2)
    assert main(["build", "syn_text", f"work_dir={work}", "rewrite.backend=template"]) == 2
    assert "caption" in capsys.readouterr().err
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    from realsyn_pl.models.rewriter import VllmRewriter
    with pytest.raises(ImportError, match="realsyn_pl\\[vllm\\]"):
        VllmRewriter("m", None, None)


@pytest.mark.slow
@pytest.mark.slow
def test_syn_text_on_two_actors_equals_a_killed_and_resumed_one_actor_run(tmp_path):
    cap, lm = tiny_captioner(tmp_path / "cap"), tiny_chat_lm(tmp_path / "lm")
    two, killed = tmp_path / "two", tmp_path / "killed"
    _, ids = _prepared(tmp_path, "two", shards=12, per=3)
    on_ray = {"rewrite.on_reject": "template", "rewrite.batch_size": 1, "rewrite.max_new_tokens": 24,
              "ray.in_process": "false"}
    ov = {w: stage3_overrides(w, cap, lm, **on_ray) for w in (two, killed)}
    # the captions and tags it rewrites from, built once here (Ray settings are not part of a stage's config)
    for st in ("caption", "tag"):
        assert main(["build", st] + ov[two] + ["ray.in_process=true"]) == 0
    shutil.copytree(two, killed)
    assert main(["predict", "syn_text"] + ov[two] + ["ray.max_actors=2"]) == 0
    done = kill_when_shards_done(["predict", "syn_text"] + ov[killed], killed / "syn_text" / "_done", 2)
    assert done < 12 and not (killed / "syn_text" / "manifest.json").exists()
    assert main(["predict", "syn_text"] + ov[killed]) == 0
    rows = {w: stage_rows(w, "syn_text", "images") for w in (two, killed)}
    assert sorted(r["id"] for r in rows[two]) == sorted(ids)  # every id exactly once
    assert rows[two] == rows[killed]


def test_sampling_is_reproducible_with_loader_workers(tmp_path):
    cap, lm = tiny_captioner(tmp_path / "cap"), tiny_chat_lm(tmp_path / "lm")
    outs = []
    for name in ("a", "b"):
        work, ids = _prepared(tmp_path, name, shards=2, per=3)
        ov = stage3_overrides(work, cap, lm, **{"rewrite.do_sample": "true", "rewrite.temperature": 1.0,
                                                "rewrite.top_p": 1.0, "rewrite.workers": 1,
                                                "rewrite.on_reject": "template", "rewrite.use_tags": "false"})
        assert main(["build", "caption"] + ov) == 0 and main(["build", "syn_text"] + ov) == 0
        rows = stage_rows(work, "syn_text", "images")
        assert sorted(r["id"] for r in rows) == sorted(ids) and all(r["tags"] == [] for r in rows)
        outs.append(rows)
    assert outs[0] == outs[1]


def test_captions_off_rewrites_from_text1_and_tags_only(tmp_path):
    work = tmp_path / "w"
    ids = image_stage(work, 1, 3)
    retrieval_stage(work, {0: ids})
    ov = stage3_overrides(work, tmp_path / "no-captioner-here") + ["caption.enabled=false"]
    assert main(["build", "caption"] + ov) == 0
    assert not (work / "caption").exists()
    assert main(["build", "tag"] + ov) == 0
    assert main(["predict", "rewrite"] + ov + ["rewrite.backend=template"]) == 0
    rows = stage_rows(work, "syn_text", "images")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for r in rows:
        assert r["caption"] == ""
        assert r["syn_text"] == template_merge(RewriteInput(
            f"a man riding a red bike on street number {ids.index(r['id']) % 3}", "", r["tags"]))
    manifest = json.loads((work / "syn_text" / "manifest.json").read_text())
    assert manifest["config"]["captions"] is False
