"""Config schemas of stage 3 (image semantic augmented generation): caption, tag, mine_tags, rewrite, and the
`fit-rewriter` / `make-instructions` commands. Every decoding setting and threshold of stage 3 lives here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

# The paper's OFA-base is not in transformers. BLIP base (COCO-caption fine-tuned, ~250M params) is the closest
# transformers-native equivalent: an encoder-decoder captioner of the same class (OFA-base: ~180M), trained on the
# same COCO captions, so it gives the same kind of short, literal caption. Any image-to-text model works.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
# The paper fine-tunes LLaMA3-8B; the instruct model is the usual base for such a merge/rewrite task.
DEFAULT_REWRITER = "meta-llama/Meta-Llama-3-8B-Instruct"


@dataclass
class CaptionConfig:
    # false: no captioner runs (none at hand, e.g. offline); the rewriter then gets an empty synthetic caption,
    # and its config (which the manifest records) says so.
    enabled: bool = True
    # transformers image-to-text model (AutoModelForImageTextToText): hub name or local folder.
    model: str = DEFAULT_CAPTIONER
    # Stage whose `{image_kind}-i.parquet` records (id + bytes or path) are captioned.
    image_stage: str = "dedup_images"
    image_kind: str = "images"
    # Text prefix for conditional captioners (BLIP: "a picture of"); null = unconditional. Removed from the output.
    prompt: Optional[str] = None
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    batch_size: int = 32
    workers: int = 2


@dataclass
class TagConfig:
    # Vocabulary files (one tag per line, '#' comments); "builtin:general" is the list shipped with the package
    # (realsyn_pl/data/tags/general_tags.txt). Tags mined by the `mine_tags` stage are added when use_mined=true.
    vocab: List[str] = field(default_factory=lambda: ["builtin:general"])
    use_mined: bool = True
    image_stage: str = "dedup_images"
    image_kind: str = "images"
    # The tagging model is embed.model: when the stored embeddings of image_stage were made with it (dedup_images:
    # its emb-i; image_filter: embed_images' emb-i), read them instead of re-encoding every image (only the tag
    # texts are encoded). false: always encode the images. The manifest's config says which path ran.
    reuse_embeddings: bool = True
    # Tag prompts; one text embedding per tag = the normalised mean over templates (CLIP zero-shot style).
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}.", "a picture of {}."])
    # Keep tags whose cosine similarity with the image is >= threshold, best first, at most top_n. The scale depends
    # on the CLIP model (EVA02-CLIP E/14+: matching tags score ~0.2-0.35); calibrate on a few hundred images.
    threshold: float = 0.2
    top_n: int = 10
    # top_n: the rule above (the paper's; RAM++ keeps every tag over its threshold). margin: keep only tags the
    # teacher is confident about -- the best ones down to the first similarity drop of >= margin to the next-ranked
    # tag, none when the top top_n + 1 have no such drop (a near-tie: the teacher cannot tell them apart). For a
    # template rewrite, which cannot weigh or correct tags the way the paper's LLM rewriter is told to, a wrong tag
    # goes straight into syn_text; the demo uses margin for that reason.
    select: str = "top_n"
    margin: float = 0.05
    batch_size: int = 64
    text_batch_size: int = 256  # tag prompts per text-encoder batch (once per run)
    workers: int = 2


@dataclass
class MineTagsConfig:
    # Sentence pool to mine (frequent nouns / noun phrases), as the paper added 4,000 tags from real-world sentences.
    sentence_stage: str = "dedup_sentences"
    sentence_kind: str = "sentences"
    top_k: int = 4000
    min_count: int = 5
    max_words: int = 2          # noun phrases of 1..max_words words (head noun + modifiers)
    exclude_general: bool = True  # do not re-add tags the general list already has
    # the reduce: phrase counts hash-partitioned over this many tasks (a plural and its singular share one), each
    # holding ~1/partitions of the distinct phrases; then their top_k lists merged (partitions x top_k rows)
    partitions: int = 16


@dataclass
class RewriteConfig:
    # hf: transformers causal LM with its chat template | vllm: same model through vLLM (pip install
    # 'realsyn_pl[vllm]') | template: no LLM, a deterministic merge for CPU smoke runs (marked in syn_meta)
    backend: str = "hf"
    model: str = DEFAULT_REWRITER
    # A LoRA adapter saved by `fit-rewriter` (merged into the model at load time); null = none.
    adapter: Optional[str] = None
    # The paper fine-tunes its rewriter. With an LLM backend (hf, vllm) and no adapter the syn_text stage refuses to
    # run unless this is true; then every row's syn_meta says "zero_shot": true and the dataset card says so.
    allow_zero_shot: bool = False
    # Records with the retrieved texts (id = image id + text_column); the retrieval stage's output by default
    # (retrieve/retrieved-i.parquet, column `texts` best first). A list column gives its first element (= text1).
    input_stage: str = "retrieve"
    input_kind: str = "retrieved"
    text_column: str = "texts"
    caption_stage: str = "caption"
    tag_stage: str = "tag"
    use_tags: bool = True
    max_tags: int = 10          # tags passed to the LLM (best first)
    # Tags are joined with this separator inside the prompt's tag slot.
    tag_separator: str = ", "
    system_prompt: Optional[str] = None
    max_input_tokens: int = 512  # longer prompts are dropped ("prompt_too_long"), never silently cut
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    # Output cleaning: outputs with fewer / more words are rejected with a counted reason.
    min_words: int = 3
    max_words: int = 77
    # drop: a rejected output drops the image | template: fall back to the template merge (marked in syn_meta)
    on_reject: str = "drop"
    batch_size: int = 16
    workers: int = 0
    # vLLM engine arguments (backend=vllm only), e.g. {tensor_parallel_size: 1, gpu_memory_utilization: 0.9}.
    vllm_args: Optional[Any] = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # null = peft's default for the architecture (LLaMA: q_proj, v_proj; GPT-2: c_attn).
    target_modules: Optional[List[str]] = None


@dataclass
class RewriterFitConfig:
    model: str = DEFAULT_REWRITER
    # Instruction jsonl: {"raw_caption", "synthetic_caption", "tags": [..] or "a, b", "target"} per line
    # (what make-instructions writes). Rows without a target are skipped and counted.
    data: str = "???"
    output_dir: str = "runs/rewriter"
    # lora (peft, saves an adapter) | full (saves the whole model)
    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    system_prompt: Optional[str] = None
    max_length: int = 512       # prompt + target tokens; longer examples are skipped and counted
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: int = 3
    max_steps: int = -1
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "32"
    progress: bool = True


@dataclass
class InstructionsConfig:
    # Records to turn into instructions: jsonl or parquet files with id, text1 (or raw_caption), caption (or
    # synthetic_caption), tags (list or comma string). Typically the rewrite stage's inputs joined with caption/tag.
    inputs: List[str] = field(default_factory=list)
    # Or a build's work_dir: its retrieve records (text1 = texts[0]) joined by image id with its caption and tag
    # stages (the stage names of the `rewrite` section's defaults), i.e. exactly what the rewriter will see.
    work_dir: Optional[str] = None
    max_tags: int = 10
    output: str = "runs/instructions.jsonl"
    # At most this many rows (the paper used 100K): a seeded uniform sample over every input file / shard (the
    # max_rows usable rows with the smallest blake2b(seed, id)), the same for the same seed; null = every row.
    max_rows: Optional[int] = None
    seed: int = 0
    # OpenAI-compatible endpoint: POST {base_url}/chat/completions
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4-turbo"
    # Name of the environment variable holding the API key (none is sent if unset).
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 128
    system_prompt: Optional[str] = None
    tag_separator: str = ", "
    concurrency: int = 4
    requests_per_second: float = 2.0  # client-side rate limit over all threads
    timeout_s: float = 60.0
    retries: int = 4            # extra attempts per row after the first (timeouts, connection errors, 429, 5xx)
    backoff_s: float = 1.0      # wait before retry k: backoff_s * 2**k (a Retry-After header wins)
    min_words: int = 3          # the same cleaning as the rewriter; rejected replies are counted, not written
    max_words: int = 77
