"""The loop (run/loop.py), imported and run in-process on a tiny model: an epoch is `steps_per_epoch`
optimizer steps of `accumulation` micro-steps, each step's lr is the plan's, the step hook sees every step,
and accumulated micro-batches give the update of the whole batch at once (forward_backward + optimizer_step,
the engine's functions the loop calls)."""

from __future__ import annotations

import types

import torch
from torch import nn

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config_yaml import from_dict
from resnest_train.recipe.engine import resolve_precision
from resnest_train.recipe.schedule import build_train_plan
from resnest_train.run import loop
from resnest_train.run.resume import Progress
from tests.conftest import make_order

IMAGES, LABELS = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3


class ListLoader:
    """A TrainLoader over fixed tensors: this process's micro-batches of the order, as the backends read them."""

    last_draws = None

    def __init__(self, order):
        self.order, self.last_samples = order, torch.empty(0, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        self.rows = self.order.rank_samples(epoch).view(-1, self.order.layout.micro_batch)

    def __iter__(self):
        for row in self.rows:
            self.last_samples = row
            yield IMAGES[row], LABELS[row]


class QuietReporter:
    """RunReporter's calls, recorded (no files)."""

    def __init__(self):
        self.steps = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def step_done(self, step, epoch_step, loss, lr, images):
        self.steps.append((step, epoch_step, lr, images))


def tiny_run(global_batch: int, micro_batch: int) -> types.SimpleNamespace:
    config = from_dict({"model": {"num_classes": 3, "dropblock_prob": 0.0},
                        "data": {"backend": "synthetic", "synthetic_size": 32},
                        "train": {"global_batch": global_batch, "batch_size": micro_batch, "epochs": 2,
                                  "mixup_alpha": 0.0, "amp": "none"},
                        "schedule": {"warmup_epochs": 1}, "checkpoint": {"interval_steps": 0}})
    plan = build_train_plan(config, 1, 32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    order = make_order(32, micro_batch, global_batch=global_batch)
    return types.SimpleNamespace(
        config=config, dist=DistInfo(0, 0, 1, torch.device("cpu")), plan=plan, model=model,
        optimizer=torch.optim.SGD([{"params": model.parameters(), "lr_scale": 1.0}], lr=0.1, momentum=0.9),
        scaler=torch.amp.GradScaler("cpu", enabled=False), precision=resolve_precision("none", torch.device("cpu")),
        criterion=nn.CrossEntropyLoss(), mixup=None, ema=None, writer=None, order=order,
        train_loader=ListLoader(order))


def test_an_epoch_is_its_steps_of_accumulated_micro_batches_on_the_plans_lr():
    run, reporter, hooks = tiny_run(16, 4), QuietReporter(), []
    progress = Progress()
    stop = types.SimpleNamespace(requested=False)
    assert loop.train_epoch(run, progress, reporter, stop, on_step=lambda: hooks.append(progress.step))
    assert (progress.epoch_step, progress.step) == (2, 2) and hooks == [1, 2]
    assert [(step, lr, images) for step, _, lr, images in reporter.steps] == \
        [(1, run.plan.lr(0), 16), (2, run.plan.lr(1), 16)]
    assert run.optimizer.param_groups[0]["lr"] == run.plan.lr(1)


def test_accumulated_micro_batches_update_as_the_whole_batch_does():
    """4 micro-batches of 4 (accumulation 4) and one batch of 16: the same update, up to float rounding."""
    stepped = {}
    for micro in (4, 16):
        run = tiny_run(16, micro)
        loop.train_epoch(run, Progress(), QuietReporter(), types.SimpleNamespace(requested=False), None)
        stepped[micro] = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()])
    # the gradient sums run in another order: a few float32 ulps of the weights' scale
    assert torch.allclose(stepped[4], stepped[16], rtol=1e-5, atol=1e-6)
    start = torch.cat([p.detach().reshape(-1) for p in tiny_run(16, 16).model.parameters()])
    assert (stepped[4] - start).norm() > 100 * (stepped[4] - stepped[16]).norm()  # they did move, together


def test_a_stop_requested_ends_the_epoch_after_a_step_with_a_checkpoint(monkeypatch):
    run, saved = tiny_run(8, 4), []
    monkeypatch.setattr(loop, "save", lambda run, progress, **kwargs: saved.append(progress.step))
    progress = Progress()
    assert not loop.train_epoch(run, progress, QuietReporter(), types.SimpleNamespace(requested=True), None)
    assert progress.step == 1 and saved == [1]
