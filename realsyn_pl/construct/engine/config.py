"""Config schema of `build` and `predict` (dataset construction). Every threshold of stage 1 lives here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from realsyn_pl.config import ModelConfig
from realsyn_pl.construct.generate.config import CaptionConfig, MineTagsConfig, RewriteConfig, TagConfig


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
    max_bytes: int = 20_000_000  # larger bodies are abandoned (status "too_large"), by both fetchers
    deadline_s: float = 60.0    # most seconds one URL may take, attempts and redirects included (status "timeout")
    # Local image files (plain paths, file:// URLs) are read only under this folder (symlinks and .. resolved), else
    # dropped as local_path_refused; null = input.image_root, and with neither set every local path is refused.
    image_root: Optional[str] = None
    # img2dataset (pip install -e ".[download]") | builtin (extract/fetch.py: threads, no resize) | auto (img2dataset
    # when installed, else builtin)
    fetcher: str = "auto"
    processes: int = 1          # img2dataset processes_count per download task (the task asks Ray for this many CPUs)
    distributor: str = "multiprocessing"  # img2dataset distributor inside each task: multiprocessing | pyspark
    # Resize at download as the release recipe does (keep_ratio: shorter side -> image_size); "no" keeps originals.
    image_size: int = 224
    resize_mode: str = "keep_ratio"  # img2dataset resize_mode: no | keep_ratio | center_crop | border | keep_ratio_largest
    resize_only_if_bigger: bool = True
    # Publishers' opt-outs: a response whose X-Robots-Tag carries one of these is dropped (reason fetch_opted_out),
    # as img2dataset does by default. [] turns the check off.
    disallowed_header_directives: List[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    # Identification: img2dataset's neutral browser User-Agent plus "(compatible; <token>; +<project_url>)". The token
    # is also what UA-specific X-Robots-Tag lines ("img2dataset: noai") are matched against.
    user_agent_token: str = "img2dataset"
    # The URL publishers can read about this crawl at (set it to your project's page); both fetchers send it (the
    # img2dataset route fetches through extract/fetch.py).
    project_url: str = "https://github.com/rom1504/img2dataset"


@dataclass
class ImageFilterConfig:
    min_side: int = 100          # paper: drop min(width, height) < 100
    min_aspect: float = 1 / 3    # paper: drop width/height < 1/3 or > 3
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485  # larger is a decompression bomb (PIL's own warning limit)
    # false: records carry src_row (their row in download/images-i.parquet) and readers fetch the bytes from there, so
    # the bytes are stored once. true: an inline copy in every later record shard too, for a download dir that will
    # be deleted (or moved off this disk) before the later stages run.
    keep_bytes: bool = False


@dataclass
class SentenceFilterConfig:
    language: str = "en"         # pysbd segmenter language
    # longer paragraphs are cut (at a sentence end, else whitespace) into pieces this long for pysbd, whose time
    # grows faster than linearly with its input: a 1 MB paragraph whole took minutes
    split_chars: int = 4000
    min_words: int = 3           # paper: drop length < 3 or > 81 words
    max_words: int = 81
    # longer sentences are dropped (too_long) before the word count and the parser: 81 words fit in far fewer
    # characters, and spaCy's tokenizer takes time quadratic in a long run of punctuation (seconds at 4,000)
    max_chars: int = 1000
    drop_emoji: bool = True
    drop_urls: bool = True
    # CAT rule (DiHT): parser (spaCy dependency parse, construct/extract/cat_parse.py) | approximate (word lists,
    # no parser: an approximation, construct/extract/cat_rule.py) | off
    cat_rule: str = "parser"
    cat_model: str = "en_core_web_sm"  # spaCy pipeline: package name or local folder (parser + tagger used)
    cat_batch_size: int = 256    # sentences per nlp.pipe batch
    cat_processes: int = 1       # parser processes per rank (nlp.pipe n_process)
    cat_min_complexity: int = 1  # C1
    cat_require_action: bool = True


@dataclass
class EntropyConfig:
    # absolute: drop theta < threshold | quantile: drop the `quantile` lowest-entropy fraction of the pool (the
    # threshold is that quantile of theta over a seeded sample of whole shards, the same on every rank)
    mode: str = "absolute"
    threshold: float = 0.3       # drop theta < threshold
    quantile: float = 0.1
    quantile_sample: int = 1_000_000  # sentences the quantile is estimated from (memory: this many floats + texts)
    seed: int = 0
    # e | 2 | 10: the paper does not say. theta in base b is theta_e / ln(b), so a fixed threshold drops more
    # sentences in base 10 (theta_10 = 0.43 theta_e) and fewer in base 2 (theta_2 = 1.44 theta_e)
    log_base: str = "e"
    lowercase: bool = True
    # the vocabulary reduce: word counts split over this many tasks by ranges of a 64-bit word hash; a shard's
    # words are then looked up in the partitions' sorted arrays (memory-mapped), never a whole vocabulary per worker
    partitions: int = 16


@dataclass
class PerplexityConfig:
    # false: sentences pass through unscored (ppl null), recorded in the manifest; for runs with no LM at hand
    # (the offline demo). The paper filters with GPT-2 large.
    enabled: bool = True
    # transformers causal LM: hub name or local folder (a tiny random GPT-2 in the tests)
    model: str = "gpt2-large"
    min_ppl: float = 30.0        # keep min_ppl <= PPL <= max_ppl
    max_ppl: float = 200.0
    batch_size: int = 32
    max_tokens: int = 128        # longer sentences are truncated (81 words fit)
    workers: int = 0
    # Precision of this stage's Trainer, whatever trainer.precision says: PPL is a hard filter at 30 / 200, and
    # bf16 logits move PPL by 4-7% near those bounds, so sentences would flip in or out with the precision. "32"
    # (default, every preset) loads the LM in fp32 and scores in fp32; any Lightning precision string is accepted.
    # "bf16-fp32-logits": the LM's body under bf16 autocast, the head and log-softmax in fp32 (tests/gpu bounds its
    # PPL against fp32 at the cut-offs; presets switch to it once a GPU benchmark shows the bound holds).
    precision: str = "32"


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
    # absolute: pairs closer than `threshold` are duplicates | quantile: the threshold is found on this pool so that
    # the stage removes `quantile` of its input in total (exact + semantic; paper: images 0.305, sentences 0.276),
    # searched among pairs closer than `max_threshold`; the threshold used is in the manifest and the card
    mode: str = "absolute"
    threshold: float = 0.1       # cosine distance below which two items are duplicates (DanQing default)
    quantile: float = 0.305
    max_threshold: float = 0.3
    # quantile mode: pairs closer than this are duplicates without being ranked (only which items they connect is
    # kept), so a dense group of copies costs about one block of pairs, not all m^2 / 2 of them; the threshold found
    # must lie above it (a stage whose removal is already reached below it stops, naming it). 0 ranks every pair
    quantile_floor: float = 0.0
    # absolute mode: a threshold whose removal (exact + semantic, of the input) is outside [0.5x, 2x] the paper's
    # (images 30.5 %, sentences 27.6 %) stops the stage with the distances that would give it; true keeps it. Not
    # in the stage fingerprint: a rerun with it continues from the done units
    accept_removal: bool = False
    # exact step: reducers over 64-bit key ranges; 0 = derived from the pool: ceil(2 items / reducer_items)
    partitions: int = 64
    reducer_items: int = 50_000_000  # most keys one exact reducer may hold (a StageError before work above it)
    # semantic step (SemDeDup layout): spherical k-means into ceil(exact survivors / cluster_size) clusters, every
    # item in its nearest centre and, as a guest, its second-nearest; all pairs within a cluster (no k-NN cap)
    cluster_size: int = 10_000   # target items per cluster (a small pool is one cluster)
    niter: int = 20
    # most members + guests one pair search holds as float32 (200k x d=1024: 0.8 GB); a larger cluster is searched
    # in square tiles of bucket_items / 2 rows by as many columns
    bucket_items: int = 200_000
    block: int = 1024            # rows per similarity block (block x cluster float32 in memory: 0.8 GB at most)
    # candidate pairs folded at once into a unit's minimum spanning forest (~160 B each while folded): with the two
    # above, what bounds a pair unit's memory for any size of near-duplicate group (semdedup.task_memory_bound)
    pair_chunk: int = 1_000_000
    # auto | true | false: k-means on faiss GPUs when present; the pair blocks and the centre assignment on the
    # cluster's GPUs (torch) wherever it has them
    gpu: str = "auto"
    seed: int = 0


@dataclass
class ClusterConfig:
    # Text semantic clustering (paper: standard k-means, 2M centres over 0.84B sentence embeddings, FAISS).
    k: int = 2_000_000
    niter: int = 20              # paper silent; faiss default is 25, 20 is enough for a spherical fit
    # centre initialisation per training call: auto (afkmc2 up to 4096 centres, else random) | afkmc2 (k-means++
    # quality, O(k^2) seeding on one CPU thread) | kmeans++ (exact, O(n k d)) | random; afkmc2/kmeans++ are refused
    # above 16384 centres per call (kmeans.SEEDED_INIT_MAX_K)
    init: str = "auto"
    nredo: int = 1               # restarts, the best objective wins (each costs a full training run)
    # Points k-means trains on (a seeded uniform sample of all sentences; every sentence is assigned afterwards);
    # null = min_points_per_centre * k. Two-level k-means keeps it on disk, one shard per rank at a time.
    train_sample: Optional[int] = None
    min_points_per_centre: int = 40  # a sample below this per centre is reported (manifest kmeans.thin_sample)
    # flat (one k-means) | two_level (coarse sqrt(k) centres, then one sub-clustering per coarse centre with centres
    # proportional to its size, split over ranks, resumable) | auto (two_level above two_level_above)
    method: str = "auto"
    two_level_above: int = 65536
    coarse_k: int = 0            # two-level coarse centres; 0 = round(sqrt(k)) (paper k=2M: 1414)
    coarse_points_per_centre: int = 256
    assign_probe: int = 8        # two-level assignment: coarse centres whose children are searched
    # assignment of every sentence: auto (two_level for a two-level fit on the CPU, exact on a GPU) | exact | two_level
    assign: str = "auto"
    gpu: str = "auto"            # auto (faiss GPUs in the Ray cluster) | "true" | "false"; one GPU per task
    gpu_fp16: bool = True        # GPU centre index stored in fp16 (4 GB instead of 8 for 2M x 1024)
    seed: int = 0
    assign_batch: int = 65536    # rows per faiss search call during the streamed assignment


@dataclass
class RetrieveConfig:
    mode: str = "hierarchical"   # hierarchical (paper) | exact (brute force over every sentence; small data only)
    k: int = 3                   # texts kept per image (released data: text1..text3)
    nprobe: int = 1              # cluster centres searched per image (paper: top-1)
    # image -> centre probe: exact (every centre; on the task's GPU when the cluster has one: faiss fp16, or torch
    # where faiss has no GPU support) | two_level (through the cluster stage's coarse centres, cluster.assign_probe
    # of them; only for a two-level fit) | auto (two_level on CPUs where the fit is two-level, else exact)
    probe: str = "auto"
    # One resumable unit of the intra-cluster search: consecutive clusters holding at most bucket_sentences
    # sentences (kept fp16: 1M x d=1024 = 2 GB, plus their ids and texts) and at most clusters_per_bucket clusters,
    # and at most bucket_images of the images probing them (a bucket probed by more is split into several units)
    bucket_sentences: int = 1_000_000
    clusters_per_bucket: int = 16384
    bucket_images: int = 1_000_000
    blas_threads: int = 1        # BLAS threads for the small per-cluster products (run one rank per core instead)
    min_similarity: Optional[float] = None  # drop images whose best text is below this (paper: none)


@dataclass
class WindowConfig:
    mode: str = "absolute"       # absolute (low <= sim <= high) | quantile (bounds = quantiles of the observed sims)
    low: float = 0.51            # paper, EVA02-CLIP E/14-plus image-syn_text cosine
    high: float = 0.61
    # quantile mode: the paper removed 15% of pairs (29.7M of 198M), split between the ends unspecified
    q_low: float = 0.10
    q_high: float = 0.95
    # absolute mode: a window removing outside [0.5x, 2x] the paper's 15 % of the pairs with a similarity stops the
    # stage with the similarity quantiles; true keeps it. Not in the stage fingerprint (a rerun resumes)
    accept_removal: bool = False


@dataclass
class BalanceConfig:
    # Which text's similarity to the image the window applies to: syn_text (paper; needs the syn_text stage and
    # its embeddings) | text1 (retrieval similarity; explicit fallback until syn_text exists)
    similarity_text: str = "syn_text"
    syn_text_stage: str = "syn_text"       # stage dir with per-shard records {id (image id), syn_text}
    syn_emb_stage: str = "embed_syn_text"  # stage dir with per-shard emb-i.npy of syn_text (ids = image ids)
    window: WindowConfig = field(default_factory=WindowConfig)
    # keep | strip: the text embed_syn_text embeds for the window. The tags were picked by the same model's image-
    # text cosine and the rewriter writes them into syn_text, which raises the very score the window reads; strip
    # embeds syn_text without its image's own tags (whole phrases, case-insensitive; data_build/README.md)
    window_text_tags: str = "keep"
    k: int = 1_000_000           # image clusters (paper: 1M)
    niter: int = 20
    init: str = "auto"           # as cluster.init
    nredo: int = 1
    train_sample: Optional[int] = None  # as cluster.*: null = min_points_per_centre * k
    min_points_per_centre: int = 40
    method: str = "auto"
    two_level_above: int = 65536
    coarse_k: int = 0
    coarse_points_per_centre: int = 256
    assign_probe: int = 8
    assign: str = "auto"         # as cluster.assign
    gpu: str = "auto"
    caps: List[int] = field(default_factory=lambda: [20, 35, 180])  # RealSyn15M / 30M / 100M
    seed: int = 0
    # balanced (paper) | random: Table 5's ablation. random adds, per cap t, a seeded uniform sample of the same
    # in-window pool of exactly the balanced cap-t size (column random_cap; nested like the caps), which write writes
    sampling: str = "balanced"
    # in-window pairs per reducer of the in-cluster ranking (~200 B each at its peak, while sorting): the partition
    # count is ceil(pairs / reduce_items). Changes no byte of the output
    reduce_items: int = 10_000_000


@dataclass
class WriteConfig:
    cap: Optional[int] = 20      # which balance cap to write (one of balance.caps); null = every in-window pair
    samples_per_shard: int = 10_000  # img2dataset's default
    image_size: int = 224        # released recipe: --image_size 224 --resize_mode keep_ratio --resize_only_if_bigger
    resize_only_if_bigger: bool = True
    jpeg_quality: int = 95       # img2dataset's default encode_quality
    output_dir: Optional[str] = None  # default <work_dir>/write
    card: bool = True            # dataset card (markdown + PNG histograms) next to the shards
    # text1-3 as extracted: natural (default) | official (lower-cased and space-tokenised like the published
    # RealSyn files: "it 's", "do n't"; spaCy's tokenizer, data_build/README.md). syn_text is never changed
    text_style: str = "natural"


@dataclass
class ReleaseConfig:
    # The published RealSyn parquet files (HF Kaichengalex/RealSyn15M|30M|100M, data/train-*.parquet), local paths/globs
    paths: List[str] = field(default_factory=list)
    output_dir: Optional[str] = None  # default <work_dir>/release
    url_col: str = "raw_image_url"
    caption_col: str = "text1"
    extra_cols: List[str] = field(default_factory=lambda: ["text2", "text3", "syn_text"])
    samples_per_shard: int = 10_000
    image_size: int = 224
    resize_only_if_bigger: bool = True
    skip_reencode: bool = True
    jpeg_quality: int = 95
    # Extra attempts per URL. 0 is the authors' recipe (img2dataset's default); download.retries is the download
    # stage's and does not apply here.
    retries: int = 0
    max_rows: Optional[int] = None  # only the first rows (a partial download, like the notebook's 390 shards)


@dataclass
class PredictTrainerConfig:
    """The Trainer inside each model actor: one device, no process group (Ray hands out the shards)."""
    accelerator: str = "auto"    # auto (a GPU where the Ray cluster has one, else CPU) | gpu | cpu
    precision: str = "32"        # any Lightning precision; perplexity.precision overrides it for that stage


@dataclass
class StageResources:
    """What one unit of a stage asks of Ray; null = ray.task_cpus / ray.task_memory_gb (model stages: the actor's)."""
    cpus: Optional[float] = None
    gpus: Optional[float] = None
    memory_gb: Optional[float] = None


@dataclass
class RayConfig:
    # The Ray cluster to run on: null = RAY_ADDRESS when set (Ray's convention: "auto", "host:6379",
    # "ray://host:10001"), else an embedded instance on this machine, bound to 127.0.0.1 and stopped at the end.
    address: Optional[str] = None
    # true: no Ray at all; every unit runs in the driver process, one after another (a debugger, a profiler)
    in_process: bool = False
    # Size of the embedded instance: null = the machine's CPUs and GPUs; object store null = Ray's default (30% of RAM)
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_gb: Optional[float] = None
    # One plain task (a unit: a shard, bucket, partition or reducer): CPUs it is given (its BLAS / OpenMP / torch
    # threads) and memory Ray reserves for it when scheduling (null = none reserved)
    task_cpus: float = 1.0
    task_memory_gb: Optional[float] = None
    # One model actor holds one model: a GPU each where the cluster has GPUs (trainer.accelerator auto or gpu), else
    # actor_cpus CPUs each; max_actors caps how many are started (null = as many as the cluster fits)
    actor_cpus: float = 1.0
    max_actors: Optional[int] = None
    # Per-stage overrides of the above, by stage name: {dedup_images: {cpus: 4, memory_gb: 16}, embed_images: {gpus: 1}}
    stages: Dict[str, StageResources] = field(default_factory=dict)
    # A unit that fails (an exception, or its worker, actor or node lost) is tried again up to this many times;
    # after that the step finishes its other units and the build stops with one line naming the stage and unit
    max_retries: int = 2
    # Seconds between progress lines when stdout is not a terminal (a terminal gets one line updated in place)
    progress_s: float = 30.0


@dataclass
class BuildConfig:
    # build: extract | download | image_filter | sentence_filter | wordcount | entropy | perplexity | embed_images
    #        | embed_sentences | dedup_images | dedup_sentences | cluster | retrieve | balance | write | all
    #        | release (the published parquet files -> shards; not part of all) ;  predict: perplexity | embed_images | embed_sentences
    stage: str = "all"
    # With stage=all: stop after this stage (e.g. dedup_sentences = stage 1 only); null = run every stage.
    until: Optional[str] = None
    work_dir: str = "runs/build"
    # false: reuse complete stages, refuse stale ones | true: wipe and rebuild every stage of this run | a stage name
    # S (a stage of this run): wipe and rebuild S, then each later stage whose inputs changed since it was built
    # (the rest are skipped as complete); nothing before S is touched. A string: YAML/CLI booleans are read as such.
    force: str = "false"
    # Seeds model construction (random-init models in tests/demos must be identical in every actor and rerun).
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
    # Sentence dedup settings when they should differ from the images' (the paper gives none for sentences);
    # null = the same as `dedup`.
    dedup_text: Optional[DedupConfig] = None
    # stage 3 (caption, tag, mine_tags, rewrite): realsyn_pl/construct/generate/config.py
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    tag: TagConfig = field(default_factory=TagConfig)
    mine_tags: MineTagsConfig = field(default_factory=MineTagsConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    trainer: PredictTrainerConfig = field(default_factory=PredictTrainerConfig)
    # Where and how the units run (Ray): cluster address, resources per task and actor, retries, progress
    ray: RayConfig = field(default_factory=RayConfig)
