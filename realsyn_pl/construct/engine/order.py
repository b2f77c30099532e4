"""The stages of `build all` in the paper's order, the names `predict` and `force` accept, and which stage reads
which (no imports: the dataset card, the demo's report and the plain stages use it without the model code)."""

STAGE_ORDER = ("extract", "download", "image_filter", "embed_images", "dedup_images", "sentence_filter",
               "wordcount", "entropy", "perplexity", "embed_sentences", "dedup_sentences",
               "cluster", "retrieve", "mine_tags", "caption", "tag", "syn_text",
               "embed_syn_text", "balance", "write")
MODEL_STAGES = ("perplexity", "embed_images", "embed_sentences", "caption", "tag", "syn_text")
# the stages that run on model actors: the `predict` stages and embed_syn_text (run by `build` only)
ACTOR_STAGES = MODEL_STAGES + ("embed_syn_text",)
# `rewrite` names the stage by its config section; its output directory is syn_text (what balance reads).
ALIASES = {"rewrite": "syn_text"}
# the record stage and file kind each stage-1 model stage reads (dedup reads them back by the same names)
EMBED_INPUTS = {"embed_images": ("image_filter", "images"), "embed_sentences": ("perplexity", "sentences")}
PPL_INPUT = "entropy"
