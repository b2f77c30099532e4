"""Stage `syn_text` (predict; config section `rewrite`): one synthetic text per image from text1 + caption + tags.

Input: `{rewrite.input_stage}/{input_kind}-i.parquet` (retrieve/retrieved-i: id = image id, texts[0] = text1), joined
by image id with `caption/captions-*.parquet` and `tag/tags-*.parquet` (the same shard index first; ids not found
there are looked up in every shard, so the join is right whatever the shard layout).
Output: `syn_text/images-i.parquet` {id, caption, tags, syn_text, syn_meta (JSON: backend, model, adapter,
n_new_tokens, finish, zero_shot, edits, fallback)} -- what stage 4 (balance) and the writer read.
Drops: empty_text1, no_caption, no_tags, prompt_too_long (before generation); rejected_empty, rejected_too_short,
rejected_too_long, rejected_prompt_echo (after cleaning, with rewrite.on_reject=drop). With on_reject=template a
rejected output is replaced by the template merge and counted as produced "template_fallback".
rewrite.backend=template runs no model: syn_text = models/prompt.template_merge, "<Caption>, <text1>, with <tags>"
(tags already in the text left out), marked backend=template in syn_meta. It is the offline stand-in for the paper's
fine-tuned LLaMA3 rewriter (CPU runs, the demo): it cannot weigh, drop or correct tags the way the LLM is prompted to,
so every tag it gets reaches syn_text; with noisy tags, keep only confident ones (tag.select=margin).
An LLM backend (hf, vllm) without rewrite.adapter is refused before any model is loaded unless
rewrite.allow_zero_shot=true; then syn_meta.zero_shot is true (and the manifest config's zero_shot, which the card reads).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.predict import PredictJob, PredictTask, SkipRow
from realsyn_pl.construct.engine.records import iter_rows, read_column, write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError
from realsyn_pl.construct.generate.config import RewriteConfig
from realsyn_pl.data.writers import ShardResult
from realsyn_pl.models.prompt import RewriteInput, clean_output, render_chat, template_merge

NAME = "syn_text"
OUT_KIND = "images"
BACKENDS = ("hf", "vllm", "template")
SYN_TEXT = pa.schema([("id", pa.string()), ("caption", pa.string()), ("tags", pa.list_(pa.string())),
                      ("syn_text", pa.string()), ("syn_meta", pa.string())])


def side_records(stage_dir: Path, kind: str, index: int, ids: list[str], columns: list[str]) -> dict[str, dict]:
    """{id: row} of `stage_dir/kind-*.parquet` for the given ids: shard `index` first, the rest only for misses."""
    want = set(ids)
    found: dict[str, dict] = {}
    same = stage_dir / f"{kind}-{index:05d}.parquet"
    if same.is_file():
        for r in iter_rows(same, ["id"] + columns):
            if r["id"] in want:
                found[r["id"]] = r
    missing = want - found.keys()
    if missing:
        lookup = pa.array(sorted(missing), pa.string())
        for p in sorted(stage_dir.glob(f"{kind}-?????.parquet")):
            if p == same:
                continue
            t = pq.read_table(p, columns=["id"] + columns)
            for r in t.filter(pc.is_in(t["id"], value_set=lookup)).to_pylist():
                found[r["id"]] = r
    return found


def full_fine_tune(model: str) -> bool:
    """`model` is a model fit-rewriter wrote with method=full (`<output_dir>/model` next to fit_rewriter.json)."""
    p = Path(model)
    if p.name != "model" or not (p.parent / "fit_rewriter.json").is_file():
        return False
    try:
        return json.loads((p.parent / "fit_rewriter.json").read_text()).get("method") == "full"
    except (OSError, ValueError, AttributeError):
        return False


def zero_shot(r: RewriteConfig) -> bool:
    """True when an LLM backend rewrites with a model that was not fine-tuned for it (the paper fine-tunes its
    rewriter): no adapter, and rewrite.model is not a full fine-tune written by fit-rewriter."""
    return r.backend in ("hf", "vllm") and not r.adapter and not full_fine_tune(r.model)


def check_zero_shot(r: RewriteConfig) -> None:
    """Refuse a silent zero-shot rewrite (checked before any model is loaded)."""
    if zero_shot(r) and not r.allow_zero_shot:
        raise StageError(f"rewrite.backend={r.backend} with rewrite.adapter=null would rewrite zero-shot with "
                         f"{r.model} (the paper fine-tunes its rewriter): set rewrite.adapter=<a fit-rewriter "
                         "adapter>, or rewrite.allow_zero_shot=true to rewrite zero-shot on purpose")


def weight_dtype(precision: str) -> Optional[torch.dtype]:
    """Load an 8B rewriter in the precision it will run in: fp32 weights would take 32 GB of host memory per rank
    before Lightning moves them to the device."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return None


class RewriteTask(PredictTask):
    name = NAME

    def __init__(self, cfg: BuildConfig):
        r = cfg.rewrite
        if r.backend not in BACKENDS:
            raise StageError(f"rewrite.backend must be one of {', '.join(BACKENDS)}, got {r.backend!r}")
        if r.on_reject not in ("drop", "template"):
            raise StageError(f"rewrite.on_reject must be drop or template, got {r.on_reject!r}")
        check_zero_shot(r)
        self.cfg, self.batch_size, self.workers = cfg, r.batch_size, r.workers
        self.input_stage, self.input_kind = r.input_stage, r.input_kind
        self.columns = ["id", r.text_column]
        work = Path(cfg.work_dir)
        self.caption_dir, self.tag_dir = work / r.caption_stage, work / r.tag_stage
        needed = ([r.caption_stage] if cfg.caption.enabled else []) + ([r.tag_stage] if r.use_tags else [])
        for name in needed:
            if not (Stage(work, name, {}).manifest() or {}).get("done"):
                raise StageError(f"rewrite needs the {name!r} stage: run `build {name}` first")
        self.tokenizer, self.lm = None, None
        if r.backend != "template":
            try:
                from realsyn_pl.models.rewriter import load_causal_lm, load_tokenizer

                if r.backend == "hf":
                    torch.manual_seed(cfg.seed)
                    bundle = load_causal_lm(r.model, r.adapter, weight_dtype(cfg.trainer.precision))
                    self.tokenizer, self.lm = bundle.tokenizer, bundle.model
                else:
                    self.tokenizer = load_tokenizer(r.model, r.adapter)
            except (OSError, ValueError) as err:
                raise StageError(f"rewrite.model={r.model!r} / adapter={r.adapter!r} cannot be loaded: "
                                 f"{str(err).splitlines()[0]}") from None
            if not getattr(self.tokenizer, "chat_template", None):
                raise StageError(f"rewrite.model={r.model!r}: its tokenizer has no chat_template")
        self.side: dict[str, dict] = {}

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        r = cfg.rewrite
        # allow_zero_shot only permits a run, it does not change the output; zero_shot records what ran
        return asdict(r) | {"batch_size": None, "workers": None, "seed": cfg.seed, "rewrite_seed": r.seed,
                            "captions": cfg.caption.enabled, "allow_zero_shot": None, "zero_shot": zero_shot(r)}

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg)

    @staticmethod
    def inputs_of(cfg: BuildConfig) -> list[str]:
        """The stage directories the rewrite reads: the retrieved texts and the captions and tags joined to them."""
        r = cfg.rewrite
        joined = ([r.caption_stage] if cfg.caption.enabled else []) + ([r.tag_stage] if r.use_tags else [])
        return list(dict.fromkeys([r.input_stage, *joined]))

    def stage_inputs(self) -> list[str]:
        return self.inputs_of(self.cfg)

    @classmethod
    def job(cls, cfg: BuildConfig) -> PredictJob:
        r = cfg.rewrite
        return PredictJob(NAME, r.input_stage, r.input_kind, cls.config_of(cfg), cls.inputs_of(cfg), partial(cls, cfg))

    # ---- join
    def begin_shard(self, index: int, path: Path) -> None:
        self.side = self._join(index, path)

    def _join(self, index: int, path: Path) -> dict[str, dict]:
        ids = read_column([path], "id")
        if self.cfg.caption.enabled:
            caps = side_records(self.caption_dir, "captions", index, ids, ["caption"])
        else:  # captioning switched off: every image gets an empty synthetic caption
            caps = {i: {"caption": ""} for i in ids}
        tags = side_records(self.tag_dir, "tags", index, ids, ["tags"]) if self.cfg.rewrite.use_tags else {}
        return {i: {"caption": caps[i]["caption"] if i in caps else None,
                    "tags": tags[i]["tags"] if i in tags else None} for i in ids}

    def rewrite_input(self, row: dict[str, Any], side: dict[str, Any]) -> RewriteInput:
        r = self.cfg.rewrite
        text1 = row.get(r.text_column)
        if isinstance(text1, (list, tuple)):  # retrieve's `texts`, best first: text1 is the first
            text1 = text1[0] if text1 else None
        if not text1 or not str(text1).strip():
            raise SkipRow("empty_text1")
        if side.get("caption") is None:
            raise SkipRow("no_caption")
        if r.use_tags and side.get("tags") is None:
            raise SkipRow("no_tags")
        tags = list(side.get("tags") or [])[: r.max_tags] if r.use_tags else []
        return RewriteInput(str(text1), side["caption"], tags)

    # ---- predict contract
    def load(self, row: dict[str, Any]) -> Any:
        r = self.cfg.rewrite
        x = self.rewrite_input(row, self.side.get(row["id"], {}))
        if r.backend == "template":
            return row["id"], x
        prompt = render_chat(self.tokenizer, x, r.system_prompt, r.tag_separator)
        # the chat template already holds BOS/special tokens
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > r.max_input_tokens:
            raise SkipRow("prompt_too_long")
        return row["id"], (prompt if r.backend == "vllm" else ids)

    def collate(self, items: list[tuple[str, Any]]) -> Any:
        from realsyn_pl.models.rewriter import batch_seed

        r = self.cfg.rewrite
        seed = batch_seed(r.seed, items[0][0])
        if r.backend == "template":
            return [x for _, x in items]
        if r.backend == "vllm":
            return {"prompts": [p for _, p in items], "seed": seed}
        n = max(len(ids) for _, ids in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), n), pad, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for j, (_, ids) in enumerate(items):  # left padding: every prompt ends where generation starts
            input_ids[j, n - len(ids):] = torch.tensor(ids)
            mask[j, n - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "seed": seed}

    def build_module(self):
        from realsyn_pl.models import rewriter as R

        r = self.cfg.rewrite
        if r.backend == "template":
            return R.TemplateRewriter()
        if r.backend == "vllm":
            return R.VllmRewriter(r.model, r.adapter, r, r.vllm_args)
        return R.HFRewriter(self.lm, self.tokenizer, R.hf_generation_kwargs(r, self.tokenizer))

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        r = self.cfg.rewrite
        side = self._join(result.index, input_path)
        rows_in = {row["id"]: row for row in iter_rows(input_path, self.columns)}
        c, rows = result.skip_counts(), []
        out = result.outputs
        for j, i in enumerate(result.ids):
            x = self.rewrite_input(rows_in[i], side[i])
            meta: dict[str, Any] = {"backend": r.backend, "model": None if r.backend == "template" else r.model,
                                    "adapter": r.adapter, "n_new_tokens": int(out["n_new_tokens"][j]),
                                    "finish": out["finish"][j], "zero_shot": zero_shot(r)}
            cleaned = clean_output(out["raw"][j], r.min_words, r.max_words)
            meta["edits"] = cleaned.edits
            text = cleaned.text
            if text is None:
                if r.on_reject == "drop":
                    c.drop(f"rejected_{cleaned.reason}")
                    continue
                text = template_merge(x)
                meta.update(backend="template", fallback=cleaned.reason)
                c.produce("template_fallback")
            c.keep()
            rows.append({"id": i, "caption": x.synthetic_caption, "tags": x.tags, "syn_text": text,
                         "syn_meta": json.dumps(meta, sort_keys=True)})
        write_records(stage.path(OUT_KIND, result.index), rows, SYN_TEXT)
        return c


def run(cfg: BuildConfig, ex: Executor) -> bool:
    check_zero_shot(cfg.rewrite)
    return run_predict_task(RewriteTask.job(cfg), ex, cfg.work_dir, cfg.trainer, cfg.force)
