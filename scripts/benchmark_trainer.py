"""The trainer benchmark of scripts/benchmark.py: train.py's loop against a bare loop of the same work.

  benchmark.py trainer [--model resnest14] [--batch-size 32] [--image-size 64] [--steps 20] [--rounds 3]
                       [--compare] [--compare-accumulation K] [--profile]
      train.py's loop on the synthetic backend (configs/demo.yaml, two epochs; the second is timed).
      --compare: a bare loop doing the same work steps beside the trainer, step for step in the same run
      (after each optimizer step of the trainer, one step of the bare loop: the trainer's time is from the
      end of one bare step to the trainer's next step, the bare loop's the rest). The bare loop is the same
      config built by the same functions (model, no-decay parameter groups, mixup, criterion, lr schedule),
      a fresh batch per step, and nothing else (no per-micro-batch seeding, autocast or GradScaler calls,
      loader, reporter), so the ratio measures the trainer's overhead, not a difference in work.
      --compare-accumulation K: also runs the trainer with K micro-batches of the same size per optimizer
      step (global batch K x batch), runs of both kinds alternating, each with the bare loop beside it as
      its yardstick; every side then runs K micro-batches in a row (K optimizer steps without
      accumulation, one with it, K bare steps).
      --profile: one more run of each kind under torch.profiler (not timed), the bare loop beside it, and
      a table of each op's calls and self CPU ms per micro-batch on either side (stderr): the trainer's ops
      and the bare loop's, recorded in the same seconds.

Why step for step: on a shared machine another process's burst slows whatever runs in those seconds.
Runs of the two sides in turn put the bursts on one side or the other (0.63x and 0.98x in two runs of
the same code); alternating steps of ~0.2 s shares them out, and the per-step medians ignore the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BARE_STEP = "bare step"  # the profiler's label of the bare loop's steps


def add_parsers(sub) -> None:
    trainer = sub.add_parser("trainer")
    trainer.add_argument("--model", default="resnest14")
    trainer.add_argument("--batch-size", type=int, default=32)
    trainer.add_argument("--image-size", type=int, default=64)
    trainer.add_argument("--steps", type=int, default=20, help="micro-batches per epoch")
    trainer.add_argument("--rounds", type=int, default=3)
    trainer.add_argument("--threads", type=int, default=2)
    trainer.add_argument("--compare", action="store_true")
    trainer.add_argument("--compare-accumulation", type=int, default=0, metavar="K",
                         help="also run with K accumulation steps of the same micro-batch (global batch K x it)")
    trainer.add_argument("--flush-denormal", choices=["on", "off"], help="default: the trainer's setting")
    trainer.add_argument("--profile", action="store_true", help="op table per micro-batch, both sides")


def _config(args, out: Path, accumulation: int = 1):
    from resnest_train.config_yaml import load_config
    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "demo.yaml", [
        f"train.global_batch={args.batch_size * accumulation}",
        f"output_dir={out}", "data.backend=synthetic", f"data.synthetic_size={args.batch_size * args.steps}",
        f"model.name={args.model}", f"train.batch_size={args.batch_size}", f"data.crop_size={args.image_size}",
        f"data.val_crop_size={args.image_size}", "train.epochs=2", "checkpoint.keep_last=0",
        "train.log_interval=1000000", "model.num_classes=1000", "checkpoint.resume=null"])


class BareLoop:
    """The trainer's work, built by its own functions from the same config, one plain step at a time."""

    def __init__(self, args, out: Path):
        from resnest_train.cluster.distributed import select_device
        from resnest_train.recipe.loss import build_criterion, build_mixup
        from resnest_train.recipe.optim import build_optimizer
        from resnest_train.recipe.randomness import micro_batch_generator
        from resnest_train.recipe.schedule import build_train_plan
        from resnest_train.run.wrapping import build_model
        config = _config(args, out)
        device = select_device(config.train.device, 0)  # the trainer's device (train.device=auto)
        self.plan = build_train_plan(config, 1, config.data.synthetic_size)
        torch.manual_seed(config.train.seed)
        self.model = build_model(config.model, pretrained=False).to(device).train()
        self.optimizer = build_optimizer(self.model, config.optim, self.plan.peak_lr)
        self.criterion = build_criterion(config.train)
        self.mixup = build_mixup(config.train, config.model.num_classes)
        self.pool = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        self.labels = torch.randint(0, config.model.num_classes, (args.batch_size,), device=device)
        self.step_index = 0
        # the trainer's mix draws: micro-batch 0 of each step (one micro-batch per step here)
        self.generator = lambda step: micro_batch_generator(config.train.seed, step, 0)

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.plan.lr(self.step_index) * group["lr_scale"]
        self.step_index += 1
        images, targets = self.pool.clone(), self.labels  # a fresh batch, as the loader's gather
        if self.mixup is not None:
            images, targets = self.mixup(images, targets, self.generator(self.step_index))
        loss = self.criterion(self.model(images), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync() -> None:
    """On a GPU, each step's kernels finished before its time is read: every interval holds its own work
    (the host's work between steps then shows in full, not hidden behind the device's queue)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepClock:
    """Called after every optimizer step. Every `block` micro-batches: the trainer's time since the last
    block ended, then `block` steps of `beside` (the bare loop), timed on their own; both sides run the same
    number of micro-batches in a row, whatever the accumulation. With `profile`, a profiler whose schedule
    skips the first epoch and the first block of the second (the evaluation and checkpoint between the
    epochs) and records the rest."""

    def __init__(self, micro_batches_per_epoch: int, per_step: int, *, block: int, beside=None,
                 profile: bool = False):
        assert block % per_step == 0 and micro_batches_per_epoch % block == 0, (block, per_step)
        self.per_step, self.block, self.beside = per_step, block, beside
        self.blocks_per_epoch, self.pending = micro_batches_per_epoch // block, 0
        self.own, self.beside_seconds, self.profiler = [], [], None
        if profile:
            schedule = torch.profiler.schedule(wait=self.blocks_per_epoch, warmup=1, active=self.blocks_per_epoch - 1)
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   schedule=schedule)
            self.profiler.start()
        self.resumed = time.perf_counter()

    def __call__(self) -> None:
        self.pending += self.per_step
        if self.pending < self.block:
            return
        self.pending = 0
        _sync()
        now = time.perf_counter()
        self.own.append(now - self.resumed)
        if self.profiler is not None:
            self.profiler.step()
        if self.beside is not None:
            with torch.profiler.record_function(BARE_STEP) if self.profiler else contextlib.nullcontext():
                for _ in range(self.block):
                    self.beside()
            _sync()
        self.resumed = time.perf_counter()
        self.beside_seconds.append(self.resumed - now)

    def done(self) -> dict:
        """The second epoch's block times, its first block excluded (it holds the evaluation and checkpoint)."""
        if self.profiler is not None:
            self.profiler.stop()
        keep = slice(-self.blocks_per_epoch + 1, None)
        return {"own": self.own[keep], "beside": self.beside_seconds[keep] if self.beside else None,
                "profile": _split_profile(self.profiler) if self.profiler else None,
                "micro_batches": (self.blocks_per_epoch - 1) * self.block}


def _trainer_run(args, out: Path, accumulation: int = 1, *, bare: bool, profile: bool = False) -> dict:
    from resnest_train.run import runner
    config = _config(args, out, accumulation)
    beside = BareLoop(args, out).step if bare else None
    clock = StepClock(args.steps, accumulation, block=_block(args), beside=beside, profile=profile)
    runner.train(config, on_step=clock)  # the clock after each optimizer step
    # The trainer's own figure for the second epoch: its bare steps beside it included, when there are any.
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"epoch_images_per_sec": epoch["images_per_sec"], **clock.done()}


def _block(args) -> int:
    """Micro-batches per timed interval: K with --compare-accumulation K, for every run (with accumulation
    1 too, K optimizer steps, then K bare steps: a side's speed depends on how long it runs in a row, its
    weights staying in the caches; 1 vs 4 in a row measured 1.10x instead of 1.00-1.04x)."""
    return args.compare_accumulation or 1


def _split_profile(profiler) -> dict:
    """{"trainer" | "bare": {op: (calls, self CPU ms)}}: an op is the bare loop's when it ran inside a bare
    step (its parent chain holds the label; on CPU autograd runs the backward on the calling thread)."""
    sides = {"trainer": {}, "bare": {}}
    for event in profiler.events():
        if event.name == BARE_STEP or event.name.startswith("ProfilerStep"):
            continue
        side, parent = "trainer", event.cpu_parent
        while parent is not None and side == "trainer":
            side = "bare" if parent.name == BARE_STEP else side
            parent = parent.cpu_parent
        calls, ms = sides[side].get(event.name, (0, 0.0))
        sides[side][event.name] = (calls + 1, ms + event.self_cpu_time_total / 1000)
    return sides


def _print_profile(runs: dict, top: int = 25) -> None:
    """Calls and self CPU ms per micro-batch of each op, trainer and bare loop of each run side by side,
    the largest difference between the trainer's and the bare loop's of the first run first."""
    columns = {}
    for name, run in runs.items():
        for side, ops in run["profile"].items():
            count = run["micro_batches"]
            columns[f"{name} {side}" if name != "trainer" else side] = {
                op: (calls / count, ms / count) for op, (calls, ms) in ops.items()}
    names = list(columns)

    def diff(op):
        return abs(columns["trainer"].get(op, (0, 0.0))[1] - columns["bare"].get(op, (0, 0.0))[1])

    print(f"{'op (per micro-batch)':44s}" + "".join(f" {n[:20]:>20s} calls/ms" for n in names), file=sys.stderr)
    for op in sorted(set().union(*columns.values()), key=diff, reverse=True)[:top]:
        cells = "".join(f" {columns[n].get(op, (0, 0))[0]:20.1f} {columns[n].get(op, (0, 0))[1]:8.2f}" for n in names)
        print(f"{op[:44]:44s}{cells}", file=sys.stderr)
    totals = "".join(f" {'':20s} {sum(ms for _, ms in columns[n].values()):8.2f}" for n in names)
    print(f"{'total self CPU':44s}{totals}", file=sys.stderr)


def _summary(run: dict, batch_size: int, block: int) -> dict:
    """Images/s from the median block and from all the epoch's blocks; the same for the bare loop beside."""
    images = batch_size * block
    row = {"median_step_images_per_sec": images / statistics.median(run["own"]),
           "steps_images_per_sec": images * len(run["own"]) / sum(run["own"])}
    if run["beside"] is not None:
        row["bare_median_step_images_per_sec"] = images / statistics.median(run["beside"])
        row["bare_steps_images_per_sec"] = images * len(run["beside"]) / sum(run["beside"])
        row["ratio_vs_bare"] = row["median_step_images_per_sec"] / row["bare_median_step_images_per_sec"]
        row["steps_ratio_vs_bare"] = row["steps_images_per_sec"] / row["bare_steps_images_per_sec"]
        # Each trainer step against the bare step right after it: the pairs closest in time.
        pairs = list(zip(run["own"], run["beside"]))
        row["paired_ratio_vs_bare"] = statistics.median(bare / own for own, bare in pairs)
        row["paired_overhead_ms_per_micro_batch"] = 1000 * statistics.median(own - bare for own, bare in pairs) / block
    else:
        row["epoch_images_per_sec"] = run["epoch_images_per_sec"]
    return row


def bench_trainer(args) -> dict:
    from resnest_train.cluster import process
    torch.set_num_threads(args.threads)
    # Both sides with the same denormal setting: the trainer's (process.cpu_speed_settings), or the one asked.
    if args.flush_denormal is not None:
        process.FLUSH_DENORMAL = args.flush_denormal == "on"
    torch.set_flush_denormal(process.FLUSH_DENORMAL)
    if args.steps % _block(args):
        raise SystemExit(f"error: --steps {args.steps} is not a multiple of --compare-accumulation {_block(args)}")
    bare = args.compare or bool(args.compare_accumulation)
    kinds = [1] + ([args.compare_accumulation] if args.compare_accumulation else [])
    load = os.getloadavg()[:1]  # other processes on a shared machine: at the start, and 1/5/15 min at the end
    rows = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for k in kinds if round_ % 2 == 0 else kinds[::-1]:  # ABBA: neither kind always first
                run = _trainer_run(args, Path(tmp) / f"acc{k}-{round_}", k, bare=bare)
                rows[k].append(_summary(run, args.batch_size, _block(args)))
        if args.profile:
            _print_profile({"trainer" if k == 1 else f"accumulation {k}": _trainer_run(
                args, Path(tmp) / f"profile{k}", k, bare=True, profile=True) for k in kinds})
    result = {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
              "steps": args.steps, "flush_denormal": process.FLUSH_DENORMAL, "torch": torch.__version__,
              "load_average": [round(x, 2) for x in (*load, *os.getloadavg())]}
    for k, values in rows.items():
        if not values:  # --rounds 0: the profile alone
            continue
        prefix = "" if k == 1 else f"accumulation_{k}_"
        for key in values[0]:
            result[f"{prefix}{key}"] = statistics.median(v[key] for v in values)
        result[f"{prefix}rounds"] = {key: [round(v[key], 3) for v in values] for key in values[0]}
    if args.compare_accumulation and args.rounds:
        _accumulation_ratios(result, rows, args.compare_accumulation)
    return result


def _accumulation_ratios(result: dict, rows: dict, k: int) -> None:
    """Accumulation K over 1, per image: directly (runs in turn), and each against its own bare loop."""
    key = f"ratio_accumulation_{k}_vs_1"
    direct = [a["median_step_images_per_sec"] / b["median_step_images_per_sec"] for a, b in zip(rows[k], rows[1])]
    yardstick = [a["ratio_vs_bare"] / b["ratio_vs_bare"] for a, b in zip(rows[k], rows[1])]
    result[key] = statistics.median(direct)
    result[f"{key}_vs_own_bare"] = statistics.median(yardstick)
    result[f"{key}_rounds"] = {"direct": [round(x, 3) for x in direct], "vs_own_bare": [round(x, 3) for x in yardstick]}
