"""Generated evaluation datasets in clip-benchmark's `wds/` layout, from the shape world (realsyn_pl.demo.world).

    python -m realsyn_pl.evaluation.synthetic OUT_DIR [--n-test 240] [--n-train 480] [--px 64]

writes OUT_DIR/shapes (24-class colour x shape classification: train/val/test) and OUT_DIR/shapes_captions
(image-text retrieval, two captions per image: test), the folders the `smoke` suite reads.
"""
from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import webdataset as wds

from realsyn_pl.demo import world

TEMPLATES = ["a photo of a {c}.", "a picture of a {c}.", "a {c} on a plain background."]


LABELINGS = {
    "colour_shape": (lambda: [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES], lambda t: t.label),
    "colour": (lambda: list(world.COLOURS), lambda t: t.colour),
    "shape": (lambda: list(world.SHAPES), lambda t: t.shape),
}


def classes(labeling: str = "colour_shape") -> list[str]:
    return LABELINGS[labeling][0]()


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def _write_split(folder: Path, split: str, records: list[dict], per_shard: int) -> None:
    (folder / split).mkdir(parents=True, exist_ok=True)
    # mtime=0: the same records give the same tar bytes (TarWriter stamps the clock otherwise)
    with wds.ShardWriter(str(folder / split / "%d.tar"), maxcount=per_shard, verbose=0, mtime=0) as sink:
        for rec in records:
            sink.write(rec)
        shards = sink.shard
    (folder / split / "nshards.txt").write_text(f"{shards}\n")


def write_classification(folder: str | Path, splits: dict[str, int], seed: int = 0, px: int = 64,
                         per_shard: int = 10_000, labeling: str = "colour_shape") -> Path:
    """clip-benchmark convert_dataset's layout: <split>/N.tar with png + cls, classnames.txt, templates.
    labeling: colour_shape (24 classes), colour (6) or shape (4)."""
    folder = Path(folder)
    names, label_of = classes(labeling), LABELINGS[labeling][1]
    for offset, (split, n) in enumerate(splits.items()):
        rng = random.Random(seed * 1000 + offset)
        records = []
        for i in range(n):
            thing = world.random_thing(rng)
            records.append({"__key__": "s%07d" % i, "png": _png(world.render(thing, rng, px)),
                            "cls": names.index(label_of(thing))})
        _write_split(folder, split, records, per_shard)
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return folder


def write_retrieval(folder: str | Path, n: int, seed: int = 0, px: int = 64, per_shard: int = 10_000,
                    split: str = "test") -> Path:
    """clip-benchmark convert_retrieval_dataset's layout: png + txt (captions one per line), dataset_type.txt."""
    folder = Path(folder)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        thing = world.random_thing(rng)
        image = world.render(thing, rng, px)
        texts = world.captions(thing, rng)
        records.append({"__key__": "s%07d" % i, "png": _png(image), "txt": "\n".join([texts["text1"], texts["text2"]])})
    _write_split(folder, split, records, per_shard)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=480)
    ap.add_argument("--n-test", type=int, default=240)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out_dir)
    write_classification(out / "shapes", {"train": args.n_train, "val": args.n_test // 2, "test": args.n_test},
                         seed=args.seed, px=args.px)
    write_retrieval(out / "shapes_captions", args.n_test, seed=args.seed + 1, px=args.px)
    print(f"wrote {out / 'shapes'} and {out / 'shapes_captions'}")


if __name__ == "__main__":
    main()
