"""The recipe options' cost against the released recipe's default, rounds interleaved (benchmark.py recipes):

  benchmark.py recipes [--model resnest50] [--batch-size 8] [--image-size 160] [--rounds 5]
      optimizer: one forward+backward, then each optimizer's step (sgd, lars, lamb, adamw) on the same
      gradients, each step timed alone (ms); augmentation: the torchvision backend's per-image augmentation
      (draws + PIL ops + tensor) of a 256 x 320 photo-like image for each policy and crop rule (ms/image);
      mixing: mixup vs CutMix per micro-batch (ms). Medians over rounds, each round visiting every option.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

POLICIES = ["none", "imagenet", "rand-m9-n2-mstd0.5", "rand-m6-mstd0.5-inc1", "rand-m4-n2"]
CROPS = ["random_resized", "inception", "efficientnet"]
OPTIMIZERS = ["sgd", "lars", "lamb", "adamw"]


def add_parsers(sub) -> None:
    recipes = sub.add_parser("recipes")
    recipes.add_argument("--model", default="resnest50")
    recipes.add_argument("--batch-size", type=int, default=8)
    recipes.add_argument("--image-size", type=int, default=160)
    recipes.add_argument("--rounds", type=int, default=5)
    recipes.add_argument("--images", type=int, default=32, help="images per augmentation timing")


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000


def _optimizers(args) -> dict:
    from resnest_train.config import OptimConfig
    from resnest_train.models import create_model
    from resnest_train.recipe.optim import build_optimizer
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    model(images).logsumexp(1).mean().backward()
    optimizers = {name: build_optimizer(model, OptimConfig(name=name), 0.1) for name in OPTIMIZERS}
    times = {name: [] for name in OPTIMIZERS}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():  # each steps the same gradients (the weights drift: no matter)
            times[name].append(_timed(optimizer.step))
    return {name: statistics.median(values) for name, values in times.items()}


def _photo(height: int = 256, width: int = 320) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def _augmentations(args) -> dict:
    from resnest_train.cluster.distributed import DistInfo
    from resnest_train.config_yaml import from_dict
    from resnest_train.data.draws import draw_batch
    from resnest_train.data.plan import build_data_plan
    from resnest_train.data.torchvision_augment import TrainAugment

    def make_plan(**data):
        config = from_dict({"model": {"num_classes": 1000}, "data": {"root": "/nonexistent", **data}})
        return build_data_plan(config, DistInfo(0, 0, 1, torch.device("cpu")))
    image = _photo()
    options = {**{f"autoaugment={p}": dict(autoaugment=p, autoaugment_on="crop") for p in POLICIES},
               **{f"crop={c}": dict(crop=c, autoaugment="none") for c in CROPS}}
    plans = {name: make_plan(crop_size=224, **values) for name, values in options.items()}
    augments = {name: TrainAugment(plan) for name, plan in plans.items()}
    times = {name: [] for name in options}
    def run(name: str) -> None:
        draws = draw_batch(plans[name], 0, list(range(args.images)), [(image.height, image.width)] * args.images)
        for i in range(args.images):
            augments[name](image, draws.row(i))

    for _ in range(args.rounds):
        for name in plans:
            times[name].append(_timed(lambda name=name: run(name)) / args.images)
    return {name: statistics.median(values) for name, values in times.items()}


def _mixing(args) -> dict:
    from resnest_train.recipe.mixing import BatchMix
    images = torch.randn(args.batch_size * 4, 3, 224, 224)
    targets = torch.randint(0, 1000, (args.batch_size * 4,))
    common = dict(mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=1000)
    mixes = {"mixup": BatchMix(mixup_alpha=0.2, cutmix_alpha=0.0, **common),
             "cutmix": BatchMix(mixup_alpha=0.0, cutmix_alpha=1.0, **common)}
    times = {name: [] for name in mixes}
    for round_ in range(args.rounds):
        for name, mix in mixes.items():
            times[name].append(_timed(lambda mix=mix, seed=round_: mix(images, targets, np.random.RandomState(seed))))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_recipes(args) -> dict:
    torch.set_num_threads(2)
    return {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
            "optimizer_step_ms": _optimizers(args), "augment_ms_per_image": _augmentations(args),
            "mix_ms_per_micro_batch": _mixing(args), "rounds": args.rounds}
