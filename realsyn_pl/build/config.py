"""Config schema of `build` and `predict` (dataset construction). Every threshold of stage 1 lives here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from realsyn_pl.config import ModelConfig


@dataclass
class InputConfig:
    # obelics (parquet: texts/images aligned lists, metadata JSON) | mmc4 (jsonl[.gz]: text_list, image_info)
    # | local (jsonl or parquet: {"id"?, "texts": [...], "images": [{"path"|"url"|"bytes"}...]})
    format: str = "local"
    # Files or glob patterns; sorted, and a file's position in this list is part of every id made from it.
    paths: List[str] = field(default_factory=list)
    # Relative image paths (local format, MMC4 image_name) are resolved against this folder.
    image_root: Optional[str] = None
    # Documents per read batch (memory bound, not an output unit: output shard i = input file i).
    batch_rows: int = 256


@dataclass
class DownloadConfig:
    # Fetch URLs of images that came without bytes or a readable local file.
    enabled: bool = True
    threads: int = 16
    timeout_s: float = 10.0
    retries: int = 2            # extra attempts after the first, for timeouts / connection errors / 5xx / 429
    backoff_s: float = 0.5      # wait before retry k: backoff_s * 2**k
    max_bytes: int = 20_000_000  # larger bodies are abandoned (status "too_large")
    user_agent: str = "realsyn_pl/0.1 (+https://github.com/deepglint/RealSyn)"


@dataclass
class ImageFilterConfig:
    min_side: int = 100          # paper: drop min(width, height) < 100
    min_aspect: float = 1 / 3    # paper: drop width/height < 1/3 or > 3
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485  # larger is a decompression bomb (PIL's own warning limit)
    # Keep the image bytes in the output records (needed by later stages unless images live on disk).
    keep_bytes: bool = True


@dataclass
class SentenceFilterConfig:
    language: str = "en"         # pysbd segmenter language
    min_words: int = 3           # paper: drop length < 3 or > 81 words
    max_words: int = 81
    drop_emoji: bool = True
    drop_urls: bool = True
    # CAT rule (DiHT): heuristic (rule-based approximation, see build/cat_rule.py) | off
    cat_rule: str = "heuristic"
    cat_min_complexity: int = 1  # C1
    cat_require_action: bool = True


@dataclass
class EntropyConfig:
    threshold: float = 0.3       # drop theta < threshold
    log_base: str = "e"          # e | 2 | 10 (the paper does not say; the threshold depends on it)
    lowercase: bool = True


@dataclass
class PerplexityConfig:
    # transformers causal LM: hub name or local folder (a tiny random GPT-2 in the tests)
    model: str = "gpt2-large"
    min_ppl: float = 30.0        # keep min_ppl <= PPL <= max_ppl
    max_ppl: float = 200.0
    batch_size: int = 32
    max_tokens: int = 128        # longer sentences are truncated (81 words fit)
    workers: int = 0


@dataclass
class EmbedConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="EVA02-E-14-plus",
                                                                  pretrained="laion2b_s9b_b144k"))
    batch_size: int = 64
    workers: int = 2
    dtype: str = "float16"       # stored dtype: float16 | float32


@dataclass
class DedupConfig:
    exact: bool = True           # exact pass first (normalised text hash / image bytes hash)
    semantic: bool = True
    threshold: float = 0.1       # cosine distance below which two items are duplicates (DanQing default)
    k: int = 16                  # neighbours searched per item (pairs beyond the k-th are not seen)
    index: str = "flat"          # flat (exact inner product) | ivf (IVF-Flat, for large pools)
    nlist: int = 1024
    nprobe: int = 16
    query_chunk: int = 16384     # queries per resumable search step
    seed: int = 0


@dataclass
class PredictTrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: Optional[int] = None
    strategy: str = "auto"
    precision: str = "32"


@dataclass
class BuildConfig:
    # build: extract | download | image_filter | sentence_filter | wordcount | entropy | perplexity | embed_images
    #        | embed_sentences | dedup_images | dedup_sentences | all ;  predict: perplexity | embed_images | embed_sentences
    stage: str = "all"
    work_dir: str = "runs/build"
    force: bool = False          # wipe and rebuild the stage(s) named by `stage`
    # Seeds model construction (random-init models in tests/demos must be identical on every rank and rerun).
    seed: int = 0
    progress: bool = True
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    image_filter: ImageFilterConfig = field(default_factory=ImageFilterConfig)
    sentence_filter: SentenceFilterConfig = field(default_factory=SentenceFilterConfig)
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    trainer: PredictTrainerConfig = field(default_factory=PredictTrainerConfig)
