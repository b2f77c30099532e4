"""Run the build's `download` stage with img2dataset's pyspark distributor from a Spark cluster's driver.

    spark-submit --master spark://head:7077 data_build/launch/img2dataset_cluster.py pyspark --config ... [key=value]

The session spark-submit configures is made here, and img2dataset uses the active one (it would otherwise start a
local one), so the download units run in this driver process (ray.in_process=true), one input shard after another,
each shard's pieces spread over the Spark cluster. On a Ray cluster no launcher is needed: `build download` with
RAY_ADDRESS set (or data_build/launch/ray_slurm.sbatch) runs one download task per shard across its nodes. The rest
of the command line is `build download`'s; see data_build/README.md ("An OBELICS-sized download on a cluster").
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "pyspark":
        print("usage: img2dataset_cluster.py pyspark --config FILE [key=value ...] (on a Ray cluster, run "
              "`python -m realsyn_pl build download` with RAY_ADDRESS set instead)", file=sys.stderr)
        return 2
    from pyspark.sql import SparkSession

    SparkSession.builder.appName("realsyn_pl download").getOrCreate()
    from realsyn_pl.cli import main as cli

    return cli(["build", "download", *argv[1:], "download.distributor=pyspark", "ray.in_process=true"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
