"""Random-init models for the GPU checks, per target: tiny on the CPU dry run, real shapes on CUDA."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpu.targets import Target

# A word-level vocabulary for the perplexity LM: with 120 words a random GPT-2's PPL spreads over ~75..2000 (tiny,
# init 0.2) or ~95..320 (GPT-2 small's shape, its own init 0.02): sentences on both sides of the 200 cut-off.
WORDS = [f"w{i}" for i in range(120)]
LM_SHAPES = {"cpu-dry": {"n_embd": 64, "n_layer": 2, "n_head": 2, "initializer_range": 0.2},
             # GPT-2 small's body (the paper filters with GPT-2 large: the same blocks, more of them)
             "cuda": {"n_embd": 768, "n_layer": 12, "n_head": 12, "initializer_range": 0.02}}


def tiny_gpt2(folder: Path, target: Target) -> Path:
    """A random-init GPT-2 with a word-level tokenizer (w0 .. w119), saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, bos_token_id=0,
                               eos_token_id=0, **LM_SHAPES[target.name])).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows {id, text} of 3..19 words drawn from the first 8..119 words (a spread of perplexities)."""
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "text": " ".join(rng.choice(WORDS[: int(rng.integers(8, len(WORDS)))],
                                                       int(rng.integers(3, 20))))} for i in range(n)]
