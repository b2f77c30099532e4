"""The parts of benchmarks/gpu_throughput.py. Each builds its model at the paper's size from a config with random
weights (nothing is downloaded; throughput does not depend on the weights), runs the project's own module or array
code on synthetic inputs on the device, and returns table rows. The CPU dry run (`Plan.dry`) runs the same code at
tiny shapes.

Only the model's work is timed: decoding and preprocessing (the loader workers' job) are not, nor model loading.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    part: str
    model: str          # model and shape
    precision: str
    batch: str
    value: Optional[float]  # throughput; None when skipped
    unit: str
    skip: str = ""      # why there is no number


@dataclass
class Plan:
    """One run's device and clocks: the paper's sizes on a GPU, tiny shapes on the CPU dry run."""
    dry: bool
    device: str         # "cuda" or "cpu"
    warmup: int         # untimed calls per measurement (CUDA context, cuBLAS plans, allocator)
    iters: int          # timed calls per measurement at most ...
    budget_s: float     # ... or until this many seconds have passed (one row = one measurement)
    scratch: Path       # shards and model folders


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(plan: Plan, step: Callable[[], int]) -> float:
    """Units per second of `step` (it returns how many units it processed): plan.warmup untimed calls, then timed
    calls until plan.iters of them or plan.budget_s seconds."""
    for _ in range(plan.warmup):
        step()
    sync(plan.device)
    done, t0 = 0, time.perf_counter()
    for _ in range(plan.iters):
        done += step()
        sync(plan.device)
        if time.perf_counter() - t0 >= plan.budget_s:
            break
    return done / (time.perf_counter() - t0)


@contextmanager
def building(device: str, dtype: Any = None) -> Iterator[None]:
    """Modules created inside get their parameters on `device`, initialised there (a GPU initialises 8B parameters
    in seconds; on the host they would take minutes and twice the memory), in `dtype` when given."""
    import torch

    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def id_tokenizer(vocab_size: int) -> Any:
    """A tokenizer whose token i is the word "t{i}" (eos/bos t0, pad t2): what the project's modules need to decode
    a random model's output ids, for any vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", pad_token="t2",
                                   unk_token="t1")


def n_params(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------------------------------------------------- embed
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2}}
PAPER_CLIP = "EVA02-E-14-plus"  # the paper's embedding model (EVA02-CLIP E/14-plus), every embed stage


def clip_model(dry: bool, device: str) -> tuple[str, Any]:
    import open_clip

    from realsyn_pl.models.factory import register_model_config

    name = "realsyn-bench-tiny" if dry else PAPER_CLIP
    if dry:
        register_model_config(name, TINY_CLIP)
    with building(device):
        model = open_clip.create_model(name, pretrained=None, device=device)
    return name, model.eval()


def part_embed(plan: Plan) -> list[Row]:
    """Images and sentences through the build's Embedder (encode, L2-normalise, fp16 to the host as embed.dtype
    stores them) under autocast over fp32 weights, as the Trainer's bf16-mixed / 16-mixed precision runs it."""
    import open_clip
    import torch

    from realsyn_pl.models.embedder import Embedder

    name, model = clip_model(plan.dry, plan.device)
    cfg = open_clip.get_model_config(name)
    size, ctx, vocab = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    dev = torch.device(plan.device)
    rows = []
    # embed.batch_size of the paper preset (256); sentences also at 1024, where the smaller text tower may want more
    cases = [("images", [4] if plan.dry else [256]), ("sentences", [4, 8] if plan.dry else [256, 1024])]
    for modality, batches in cases:
        module = Embedder(model, modality)
        for batch in batches:
            if modality == "images":
                x = torch.randn(batch, 3, size, size, device=dev)
            else:
                x = torch.randint(0, vocab, (batch, ctx), device=dev)
            for label, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
                def step(x=x, dtype=dtype, module=module) -> int:
                    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
                        emb = module.infer(x)["embedding"]
                    emb.to(torch.float16).cpu()
                    return len(x)
                rows.append(Row("embed", f"{name} {modality[:-1]} tower ({n_params(model)} params in all)", label,
                                str(batch), measure(plan, step), f"{modality}/s"))
    return rows


# ----------------------------------------------------------------------------------------------------- perplexity
def gpt2_config(dry: bool) -> Any:
    from transformers import GPT2Config

    if dry:
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000, n_positions=64)
    return GPT2Config(n_embd=1280, n_layer=36, n_head=20)  # GPT-2 large: 774M parameters, vocabulary 50257


def part_perplexity(plan: Plan) -> list[Row]:
    """GPT-2 large's shape through the build's PerplexityScorer: fp32 (the preset) against bf16 autocast with the
    head and log-softmax in fp32 (perplexity.precision=bf16-fp32-logits, where this tree has it)."""
    import torch
    from transformers import GPT2LMHeadModel

    from realsyn_pl.models.perplexity import PerplexityScorer

    with building(plan.device):
        lm = GPT2LMHeadModel(gpt2_config(plan.dry)).eval()
    cfg = lm.config
    # a sentence of the quality filter's 3..81 words is ~5..110 GPT-2 tokens: BOS + up to 40 here, lengths spread
    # over the batch with right padding, as PerplexityTask.collate pads
    length = 8 if plan.dry else 40
    label = f"GPT-2 large shape ({n_params(lm)})" if not plan.dry else f"GPT-2 tiny ({n_params(lm)})"
    label += f", attn {cfg._attn_implementation}, <= {length} tokens"
    try:
        from realsyn_pl.models.perplexity import FP32_LOGITS
    except ImportError:
        FP32_LOGITS = None
    rows = []
    for batch in ([4] if plan.dry else [64, 256]):  # perplexity.batch_size of the paper preset: 64
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
        lengths = torch.randint(4, length + 1, (batch,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        inputs = {"input_ids": ids.to(plan.device), "attention_mask": mask.to(plan.device)}
        for precision in ("32", "bf16-fp32-logits"):
            if precision != "32" and FP32_LOGITS is None:
                rows.append(Row("perplexity", label, precision, str(batch), None, "sentences/s",
                                "realsyn_pl.models.perplexity has no bf16-fp32-logits mode in this tree"))
                continue
            scorer = PerplexityScorer(lm) if precision == "32" else PerplexityScorer(lm, fp32_logits=True)
            bf16 = precision != "32"

            def step(scorer=scorer, bf16=bf16, inputs=inputs) -> int:
                with torch.inference_mode(), torch.autocast(torch.device(plan.device).type, dtype=torch.bfloat16,
                                                            enabled=bf16):
                    return len(scorer.infer(inputs)["ppl"].cpu())
            rows.append(Row("perplexity", label, precision, str(batch), measure(plan, step), "sentences/s"))
    return rows


# -------------------------------------------------------------------------------------------------------- caption
def blip_config(dry: bool) -> Any:
    from transformers import BlipConfig

    if dry:
        text = {"vocab_size": 100, "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": 3,
                "eos_token_id": 0, "pad_token_id": 2, "sep_token_id": 0}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8, "projection_dim": 32}
        return BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    return BlipConfig()  # BLIP base: ViT-B/16 at 384 px, BERT-base decoder, vocabulary 30524


def part_caption(plan: Plan) -> list[Row]:
    """BLIP base's shape (the preset's Salesforce/blip-image-captioning-base; the paper's OFA-base is the same class,
    ~0.2B) through the build's Captioner: the preset's 3 beams, every caption the full max_new_tokens (min = max, so
    the number is a floor), bf16-mixed."""
    import torch
    from transformers import BlipForConditionalGeneration

    from realsyn_pl.models.captioner import Captioner, CaptionerBundle

    config = blip_config(plan.dry)
    with building(plan.device):
        model = BlipForConditionalGeneration(config).eval()
    tokens = 6 if plan.dry else 30  # caption.max_new_tokens of the paper preset
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": 3, "do_sample": False}
    captioner = Captioner(CaptionerBundle(model, None, id_tokenizer(config.text_config.vocab_size)), gen)
    size = config.vision_config.image_size
    rows = []
    for batch in ([2] if plan.dry else [128]):  # caption.batch_size of the paper preset
        pixels = torch.randn(batch, 3, size, size, device=plan.device)

        def step(pixels=pixels) -> int:
            with torch.inference_mode(), torch.autocast(torch.device(plan.device).type, dtype=torch.bfloat16):
                out = captioner.infer(pixels)["caption"]
            return len(out)
        rows.append(Row("caption", f"BLIP base shape ({n_params(model)}), {size} px, 3 beams, {tokens} new tokens, "
                        f"attn {config.text_config._attn_implementation}", "bf16-mixed", str(batch),
                        measure(plan, step), "images/s"))
    return rows


# -------------------------------------------------------------------------------------------------------- rewrite
def llama_config(dry: bool) -> Any:
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=0, eos_token_id=0, pad_token_id=2)
    # Meta-Llama-3-8B's shape: 8.03B parameters, GQA 32/8 heads, vocabulary 128256
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, bos_token_id=0, eos_token_id=0, pad_token_id=2)


def part_rewrite(plan: Plan) -> list[Row]:
    """A Llama-3-8B-shaped LM in bf16 (16 GB) through the build's HFRewriter (HF generate, greedy, left-padded
    prompts): output tokens/s, every row generating the full new-token count (min = max)."""
    import torch
    from transformers import LlamaForCausalLM

    from realsyn_pl.models.rewriter import HFRewriter

    config = llama_config(plan.dry)
    with building(plan.device, torch.bfloat16):
        lm = LlamaForCausalLM(config).eval()
    tok = id_tokenizer(config.vocab_size)
    prompt, new = rewrite_lengths(plan)
    gen = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": tok.pad_token_id}
    rewriter = HFRewriter(lm, tok, gen)
    rows = []
    for batch in ([2] if plan.dry else [64, 256]):  # rewrite.batch_size of the paper preset: 64
        ids = torch.randint(3, config.vocab_size, (batch, prompt), device=plan.device)
        mask = torch.ones_like(ids)
        mask[: batch // 2, : prompt // 4] = 0  # left padding: half the prompts a quarter shorter
        ids = ids.masked_fill(mask == 0, tok.pad_token_id)

        def step(ids=ids, mask=mask) -> int:
            with torch.inference_mode():
                out = rewriter.infer({"input_ids": ids, "attention_mask": mask, "seed": 0})
            return sum(out["n_new_tokens"])
        rows.append(Row("rewrite", f"Llama-3-8B shape ({n_params(lm)}), HF generate, {prompt}-token prompts, {new} "
                        f"new tokens, attn {config._attn_implementation}", "bf16", str(batch),
                        measure(plan, step), "output tokens/s"))
    return rows


def rewrite_lengths(plan: Plan) -> tuple[int, int]:
    """(prompt tokens, new tokens): the paper's instruction (~170 words) + R1, the caption and the tags in the chat
    template come to ~320 tokens (the preset allows rewrite.max_input_tokens=512); rewrite.max_new_tokens=96."""
    return (24, 8) if plan.dry else (320, 96)


def part_vllm(plan: Plan) -> list[Row]:
    """The same Llama-3-8B shape through the build's VllmRewriter with vLLM's dummy (random) weights, where vLLM
    imports. Last of the parts: vLLM keeps most of the GPU's memory until the process ends."""
    prompt, new = rewrite_lengths(plan)
    label = f"Llama-3-8B shape, vLLM, {prompt}-token prompts, up to {new} new tokens"
    if importlib.util.find_spec("vllm") is None:
        return [Row("rewrite", label, "bf16", "", None, "output tokens/s", "vllm is not installed")]
    if plan.device == "cpu":
        return [Row("rewrite", label, "bf16", "", None, "output tokens/s", "vLLM needs a GPU")]
    from types import SimpleNamespace

    import torch

    from realsyn_pl.models.rewriter import VllmRewriter

    config = llama_config(plan.dry)
    folder = plan.scratch / "llama-8b-shape"  # vLLM reads a model folder: config + tokenizer, no weight files
    config.torch_dtype, config.architectures = "bfloat16", ["LlamaForCausalLM"]  # vLLM picks its model class by name
    config.save_pretrained(folder)
    id_tokenizer(config.vocab_size).save_pretrained(folder)
    cfg = SimpleNamespace(seed=0, max_new_tokens=new, temperature=1.0, do_sample=False, top_p=1.0,
                          repetition_penalty=1.0)
    module = VllmRewriter(str(folder), None, cfg, {"load_format": "dummy", "dtype": "bfloat16",
                                                   "max_model_len": 1024, "gpu_memory_utilization": 0.85})
    module.on_predict_start()
    prompts = [" ".join(f"t{i}" for i in row) for row in torch.randint(3, config.vocab_size, (1024, prompt)).tolist()]

    def step() -> int:
        return sum(module.infer({"prompts": prompts, "seed": 0})["n_new_tokens"])
    return [Row("rewrite", label, "bf16", "1024 prompts per call", measure(plan, step), "output tokens/s")]


# ------------------------------------------------------------------------------------------------------------ fit
def fit_commands(plan: Plan, model_json: Path, urls: str, samples: int, batch: int) -> tuple[list[str], list[str]]:
    """`realsyn_pl fit` and `open_clip_train.main` on the same model, shards, batch, precision and loader workers:
    fit_throughput.py's command lines with the device, precision and workers of this run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fit_throughput as ft

    model = json.loads(model_json.read_text())
    gpu = not plan.dry
    workers = 8 if gpu else 1
    ours = [a for a in ft.ours_cmd(plan.scratch / "fit_ours", urls, batch) if not a.startswith(("model.custom=",
            "trainer.accelerator=", "data.workers="))]
    ours += [f"model.custom={json.dumps(model)}", f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
             f"data.workers={workers}", f"trainer.precision={'bf16-mixed' if gpu else '32'}"]
    oc = ft.oc_cmd(model_json, plan.scratch / "fit_oc", "bench", urls, samples, batch)
    for flag, value in (("--device", "cuda" if gpu else "cpu"), ("--precision", "amp_bf16" if gpu else "fp32"),
                        ("--workers", str(workers))):
        oc[oc.index(flag) + 1] = value
    return ours, oc


def part_fit(plan: Plan) -> list[Row]:
    """ViT-B/32 (open_clip's config, random init) trained by `realsyn_pl fit` and by open_clip_train on the same GPU,
    shards and batch, bf16 autocast: samples/s of each and their ratio (fit_throughput.py's steady-state rates)."""
    label = "ViT-B/32, 224 px" if not plan.dry else "tiny CLIP, 32 px"
    if importlib.util.find_spec("open_clip_train") is None:
        return [Row("fit", label, "", "", None, "samples/s", "open_clip_train is not installed (the reference)")]
    import open_clip

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fit_throughput as ft

    from realsyn_pl.demo.run import TINY_CLIP as DEMO_CLIP
    from realsyn_pl.demo.world import write_world_shards

    model = DEMO_CLIP if plan.dry else open_clip.get_model_config("ViT-B-32")
    batch, batches = (8, ft.MIN_BATCHES) if plan.dry else (256, 32)
    samples = batch * batches
    shards = write_world_shards(plan.scratch / "fit_shards", samples, samples // ft.SHARDS, seed=0, px=64)
    urls = f"{shards}/{{00000..{ft.SHARDS - 1:05d}}}.tar"
    model_json = plan.scratch / f"{ft.NAME}.json"
    model_json.write_text(json.dumps(model))
    ours_cmd, oc_cmd = fit_commands(plan, model_json, urls, samples, batch)
    env = dict(os.environ, WANDB_MODE="disabled")
    if plan.dry:
        env["OMP_NUM_THREADS"] = "1"
    ours, _ = ft.ours_rate(ours_cmd, plan.scratch / "fit_ours", env)
    oc, _ = ft.oc_rate(oc_cmd, batch, env)
    precision = "32" if plan.dry else "bf16-mixed / amp_bf16"
    return [Row("fit", f"{label}, realsyn_pl fit", precision, str(batch), ours, "samples/s"),
            Row("fit", f"{label}, open_clip_train.main", precision, str(batch), oc, "samples/s"),
            Row("fit", f"{label}, ratio realsyn_pl / open_clip_train", precision, str(batch), ours / oc, "x")]


# ---------------------------------------------------------------------------------------------------------- dedup
def part_dedup(plan: Plan) -> list[Row]:
    """One semantic-dedup cluster (dedup.cluster_size items) through semdedup.tile_pairs: the float32 pair blocks
    on the device (products.py; torch on the CPU in the dry run), the float64 recheck of undecided distances on the
    host. 10% planted near copies, so the recheck and the pair output have work."""
    import numpy as np

    from realsyn_pl.construct.extract import semdedup

    n, d = (256, 16) if plan.dry else (10_000, 1024)  # dedup.cluster_size; EVA02-E's embedding width
    block = 64 if plan.dry else 1024                  # dedup.block
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    dup = n // 10
    x[n - dup:] = x[:dup] + rng.normal(scale=0.02, size=(dup, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pos = np.arange(n, dtype=np.int64)
    device = "cuda" if plan.device.startswith("cuda") else "torch:cpu"

    def step() -> int:
        found = sum(len(p) for p in semdedup.tile_pairs(pos, x, 0, pos, x, 0, n, 0.1, block, exact_all=False,
                                                          device=device))
        if found < dup:  # every planted copy is a pair: fewer means the products are wrong, not slow
            raise RuntimeError(f"dedup found {found} pairs, planted {dup}")
        return n
    return [Row("dedup", f"one cluster: {n:,} items x {d} dims, threshold 0.1, block {block}", "fp32 (TF32 off)",
                f"{n:,}", measure(plan, step), "items/s")]


# ------------------------------------------------------------------------------------------------------ retrieval
def part_retrieval(plan: Plan) -> list[Row]:
    """Hierarchical retrieval's two steps on the device: the image -> centre probe over the paper's 2M text-cluster
    centres (products.TorchAssigner, fp16), and one bucket of the intra-cluster top-3 (topk.intra_cluster_topk: per
    cluster one product on the device, the float64 rerank of k + 8 candidates on the host), the paper's mean sizes:
    420 sentences and 99 images per cluster (0.84B and 198M over 2M clusters)."""
    import numpy as np
    import torch

    from realsyn_pl.construct.engine import products
    from realsyn_pl.construct.retrieve.topk import intra_cluster_topk

    d = 16 if plan.dry else 1024
    clusters, per_sent, per_img = (8, 20, 5) if plan.dry else (1024, 420, 99)
    device = "cuda" if plan.device.startswith("cuda") else "torch:cpu"
    rng = np.random.default_rng(0)
    sentences = rng.standard_normal((clusters * per_sent, d), dtype=np.float32)
    sentences /= np.linalg.norm(sentences, axis=1, keepdims=True)
    images = rng.standard_normal((clusters * per_img, d), dtype=np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    s_cl = np.repeat(np.arange(clusters), per_sent)
    i_cl = rng.permutation(np.repeat(np.arange(clusters), per_img))

    def bucket() -> int:
        idx, _ = intra_cluster_topk(images, i_cl, sentences, s_cl, 3, device)
        if (idx < 0).any():
            raise RuntimeError("intra-cluster top-3 left a slot empty")
        return len(images)
    rows = [Row("retrieval", f"intra-cluster top-3, bucket of {clusters:,} clusters x {per_sent} sentences, "
                f"{per_img} images each, {d} dims", "fp32 (TF32 off) + fp64 rerank", f"{len(images):,}",
                measure(plan, bucket), "images/s")]
    k = 64 if plan.dry else 2_000_000  # cluster.k of the paper preset
    probe_batch = 16 if plan.dry else 1024  # the paper preset's cluster.assign_batch (the product is batch x k)
    gen = torch.Generator(device=torch.device(plan.device)).manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, device=plan.device), dim=1)
    assigner = products.TorchAssigner(centres, device, batch=probe_batch, fp16=True)
    queries = images[: max(probe_batch * 4, 64)]

    def probe() -> int:
        ids, _ = assigner.search(queries, 1)
        return len(ids)
    rows.append(Row("retrieval", f"centre probe: top-1 of {k:,} centres x {d} dims (TorchAssigner)", "fp16",
                    str(assigner.batch), measure(plan, probe), "images/s"))  # rows per product after its 2 GiB cap
    return rows


def paper_sizes() -> dict[str, int]:
    """Parameters of each paper-size model as the GPU run builds it, built here on the meta device (no memory, no
    weights): the dry run's check that those configs resolve without a download."""
    from transformers import BlipForConditionalGeneration, GPT2LMHeadModel, LlamaForCausalLM

    def count(model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    sizes = {PAPER_CLIP: count(clip_model(False, "meta")[1])}
    with building("meta"):
        sizes["GPT-2 large"] = count(GPT2LMHeadModel(gpt2_config(False)))
        sizes["BLIP base"] = count(BlipForConditionalGeneration(blip_config(False)))
        sizes["Llama-3-8B"] = count(LlamaForCausalLM(llama_config(False)))
    return sizes


PARTS: dict[str, Callable[[Plan], list[Row]]] = {
    "embed": part_embed, "perplexity": part_perplexity, "caption": part_caption, "rewrite": part_rewrite,
    "fit": part_fit, "dedup": part_dedup, "retrieval": part_retrieval, "vllm": part_vllm,
}


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x) and x > 0
