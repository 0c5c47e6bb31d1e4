"""NVIDIA DALI pipelines for training and validation, one function each with a CPU/GPU device switch.

Training: file reader sharded by global rank over the dataset index, globally reshuffled every epoch
(`shuffle_after_epoch`, the same reader seed on every rank so shards stay disjoint) -> decode with random
crop (`mixed` = nvJPEG on the GPU, or `cpu`) -> resize -> AutoAugment (ImageNet policy) -> color jitter ->
PCA lighting -> flip + normalize. Augmentation seeds derive from the seed and the *global* rank, so nodes
never repeat each other. `pad_last_batch` with `reader_name` gives every rank the same number of batches
(a per-rank `size` does not: a silent DDP mismatch, then a stall). On the CPU, three steps whose DALI CPU
kernels are several times slower than torch/PIL's run on the host inside the pipeline (`python_function`
over the batch, random factors still drawn by DALI): the crop's resize, saturation and the AutoAugment ops
(`cpu_ops`, `cpu_autoaugment`); the graph is otherwise the same, and `host_ops=False` builds the GPU
graph's ops on the CPU for tests.

Validation: each rank reads its own slice of the val list (`files[rank::world]`), so there is no padding at
all and every image is counted exactly once; resize the shorter side (on the host on CPU, as torchvision
sizes it), center crop, normalize.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math
from nvidia.dali.auto_aug import auto_augment
from nvidia.dali.pipeline import do_not_convert
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIClassificationIterator

from resnest_train.data.cpu_autoaugment import MAX_TRANSLATE_REL, HostAutoAugment
from resnest_train.data.cpu_ops import batch_resizer, batch_saturator, batch_shorter_resizer
from resnest_train.data.index import DatasetError, find_undecodable
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PCA_EIGVAL, PCA_EIGVEC

_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _center(images, crop: int):
    """Relative crop anchors that put the crop where torchvision's center crop does: at round(margin / 2)
    with Python's round-half-to-even, i.e. margin // 2, plus one when the margin is 3 mod 4. DALI's own 0.5
    places odd margins differently (a one-pixel shift that changes a textured image noticeably)."""
    shape = images.shape(dtype=types.INT32)  # (H, W, C)

    def anchor(margin):
        half_up = fn.cast(margin % 4 == 3, dtype=types.INT32)
        return fn.cast(margin // 2 + half_up, dtype=types.FLOAT) / fn.cast(dali_math.max(margin, 1),
                                                                            dtype=types.FLOAT)
    return anchor(shape[1] - crop), anchor(shape[0] - crop)


def _normalize(images, *, device_layout: str, mirror=None, crop=None, mean=None):
    kwargs = dict(dtype=types.FLOAT, output_layout=device_layout,
                  mean=[m * 255 for m in IMAGENET_MEAN] if mean is None else mean,
                  std=[s * 255 for s in IMAGENET_STD])
    if crop is not None:
        pos_x, pos_y = _center(images, crop[0])
        kwargs.update(crop=crop, crop_pos_x=pos_x, crop_pos_y=pos_y)
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(images, **kwargs)


def _lighting_mean(std: float):
    """AlexNet PCA lighting folded into the normalisation: adding eigvec @ (alpha * eigval) to every pixel
    (0-255 scale, alpha ~ N(0, std) per image) equals subtracting it from the mean, so it costs no pass
    over the image (a separate per-pixel op cost a third of the CPU pipeline's throughput, BENCHMARKS.md)."""
    alpha = fn.random.normal(shape=[1, 3], stddev=std)
    # (1, 3) point through M = 255 * eigvec * eigval -> the (1, 3) RGB shift
    shift = fn.coord_transform(alpha, M=(255.0 * np.array(PCA_EIGVEC) * np.array(PCA_EIGVAL)).ravel().tolist())
    return [m * 255 for m in IMAGENET_MEAN] - fn.reshape(shift, shape=[3])


def _autoaugment(images, crop_size: int, host_autoaugment):
    if host_autoaugment is None:
        # Nearest-neighbour warps, as torchvision and the original AutoAugment (PIL) use: the linear
        # default makes rotate/shear the most expensive CPU ops of the pipeline (BENCHMARKS.md).
        return auto_augment.auto_augment_image_net(images, shape=[crop_size, crop_size], interp_type=types.INTERP_NN,
                                                   max_translate_rel=MAX_TRANSLATE_REL)
    # The draws of DALI's apply_auto_augment: a sub-policy, a uniform per stage, a sign per stage.
    sub_policy = fn.random.uniform(values=list(range(len(host_autoaugment.sub_policies))), dtype=types.INT32)
    run = fn.random.uniform(range=[0, 1], shape=(host_autoaugment.stages,))
    negate = fn.random.coin_flip(shape=(host_autoaugment.stages,))
    return fn.python_function(images, sub_policy, run, negate, function=host_autoaugment, batch_processing=True,
                              output_layouts="HWC")


def _color_jitter(images, strength: float, host_saturation):
    low, high = 1 - strength, 1 + strength
    brightness, contrast, saturation = (fn.random.uniform(range=[low, high]) for _ in range(3))
    if host_saturation is None:
        return fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation)
    images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast)
    return fn.python_function(images, saturation, function=host_saturation, batch_processing=True,
                              output_layouts="HWC")


@pipeline_def(enable_conditionals=True)
def _train_pipeline(*, root, files, labels, shard_id, num_shards, reader_seed, device, crop_size, rrc_scale,
                    interpolation, hflip, autoaugment, color_jitter, lighting, layout, host_resize, host_saturation,
                    host_autoaugment):
    jpegs, targets = fn.readers.file(
        file_root=root, files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
        shuffle_after_epoch=True, seed=reader_seed, pad_last_batch=True, name="reader")
    images = fn.decoders.image_random_crop(
        jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
        random_area=list(rrc_scale), random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
    if host_resize is None:
        images = fn.resize(images, resize_x=crop_size, resize_y=crop_size, interp_type=_INTERP[interpolation],
                           antialias=True)
    else:
        images = fn.python_function(images, function=host_resize, batch_processing=True, output_layouts="HWC")
    if autoaugment == "imagenet":
        images = _autoaugment(images, crop_size, host_autoaugment)
    if color_jitter > 0:
        images = _color_jitter(images, color_jitter, host_saturation)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else None
    mean = _lighting_mean(lighting) if lighting > 0 else None
    images = _normalize(images, device_layout=layout, mirror=mirror, mean=mean)
    return images, targets.gpu() if device == "gpu" else targets


def _shorter_side_size(images, size: int):
    """The output size torchvision's Resize(size) picks: shorter side `size`, the longer one truncated
    (`resize_shorter` rounds it, a one-pixel difference that rescales the whole image)."""
    shape = images.shape(dtype=types.INT32)  # (H, W, C)
    height, width = shape[0], shape[1]
    portrait = fn.cast(height > width, dtype=types.INT32)
    out_h = portrait * ((size * height) // width) + (1 - portrait) * size
    out_w = portrait * size + (1 - portrait) * ((size * width) // height)
    return fn.cast(out_h, dtype=types.FLOAT), fn.cast(out_w, dtype=types.FLOAT)


@pipeline_def
def _val_pipeline(*, root, files, labels, device, crop_size, resize_size, interpolation, layout, host_resize):
    jpegs, targets = fn.readers.file(file_root=root, files=files, labels=labels, random_shuffle=False,
                                     pad_last_batch=True, name="reader")
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    if host_resize is None:
        height, width = _shorter_side_size(images, resize_size)
        images = fn.resize(images, resize_x=width, resize_y=height, interp_type=_INTERP[interpolation],
                           antialias=True)
    else:
        images = fn.python_function(images, function=host_resize, batch_processing=True, output_layouts="HWC")
    images = _normalize(images, device_layout=layout, crop=(crop_size, crop_size))
    return images, targets.gpu() if device == "gpu" else targets


@contextlib.contextmanager
def _without_equalize_deprecation():
    """DALI's own AutoAugment policy calls its deprecated `fn.experimental.equalize` and forces the warning
    on (a `simplefilter("default")` inside DALI overrides ours), so drop just that message while building."""
    show = warnings.showwarning

    def filtered(message, *args, **kwargs):
        if "experimental.equalize" not in str(message):
            show(message, *args, **kwargs)
    warnings.showwarning = filtered
    try:
        yield
    finally:
        warnings.showwarning = show


class DaliLoader:
    """Iterates (images, targets) torch tensors; `len()` is the batches per epoch, equal on every rank."""

    def __init__(self, pipeline, drop_last: bool, root: str, samples: list[tuple[str, int]]):
        self.pipeline = pipeline
        self.root, self.samples = root, samples  # to name an image the decoder fails on
        with _without_equalize_deprecation():
            self.pipeline.build()
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
        try:  # the iterator runs the first batch already
            self.iterator = DALIClassificationIterator(
                pipeline, reader_name="reader", last_batch_policy=policy, auto_reset=True)
        except RuntimeError as exc:
            self._raise_decode_failure(exc)
        self._len = len(self.iterator)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        batches = iter(self.iterator)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                self._raise_decode_failure(exc)
            images = batch[0]["data"]
            if images.shape[-1] == 3:
                # HWC output (train.channels_last): (B, H, W, 3) -> (B, 3, H, W) with channels_last strides,
                # a view, which is exactly the layout the model was converted to.
                images = images.permute(0, 3, 1, 2)
            yield images, batch[0]["label"].reshape(-1).long()

    def _raise_decode_failure(self, exc: RuntimeError):
        """DALI's decoder error does not name the file: find it by decoding every image of the list."""
        if "decoders" not in str(exc):
            raise exc
        bad = find_undecodable(self.root, self.samples)
        named = ", ".join(bad) if bad else f"an image under {self.root} (none failed a full PIL decode)"
        raise DatasetError(f"cannot decode {named}; remove it and rerun the same command: training resumes "
                           "from the last checkpoint") from None

    def state(self) -> str:
        """The reader and augmentation RNG position after the batches consumed so far (DALI checkpoint)."""
        return self.iterator.checkpoints()[0]


def _device_id(device: str) -> int | None:
    return torch.cuda.current_device() if device == "gpu" else None


def build_dali_train(index, data_cfg, *, batch_size: int, rank: int, world_size: int, seed: int,
                     device: str, channels_last: bool, state: str | None = None) -> DaliLoader:
    files, labels = zip(*index.train)
    with _without_equalize_deprecation():
        pipe = _make_train_pipeline(index, data_cfg, files, labels, batch_size=batch_size, rank=rank,
                                    world_size=world_size, seed=seed, device=device,
                                    channels_last=channels_last, state=state)
    return DaliLoader(pipe, drop_last=True, root=index.root, samples=index.train)


def _make_train_pipeline(index, data_cfg, files, labels, *, batch_size, rank, world_size, seed, device,
                         channels_last, state, host_ops=True):
    return _train_pipeline(
        batch_size=batch_size, num_threads=max(1, data_cfg.workers), device_id=_device_id(device),
        seed=seed * 1000 + rank + 1, prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=state,
        # The dynamic executor hands batches to torch through DLPack without a copy (the iterator copies
        # otherwise: ~15% of the CPU pipeline's throughput, BENCHMARKS.md).
        exec_dynamic=True,
        root=index.root, files=list(files), labels=list(labels), shard_id=rank, num_shards=world_size,
        reader_seed=seed + 17, device=device, crop_size=data_cfg.crop_size, rrc_scale=data_cfg.rrc_scale,
        interpolation=data_cfg.interpolation, hflip=data_cfg.hflip, autoaugment=data_cfg.autoaugment,
        color_jitter=data_cfg.color_jitter, lighting=data_cfg.lighting,
        layout="HWC" if channels_last else "CHW",
        **_host_ops(data_cfg, enabled=device == "cpu" and host_ops))


def _host_ops(data_cfg, enabled: bool) -> dict:
    """Host ops for CPU pipelines where DALI's CPU kernels are several times slower: torch's resize, numpy's
    saturation (`cpu_ops`) and PIL's AutoAugment ops (`cpu_autoaugment`)."""
    if not enabled:
        return dict(host_resize=None, host_saturation=None, host_autoaugment=None)
    threads = max(1, data_cfg.workers)
    return dict(host_resize=do_not_convert(batch_resizer(data_cfg.crop_size, data_cfg.interpolation, threads)),
                host_saturation=do_not_convert(batch_saturator(threads)),
                host_autoaugment=HostAutoAugment(threads))


def build_dali_val(index, data_cfg, *, batch_size: int, rank: int, world_size: int, device: str,
                   crop_size: int, resize_size: int, channels_last: bool, host_ops: bool = True) -> DaliLoader | list:
    shard = index.val[rank::world_size]
    if not shard:
        return []
    files, labels = zip(*shard)
    threads = max(1, data_cfg.workers)
    pipe = _val_pipeline(
        batch_size=batch_size, num_threads=threads, device_id=_device_id(device), seed=0,
        exec_dynamic=True, root=index.root, files=list(files), labels=list(labels), device=device, crop_size=crop_size,
        resize_size=resize_size, interpolation=data_cfg.interpolation,
        layout="HWC" if channels_last else "CHW",
        host_resize=do_not_convert(batch_shorter_resizer(resize_size, data_cfg.interpolation, threads))
        if device == "cpu" and host_ops else None)
    return DaliLoader(pipe, drop_last=False, root=index.root, samples=shard)
