"""Inputs for the stage-3 tests: tiny random-init captioner and chat LM saved like hub models, image and retrieval
record stages written through the stage framework, and the overrides that point a build at them."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.stage import Counts, Stage
from realsyn_pl.models.prompt import PAPER_PROMPT
from support import write_stage

WORDS = ("a man woman dog cat red blue green car bike street park beach riding walking holding sitting on in the of "
         "with and near two small large photo picture bright sunny day old new house tree water city").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def word_tokenizer(extra_texts=(), chat: bool = True):
    """A word-level tokenizer over a small vocabulary (prompt words + WORDS), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "[PAD]": 2, "<|user|>": 3, "<|assistant|>": 4, "<|system|>": 5,
             "<|end|>": 6}
    for text in [PAPER_PROMPT, " ".join(WORDS), *extra_texts]:
        for w in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower()):
            vocab.setdefault(w[0], len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]", pad_token="[PAD]",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_chat_lm(folder: Path, extra_texts=(), seed: int = 0) -> Path:
    """A random-init 2-layer LLaMA with the word-level chat tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(extra_texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=0, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_captioner(folder: Path, seed: int = 0) -> Path:
    """A random-init ViT encoder + GPT-2 decoder (VisionEncoderDecoderModel) with image processor and tokenizer."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    tok = word_tokenizer(chat=False)
    torch.manual_seed(seed)
    enc = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64))
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     add_cross_attention=True, bos_token_id=0, eos_token_id=0, pad_token_id=2))
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 2
    model.config.eos_token_id = 0
    model.generation_config.decoder_start_token_id = 0
    model.generation_config.pad_token_id = 2
    model.generation_config.eos_token_id = 0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def png_bytes(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGE_ROWS = pa.schema([("id", pa.string()), ("bytes", pa.binary()), ("path", pa.string())])
RETRIEVED_ROWS = pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string()))])


def image_id(shard: int, j: int) -> str:
    return f"doc-{shard:05d}-{j:06d}/img-0"


def image_stage(work: Path, shards: int, per_shard: int, bad: dict[str, bytes] | None = None,
                name: str = "dedup_images") -> list[str]:
    """A completed images stage: shards x per_shard PNGs (ids image_id(i, j)); `bad` replaces some bytes."""
    bad = bad or {}
    stage = Stage(work, name, {"test": "images"})
    ids: list[str] = []

    def shard(i: int) -> Counts:
        rows = []
        for j in range(per_shard):
            iid = image_id(i, j)
            rows.append({"id": iid, "bytes": bad.get(iid, png_bytes(i * 1000 + j)), "path": None})
        write_records(stage.path("images", i), rows, IMAGE_ROWS)
        c = Counts()
        c.keep(len(rows))
        return c
    for i in range(shards):
        ids += [image_id(i, j) for j in range(per_shard)]
    write_stage(stage, range(shards), shard)
    return ids


def retrieval_stage(work: Path, ids_by_shard: dict[int, list[str]], name: str = "retrieve") -> None:
    """A completed retrieval stage: retrieved-i.parquet {id, texts} (texts[0] = text1)."""
    stage = Stage(work, name, {"test": "retrieve"})

    def shard(i: int) -> Counts:
        rows = [{"id": iid, "texts": [f"a man riding a red bike on street number {k}", "a dog in the park", "x"]}
                for k, iid in enumerate(ids_by_shard[i])]
        write_records(stage.path("retrieved", i), rows, RETRIEVED_ROWS)
        c = Counts()
        c.keep(len(rows))
        return c
    write_stage(stage, sorted(ids_by_shard), shard)


def stage3_overrides(work: Path, captioner: Path | None = None, lm: Path | None = None, **extra) -> list[str]:
    import json

    from conftest import TINY_CLIP, TINY_NAME

    items = {"work_dir": str(work), "progress": "false", "trainer.accelerator": "cpu",
             "caption.workers": 0, "caption.batch_size": 4, "caption.max_new_tokens": 6, "caption.num_beams": 1,
             "tag.workers": 0, "tag.batch_size": 4, "tag.use_mined": "false", "tag.threshold": -1.0,
             "tag.top_n": 3, "embed.model.name": TINY_NAME, "embed.model.pretrained": "null",
             "rewrite.workers": 0, "rewrite.batch_size": 4, "rewrite.max_new_tokens": 8, "rewrite.min_words": 1,
             # the model in the test process (no actor to start: torch and Lightning are imported already); the tests
             # of one or two actors and of kill/resume pass ray.in_process=false
             "ray.in_process": "true", "ray.max_actors": 1}
    if captioner:
        items["caption.model"] = str(captioner)
    if lm:
        items["rewrite.model"] = str(lm)
        # a random-init LM without an adapter is a zero-shot rewrite: refused unless allowed on purpose
        items["rewrite.allow_zero_shot"] = "true"
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()] + [f"embed.model.custom={json.dumps(TINY_CLIP)}"]


# ---- multi-process helpers (slow tests) -------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _env(joined: bool = True) -> dict:
    """A CLI subprocess's environment: joined to this process's shared Ray instance, or (not `joined`) starting an
    embedded one of its own, whose workers inherit this environment (a joined driver's workers do not)."""
    import os

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    if not joined:
        env.pop("RAY_ADDRESS", None)
    return env


def run_cli(launcher: list[str], args: list[str], timeout: int = 600, joined: bool = True):
    import subprocess

    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=_env(joined), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def single(python: str) -> list[str]:
    return [python, "-m", "realsyn_pl"]


def stage_rows(work: Path, stage: str, kind: str) -> list[dict]:
    from realsyn_pl.construct.engine.records import iter_rows

    return list(iter_rows(sorted((work / stage).glob(f"{kind}-?????.parquet"))))


def cli(args: list[str], joined: bool = True, **kw):
    """`python -m realsyn_pl args` started in the background, its output piped as text (see _env for `joined`)."""
    import subprocess
    import sys

    return subprocess.Popen(single(sys.executable) + args, env=_env(joined), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def kill_when_shards_done(args: list[str], done_dir: Path, at_least: int, timeout: float = 300) -> int:
    """Start `python -m realsyn_pl args`, SIGKILL it once `at_least` shards are marked done; returns how many were."""
    from support import kill_when

    proc = cli(args)
    kill_when(proc, lambda: len(list(done_dir.glob("*.json"))) >= at_least, timeout)
    return len(list(done_dir.glob("*.json")))


def tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A random-init BLIP captioner (the default captioner's architecture) with a BERT-like [BOS] text [SEP] tokenizer."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    tok = word_tokenizer(chat=False)
    # BLIP overwrites the first prompt token with BOS and drops the last one (BERT's [CLS] ... [SEP])
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A [PAD]",
                                                       special_tokens=[("<|endoftext|>", 0), ("[PAD]", 2)])
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=2, sep_token_id=0)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=32))
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 2, 0
    model.generation_config.bos_token_id = 0
    model.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
