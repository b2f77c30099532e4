"""The machinery every construction stage runs on: stage directories and manifests (stage.py), record and array
shards (records.py, arrays.py, schemas.py), the per-row map (mapping.py), the Ray driver (runtime.py: which Ray;
executor.py: a task per unit, retries, progress; actors.py: model stages as Lightning predict loops in actors), the
predict-loop contract (predict.py), the config schema (config.py), the stage order (order.py) and the stage
registry behind `build` / `predict` (pipeline.py)."""
