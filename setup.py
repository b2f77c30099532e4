"""Only what pyproject.toml cannot say: the top-level configs/ and eval/ folders install as realsyn_pl._configs and
realsyn_pl._eval, so a wheel carries the presets, suites and reference tables (read through realsyn_pl/assets.py)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["realsyn_pl*"]) + ["realsyn_pl._configs", "realsyn_pl._eval"],
      package_dir={"realsyn_pl._configs": "configs", "realsyn_pl._eval": "eval"})
