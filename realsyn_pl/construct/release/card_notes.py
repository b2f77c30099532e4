"""What the dataset card says about a build beyond its numbers: that a smoke build is not a dataset (random-init
embeddings, template rewrite, no captioner) and what the counts that are not drops mean. Reads stage manifests only
(no plotting), so `build`'s closing summary can ask the same questions.
"""
from __future__ import annotations

from typing import Any

# the stages whose model makes the embeddings every later decision rests on, and the config key that names it
EMBED_STAGES = (("embed_images", "model"), ("embed_sentences", "model"), ("embed_syn_text", "model"), ("tag", "teacher"))


def random_init_stages(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """The model stages of this build whose CLIP had no weights (model.pretrained null: open_clip builds it
    random-init, as the smoke preset's tiny model is)."""
    out = []
    for stage, key in EMBED_STAGES:
        model = ((manifests.get(stage) or {}).get("config") or {}).get(key)
        if isinstance(model, dict) and not model.get("pretrained"):
            out.append(stage)
    return out


def smoke_warnings(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """What makes this build's texts and numbers meaningless as data, one sentence each ([] for a real build)."""
    out = []
    random = random_init_stages(manifests)
    if random:
        out.append(f"The embedding model is random-init (no weights; {', '.join(random)}): image and sentence "
                   "embeddings, the dedup and clusters built on them, the retrieved texts and their similarities, the "
                   "tag scores and the balance window are not meaningful. This build exercises the machinery, not "
                   "the method (configs/build/tiny_cpu.yaml); set embed.model to a trained CLIP for real data.")
    syn = (manifests.get("syn_text") or {}).get("config") or {}
    if syn.get("backend") == "template":
        out.append("syn_text is the deterministic template merge of the retrieved texts and tags (rewrite.backend="
                   "template), not an LLM rewrite: set rewrite.backend=hf (or vllm) with a fine-tuned rewriter.")
    if syn and syn.get("captions") is False:
        out.append("No captioner ran (caption.enabled=false): the rewriter had no synthetic caption.")
    return out


def fewer_than_k_note(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """What the retrieve stage's `fewer_than_k_texts` count means, when it made one."""
    ret = manifests.get("retrieve") or {}
    n = ((ret.get("counts") or {}).get("produced") or {}).get("fewer_than_k_texts")
    if not n:
        return []
    cfg = ret.get("config") or {}
    k, nprobe = cfg.get("k"), cfg.get("nprobe")
    centres = ((manifests.get("cluster") or {}).get("config") or {}).get("k")
    pool = ((manifests.get("cluster") or {}).get("counts") or {}).get("n_out")
    per = f" (here {pool} sentences in {centres} clusters: {pool / centres:.1f} per cluster)" if pool and centres else ""
    return [f"`fewer_than_k_texts` ({n} images, retrieve): not a drop. These images were kept with fewer than "
            f"retrieve.k={k} texts (text2 / text3 empty) because the {nprobe} sentence cluster(s) they probed held "
            f"fewer than k sentences{per}. Raise retrieve.nprobe or lower cluster.k for a small pool."]
