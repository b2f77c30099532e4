"""Rewriter LightningModules: an LLM merges text1 + caption + tags into one synthetic text (stage 3, the paper's
fine-tuned LLaMA3-8B). Three interchangeable backends behind the same predict contract:

- `HFRewriter`: a transformers causal LM (optionally with a LoRA adapter merged in), batched greedy/sampled
  `generate` on left-padded chat prompts. The default.
- `VllmRewriter`: the same model through vLLM (optional extra `realsyn_pl[vllm]`) for GPU throughput.
- `TemplateRewriter`: no LLM, a deterministic merge for CPU smoke runs; its rows say backend=template.
Each returns the raw generated text per row; cleaning and drop reasons are the stage's job (construct/generate/rewrite.py).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from realsyn_pl.construct.engine.predict import BuildPredictModule
from realsyn_pl.models.prompt import RewriteInput, template_merge


@dataclass
class LMBundle:
    model: Optional[torch.nn.Module]
    tokenizer: Any


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(model: str, adapter: Optional[str] = None) -> Any:
    """The adapter's own tokenizer when fit-rewriter saved one (it may carry a chat template the base lacks)."""
    from transformers import AutoTokenizer

    src = adapter if adapter and _has_tokenizer(Path(adapter)) else model
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation masks pads; any id the model knows works
    tok.padding_side = "left"          # batched decoding: every prompt ends at the same position
    return tok


def load_causal_lm(model: str, adapter: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> LMBundle:
    """A causal LM by hub name or local folder, with a peft adapter merged in (no adapter overhead at decode time)."""
    from transformers import AutoModelForCausalLM

    from realsyn_pl.models.hf_compat import dtype_kwargs

    lm = AutoModelForCausalLM.from_pretrained(model, **dtype_kwargs(dtype))
    if adapter:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter).merge_and_unload()
    return LMBundle(lm.eval(), load_tokenizer(model, adapter))


def batch_seed(seed: int, first_id: str) -> int:
    """Sampling seed of a batch from its first row id: the same in 1 process or N, on every rerun."""
    return (seed * 1_000_003 + zlib.crc32(first_id.encode())) % (2**31)


class HFRewriter(BuildPredictModule):
    """inputs: {"input_ids", "attention_mask" (left-padded), "seed"} -> raw text, new-token count, finish reason."""

    def __init__(self, lm: torch.nn.Module, tokenizer: Any, gen_kwargs: dict[str, Any]):
        super().__init__()
        self.lm = lm.eval()
        self.tokenizer = tokenizer
        self.gen_kwargs = gen_kwargs
        # every id that ends a turn: the tokenizer's EOS and the model's generation EOS list (LLaMA-3-Instruct stops
        # at <|eot_id|> as well as <|end_of_text|>)
        ids: set = set()
        gen_cfg = getattr(lm, "generation_config", None)
        for eos in (gen_kwargs.get("eos_token_id"), tokenizer.eos_token_id,
                    getattr(gen_cfg, "eos_token_id", None)):
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        self.eos_ids = ids - {None}

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.gen_kwargs.get("do_sample"):
            torch.manual_seed(int(inputs["seed"]))
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        out = self.lm.generate(input_ids=ids, attention_mask=mask, **self.gen_kwargs)
        new = out[:, ids.shape[1]:].tolist()
        texts, n_new, finish = [], [], []
        for row in new:
            # cut at the first end-of-sequence token; what follows is padding
            end = next((j for j, t in enumerate(row) if t in self.eos_ids), None)
            toks = row if end is None else row[:end]
            texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
            n_new.append(len(toks))
            finish.append("length" if end is None else "eos")
        return {"raw": texts, "n_new_tokens": n_new, "finish": finish}


def hf_generation_kwargs(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                          "repetition_penalty": cfg.repetition_penalty, "pad_token_id": tokenizer.pad_token_id}
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p)
    return kw


class TemplateRewriter(BuildPredictModule):
    """inputs: list[RewriteInput] -> template_merge text. No parameters, no model."""

    def __init__(self, max_tags: int = 3):
        super().__init__()
        self.max_tags = max_tags

    def infer(self, inputs: list[RewriteInput]) -> dict[str, Any]:
        texts = [template_merge(x, self.max_tags) for x in inputs]
        return {"raw": texts, "n_new_tokens": [0] * len(texts), "finish": ["template"] * len(texts)}


class VllmRewriter(BuildPredictModule):
    """inputs: {"prompts": [chat-rendered prompt strings], "seed"}; vLLM batches and schedules internally.

    Each process holds one vLLM engine. vLLM uses the GPUs the process can see (not Lightning's device choice), so
    give every process its own GPU through CUDA_VISIBLE_DEVICES (SLURM --gpus-per-task=1, or one job per GPU);
    tensor parallelism inside one process: vllm_args.tensor_parallel_size. Not exercised by the CPU test suite."""

    def __init__(self, model: str, adapter: Optional[str], cfg: Any, engine_args: Optional[dict[str, Any]] = None):
        super().__init__()
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ImportError("rewrite.backend=vllm needs vLLM: pip install 'realsyn_pl[vllm]' "
                              "(or use rewrite.backend=hf)") from None
        self.model_name, self.adapter, self.cfg = model, adapter, cfg
        self.engine_args = dict(engine_args or {})
        self.llm = None

    def on_predict_start(self) -> None:
        from vllm import LLM

        args = dict(self.engine_args)
        if self.adapter:
            args.setdefault("enable_lora", True)
        self.llm = LLM(model=self.model_name, seed=self.cfg.seed, **args)

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams

        c = self.cfg
        params = SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature if c.do_sample else 0.0,
                                top_p=c.top_p if c.do_sample else 1.0, repetition_penalty=c.repetition_penalty,
                                seed=int(inputs["seed"]) if c.do_sample else None)
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("rewriter", 1, self.adapter)
        outs = self.llm.generate(inputs["prompts"], params, use_tqdm=False, lora_request=lora)
        texts = [o.outputs[0].text for o in outs]
        n_new = [len(o.outputs[0].token_ids) for o in outs]
        finish = ["eos" if o.outputs[0].finish_reason == "stop" else str(o.outputs[0].finish_reason) for o in outs]
        return {"raw": texts, "n_new_tokens": n_new, "finish": finish}
