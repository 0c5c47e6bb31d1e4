"""What a run trains on, as its checkpoints record it, and what a resumed run may change.

A checkpoint holds its `provenance`: the class names in label order, a fingerprint of the training list
(the number of images and a hash of the sorted (relative path, label) pairs: another folder holding the
same files has the same fingerprint) and the recipe-defining config (model, data, optimiser, schedule,
global batch). At resume rank 0 compares it with this run's: another model, other class names or another
training set would silently train on something else (added images never seen, labels permuted, a "best"
top-1 of the old data), so each is refused with what changed (old -> new) unless
`checkpoint.allow_changes=true`; the data moved elsewhere (`data.root`) and other hyperparameters are
logged.
"""

from __future__ import annotations

import hashlib

from resnest_train.config import Config
from resnest_train.config_yaml import to_dict

ARCHITECTURE = ("name", "num_classes")  # model.* keys that make another network
RECIPE = ("model", "data", "optim", "schedule")
# train.* keys of the recipe (the rest, device, logging, compile, are how a run goes, not what it trains):
# the seed deals the data order, so a mid-epoch resume with another seed would re-deal the epoch.
TRAIN_RECIPE = ("epochs", "label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "loss",
                "bce_target_threshold", "amp", "seed", "deterministic", "repeated_augment")


def fingerprint(train: list[tuple[str, int]] | None, synthetic_size: int) -> dict:
    """The training list's size and a hash of its sorted (relative path, label) pairs."""
    if train is None:
        return {"images": synthetic_size, "sha256": "synthetic"}
    digest = hashlib.sha256()
    for path, label in sorted(train):
        digest.update(f"{path}\t{label}\n".encode())
    return {"images": len(train), "sha256": digest.hexdigest()[:16]}


def provenance(config: Config, classes: list[str] | None, train: list[tuple[str, int]] | None,
               global_batch: int) -> dict:
    values = to_dict(config)
    recipe = {section: values[section] for section in RECIPE}
    recipe["train"] = {"global_batch": global_batch, **{key: values["train"][key] for key in TRAIN_RECIPE}}
    return {"classes": list(classes) if classes is not None else None,
            "train_set": fingerprint(train, config.data.synthetic_size), "recipe": recipe}


def _first_difference(old: list[str], new: list[str]) -> str:
    for label, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"label {label}: '{a}' -> '{b}'"
    return f"{len(old)} -> {len(new)} classes"


def blocking_changes(saved: dict, current: dict, *, mid_epoch: bool = False) -> list[str]:
    """What makes the checkpoint's run another run: architecture, class names, training set, and, in the
    middle of an epoch, the seed that dealt the epoch's order."""
    changes = []
    old_model, new_model = saved["recipe"]["model"], current["recipe"]["model"]
    for key in ARCHITECTURE:
        if old_model.get(key) != new_model.get(key):
            changes.append(f"model.{key} {old_model.get(key)} -> {new_model.get(key)}")
    if saved["classes"] != current["classes"]:
        changes.append(f"class names ({_first_difference(saved['classes'] or [], current['classes'] or [])})")
    old_set, new_set = saved["train_set"], current["train_set"]
    if old_set != new_set:
        changes.append(f"training set {old_set['images']} images ({old_set['sha256']}) -> {new_set['images']} "
                       f"images ({new_set['sha256']})")
    old_seed, new_seed = (values["recipe"].get("train", {}).get("seed") for values in (saved, current))
    if mid_epoch and None not in (old_seed, new_seed) and old_seed != new_seed:
        changes.append(f"train.seed {old_seed} -> {new_seed} in the middle of an epoch "
                       "(its order was dealt by the old seed; with the change the rest of the epoch keeps that "
                       "order and the new seed starts at the next epoch)")
    return changes


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
