"""Open-set image tagging with the CLIP teacher (RAM++ in spirit: tags scored against their text descriptions).

Each tag's text embedding is the normalised mean of the teacher's embeddings of its prompts ("a photo of a {}.");
an image gets every tag whose cosine similarity with its embedding is >= threshold, best first, at most top_n.
The tag embeddings are computed once per process on the device (an 8,000-tag vocabulary with EVA02-CLIP E is a
few seconds on a GPU, minutes on a CPU), in `on_predict_start`, when the module is already on its device.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from realsyn_pl.construct.engine.predict import BuildPredictModule

BUILTIN_PREFIX = "builtin:"


def builtin_vocab_path(name: str) -> Path:
    return Path(str(resources.files("realsyn_pl") / "data" / "tags" / f"{name}_tags.txt"))


def read_vocab(path: str | Path) -> list[str]:
    """One tag per line; '#' starts a comment; blank lines ignored. `builtin:<name>` = a list shipped with realsyn_pl."""
    p = builtin_vocab_path(str(path)[len(BUILTIN_PREFIX):]) if str(path).startswith(BUILTIN_PREFIX) else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tag vocabulary not found: {path}")
    tags = []
    for line in p.read_text(encoding="utf-8").splitlines():
        t = line.split("#", 1)[0].strip()
        if t:
            tags.append(t)
    return tags


def merge_vocab(lists: Sequence[Sequence[str]]) -> list[str]:
    """Concatenate tag lists, dropping case-insensitive repeats (first spelling wins), keeping order."""
    seen, out = set(), []
    for tags in lists:
        for t in tags:
            key = " ".join(t.lower().split())
            if key and key not in seen:
                seen.add(key)
                out.append(t.strip())
    return out


@torch.no_grad()
def tag_text_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable[[list[str]], Any],
                        tags: Sequence[str], templates: Sequence[str], device: torch.device,
                        batch_size: int = 256) -> torch.Tensor:
    """(n_tags, d) L2-normalised: per tag, the normalised mean over templates of the normalised text embeddings."""
    if not templates:
        raise ValueError("tag.templates is empty")
    rows = []
    for start in range(0, len(tags), batch_size):
        chunk = tags[start:start + batch_size]
        prompts = [tpl.format(t) for t in chunk for tpl in templates]
        emb = F.normalize(encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
        emb = emb.view(len(chunk), len(templates), -1).mean(1)
        rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows)


def select_tags(scores: torch.Tensor, tags: Sequence[str], threshold: float, top_n: int
                ) -> tuple[list[list[str]], list[list[float]]]:
    """Per row: tags with score >= threshold, best first, at most top_n (ties by vocabulary order)."""
    k = min(top_n, scores.shape[1])
    vals, idx = scores.topk(k, dim=1)  # sorted descending; topk is stable enough for ties to not matter here
    out_tags, out_scores = [], []
    for v_row, i_row in zip(vals.tolist(), idx.tolist()):
        keep = [(tags[i], round(v, 6)) for v, i in zip(v_row, i_row) if v >= threshold]
        out_tags.append([t for t, _ in keep])
        out_scores.append([s for _, s in keep])
    return out_tags, out_scores


class Tagger(BuildPredictModule):
    def __init__(self, clip: torch.nn.Module, tokenizer: Callable[[list[str]], Any], tags: Sequence[str],
                 templates: Sequence[str], threshold: float, top_n: int, text_batch_size: int = 256,
                 stored_embeddings: bool = False):
        """stored_embeddings: the batches are the images' stored embeddings (n, d) from the embed stage (the same
        model), not pixels; they are (re-)normalised and scored, and the image tower is never run."""
        super().__init__()
        if not tags:
            raise ValueError("the tag vocabulary is empty")
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.tags = list(tags)
        self.templates = list(templates)
        self.threshold, self.top_n, self.text_batch_size = threshold, top_n, text_batch_size
        self.stored_embeddings = stored_embeddings
        self.tag_emb: torch.Tensor | None = None

    def on_predict_start(self) -> None:
        self.tag_emb = tag_text_embeddings(self.clip.encode_text, self.tokenizer, self.tags, self.templates,
                                           self.device, self.text_batch_size)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        if self.tag_emb is None:
            self.on_predict_start()
        feats = images if self.stored_embeddings else self.clip.encode_image(images)
        img = F.normalize(feats.float(), dim=-1)
        return img @ self.tag_emb.T

    def infer(self, inputs: torch.Tensor) -> dict[str, Any]:
        tags, scores = select_tags(self.scores(inputs), self.tags, self.threshold, self.top_n)
        return {"tags": tags, "tag_scores": scores}
