"""What a run trains on, as its checkpoints record it, and what a resumed run may change.

A checkpoint holds its `provenance`: the class names in label order, the identity of the training list (the
number of images and a hash of each image's class name and sample key, in list order) and the
recipe-defining config (model, data, optimiser, schedule, global batch). The sample key is a file's name as
`scripts/pack_dataset.py` keeps it in a shard, so the identity does not depend on the container: another
folder holding the same files, or the webdataset shards packed from them, is the same training set.
Checkpoints written before the identity hold `sha256` alone, a hash of the sorted (relative path, label)
pairs, which names the container (`train/<class>/<file>` vs `train/<shard>.tar:<member>`); it is still
computed, and compared with such checkpoints. The validation list's identity is held too (`val_set`,
sorted: its order counts for nothing), since `best.pt` compares top-1 figures across evaluations.

At resume rank 0 compares the provenances: another model, other class names or another training set would
silently train on something else (added images never seen, labels permuted, a "best" top-1 of the old
data), and other validation data would choose `best.pt` by figures of different sets, so each is refused
with what changed (old -> new) unless `checkpoint.allow_changes=true` (then new validation data restarts
the choice of `best.pt`); the data moved elsewhere (`data.root`) and other hyperparameters are logged.
Checkpoints without `val_set` (written before it) resume on any validation data.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from resnest_train.config import Config
from resnest_train.config_yaml import to_dict

if TYPE_CHECKING:  # the data package is not needed to compare provenances
    from resnest_train.data.samples import SampleList

ARCHITECTURE = ("name", "num_classes")  # model.* keys that make another network
RECIPE = ("model", "data", "optim", "schedule")
# train.* keys of the recipe (the rest, device, logging, compile, are how a run goes, not what it trains):
# the seed deals the data order, so a mid-epoch resume with another seed would re-deal the epoch.
TRAIN_RECIPE = ("epochs", "label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "loss",
                "bce_target_threshold", "amp", "seed", "deterministic", "repeated_augment")
VALIDATION_CHANGED = "validation data changed"


def fingerprint(train: list[tuple[str, int]] | None, synthetic_size: int) -> dict:
    """The training list's size and a hash of its sorted (relative path, label) pairs: the form of the
    checkpoints written before `identity`."""
    if train is None:
        return {"images": synthetic_size, "sha256": "synthetic"}
    digest = hashlib.sha256()
    for path, label in sorted(train):
        digest.update(f"{path}\t{label}\n".encode())
    return {"images": len(train), "sha256": digest.hexdigest()[:16]}


def sample_key(kind: str, name: str) -> str:
    """A sample's name without its container and extension: what `scripts/pack_dataset.py` keeps of a file
    name (its stem, dots made underscores, since webdataset's key ends at the first dot of a member's base
    name) and what a shard's member name gives back. `kind`: "folder" (`name` a file) or "shards" (a member)."""
    base = name.rpartition("/")[2]
    if kind == "shards":
        return base.partition(".")[0]
    return os.path.splitext(base)[0].replace(".", "_")


def identity(samples: SampleList, classes: list[str], *, ordered: bool) -> dict:
    """A split's size and a hash of each sample's (class name, sample key), the same for a folder and its
    shards. `ordered`: in list order (the training list: the data order deals positions in it, so another
    order is another training set); else sorted (validation counts each image once, in any order)."""
    names, offsets = samples.names.tobytes(), samples.offsets.tolist()
    pairs = [f"{classes[label]}\t{sample_key(samples.kind, names[offsets[i]:offsets[i + 1]].decode())}\n"
             for i, label in enumerate(samples.labels.tolist())]
    text = "".join(pairs if ordered else sorted(pairs))
    return {"images": len(pairs), "samples": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _train_set(train: SampleList | None, classes: list[str] | None, synthetic_size: int) -> dict:
    if train is None:
        return {"images": synthetic_size, "samples": "synthetic", "sha256": "synthetic"}
    # both forms: a checkpoint written before `identity` holds the path hash alone
    return {**identity(train, classes, ordered=True), "sha256": fingerprint(train, 0)["sha256"]}


def _val_set(val: SampleList | None, classes: list[str] | None, synthetic_size: int) -> dict:
    if val is None:  # the synthetic backend's validation: a quarter of its training size
        return {"images": max(1, synthetic_size // 4), "samples": "synthetic"}
    return identity(val, classes, ordered=False)


def provenance(config: Config, classes: list[str] | None, train: SampleList | None, val: SampleList | None,
               global_batch: int) -> dict:
    values = to_dict(config)
    recipe = {section: values[section] for section in RECIPE}
    recipe["train"] = {"global_batch": global_batch, **{key: values["train"][key] for key in TRAIN_RECIPE}}
    size = config.data.synthetic_size
    return {"classes": list(classes) if classes is not None else None, "train_set": _train_set(train, classes, size),
            "val_set": _val_set(val, classes, size), "recipe": recipe}


def _first_difference(old: list[str], new: list[str]) -> str:
    for label, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"label {label}: '{a}' -> '{b}'"
    return f"{len(old)} -> {len(new)} classes"


def blocking_changes(saved: dict, current: dict, *, mid_epoch: bool = False) -> list[str]:
    """What makes the checkpoint's run another run: architecture, class names, training set, validation
    data, and, in the middle of an epoch, the seed that dealt the epoch's order."""
    changes = []
    old_model, new_model = saved["recipe"]["model"], current["recipe"]["model"]
    for key in ARCHITECTURE:
        if old_model.get(key) != new_model.get(key):
            changes.append(f"model.{key} {old_model.get(key)} -> {new_model.get(key)}")
    if saved["classes"] != current["classes"]:
        changes.append(f"class names ({_first_difference(saved['classes'] or [], current['classes'] or [])})")
    changes += _data_changes(saved, current)
    old_seed, new_seed = (values["recipe"].get("train", {}).get("seed") for values in (saved, current))
    if mid_epoch and None not in (old_seed, new_seed) and old_seed != new_seed:
        changes.append(f"train.seed {old_seed} -> {new_seed} in the middle of an epoch "
                       "(its order was dealt by the old seed; with the change the rest of the epoch keeps that "
                       "order and the new seed starts at the next epoch)")
    return changes


def _data_changes(saved: dict, current: dict) -> list[str]:
    """The training set, by the identity when the checkpoint holds one, else by its path hash; the
    validation data where the checkpoint records it."""
    changes = []
    old_set, new_set = saved["train_set"], current["train_set"]
    form = "samples" if "samples" in old_set else "sha256"
    if (old_set["images"], old_set[form]) != (new_set["images"], new_set.get(form)):
        changes.append(f"training set {old_set['images']} images ({old_set[form]}) -> {new_set['images']} images "
                       f"({new_set.get(form)})")
    if validation_changed(saved, current):
        old_val, new_val = saved["val_set"], current["val_set"]
        changes.append(f"{VALIDATION_CHANGED} ({old_val['images']} -> {new_val['images']} images; "
                       f"{old_val['samples']} -> {new_val['samples']})")
    return changes


def validation_changed(saved: dict, current: dict) -> bool:
    """Other validation data than the checkpoint's (never for a checkpoint written before `val_set`)."""
    return None not in (saved.get("val_set"), current.get("val_set")) and saved["val_set"] != current["val_set"]


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Every key of the resolved config (as checkpoints store it) whose value differs: 'key old -> new'."""
    changes = []
    for key, value in current.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            changes += config_changes(saved[key], value, f"{prefix}{key}.")
        elif saved[key] != value:
            changes.append(f"{prefix}{key} {saved[key]} -> {value}")
    return changes
