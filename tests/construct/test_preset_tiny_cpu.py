"""configs/build/tiny_cpu.yaml runs `build all` end to end offline, as its header says: no model hub, no network."""
import base64
import json
import random
import sys

from generate_support import ROOT, run_cli, single, stage_rows
from realsyn_pl.construct.engine.records import iter_rows
from realsyn_pl.data.shard_writer import encode_jpeg
from realsyn_pl.demo import world
from realsyn_pl.demo.corpus import OFF_TOPIC, describe


def offline_corpus(folder, files=2, docs=12):
    """Local-format jsonl documents whose images are base64 bytes (one is a local file): nothing to fetch."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for f in range(files):
        rows = []
        for d in range(docs):
            thing = world.random_thing(rng)
            data = encode_jpeg(world.render(thing, rng, 112))
            if f == d == 0:
                (folder / "first.jpg").write_bytes(data)
                image = {"path": str(folder / "first.jpg")}
            else:
                image = {"bytes": base64.b64encode(data).decode()}
            texts = [f"{describe(thing, rng)} {describe(world.random_thing(rng), rng)}", rng.choice(OFF_TOPIC)]
            rows.append({"texts": texts, "images": [image]})
        rows.append({"texts": rows[1]["texts"], "images": rows[1]["images"]})  # a re-post: an exact duplicate
        path = folder / f"docs-{f}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def test_tiny_cpu_preset_builds_all_offline(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # any request would fail at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no cached model to fall back on
    paths = offline_corpus(tmp_path / "corpus")
    work = tmp_path / "work"
    proc = run_cli(single(sys.executable), ["build", "all", "--config", str(ROOT / "configs/build/tiny_cpu.yaml"),
                                            f"input.paths=[{','.join(map(str, paths))}]", f"work_dir={work}",
                                            f"download.image_root={tmp_path / 'corpus'}",  # first.jpg's folder
                                            "progress=false", "ray.in_process=true"], timeout=300,
                   joined=False)  # every unit in that process, under the offline environment set above
    manifests = {p.parent.name: json.loads(p.read_text()) for p in work.glob("*/manifest.json")}
    assert manifests["write"]["done"], proc.stdout[-2000:]
    assert manifests["download"]["counts"]["dropped"] == {}  # first.jpg, under download.image_root, is read
    assert manifests["perplexity"]["config"]["enabled"] is False
    assert manifests["dedup_images"]["counts"]["dropped"] == {"exact_duplicate": 2}  # only the true duplicates
    assert "caption" not in manifests  # caption.enabled=false: no captioner ran
    assert manifests["tag"]["config"]["image_embeddings"]["path"] == "stored"
    syn = stage_rows(work, "syn_text", "images")
    assert syn and all(json.loads(r["syn_meta"])["backend"] == "template" for r in syn)
    tars = sorted((work / "write").glob("*.tar"))
    written = list(iter_rows(sorted((work / "write").glob("?????.parquet"))))
    assert tars and written and all(r["syn_text"] for r in written)
    assert (work / "write" / "card.md").is_file()
