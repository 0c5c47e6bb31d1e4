"""`load_pretrained`: fine-tuning into a new classifier, the file formats people have (safetensors, timm's
training checkpoints, exports without BN counters), and one-line messages for files that are not weights."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

from resnest_train.models import create_model, load_pretrained
from resnest_train.models.pretrained import WeightsFileError, WeightsMismatchError
from tests.test_models import _randomise


@pytest.fixture(scope="module")
def timm_state():
    reference = timm.create_model("resnest14d", num_classes=1000)
    _randomise(reference)
    return {k: v.contiguous() for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_fine_tune_keeps_the_fresh_classifier(timm_state, tmp_path, suffix):
    path = tmp_path / f"resnest14d{suffix}"
    if suffix == ".safetensors":
        save_file(timm_state, str(path))
    else:
        torch.save(timm_state, path)
    model = create_model("resnest14", num_classes=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    assert load_pretrained(model, path, new_head=True) == ["fc.weight", "fc.bias"]
    loaded = model.state_dict()
    for key, value in timm_state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert all(torch.equal(loaded[k], v) for k, v in fresh.items())
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch.*fc\.weight \(1000, 2048\) vs \(5, 2048\)"):
        load_pretrained(create_model("resnest14", num_classes=5), path)


def test_fine_tune_with_the_same_classes_loads_everything(timm_state, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(timm_state, str(path))
    model = create_model("resnest14")
    assert load_pretrained(model, path, new_head=True) == []
    assert torch.equal(model.fc.weight, timm_state["fc.weight"])


def test_fine_tune_still_refuses_another_trunk(tmp_path):
    path = tmp_path / "r50d.pth"
    torch.save(create_model("resnet50d", num_classes=10).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="missing keys: .*conv2.conv.weight"):
        load_pretrained(create_model("resnest50", num_classes=5), path, new_head=True)


def test_missing_num_batches_tracked_loads(timm_state, tmp_path):
    path = tmp_path / "export.pth"
    torch.save({k: v for k, v in timm_state.items() if not k.endswith("num_batches_tracked")}, path)
    model = create_model("resnest14")
    assert load_pretrained(model, path) == []
    assert torch.equal(model.layer1[0].bn1.running_var, timm_state["layer1.0.bn1.running_var"])
    partial = {k: v for k, v in timm_state.items() if k != "layer1.0.bn1.running_var"}
    torch.save(partial, path)
    with pytest.raises(WeightsMismatchError, match=r"missing keys: layer1\.0\.bn1\.running_var$"):
        load_pretrained(create_model("resnest14"), path)


def test_timm_training_checkpoint_loads(timm_state, tmp_path):
    path = tmp_path / "checkpoint-10.pth.tar"
    args = argparse.Namespace(model="resnest14d", lr=0.1, epochs=270, mixup=0.2, input_size=None)
    torch.save({"epoch": 10, "arch": "resnest14d", "state_dict": timm_state, "args": args, "version": 2}, path)
    model = create_model("resnest14")
    load_pretrained(model, path)
    assert torch.equal(model.conv1[0].weight, timm_state["conv1.0.weight"])


class _Unlisted:
    """Not a type a weights-only load accepts."""


def _message(path) -> str:
    with pytest.raises(WeightsMismatchError) as info:
        load_pretrained(create_model("resnest14"), path)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, WeightsFileError)
    return message


def test_one_line_messages(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert _message(empty) == f"{empty} is empty (0 bytes)"
    text = tmp_path / "README.pth"
    text.write_text("Download the weights from the release page.\n")
    assert "is a text file" in _message(text)
    folder = tmp_path / "weights.pth"
    folder.mkdir()
    assert _message(folder) == f"{folder} is a directory, not a weights file"
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": _Unlisted()}, pickled)
    message = _message(pickled)
    assert "_Unlisted" in message and "weights_only" not in message
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 16)
    assert "safetensors" in _message(broken)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_pretrained(create_model("resnest14"), tmp_path / "absent.pth")
