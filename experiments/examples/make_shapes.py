"""Write a small image dataset for the example experiment: grey 16x16 PNGs of three shapes.

    python experiments/examples/make_shapes.py            # -> experiments/examples/data/shapes/
    python experiments/examples/make_shapes.py --out DIR [--train 100] [--test 30] [--seed 0]

Layout (what ``--dataset images:FOLDER`` reads): ``FOLDER/train/<class>/*.png`` and
``FOLDER/test/<class>/*.png`` with the classes ``circle``, ``square`` and ``triangle``. Each image
is one white shape of random size and position on a dark background with Gaussian noise, drawn
from a seeded generator: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 16
CLASSES = ("circle", "square", "triangle")


def draw(shape: str, rng: np.random.Generator) -> Image.Image:
    """One ``SIZE x SIZE`` grey image of ``shape`` (radius 3 to 6 pixels, anywhere it fits), noisy."""
    im = Image.new("L", (SIZE, SIZE), 0)
    r = int(rng.integers(3, 7))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    pen = ImageDraw.Draw(im)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    pixels = np.asarray(im, dtype=np.float64) * 0.8 + rng.normal(24, 12, (SIZE, SIZE))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(out: Path, train: int, test: int, seed: int) -> Path:
    """``train`` and ``test`` images per class into ``out/train`` and ``out/test``; returns ``out``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for shape in CLASSES:
            folder = out / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(shape, rng).save(folder / f"{i:04d}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "shapes")
    p.add_argument("--train", type=int, default=100, help="training images per class")
    p.add_argument("--test", type=int, default=30, help="test images per class")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {3 * (a.train + a.test)} images to {write(a.out, a.train, a.test, a.seed)}")


if __name__ == "__main__":
    main()
