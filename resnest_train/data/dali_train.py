"""The DALI training `Loader`: one pipeline per epoch over this process's part of the framework's data
order (`order.py`), so DALI reads exactly the micro-batches the other backends read.

The reader's labels are the samples' positions in the training list; the loader maps them to classes on
the device, and knows which samples each micro-batch held. A pipeline's augmentation seed comes from
(seed, epoch, process, first step), and DALI's own checkpoint (reader position and every random op's
state) continues a pipeline exactly: a run resumed with the same layout (processes, micro-batch, global
batch) rebuilds the pipeline it was in and restores it, bit-exact; with another layout the rest of the
epoch is dealt anew and augmentation draws differ (same samples, same micro-batches). A rebuild costs
about 0.04 s on CPU, nothing next to an epoch.
"""

from __future__ import annotations

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIClassificationIterator

from resnest_train.data.dali import PREFETCH, channels_first, decode_failure, train_pipeline
from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan
from resnest_train.data.samples import SampleList
from resnest_train.randomness import PIPELINE, derive_seed


class DaliTrainLoader:
    def __init__(self, plan: DataPlan, samples: SampleList, order: TrainOrder, *,
                 start: tuple[int, int] = (0, 0), state: dict | None = None, ops: str = "auto"):
        self.plan, self.samples, self.order, self.ops = plan, samples, order, ops
        self.labels = torch.from_numpy(samples.labels).long().to(plan.device)
        self.start = start  # (epoch, optimizer steps done in it)
        # DALI's checkpoint of the pipeline `start` lies in, when `state` was saved there ({"start_step",
        # "checkpoint"}; states of an older format or another position are not this pipeline's).
        saved_at = (state or {}).get("order") == 1 and ((state or {}).get("epoch"), (state or {}).get("step"))
        self.saved = state.get("dali") if saved_at == start else None
        self.epoch, self.start_step, self.position = self.start[0], self.start[1], 0
        self.iterator = None
        self.last_samples = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.order.micro_batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        step = self.start[1] if epoch == self.start[0] else 0
        checkpoint = None
        if self.saved and (epoch, step) == self.start:
            step, checkpoint = self.saved["start_step"], self.saved["checkpoint"]
        self.saved = None
        self.epoch, self.start_step = epoch, step
        self.rank_list = self.order.rank_samples(epoch, step).tolist()
        self.iterator = None  # the previous epoch's pipeline and its threads go
        seed = derive_seed(self.plan.seed, PIPELINE, epoch, self.plan.rank, step) % 2**31
        pipe = train_pipeline(self.plan, [self.samples.path(i) for i in self.rank_list], self.rank_list,
                              batch_size=self.order.layout.micro_batch, seed=seed, checkpoint=checkpoint,
                              ops=self.ops)
        pipe.build()
        self.position = 0
        try:  # the iterator runs the first batch already
            self.iterator = DALIClassificationIterator(pipe, reader_name="reader",
                                                       last_batch_policy=LastBatchPolicy.DROP)
        except RuntimeError as exc:
            raise self._failure(exc) from None
        if checkpoint is not None:  # the restored reader continues after the micro-batches read before
            self.position = (self.start[1] - step) * self.order.layout.accumulation

    def __iter__(self):
        total = len(self.rank_list) // self.order.layout.micro_batch
        while self.position < total:
            try:
                batch = next(self.iterator)
            except StopIteration:
                return
            except RuntimeError as exc:
                raise self._failure(exc) from None
            self.position += 1
            ids = batch[0]["label"].reshape(-1).long()
            self.last_samples = ids
            yield channels_first(batch[0]["data"], self.plan), self.labels[ids.to(self.labels.device)]

    def _failure(self, exc: RuntimeError) -> Exception:
        size = self.order.layout.micro_batch
        window = self.rank_list[self.position * size:(self.position + PREFETCH + 2) * size]
        return decode_failure(exc, self.plan, self.samples.take(window))

    def state(self) -> dict:
        """The position reached, and DALI's checkpoint of this epoch's pipeline (same-layout resume)."""
        step = self.start_step + self.position // self.order.layout.accumulation
        saved = {"start_step": self.start_step, "checkpoint": self.iterator.checkpoints()[0]} if self.iterator else None
        return {"order": 1, "epoch": self.epoch, "step": step, "dali": saved}


def build_dali_train(plan: DataPlan, samples: SampleList, order: TrainOrder, *,
                     start: tuple[int, int] = (0, 0), state: dict | None = None, ops: str = "auto") -> DaliTrainLoader:
    return DaliTrainLoader(plan, samples, order, start=start, state=state, ops=ops)
