"""The model as the trainer and evaluator run it: built from `model.*`, pretrained weights, SyncBN,
device and memory format, then DDP and torch.compile; `unwrap` gives back the plain module whose state
dict has no wrapper prefixes."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnest_train.checkpoint.format import weights_of
from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import ModelConfig
from resnest_train.errors import UserError
from resnest_train.models import create_model
from resnest_train.models.pretrained import WeightsFileError, WeightsMismatchError, load_state, read_weights

log = logging.getLogger("resnest_train")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def load_weights(model: nn.Module, path: str, what: str, name: str, *, new_head: bool = False,
                 weights: str = "model") -> list[str]:
    """`load_pretrained` with its errors as one-line user errors; returns the keys left as the model had them
    (`new_head`: a classifier of another shape stays fresh, fine-tuning's case)."""
    try:
        obj = weights_of(read_weights(path), weights)
        if obj is None:
            raise WeightsFileError(f"{path} holds no EMA weights (a checkpoint of a run with train.ema > 0 does)")
        return load_state(model, obj, new_head=new_head)
    except FileNotFoundError:
        raise UserError(f"{what}: file not found: {path}") from None
    except WeightsFileError as exc:
        raise UserError(f"{what}: {exc}") from None
    except WeightsMismatchError as exc:
        raise UserError(f"{what}: {path} does not fit model {name}: {exc}") from None


def load_starting_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """`model.pretrained` into a fresh run: the trunk must fit; a classifier for another number of classes
    starts fresh (said in one line)."""
    skipped = load_weights(model, cfg.pretrained, "model.pretrained", cfg.name, new_head=True)
    if skipped:
        log.info("model.pretrained: loaded %s without %s: the classifier for %d classes starts fresh",
                 cfg.pretrained, ", ".join(skipped), cfg.num_classes)


def build_model(cfg: ModelConfig, *, pretrained: bool) -> nn.Module:
    """The plain model on the CPU; `pretrained`: load `model.pretrained` (not when resuming a run)."""
    model = create_model(cfg.name, num_classes=cfg.num_classes, dropout=cfg.dropout,
                         zero_init_last_bn=cfg.zero_init_last_bn, dropblock_prob=cfg.dropblock_prob,
                         drop_path_rate=cfg.drop_path)
    if pretrained and cfg.pretrained:
        load_starting_weights(model, cfg)
    freeze(model, cfg.freeze)
    return model


def _frozen(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """`model.freeze`: parameters under these name prefixes are not trained."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_frozen(name, (prefix,)) for name in names):
            raise UserError(f"model.freeze: no parameters under '{prefix}' (e.g. conv1, bn1, layer1, layer2.0)")
    for name, param in model.named_parameters():
        if _frozen(name, prefixes):
            param.requires_grad_(False)


def train_mode(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """model.train(), with the frozen parts' normalisation layers in eval mode: their running statistics
    stay the pretrained ones, as their weights do."""
    model.train()
    if prefixes:
        for name, module in unwrap(model).named_modules():
            if _frozen(name, prefixes) and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def place(model: nn.Module, dist: DistInfo, *, channels_last: bool) -> nn.Module:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(dist.device, memory_format=memory_format)


def wrap_for_training(model: nn.Module, dist: DistInfo, *, sync_bn: bool, compile_model: bool,
                      accumulation: int = 1) -> nn.Module:
    """SyncBN and DDP (whose construction broadcasts rank 0's parameters and buffers), then compile."""
    if sync_bn and dist.distributed:
        if dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            # torch's SyncBatchNorm runs on GPUs only; a GPU config tried out on CPU still trains.
            log.warning("model.sync_bn=true has no effect on CPU (torch's SyncBatchNorm needs CUDA): "
                        "batch norm statistics stay per process")
    if dist.distributed:
        # Gradients as views into the buckets: no second copy of them (torch DDP docs). No buffer broadcast
        # before every forward: BatchNorm statistics are per process during training, as in the published
        # run, and the ranks' are reduced before evaluation and saving (averaging.distribute_bn). A static
        # graph (every parameter used in every step, one graph) lets DDP fix its buckets after the first
        # step. Not with gradient accumulation: DDP's reducer asserts under `no_sync` with a static graph
        # (torch 2.14, "expect_autograd_hooks_"); not under torch.compile, which splits the graph at bucket
        # boundaries itself.
        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, broadcast_buffers=False,
                                        static_graph=accumulation == 1 and not compile_model)
    if compile_model:
        model = torch.compile(model)
    return model
