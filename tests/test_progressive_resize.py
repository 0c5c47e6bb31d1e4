"""Progressive resizing (data.progressive_resize): the size of each epoch (FFCV's rule), its checks, every
backend delivering the epoch's size from one pipeline, unchanged draws, metrics, and a bit-exact resume in
the middle of a ramp epoch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnest_train.config import ConfigError
from resnest_train.config_yaml import from_dict
from resnest_train.data.draws import draw_batch
from resnest_train.data.index import load_index
from resnest_train.data.plan import progressive_size
from resnest_train.data.synthetic import build_synthetic_train
from resnest_train.data.torchvision import build_torch_train
from tests.conftest import ROOT, make_order, make_plan, metrics, run_script, script_env, train_args
from tests.test_resume import assert_bit_identical, final_weights, wait_for

RAMP = [32, 96, 1, 3]  # epochs 1, 2, 3 (indices 0, 1, 2) at 32, 64, 96 px


def ffcv_resolution(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int) -> int:
    """FFCV's `get_resolution` (libffcv/ffcv-imagenet, train_imagenet.py), epochs counted from 0."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


def test_size_ramps_linearly_between_the_epochs():
    assert [progressive_size(tuple(RAMP), 224, epoch) for epoch in range(5)] == [32, 64, 96, 96, 96]
    # epochs 1..2 at the start size, 8.. at the end size; between, 176, 192, 208, 224, 240 rounded to multiples
    # of 32 (halves to even: 5.5 -> 6, 6.5 -> 6, 7.5 -> 8)
    sizes = [progressive_size((160, 256, 2, 8), 224, epoch) for epoch in range(10)]
    assert sizes == [160, 160, 192, 192, 192, 224, 256, 256, 256, 256]
    assert [progressive_size(None, 224, epoch) for epoch in range(3)] == [224, 224, 224]  # off: data.crop_size
    assert [progressive_size((128, 64, 1, 3), 224, epoch) for epoch in range(3)] == [128, 96, 64]  # downwards too


def test_size_rounds_to_multiples_of_32_half_to_even():
    # 64 -> 128 over epochs 1..5: 80 and 112 are halfway; numpy rounds 2.5 -> 2 and 3.5 -> 4, as FFCV does
    assert [progressive_size((64, 128, 1, 5), 224, epoch) for epoch in range(5)] == [64, 64, 96, 128, 128]
    assert [progressive_size((32, 64, 1, 3), 224, epoch) for epoch in range(3)] == [32, 64, 64]


@pytest.mark.parametrize("ramp", [(160, 192, 66, 77), (160, 192, 11, 14), (128, 256, 1, 40), (96, 480, 3, 90)])
def test_size_is_ffcvs_rule_with_epochs_counted_from_1(ramp):
    start_size, end_size, start_epoch, end_epoch = ramp
    for epoch in range(end_epoch + 3):
        expected = ffcv_resolution(epoch, start_size, end_size, start_epoch - 1, end_epoch - 1)
        assert progressive_size(ramp, 224, epoch) == expected, epoch


@pytest.mark.parametrize("value,message", [
    ([32, 100, 1, 3], "'data.progressive_resize' sizes must be multiples of 32 from 32 to 4096, got [32, 100, 1, 3]"),
    ([0, 64, 1, 3], "'data.progressive_resize' sizes must be multiples of 32"),
    ([32, 64, 3, 3], "'data.progressive_resize' epochs must satisfy 0 <= start_epoch < end_epoch, got [32, 64, 3, 3]"),
    ([32, 64, -1, 3], "epochs must satisfy 0 <= start_epoch < end_epoch"),
    ([32, 64, 1, 11], "'data.progressive_resize' end_epoch 11 is past train.epochs=10"),
    ([32, 64, 1], "'data.progressive_resize' must be a list of 4 values"),
    ([32, 64.5, 1, 3], "'data.progressive_resize[1]' must be an integer"),
])
def test_config_errors_name_the_key(value, message):
    with pytest.raises(ConfigError) as error:
        from_dict({"data": {"progressive_resize": value}, "train": {"epochs": 10}})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_error_is_one_line(tmp_path):
    result = run_script([str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--print-config",
                         "data.progressive_resize=[64,128,5,20]"], expect=2)
    assert result.stderr == "error: 'data.progressive_resize' end_epoch 20 is past train.epochs=12\n"


def test_draws_do_not_depend_on_the_size(image_root):
    """The crop window is in the image's pixels: the same draws at any output size. RandAugment's argument
    on the crop is computed for the epoch's size, as for a run whose crop_size is that size."""
    sizes = [(40, 40), (30, 50), (61, 83)]
    for epoch in range(3):
        ramped = draw_batch(make_plan(image_root, progressive_resize=RAMP), epoch, [0, 5, 9], sizes)
        plain = draw_batch(make_plan(image_root), epoch, [0, 5, 9], sizes)
        assert [ramped.row(i) for i in range(3)] == [plain.row(i) for i in range(3)]
    rand = dict(autoaugment="rand-m9-n2-mstd0.5", autoaugment_on="crop")
    for epoch, size in enumerate((32, 64, 96)):
        ramped = draw_batch(make_plan(image_root, progressive_resize=RAMP, **rand), epoch, [0, 5, 9], sizes)
        fixed = draw_batch(make_plan(image_root, crop_size=size, **rand), epoch, [0, 5, 9], sizes)
        assert [ramped.row(i) for i in range(3)] == [fixed.row(i) for i in range(3)]


def epoch_images(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([images for images, _ in loader])


def assert_epochs_at_their_size(build, root) -> None:
    """Each epoch's images have the epoch's size and equal those of a run whose crop_size is that size."""
    index = load_index(root)
    loader = build(make_plan(root, autoaugment="none", workers=0, progressive_resize=RAMP), index.train)
    for epoch, size in enumerate((32, 64, 96)):
        images = epoch_images(loader, epoch)
        assert images.shape == (48, 3, size, size), epoch
        fixed = build(make_plan(root, autoaugment="none", workers=0, crop_size=size), index.train)
        assert torch.equal(images, epoch_images(fixed, epoch)), epoch
    loader.close()


@pytest.mark.dali
def test_dali_delivers_each_epochs_size_from_one_pipeline(image_root):
    from resnest_train.data.dali_train import build_dali_train
    built = []

    def build(plan, samples):
        built.append(build_dali_train(plan, samples, make_order(48, 8)))
        return built[-1]

    assert_epochs_at_their_size(build, image_root)
    ramped = built[0]
    assert ramped.feed.names[-1] == "size" and "size" not in built[1].feed.names  # fed only with the ramp on
    pipe = ramped.pipe
    assert epoch_images(ramped, 0).shape[-1] == 32 and ramped.pipe is pipe  # back to epoch 1: never rebuilt


def test_torchvision_delivers_each_epochs_size(image_root):
    assert_epochs_at_their_size(
        lambda plan, samples: build_torch_train(plan, samples, make_order(48, 8)), image_root)


def test_torchvision_with_workers_delivers_each_epochs_size(image_root):
    """The (epoch, sample) key reaches persistent DataLoader workers: no rebuild, the new size each epoch."""
    loader = build_torch_train(make_plan(image_root, autoaugment="none", progressive_resize=RAMP, workers=1),
                               load_index(image_root).train, make_order(48, 8))
    assert [epoch_images(loader, epoch).shape[-1] for epoch in (0, 1, 2, 1)] == [32, 64, 96, 64]
    loader.close()


def test_synthetic_delivers_each_epochs_size():
    plan = make_plan(".", backend="synthetic", synthetic_size=16, progressive_resize=RAMP)
    loader = build_synthetic_train(plan, None, make_order(16, 8))
    assert [epoch_images(loader, epoch).shape[-1] for epoch in (0, 1, 2)] == [32, 64, 96]


def tiny_args(root, out, *extra: str) -> list[str]:
    return train_args(root, out, "train.epochs=3", "train.deterministic=true", "checkpoint.keep_last=5",
                      "schedule.warmup_epochs=0.5", f"data.progressive_resize=[{','.join(map(str, RAMP))}]", *extra)


@pytest.mark.slow
def test_kill_inside_the_ramp_resumes_bit_identical(image_root, tmp_path):
    """Killed after a checkpoint in the middle of epoch 2 (64 px), resumed: the weights of the uninterrupted
    run, bit for bit; metrics.jsonl and TensorBoard record each epoch's size."""
    reference = tmp_path / "reference"
    run_script(tiny_args(image_root, reference))
    assert [row["train_size"] for row in metrics(reference)] == [32, 64, 96]
    events = EventAccumulator(str(reference / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/size")] == [(6, 32), (12, 64), (18, 96)]
    out = tmp_path / "killed"
    args = tiny_args(image_root, out, "checkpoint.interval_steps=2")
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoints" / "step-000000008.pt", process)  # epoch 2 (6 steps an epoch), step 2 of 6
    process.kill()
    process.wait()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 0 < state["batch"] < 6  # inside the ramp epoch, mid-epoch
    resumed = run_script(args)
    assert "resuming from" in resumed.stdout
    assert_bit_identical(final_weights(out), final_weights(reference))
    assert [row["train_size"] for row in metrics(out)] == [32, 64, 96]
