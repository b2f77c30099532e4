"""Stage 1 (RealSyn §3.1, real-world data extraction): interleaved documents -> deduplicated image and sentence pools.
documents.py (extract) -> download.py (img2dataset_run.py; fetch.py fallback) -> image_filter.py -> model_stages.py (embed_images) -> dedup.py;
sentence_stage.py (sentence_filters.py, cat_rule.py) -> entropy.py -> model_stages.py (perplexity, embed_sentences)
-> dedup.py (exact_keys.py: exact by sorted 64-bit keys; semdedup.py: pairs inside k-means clusters;
union_find.py: connected components and the quantile threshold)."""
