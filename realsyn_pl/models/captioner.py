"""LightningModule around any transformers image-to-text model (BLIP, GIT, ViT+GPT-2 VisionEncoderDecoder, ...):
batched generation of one concise caption per image (stage 3's "synthetic caption")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from realsyn_pl.construct.engine.predict import BuildPredictModule


@dataclass
class CaptionerBundle:
    model: torch.nn.Module
    image_processor: Any
    tokenizer: Any


def load_captioner(name: str) -> CaptionerBundle:
    """Model, image processor and tokenizer by hub name or local folder (what save_pretrained writes)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        from transformers import AutoModelForImageTextToText as AutoCaptioner
    except ImportError:  # transformers < 4.46 (a cluster image's): the older auto class, with BLIP, GIT and VED
        from transformers import AutoModelForVision2Seq as AutoCaptioner

    model = AutoCaptioner.from_pretrained(name)
    image_processor = AutoImageProcessor.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    return CaptionerBundle(model.eval(), image_processor, tokenizer)


def generation_kwargs(cfg: Any, pad_id: Optional[int]) -> dict[str, Any]:
    """transformers generate() arguments from a CaptionConfig-like object (sampling knobs only when sampling)."""
    kw: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
                          "num_beams": cfg.num_beams, "do_sample": cfg.do_sample,
                          "repetition_penalty": cfg.repetition_penalty}
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p)
    if pad_id is not None:
        kw["pad_token_id"] = pad_id
    return kw


class Captioner(BuildPredictModule):
    def __init__(self, bundle: CaptionerBundle, gen_kwargs: dict[str, Any], prompt: Optional[str] = None):
        super().__init__()
        self.model = bundle.model.eval()
        self.tokenizer = bundle.tokenizer
        self.gen_kwargs = dict(gen_kwargs)
        # BLIP's generate passes its own pad id: a second one is a TypeError; the model's own setting wins anyway
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None and gen_cfg.pad_token_id is not None:
            self.gen_kwargs.pop("pad_token_id", None)
        self.prompt = prompt
        # conditional captioners (BLIP "a picture of") continue a text prefix: tokenised once, repeated per batch
        self.prompt_ids = (None if not prompt else
                           torch.tensor(bundle.tokenizer(prompt, add_special_tokens=True)["input_ids"]))

    def infer(self, inputs: torch.Tensor) -> dict[str, Any]:
        kw = dict(self.gen_kwargs)
        if self.prompt_ids is not None:
            # a real copy per row: BLIP writes its BOS into input_ids[:, 0] in place
            ids = self.prompt_ids.to(inputs.device).unsqueeze(0).repeat(len(inputs), 1)
            kw.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = self.model.generate(pixel_values=inputs.to(self.dtype_of_model()), **kw)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return {"caption": [strip_prompt(t, self.prompt) for t in texts]}

    def dtype_of_model(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def strip_prompt(text: str, prompt: Optional[str]) -> str:
    """Captions without the conditioning prefix (BLIP echoes it), whitespace collapsed."""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower().strip()):
        text = text[len(prompt.strip()):].strip()
    return text
