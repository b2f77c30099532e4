"""Run the build's `download` stage with img2dataset's pyspark or ray distributor from a cluster's driver.

    spark-submit --master spark://head:7077 data_build/launch/img2dataset_cluster.py pyspark --config ... [key=value]
    python data_build/launch/img2dataset_cluster.py ray --config ... [key=value]   # RAY_ADDRESS, default "auto"

Spark: the session spark-submit configures is made here, and img2dataset uses the active session (it would otherwise
start a local one). Ray: connects to the running cluster before img2dataset submits its tasks. The rest of the
command line is `build download`'s; see data_build/README.md ("An OBELICS-sized download on a Spark or Ray cluster").
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("pyspark", "ray"):
        print("usage: img2dataset_cluster.py pyspark|ray --config FILE [key=value ...]", file=sys.stderr)
        return 2
    engine, rest = argv[0], argv[1:]
    if engine == "pyspark":
        from pyspark.sql import SparkSession

        SparkSession.builder.appName("realsyn_pl download").getOrCreate()
    else:
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    from realsyn_pl.cli import main as cli

    return cli(["build", "download", *rest, f"download.distributor={engine}"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
