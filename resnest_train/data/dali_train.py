"""The DALI training `Loader`: one pipeline for the whole run, fed by the framework (`reader.py`).

`fn.external_source` takes each micro-batch of the framework's data order (`order.py`) as encoded bytes
(from folders or shards alike), with each sample's training-list position and augmentation draws
(`draws.py`); the graph decodes only the drawn crop window where the crop comes first (`image_slice`:
region-of-interest decoding, as NVIDIA's reference trainer decodes with a random crop), resizes, runs
AutoAugment with the drawn sub-policy, stage uniforms and signs (or RandAugment with the drawn ops, uniforms
and arguments), jitters colour with the drawn factors, flips, and folds the drawn lighting into the
normalisation. DALI draws nothing itself, so the same image is augmented the same way on any process count
and after any resume, and a resume needs no DALI checkpoint: the reader starts at the step. The pipeline is
built once; an epoch points the feed at its micro-batches and resets the iterator (BENCHMARKS.md, "ImageNet
scale": no per-epoch rebuild). Under progressive resizing the feed also sends each image's output size, the
epoch's (`DataPlan.train_size`), which the resize takes as a per-sample input: no rebuild for a new size.
"""

from __future__ import annotations

import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from resnest_train.data.dali import (
    IMAGENET_MEAN,
    PREFETCH,
    _decode_common,
    _device_id,
    _normalize,
    _to_device,
    channels_first,
    decode_failure,
    graph_ops,
    lighting_mean,
)
from resnest_train.data.dali_feed import MicroBatchFeed
from resnest_train.data.draws import augment_inputs
from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan
from resnest_train.data.reader import EpochCursor, ReaderLoader
from resnest_train.data.sample_read import SampleReadError
from resnest_train.data.samples import SampleList
from resnest_train.data.undecodable import Replacement, undecodable_error


def _crop(jpegs, start, shape, size, plan: DataPlan, ops, augment, interp=None):
    """The drawn window, resized to `size` (the crop size, or the epoch's, fed per sample; with the drawn
    interpolation where `data.crop` draws one); AutoAugment on the crop or, before it, on the image."""
    if plan.autoaugment == "none" or plan.autoaugment_on == "crop":
        images = fn.decoders.image_slice(jpegs, start=start, shape=shape, axis_names="HW", **_decode_common(plan))
        images = ops.resize(images, size, interp)
        return augment(images) if plan.autoaugment != "none" else images
    images = augment(fn.decoders.image(jpegs, **_decode_common(plan)))
    return ops.resize(fn.slice(images, start=start, shape=shape, axis_names="HW"), size, interp)


@pipeline_def(enable_conditionals=True)
def _train_pipeline(*, plan: DataPlan, feed, ops):
    fed = dict(zip(feed.names, fn.external_source(source=feed, num_outputs=len(feed.names), batch=True)))
    augment = (lambda images: ops.autoaugment(images, *(fed[name] for name in augment_inputs(plan.autoaugment))))
    # Progressive resizing feeds each micro-batch's size (the feed's epoch's): the graph is built once.
    size = fed.get("size", plan.crop_size)
    images = _crop(fed["encoded"], fed["start"], fed["shape"], size, plan, ops, augment, fed.get("interp"))
    if plan.color_jitter > 0:
        jitter = fed["jitter"]
        images = ops.color_twist(images, brightness=jitter[0], contrast=jitter[1], saturation=jitter[2])
    mean = lighting_mean(fed["lighting"]) if plan.lighting > 0 else [m * 255 for m in IMAGENET_MEAN]
    return _to_device(plan, _normalize(images, plan, mirror=fed["flip"], mean=mean), fed["sample"])


def train_pipeline(plan: DataPlan, feed, *, batch_size: int, ops: str = "auto"):
    """The training pipeline a run builds, not yet built (tests inspect its graph: tests/test_dali_graph.py).
    `ops`: see `graph_ops`; tests build the GPU graph's ops on the CPU with `ops="dali"`."""
    return _train_pipeline(
        batch_size=batch_size, num_threads=max(1, plan.workers), device_id=_device_id(plan), seed=0,
        prefetch_queue_depth=PREFETCH,
        # The dynamic executor hands batches to torch through DLPack without a copy (BENCHMARKS.md).
        exec_dynamic=True, plan=plan, feed=feed, ops=graph_ops(plan, ops))


class DaliTrainLoader(ReaderLoader):
    def __init__(self, plan: DataPlan, samples: SampleList, order: TrainOrder, *, start: tuple[int, int] = (0, 0),
                 replacement: Replacement | None = None, ops: str = "auto"):
        self.plan, self.samples, self.reader = plan, samples, EpochCursor(order, start)
        replacement = replacement or Replacement(len(samples))
        # a known undecodable sample trains as its replacement, label included (undecodable.py)
        labels = samples.labels.copy()
        for position in replacement.undecodable.tolist():  # a few entries, not the whole list
            labels[position] = samples.labels[replacement.source(position)]
        self.labels = torch.from_numpy(labels).long().to(plan.device)
        self.feed = MicroBatchFeed(plan, samples, replacement)
        self.pipe = train_pipeline(plan, self.feed, batch_size=order.layout.micro_batch, ops=ops)
        self.pipe.build()
        self.iterator = None
        self.last_draws = None

    def set_epoch(self, epoch: int) -> None:
        self.feed.point_at(epoch, self.reader.set_epoch(epoch), self.reader.repeats)
        try:  # the iterator runs the first batches already
            if self.iterator is None:
                self.iterator = DALIGenericIterator(self.pipe, ["data", "sample"], size=-1, auto_reset=False,
                                                    last_batch_policy=LastBatchPolicy.PARTIAL)
            else:
                self.iterator.reset()
        except (RuntimeError, OSError, ValueError) as exc:  # DALI's, or the feed's own
            raise self._failure(exc) from None

    def __iter__(self):
        while self.reader.position < len(self.reader.rows):
            try:
                batch = next(self.iterator)
            except StopIteration:
                return
            except (RuntimeError, OSError, ValueError) as exc:
                raise self._failure(exc) from None
            ids = batch[0]["sample"].reshape(-1).long()
            self.last_draws = self.feed.delivered(ids.tolist())
            self.reader.delivered(ids.cpu())
            yield channels_first(batch[0]["data"], self.plan), self.labels[ids.to(self.labels.device)]

    def _failure(self, exc: Exception) -> Exception:
        if isinstance(self.feed.error, SampleReadError):  # not read, so not known to be undecodable
            return self.feed.error
        if self.feed.error is not None:  # the feed could not read (or parse) an image of its last micro-batch
            failing = self.samples.take(self.feed.sources(self.reader.rows[self.feed.cursor - 1]))
            return undecodable_error(self.plan.root, failing, otherwise=str(self.feed.error), training=True)
        rows = self.reader.rows[self.reader.position:self.reader.position + PREFETCH + 2]
        return decode_failure(exc, self.plan, self.samples.take(self.feed.sources(rows).reshape(-1)), training=True)


def build_dali_train(plan: DataPlan, samples: SampleList, order: TrainOrder, *, start: tuple[int, int] = (0, 0),
                     replacement: Replacement | None = None, ops: str = "auto") -> DaliTrainLoader:
    return DaliTrainLoader(plan, samples, order, start=start, replacement=replacement, ops=ops)
