"""NVIDIA DALI pipelines for training and validation: one graph each, its image ops chosen once.

Training (`dali_train.py`): one pipeline per run fed by the framework (`reader.py`) with the encoded images
of this process's micro-batches and their augmentation draws -> decode (`mixed` = nvJPEG on the GPU, or
`cpu`) of the drawn window -> resize -> AutoAugment (or RandAugment) -> color jitter -> PCA lighting -> flip +
normalize; with `data.autoaugment_on: image` the whole decoded image is augmented before the crop, as the
released recipe did. This module holds what both graphs share.

The image ops are `DaliOps` (DALI's own: the GPU graph) or `dali_cpu.HostOps` (the CPU path's host ops),
picked once by `graph_ops`; the graph itself has no device branches. A CPU pipeline feeding a GPU trainer
is built with the GPU's `device_id` and ends with `.gpu()` (NVIDIA's ImageNet reference trainer does so).

Validation: the framework feeds each rank its own shard of the val list (`DataPlan.shard`; files or
shard members), so there is no padding at all and every image is counted exactly once; resize the shorter
side as torchvision sizes it, center crop where torchvision's CenterCrop puts it, normalize. EXIF
orientation is ignored on both backends, as the reference evaluation (PIL/torchvision) ignores it (README,
"Data").
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from resnest_train.data.autograph_files import delete_autograph_files_after_loading
from resnest_train.data.crops import INTERPOLATIONS
from resnest_train.data.dali_autoaugment import dali_auto_augment
from resnest_train.data.dali_cpu import HostOps
from resnest_train.data.dali_randaugment import dali_rand_augment
from resnest_train.data.plan import DataPlan
from resnest_train.data.randaugment import is_rand_augment, parse_rand_augment
from resnest_train.data.sample_read import SHARDS, SampleReadError, read_sample
from resnest_train.data.samples import SampleList
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PCA_EIGVAL, PCA_EIGVEC
from resnest_train.data.undecodable import undecodable_error

delete_autograph_files_after_loading()  # the conditional graph's generated sources stay out of the temp folder

_DALI_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


class DaliOps:
    """DALI's own image ops (what GPU pipelines run; CPU pipelines can run them too, for comparison)."""

    def __init__(self, *, interpolation: str, autoaugment: str = "imagenet"):
        self.interp = _DALI_INTERP[interpolation]
        self.policy = autoaugment
        self.rand_augment = parse_rand_augment(autoaugment) if is_rand_augment(autoaugment) else None

    def resize(self, images, size, interp=None):
        """To size x size. `size`: an int, or a per-sample input (the epoch's crop under progressive resizing:
        DALI's resize takes its arguments as per-sample inputs, so one pipeline serves every size); `interp`:
        a per-image index into crops.INTERPOLATIONS (data.crop=inception)."""
        interp_type = self.interp if interp is None else drawn_interp_type(interp)
        return fn.resize(images, resize_x=size, resize_y=size, interp_type=interp_type, antialias=True)

    def resize_shorter(self, images, size: int):
        height, width = _shorter_side_size(images, size)
        return fn.resize(images, resize_x=width, resize_y=height, interp_type=self.interp, antialias=True)

    def color_twist(self, images, *, brightness, contrast, saturation):
        return fn.color_twist(images, brightness=brightness, contrast=contrast, saturation=saturation)

    def autoaugment(self, images, *draws):
        """`draws`: the per-sample inputs `draws.augment_inputs` names for the policy."""
        if self.rand_augment is not None:
            return dali_rand_augment(images, *draws, spec=self.rand_augment)
        return dali_auto_augment(images, *draws, policy_name=self.policy)


def graph_ops(plan: DataPlan, ops: str = "auto"):
    """`auto`: host ops where the graph runs on the CPU, DALI's elsewhere; `dali`: DALI's ops everywhere."""
    if ops == "auto" and plan.decoder == "cpu":
        return HostOps(interpolation=plan.interpolation, threads=max(1, plan.workers), autoaugment=plan.autoaugment)
    return DaliOps(interpolation=plan.interpolation, autoaugment=plan.autoaugment)


def drawn_interp_type(interp):
    """Per-image DALIInterpType from the framework's interpolation draw (crops.INTERPOLATIONS indices)."""
    codes = [int(_DALI_INTERP[name]) for name in INTERPOLATIONS]
    return fn.cast(fn.lookup_table(interp, keys=list(range(len(codes))), values=codes, dtype=types.INT32),
                   dtype=types.INTERP_TYPE)


def _shorter_side_size(images, size: int):
    """The output size torchvision's Resize(size) picks: shorter side `size`, the longer one truncated
    (`resize_shorter` rounds it, a one-pixel difference that rescales the whole image)."""
    shape = images.shape(dtype=types.INT32)  # (H, W, C)
    height, width = shape[0], shape[1]
    portrait = fn.cast(height > width, dtype=types.INT32)
    out_h = portrait * ((size * height) // width) + (1 - portrait) * size
    out_w = portrait * size + (1 - portrait) * ((size * width) // height)
    return fn.cast(out_h, dtype=types.FLOAT), fn.cast(out_w, dtype=types.FLOAT)


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


def lighting_mean(alpha):
    """AlexNet PCA lighting folded into the normalisation: adding eigvec @ (alpha * eigval) to every pixel
    (0-255 scale; `alpha`, 3 per image, drawn by the framework: draws.py) equals subtracting it from the
    mean, so it costs no pass over the image (BENCHMARKS.md, "data pipeline")."""
    # (1, 3) point through M = 255 * eigvec * eigval -> the (1, 3) RGB shift
    shift = fn.coord_transform(fn.reshape(alpha, shape=[1, 3]),
                               M=(255.0 * np.array(PCA_EIGVEC) * np.array(PCA_EIGVAL)).ravel().tolist())
    return [m * 255 for m in IMAGENET_MEAN] - fn.reshape(shift, shape=[3])


def _normalize(images, plan: DataPlan, **kwargs):
    kwargs.setdefault("mean", [m * 255 for m in IMAGENET_MEAN])
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if plan.channels_last else "CHW",
                                    std=[s * 255 for s in IMAGENET_STD], **kwargs)


def _decode_common(plan: DataPlan) -> dict:
    # EXIF orientation ignored and the GPU decoder's chroma upsampling set to the CPU one's: both decoders
    # then give torchvision's pixels (DALI's defaults differ from it on both counts).
    return dict(device="mixed" if plan.decoder == "gpu" else "cpu", output_type=types.RGB, adjust_orientation=False,
                jpeg_fancy_upsampling=True)


def _decode(jpegs, plan: DataPlan):
    return fn.decoders.image(jpegs, **_decode_common(plan))


def _to_device(plan: DataPlan, *outputs):
    """CPU graph, GPU trainer: hand the batch over on the GPU (DALI copies it asynchronously)."""
    if plan.device.type == "cuda":
        return tuple(out.gpu() for out in outputs)
    return outputs


@pipeline_def
def _val_pipeline(*, plan: DataPlan, feed, ops):
    jpegs, targets = fn.external_source(source=feed, num_outputs=2, batch=True)
    images = ops.resize_shorter(_decode(jpegs, plan), plan.val_resize_size)
    crop = plan.val_crop_size
    pos_x, pos_y = _center(images, crop)
    images = _normalize(images, plan, crop=(crop, crop), crop_pos_x=pos_x, crop_pos_y=pos_y)
    return _to_device(plan, images, targets)


def channels_first(images, plan: DataPlan):
    """HWC output: (B, H, W, 3) -> (B, 3, H, W) with channels_last strides, a view, which is exactly the
    layout the model was converted to."""
    return images.permute(0, 3, 1, 2) if plan.channels_last else images


PREFETCH = 2  # batches DALI runs ahead of the one delivered


def decode_failure(exc: RuntimeError, plan: DataPlan, samples: SampleList, *, training: bool) -> Exception:
    """DALI's decoder error does not name the file: decode the batches that can have failed (`samples`:
    the one being delivered and those prefetched after it) to find it, never the whole list."""
    text = str(exc)
    if "decoders" not in text and "File mapping failed" not in text and "open" not in text.lower():
        return exc
    return undecodable_error(plan.root, samples, otherwise=f"an image under {plan.root} (none failed a full PIL "
                             "decode)", training=training)


class ListFeed:
    """`fn.external_source` of a validation pipeline: this rank's shard in order, `batch_size` encoded images
    (files or shard members) and their labels per call, the last batch smaller; StopIteration ends a pass
    and the next call starts the next one."""

    def __init__(self, plan: DataPlan, samples: SampleList, batch_size: int):
        self.plan, self.samples, self.batch_size, self.cursor = plan, samples, batch_size, 0
        self.error: Exception | None = None

    def __call__(self):
        if self.cursor >= len(self.samples):
            self.cursor = 0
            raise StopIteration
        positions = range(self.cursor, min(self.cursor + self.batch_size, len(self.samples)))
        self.cursor = positions[-1] + 1
        try:
            encoded = [np.frombuffer(read_sample(self.plan.root, self.samples, i), dtype=np.uint8) for i in positions]
        except (OSError, SampleReadError) as exc:  # DALI would report it without the file: keep it for the loader
            self.error = exc
            raise
        return encoded, np.array([self.samples.labels[i] for i in positions], dtype=np.int64).reshape(-1, 1)


class DaliLoader:
    """The validation `Loader` over a DALI pipeline of this rank's shard, read once in order."""

    def __init__(self, plan: DataPlan, samples: SampleList, *, batch_size: int, ops: str = "auto"):
        self.plan, self.samples, self.batch_size = plan, samples, batch_size  # to name a failing image
        self.feed = ListFeed(plan, samples, batch_size)
        self.pipeline = val_pipeline(plan, self.feed, batch_size=batch_size, ops=ops)
        self.delivered = list(range(len(samples)))  # validation yields every sample, in order
        self.position = 0
        self.pipeline.build()
        try:  # the iterator runs the first batch already
            self.iterator = DALIGenericIterator(self.pipeline, ["data", "label"], size=-1, auto_reset=True,
                                                last_batch_policy=LastBatchPolicy.PARTIAL)
        except (RuntimeError, OSError) as exc:
            raise self._failure(exc) from None

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self):
        batches = iter(self.iterator)
        self.position = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:  # the iterator has reset itself for the next pass (auto_reset)
                return
            except (RuntimeError, OSError) as exc:
                raise self._failure(exc) from None
            self.position += 1
            yield channels_first(batch[0]["data"], self.plan), batch[0]["label"].reshape(-1).long()

    def _failure(self, exc: Exception) -> Exception:
        start = self.position * self.batch_size
        window = self.samples.take(range(start, min(len(self.samples), start + (PREFETCH + 2) * self.batch_size)))
        if isinstance(self.feed.error, SampleReadError):  # not read, so not known to be undecodable
            return self.feed.error
        if self.feed.error is not None:
            return undecodable_error(self.plan.root, window, otherwise=str(self.feed.error), training=False)
        return decode_failure(exc, self.plan, window, training=False)

    def close(self) -> None:
        """The shard descriptors (the pipeline's threads end with it)."""
        SHARDS.close()


def _device_id(plan: DataPlan) -> int | None:
    return plan.device.index if plan.device.type == "cuda" else None


def val_pipeline(plan: DataPlan, feed, *, batch_size: int, ops: str = "auto"):
    """The validation pipeline over `feed` (a `ListFeed`), not yet built."""
    return _val_pipeline(batch_size=batch_size, num_threads=max(1, plan.workers), device_id=_device_id(plan),
                         seed=0, prefetch_queue_depth=PREFETCH, exec_dynamic=True, plan=plan, feed=feed,
                         ops=graph_ops(plan, ops))


class EmptyLoader:
    """The validation `Loader` of a rank whose shard is empty (fewer validation images than ranks, or every
    one of them known undecodable): DALI cannot build a pipeline over nothing."""

    delivered: list[int] = []

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())

    def close(self) -> None:
        """Nothing to release."""


def build_dali_val(plan: DataPlan, shard: SampleList, *, batch_size: int, ops: str = "auto"):
    if not len(shard):
        return EmptyLoader()
    return DaliLoader(plan, shard, batch_size=batch_size, ops=ops)
