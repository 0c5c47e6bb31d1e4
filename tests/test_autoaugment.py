"""AutoAugment's ImageNet policy: the paper's table, Gluon's magnitudes, and the same image from the PIL ops
(torchvision backend, DALI CPU host op) and from the DALI graph's ops (run here on the CPU; on the GPU too
where one is present)."""

from __future__ import annotations

import itertools
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import AutoAugment as TorchvisionAutoAugment
from torchvision.transforms import AutoAugmentPolicy

from resnest_train.data.autoaugment import (
    GLUON_POLICY,
    IMAGENET_POLICY,
    NUM_LEVELS,
    OPS,
    SIGNED_OPS,
    AutoAugment,
    apply_op,
    apply_sub_policy,
    magnitude,
    resolve,
)

# Most of the module builds DALI graphs (at import too): all of it skips where DALI cannot be imported.
pytest.importorskip("nvidia.dali", reason="DALI cannot be imported")

from nvidia.dali import fn, pipeline_def
from nvidia.dali.auto_aug.core import signed_bin

from resnest_train.data.dali_autoaugment import AUGMENTATIONS, dali_auto_augment, dali_policy
from resnest_train.data.dali_cpu import HostAutoAugment

_TORCHVISION_NAMES = {"ShearX": "shear_x", "ShearY": "shear_y", "Rotate": "rotate", "Solarize": "solarize",
                      "Posterize": "posterize", "Color": "color", "Contrast": "contrast", "Brightness": "brightness",
                      "Sharpness": "sharpness", "AutoContrast": "auto_contrast", "Equalize": "equalize",
                      "Invert": "invert"}
# Warps are nearest-neighbour: where a sample lands exactly between two pixels, PIL (float64) and DALI
# (float32) may pick either, which shifts a few rows or arcs by a pixel. Equalize's LUT is DALI's GPU kernel's
# (float64, equalize/lut.cu); its CPU kernel (OpenCV's, float32) can round an exact tie the other way, by one
# grey level. Every other op is exact.
_MAX_CHANGED_PIXELS = 0.01
GPU = pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def structured(height: int = 41, width: int = 47, seed: int = 0) -> np.ndarray:
    """Colour gradients, texture, a low-contrast band, and pixels clipped at 15 and 235 (so auto-contrast
    stretches and equalize meets a crowded lowest bin); odd sizes put the centre between pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 110 * np.sin(x / 13 + c) * np.cos(y / 19 - c) for c in range(3)], axis=-1)
    image = np.clip(base + rng.normal(0, 20, base.shape), 15, 235)
    image[:, :9] = image[:, :9] * 0.4 + 70
    return image.astype(np.uint8)


def assert_same_image(ours: np.ndarray, reference: np.ndarray, op: str, level: int):
    ours, reference = np.asarray(ours).astype(np.int16), np.asarray(reference).astype(np.int16)
    assert ours.shape == reference.shape
    changed = (ours != reference).any(axis=-1).mean()
    assert changed <= (_MAX_CHANGED_PIXELS if op in SIGNED_OPS or op == "equalize" else 0), (op, level, changed)
    if op == "equalize":
        assert np.abs(ours - reference).max() <= 1, (op, level)


@pytest.fixture
def autograph_tmp(tmp_path, monkeypatch):
    """DALI's conditionals write autograph modules to the temp dir (FACTS.md): keep them in tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_table_is_the_papers():
    """torchvision's IMAGENET table is the paper's; it leaves the unused levels of the magnitude-free ops
    out. Gluon's differs in one level."""
    policies = TorchvisionAutoAugment(AutoAugmentPolicy.IMAGENET)._get_policies(AutoAugmentPolicy.IMAGENET)
    assert len(IMAGENET_POLICY) == len(policies) == 25
    for ours, theirs in zip(IMAGENET_POLICY, policies):
        assert [(op, prob) for op, prob, _ in ours] == [(_TORCHVISION_NAMES[op], prob) for op, prob, _ in theirs]
        assert [level for (_, _, level), (_, _, tv) in zip(ours, theirs) if tv is not None] == \
            [tv for _, _, tv in theirs if tv is not None]
    differences = [(i, sub) for i, sub in enumerate(GLUON_POLICY) if sub != IMAGENET_POLICY[i]]
    assert differences == [(15, (("rotate", 0.8, 8), ("color", 1.0, 0)))]


@pytest.mark.parametrize("level", range(NUM_LEVELS))
def test_magnitudes_are_gluons(level):
    assert magnitude("posterize", level) == 4 - int(np.floor(0.4 * level + 1e-9))
    assert magnitude("solarize", level) == 256 - int(np.floor(25.6 * level + 1e-9))
    assert magnitude("rotate", level) == 3 * level  # 30 * level / 10 degrees
    assert magnitude("shear_x", level) == magnitude("shear_y", level) == pytest.approx(0.03 * level)
    for op in ("color", "contrast", "brightness", "sharpness"):
        assert magnitude(op, level) == pytest.approx(0.1 + 0.18 * level)
    assert magnitude("equalize", level) == magnitude("invert", level) == magnitude("auto_contrast", level) == 0


def test_magnitude_examples_and_errors():
    assert [magnitude("posterize", level) for level in (5, 6, 7, 8)] == [2, 2, 2, 1]
    assert [magnitude("solarize", level) for level in (3, 4, 5, 7, 8)] == [180, 154, 128, 77, 52]
    assert magnitude("rotate", 9) == 27 and magnitude("color", 0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="translate_x"):
        magnitude("translate_x", 3)
    with pytest.raises(ValueError, match="outside 0..10"):
        magnitude("rotate", 11)


def _op_cases():
    """Every op at the levels the paper's table uses (shear_y and brightness, absent from it, at two) and 10."""
    levels = {op: {10} for op in OPS}
    for op, _, level in itertools.chain.from_iterable(IMAGENET_POLICY):
        levels[op].add(level)
    levels["shear_y"] |= {3, 9}
    levels["brightness"] |= {2, 7}
    return [(op, level) for op in OPS for level in sorted(levels[op])]


@pipeline_def(batch_size=2, num_threads=1)
def _ops_pipeline(image, cases, device):
    images = fn.external_source(source=lambda: [image, image], layout="HWC", batch=True)
    signs = fn.external_source(source=lambda: [np.int32(0), np.int32(1)], batch=True)  # sample 1 negated
    images = images.gpu() if device == "gpu" else images
    outputs = []
    for op, level in cases:
        aug = AUGMENTATIONS[op]
        if aug.mag_range is None:
            outputs.append(aug(images))
        else:
            bin_ = signed_bin(level, random_sign=signs) if aug.randomly_negate else level
            outputs.append(aug(images, magnitude_bin=bin_, num_magnitude_bins=NUM_LEVELS))
    return tuple(outputs)


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_dali_ops_give_the_pil_image(device):
    """Each op of the DALI graph at a level (and its negation for signed ops) gives the PIL op's image at
    `magnitude(op, level)`: the two backends implement one definition."""
    image, cases = structured(), _op_cases()
    pipe = _ops_pipeline(image, cases, device, device_id=0 if device == "gpu" else None)
    pipe.build()
    outputs = pipe.run()
    pil = Image.fromarray(image)
    for (op, level), batch in zip(cases, outputs):
        batch = batch.as_cpu() if device == "gpu" else batch
        for negated in (0, 1):
            mag = magnitude(op, level)
            reference = apply_op(pil, op, -mag if negated and op in SIGNED_OPS else mag)
            assert_same_image(np.asarray(batch[negated]), reference, op, level)
        assert np.abs(np.asarray(batch[0]).astype(int) - image).mean() > 1, (op, level)  # the op did something


def test_dali_policy_is_the_table():
    for name, table in (("imagenet", IMAGENET_POLICY), ("gluon", GLUON_POLICY)):
        policy = dali_policy(name)
        assert policy.num_magnitude_bins == NUM_LEVELS
        assert [[(aug.name, prob, level) for aug, prob, level in sub] for sub in policy.sub_policies] == \
            [[(op, prob, None if op in ("auto_contrast", "equalize", "invert") else level)
              for op, prob, level in sub] for sub in table]
    with pytest.raises(ValueError, match="known: imagenet, gluon"):
        dali_policy("image_net")


def _outcomes(image: np.ndarray) -> list[np.ndarray]:
    """Every image the policy can make of `image`: each sub-policy, each subset of its stages, each sign."""
    pil, outcomes = Image.fromarray(image), []
    for steps in resolve(IMAGENET_POLICY):
        for run in itertools.product((0.0, 1.0), repeat=len(steps)):
            for negate in itertools.product((False, True), repeat=len(steps)):
                outcomes.append(np.asarray(apply_sub_policy(pil, steps, run, negate)).astype(np.int16))
    return outcomes


@pytest.mark.slow  # builds the 25-way conditional graph: 7-15 s on 2 shared cores
def test_dali_auto_augment_applies_the_framework_draws(autograph_tmp):
    """The whole DALI policy with the framework's draws per image (a sub-policy, a uniform and a sign per
    stage): every output is the image the PIL ops make under the same draws, and most are augmented."""
    image, batch = structured(), 24
    rng = np.random.default_rng(7)
    sub_policy = rng.integers(0, len(IMAGENET_POLICY), batch).astype(np.int32)
    run = rng.random((batch, 2)).astype(np.float32)
    negate = rng.integers(0, 2, (batch, 2)).astype(np.int32)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, enable_conditionals=True, seed=7)
    def pipeline():
        images = fn.external_source(source=lambda: [image] * batch, layout="HWC", batch=True)
        drawn = fn.external_source(source=lambda: (sub_policy, run, negate), num_outputs=3, batch=True)
        return dali_auto_augment(images, *drawn)

    pipe = pipeline()
    pipe.build()
    steps, pil, unchanged = resolve(IMAGENET_POLICY), Image.fromarray(image), 0
    for i, out in enumerate(pipe.run()[0]):
        out = np.asarray(out).astype(np.int16)
        expected = np.asarray(apply_sub_policy(pil, steps[sub_policy[i]], run[i], negate[i])).astype(np.int16)
        assert np.abs(out - expected).mean() <= 0.5, i  # the ops' documented rounding differences
        unchanged += bool((out == image).all())
    assert unchanged < batch // 2


def test_host_autoaugment_applies_the_drawn_sub_policy():
    """The DALI CPU graph's host op: stage k runs when run[k] < its probability, negate flips rotate."""
    augment, image = HostAutoAugment(threads=1, policy_name="imagenet"), structured()
    pil = Image.fromarray(image)
    rotate_color = IMAGENET_POLICY.index((("rotate", 0.8, 8), ("color", 1.0, 2)))
    assert augment.one(image, rotate_color, np.array([0.9, 1.0]), np.zeros(2)) is image  # nothing ran
    expected = apply_op(apply_op(pil, "rotate", -24), "color", magnitude("color", 2))
    np.testing.assert_array_equal(augment.one(image, rotate_color, np.array([0.5, 0.5]), np.array([1, 1])),
                                  np.asarray(expected))
    out = augment([image, image], [rotate_color] * 2, [np.array([0.5, 1.0])] * 2, [np.zeros(2)] * 2)
    np.testing.assert_array_equal(out[1], np.asarray(apply_op(pil, "rotate", 24)))


def test_torchvision_transform_draws_from_torch():
    """Seeding torch (what DataLoader does per worker) fixes the draws; both signs and every sub-policy
    come up."""
    augment, pil = AutoAugment(), Image.fromarray(structured())
    torch.manual_seed(3)
    first = np.asarray(augment(pil))
    torch.manual_seed(3)
    index, run, negate = augment.draw()
    np.testing.assert_array_equal(first, np.asarray(apply_sub_policy(pil, augment.sub_policies[index], run, negate)))
    draws = [augment.draw() for _ in range(400)]
    assert {index for index, _, _ in draws} == set(range(25))
    assert {sign for _, _, negate in draws for sign in negate} == {False, True}
    assert isinstance(augment(pil), Image.Image)
