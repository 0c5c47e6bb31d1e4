#!/usr/bin/env python
"""Benchmarks, each printing its figures as one JSON line last (BENCHMARKS.md records what they showed).

  benchmark.py model --model NAME [--batch-size 16] [--image-size 224] [--channels-last] [--compile] [--compare]
                     [--image-sizes N [N ...]]
      forward+backward+SGD step; --compare interleaves timm's equivalent model in the same process;
      --image-sizes times the step at each size instead, rounds interleaved (data.progressive_resize's gain).
  benchmark.py data --root DIR --backend {dali,torchvision} [--batch-size 32] [--workers 2] [--crop-size 224]
                    [--autoaugment {none,imagenet}] [--seconds 10] [--color-jitter 0.4] [--lighting 0.1] [--compare]
                    [--rounds 4] [--settle 1.0]
      the training pipeline alone (decode, augment, batches as tensors); --compare runs the other backend too,
      rounds interleaved, each timed after `settle` untimed seconds (steady state, no queued batches).
  benchmark.py trainer [--model resnest14] [--batch-size 32] [--image-size 64] [--compare] [--profile]
                       [--compare-accumulation K]
      train.py's loop on the synthetic backend against a bare loop of the same work (benchmark_trainer.py).
  benchmark.py attention: the split-attention combine step alone, three formulations, fwd+bwd (ms).
  benchmark.py scan / checkpoint: the dataset index scan and checkpoint saves (benchmark_io.py).
  benchmark.py scale --out DIR: the data path at ImageNet's 1.33M files (benchmark_scale.py).
  benchmark.py trace-check [--model resnest50]: what split attention's torch.fx check costs eager training.
  benchmark.py recipes: each optimizer's step, each augmentation policy and crop rule, mixup vs CutMix
      (benchmark_recipes.py).
Ratios are measured in one run, rounds interleaved, because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark_io  # noqa: E402  (scripts/ is on sys.path when this file runs)
import benchmark_recipes  # noqa: E402
import benchmark_scale  # noqa: E402
import benchmark_trainer  # noqa: E402

from resnest_train.models import create_model  # noqa: E402
from resnest_train.models.zoo import TIMM_NAMES  # noqa: E402


def _step_fn(model, args, size: int | None = None):
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    size = size or args.image_size
    device = torch.device(args.device)
    model = model.to(device, memory_format=fmt).train()
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    images = images.contiguous(memory_format=fmt)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss()
    amp = args.amp == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step, steps: int) -> float:
    _sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return time.perf_counter() - started


def _interleaved(steps: dict, args) -> dict:
    """Each side's seconds per round of `args.steps` steps, rounds interleaved (the machines are shared)."""
    for step in steps.values():  # warm-up (allocator, compile)
        _time(step, 2)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(_time(step, args.steps))
    return times


def bench_sizes(args) -> dict:
    """One model's training step at each of `--image-sizes`: the images/s progressive resizing trains its
    smaller epochs at, and each size's speed-up over the largest."""
    def fresh(size: int):
        torch.manual_seed(0)  # the same initial weights for every size: each side trains its own copy
        return _step_fn(create_model(args.model), args, size)
    times = _interleaved({size: fresh(size) for size in args.image_sizes}, args)
    images, largest = args.batch_size * args.steps, str(max(args.image_sizes))
    result = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
              "amp": args.amp, "channels_last": args.channels_last}
    # The median round, and the best one: what the code can do when the shared machine lets it.
    for name, pick in (("", statistics.median), ("best_", min)):
        rates = {str(size): images / pick(values) for size, values in times.items()}
        result[f"{name}images_per_sec"] = rates
        result[f"{name}speedup_vs_largest"] = {size: rate / rates[largest] for size, rate in rates.items()}
    return result


def bench_model(args) -> dict:
    torch.set_num_threads(args.threads)
    # Denormal gradients slow CPU element-wise kernels by up to 3x depending on the random draw of weights
    # (GPUs flush them); flushing makes the comparison independent of that draw.
    torch.set_flush_denormal(args.flush_denormal)
    if args.image_sizes:
        return bench_sizes(args)
    sides = {"ours": create_model(args.model)}
    if args.compare:
        import timm
        sides["timm"] = timm.create_model(TIMM_NAMES[args.model])
    times = _interleaved({name: _step_fn(model, args) for name, model in sides.items()}, args)
    result = {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
              "channels_last": args.channels_last, "threads": args.threads, "flush_denormal": args.flush_denormal,
              "device": args.device, "amp": args.amp}
    for name, values in times.items():
        prefix = "" if name == "ours" else f"{name}_"
        result[f"{prefix}images_per_sec"] = args.batch_size * args.steps / statistics.median(values)
        # The best round: what the code can do when the shared machine lets it (timeit's advice).
        result[f"{prefix}best_images_per_sec"] = args.batch_size * args.steps / min(values)
    if args.compare:
        result["ratio_vs_timm"] = result["images_per_sec"] / result["timm_images_per_sec"]
        result["best_ratio_vs_timm"] = result["best_images_per_sec"] / result["timm_best_images_per_sec"]
    return result


def _combine_slices(x, w, radix, channels):
    splits, weights = x.split(channels, 1), w.split(channels, 1)
    out = splits[0] * weights[0]
    for split, weight in zip(splits[1:], weights[1:]):
        out = torch.addcmul(out, split, weight)
    return out


def _combine_5d(x, w, radix, channels):
    b, _, h, width = x.shape
    return (x.view(b, radix, channels, h, width) * w.view(b, radix, channels, 1, 1)).sum(1)


def _combine_timm(x, w, radix, channels):
    b, _, h, width = x.shape
    return (x.reshape(b, radix, channels, h, width) * w.reshape(b, radix, channels, 1, 1)).sum(1).contiguous()


def bench_attention(args) -> dict:
    """The split-attention combine step alone (weighted sum of the radix splits), fwd+bwd, three ways."""
    torch.set_num_threads(args.threads)
    forms = {"slices": _combine_slices, "5d": _combine_5d, "timm": _combine_timm}
    result = {}
    for channels, size in [(64, 56), (256, 14)]:
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x0 = torch.randn(args.batch_size, 2 * channels, size, size).contiguous(memory_format=fmt)
            w0 = torch.rand(args.batch_size, 2 * channels, 1, 1)
            times = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, form in forms.items():
                    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
                    started = time.perf_counter()
                    out = form(x, w, 2, channels)
                    out.backward(torch.ones_like(out))
                    times[name].append(time.perf_counter() - started)
            key = f"{channels}ch_{size}px_{'cl' if channels_last else 'nchw'}"
            result[key] = {name: round(1000 * min(values), 2) for name, values in times.items()}
    return {"attention_combine_ms": result}


def _data_loader(backend: str, args, autoaugment_on: str | None = None):
    from resnest_train.cluster.distributed import DistInfo
    from resnest_train.config_yaml import from_dict
    from resnest_train.data import TrainOrder, build_data_plan, build_train_loader
    from resnest_train.data.index import load_index
    from resnest_train.recipe.schedule import BatchLayout
    config = from_dict({"data": dict(root=args.root, backend=backend, workers=args.workers, crop_size=args.crop_size,
                                     autoaugment=args.autoaugment, autoaugment_on=autoaugment_on or args.autoaugment_on,
                                     color_jitter=args.color_jitter, lighting=args.lighting)})
    plan = build_data_plan(config, DistInfo(0, 0, 1, torch.device(args.device)))
    index = load_index(args.root)
    order = TrainOrder(0, len(index.train), BatchLayout(args.batch_size, args.batch_size, 1),
                       len(index.train) // args.batch_size, 0)
    return build_train_loader(plan, index, order)


def _images_per_sec(loader, seconds: float, settle: float) -> float:
    """Steady-state images/s. The first `settle` seconds of a round are not timed: they drain the batches
    the loader queued while the other backend's round ran, and let its workers' queueing finish (with no
    settling, torchvision's 2x2 prefetched batches are a free start and its refill runs inside DALI's
    round)."""
    images, started, settled = 0, time.perf_counter(), None
    while True:
        loader.epochs = getattr(loader, "epochs", -1) + 1
        loader.set_epoch(loader.epochs)
        for batch, _ in loader:
            now = time.perf_counter()
            if settled is None and now - started > settle:
                settled = now
            elif settled is not None:
                images += batch.shape[0]
                if now - settled > seconds:
                    return images / (now - settled)


def bench_data(args) -> dict:
    backends = [args.backend] + ([b for b in ("dali", "torchvision") if b != args.backend] if args.compare else [])
    loaders = {b: _data_loader(b, args) for b in backends}
    if args.compare_order:  # the same backend with AutoAugment on the other side of the random crop
        other = "image" if args.autoaugment_on == "crop" else "crop"
        backends.append(f"{args.backend}_autoaugment_on_{other}")
        loaders[backends[-1]] = _data_loader(args.backend, args, other)
    for loader in loaders.values():
        _images_per_sec(loader, 1.0, settle=0.0)  # warm-up: workers started, caches filled
    rates = {b: [] for b in backends}
    for _ in range(args.rounds):
        for backend, loader in loaders.items():
            rates[backend].append(_images_per_sec(loader, args.seconds / args.rounds, args.settle))
    result = {"backend": args.backend, "images_per_sec": statistics.median(rates[args.backend]),
              "workers": args.workers, "autoaugment": args.autoaugment, "autoaugment_on": args.autoaugment_on,
              "crop_size": args.crop_size,
              "color_jitter": args.color_jitter, "lighting": args.lighting}
    for backend in backends[1:]:
        result[f"{backend}_images_per_sec"] = statistics.median(rates[backend])
        result[f"ratio_vs_{backend}"] = result["images_per_sec"] / result[f"{backend}_images_per_sec"]
    return result


def bench_trace_check(args) -> dict:
    """What traceability costs eager training: split attention asks whether torch.fx is tracing before it
    picks its form (models/split_attention.py). Forward + backward with that check (as shipped) and with it
    replaced by a constant, interleaved; ratio = without / with (1.0: no cost)."""
    import resnest_train.models.split_attention as split_attention
    from resnest_train.models import create_model
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    shipped = split_attention._fx_tracing

    def step(check) -> float:
        split_attention._fx_tracing = check
        started = time.perf_counter()
        model(images).sum().backward()
        return time.perf_counter() - started
    step(shipped)
    step(lambda: False)
    ratios = [step(lambda: False) / step(shipped) for _ in range(args.rounds)]
    split_attention._fx_tracing = shipped
    return {"model": args.model, "ratio_without_check": statistics.median(ratios), "rounds": args.rounds,
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def _add_model_parser(sub) -> None:
    model = sub.add_parser("model")
    model.add_argument("--model", default="resnest50")
    model.add_argument("--batch-size", type=int, default=16)
    model.add_argument("--image-size", type=int, default=224)
    model.add_argument("--channels-last", action="store_true")
    model.add_argument("--compile", action="store_true")
    model.add_argument("--compare", action="store_true")
    model.add_argument("--steps", type=int, default=3)
    model.add_argument("--rounds", type=int, default=5)
    model.add_argument("--threads", type=int, default=2)
    model.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) for both")
    model.add_argument("--device", default="cpu", help="cpu or cuda")
    model.add_argument("--amp", choices=["none", "bf16"], default="none")
    model.add_argument("--image-sizes", type=int, nargs="+", metavar="N",
                       help="time the step at each size, rounds interleaved (progressive resizing's sizes)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    _add_model_parser(sub)
    data = sub.add_parser("data")
    data.add_argument("--root", required=True)
    data.add_argument("--backend", choices=["dali", "torchvision"], required=True)
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--workers", type=int, default=2)
    data.add_argument("--crop-size", type=int, default=224)
    data.add_argument("--autoaugment", choices=["none", "imagenet"], default="none")
    data.add_argument("--autoaugment-on", choices=["image", "crop"], default="crop",
                      help="where AutoAugment runs: the whole image (the released recipe) or the crop")
    data.add_argument("--seconds", type=float, default=10)
    data.add_argument("--color-jitter", type=float, default=0.4, help="the recipe's 0.4; 0 disables")
    data.add_argument("--lighting", type=float, default=0.1, help="the recipe's 0.1; 0 disables")
    data.add_argument("--rounds", type=int, default=4)
    data.add_argument("--settle", type=float, default=1.0, help="untimed seconds at the start of each round")
    data.add_argument("--compare", action="store_true")
    data.add_argument("--device", default="cpu", help="cuda: batches on the GPU (DALI decodes there)")
    data.add_argument("--compare-order", action="store_true",
                      help="also time the backend with AutoAugment on the other side of the crop")
    benchmark_trainer.add_parsers(sub)
    benchmark_io.add_parsers(sub)
    benchmark_recipes.add_parsers(sub)
    benchmark_scale.add_parsers(sub)
    attention = sub.add_parser("attention")
    attention.add_argument("--batch-size", type=int, default=16)
    attention.add_argument("--rounds", type=int, default=10)
    attention.add_argument("--threads", type=int, default=2)
    trace = sub.add_parser("trace-check")
    trace.add_argument("--model", default="resnest50")
    trace.add_argument("--batch-size", type=int, default=8)
    trace.add_argument("--image-size", type=int, default=128)
    trace.add_argument("--rounds", type=int, default=10)
    trace.add_argument("--threads", type=int, default=2)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    result = {"model": bench_model, "data": bench_data, "trainer": benchmark_trainer.bench_trainer,
              "attention": bench_attention, "scan": benchmark_io.bench_scan,
              "checkpoint": benchmark_io.bench_checkpoint, "scale": benchmark_scale.bench_scale,
              "trace-check": bench_trace_check, "recipes": benchmark_recipes.bench_recipes}[args.what](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
