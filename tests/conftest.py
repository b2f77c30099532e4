import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Ray on loopback only: every node of an instance started here advertises 127.0.0.1 (read when ray is imported)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)
# Ray workers run the tests' work functions too: they import the test helper modules from here
TESTS = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS / "construct"),
                                            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

# The longest test files first: pytest-xdist (--dist loadfile --no-loadscope-reorder) hands files out in collection
# order, and one of these started last would leave the other worker idle for minutes at the end.
LONGEST_FIRST = ("test_demo.py", "test_slow.py", "test_golden_build.py", "test_generate_tag.py", "test_fit.py",
                 "test_generate_rewrite.py", "test_ray_cluster.py", "test_download_img2dataset.py", "test_eval_ddp.py",
                 "test_generate_caption.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept


# A CLIP small enough for CPU tests (open_clip config schema).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "realsyn-test-tiny"


@pytest.fixture(scope="session")
def world_shards(tmp_path_factory):
    """8 shards x 10 samples of the shape world in the RealSyn layout, with sizes.json."""
    from realsyn_pl.demo.world import write_world_shards

    return write_world_shards(tmp_path_factory.mktemp("world"), num_samples=80, samples_per_shard=10, seed=1, px=32)


def fit_overrides(shards, out_dir, **extra):
    """Dotlist for a tiny CPU fit on `shards`."""
    import json

    n = len(json.loads((shards / "sizes.json").read_text()))
    items = {
        "output_dir": str(out_dir),
        "model.name": TINY_NAME,
        "data.train": f"[{{urls: '{shards}/{{00000..{n - 1:05d}}}.tar'}}]",
        "data.batch_size": 8,
        "data.workers": 0,
        "data.shuffle_buffer": 16,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.max_epochs": 1,
        "trainer.log_every_n_steps": 1,
        "logging.wandb": "disabled",
        "logging.progress_bar": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def assert_loopback() -> None:
    """Every node of the Ray instance this process is connected to advertises 127.0.0.1."""
    import ray

    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes), [n["NodeManagerAddress"]
                                                                                  for n in nodes]


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance per test process (2 CPUs, a small object store), shared by every build a test runs
    in this process and joined by the CLI subprocesses it starts (RAY_ADDRESS)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 ** 2, include_dashboard=False,
             logging_level="WARNING")
    assert_loopback()
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def ex(ray_local):
    """The build's executor on the shared instance (for tests that run one stage function)."""
    from realsyn_pl.construct.engine.executor import Executor

    return Executor(progress=False)


@pytest.fixture(autouse=True)
def _ray_for_builds(request):
    """Every build test (tests/construct/) runs on the process's shared Ray instance, started once, not per build."""
    if "construct" in request.node.path.parts:
        request.getfixturevalue("ray_local")
