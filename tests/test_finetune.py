"""Fine-tuning released weights on one's own classes through the trainer: a timm state dict with 1000
classes (.safetensors and .pth) into a 5-class model; the trunk loads, the classifier starts fresh and is
said so, `model.freeze` keeps the trunk (weights and BN statistics) exactly as published."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from resnest_train.config_yaml import load_config
from resnest_train.run.wrapping import build_model
from tests.conftest import ROOT, run_script, train_args

TRUNK = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    torch.manual_seed(0)
    state = timm.create_model("resnest14d", num_classes=1000).state_dict()
    folder = tmp_path_factory.mktemp("published")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "resnest14d.safetensors")
    torch.save(state, folder / "resnest14d.pth")
    return folder, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_trunk_starts_as_published_classifier_fresh(published, suffix):
    folder, state = published
    config = load_config(ROOT / "configs" / "finetune.yaml", ["model.name=resnest14", "model.num_classes=5",
                                                              f"model.pretrained={folder / ('resnest14d' + suffix)}"])
    model = build_model(config.model, pretrained=True)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert ours["fc.weight"].shape == (5, 2048)


@pytest.mark.slow
def test_finetune_run_logs_the_fresh_head_and_keeps_a_frozen_trunk(published, image_root, tmp_path):
    folder, state = published
    result = run_script(train_args(image_root, tmp_path, "model.num_classes=5",
                                   f"model.pretrained={folder / 'resnest14d.safetensors'}", "train.epochs=1",
                                   f"model.freeze=[{','.join(TRUNK)}]", "optim.head_lr_scale=10",
                                   "model.dropblock_prob=0.0", "train.mixup_alpha=0"))
    assert "loaded" in result.stdout and "without fc.weight, fc.bias: the classifier for 5 classes starts fresh" \
        in result.stdout
    trained = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(trained[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert trained["fc.weight"].shape == (5, 2048)
