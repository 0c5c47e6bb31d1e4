"""The torchvision backend: the DALI pipeline's semantics with torchvision transforms and a DataLoader.

Used where DALI is unavailable, and as the reference the DALI path is compared with. Training decodes the
micro-batches the reader gives it (`reader.py`), each image augmented with the framework's draws for it
(`draws.py`: the same draws the DALI graph receives); validation reads this rank's shard of the list with no
padding. An image that cannot be decoded (broken inside despite a valid header and end, over PIL's
decompression-bomb limit, deleted since the scan) is named in the log; in training it is replaced by the
next decodable image of the training list (micro-batches keep their size, every rank their count), in
validation it is dropped, never replaced: evaluation counts each decodable image exactly once.
Workers ignore the stop signals, which the main process turns into a checkpoint (run/loop.py): a signal to
the whole process group (systemd, `scancel`, GNU `timeout`, Ctrl-C) must not kill them first.
"""

from __future__ import annotations

import io
import logging
import os
import signal

from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from resnest_train.cluster.distributed import tcp_connections
from resnest_train.data.draws import draw_batch
from resnest_train.data.index import DatasetError
from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan
from resnest_train.data.reader import EpochCursor, ReaderLoader
from resnest_train.data.sample_read import SHARDS, SampleReadError, read_sample
from resnest_train.data.samples import SampleList
from resnest_train.data.store import under
from resnest_train.data.torchvision_augment import TrainAugment
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnest_train.data.undecodable import Replacement

log = logging.getLogger(__name__)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale PNGs (PIL modes I;16 / I) are scaled to 8 bits first: `convert("RGB")`
    clips them to white; DALI's decoder scales them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")


class ImageListDataset(Dataset):
    """(image, label, position) for each sample (a file or a shard member); None where the image cannot be
    decoded."""

    def __init__(self, root: str, samples: SampleList, transform):
        self.root = str(root)  # a folder, or a URL (store.py)
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int):
        label = int(self.samples.labels[item])
        try:
            with Image.open(io.BytesIO(read_sample(self.root, self.samples, item))) as image:
                return self.transform(to_rgb(image)), label, item
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping undecodable image %s: %s", under(self.root, self.samples.path(item)), exc)
            return None


def collate_decodable(batch: list):
    """Drop the images that failed (validation only: training replaces them)."""
    good = [sample for sample in batch if sample is not None]
    if not good:
        return None
    if len(good[0]) == 4:  # training: each sample's draws stay a list of dicts (the per-sample record)
        return (*default_collate([sample[:3] for sample in good]), [sample[3] for sample in good])
    return default_collate(good)


WORKER_GRACE_SECONDS = 60


def _stop_later(_signum, _frame) -> None:
    """SIGTERM in a worker: the main process decides (it finishes the step, saves and closes the loader,
    which ends the worker); should nobody end it, SIGALRM's default action does, after the grace period.
    (torch's own shutdown also sends SIGTERM to a worker that does not exit in time.)"""
    signal.alarm(WORKER_GRACE_SECONDS)


def close_network_sockets() -> None:
    """A forked worker shares the main process's TCP connections (gloo's, the rendezvous store's), which
    stay open while any copy does: were the main process killed, the other ranks would not notice until its
    workers exited too. Workers never use them: they close their copies at start. (Local sockets, the
    DataLoader's own, are kept.)"""
    for sock in tcp_connections():
        os.close(sock.fileno())


def ignore_stop_signals(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_later)
    close_network_sockets()


def val_transform(crop_size: int, resize_size: int, interpolation: str) -> T.Compose:
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode(interpolation)),
                      T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EpochSamples:
    """The sampler of a training DataLoader: (epoch, sample, copy) keys of this process's part of the epoch,
    in the framework's order (`order.py`; copy: None without repeated augmentation); replaced for each
    epoch (sampling runs in the main process, so persistent workers see the new epoch)."""

    def __init__(self):
        self.pairs: list[tuple[int, int, int | None]] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)


FALLBACK_TRIES = 64  # training-list positions tried after an undecodable image before giving up


class TrainImageDataset(ImageListDataset):
    """Training images by (epoch, sample, copy), at the epoch's crop size (`DataPlan.train_size`: progressive
    resizing needs nothing but the key), augmented with the framework's draws for that key, so the
    result does not depend on the process or worker that reads it (draws.py). Returns (image, label,
    position, draws).

    An image that cannot be decoded is replaced, never dropped: a micro-batch always holds its
    `train.batch_size` images, so no rank trains fewer micro-batches than the others and gradient
    accumulation stays whole. The replacement is the next decodable image of the training list (position
    p + 1, p + 2, ...), augmented with sample p's draws: the same on any process count and after any resume.
    The draws record it (`replaced_by`) and the log names the file."""

    def __init__(self, root: str, samples: SampleList, plan: DataPlan, replacement: Replacement):
        super().__init__(root, samples, TrainAugment(plan))
        self.plan, self.replacement = plan, replacement

    def _decode(self, item: int) -> Image.Image:
        with Image.open(io.BytesIO(read_sample(self.root, self.samples, item))) as image:
            return to_rgb(image)

    def __getitem__(self, key: tuple[int, int, int | None]):
        epoch, item, repeat = key  # repeat: the image's copy (train.repeated_augment), None without repeats
        source, failed = item, []
        for _ in range(FALLBACK_TRIES):
            source = self.replacement.source(source)  # known undecodable images are not tried again
            try:
                rgb = self._decode(source)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("undecodable training image %s (%s): replaced by the next image of the training "
                            "list", under(self.root, self.samples.path(source)), exc)
                failed.append(self.samples.path(source))
                source = (source + 1) % len(self.samples)
        else:
            raise OSError(f"{FALLBACK_TRIES} consecutive training images from {self.samples.path(item)} cannot "
                          "be decoded")
        draws = draw_batch(self.plan, epoch, [item], [(rgb.height, rgb.width)],
                           None if repeat is None else [repeat]).row(0)
        image = self.transform(rgb, draws, self.plan.train_size(epoch))  # the epoch's size: progressive resizing
        if source != item:
            draws["replaced_by"] = source
        if failed:
            draws["undecodable"] = failed
        return image, int(self.samples.labels[source]), item, draws


class TorchTrainLoader(ReaderLoader):
    """The training `Loader` over a DataLoader: decodes the micro-batches the reader gives it."""

    def __init__(self, loader: DataLoader, plan: DataPlan, order: TrainOrder, *, start: tuple[int, int] = (0, 0)):
        self.loader, self.plan, self.reader = loader, plan, EpochCursor(order, start)
        self.last_draws = None
        self.found: list[str] = []  # undecodable images met since `newly_undecodable` was last asked

    def set_epoch(self, epoch: int) -> None:
        rows = self.reader.set_epoch(epoch)
        items = rows.reshape(-1).tolist()
        copies = self.reader.repeats.reshape(-1).tolist() if self.reader.repeats is not None else [None] * len(items)
        self.loader.sampler.pairs = [(epoch, item, copy) for item, copy in zip(items, copies)]

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except OSError as exc:  # a run of undecodable images longer than the fallback (TrainImageDataset)
                raise DatasetError(str(exc).strip().splitlines()[-1]) from None
            except SampleReadError as exc:
                raise worker_error(exc) from None
            images, targets, positions, self.last_draws = batch
            self.found += [path for draws in self.last_draws for path in draws.get("undecodable", [])]
            self.reader.delivered(positions)
            images = images.to(self.plan.device, non_blocking=True).contiguous(memory_format=self.plan.memory_format)
            yield images, targets.to(self.plan.device, non_blocking=True)

    def newly_undecodable(self) -> list[str]:
        found, self.found = list(dict.fromkeys(self.found)), []
        return found

    def close(self) -> None:
        shut_down_workers(self.loader)
        SHARDS.close()


class TorchLoader:
    """The validation `Loader` over a DataLoader: batches moved to the device in the model's memory format."""

    def __init__(self, loader: DataLoader, plan: DataPlan):
        self.loader = loader
        self.plan = plan
        self.delivered: list[int] = []  # positions in the sample list of the images yielded (evaluation)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.delivered = []
        try:
            yield from self._batches()
        except SampleReadError as exc:
            raise worker_error(exc) from None

    def _batches(self):
        for batch in self.loader:
            if batch is None:  # every image of the batch failed to decode (named in the log)
                continue
            images, targets, positions = batch
            self.delivered.extend(positions.tolist())
            images = images.to(self.plan.device, non_blocking=True).contiguous(memory_format=self.plan.memory_format)
            yield images, targets.to(self.plan.device, non_blocking=True)

    def close(self) -> None:
        shut_down_workers(self.loader)
        SHARDS.close()


def worker_error(exc: SampleReadError) -> SampleReadError:
    """A read error as raised in the process that read: a DataLoader worker's comes back with the worker's
    traceback as its message (torch's ExceptionWrapper), whose last line is `module.Class: message`."""
    text = str(exc).strip()
    if "Traceback" not in text:
        return exc
    return SampleReadError(text.splitlines()[-1].partition(": ")[2])


def shut_down_workers(loader: DataLoader) -> None:
    """End the persistent workers of `loader` now. Without it, a run that stops on an error keeps the
    loader's iterator alive (its frames are in the traceback) until interpreter exit, where multiprocessing
    sends the workers SIGTERM, which they turn into a 60 s grace (`_stop_later`): the exit stalled ~62 s.
    `_shutdown_workers` is the DataLoader iterator's own clean shutdown (what its `__del__` calls)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def _data_loader(dataset, plan: DataPlan, **kwargs) -> DataLoader:
    return DataLoader(dataset, num_workers=plan.workers, pin_memory=plan.device.type == "cuda",
                      persistent_workers=plan.workers > 0,
                      collate_fn=collate_decodable,
                      worker_init_fn=ignore_stop_signals, **kwargs)


def build_torch_train(plan: DataPlan, samples: SampleList, order: TrainOrder, *, start: tuple[int, int] = (0, 0),
                      replacement: Replacement | None = None) -> TorchTrainLoader:
    dataset = TrainImageDataset(plan.root, samples, plan, replacement or Replacement(len(samples)))
    loader = _data_loader(dataset, plan, batch_size=order.layout.micro_batch, sampler=EpochSamples())
    return TorchTrainLoader(loader, plan, order, start=start)


def build_torch_val(plan: DataPlan, shard: list[tuple[str, int]], *, batch_size: int) -> TorchLoader:
    transform = val_transform(plan.val_crop_size, plan.val_resize_size, plan.interpolation)
    loader = _data_loader(ImageListDataset(plan.root, shard, transform), plan,
                          batch_size=batch_size, shuffle=False)
    return TorchLoader(loader, plan)
