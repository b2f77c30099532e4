"""k-means as every stage that clusters uses it: semantic dedup (stage 1), text clusters for retrieval (stage 2),
image clusters for balance sampling (stage 4). kmeans.py (flat spherical k-means, exact assignment), twolevel.py
(millions of centres), centroids.py (a stage's centres and its assignment), topk.py (best columns per row)."""
