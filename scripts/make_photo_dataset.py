#!/usr/bin/env python
"""Write an ImageFolder dataset of real photographs at ImageNet-like sizes, for data-pipeline benchmarks.

Decoding and augmenting cost depends on image content (JPEG entropy) and size, so flat colours or noise
misrepresent ImageNet. No download is possible here, so the sources are the colour photographs that
scikit-image, scikit-learn and matplotlib ship in their wheels (`pip install -e .[bench]`); each class is
one photograph, each image a random crop of it, rescaled to a shorter side of 300-500 px (ImageNet's
typical range) and saved as JPEG quality 90.
Usage: make_photo_dataset.py --out DIR [--per-class 60] [--val-per-class 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = {
    "skimage": ["data/coffee.png", "data/astronaut.png", "data/chelsea.png", "data/rocket.jpg",
                "data/motorcycle_left.png", "data/motorcycle_right.png", "data/retina.jpg",
                "data/hubble_deep_field.jpg"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
    "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
}


def find_photos() -> list[Path]:
    photos = []
    for package, paths in SOURCES.items():
        try:
            module = __import__(package)
        except ImportError:
            continue
        base = Path(module.__file__).parent
        photos += [base / p for p in paths if (base / p).is_file()]
    return photos


def random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    area = rng.uniform(0.3, 1.0) * width * height
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(min(width, round(np.sqrt(area * aspect))))
    h = int(min(height, round(np.sqrt(area / aspect))))
    left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
    view = photo.crop((left, top, left + w, top + h))
    scale = rng.uniform(300, 500) / min(w, h)
    view = view.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    photos = find_photos()
    if len(photos) < 2:
        print("error: no sample photographs found; pip install -e .[bench] (scikit-image, scikit-learn, "
              "matplotlib)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    for index, path in enumerate(photos):
        photo = Image.open(path).convert("RGB")
        for split, count in (("train", args.per_class), ("val", args.val_per_class)):
            folder = args.out / split / f"{index:02d}_{path.stem}"
            folder.mkdir(parents=True, exist_ok=True)
            for item in range(count):
                random_view(photo, rng).save(folder / f"{item:05d}.jpg", quality=90)
    print(f"wrote {len(photos)} classes of photographs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
