"""Suites (eval/suites/*.yaml), template sets (eval/templates/*.json) and the paper's tables (eval/reference/*.yaml)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from realsyn_pl.assets import asset_dir
from realsyn_pl.config import ConfigError
from realsyn_pl.evaluation.config import METRICS, TASKS, EvalConfig, EvalDataset


@dataclass
class Suite:
    name: str = "custom"
    # task -> reference table name (eval/reference/<table>.yaml) the report puts our numbers beside
    tables: Dict[str, str] = field(default_factory=dict)
    datasets: List[EvalDataset] = field(default_factory=list)


def _find(kind: str, name: str, suffix: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    folder = asset_dir("eval") / kind
    candidate = folder / f"{name}{suffix}"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    raise ConfigError(f"unknown {kind[:-1]} {name!r}: not a file, and not one of {', '.join(known)} in {folder}")


def load_suite(name: Optional[str]) -> Suite:
    if not name:
        return Suite()
    path = _find("suites", name, ".yaml")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Suite), OmegaConf.load(path))
        suite = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"suite {path}: {str(err).strip().splitlines()[0]}") from None
    return suite  # type: ignore[return-value]


def plan(cfg: EvalConfig) -> tuple[Suite, list[tuple[EvalDataset, str]]]:
    """The suite and the (dataset, task) runs of this config, validated."""
    suite = load_suite(cfg.suite)
    runs = []
    seen = set()
    for entry in list(suite.datasets) + list(cfg.datasets):
        if cfg.only and entry.key not in cfg.only:
            continue
        if entry.metric not in METRICS:
            raise ConfigError(f"dataset {entry.key}: metric must be one of {', '.join(METRICS)}, got {entry.metric!r}")
        for task in entry.tasks:
            if task not in TASKS:
                raise ConfigError(f"dataset {entry.key}: task must be one of {', '.join(TASKS)}, got {task!r}")
            if cfg.only_tasks and task not in cfg.only_tasks:
                continue
            if entry.classnames:
                classnames_file(entry)  # an unknown list is a config error before any model loads
            if (entry.key, task) in seen:
                raise ConfigError(f"dataset {entry.key} is listed twice for {task}")
            seen.add((entry.key, task))
            runs.append((entry, task))
    unknown = sorted(set(cfg.only) - {e.key for e, _ in runs} - {e.key for e in suite.datasets + list(cfg.datasets)})
    if unknown:
        raise ConfigError(f"only: no dataset {', '.join(unknown)} in this run")
    if not runs:
        raise ConfigError("nothing to evaluate: set suite=<name> (paper20, retrieval, robustness, smoke) or datasets=[...]")
    return suite, runs


@lru_cache(maxsize=None)
def _template_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def templates_for(setting: str, entry: EvalDataset, dataset_templates: Any) -> Any:
    """The zero-shot templates of a dataset under the run's template set."""
    if setting == "dataset":
        if not dataset_templates:
            raise ValueError(f"{entry.key}: the dataset has no zero-shot templates (zeroshot_classification_templates.txt)")
        return dataset_templates
    table = _template_file(str(_find("templates", setting, ".json")))
    key = entry.template_key or entry.key
    if key not in table:
        raise ValueError(f"{entry.key}: template set {setting!r} has no entry {key!r} (set template_key)")
    return table[key]


def classnames_file(entry: EvalDataset) -> Path:
    """The class-name list an entry names: a shipped one (eval/classnames/<name>.txt) or a file."""
    try:
        return _find("classnames", entry.classnames, ".txt")
    except ConfigError as err:
        raise ConfigError(f"dataset {entry.key}: classnames: {err}") from None


def read_classnames(path: Path) -> list[str]:
    """One name per line, in label order (blank lines are not names)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_reference(table: str) -> Optional[dict]:
    path = asset_dir("eval") / "reference" / f"{table}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
