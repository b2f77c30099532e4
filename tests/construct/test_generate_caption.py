"""Stage 3 captioner: a tiny ViT+GPT-2 image-to-text model loaded by local path through the users' code path;
batched generation with config decoding settings; every id once on one Ray actor or two, kill/resume."""
import json

import pytest
import torch

from generate_support import (
    image_id,
    image_stage,
    kill_when_shards_done,
    stage3_overrides,
    stage_rows,
    tiny_captioner,
)
from realsyn_pl.cli import main
from realsyn_pl.models.captioner import Captioner, generation_kwargs, load_captioner, strip_prompt


def test_caption_stage_every_id_once_and_counted_drops(tmp_path):
    cap = tiny_captioner(tmp_path / "cap")
    work = tmp_path / "w"
    ids = image_stage(work, 3, 4, bad={image_id(0, 1): b"garbage", image_id(2, 3): b""})
    ov = stage3_overrides(work, cap, **{"caption.max_new_tokens": 5})
    assert main(["predict", "caption"] + ov) == 0
    rows = stage_rows(work, "caption", "captions")
    got = [r["id"] for r in rows]
    assert sorted(got) == sorted(set(ids) - {image_id(0, 1), image_id(2, 3)}) and len(got) == len(set(got))
    m = json.loads((work / "caption" / "manifest.json").read_text())
    assert m["counts"]["dropped"] == {"decode_error": 1, "no_image_data": 1} and m["counts"]["n_in"] == 12
    assert all(0 < len(r["caption"].split()) <= 5 for r in rows)
    # a rerun with the same config is a no-op; another decoding config is refused, not mixed in
    assert main(["predict", "caption"] + ov) == 0
    assert main(["predict", "caption"] + ov + ["caption.num_beams=2"]) == 2


def test_batched_generation_equals_one_by_one(tmp_path):
    import numpy as np
    from PIL import Image

    bundle = load_captioner(str(tiny_captioner(tmp_path / "cap")))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
              for i in range(5)]
    pix = bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]

    class Dec:  # the decoding section of the config
        max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty = 6, 0, 2, \
            False, 1.0, 1.0, 1.0
    module = Captioner(bundle, generation_kwargs(Dec, bundle.tokenizer.pad_token_id))
    with torch.no_grad():
        batched = module.infer(pix)["caption"]
        alone = [module.infer(pix[i:i + 1])["caption"][0] for i in range(5)]
    assert batched == alone and all(batched)


def test_strip_prompt():
    assert strip_prompt("a picture of  a dog on a couch", "a picture of") == "a dog on a couch"
    assert strip_prompt("two dogs", "a picture of") == "two dogs"


def test_unloadable_model_is_a_one_line_error(tmp_path, capsys):
    work = tmp_path / "w"
    image_stage(work, 1, 2)
    assert main(["predict", "caption"] + stage3_overrides(work, tmp_path / "nowhere")) == 2
    assert "caption.model" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_on_two_actors_equals_a_killed_and_resumed_one_actor_run(tmp_path):
    """Two actors take the shards as they free up; a run killed after 2 shards and resumed on one actor writes the
    same captions for every id, once."""
    cap = tiny_captioner(tmp_path / "cap")
    two, killed = tmp_path / "two", tmp_path / "killed"
    for work in (two, killed):
        ids = image_stage(work, 12, 2)
    on_ray = {"caption.batch_size": 1, "caption.max_new_tokens": 20, "ray.in_process": "false"}
    ov = {w: stage3_overrides(w, cap, **on_ray) for w in (two, killed)}
    assert main(["predict", "caption"] + ov[two] + ["ray.max_actors=2"]) == 0
    assert kill_when_shards_done(["predict", "caption"] + ov[killed], killed / "caption" / "_done", 2) < 12
    assert main(["predict", "caption"] + ov[killed]) == 0
    rows = stage_rows(killed, "caption", "captions")
    assert sorted(r["id"] for r in rows) == sorted(ids) and rows == stage_rows(two, "caption", "captions")


def test_blip_captioner_with_a_conditioning_prompt(tmp_path):
    from generate_support import tiny_blip

    cap = tiny_blip(tmp_path / "blip")
    outs = {}
    for prompt in (None, "a picture of"):
        work = tmp_path / f"w{prompt is None}"
        ids = image_stage(work, 2, 3)
        extra = {"caption.prompt": f"'{prompt}'"} if prompt else {}
        assert main(["predict", "caption"] + stage3_overrides(work, cap, **extra)) == 0
        rows = stage_rows(work, "caption", "captions")
        assert sorted(r["id"] for r in rows) == sorted(ids)
        outs[prompt] = {r["id"]: r["caption"] for r in rows}
    assert outs[None] != outs["a picture of"]  # the prefix conditions the decoder
    assert not any(c.startswith("a picture of") for c in outs["a picture of"].values())  # and is stripped
