"""Stage 2 (RealSyn §3.2, retrieval): text semantic clustering (cluster.py, on construct/clustering/), then
hierarchical retrieval of the top-k realistic sentences per image (hierarchical.py, with the array kernels in
topk.py)."""
