"""A run continues only on the data and model it started with: a resumed run whose training set grew or
shrank, whose validation data changed, whose class folders were renamed, or whose model was swapped for one
with the same state-dict keys stops with one `error:` line naming the change (old -> new), or, with
checkpoint.allow_changes=true, continues and records it; the same data in another folder, or packed into
shards, resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from resnest_train.checkpoint.provenance import blocking_changes, fingerprint, provenance
from resnest_train.config_yaml import from_dict
from resnest_train.data.index import load_index
from tests.conftest import metrics, run_script, script_env, train_args
from tests.test_faults import last_state, one_line_error
from tests.test_shards import pack

pytestmark = pytest.mark.slow


@pytest.fixture
def data(image_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    return root


def first_run(root, out: Path, *extra: str) -> None:
    run_script(train_args(root, out, "data.backend=torchvision", "train.epochs=1", *extra))


def resumed(root, out: Path, *extra: str, expect: int = 0):
    return run_script(train_args(root, out, "data.backend=torchvision", "train.epochs=2", *extra), expect=expect)


def test_fingerprint_follows_paths_and_labels_not_their_order():
    train = [("a/1.jpg", 0), ("b/2.jpg", 1)]
    assert fingerprint(train, 0) == fingerprint(list(reversed(train)), 0)
    assert fingerprint(train, 0) != fingerprint([("a/1.jpg", 1), ("b/2.jpg", 0)], 0)
    saved = {"classes": ["a", "b"], "train_set": fingerprint(train, 0), "recipe": {"model": {"name": "x"}}}
    renamed = {**saved, "classes": ["b", "a"]}
    assert blocking_changes(saved, renamed) == ["class names (label 0: 'a' -> 'b')"]


def provenance_of(root: Path, order=None) -> dict:
    """This run's provenance on `root` (`order`: its training list in this order of positions)."""
    index = load_index(root, write_cache=False)
    train = index.train if order is None else index.train.take(order)
    return provenance(from_dict({"model": {"num_classes": 4}}), index.classes, train, index.val, 8)


def old_form(saved: dict) -> dict:
    """A provenance as checkpoints written before the container-free identity held it."""
    return {**saved, "train_set": {key: saved["train_set"][key] for key in ("images", "sha256")}, "val_set": None}


def test_a_folder_and_its_shards_are_one_data_set_and_old_checkpoints_still_compare(data, tmp_path):
    """The identity holds each image's class and sample key, not its container (a file name with dots
    included: the shard's key has underscores); another order or image list is another training set.
    The path hash of older checkpoints still accepts the same folder (and cannot see through packing)."""
    dotted = data / "train" / "class_002" / "train_002_00005.jpg"
    dotted.rename(dotted.with_name("train.002.00005.jpg"))
    assert pack(data, tmp_path / "shards", "--shard-size", "20000").returncode == 0
    folder, shards = provenance_of(data), provenance_of(tmp_path / "shards")
    assert blocking_changes(folder, shards) == [] and folder["train_set"]["sha256"] != shards["train_set"]["sha256"]
    assert folder["val_set"] == shards["val_set"]
    assert blocking_changes(folder, provenance_of(data, [1, 0, *range(2, 48)]))[0].startswith("training set 48")
    assert blocking_changes(old_form(folder), folder) == []
    assert blocking_changes(old_form(folder), shards)[0].startswith("training set 48 images")
    (data / "train" / "class_001" / "train_001_00000.jpg").unlink()
    assert blocking_changes(folder, provenance_of(data)) == [
        f"training set 48 images ({folder['train_set']['samples']}) -> 47 images "
        f"({provenance_of(data)['train_set']['samples']})"]


def test_a_folder_run_resumes_on_its_own_packed_shards(data, tmp_path):
    """Same images in the same order, in tar shards: the run continues (it was refused as trained on
    something else, the paths naming the container); shards of another image list are still refused."""
    out = tmp_path / "run"
    first_run(data, out)
    assert pack(data, tmp_path / "shards", "--shard-size", "20000").returncode == 0
    result = resumed(tmp_path / "shards", out)
    assert f"data.root {data} -> {tmp_path / 'shards'}" in result.stdout and "(webdataset shards)" in result.stdout
    assert [r["epoch"] for r in metrics(out)] == [1, 2]
    for image in sorted((data / "train" / "class_003").glob("*.jpg"))[:8]:
        image.unlink()
    assert pack(data, tmp_path / "fewer", "--shard-size", "20000").returncode == 0
    refused = run_script(train_args(tmp_path / "fewer", out, "data.backend=torchvision", "train.epochs=3"), expect=2)
    one_line_error(refused, "trained on something else: training set 48 images", "-> 40 images")


def test_changed_validation_data_is_refused_or_restarts_best_on_request(data, tmp_path):
    """A validation class folder emptied before a resume: best.pt chose between top-1 figures of different
    sets, nothing said. Refused with one line (old -> new count); with checkpoint.allow_changes=true the
    change is logged and recorded, and best.pt is chosen on the new set alone."""
    out = tmp_path / "run"
    first_run(data, out)
    for image in (data / "val" / "class_000").glob("*.jpg"):
        image.unlink()
    refused = resumed(data, out, expect=2)
    one_line_error(refused, "validation data changed (20 -> 15 images", "checkpoint.allow_changes=true")
    assert [r["epoch"] for r in metrics(out)] == [1]
    allowed = resumed(data, out, "checkpoint.allow_changes=true")
    said = allowed.stdout + allowed.stderr
    assert "continuing with changes (checkpoint.allow_changes=true): validation data changed (20 -> 15" in said
    assert "best.pt is chosen anew from the next evaluation" in said
    rows = metrics(out)
    assert [r["val_images"] for r in rows] == [20, 15] and "validation data" in rows[1]["resumed_with_changes"][0]
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 2 and best["best_top1"] == rows[1]["val_top1"]
    assert last_state(out)["best_top1"] == rows[1]["val_top1"]


def test_checkpoints_without_validation_data_still_resume():
    """Checkpoints written before the validation identity have none: any validation data resumes them."""
    saved = {"classes": ["a"], "train_set": {"images": 2, "sha256": "x"}, "recipe": {"model": {"name": "m"}}}
    current = {**saved, "train_set": {"images": 2, "samples": "y", "sha256": "x"},
               "val_set": {"images": 6, "samples": "z"}}
    assert blocking_changes(saved, current) == []
    changed = {**current, "val_set": {"images": 12, "samples": "w"}}
    assert blocking_changes(current, changed) == ["validation data changed (6 -> 12 images; z -> w)"]


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_a_changed_training_set_is_refused_or_continued_on_request(data, tmp_path, change):
    first_run(data, tmp_path / "run")
    folder = data / "train" / "class_000"
    images = sorted(folder.glob("*.jpg"))
    if change == "grow":
        for i, image in enumerate(images[:8]):
            shutil.copy(image, folder / f"extra_{i}.jpg")
    else:
        for image in images[:8]:
            image.unlink()
    new = 56 if change == "grow" else 40
    refused = resumed(data, tmp_path / "run", expect=2)
    one_line_error(refused, "training set 48 images", f"-> {new} images", "checkpoint.allow_changes=true")
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1]  # nothing trained, nothing rewritten
    allowed = resumed(data, tmp_path / "run", "checkpoint.allow_changes=true")
    assert "continuing with changes" in allowed.stdout
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2] and "training set 48 images" in rows[1]["resumed_with_changes"][0]
    assert rows[1]["step"] == 2 * (new // 8)  # the schedule placed in the new steps per epoch
    assert "with changes: training set 48 images" in (tmp_path / "run" / "config.yaml").read_text()


def test_renamed_class_folders_are_refused(data, tmp_path):
    first_run(data, tmp_path / "run")
    for split in ("train", "val"):
        (data / split / "class_000").rename(data / split / "class_zzz")
    one_line_error(resumed(data, tmp_path / "run", expect=2), "class names (label 0: 'class_000' -> 'class_001')")


def test_a_model_with_the_same_keys_is_refused_before_loading(tmp_path):
    run_script(train_args(None, tmp_path, "model.name=resnest50", "train.epochs=1"))
    swapped = run_script(train_args(None, tmp_path, "model.name=resnest50_fast_2s1x64d", "train.epochs=2"), expect=2)
    one_line_error(swapped, "model.name resnest50 -> resnest50_fast_2s1x64d", "another output_dir")


def test_the_same_data_in_another_folder_resumes(data, tmp_path):
    first_run(data, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    result = resumed(moved, tmp_path / "run")
    assert f"data.root {data} -> {moved}" in result.stdout
    assert "train.epochs 1 -> 2: the schedule now ends at step 12 (was 6); lr at the next step" in result.stdout
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == [1, 2]
    assert "resumed_with_changes" not in json.dumps(metrics(tmp_path / "run"))


def samples_of_epoch(record: Path, epoch: int, steps=range(10**9)) -> list[int]:
    rows = [json.loads(line) for path in sorted(record.glob("rank*.jsonl")) for line in path.read_text().splitlines()]
    return [s for row in rows if row["epoch"] == epoch and row["step"] in steps for s in row["samples"]]


def test_another_seed_mid_epoch_is_refused_or_continues_the_epochs_order(data, tmp_path):
    """train.seed deals the order: a mid-epoch resume with another seed re-dealt the epoch (20 of 96 images
    twice, 20 never, nothing said). Refused with one line; with checkpoint.allow_changes=true the rest of
    the epoch keeps its order (every image once) and the change is logged old -> new."""
    out, first, rest = tmp_path / "run", tmp_path / "first", tmp_path / "rest"
    first.mkdir()
    rest.mkdir()
    run_script(train_args(data, out, "data.backend=torchvision", "train.epochs=1", "checkpoint.interval_steps=2",
                          "checkpoint.keep_last=9"), env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(first)))
    mid = [f"checkpoint.resume={out}/checkpoints/step-000000002.pt", "train.seed=7"]
    refused = resumed(data, out, *mid, expect=2)
    one_line_error(refused, "train.seed 0 -> 7 in the middle of an epoch", "checkpoint.allow_changes=true")
    allowed = run_script(train_args(data, out, "data.backend=torchvision", "train.epochs=2", *mid,
                                    "checkpoint.allow_changes=true", "train.mixup_alpha=0.5",
                                    "checkpoint.interval_steps=2", "checkpoint.keep_last=9"),
                         env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(rest)))
    said = allowed.stdout + allowed.stderr
    assert "changed since the checkpoint: train.seed 0 -> 7" in said, said[-3000:]
    assert "changed since the checkpoint: train.mixup_alpha" in said, said[-3000:]
    epoch = samples_of_epoch(first, 0, range(2)) + samples_of_epoch(rest, 0)
    assert sorted(epoch) == list(range(48))  # every image of the resumed epoch exactly once
    # resumed again inside that epoch (its step-4 checkpoint, written with seed 7): still seed 0's order
    again = tmp_path / "again"
    again.mkdir()
    run_script(train_args(data, out, "data.backend=torchvision", "train.epochs=2", "train.seed=7",
                          "train.mixup_alpha=0.5", f"checkpoint.resume={out}/checkpoints/step-000000004.pt"),
               env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(again)))
    epoch = samples_of_epoch(first, 0, range(2)) + samples_of_epoch(rest, 0, range(2, 4)) + samples_of_epoch(again, 0)
    assert sorted(epoch) == list(range(48))
