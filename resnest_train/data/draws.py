"""Every training sample's augmentation draws, made by the framework from (seed, epoch, sample) alone.

The crop window (and `inception`'s interpolation), the flip, the colour-jitter factors, the PCA-lighting
coefficients and the AutoAugment sub-policy, stage uniforms and signs of one image are drawn here, in
Python, from a generator seeded by (`train.seed`, epoch, training-list position) (`randomness.py`), and
handed to whichever backend decodes the image: DALI receives them as per-sample arguments, the torchvision
transforms apply them. The same image therefore gets the same augmentation on any number of processes,
after any resume, on either backend. The crop window follows the rule `data.crop` names (crops.py; by
default torchvision's `RandomResizedCrop.get_params`) on the image's size, read from its header before it
is decoded; AutoAugment's draws are those `autoaugment.AutoAugment.draw` documents, RandAugment's
(`data.autoaugment: rand-...`) those `randaugment.draw` documents, drawn after the same crop, flip, jitter
and lighting draws (the AutoAugment and no-augment draws are unchanged by it), with each layer's argument
(`arg`) computed from them once, for both backends.

With `train.repeated_augment` = k > 1 an image appears up to k times in an epoch (order.py); copy r > 0 is
drawn from (seed, epoch, sample, r), copy 0 from (seed, epoch, sample) as every image is without repeats, so
the copies are augmented independently and k = 1 draws exactly what it drew before. The crop window is in
the image's own pixels, whatever size it is resized to, so progressive resizing (`DataPlan.train_size`)
changes no draw; only RandAugment's translation on the crop (`autoaugment_on: crop`) is computed for the
epoch's crop size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from resnest_train.data.autoaugment import POLICIES
from resnest_train.data.crops import draw_crop
from resnest_train.data.plan import DataPlan
from resnest_train.data.randaugment import draw as draw_rand_augment
from resnest_train.data.randaugment import is_rand_augment, op_args, parse_rand_augment
from resnest_train.recipe.randomness import AUGMENT, derive_seed


@dataclass
class Draws:
    """One micro-batch's draws, one row per sample (arrays DALI takes as per-sample arguments). AutoAugment
    (or none) fills `sub_policy`, `run`, `negate`; RandAugment `op`, `run`, `magnitude`, `negate`, `arg`."""

    crop: np.ndarray  # (B, 4) int32: top, left, height, width in the image's pixels
    flip: np.ndarray  # (B,) int32: 1 flips horizontally
    jitter: np.ndarray  # (B, 3) float32: brightness, contrast, saturation factors
    lighting: np.ndarray  # (B, 3) float32: AlexNet PCA lighting's alpha
    sub_policy: np.ndarray | None = None  # (B,) int32: AutoAugment's sub-policy
    run: np.ndarray | None = None  # (B, stages) float32: a stage runs when its uniform is below its probability
    negate: np.ndarray | None = None  # (B, stages) int32: 1 negates a signed op's magnitude
    op: np.ndarray | None = None  # (B, layers) int32: RandAugment's op of each layer (index into timm's table)
    magnitude: np.ndarray | None = None  # (B, layers) float32: its magnitude, noise added and clipped
    arg: np.ndarray | None = None  # (B, layers) float32: the op's argument both backends apply
    interp: np.ndarray | None = None  # (B,) int32: data.crop=inception's resize (crops.INTERPOLATIONS index)
    repeat: np.ndarray | None = None  # (B,) int32: which copy of its image (train.repeated_augment > 1)

    def row(self, i: int) -> dict:
        """Sample i's draws as plain values (the per-sample record, and the torchvision transforms)."""
        return {f.name: getattr(self, f.name)[i].tolist() for f in fields(self) if getattr(self, f.name) is not None}


_DTYPES = {"crop": np.int32, "flip": np.int32, "jitter": np.float32, "lighting": np.float32, "sub_policy": np.int32,
           "run": np.float32, "negate": np.int32, "op": np.int32, "magnitude": np.float32, "arg": np.float32,
           "interp": np.int32, "repeat": np.int32}


def augment_inputs(autoaugment: str) -> tuple[str, ...]:
    """The draws DALI's augmentation reads per image (`DaliOps.autoaugment`, `HostOps.autoaugment`)."""
    if autoaugment == "none":
        return ()
    return ("op", "run", "arg") if is_rand_augment(autoaugment) else ("sub_policy", "run", "negate")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from an encoded image's header (PIL reads the header only)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return height, width


def stages(plan: DataPlan) -> int:
    return max(len(sub) for sub in POLICIES[plan.autoaugment]) if plan.autoaugment != "none" else 2


def draw_sample(plan: DataPlan, epoch: int, sample: int, height: int, width: int, repeat: int = 0) -> dict:
    """One sample's draws, in a fixed sequence from its own generator (the order of draws is the format).
    `repeat`: the copy of the image (train.repeated_augment); copy 0 keeps the key of an unrepeated image."""
    keys = (epoch, sample) if repeat == 0 else (epoch, sample, repeat)
    rng = np.random.Generator(np.random.Philox(derive_seed(plan.seed, AUGMENT, *keys)))
    drawn = draw_crop(rng, plan.crop, height, width, scale=plan.rrc_scale, min_area=plan.crop_min_area,
                      crop_size=plan.crop_size)
    flip = int(rng.random() < 0.5) if plan.hflip else 0
    low, high = 1 - plan.color_jitter, 1 + plan.color_jitter
    jitter = rng.uniform(low, high, 3) if plan.color_jitter > 0 else np.ones(3)
    lighting = rng.normal(0.0, plan.lighting, 3) if plan.lighting > 0 else np.zeros(3)
    drawn.update(flip=flip, jitter=jitter, lighting=lighting)
    if is_rand_augment(plan.autoaugment):
        spec = parse_rand_augment(plan.autoaugment)
        drawn.update(draw_rand_augment(rng, spec))
        side = plan.train_size(epoch)  # the epoch's crop (progressive resizing): still a function of the epoch
        size = (height, width) if plan.autoaugment_on == "image" else (side, side)
        drawn["arg"] = op_args(spec, drawn["op"], drawn["magnitude"], drawn["negate"], *size)
        return drawn
    count = len(POLICIES[plan.autoaugment]) if plan.autoaugment != "none" else 1
    n = stages(plan)
    drawn.update(sub_policy=int(rng.integers(count)), run=rng.random(n), negate=rng.integers(0, 2, n))
    return drawn


def draw_batch(plan: DataPlan, epoch: int, samples: list[int], sizes: list[tuple[int, int]],
               repeats: list[int] | None = None) -> Draws:
    """The draws of a micro-batch; `repeats` (with train.repeated_augment > 1) each sample's copy, recorded
    beside its draws."""
    rows = [draw_sample(plan, epoch, sample, h, w, repeat)
            for sample, (h, w), repeat in zip(samples, sizes, repeats or [0] * len(samples))]
    if repeats is not None:
        for row, repeat in zip(rows, repeats):
            row["repeat"] = repeat
    return Draws(**{key: np.array([row[key] for row in rows], dtype=_DTYPES[key]) for key in rows[0]})
