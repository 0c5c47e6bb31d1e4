#!/usr/bin/env python
"""Write a small ImageFolder JPEG dataset whose classes are learnable from the pixels.

Each class has its own hue and shape (disc, square, stripes, cross, ring, ...); position, size, brightness
and background noise vary per image, so a short run shows real learning but not instant memorisation.
Usage: make_synthetic_dataset.py --out DIR [--classes N] [--train-per-class N] [--val-per-class N] [--size PX]
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "stripes", "cross", "ring", "triangle")


def class_color(index: int, classes: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(index / max(classes, 1), 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_image(index: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    noise = rng.normal(110, 35, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.8, 1.2)
    color = tuple(int(min(255, c * scale)) for c in class_color(index, classes))
    half = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(half, size - half, 2)
    box = (cx - half, cy - half, cx + half, cy + half)
    shape = SHAPES[index % len(SHAPES)]
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "stripes":
        step = max(2, int(half / 3))
        for x in range(int(box[0]), int(box[2]), 2 * step):
            draw.rectangle((x, box[1], x + step - 1, box[3]), fill=color)
    elif shape == "cross":
        w = half / 3
        draw.rectangle((cx - w, box[1], cx + w, box[3]), fill=color)
        draw.rectangle((box[0], cy - w, box[2], cy + w), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(half / 3)))
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    return image


def write_split(out: Path, split: str, classes: int, per_class: int, size: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    for index in range(classes):
        folder = out / split / f"class_{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for item in range(per_class):
            # Varying aspect ratios exercise the resize/crop paths.
            image = draw_image(index, classes, size, rng)
            width = int(size * rng.choice([1.0, 1.25, 0.8]))
            image.resize((width, size)).save(folder / f"{split}_{index:03d}_{item:05d}.jpg", quality=90)
    return classes * per_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.classes, args.train_per_class, args.size) < 1 or args.val_per_class < 0:
        print("error: --classes, --train-per-class and --size must be positive", file=sys.stderr)
        return 2
    n_train = write_split(args.out, "train", args.classes, args.train_per_class, args.size, args.seed)
    n_val = write_split(args.out, "val", args.classes, args.val_per_class, args.size, args.seed + 1)
    print(f"wrote {n_train} train and {n_val} val images in {args.classes} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
