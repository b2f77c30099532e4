"""Dataset construction: interleaved documents -> RealSyn shards, a chain of resumable stages grouped as the paper
groups them (stage guide: data_build/README.md).

    engine/    what every stage runs on: the stage contract, record and array shards, the Ray driver (a task per
               unit, model stages in actors), the predict loop, the config schema, the stage registry behind
               `build` / `predict`
    clustering/ k-means (flat, two-level) and the assignment to a stage's centres: dedup, cluster and balance
    extract/   stage 1 (§3.1): documents -> image and sentence pools (download, filters, CAT, entropy, perplexity,
               embeddings, dedup)
    retrieve/  stage 2 (§3.2): text clusters and hierarchical retrieval of the top-k realistic sentences per image
    generate/  stage 3 (§3.2): caption, tags and the LLM rewrite to syn_text; the rewriter's instruction data
    balance/   stage 4 (§3.3): the similarity window, image clusters and the nested per-cluster caps
    release/   the webdataset + parquet writer, the dataset card, the official-release path
"""
