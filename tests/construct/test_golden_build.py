"""`build all` on Ray writes the bytes the pre-Ray pipeline wrote (tests/data/golden_build.json), on one worker (one
task at a time with 2 threads, one model actor) and on several (two tasks or two model actors at a time, 1 thread
each): every data file of every stage and step."""
import json

import pytest

import golden
from generate_support import tiny_captioner
from realsyn_pl.cli import main
from test_slow import one_worker


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return golden.corpus(root / "corpus")[0].parent, tiny_captioner(root / "captioner")


@pytest.mark.slow
def test_build_all_writes_the_recorded_bytes_on_one_worker_and_on_several(tmp_path, inputs):
    recorded = golden.load()
    if golden.canary() != recorded["canary"]:
        pytest.skip("this machine's float32 kernels round differently from the machine the hashes were recorded on "
                    "(tests/construct/golden.py canary); the 1-vs-N worker comparisons in test_slow still apply")
    corpus, captioner = inputs
    several, one = tmp_path / "several", tmp_path / "one"
    assert main(["build", "all"] + golden.overrides(several, corpus, captioner)) == 0
    one_worker(["build", "all"] + golden.overrides(one, corpus, captioner))
    for work in (several, one):
        got = golden.tree_hashes(work)
        wrong = sorted(k for k in set(got) | set(recorded["files"]) if got.get(k) != recorded["files"].get(k))
        assert not wrong, (work.name, len(wrong), wrong[:20])
        counts = {p.parent.name: json.loads(p.read_text())["counts"] for p in sorted(work.glob("*/manifest.json"))}
        assert counts == recorded["counts"]
    assert len(recorded["files"]) == 387  # the recording covers every stage and step
