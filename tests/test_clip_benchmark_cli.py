"""`python -m realsyn_pl.evaluation.clip_benchmark_cli`: its own mistakes are one line and exit 2, before
clip-benchmark is even imported; --help shows how to call it."""
import json

import pytest

from realsyn_pl.evaluation.clip_benchmark_cli import main


def test_help_shows_the_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m realsyn_pl.evaluation.clip_benchmark_cli --model-config NAME=CONFIG.json" in out


@pytest.mark.parametrize("args, needle", [
    (["--model-config", "tiny=x.json", "eval"], "clip_benchmark's arguments go after `--`"),
    (["--model-config", "tiny", "--", "eval"], "--model-config wants NAME=CONFIG.json, got 'tiny'"),
    (["--model-config", "tiny={missing}", "--", "eval"], "--model-config tiny: cannot read"),
    (["--model-config", "tiny={bad}", "--", "eval"], "is not JSON"),
    (["--modelconfig", "tiny={good}", "--", "eval"], "unexpected argument '--modelconfig' before `--`"),
])
def test_mistakes_are_one_line_and_exit_2(args, needle, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{embed_dim: 32")
    (tmp_path / "good.json").write_text(json.dumps({"embed_dim": 32}))
    paths = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json", "good": tmp_path / "good.json"}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
