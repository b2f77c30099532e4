import json
from collections import Counter

import pyarrow.parquet as pq

from realsyn_pl.data.interleaved import Document, read_documents
from realsyn_pl.demo.corpus import CorpusConfig, write_corpus


def test_corpus_is_obelics_layout_seeded_and_has_the_planted_noise(tmp_path):
    cfg = CorpusConfig(documents=120, docs_per_file=50, seed=3)
    files = write_corpus(tmp_path / "a", cfg)
    assert [f.name for f in files] == ["docs-00000.parquet", "docs-00001.parquet", "docs-00002.parquet"]
    again = write_corpus(tmp_path / "b", cfg)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]

    table = pq.read_table(files[0])
    assert table.column_names == ["texts", "images", "metadata"] and table.num_rows == 50
    for row in table.to_pylist():
        assert len(row["texts"]) == len(row["images"]) == len(json.loads(row["metadata"]))
        assert all((t is None) != (i is None) for t, i in zip(row["texts"], row["images"]))

    truth = [json.loads(line) for line in (tmp_path / "a" / "truth.jsonl").read_text().splitlines()]
    status = Counter(t["status"] for t in truth)
    assert status["ok"] > 100 and status["repost"] > 0 and status["small"] > 0 and status["broken"] > 0
    text = " ".join(t for f in files for row in pq.read_table(f).to_pylist() for t in row["texts"] if t)
    assert "https://" in text and "😍" in text and text.count("All rights reserved") > 5

    # The project's OBELICS reader takes it as it is.
    docs = [d for d in read_documents("obelics", files[0], None) if isinstance(d, Document)]
    assert len(docs) == 50 and sum(len(d.images) for d in docs) == sum(t["doc"] < 50 for t in truth)


def test_demo_rejects_a_bad_build_override_before_any_work(tmp_path, capsys):
    from realsyn_pl.cli import main

    assert main(["demo", f"output_dir={tmp_path / 'demo'}", "build_overrides=[cluster.kk=3]"]) == 2
    assert "Key 'kk' not in 'ClusterConfig'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # no corpus, no teacher
