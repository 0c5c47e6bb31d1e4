"""A run with CutMix and mixup (switching per micro-batch), the binary cross-entropy loss and drop path trains,
and, killed after a mid-epoch checkpoint, resumes to weights bit-identical to the uninterrupted run's: every
draw of these options comes from (seed, step, micro-batch), none from generator state a checkpoint would
have to carry (CPU, train.deterministic=true, torchvision backend)."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.conftest import metrics
from tests.test_resume import (
    assert_bit_identical,
    final_weights,
    kill_after_step_2_and_resume,
    run_train,
    tiny_args,
)

pytestmark = pytest.mark.slow

# data.workers=1: the DataLoader worker outlives the trainer's kill -9 by a few seconds, without its lock.
MIXES = ["data.backend=torchvision", "data.workers=1", "train.cutmix_alpha=1.0", "train.mixup_alpha=0.1",
         "train.loss=bce", "model.drop_path=0.05",
         "train.batch_size=4", "train.global_batch=8"]  # 2 micro-batches per step, each with its own draws


def test_mixes_train_and_resume_mid_epoch_bit_identical(image_root, tmp_path_factory):
    reference = tmp_path_factory.mktemp("mixes_reference")
    done = run_train(tiny_args(image_root, reference, *MIXES))
    assert done.returncode == 0, done.stdout + done.stderr
    resolved = yaml.safe_load((reference / "config.yaml").read_text())
    assert resolved["train"]["loss"] == "bce" and resolved["train"]["cutmix_alpha"] == 1.0
    assert resolved["model"]["drop_path"] == 0.05
    losses = [row["train_loss"] for row in metrics(reference)]
    # binary cross-entropy per class starts near ln 2 (0.69); 4-class cross-entropy would start near ln 4
    assert len(losses) == 2 and all(math.isfinite(loss) and loss < 1.0 for loss in losses), losses

    out = tmp_path_factory.mktemp("mixes_resumed")
    args = tiny_args(image_root, out, *MIXES, "checkpoint.interval_steps=1")
    kill_after_step_2_and_resume(args, out)
    assert_bit_identical(final_weights(out), final_weights(reference))
