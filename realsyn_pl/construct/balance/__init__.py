"""Stage 4 (RealSyn §3.3, semantic balance sampling): syn_embed.py (the syn_text embeddings for the window),
sampler.py (the stage: similarity window, image k-means, caps) and caps.py (the window and cap arithmetic)."""
