"""The experiment config: frozen dataclasses, one per YAML section, with their choices and ranges.

Flow (STYLE.md): YAML -> base files merged (later wins) -> `KEY=VALUE` overrides, each VALUE parsed as
YAML -> strict `from_dict` into these dataclasses (config_yaml.py) -> `__post_init__` choice and range
checks. Every user error is a `ConfigError`, which the CLIs print as one `error: ...` line with exit
code 2. The defaults are the ResNeSt-50 recipe (docs/RECIPE.md) and equal `configs/base.yaml`, key for key
(tests/test_config.py checks it); derived values (scaled lr, resize sizes) are computed by their users.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from resnest_train.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config file, an override or a path the config names."""


MAX_CLASSES = 1_000_000
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        low_s = "-inf" if low is None else str(low)
        high_s = "inf" if high is None else str(high)
        bracket = "(" if low_open else "["
        raise ConfigError(f"'{key}' must be in {bracket}{low_s}, {high_s}], got {value!r}")


def _check_autoaugment(value: str) -> None:
    """An AutoAugment table, none, or timm's RandAugment string (`rand-m9-n2-mstd0.5`: data/randaugment.py)."""
    if not (value == "rand" or value.startswith("rand-")):
        _check_choice("data.autoaugment", value, ("imagenet", "gluon", "none", "rand-m<int>-n<int>-..."))
        return
    # Imported here: the data package pulls in PIL and numpy, which the config itself does not need.
    from resnest_train.data.randaugment import parse_rand_augment
    try:
        parse_rand_augment(value)
    except ValueError as exc:
        raise ConfigError(f"'data.autoaugment': {exc}") from None


def _check_progressive_resize(value: tuple[int, int, int, int]) -> None:
    """Sizes multiples of 32, as every size of the ramp then is (FFCV's rounding); epochs counted from 1."""
    start_size, end_size, start_epoch, end_epoch = value
    if any(size % 32 or not 32 <= size <= MAX_IMAGE_SIZE for size in (start_size, end_size)):
        raise ConfigError(f"'data.progressive_resize' sizes must be multiples of 32 from 32 to {MAX_IMAGE_SIZE}, "
                          f"got {list(value)}")
    if not 0 <= start_epoch < end_epoch:
        raise ConfigError(f"'data.progressive_resize' epochs must satisfy 0 <= start_epoch < end_epoch, "
                          f"got {list(value)}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnest50"
    num_classes: int = 1000
    dropout: float = 0.0
    zero_init_last_bn: bool = True
    dropblock_prob: float = 0.1
    drop_path: float = 0.0  # stochastic depth: the last block's rate, ramped linearly over the blocks from 0
    pretrained: str | None = None
    freeze: tuple[str, ...] = ()  # parameter-name prefixes not trained (e.g. [conv1, bn1, layer1]); BN stats kept
    sync_bn: bool = False

    def __post_init__(self):
        _check_range("model.num_classes", self.num_classes, 1, MAX_CLASSES)
        _check_range("model.dropout", self.dropout, 0.0, 1.0)
        if not 0.0 <= self.dropblock_prob < 1.0:  # 1 would drop every block (create_model refuses it too)
            raise ConfigError(f"'model.dropblock_prob' must be in [0.0, 1.0), got {self.dropblock_prob!r}")
        if not 0.0 <= self.drop_path < 1.0:  # 1 would drop the last block's branch for every sample
            raise ConfigError(f"'model.drop_path' must be in [0.0, 1.0), got {self.drop_path!r}")
        # Imported here: the model registry pulls in torch, which the config itself does not need.
        from resnest_train.models import list_models
        if self.name not in list_models():
            close = difflib.get_close_matches(self.name, list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'model.name': unknown model '{self.name}'{hint}")


@dataclass(frozen=True)
class DataConfig:
    backend: str = "dali"
    root: str = "data/imagenet"
    synthetic_size: int = 1024
    dali_device: str = "auto"
    workers: int = 4
    crop_size: int = 224
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    crop: str = "random_resized"  # random_resized | inception | efficientnet (data/crops.py)
    crop_min_area: float = 0.1  # efficientnet: the smallest area fraction (ResNeSt's ERandomCrop: 0.1)
    hflip: bool = True
    autoaugment: str = "imagenet"
    autoaugment_on: str = "image"
    color_jitter: float = 0.4
    lighting: float = 0.1
    val_crop_size: int = 224
    val_resize_ratio: float = 0.875
    val_resize_size: int | None = None
    interpolation: str = "bilinear"
    # [start_size, end_size, start_epoch, end_epoch]: the training crop ramps between them (data/plan.py)
    progressive_resize: tuple[int, int, int, int] | None = None
    # data.root as s3://, gs:// or http(s):// (data/store.py): shards through a node-local cache
    cache_dir: str | None = None  # None: ~/.cache/resnest_train/shards
    cache_limit: int | None = None  # bytes; None: no limit (data/shard_cache.py)
    prefetch_shards: int = 4  # shard downloads in flight ahead of the reader, per process
    train_shards: str | None = None  # a brace pattern of train/'s shards where a store cannot list them
    val_shards: str | None = None
    shuffle: str = "global"  # global | shards (data/order.py)
    shuffle_window: int = 8  # shards: samples are shuffled within windows of this many shards

    def __post_init__(self):
        _check_choice("data.backend", self.backend, ("dali", "torchvision", "synthetic"))
        _check_choice("data.shuffle", self.shuffle, ("global", "shards"))
        _check_range("data.shuffle_window", self.shuffle_window, 1)
        _check_range("data.prefetch_shards", self.prefetch_shards, 0, 64)
        if self.cache_limit is not None:
            _check_range("data.cache_limit", self.cache_limit, 1)
        if self.shuffle == "shards" and self.backend == "synthetic":
            raise ConfigError("'data.shuffle' is shards but data.backend=synthetic has no shards: use global")
        _check_choice("data.dali_device", self.dali_device, ("auto", "cpu", "gpu"))
        _check_autoaugment(self.autoaugment)
        _check_choice("data.autoaugment_on", self.autoaugment_on, ("image", "crop"))
        _check_choice("data.interpolation", self.interpolation, ("bilinear", "bicubic"))
        _check_choice("data.crop", self.crop, ("random_resized", "inception", "efficientnet"))
        _check_range("data.crop_min_area", self.crop_min_area, 0.0, 1.0, low_open=True)
        _check_range("data.synthetic_size", self.synthetic_size, 1)
        _check_range("data.workers", self.workers, 0, 256)
        _check_range("data.crop_size", self.crop_size, 8, MAX_IMAGE_SIZE)
        _check_range("data.val_crop_size", self.val_crop_size, 8, MAX_IMAGE_SIZE)
        _check_range("data.val_resize_ratio", self.val_resize_ratio, 0.1, 1.0)
        if self.val_resize_size is not None:
            _check_range("data.val_resize_size", self.val_resize_size, self.val_crop_size, MAX_IMAGE_SIZE)
        _check_range("data.color_jitter", self.color_jitter, 0.0, 1.0)
        _check_range("data.lighting", self.lighting, 0.0)
        low, high = self.rrc_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"'data.rrc_scale' must satisfy 0 < min <= max <= 1, got {list(self.rrc_scale)}")
        if self.progressive_resize is not None:
            _check_progressive_resize(self.progressive_resize)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | lars | lamb | adamw (recipe/optim.py: which keys each one reads)
    lr: float = 0.1
    momentum: float = 0.9  # sgd, lars
    nesterov: bool = True  # sgd, lars
    weight_decay: float = 1.0e-4
    no_bn_bias_decay: bool = True
    head_lr_scale: float = 1.0  # the classifier's lr = this x the schedule's lr (fine-tuning: a fresh head)
    betas: tuple[float, float] = (0.9, 0.999)  # lamb, adamw
    eps: float | None = None  # lars, lamb, adamw; None: the optimizer's own (1e-8, 1e-6, 1e-8)
    trust_coeff: float = 0.001  # lars: the trust ratio's coefficient (eta of arXiv 1708.03888)
    clip_grad: float | None = None  # the global L2 norm of the gradients is clipped to it; None or 0: off

    def __post_init__(self):
        # Imported here: the optimizer table pulls in torch, which the config itself does not need.
        from resnest_train.recipe.optim import OPTIMIZERS
        _check_choice("optim.name", self.name, tuple(OPTIMIZERS))
        _check_range("optim.lr", self.lr, 0.0, low_open=True)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)
        _check_range("optim.head_lr_scale", self.head_lr_scale, 0.0, 1000.0)
        if not all(0.0 <= beta < 1.0 for beta in self.betas):  # 1 would never forget the first gradient
            raise ConfigError(f"'optim.betas' must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps is not None:
            _check_range("optim.eps", self.eps, 0.0, 1.0, low_open=True)
        _check_range("optim.trust_coeff", self.trust_coeff, 0.0, low_open=True)
        if self.clip_grad is not None:
            _check_range("optim.clip_grad", self.clip_grad, 0.0)
        if self.nesterov and self.momentum == 0 and "nesterov" in OPTIMIZERS[self.name].keys:
            # torch's SGD and timm's Lars refuse it with a traceback; said here with the keys to change
            raise ConfigError(f"'optim.nesterov' needs optim.momentum > 0 with optim.name={self.name}: set "
                              "optim.nesterov=false or a momentum")


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_epochs: float = 5
    name: str = "cosine"  # cosine | step | poly | linear after the warmup (recipe/schedule.py)
    min_lr: float = 0.0
    decay_epochs: float = 30  # step: epochs between two decays, counted from the start (timm's StepLRScheduler)
    decay_rate: float = 0.1  # step: the lr's factor at each decay
    power: float = 2.0  # poly: (1 - progress) ** power (MLPerf's ResNet-50 LARS reference uses 2)

    def __post_init__(self):
        # Imported here, as the optimizer table: recipe/schedule.py imports this module.
        from resnest_train.recipe.schedule import SCHEDULES
        _check_choice("schedule.name", self.name, tuple(SCHEDULES))
        _check_range("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        _check_range("schedule.min_lr", self.min_lr, 0.0)
        _check_range("schedule.decay_epochs", self.decay_epochs, 0.0, low_open=True)
        _check_range("schedule.decay_rate", self.decay_rate, 0.0, 1.0, low_open=True)
        _check_range("schedule.power", self.power, 0.0, 100.0, low_open=True)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 270
    global_batch: int | None = 8192  # the recipe's batch; None: batch_size x processes
    batch_size: int = 128  # per process: the micro-batch
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2
    # CutMix (arXiv 1905.04899) and how often a micro-batch is mixed: timm's Mixup `cutmix_alpha`, `prob`,
    # `switch_prob` (CutMix instead of mixup when both alphas are > 0), drawn per micro-batch (mixing.py).
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    loss: str = "ce"  # ce | bce (timm's BinaryCrossEntropy: one sigmoid per class)
    bce_target_threshold: float | None = None  # bce: targets above it become 1, the others 0 (null: kept)
    device: str = "auto"
    amp: str = "bf16"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50
    eval_interval: int = 1
    # Weight EMA (averaging.py): decay per optimizer step of the global batch; 0 disables it.
    ema: float = 0.0
    ema_warmup: bool = False  # the decay ramps up over the first steps (timm's ModelEmaV3 warm-up)
    ema_device: str = "auto"  # auto: the training device; cpu: host memory (slower, frees GPU memory)
    dist_bn: str = "reduce"  # BN running statistics before evaluation and saving: mean over ranks, or rank 0's
    repeated_augment: int = 1  # each image k times per epoch, epoch length kept (data/order.py); 1: off

    def __post_init__(self):
        _check_range("train.epochs", self.epochs, 1, 100_000)
        _check_range("train.batch_size", self.batch_size, 1, 65_536)
        if self.global_batch is not None:
            _check_range("train.global_batch", self.global_batch, 1, 16_777_216)
        _check_range("train.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _check_range("train.mixup_alpha", self.mixup_alpha, 0.0)
        _check_choice("train.device", self.device, ("auto", "cuda", "cpu"))
        _check_choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        # Every draw's seed derives from it through numpy's SeedSequence (recipe/randomness.py): 32 bits in.
        _check_range("train.seed", self.seed, 0, MAX_SEED)
        _check_range("train.log_interval", self.log_interval, 1)
        _check_range("train.eval_interval", self.eval_interval, 1)
        _check_range("train.ema", self.ema, 0.0, 1.0)
        if self.ema == 1.0:
            raise ConfigError("'train.ema' must be below 1 (1 would keep the initial weights forever), got 1.0")
        _check_choice("train.ema_device", self.ema_device, ("auto", "cpu"))
        _check_choice("train.dist_bn", self.dist_bn, ("reduce", "broadcast"))
        _check_range("train.repeated_augment", self.repeated_augment, 1, 64)
        self._check_mixing_and_loss()

    @property
    def mixing(self) -> bool:
        """Whether micro-batches are mixed (mixup, CutMix or both): soft targets, even micro-batches."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def _check_mixing_and_loss(self) -> None:
        _check_range("train.cutmix_alpha", self.cutmix_alpha, 0.0)
        _check_range("train.mix_prob", self.mix_prob, 0.0, 1.0)
        _check_range("train.mix_switch_prob", self.mix_switch_prob, 0.0, 1.0)
        _check_choice("train.loss", self.loss, ("ce", "bce"))
        if self.bce_target_threshold is not None:
            _check_range("train.bce_target_threshold", self.bce_target_threshold, 0.0, 1.0)
        if self.loss == "bce" and self.label_smoothing >= 1.0:  # timm's BinaryCrossEntropy asserts < 1
            raise ConfigError(f"'train.label_smoothing' must be below 1 with train.loss=bce, "
                              f"got {self.label_smoothing!r}")
        if self.mixing and self.batch_size % 2:
            # Batch mixup and CutMix pair each image with its mirror in the batch (timm's Mixup).
            raise ConfigError(f"'train.batch_size' must be even with mixup or CutMix (train.mixup_alpha or "
                              f"train.cutmix_alpha > 0), got {self.batch_size}")


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str | None = "auto"
    keep_last: int = 3
    interval_steps: int = 0
    overwrite: bool = False  # true: a fresh run (resume=null) may replace the checkpoints in output_dir
    allow_changes: bool = False  # true: resume although the model, classes, training or validation data changed

    def __post_init__(self):
        _check_range("checkpoint.keep_last", self.keep_last, 0)
        _check_range("checkpoint.interval_steps", self.interval_steps, 0)


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/resnest50"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        ramp = self.data.progressive_resize
        if ramp is not None and ramp[3] > self.train.epochs:
            raise ConfigError(f"'data.progressive_resize' end_epoch {ramp[3]} is past train.epochs={self.train.epochs}")


__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
           "CheckpointConfig"]
