"""A small procedural world of coloured shapes: images and true captions, for the demo and the tests.

Each object has a colour, a shape, a size and a background; images are rendered with PIL, captions are
generated from the attributes. Seeded, so the same seed gives the same images and texts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from realsyn_pl.data.shard_writer import ShardWriter, encode_jpeg

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (120, 120, 120), "black": (15, 15, 15)}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str
    background: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(list(BACKGROUNDS)))


def render(thing: Thing, rng: random.Random, px: int = 64) -> Image.Image:
    img = Image.new("RGB", (px, px), BACKGROUNDS[thing.background])
    draw = ImageDraw.Draw(img)
    r = px * (0.38 if thing.size == "large" else 0.2) * rng.uniform(0.9, 1.1)
    cx, cy = px / 2 + rng.uniform(-px * 0.1, px * 0.1), px / 2 + rng.uniform(-px * 0.1, px * 0.1)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[thing.colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if thing.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle(box, fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return img


def captions(thing: Thing, rng: random.Random) -> dict[str, str]:
    """Four true descriptions in the RealSyn roles: three 'retrieved' sentences and one 'synthetic' caption."""
    t = thing
    return {
        "text1": f"a {t.size} {t.colour} {t.shape} on a {t.background} background",
        "text2": f"this picture shows a {t.colour} {t.shape}",
        "text3": f"{t.colour} {t.shape}, {t.size}, seen on {t.background}",
        "syn_text": f"A {t.size} {t.colour} {t.shape} placed in the middle of a plain {t.background} backdrop.",
    }


def samples(n: int, seed: int, px: int = 64) -> Iterator[dict]:
    rng = random.Random(seed)
    for i in range(n):
        thing = random_thing(rng)
        texts = captions(thing, rng)
        yield {
            "key": f"{seed:04d}{i:07d}",
            "jpg": encode_jpeg(render(thing, rng, px)),
            "txt": texts["text1"],
            "json": {"text2": texts["text2"], "text3": texts["text3"], "syn_text": texts["syn_text"],
                     "label": thing.label},
        }


def write_world_shards(out_dir: str | Path, num_samples: int, samples_per_shard: int, seed: int = 0, px: int = 64) -> Path:
    """RealSyn-layout shards of the shape world (sizes.json included); returns the folder."""
    with ShardWriter(out_dir, samples_per_shard) as writer:
        writer.write_all(samples(num_samples, seed, px))
    return Path(out_dir)
