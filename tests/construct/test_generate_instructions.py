"""make-instructions against a local OpenAI-compatible server on 127.0.0.1 that errors, rate-limits and stalls:
retries are bounded, rejected replies are counted, and a restart never re-requests a finished row."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from realsyn_pl.cli import main
from realsyn_pl.construct.generate.instructions import sample_key, seeded_sample
from realsyn_pl.models.prompt import PAPER_PROMPT

RAW = re.compile(r"Raw caption:(.*?), synthetic caption:")


class _Chat(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        assert prompt.startswith(PAPER_PROMPT.split("Raw caption:")[0])
        raw = RAW.search(prompt).group(1)
        k = int(raw.rsplit(" ", 1)[1])
        srv = self.server
        with srv.lock:
            srv.log.append(raw)
            n = srv.hits.get(raw, 0)
            srv.hits[raw] = n + 1
        if k == 5:
            return self._send(503, {"error": "down"})  # always failing: never written, retried on restart
        if n == 0 and k % 4 == 1:
            return self._send(500, {"error": "boom"})
        if n == 0 and k % 4 == 2:
            time.sleep(1.0)  # the client times out first
        if n == 0 and k % 4 == 3:
            return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
        text = "Sure." if k == 6 else f'Here is the merged caption: "A merged sentence about {raw}."'
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _send(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def chat_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    httpd.daemon_threads = True
    httpd.log, httpd.hits, httpd.lock = [], {}, threading.Lock()
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _inputs(path, n=10):
    path.write_text("".join(json.dumps({"id": f"img-{k}", "text1": f"a raw caption number {k}",
                                        "caption": "a synthetic caption", "tags": ["tag a", "tag b"]}) + "\n"
                            for k in range(n)))
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flaky_server_retries_bounded_and_restart_does_not_rerequest(tmp_path, chat_server):
    out = tmp_path / "instr.jsonl"
    base = ["make-instructions", f"inputs=[{_inputs(tmp_path / 'in.jsonl')}]", f"output={out}",
            f"base_url=http://127.0.0.1:{chat_server.server_address[1]}/v1", "concurrency=3",
            "requests_per_second=200", "timeout_s=0.3", "retries=2", "backoff_s=0.01"]
    assert main(base + ["max_rows=6"]) == 0
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    # a seeded sample of 6 rows was taken; row 5 (if sampled) failed three times (not written)
    taken = seeded_sample(_rows(tmp_path / "in.jsonl"), 6, seed=0)
    assert len(taken) == 6 and sorted(ids) == sorted(taken - {"img-5"})
    assert len(chat_server.log) <= 6 * 3 and chat_server.hits.get("a raw caption number 5", 3) == 3
    for r in rows:
        k = int(r["id"].split("-")[1])
        if k != 6:  # row 6's reply is rejected (checked below)
            assert r["target"] == f"A merged sentence about a raw caption number {k}."  # preamble, quotes cleaned
        assert r["raw_caption"] == f"a raw caption number {k}" and r["tags"] == ["tag a", "tag b"]
    for k in {1, 2, 3} & {int(i.split("-")[1]) for i in taken}:  # 500, timeout, 429: answered on the 2nd attempt
        assert chat_server.hits[f"a raw caption number {k}"] == 2

    # a crash mid-write leaves a cut line: it is removed, and that row is requested again
    with open(out, "a") as fh:
        fh.write('{"id": "img-7", "raw_capt')
    first_run = len(chat_server.log)
    assert main(base) == 0
    second = chat_server.log[first_run:]
    first_done = {f"a raw caption number {i.split('-')[1]}" for i in ids}
    assert not first_done & set(second)  # finished rows not re-requested
    assert set(second) == {f"a raw caption number {k}" for k in range(10)} - first_done
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 9 and "img-5" not in ids
    rejected = [r for r in rows if r["target"] is None]
    assert [(r["id"], r["rejected"]) for r in rejected] == [("img-6", "too_short")]
    # a third run only retries the failed row
    third_from = len(chat_server.log)
    assert main(base) == 0
    assert set(chat_server.log[third_from:]) == {"a raw caption number 5"}


def test_rate_limit_spaces_requests(tmp_path, chat_server):
    out = tmp_path / "instr.jsonl"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{k}", "text1": f"a raw caption number {4 * k}", "caption": "c",
                                       "tags": "x, y"}) + "\n" for k in range(5)))  # k*4 % 4 == 0: no faults
    t0 = time.time()
    assert main(["make-instructions", f"inputs=[{inp}]", f"output={out}", "concurrency=5",
                 f"base_url=http://127.0.0.1:{chat_server.server_address[1]}/v1", "requests_per_second=10"]) == 0
    assert time.time() - t0 >= 0.4  # 5 starts at least 0.1 s apart
    assert len(_rows(out)) == 5 and len(chat_server.log) == 5


def test_missing_inputs_is_a_one_line_error(tmp_path, capsys):
    assert main(["make-instructions", f"inputs=[{tmp_path / 'nope.jsonl'}]", f"output={tmp_path / 'o.jsonl'}"]) == 2
    assert "input not found" in capsys.readouterr().err


def test_instructions_from_a_build_work_dir(tmp_path, chat_server):
    from generate_support import image_stage, retrieval_stage, stage3_overrides, stage_rows, tiny_captioner

    work = tmp_path / "w"
    ids = image_stage(work, 2, 2, bad={"doc-00001-000001/img-0": b"junk"})  # no caption, no tags: skipped
    retrieval_stage(work, {0: ids[2:], 1: ids[:2]})  # shard layout differs from the images': joined by id
    ov = stage3_overrides(work, tiny_captioner(tmp_path / "cap"))
    assert main(["build", "caption"] + ov) == 0 and main(["build", "tag"] + ov) == 0
    out = tmp_path / "instr.jsonl"
    assert main(["make-instructions", f"work_dir={work}", f"output={out}", "max_tags=2",
                 f"base_url=http://127.0.0.1:{chat_server.server_address[1]}/v1", "requests_per_second=100"]) == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert sorted(rows) == sorted(set(ids) - {"doc-00001-000001/img-0"})
    caps = {r["id"]: r["caption"] for r in stage_rows(work, "caption", "captions")}
    tags = {r["id"]: r["tags"] for r in stage_rows(work, "tag", "tags")}
    for i, r in rows.items():
        assert r["synthetic_caption"] == caps[i] and r["tags"] == tags[i][:2]
        assert r["raw_caption"].startswith("a man riding a red bike on street number")


def test_max_rows_is_a_seeded_sample_over_every_shard(tmp_path, chat_server):
    shards = []
    for f in range(5):  # 5 input files of 20 rows; raw numbers are multiples of 4: the server never faults
        p = tmp_path / f"in-{f}.jsonl"
        p.write_text("".join(json.dumps({"id": f"s{f}-r{k}", "text1": f"a raw caption number {4 * (20 * f + k)}",
                                         "caption": "c", "tags": ["t"]}) + "\n" for k in range(20)))
        shards.append(p)

    def run(name, *extra):
        out = tmp_path / f"{name}.jsonl"
        assert main(["make-instructions", f"inputs=[{','.join(map(str, shards))}]", f"output={out}",
                     f"base_url=http://127.0.0.1:{chat_server.server_address[1]}/v1", "requests_per_second=500",
                     "concurrency=4", *extra]) == 0
        return [r["id"] for r in _rows(out)]

    a, again, other = run("a", "max_rows=10"), run("again", "max_rows=10"), run("other", "max_rows=10", "seed=7")
    assert len(a) == len(set(a)) == 10 and sorted(a) == sorted(again)  # exactly N, the same for the same seed
    assert sorted(a) != sorted(other) and len(other) == 10  # another seed, another sample
    assert {i.split("-")[0] for i in a} - {"s0"}  # not the first rows: later shards are drawn from
    every = [json.loads(line) for p in shards for line in p.read_text().splitlines()]
    assert set(a) == set(sorted((r["id"] for r in every), key=lambda i: sample_key(0, i))[:10])
    assert sorted(run("all", "max_rows=1000")) == sorted(r["id"] for r in every)  # fewer rows than N: all of them


def test_seeded_sample_is_the_n_smallest_keys_and_skips_unusable_rows():
    rows = ({"id": f"r{k}", "text1": "t", "caption": "c", "tags": []} if k % 10 else {"id": f"r{k}"}
            for k in range(5000))
    got = seeded_sample(rows, 50, seed=3, exclude={"r1"})
    usable = [f"r{k}" for k in range(5000) if k % 10 and k != 1]
    assert got == set(sorted(usable, key=lambda i: sample_key(3, i))[:50])
    assert seeded_sample([{"id": "x", "text1": "t", "caption": "c", "tags": []}], 5, seed=0) == {"x"}
