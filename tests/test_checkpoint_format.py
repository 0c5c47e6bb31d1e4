"""The checkpoint format (checkpoint/format.py): one dataclass that writes `format: 2` and reads what every
earlier release wrote; a checkpoint written by the code of 620cf1d (format 1, made here by that code from
this repository's history) resumes to the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnest_train.checkpoint.format import FORMAT, Checkpoint, FormatError, RankPart, weights_of
from tests.conftest import ROOT, script_env
from tests.test_resume import (  # noqa: F401 - fixtures
    assert_bit_identical,
    final_weights,
    reference,
    reference_run,
    run_train,
    tiny_args,
    wait_for,
)

FORMAT_1_COMMIT = "620cf1d"  # the last release that wrote format 1


def test_a_checkpoint_round_trips_and_says_its_format():
    checkpoint = Checkpoint(model={"w": torch.ones(2)}, optimizer={"state": {}}, epoch=1, epoch_step=3, step=13,
                            ranks=[RankPart({"bn": torch.zeros(1)}), RankPart({"bn": torch.ones(1)})],
                            config={"train": {"seed": 7}}, ema={"w": torch.ones(2)})
    state = checkpoint.to_state()
    assert state["format"] == FORMAT and state["batch"] == 3 and "epoch_step" not in state
    again = Checkpoint.from_state(state)
    assert again.epoch_step == 3 and again.ranks[1].buffers["bn"].item() == 1 and again.epoch_seed is None
    assert weights_of(state)["w"].sum() == 2 and weights_of(state, "ema") is not None


def test_format_1_is_read_and_its_dead_fields_set_aside():
    """620cf1d's files: no `format`, each rank's `data` position (never read), no `epoch_seed` in the oldest."""
    state = {"model": {}, "optimizer": {}, "epoch": 2, "batch": 0, "step": 20, "config": {"train": {"seed": 5}},
             "ranks": [{"data": {"order": 1, "epoch": 2, "step": 0}, "buffers": {}, "rng": {"torch": b""}}]}
    checkpoint = Checkpoint.from_state(state)
    assert checkpoint.epoch_seed == 5 and checkpoint.ranks[0].rng == {"torch": b""}
    assert "data" not in checkpoint.ranks[0].to_state() and "format" not in state


def test_the_order_an_epoch_was_dealt_with_is_kept_and_older_files_mean_global():
    """`epoch_shuffle` (data/order.py's record): written and read back; a file without it (every file before
    data.shuffle existed, format 1 and 2) was dealt a global permutation."""
    shards = {"shuffle": "shards", "window": 8}
    state = Checkpoint(model={}, optimizer={}, epoch=1, epoch_step=2, step=5, ranks=[], epoch_shuffle=shards).to_state()
    assert state["epoch_shuffle"] == shards and Checkpoint.from_state(state).epoch_shuffle == shards
    del state["epoch_shuffle"]
    assert Checkpoint.from_state(state).epoch_shuffle == {"shuffle": "global"}
    format_1 = {"model": {}, "optimizer": {}, "epoch": 2, "batch": 1, "step": 21, "ranks": [{}],
                "config": {"data": {"shuffle": "shards"}}}  # the key existed in configs before it dealt anything
    assert Checkpoint.from_state(format_1).epoch_shuffle == {"shuffle": "global"}


@pytest.mark.parametrize("state,needle", [({"model": {}}, "no optimizer, epoch, batch, step, ranks"),
                                          ([1, 2], "a list, not a dict")])
def test_what_is_not_a_checkpoint_is_named(state, needle):
    with pytest.raises(FormatError, match=needle):
        Checkpoint.from_state(state)


def test_a_newer_format_is_refused():
    state = Checkpoint(model={}, optimizer={}, epoch=0, epoch_step=0, step=0, ranks=[]).to_state()
    state["format"] = FORMAT + 1
    with pytest.raises(FormatError, match="newer than this trainer reads"):
        Checkpoint.from_state(state)


@pytest.fixture(scope="module")
def format_1_tree(tmp_path_factory) -> Path:
    """The code of 620cf1d, checked out from this repository's history."""
    tree = tmp_path_factory.mktemp("format1") / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), FORMAT_1_COMMIT], check=True,
                   capture_output=True)
    yield tree
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


@pytest.mark.slow
def test_a_format_1_checkpoint_resumes_bit_identical(image_root, tmp_path, reference, format_1_tree):  # noqa: F811
    out = tmp_path / "run"
    args = tiny_args(image_root, out, "checkpoint.interval_steps=1")
    old = [str(format_1_tree / Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg for arg in args]
    process = subprocess.Popen([sys.executable, *old], cwd=format_1_tree, env=script_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoints" / "step-000000002.pt", process)
    process.kill()
    process.wait()
    written = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert "format" not in written and written["batch"] > 0 and "data" in written["ranks"][0]  # format 1, mid-epoch
    result = run_train(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["format"] == FORMAT
    assert_bit_identical(final_weights(out), reference)


@pytest.mark.slow
def test_the_released_recipe_trains_the_same_weights_as_620cf1d(image_root, tmp_path, reference,  # noqa: F811
                                                                 format_1_tree):
    """The recipe options added since (optimizers, schedules, mixing, losses, crops, repeats, resizing) leave
    the released recipe as it was: the same run on the code of 620cf1d ends with bit-identical weights."""
    out = tmp_path / "old"
    args = tiny_args(image_root, out)
    old = [str(format_1_tree / Path(arg).relative_to(ROOT)) if arg.startswith(str(ROOT)) else arg for arg in args]
    result = subprocess.run([sys.executable, *old], cwd=format_1_tree, env=script_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bit_identical(final_weights(out), reference)
