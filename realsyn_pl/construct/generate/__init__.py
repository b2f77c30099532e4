"""Stage 3 (RealSyn §3.2, image semantic augmented generation): caption.py, mine_tags.py (the tag vocabulary),
tag.py, rewrite.py (text1 + caption + tags -> syn_text), instructions.py (the rewriter's instruction data) and the
config schemas of these stages and of `fit-rewriter` (config.py)."""
