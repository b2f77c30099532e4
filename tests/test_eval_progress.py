"""`eval` into a log file: no carriage-return progress bars (neither ours nor clip-benchmark's), with progress off or
on; with progress on, plain progress lines instead; a bar only on a terminal."""
import re
import sys

import pytest

from eval_support import overrides, tiny_checkpoint
from realsyn_pl.cli import main
from realsyn_pl.evaluation import synthetic
from realsyn_pl.evaluation.progress import EvalProgress


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_progress")
    root = synthetic.write_classification(folder / "colours", {"test": 37}, seed=3, px=32, per_shard=20,
                                          labeling="colour")
    entry = f"[{{key: colours, dataset: wds/colours, root: '{root}'}}]"
    return tiny_checkpoint(folder, seed=0), entry


def test_no_carriage_returns_in_redirected_output_with_progress_off(setup, tmp_path, capfd):
    ckpt, entry = setup
    assert main(["eval"] + overrides(ckpt, tmp_path / "out", entry)) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert "colours zeroshot_classification: colours=" in out
    assert "eval: colours" not in out  # progress off: result lines only


def test_progress_on_is_plain_lines_in_a_log(setup, tmp_path, capfd):
    ckpt, entry = setup
    assert main(["eval"] + overrides(ckpt, tmp_path / "out", entry, progress_bar="true", progress_s=0)) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    lines = [re.sub(r", \d+ s(, ETA .*)?$", "", line) for line in out.splitlines()]  # times vary
    # 37 test images in batches of 16; then clip-benchmark's loops: 6 class names, and the 3 feature batches again
    assert [line for line in lines if line.startswith("eval: colours test images: ")] == [
        f"eval: colours test images: {i} batches" for i in (1, 2, 3)]
    assert [line for line in lines if line.startswith("eval: colours zero-shot: ")] == [
        *(f"eval: colours zero-shot: {i}/6 class names" for i in range(1, 7)),
        *(f"eval: colours zero-shot: {i}/3 batches" for i in range(1, 4))]


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("enabled, rank, stdout_tty, stderr_tty, mode", [
    (True, 0, True, True, "bar"),
    (True, 0, False, True, "lines"),  # `eval > log`
    (True, 0, True, False, "lines"),  # `eval 2> log`
    (False, 0, True, True, "off"),
    (True, 1, True, True, "off"),  # one rank reports
])
def test_a_bar_only_when_stdout_and_stderr_are_terminals(monkeypatch, enabled, rank, stdout_tty, stderr_tty, mode):
    monkeypatch.setattr(sys, "stdout", _Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", _Stream(stderr_tty))
    assert EvalProgress(enabled, 30.0, rank).mode == mode
