"""Generated inputs for the build tests: images, corpora in the three formats, a local HTTP server, tiny models."""
from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import TINY_CLIP, TINY_NAME

GOOD = ["A man riding a red bike on the street.", "Two dogs play in the green park.",
        "A woman holding an umbrella walks down the road.", "Children running across a sandy beach."]
BAD = ["Visit www.example.com for deals today.", "I love this \U0001F600 so much.", "Hi there.",
       "The best hotel in Paris."]


def png(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A valid 1x1 PNG whose header claims w x h pixels (a decompression bomb that costs nothing to make)."""
    data = bytearray(png(1, 1))
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


CORRUPT = b"\x89PNG\r\n\x1a\n this is not really an image"


def local_corpus(folder: Path) -> tuple[list[Path], Path]:
    """Two local jsonl files + image files: good, too small, bad aspect, corrupt, bomb; plus bad rows."""
    folder.mkdir(parents=True, exist_ok=True)
    img_dir = folder / "img"
    img_dir.mkdir(exist_ok=True)
    (img_dir / "good.png").write_bytes(png(120, 100))
    (img_dir / "small.png").write_bytes(png(99, 200))
    rows_a = [
        {"texts": [" ".join(GOOD[:2]), BAD[0]], "images": [{"path": "good.png"}, {"path": "small.png"}]},
        {"texts": [GOOD[2] + " " + BAD[1]],
         "images": [{"bytes": base64.b64encode(png(301, 100)).decode()},  # aspect 3.01
                    {"bytes": base64.b64encode(CORRUPT).decode()}]},
        {"texts": [], "images": []},  # empty
        {"texts": "not a list"},  # malformed
    ]
    # GOOD[3].upper() is an exact duplicate of GOOD[3] once normalised
    rows_b = [{"texts": [GOOD[3], BAD[2], BAD[3], GOOD[3].upper()], "images": [{"bytes": base64.b64encode(bomb_png()).decode()}]},
              {"texts": ["   "], "images": []}]  # whitespace only: empty
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows_a) + '{"texts": ["truncat')
    with open(b, "wb") as fh:
        for r in rows_b:
            fh.write((json.dumps(r) + "\n").encode())
        fh.write(b'{"texts": ["caf\xe9 au lait"]}\n')  # latin-1, not UTF-8
    return [a, b], img_dir


def obelics_corpus(folder: Path, urls: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    texts = [[GOOD[0], None, GOOD[1]], [None, None], [BAD[0], None]]
    images = [[None, urls["good"], None], [urls["404"], urls["corrupt"]], [None, urls["slow"]]]
    meta = [json.dumps([None, {"src": urls["good"]}, None]), "[]", "[]"]
    t = pa.table({"texts": texts, "images": images, "metadata": meta})
    path = folder / "obelics-000.parquet"
    pq.write_table(t, path)
    return path


def mmc4_corpus(folder: Path, urls: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text_list": [GOOD[2], GOOD[3]], "image_info": [{"raw_url": urls["good"], "image_name": "x.jpg"}]},
            {"text_list": [], "image_info": []}]
    path = folder / "mmc4-000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        if self.path.startswith("/good"):
            self._send(200, png(150, 120))
        elif self.path.startswith("/corrupt"):
            self._send(200, CORRUPT)
        elif self.path.startswith("/slow"):
            time.sleep(1.5)
            self._send(200, png(150, 120))
        elif self.path.startswith("/stall"):
            time.sleep(6.0)  # beyond a 3 s client timeout, with margin for a loaded machine
            self._send(200, png(150, 120))
        elif self.path.startswith("/big"):
            self._send(200, png(600, 400))
        elif self.path.startswith("/optout"):
            # the publisher opts out of AI use (img2dataset's default disallowed directives)
            self._send(200, png(150, 120), {"X-Robots-Tag": "noai"})
        elif self.path.startswith("/flaky"):
            # fails the first time it is asked, then serves: exercises retries
            n = self.server.hits.get(self.path, 0)
            self.server.hits[self.path] = n + 1
            self._send(503, b"busy") if n == 0 else self._send(200, png(150, 120))
        else:
            self._send(404, b"not found")

    def _send(self, code: int, body: bytes, headers: dict | None = None):
        self.server.agents.add(self.headers.get("User-Agent", ""))
        try:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
            pass


class ImageServer:
    """A local HTTP server on 127.0.0.1 serving good images, 404s, slow responses, corrupt bytes, a flaky URL."""

    def __enter__(self) -> "ImageServer":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.hits, self.httpd.agents = {}, set()
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.urls = {k: f"{base}/{k}.png" for k in ("good", "404", "corrupt", "slow", "flaky", "optout", "big", "stall")}
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_lm(folder: Path) -> Path:
    """A random-init 2-layer GPT-2 and a word-level tokenizer, saved like a hub model (no download)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for s in GOOD + BAD + ["the a of and is on in"]:
        for w in s.lower().replace(".", " .").split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="[UNK]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


# Every unit in the test process, one after another, the models too (no Ray): for tests of what a stage computes.
# What Ray adds (1 vs several workers, retries, kills, lost nodes, actors) is tested on Ray: test_golden_build,
# test_slow, test_ray_engine, test_ray_cluster and the kill/resume tests of the model stages.
IN_PROCESS = {"ray.in_process": "true"}


def build_overrides(work: Path, inputs, fmt: str = "local", **extra) -> list[str]:
    items = {
        "work_dir": str(work), "input.format": fmt, "input.paths": "[" + ",".join(str(p) for p in inputs) + "]",
        "progress": "false", "trainer.accelerator": "cpu",
        "embed.model.name": TINY_NAME, "embed.model.pretrained": "null", "embed.workers": 0,
        "embed.batch_size": 4, "download.timeout_s": 0.5, "download.retries": 1, "download.backoff_s": 0.05,
        "perplexity.min_ppl": 0, "perplexity.max_ppl": 1e9,
        # one model actor: on 2 cores a second one costs a process start (torch, Lightning imports) and gains little
        "ray.max_actors": 1,
        # the tiny random-init CLIP's similarity scale means nothing: absolute thresholds are accepted whatever they
        # remove (the guard has its own tests in test_removal_guard.py)
        "dedup.accept_removal": "true", "balance.window.accept_removal": "true",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()] + [f"embed.model.custom={json.dumps(TINY_CLIP)}"]


def kill_when(proc, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` (a Popen with stdout piped as text) as soon as `ready()` is true; fail if it ends first."""
    import os
    import signal

    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError("finished before it could be killed:\n" + proc.stdout.read()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("never reached the kill point")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def open_clip_train_log(train_data: str, tmp_path: Path, num_samples: int) -> str:
    """Train one epoch of the tiny CLIP with open_clip_train (the reference trainer) on `train_data` (a brace
    pattern of tars); fail with its log's tail unless it exits 0; return the log."""
    import os
    import subprocess
    import sys

    from conftest import TINY_CLIP, TINY_NAME

    cfg_json = tmp_path / f"{TINY_NAME}.json"
    cfg_json.write_text(json.dumps(TINY_CLIP))
    launcher = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                "from open_clip_train.main import main; main(sys.argv[2:])")
    cmd = [sys.executable, "-c", launcher, str(cfg_json), "--model", TINY_NAME,
           "--train-data", train_data, "--dataset-type", "webdataset",
           "--batch-size", "4", "--workers", "0", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
           "--lr", "1e-4", "--warmup", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
           "--val-frequency", "0", "--log-every-n-steps", "1", "--logs", str(tmp_path / "oc"), "--name", "t",
           "--seed", "0", "--train-num-samples", str(num_samples)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def write_stage(stage, units, work) -> None:
    """A complete stage written in this process (a test's input): `work(u)` per unit, its marker, the manifest."""
    stage.begin()
    for u in units:
        stage.mark_shard_done(u, work(u), 0.0)
    assert stage.finalize(list(units), time.time())
