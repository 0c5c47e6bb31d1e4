"""The strict config: inheritance, overrides, coercion, and every user-error path of the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import Config, ConfigError
from resnest_train.config_yaml import load_config, parse_override, to_dict
from resnest_train.data import build_data_plan
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_the_resnest50_recipe():
    config = load_config(CONFIGS / "resnest50.yaml")
    assert config.model.name == "resnest50" and config.model.dropblock_prob == 0.1
    assert config.optim.lr == 0.1 and config.optim.nesterov and config.optim.weight_decay == 1e-4
    assert config.train.epochs == 270 and config.train.mixup_alpha == 0.2 and config.train.label_smoothing == 0.1
    assert config.schedule.warmup_epochs == 5 and config.data.autoaugment == "imagenet"
    assert config.data.autoaugment_on == "image"


def test_dataclass_defaults_equal_base_yaml():
    """Defaults live in one place: configs/base.yaml holds exactly the dataclasses' defaults."""
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert base == to_dict(Config())


def eval_resize(config) -> int:
    return build_data_plan(config, DistInfo(0, 0, 1, torch.device("cpu"))).val_resize_size


@pytest.mark.parametrize("name,crop,val_crop,resize,interp,dropout", [
    ("resnest50", 224, 224, 256, "bilinear", 0.0),
    ("resnest101", 224, 256, 293, "bilinear", 0.0),
    ("resnest200", 256, 320, 352, "bicubic", 0.2),
    ("resnest269", 320, 416, 448, "bicubic", 0.2)])
def test_model_configs_hold_the_released_recipe(name, crop, val_crop, resize, interp, dropout):
    """Evaluation sizes of the official verify scripts and timm: 256 / 293 / 352 / 448."""
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (config.model.name, config.data.crop_size, config.data.val_crop_size) == (name, crop, val_crop)
    assert (eval_resize(config), config.data.interpolation, config.model.dropout) == (resize, interp, dropout)
    assert config.train.epochs == 270 and config.optim.lr == 0.1


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = _write(tmp_path / "dup.yaml", "optim:\n  lr: 0.2\ntrain:\n  epochs: 3\noptim:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'optim' in .*dup.yaml line 5"):
        load_config(path)
    nested = _write(tmp_path / "dup2.yaml", "optim:\n  lr: 0.2\n  lr: 0.3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' in .*dup2.yaml line 3"):
        load_config(nested)


@pytest.mark.parametrize("override", ["model=", "model=resnest50", "data=[1, 2]"])
def test_section_override_must_be_a_mapping(override):
    with pytest.raises(ConfigError, match="is a section"):
        load_config(CONFIGS / "resnest50.yaml", [override])
    assert load_config(CONFIGS / "resnest50.yaml", ["model={name: resnest14}"]).model.name == "resnest14"


def test_base_inheritance_list_later_wins(tmp_path):
    _write(tmp_path / "a.yaml", "train: {epochs: 3, seed: 1}\n")
    _write(tmp_path / "b.yaml", "train: {epochs: 4}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _write(sub / "c.yaml", "base: [../a.yaml, ../b.yaml]\ntrain: {batch_size: 8}\n")
    config = load_config(path)
    assert (config.train.epochs, config.train.seed, config.train.batch_size) == (4, 1, 8)


def test_overrides_parse_yaml_values():
    config = load_config(CONFIGS / "resnest50.yaml",
                         ["optim.lr=0.2", "data.rrc_scale=[0.35,1.0]", "model.pretrained=null", "train.amp=none"])
    assert config.optim.lr == 0.2 and config.data.rrc_scale == (0.35, 1.0)
    assert config.model.pretrained is None and config.train.amp == "none"
    assert parse_override("a.b=c") == {"a": {"b": "c"}}


def test_coercion_of_yaml_traps(tmp_path):
    path = _write(tmp_path / "c.yaml", "optim: {lr: 5e-4, weight_decay: 1e-5}\ntrain: {epochs: 10.0}\n")
    config = load_config(path)
    assert config.optim.lr == 5e-4 and config.optim.weight_decay == 1e-5 and config.train.epochs == 10


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS / "resnest200.yaml")
    path = _write(tmp_path / "resolved.yaml", yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=0.1"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["train.epochs=abc"], "'train.epochs' must be an integer"),
    (["data.backend=ffcv"], "'data.backend' must be one of"),
    (["train.deterministic=yes please"], "'train.deterministic' must be true or false"),
    (["train.channels_last=1"], "'train.channels_last' must be true or false"),
    (["optim.lr=-1"], "'optim.lr' must be in"),
    (["model.name=resnest51"], "did you mean 'resnest50'"),
    (["data.rrc_scale=[0.9,0.1]"], "'data.rrc_scale'"),
    (["train.batch_size=7"], "even"),
    (["train.seed=18446744073709551617"], "'train.seed' must be in"),
    (["model.num_classes=100000000"], "'model.num_classes' must be in"),
    (["data.crop_size=100000"], "'data.crop_size' must be in"),
    (["data.val_resize_ratio=0.001"], "'data.val_resize_ratio' must be in"),
    (["data.val_resize_size=100"], "'data.val_resize_size' must be in"),
    (["train.device=tpu"], "'train.device' must be one of"),
    (["data.autoaugment_on=batch"], "'data.autoaugment_on' must be one of"),
    (["train.cutmix_alpha=-1"], "'train.cutmix_alpha' must be in"),
    (["train.mix_prob=1.5"], "'train.mix_prob' must be in"),
    (["train.mix_switch_prob=-0.1"], "'train.mix_switch_prob' must be in"),
    (["train.loss=focal"], "'train.loss' must be one of ce, bce"),
    (["train.loss=bce", "train.bce_target_threshold=2"], "'train.bce_target_threshold' must be in"),
    (["train.loss=bce", "train.label_smoothing=1.0"], "'train.label_smoothing' must be below 1 with train.loss=bce"),
    (["train.mixup_alpha=0", "train.cutmix_alpha=1", "train.batch_size=7"], "even with mixup or CutMix"),
    (["model.drop_path=1.0"], "'model.drop_path' must be in [0.0, 1.0)"),
    (["model.drop_pat=0.1"], "did you mean 'model.drop_path'"),
    (["optim.name=adam"], "'optim.name' must be one of sgd, lars, lamb, adamw, got 'adam'"),
    (["optim.betas=[0.9]"], "'optim.betas' must be a list of 2 values"),
    (["optim.betas=[0.9, 1.0]"], "'optim.betas' must be two numbers in [0, 1), got [0.9, 1.0]"),
    (["optim.eps=0"], "'optim.eps' must be in (0.0, 1.0]"),
    (["optim.eps=abc"], "'optim.eps' must be a number"),
    (["optim.trust_coeff=0"], "'optim.trust_coeff' must be in (0.0, inf]"),
    (["optim.clip_grad=-1"], "'optim.clip_grad' must be in [0.0, inf]"),
    (["optim.momentum=0"], "'optim.nesterov' needs optim.momentum > 0 with optim.name=sgd"),
    (["optim.name=lars", "optim.momentum=0"], "'optim.nesterov' needs optim.momentum > 0 with optim.name=lars"),
    (["optim.trust_coef=0.01"], "did you mean 'optim.trust_coeff'"),
    (["schedule.name=exponential"], "'schedule.name' must be one of cosine, step, poly, linear"),
    (["schedule.decay_epochs=0"], "'schedule.decay_epochs' must be in (0.0, inf]"),
    (["schedule.decay_rate=1.5"], "'schedule.decay_rate' must be in (0.0, 1.0]"),
    (["schedule.power=0"], "'schedule.power' must be in (0.0, 100.0]"),
    (["data.crop=center"], "'data.crop' must be one of random_resized, inception, efficientnet, got 'center'"),
    (["data.crop_min_area=0"], "'data.crop_min_area' must be in (0.0, 1.0], got 0.0"),
    (["data.crop_min_area=1.5"], "'data.crop_min_area' must be in (0.0, 1.0]"),
    (["train.repeated_augment=0"], "'train.repeated_augment' must be in [1, 64], got 0"),
    (["train.repeated_augment=2.5"], "'train.repeated_augment' must be an integer"),
    (["train.repeated_aug=3"], "did you mean 'train.repeated_augment'"),
])
def test_bad_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "resnest50.yaml", overrides)
    assert message in str(info.value)


def test_optimizer_and_schedule_keys_load():
    config = load_config(CONFIGS / "resnest50.yaml", [
        "optim.name=lamb", "optim.betas=[0.9, 0.95]", "optim.eps=1e-6", "optim.clip_grad=1", "optim.momentum=0",
        "schedule.name=step", "schedule.decay_epochs=2.4", "schedule.decay_rate=0.97"])
    assert config.optim.betas == (0.9, 0.95) and config.optim.eps == 1e-6 and config.optim.clip_grad == 1.0
    assert (config.schedule.name, config.schedule.decay_epochs, config.schedule.decay_rate) == ("step", 2.4, 0.97)
    defaults = load_config(CONFIGS / "resnest50.yaml")
    assert defaults.optim.eps is None and defaults.optim.clip_grad is None and defaults.schedule.name == "cosine"


def test_unknown_key_in_yaml_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "base: " + str(CONFIGS / "base.yaml") + "\nmodel:\n  radixx: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.radixx'"):
        load_config(path)


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--config", "configs/resnest50.yaml", "optim.lrr=0.1"], "optim.lr"),
    (["--config", "configs/resnest50.yaml", "train.epochs=abc"], "train.epochs"),
    (["--config", "configs/nope.yaml"], "configs/nope.yaml"),
    (["--config", "configs/resnest50.yaml", "data.backend=ffcv"], "data.backend"),
    (["--config", "configs/resnest50.yaml", "optim.name=lars", "optim.trust_coeff=-1"], "optim.trust_coeff"),
    (["--config", "configs/resnest50.yaml", "data.root=/does/not/exist"], "/does/not/exist"),
])
def test_cli_errors_exit_2_with_one_line(args, needle):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_key_in_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", f"base: {CONFIGS / 'base.yaml'}\nmodel:\n  nam: resnest50\n")
    result = _cli("--config", str(path), "--print-config")
    assert result.returncode == 2 and "model.nam" in result.stderr and "model.name" in result.stderr


def test_print_config_has_every_key():
    result = _cli("--config", "configs/resnest50.yaml", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed == to_dict(load_config(CONFIGS / "resnest50.yaml"))
    assert set(printed) == {"output_dir", "model", "data", "optim", "schedule", "train", "checkpoint"}
    big = _cli("--config", "configs/resnest200.yaml", "--print-config")
    assert yaml.safe_load(big.stdout)["data"]["val_resize_size"] == 352
