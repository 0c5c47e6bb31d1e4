"""What a checkpoint holds: one versioned dataclass, and the only module that names its keys.

A checkpoint is plain data (`torch.load(..., weights_only=True)` reads it): the model's and optimizer's state
dicts, the GradScaler's, where the run is (epoch, optimizer steps done in it, global step), the resolved
config, the layout it was taken with, what the run trains on (`provenance.py`), each rank's own part (its
persistent buffers: BN statistics differ per rank between evaluations) and the weight EMA. Every file written
since format 2 says `format: 2`; the files of format 1 (no `format` key, the releases before it) are read
as they are, their per-rank data position and RNG states set aside (randomness is seeded per step and
sample, and each rank's position is a function of the step: neither is needed to resume).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from resnest_train.errors import UserError

FORMAT = 2
REQUIRED = ("model", "optimizer", "epoch", "batch", "step", "ranks")
KEYS = {"batch": "epoch_step"}  # key in the file -> field, where they differ
RENAMED = set(KEYS.values())


class FormatError(UserError):
    """A file that is not a checkpoint of ours, or misses what resuming needs."""


@dataclass
class RankPart:
    """What one rank adds: its persistent buffers (and its EMA's), as they were at the save."""

    buffers: dict = field(default_factory=dict)
    ema_buffers: dict | None = None
    rng: dict | None = None  # format 1 before per-step seeding: the rank's generator states

    def to_state(self) -> dict:
        return {"buffers": self.buffers, **({"ema_buffers": self.ema_buffers} if self.ema_buffers is not None
                                            else {})}

    @classmethod
    def from_state(cls, state: Mapping) -> RankPart:
        return cls(dict(state.get("buffers", {})), state.get("ema_buffers"), state.get("rng"))


@dataclass
class Checkpoint:
    model: dict
    optimizer: dict
    epoch: int
    epoch_step: int  # optimizer steps done in `epoch` (key "batch")
    step: int
    ranks: list[RankPart]
    scaler: dict = field(default_factory=dict)  # empty: the run did not use fp16
    best_top1: float = -1.0
    config: dict = field(default_factory=dict)  # the resolved config (config_yaml.to_dict)
    world_size: int = 1
    global_batch: int | None = None  # None: written before the global batch was recorded
    micro_batch: int | None = None
    steps_per_epoch: int | None = None
    provenance: dict | None = None
    epoch_loss: tuple[float, int] = (0.0, 0)  # mid-epoch: the epoch's loss so far (sum, count)
    epoch_seed: int | None = None  # the seed that dealt `epoch` (train.seed, or an earlier one kept)
    # how `epoch` was dealt (data/order.py shuffle_record: data.shuffle, and its window for shards); files
    # written before data.shuffle lack it, and every epoch of theirs was a global permutation
    epoch_shuffle: dict = field(default_factory=lambda: {"shuffle": "global"})
    epoch_metrics: dict | None = None  # at an epoch's end before its evaluation: the row the resumed run owes
    ema: dict | None = None  # the weight EMA's state dict (train.ema > 0)

    def to_state(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RENAMED and f.name != "ema"}
        state.update({key: getattr(self, name) for key, name in KEYS.items()})
        state.update(format=FORMAT, ranks=[part.to_state() for part in self.ranks],
                     epoch_loss=tuple(self.epoch_loss))
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    @classmethod
    def from_state(cls, state: object) -> Checkpoint:
        """From what `torch.load` gave back; format 1 files included (their per-rank `data` is dropped)."""
        if not isinstance(state, Mapping):
            raise FormatError(f"not a checkpoint of this trainer (a {type(state).__name__}, not a dict)")
        missing = [key for key in REQUIRED if key not in state]
        if missing:
            raise FormatError(f"not a checkpoint of this trainer (no {', '.join(missing)})")
        if state.get("format", 1) > FORMAT:
            raise FormatError(f"checkpoint format {state['format']} is newer than this trainer reads ({FORMAT}): "
                              "update the trainer")
        known = {f.name for f in fields(cls)} - {"ranks"} - RENAMED
        values = {key: state[key] for key in known if key in state and state[key] is not None}
        values.update({name: state[key] for key, name in KEYS.items()})
        if "epoch_seed" not in state:  # format 1 before the seed was recorded: the run's own seed dealt it
            values["epoch_seed"] = state.get("config", {}).get("train", {}).get("seed")
        values["epoch_loss"] = tuple(values.get("epoch_loss", (0.0, 0)))
        return cls(ranks=[RankPart.from_state(part) for part in state["ranks"]], **values)

    @property
    def trained_classes(self) -> list[str] | None:
        classes = (self.provenance or {}).get("classes")
        return list(classes) if classes else None

    @property
    def trained_epochs(self) -> int:
        return self.config["train"]["epochs"]

    @property
    def model_name(self) -> str:
        return self.config["model"]["name"]


def position_of(state: Mapping) -> tuple[int, int]:
    """(epoch, step) of a checkpoint's state (what its file names and log lines say)."""
    return int(state["epoch"]), int(state["step"])


def weights_of(obj: object, which: str = "model") -> object:
    """The weights a file holds: for our checkpoints the model's state dict (or the EMA's, `which="ema"`);
    anything else is returned as it is (other trainers' files: models/pretrained.py reads their layouts).
    None where the EMA is asked of a file that holds none."""
    ours = isinstance(obj, Mapping) and all(key in obj for key in REQUIRED)
    if which == "ema":
        return obj.get("ema") if isinstance(obj, Mapping) and isinstance(obj.get("ema"), Mapping) else None
    return obj["model"] if ours else obj


def classes_of(obj: object) -> list[str] | None:
    """The class names a checkpoint records (None: another file, or one written before they were recorded)."""
    if not isinstance(obj, Mapping):
        return None
    classes = (obj.get("provenance") or {}).get("classes")
    return list(classes) if classes else None
