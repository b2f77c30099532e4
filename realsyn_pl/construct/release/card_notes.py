"""What the dataset card says about a build beyond its numbers: that a smoke build is not a dataset (random-init
embeddings, template rewrite, no captioner), which filter removed far more or less than the paper's share, and what
the counts that are not drops mean. Reads stage manifests only (no plotting), so `build`'s closing summary can ask
the same questions.
"""
from __future__ import annotations

from typing import Any

from realsyn_pl.construct import calibration

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


def step_removal(manifests: dict[str, dict[str, Any]], stages: tuple[str, ...]) -> float | None:
    """The fraction a filtering step (its stages in order) removed of its input; None where it did not run."""
    found = [(manifests.get(s) or {}).get("counts") for s in stages]
    if not all(found) or not found[0]["n_in"]:
        return None
    return 1 - found[-1]["n_out"] / found[0]["n_in"]


def removal_warnings(manifests: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per filter whose removal is outside [0.5x, 2x] the paper's, naming the keys that set it."""
    out = []
    for label, stages, paper in calibration.PAPER_REMOVAL:
        removed = step_removal(manifests, stages)
        if removed is None or not calibration.outside_band(removed, paper):
            continue
        off = [s for s in stages if ((manifests.get(s) or {}).get("config") or {}).get("enabled") is False]
        out.append(f"{label} removed {removed:.1%} ({calibration.band_text(paper)})"
                   f"{''.join(f', {s} off' for s in off)}: set by {calibration.STEP_KEYS[stages]}.")
    win = (manifests.get("balance") or {}).get("window") or {}
    removed = win.get("outside_of_sims", win.get("removed_fraction"))
    if removed is not None and calibration.outside_band(removed, calibration.WINDOW):
        kept = " (kept by balance.window.accept_removal=true)" if win.get("accept_removal") else ""
        out.append(f"balance window ({win.get('mode')}) removed {removed:.1%} of the pairs with a similarity "
                   f"({calibration.band_text(calibration.WINDOW)}){kept}: set by {calibration.WINDOW_KEYS}.")
    return out
