"""Stage 2 (RealSyn §3.2, retrieval): text semantic clustering (kmeans.py, cluster.py), then hierarchical retrieval
of the top-k realistic sentences per image (hierarchical.py, with the array kernels in topk.py)."""
