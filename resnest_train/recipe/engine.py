"""One training micro-step and optimizer step, one validation pass: explicit objects in, numbers out.

One code path for every precision (STYLE.md): autocast is enabled for bf16/fp16 where the device supports
it, and the GradScaler is a no-op unless fp16. Losses stay on the device; the caller fetches them in one
batch at log time, so there is no host sync per step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnest_train.cluster.distributed import DistInfo, all_reduce_sum

log = logging.getLogger("resnest_train")

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    enabled: bool
    dtype: torch.dtype
    device_type: str

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """bf16 everywhere torch autocasts it (CUDA with bf16 support, CPU); fp16 on CUDA only."""
    if amp == "none":
        return Precision(False, torch.float32, device.type)
    supported = (device.type == "cuda" and (amp == "fp16" or torch.cuda.is_bf16_supported())) or (
        device.type == "cpu" and amp == "bf16")
    if not supported:
        log.info("train.amp=%s is not supported on %s: training in fp32", amp, device.type)
        return Precision(False, torch.float32, device.type)
    return Precision(True, _AMP_DTYPES[amp], device.type)


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of a (possibly compiled) model, if any."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DistributedDataParallel) else None


def forward_backward(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, criterion: nn.Module,
                     scaler: torch.amp.GradScaler, precision: Precision, loss_scale: float = 1.0,
                     sync: bool = True) -> torch.Tensor:
    """One micro-batch: forward and backward, its gradients added to `.grad`; returns the detached loss
    (still on the device). `loss_scale` = 1 / accumulation steps, so the summed gradients are the mean over
    the global batch (DDP averages over processes). `sync`: DDP all-reduces in this backward; the earlier
    micro-batches of a step run under `no_sync` (forward included, as DDP requires)."""
    ddp = _ddp(model)
    with contextlib.nullcontext() if sync or ddp is None else ddp.no_sync():
        with precision.autocast():
            loss = criterion(model(images), targets)
        scaler.scale(loss if loss_scale == 1.0 else loss * loss_scale).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float | None = None) -> None:
    """One update from the accumulated gradients: one GradScaler step per optimizer step. `clip_grad`
    (optim.clip_grad; None or 0: off) clips the global L2 norm of every parameter the optimizer updates.
    Under DDP the last micro-step's backward has all-reduced the gradients by now, so that norm is the
    global batch's, the same on every rank."""
    if clip_grad:
        # Unscaled first (fp16): the norm of the true gradients, not of the scaled ones (PyTorch's AMP
        # examples, "gradient clipping"); scaler.step then does not unscale them twice and still skips a step
        # whose gradients overflowed (their norm is inf or nan, and clipping leaves them so).
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Validation:
    top1: float
    top5: float
    num_images: int
    predictions: list  # (top-5 classes, top-5 probabilities) per image of this rank, when asked for


def _scores(model: nn.Module, images: torch.Tensor, precision: Precision, flip: bool) -> torch.Tensor:
    """The logits (float32); with `flip`, the probabilities: the mean of the softmaxes of the image and its
    horizontal mirror. Averaging probabilities is how an ensemble of two views is usually combined; FFCV's
    ImageNet example (`lr_tta`) sums the two logits instead, which can rank classes differently when the
    views disagree."""
    with precision.autocast():
        logits = model(images).float()
        if not flip:
            return logits
        mirrored = model(images.flip(3)).float()  # (B, C, H, W): W reversed
    return (logits.softmax(dim=1) + mirrored.softmax(dim=1)) / 2


@torch.no_grad()
def validate(model: nn.Module, loader, dist: DistInfo, precision: Precision, *,
             predictions: bool = False, flip: bool = False) -> Validation:
    """Top-1 / top-5 in percent from counts summed across ranks; every image counted once (with `flip`, once
    with its mirror: test-time flip, `_scores`)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=dist.device)  # correct@1, correct@5, images
    images_seen = 0  # on the host: the batch sizes are known without a device sync
    rows = []
    for images, targets in loader:
        scores = _scores(model, images, precision, flip)
        top5 = scores.topk(min(5, scores.shape[1]), dim=1)
        hits = top5.indices == targets[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        images_seen += targets.numel()
        if predictions:
            probs = (scores if flip else scores.softmax(dim=1)).gather(1, top5.indices)
            rows.extend(zip(top5.indices.tolist(), probs.tolist()))
    counts[2] = images_seen
    all_reduce_sum(counts, dist)
    correct1, correct5, total = counts.tolist()
    total = int(total)
    return Validation(100.0 * correct1 / max(total, 1), 100.0 * correct5 / max(total, 1), total, rows)
