"""benchmarks/gpu_throughput.py: its CPU dry run (every part but fit, in this process), the fit part's GPU command
lines, the projection's arithmetic and the command line's mistakes."""
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _gpu_parts as parts  # noqa: E402
import _gpu_projection as proj  # noqa: E402
import gpu_throughput as gt  # noqa: E402

# the fit part starts both trainers as processes (about a minute on 2 cores): its command lines are checked below,
# and `python benchmarks/gpu_throughput.py --dry-run` runs it
IN_PROCESS = ["embed", "perplexity", "caption", "rewrite", "dedup", "retrieval", "vllm"]
ROWS_PER_PART = {"embed": 6, "perplexity": 2, "caption": 1, "rewrite": 2, "dedup": 1, "retrieval": 2}


@pytest.fixture(scope="module")
def dry_run():
    before = _common.DOC.read_bytes() if _common.DOC.exists() else None
    rows, text, notes = gt.main(["--dry-run", "--parts", ",".join(IN_PROCESS)])
    after = _common.DOC.read_bytes() if _common.DOC.exists() else None
    return rows, text, notes, before == after


def test_every_part_measures_or_names_why_not(dry_run):
    rows, text, _, _ = dry_run
    assert {p: sum(r.part == p for r in rows) for p in ROWS_PER_PART} == ROWS_PER_PART
    skipped = [r for r in rows if not parts.finite(r.value)]
    # vLLM is not installed here; nothing else may be skipped, and nothing may fail
    assert [(r.model.split(",")[1].strip(), r.skip) for r in skipped] == [("vLLM", "vllm is not installed")]
    for r in rows:
        if r not in skipped:
            assert r.value > 0 and math.isfinite(r.value) and r.unit and r.precision, r
    assert {r.precision for r in rows if r.part == "perplexity"} == {"32", "bf16-fp32-logits"}
    assert {r.precision for r in rows if r.part == "embed"} == {"bf16-mixed", "16-mixed"}
    assert "| rewrite | Llama-3-8B shape, vLLM" in text and "skipped: vllm is not installed" in text


def test_projection_rows_exist_and_the_run_is_marked(dry_run):
    _, text, notes, doc_unchanged = dry_run
    assert text.startswith(f"**{gt.DRY_MARK}**") and doc_unchanged  # a dry run never reaches docs/benchmarks.md
    projection = text.split("GPU-hours of the paper's build from these rates:")[1].splitlines()
    for st in proj.STAGES:
        line = next(ln for ln in projection if ln.startswith(f"| {st.name} |"))
        hours = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert float(hours.replace(",", "")) > 0, line
    assert "| total |  | the stages above |" in text and "~9,000 + ~40 (A100)" in text
    assert "| NeMo Curator semantic dedup (nightly floor) |" in text
    # the GPU run's models, built on the meta device from the same configs: the paper's sizes, nothing downloaded
    for size in ("EVA02-E-14-plus 5.04B", "GPT-2 large 0.77B", "BLIP base 0.22B", "Llama-3-8B 8.03B"):
        assert size in notes


def test_projection_arithmetic():
    rows = [parts.Row("embed", "m", "bf16-mixed", "256", 1000.0, "images/s"),
            parts.Row("embed", "m", "16-mixed", "256", 500.0, "images/s"),
            parts.Row("rewrite", "m", "bf16", "64", 2000.0, "output tokens/s"),
            parts.Row("rewrite", "m, vLLM", "bf16", "", None, "output tokens/s", "vllm is not installed")]
    got = {name: hours for name, _, _, hours in proj.projection(rows)}
    assert got["embed_images (image dedup input)"] == f"{285e6 / 1000 / 3600:,.1f}"  # the faster precision
    assert got["rewrite (syn_text)"] == f"{198e6 * proj.SYN_TOKENS / 2000 / 3600:,.1f}"
    assert got["caption"] == "-"
    assert got["total"] == f"{285e6 / 1000 / 3600 + 198e6 * proj.SYN_TOKENS / 2000 / 3600:,.1f}"


def test_fit_part_runs_both_trainers_on_the_gpu_alike(tmp_path):
    plan = parts.Plan(dry=False, device="cuda", warmup=1, iters=5, budget_s=15, scratch=tmp_path)
    model_json = tmp_path / "m.json"
    model_json.write_text(json.dumps({"embed_dim": 512, "vision_cfg": {}, "text_cfg": {}}))
    ours, oc = parts.fit_commands(plan, model_json, "shards/{00000..00007}.tar", 8192, 256)
    keys = dict(a.split("=", 1) for a in ours if "=" in a and not a.startswith("-"))
    assert (keys["trainer.accelerator"], keys["trainer.precision"], keys["data.workers"], keys["data.batch_size"]) \
        == ("gpu", "bf16-mixed", "8", "256")
    assert json.loads(keys["model.custom"])["embed_dim"] == 512
    assert sum(a.startswith(("trainer.accelerator=", "model.custom=", "data.workers=")) for a in ours) == 3
    flags = {oc[i]: oc[i + 1] for i in range(len(oc) - 1) if oc[i].startswith("--")}
    assert (flags["--device"], flags["--precision"], flags["--workers"], flags["--batch-size"]) \
        == ("cuda", "amp_bf16", "8", "256")
    dry = parts.Plan(dry=True, device="cpu", warmup=1, iters=2, budget_s=1, scratch=tmp_path)
    ours, oc = parts.fit_commands(dry, model_json, "s.tar", 160, 8)
    assert "trainer.accelerator=cpu" in ours and "trainer.precision=32" in ours
    assert oc[oc.index("--device") + 1] == "cpu" and oc[oc.index("--precision") + 1] == "fp32"


def test_command_line_mistakes(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        gt.main(["--dry-run", "--parts", "embed,nope"])
    assert "--parts: unknown nope" in capsys.readouterr().err
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device; --dry-run"):
        gt.main(["--parts", "dedup"])
