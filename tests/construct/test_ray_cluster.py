"""A build on a multi-node Ray cluster that loses a worker node mid-stage still finishes, with the bytes of a clean
run: dedup, retrieve, balance and a predict stage, each driven by `python -m realsyn_pl` joined to a simulated
cluster (ray.cluster_utils.Cluster on this machine: a head with no CPU for tasks and two 1-CPU worker nodes, every
node on 127.0.0.1). The node is removed once the step has finished its first unit, while the other node's unit is
running; the driver retries what was lost on the surviving node."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from realsyn_pl.cli import main
from test_slow import IN_PROCESS, _balance_input, _dedup_input, _planted_pair, _stage_bytes, image_corpus, prepared

ROOT = Path(__file__).resolve().parents[2]
LOST = ("failed (try 1 of", "an actor was lost")


@pytest.fixture(scope="module")
def cluster(ray_local):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    yield c, nodes
    c.shutdown()


def _nodes(address: str) -> list:
    code = ("import json, ray; ray.init(address='%s', logging_level='ERROR'); "
            "print(json.dumps([(n['NodeManagerAddress'], n['Alive']) for n in ray.nodes()]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    import json

    return json.loads(out.strip().splitlines()[-1])


def busy(node) -> bool:
    """Whether a worker of this simulated node is running a unit now (Ray titles a busy worker after its task)."""
    import psutil

    raylet = node.all_processes["raylet"][0].process.pid
    try:
        kids = psutil.Process(raylet).children()
    except psutil.NoSuchProcess:
        return False
    names = []
    for k in kids:
        try:
            names.append(" ".join(k.cmdline()))
        except psutil.Error:
            continue
    return any(n.startswith(("ray::run_unit", "ray::run_call", "ray::PredictActor.run")) for n in names)


def _remove_a_busy_node(cluster, args: list[str], started: Path, timeout: float = 600) -> str:
    """Run the build on the cluster; once `started` (a step's _done folder) has a marker, remove a worker node while
    it is running a unit; add a fresh node for the next build; return the driver's output."""
    c, nodes = cluster
    env = {**os.environ, "RAY_ADDRESS": c.address, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ['PYTHONPATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "realsyn_pl"] + args + ["progress=false"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0, victim = time.time(), None
    while victim is None:
        assert proc.poll() is None, "the build ended before the node could be removed:\n" + proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, "the step never started"
        if started.is_dir() and any(started.glob("*.json")):
            victim = next((n for n in nodes if busy(n)), None)
        time.sleep(0.005)
    nodes.remove(victim)
    c.remove_node(victim)
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    nodes.append(c.add_node(num_cpus=1))
    return out


def lose_a_node_during(cluster, args: list[str], work: Path, started: str, clean: Path, tries: int = 3) -> str:
    """`_remove_a_busy_node` on the build in `work` (`started` relative to it), until the node took a unit in flight
    with it: a unit of a few milliseconds can end between the check and the removal. Every run, hit or not, ends with
    the bytes of `clean` (the stage's folder in a clean run)."""
    import shutil

    given = work.with_name(work.name + "-input")
    shutil.copytree(work, given)
    for attempt in range(tries):
        if attempt:
            shutil.rmtree(work)
            shutil.copytree(given, work)
        out = _remove_a_busy_node(cluster, args, work / started)
        assert _stage_bytes(work / clean.name) == _stage_bytes(clean)
        if any(m in out for m in LOST):
            break
    return out


@pytest.mark.slow
def test_losing_a_worker_node_mid_stage_costs_only_its_units(tmp_path, cluster):
    assert all(ip == "127.0.0.1" for ip, _ in _nodes(cluster[0].address))
    outputs = {}  # each stage's clean run (the bytes to match) runs in this process, without the cluster

    # dedup: the node goes during the assignment to the semantic clusters
    args = ["build", "dedup_images", "dedup.cluster_size=10000", "dedup.partitions=8", "dedup.accept_removal=true"]
    for name in ("clean", "lost"):
        _dedup_input(tmp_path / "dedup" / name, n=24000)
    assert main(args + [f"work_dir={tmp_path / 'dedup' / 'clean'}", "progress=false"] + IN_PROCESS) == 0
    work = tmp_path / "dedup" / "lost"
    outputs["dedup"] = lose_a_node_during(cluster, args + [f"work_dir={work}"], work, "dedup_images/_assign/_done",
                                          tmp_path / "dedup" / "clean" / "dedup_images")

    # retrieve: during the intra-cluster buckets
    _planted_pair(tmp_path / "retrieve", ("clean", "lost"), n_centres=32, per_cluster=60, sentence_shards=6,
                  image_shards=6)
    common = ["cluster.k=32", "retrieve.bucket_sentences=120", "retrieve.nprobe=2", "progress=false"]
    for name in ("clean", "lost"):
        assert main(["build", "cluster", f"work_dir={tmp_path / 'retrieve' / name}"] + common + IN_PROCESS) == 0
    assert main(["build", "retrieve", f"work_dir={tmp_path / 'retrieve' / 'clean'}"] + common + IN_PROCESS) == 0
    work = tmp_path / "retrieve" / "lost"
    outputs["retrieve"] = lose_a_node_during(cluster, ["build", "retrieve", f"work_dir={work}"] + common, work,
                                             "retrieve/_probe/_done", tmp_path / "retrieve" / "clean" / "retrieve")

    # balance: during the in-window assignment
    args = ["build", "balance", "balance.similarity_text=text1", "balance.window.mode=quantile", "balance.k=64",
            "balance.method=two_level", "balance.coarse_k=8", "balance.init=kmeans++", "balance.reduce_items=3000"]
    for name in ("clean", "lost"):
        _balance_input(tmp_path / "balance" / name, shards=8, per=800)
    assert main(args + [f"work_dir={tmp_path / 'balance' / 'clean'}", "progress=false"] + IN_PROCESS) == 0
    work = tmp_path / "balance" / "lost"
    outputs["balance"] = lose_a_node_during(cluster, args + [f"work_dir={work}"], work, "balance/_sims/_done",
                                            tmp_path / "balance" / "clean" / "balance")

    # a predict stage: one embedding actor per node, one of them goes with its node
    corpus = image_corpus(tmp_path / "corpus", files=8, per_file=3)
    clean, ov_clean = prepared(tmp_path / "predict", "clean", corpus, **{"embed.batch_size": 1})
    assert main(["predict", "embed_images"] + ov_clean + IN_PROCESS) == 0
    work, ov = prepared(tmp_path / "predict", "lost", corpus, **{"embed.batch_size": 1})
    outputs["predict"] = lose_a_node_during(cluster, ["predict", "embed_images"] + ov, work, "embed_images/_done",
                                            clean / "embed_images")

    # the loss hit work in flight (the other node's unit; within 3 tries), which the driver redid on the survivor
    for name, out in outputs.items():
        assert any(m in out for m in LOST), (name, out[-3000:])
    assert "NodeDiedError: Task failed because the node it was running on is dead or unavailable." in outputs["dedup"]
