"""Supervised fine-tuning of the rewriter (the paper: LLaMA3-8B on 100K GPT-4 Turbo instruction examples).

Examples are rendered exactly as the rewrite stage renders them (models/prompt.py: the paper's prompt in the
model's chat template), followed by the target and EOS; the loss is on the target tokens only, so the model learns
to answer, not to repeat the prompt. LoRA (peft) by default; `full` trains every weight.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import Dataset

from realsyn_pl.models.prompt import RewriteInput, render_chat

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class LoadedExamples:
    examples: list[Example] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t) for t in value]


def instruction_input(row: dict[str, Any]) -> Optional[RewriteInput]:
    """{raw_caption|text1, synthetic_caption|caption, tags} -> RewriteInput (None if a text slot is missing)."""
    raw = row.get("raw_caption", row.get("text1"))
    syn = row.get("synthetic_caption", row.get("caption"))
    if not isinstance(raw, str) or not isinstance(syn, str) or not raw.strip():
        return None
    return RewriteInput(raw, syn, _tags(row.get("tags")))


def load_examples(path: str | Path, tokenizer: Any, max_length: int, system_prompt: Optional[str] = None,
                  separator: str = ", ") -> LoadedExamples:
    """Tokenised examples of an instruction jsonl; bad lines are skipped with a counted reason."""
    out = LoadedExamples()
    eos = tokenizer.eos_token_id
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                out.skip("bad_json")
                continue
            if not isinstance(row, dict):
                out.skip("bad_json")
                continue
            x = instruction_input(row)
            target = row.get("target")
            if x is None:
                out.skip("missing_input")
                continue
            if not isinstance(target, str) or not target.strip():
                out.skip("no_target")
                continue
            prompt = tokenizer(render_chat(tokenizer, x, system_prompt, separator),
                               add_special_tokens=False)["input_ids"]
            answer = tokenizer(target.strip(), add_special_tokens=False)["input_ids"] + [eos]
            if len(prompt) + len(answer) > max_length:
                out.skip("too_long")
                continue
            out.examples.append(Example(prompt + answer, [IGNORE] * len(prompt) + answer))
    return out


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate_examples(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding (training has no generation step); padded labels are ignored by the loss."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for j, e in enumerate(batch):
        ids[j, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[j, :len(e.labels)] = torch.tensor(e.labels)
        mask[j, :len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def apply_lora(lm: torch.nn.Module, r: int, alpha: int, dropout: float,
               target_modules: Optional[list[str]] = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules) if target_modules else None)
    return get_peft_model(lm, cfg)


class RewriterSFT(L.LightningModule):
    """Causal-LM loss on target tokens; AdamW over the trainable parameters (LoRA weights only under LoRA), linear
    warm-up then constant."""

    def __init__(self, lm: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        self.lm = lm
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=False)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warm = max(0, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def mean_loss(lm: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean target loss over examples (eval mode: no dropout), for before/after reports."""
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    device = next(lm.parameters()).device
    for start in range(0, len(examples), batch_size):
        b = collate_examples(examples[start:start + batch_size], pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                                reduction="sum")
        total += float(nll)
        count += int((target != IGNORE).sum())
    lm.train(was_training)
    return total / count if count else math.nan
