"""Weight EMA and BN statistics across ranks (averaging.py): the EMA's update rule and warm-up; a 2-process
run with EMA stopped mid-epoch and resumed ends bit-identical to the uninterrupted one (model and EMA); the
in-run evaluation of both equals evaluate.py's on the saved checkpoint (`--weights model|ema`). The same
EMA on 1, 2 and 4 processes and the BN statistics of `dist_bn: reduce` are in test_process_count.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from resnest_train.models import create_model
from resnest_train.recipe.averaging import WeightEma
from tests.conftest import ROOT, TORCHRUN, metrics, run_script, train_args


def model_after_a_step(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnest14", num_classes=4)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


def test_ema_decay_zero_is_the_model_and_the_rule_is_the_published_one():
    model = model_after_a_step()
    ema = WeightEma(create_model("resnest14", num_classes=4), 0.0, warmup=False, device=torch.device("cpu"))
    ema.update(model, 1)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key  # decay 0: exactly the model
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    changed = model_after_a_step(seed=1)
    decayed = WeightEma(model, 0.9, warmup=False, device=torch.device("cpu"))
    decayed.update(changed, 2)
    for key, value in changed.state_dict().items():
        expected = before[key] * 0.9 + value * 0.1 if value.is_floating_point() else value
        assert torch.allclose(decayed.state_dict()[key], expected, rtol=1e-6, atol=1e-6), key  # lerp's rounding


def test_ema_warmup_ramps_the_decay_to_its_value():
    ema = WeightEma(torch.nn.Linear(2, 2), 0.999, warmup=True, device=torch.device("cpu"))
    decays = [ema.decay_at(step) for step in (1, 10, 100, 10**6)]
    assert decays[0] == pytest.approx(1 - 2 ** (-2 / 3)) and decays == sorted(decays) and decays[-1] == 0.999


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_ema_run_resumed_mid_epoch_is_bit_identical_and_evaluates_the_same(image_root, tmp_path):
    extra = ["data.backend=torchvision", "train.epochs=2", "train.ema=0.8", "train.ema_warmup=true",
             "train.deterministic=true", "checkpoint.interval_steps=2", "checkpoint.keep_last=9",
             "train.global_batch=16"]
    two = [*TORCHRUN, "--standalone", "--nproc-per-node=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_script(train_args(image_root, whole, *extra), launcher=two)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step-000000002.pt", resumed / "checkpoints" / "last.pt")
    state = torch.load(resumed / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["batch"] == 2 and "ema" in state
    run_script(train_args(image_root, resumed, *extra), launcher=two)
    final = [torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
             for out in (whole, resumed)]
    for weights in ("model", "ema"):
        different = [k for k in final[0][weights] if not torch.equal(final[0][weights][k], final[1][weights][k])]
        assert different == [], (weights, different)
    # the in-run evaluation (model and EMA, BN statistics reduced over the ranks) is evaluate.py's on last.pt
    row = metrics(whole)[-1]
    for weights, key in (("model", "val_top1"), ("ema", "val_top1_ema")):
        run_script([str(ROOT / "evaluate.py"), "--config", str(whole / "config.yaml"), "--checkpoint",
                    str(whole / "checkpoints" / "last.pt"), "--weights", weights, "--output",
                    str(tmp_path / f"{weights}.json")])
        result = json.loads((tmp_path / f"{weights}.json").read_text())["results"][0]
        assert result["top1"] == row[key] and result["num_images"] == row["val_images"], (weights, result, row)


def test_saved_buffers_fit_a_model_with_another_dropblock_probability():
    """Each rank's saved buffers held DropBlock's non-persistent probability: resuming with model.dropblock_prob
    changed from 0 failed with a KeyError traceback on every rank."""
    from resnest_train.recipe.averaging import load_rank_buffers, rank_buffers
    without = create_model("resnest14", num_classes=4, dropblock_prob=0.0)
    with_dropblock = create_model("resnest14", num_classes=4, dropblock_prob=0.1)
    load_rank_buffers(with_dropblock, rank_buffers(without))
    load_rank_buffers(without, rank_buffers(with_dropblock))
    assert rank_buffers(without).keys() == rank_buffers(with_dropblock).keys()
