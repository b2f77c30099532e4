"""fit-rewriter: LoRA fine-tuning of a tiny chat LM on an instruction jsonl lowers the target loss, saves a peft
adapter, and the syn_text stage loads that adapter (its outputs become the trained answer)."""
import json

from generate_support import (
    image_stage,
    retrieval_stage,
    stage3_overrides,
    stage_rows,
    tiny_captioner,
    tiny_chat_lm,
    word_tokenizer,
)
from realsyn_pl.cli import main
from realsyn_pl.models.prompt import RewriteInput, render_chat
from realsyn_pl.models.rewriter_sft import IGNORE, load_examples

TARGET = "one man rides his red bicycle down busy city streets"  # no repeated word: easy to memorise


def _instructions(path, n=8, other=True):
    lines = []
    for k in range(n):
        lines.append(json.dumps({"id": str(k), "raw_caption": f"a man riding a red bike on street number {k}",
                                 "synthetic_caption": "a man on a bike", "tags": ["bike", "street"],
                                 "target": TARGET}))
    lines += ["{not json", json.dumps({"raw_caption": "x y z", "synthetic_caption": "y", "tags": "a, b"})]
    if other:  # the other field spellings (what make-instructions reads from build records)
        lines.append(json.dumps({"text1": "a dog in the park", "caption": "a dog", "tags": "dog, park",
                                 "target": "a dog"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_examples_mask_the_prompt_and_accept_both_field_spellings(tmp_path):
    tok = word_tokenizer()
    data = load_examples(_instructions(tmp_path / "i.jsonl"), tok, max_length=512)
    assert len(data.examples) == 9 and data.skipped == {"bad_json": 1, "no_target": 1}
    e = data.examples[-1]
    prompt = tok(render_chat(tok, RewriteInput("a dog in the park", "a dog", ["dog", "park"])),
                 add_special_tokens=False)["input_ids"]
    assert e.input_ids[:len(prompt)] == prompt and e.labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert e.labels[len(prompt):] == tok("a dog", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert load_examples(tmp_path / "i.jsonl", tok, max_length=20).skipped["too_long"] == 9


def test_lora_fit_lowers_loss_and_the_rewriter_loads_the_adapter(tmp_path):
    lm = tiny_chat_lm(tmp_path / "lm", extra_texts=[TARGET])
    # the realistic flow: instructions made from the build's own records (text1 + caption + tags) -> fit -> rewrite
    work = tmp_path / "w"
    ids = image_stage(work, 1, 3)
    retrieval_stage(work, {0: ids})
    ov = stage3_overrides(work, tiny_captioner(tmp_path / "cap"), lm, **{"rewrite.max_new_tokens": 16})
    assert main(["build", "caption"] + ov) == 0 and main(["build", "tag"] + ov) == 0
    caps = {r["id"]: r["caption"] for r in stage_rows(work, "caption", "captions")}
    tags = {r["id"]: r["tags"] for r in stage_rows(work, "tag", "tags")}
    data = tmp_path / "i.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text1": f"a man riding a red bike on street number {k}",
                                        "caption": caps[i], "tags": tags[i], "target": TARGET}) + "\n"
                            for k, i in enumerate(ids) for _ in range(3)) + "{cut\n")
    out = tmp_path / "fit"
    args = ["fit-rewriter", f"model={lm}", f"data={data}", f"output_dir={out}", "accelerator=cpu", "devices=1",
            "progress=false", "epochs=40", "batch_size=3", "lr=0.01", "lora.r=8", "lora.dropout=0.0",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    assert main(args) == 0
    report = json.loads((out / "fit_rewriter.json").read_text())
    assert report["loss_after"] < 0.5 * report["loss_before"], report
    assert report["skipped"] == {"bad_json": 1} and report["examples"] == 9
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert not (adapter / "model.safetensors").exists()  # an adapter, not a full copy of the model

    assert main(["build", "syn_text"] + ov + [f"rewrite.adapter={adapter}"]) == 0
    rows = stage_rows(work, "syn_text", "images")
    assert len(rows) == 3
    for r in rows:
        meta = json.loads(r["syn_meta"])
        assert meta["adapter"] == str(adapter) and meta["finish"] == "eos", (r, report)
        assert meta["zero_shot"] is False  # a fine-tuned adapter
        assert r["syn_text"] == TARGET


def test_full_fine_tuning_saves_a_model_the_rewriter_loads(tmp_path):
    from realsyn_pl.models.rewriter import load_causal_lm

    lm = tiny_chat_lm(tmp_path / "lm", extra_texts=[TARGET])
    out = tmp_path / "full"
    assert main(["fit-rewriter", f"model={lm}", f"data={_instructions(tmp_path / 'i.jsonl', n=4)}",
                 f"output_dir={out}", "method=full", "accelerator=cpu", "devices=1", "progress=false", "epochs=5",
                 "batch_size=4", "lr=0.001"]) == 0
    report = json.loads((out / "fit_rewriter.json").read_text())
    assert report["method"] == "full" and report["loss_after"] < report["loss_before"]
    bundle = load_causal_lm(str(out / "model"))
    assert bundle.tokenizer.chat_template and bundle.tokenizer.padding_side == "left"
    assert main(["fit-rewriter", f"model={lm}", f"data={tmp_path / 'i.jsonl'}", "method=qlora"]) == 2
