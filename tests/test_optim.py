"""Optimizers by name over the parameter groups (no weight decay on any bias or normalization parameter),
LARS's exclusion of those groups, the keys each optimizer reads, and global gradient-norm clipping in the
optimizer step (after fp16 unscaling); one short run with each optimizer and a schedule."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.optim import Lamb, Lars
from torch import nn

from resnest_train.config import OptimConfig
from resnest_train.models import create_model
from resnest_train.recipe.engine import optimizer_step
from resnest_train.recipe.optim import build_optimizer, ignored_keys, param_groups
from tests.conftest import metrics, run_script, train_args


def test_param_groups_exempt_every_bias_and_norm_parameter():
    model = create_model("resnest50")
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    # the deep-stem and downsample BNs that the official port's `'bn' in name` filter missed
    assert {"conv1.1.weight", "conv1.4.bias", "layer2.0.downsample.2.weight", "fc.bias"} <= names
    for name, param in model.named_parameters():
        assert (id(param) in no_decay_ids) == (param.ndim <= 1 or name.endswith(".bias")), name


def tiny_model() -> nn.Module:
    """A conv with bias, a BN and a classifier named `fc` (the head of head_lr_scale)."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), act=nn.ReLU(),
                                     flat=nn.Flatten(), fc=nn.Linear(4 * 4 * 4, 3)))


def backward(model: nn.Module, scaler=None, factor: float = 1.0) -> None:
    torch.manual_seed(1)
    loss = nn.functional.cross_entropy(model(torch.randn(5, 3, 6, 6)), torch.tensor([0, 1, 2, 0, 1])) * factor
    (loss if scaler is None else scaler.scale(loss)).backward()


def test_default_optimizer_is_todays_sgd():
    model = tiny_model()
    built = build_optimizer(model, OptimConfig(), 0.3)
    today = torch.optim.SGD(param_groups(model, 1e-4), lr=0.3, momentum=0.9, nesterov=True)
    assert type(built) is torch.optim.SGD and built.state_dict() == today.state_dict()


@pytest.mark.parametrize("name,cls,expected", [
    ("lars", Lars, {"momentum": 0.8, "nesterov": False, "trust_coeff": 0.02, "eps": 1e-8, "trust_clip": False}),
    ("lamb", Lamb, {"betas": (0.8, 0.99), "eps": 1e-6, "max_grad_norm": 1.0}),
    ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-8}),
])
def test_each_optimizer_reads_its_keys_over_the_same_groups(name, cls, expected):
    cfg = OptimConfig(name=name, momentum=0.8, nesterov=False, betas=(0.8, 0.99), trust_coeff=0.02,
                      head_lr_scale=10.0)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, 0.3)
    assert type(optimizer) is cls
    groups = optimizer.param_groups
    assert [(g["weight_decay"], g["lr_scale"], len(g["params"])) for g in groups] == \
        [(1e-4, 1.0, 1), (0.0, 1.0, 3), (1e-4, 10.0, 1), (0.0, 10.0, 1)]
    for key, value in expected.items():  # eps null: each optimizer's own default (timm's Lamb: 1e-6)
        assert all(g[key] == value for g in groups), key
    assert build_optimizer(model, dataclasses.replace(cfg, eps=1e-3), 0.3).param_groups[0]["eps"] == 1e-3


def test_keys_the_optimizer_does_not_read_are_named_once(caplog):
    assert ignored_keys(OptimConfig()) == [] and ignored_keys(OptimConfig(name="adamw")) == []
    assert ignored_keys(OptimConfig(betas=(0.9, 0.95), eps=1e-6)) == ["optim.betas", "optim.eps"]
    assert ignored_keys(OptimConfig(name="lamb", momentum=0.5, trust_coeff=0.01)) == \
        ["optim.momentum", "optim.trust_coeff"]
    with caplog.at_level(logging.INFO, logger="resnest_train"):
        build_optimizer(tiny_model(), OptimConfig(name="adamw", nesterov=False), 0.1)
    assert [r.getMessage() for r in caplog.records] == ["optim.nesterov not read by optim.name=adamw: ignored"]


@pytest.mark.parametrize("weight_decay", [1e-2, 0.0])
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_adapts_the_weights_and_never_the_bn_and_bias_groups(weight_decay, foreach):
    """MLPerf's skip list: BN parameters and biases take plain momentum-SGD steps; conv and linear weights
    take lr x trust ratio, eta |w| / (|g| + wd |w| + eps) (arXiv 1708.03888), at weight_decay 0 too. Both of
    timm's paths: per tensor (its CPU default) and multi-tensor (its CUDA default)."""
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = OptimConfig(name="lars", nesterov=False, weight_decay=weight_decay, trust_coeff=0.01)
    optimizer = build_optimizer(model, cfg, 0.5)
    for group in optimizer.param_groups:
        group["foreach"] = foreach
    backward(model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()  # the first step: the momentum buffer is the (adapted) gradient itself
    for name, param in model.named_parameters():
        w, g = before[name], grads[name]
        if param.ndim > 1:
            ratio = 0.01 * w.norm() / (g.norm() + weight_decay * w.norm() + 1e-8)
            expected = w - 0.5 * ratio * (g + weight_decay * w)
        else:
            expected = w - 0.5 * g
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


def stepped(clip_grad: float | None, *, reference: bool = False, scaler=None) -> list:
    """The parameters after one SGD step from the same gradients: through optimizer_step, or (reference)
    torch.nn.utils.clip_grad_norm_ followed by the step."""
    model = tiny_model()
    optimizer = torch.optim.SGD(param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    backward(model, scaler)
    if reference:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
    else:
        optimizer_step(optimizer, scaler or torch.amp.GradScaler("cpu", enabled=False), clip_grad)
    assert all(p.grad is None for p in model.parameters()) or reference
    return [p.detach().clone() for p in model.parameters()]


def test_clip_grad_equals_clip_grad_norm_then_the_step():
    model = tiny_model()
    backward(model)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm > 0.1  # the clip below is active
    for clip in (0.1, None, 0.0, 100.0):
        for ours, theirs in zip(stepped(clip), stepped(clip, reference=True)):
            assert torch.equal(ours, theirs), clip
    assert not all(torch.equal(a, b) for a, b in zip(stepped(0.1), stepped(None)))


def test_clip_grad_sees_the_unscaled_gradients_with_fp16_scaling():
    """A real GradScaler (enabled on the CPU): the loss is scaled by 2**12, and clipping after unscale_ gives
    the unscaled reference; clipping the scaled gradients would shrink them 4096 times more."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ours = stepped(0.1, scaler=scaler)
    for a, b in zip(ours, stepped(0.1, reference=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0**12  # the growth interval (2000 steps) is far away; nothing overflowed


def test_an_overflowing_fp16_step_is_still_skipped_with_clipping():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    backward(model, scaler, factor=float("inf"))
    optimizer_step(optimizer, scaler, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0**11  # halved, as for any skipped step


class RecordingScaler:
    """The GradScaler calls optimizer_step makes, in order, with the gradient norm each one saw."""

    def __init__(self, optimizer):
        self.calls, self.optimizer = [], optimizer

    def _norm(self):
        return float(torch.nn.utils.get_total_norm([p.grad for g in self.optimizer.param_groups for p in g["params"]]))

    def unscale_(self, optimizer):
        self.calls.append(("unscale_", self._norm()))

    def step(self, optimizer):
        self.calls.append(("step", self._norm()))

    def update(self):
        self.calls.append(("update", None))


def test_clipping_comes_between_unscale_and_step_and_is_absent_when_off():
    for clip, names in ((0.1, ["unscale_", "step", "update"]), (None, ["step", "update"]), (0.0, ["step", "update"])):
        model = tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        backward(model)
        scaler = RecordingScaler(optimizer)
        optimizer_step(optimizer, scaler, clip)
        assert [name for name, _ in scaler.calls] == names
        if clip:
            assert scaler.calls[0][1] > 0.1 and scaler.calls[1][1] == pytest.approx(0.1)


# One epoch of 8 steps (64 synthetic images, batch 8), 2 warmup steps, peak 0.4 x 8 / 256; each new optimizer
# with one of the new schedules, clipping on.
PEAK, MIN_LR = 0.4 * 8 / 256, 1e-4
RUNS = [("lars", "poly", ["schedule.power=2"], "trust_coeff"),
        ("lamb", "step", ["schedule.decay_epochs=0.25", "schedule.decay_rate=0.5"], "max_grad_norm"),
        ("adamw", "linear", [], "amsgrad")]


def expected_lr(schedule: str, step: int) -> float:
    if step < 2:
        return PEAK * step / 2
    progress = (step - 2) / (8 - 1 - 2)
    if schedule == "poly":
        return (PEAK - MIN_LR) * (1 - progress) ** 2 + MIN_LR
    if schedule == "step":  # every 0.25 epoch = 2 steps, counted from the start
        return max(MIN_LR, PEAK * 0.5 ** (step // 2))
    return PEAK - (PEAK - MIN_LR) * progress


@pytest.mark.slow
@pytest.mark.parametrize("name,schedule,extra,own_key", RUNS)
def test_one_epoch_with_each_optimizer_follows_its_schedule(name, schedule, extra, own_key, tmp_path):
    run_script(train_args(None, tmp_path, "train.epochs=1", f"optim.name={name}", f"schedule.name={schedule}",
                          "schedule.warmup_epochs=0.25", f"schedule.min_lr={MIN_LR}", "optim.clip_grad=5", *extra))
    expected = [expected_lr(schedule, step) for step in range(8)]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(expected, rel=1e-6)  # float32 events
    row = metrics(tmp_path)[0]
    assert row["lr"] == pytest.approx(expected[-1], rel=1e-12) and math.isfinite(row["train_loss"])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert state["step"] == 8 and all(own_key in group for group in groups)  # the chosen optimizer's state
    if name == "lars":
        assert [group["always_adapt"] for group in groups] == [True, False]
