"""`python -m realsyn_pl make-instructions --config ...`: instruction data for fit-rewriter from any OpenAI-compatible
chat endpoint (the paper: GPT-4 Turbo, 100K examples; a local vLLM server works the same).

Each input record {id, text1|raw_caption, caption|synthetic_caption, tags} is sent once as the paper's prompt
(models/prompt.py) to POST {base_url}/chat/completions; the cleaned reply is the target.
- Resume: the output jsonl is the state. Every finished row (a target, or a reply rejected by cleaning, written with
  target null and its reason) is one appended, flushed line; a restart reads the ids already there and never
  requests them again. A line cut by a crash is removed on restart. Rows that failed on transport are not written,
  so the next run retries them.
- Bounded: at most 1 + retries requests per row, at most `concurrency` in flight, at most requests_per_second
  started (client-side token spacing over all threads); max_rows caps the output file's rows.
- Sample: with max_rows, the rows sent are a seeded uniform sample over every input (not the first rows): a first
  pass keeps, in a bounded heap, the max_rows - (rows already finished) usable unfinished rows with the smallest key
  blake2b(seed, id); a second pass sends those. Memory O(max_rows); the same seed gives the same sample (a resumed
  run completes the same sample), another seed another one.
- Retried: timeouts, connection errors, HTTP 429 and 5xx, unparseable bodies; backoff_s * 2**k, or Retry-After.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from realsyn_pl.config import ConfigError
from realsyn_pl.construct.generate.config import InstructionsConfig
from realsyn_pl.models.prompt import RewriteInput, chat_messages, clean_output
from realsyn_pl.models.rewriter_sft import instruction_input


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, across threads."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class Reply:
    text: Optional[str]       # None = failed after every attempt
    error: Optional[str]      # the last error when failed
    attempts: int


class ChatClient:
    def __init__(self, cfg: InstructionsConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.limiter = RateLimiter(cfg.requests_per_second)
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.requests = 0
        self._count_lock = threading.Lock()

    def _once(self, body: bytes) -> tuple[Optional[str], Optional[str], bool, Optional[float]]:
        """(text, error, retryable, retry_after)."""
        self.limiter.acquire()
        with self._count_lock:
            self.requests += 1
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"]), None, False, None
        except urllib.error.HTTPError as err:
            retry_after = err.headers.get("Retry-After") if err.headers else None
            try:
                wait_s = float(retry_after) if retry_after else None
            except ValueError:
                wait_s = None
            return None, f"http_{err.code}", err.code == 429 or err.code >= 500, wait_s
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            kind = "timeout" if "timed out" in str(reason).lower() or isinstance(reason, TimeoutError) else "connection"
            return None, kind, True, None
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "bad_response", True, None

    def complete(self, messages: list[dict[str, str]]) -> Reply:
        body = json.dumps({"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                           "max_tokens": self.cfg.max_tokens}).encode("utf-8")
        error = None
        for attempt in range(self.cfg.retries + 1):
            text, error, retryable, retry_after = self._once(body)
            if text is not None:
                return Reply(text, None, attempt + 1)
            if not retryable or attempt == self.cfg.retries:
                return Reply(None, error, attempt + 1)
            time.sleep(retry_after if retry_after is not None else self.cfg.backoff_s * 2 ** attempt)
        return Reply(None, error, self.cfg.retries + 1)


def read_inputs(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of jsonl / parquet files in order; rows without an id get `<file index>-<row>`."""
    from realsyn_pl.construct.engine.records import iter_rows

    for f, path in enumerate(paths):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"input not found: {path}")
        rows = iter_rows(p) if p.suffix == ".parquet" else _jsonl(p)
        for n, row in enumerate(rows):
            if isinstance(row, dict):
                row.setdefault("id", f"{f}-{n}")
            yield row


def build_rows(work_dir: str, max_tags: int) -> Iterator[dict[str, Any]]:
    """{id, text1, caption, tags} per retrieved image of a build (rows without a caption or tags are yielded without
    them and counted as missing input), shard by shard: memory stays one shard."""
    from realsyn_pl.construct.engine.records import iter_rows, read_column
    from realsyn_pl.construct.engine.stage import StageError, input_indices
    from realsyn_pl.construct.generate.config import RewriteConfig
    from realsyn_pl.construct.generate.rewrite import side_records

    r, work = RewriteConfig(), Path(work_dir)
    try:
        indices = input_indices(work / r.input_stage, r.input_kind)
    except StageError as err:
        raise ConfigError(str(err)) from None
    for i in indices:
        path = work / r.input_stage / f"{r.input_kind}-{i:05d}.parquet"
        ids = read_column([path], "id")
        caps = side_records(work / r.caption_stage, "captions", i, ids, ["caption"])
        tags = side_records(work / r.tag_stage, "tags", i, ids, ["tags"])
        for row in iter_rows(path, ["id", r.text_column]):
            texts = row[r.text_column]
            text1 = texts[0] if isinstance(texts, list) and texts else texts
            out = {"id": row["id"], "text1": text1}
            if row["id"] in caps and row["id"] in tags:
                out.update(caption=caps[row["id"]]["caption"], tags=list(tags[row["id"]]["tags"])[:max_tags])
            yield out


def _jsonl(p: Path) -> Iterator[Any]:
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None


def done_ids(output: Path) -> set[str]:
    """Ids already in the output; a last line cut by a crash is removed first."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(output, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    ids = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not a finished row: it will be requested again
    return ids


def _flat(row: dict[str, Any]) -> Optional[RewriteInput]:
    # parquet rows from the retrieval stage carry `texts` (best first) instead of text1
    if "text1" not in row and "raw_caption" not in row and isinstance(row.get("texts"), list) and row["texts"]:
        row = {**row, "text1": row["texts"][0]}
    return instruction_input(row)


def sample_key(seed: int, row_id: str) -> int:
    """A uint64 per id from blake2b(seed, id), as the balance stage keys its pairs."""
    salt = str(int(seed)).encode()
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8, key=salt).digest(), "little")


def seeded_sample(rows: Iterable[Optional[dict[str, Any]]], n: int, seed: int,
                  exclude: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Ids of a uniform sample of n usable rows (not in `exclude`): the n smallest sample_key(seed, id), kept in a
    bounded max-heap, so memory is O(n) whatever the input size. All usable ids when there are fewer."""
    heap: list[tuple[int, str]] = []  # (-key, id): the root is the largest key kept
    kept: set[str] = set()
    if n <= 0:
        return kept
    for row in rows:
        if row is None:
            continue
        row_id = str(row["id"])
        if row_id in exclude or row_id in kept or _flat(row) is None:
            continue
        key = sample_key(seed, row_id)
        if len(heap) < n:
            heapq.heappush(heap, (-key, row_id))
            kept.add(row_id)
        elif key < -heap[0][0]:
            _, out = heapq.heapreplace(heap, (-key, row_id))
            kept.discard(out)
            kept.add(row_id)
    return kept


def run_make_instructions(cfg: InstructionsConfig) -> dict[str, Any]:
    if not cfg.inputs and not cfg.work_dir:
        raise ConfigError("give the records to turn into instructions: inputs=[files] or work_dir=<a build>")
    out_path = Path(cfg.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished = done_ids(out_path)
    budget = None if cfg.max_rows is None else max(0, cfg.max_rows - len(finished))
    client = ChatClient(cfg)
    counts: Counter = Counter()
    started = time.time()

    def work(row_id: str, x: RewriteInput) -> tuple[str, RewriteInput, Reply]:
        return row_id, x, client.complete(chat_messages(x, cfg.system_prompt, cfg.tag_separator))

    with open(out_path, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, cfg.concurrency)) as pool:
        pending: set[Future] = set()

        def drain() -> None:
            """Write the rows whose requests finished (waits for at least one)."""
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                row_id, x, reply = fut.result()
                if reply.text is None:
                    counts[f"failed_{reply.error}"] += 1
                    continue
                cleaned = clean_output(reply.text, cfg.min_words, cfg.max_words)
                rec = {"id": row_id, "raw_caption": x.raw_caption, "synthetic_caption": x.synthetic_caption,
                       "tags": x.tags, "target": cleaned.text, "model": cfg.model}
                if cleaned.text is None:
                    rec["rejected"] = cleaned.reason
                    counts[f"rejected_{cleaned.reason}"] += 1
                else:
                    counts["written"] += 1
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()

        def rows_of_inputs() -> Iterator[Optional[dict[str, Any]]]:
            return read_inputs(cfg.inputs) if cfg.inputs else build_rows(cfg.work_dir, cfg.max_tags)

        # max_rows: a seeded uniform sample over every input (first pass), not the first rows
        sample = None if budget is None else seeded_sample(rows_of_inputs(), budget, cfg.seed, finished)
        submitted = 0
        for row in rows_of_inputs():
            if budget is not None and submitted >= budget:
                break
            if row is None:
                counts["skipped_bad_row"] += 1
                continue
            row_id = str(row["id"])
            if row_id in finished:
                counts["skipped_done"] += 1
                continue
            x = _flat(row)
            if x is None:
                counts["skipped_missing_input"] += 1
                continue
            if sample is not None and row_id not in sample:
                counts["not_sampled"] += 1
                continue
            finished.add(row_id)  # a repeated id in the inputs is requested once
            pending.add(pool.submit(work, row_id, x))
            submitted += 1
            while len(pending) >= 2 * max(1, cfg.concurrency):  # bounded in-flight work and memory
                drain()
        while pending:
            drain()

    summary = {"output": str(out_path), "requests": client.requests, "seconds": round(time.time() - started, 3),
               **dict(sorted(counts.items()))}
    print("[make-instructions] " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return summary
