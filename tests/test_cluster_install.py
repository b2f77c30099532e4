"""What the air-gapped GPU cluster install (README) relies on: pyproject declares torch / transformers as ranges a
cluster image's versions fall in, and the transformers calls that differ between those versions go through
realsyn_pl/models/hf_compat.py."""
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from realsyn_pl.models.hf_compat import dtype_kwargs

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_the_cluster_lower_bounds():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    # (the oldest a cluster image may bring, the version verified on the CPU install, one below the oldest)
    for name, oldest, verified, older in (("torch", "2.4.0", "2.14.1", "2.3.1"),
                                          ("torchvision", "0.19.0", "0.29.1", "0.18.1"),
                                          ("transformers", "4.45.0", "5.24.0", "4.44.2")):
        assert deps[name].contains(oldest) and deps[name].contains(verified), (name, deps[name])
        assert not deps[name].contains(older), (name, deps[name])


def test_from_pretrained_dtype_keyword_follows_the_transformers_version():
    assert dtype_kwargs(torch.bfloat16, "4.45.2") == {"torch_dtype": torch.bfloat16}
    assert dtype_kwargs(torch.float32, "4.56.0") == {"dtype": torch.float32}
    assert dtype_kwargs(torch.float32, "5.24.0") == {"dtype": torch.float32}
    assert dtype_kwargs(None, "4.45.2") == {}
