"""The machinery every construction stage runs on: stage directories and manifests (stage.py), record and array
shards (records.py, arrays.py, schemas.py), the per-row map (mapping.py), the predict-loop runner for model stages
(predict.py), the config schema (config.py) and the stage registry behind `build` / `predict` (pipeline.py)."""
