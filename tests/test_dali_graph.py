"""Every DALI graph a run can build places each operator where DALI implements it.

A GPU run builds its pipelines with `device_id` set, decoding with nvJPEG (`mixed`) and running the image
ops on the GPU; an operator DALI implements on the CPU only (DALI 2.4's `ones_like`, for one) or an input
on the wrong device makes `build()` fail on every rank, and a CPU graph never shows it. DALI builds the
Python-side graph of a GPU pipeline without a GPU (`Pipeline._build_graph`), so each variant is checked
here against DALI's operator registry and each operator's schema: the operator exists for its device, every
regular input sits on the device the schema expects, every argument input on the CPU.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali.ops import _registry  # noqa: E402

from resnest_train.config_yaml import load_config  # noqa: E402
from resnest_train.data import dali, dali_train  # noqa: E402
from resnest_train.data.dali_feed import MicroBatchFeed  # noqa: E402
from resnest_train.data.samples import SampleList  # noqa: E402
from tests.conftest import ROOT, make_plan  # noqa: E402

SAMPLE_LIST = SampleList.from_pairs("folder", ["a", "b"], [(0, "0.jpg", 0), (1, "1.jpg", 1)])


def train_pipeline(plan):
    """The training graph a run builds for `plan`, fed by the framework (not run: no data behind it)."""
    return dali_train.train_pipeline(plan, MicroBatchFeed(plan, SAMPLE_LIST), batch_size=2)
REGISTRY = {"cpu": set(_registry.cpu_ops()), "gpu": set(_registry.gpu_ops()), "mixed": set(_registry.mixed_ops())}


def graph_problems(pipe) -> list[str]:
    """What would fail at `build()`: operators without an implementation for their device, inputs on
    another device than the schema takes (a `mixed` operator takes CPU inputs)."""
    pipe._build_graph()
    problems = set()
    for op in pipe._ops:
        device, schema, spec = op._op.device, op._op.schema, op.spec
        name = getattr(op._op, "schema_name", None) or schema.Name()  # fn.external_source has no schema_name
        if name not in REGISTRY[device]:
            problems.add(f"{name} has no {device} implementation")
        for i in range(spec.NumInput()):
            actual = spec.InputDevice(i)
            if i >= spec.NumRegularInput():
                expected = "cpu"  # argument inputs are read on the host
            else:
                expected = schema.GetInputDevice(i, actual, device) or actual
            if {"mixed": "cpu"}.get(expected, expected) != actual:
                problems.add(f"{name} ({device}) input {spec.InputName(i)} on {actual}, expected {expected}")
    return sorted(problems)


def gpu_plan(root, decoder: str = "gpu", **data):
    """The plan of a CUDA run (device cuda:0), as `build_data_plan` makes it on a GPU node."""
    plan = make_plan(root, **data)
    return dataclasses.replace(plan, device=torch.device("cuda", 0), decoder=decoder)


# timm's strings: the common ones and every one a recipe config uses (configs/*.yaml, read here)
RAND_AUGMENT = sorted({"rand-m9-n2-mstd0.5", "rand-m6-mstd0.5-inc1"} | {
    load_config(path).data.autoaugment for path in sorted((ROOT / "configs").glob("*.yaml"))
    if load_config(path).data.autoaugment.startswith("rand-")})
TRAIN_VARIANTS = [
    dict(autoaugment=policy, autoaugment_on=where, channels_last=layout, interpolation=interp)
    for (policy, where), layout, interp in itertools.product(
        [("imagenet", "image"), ("imagenet", "crop"), ("gluon", "image"), ("gluon", "crop"), ("none", "image"),
         *itertools.product(RAND_AUGMENT, ["image", "crop"])],
        [False, True], ["bilinear", "bicubic"])
]


def _variant_id(variant: dict) -> str:
    return "-".join(str(v) for v in variant.values())


@pytest.mark.parametrize("variant", TRAIN_VARIANTS, ids=_variant_id)
def test_gpu_training_graph_runs_every_op_where_dali_has_it(tmp_path, variant):
    layout = variant.pop("channels_last")
    plan = gpu_plan(tmp_path, channels_last=layout, color_jitter=0.4, lighting=0.1, hflip=True, **variant)
    pipe = train_pipeline(plan)
    assert pipe.device_id == 0
    assert graph_problems(pipe) == []


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("decoder", ["gpu", "cpu"])
def test_gpu_validation_graph_runs_every_op_where_dali_has_it(tmp_path, decoder, channels_last):
    plan = gpu_plan(tmp_path, decoder=decoder, channels_last=channels_last, interpolation="bicubic")
    assert graph_problems(dali.val_pipeline(plan, dali.ListFeed(plan, SAMPLE_LIST, 2), batch_size=2)) == []


@pytest.mark.parametrize("policy", ["imagenet", *RAND_AUGMENT])
@pytest.mark.parametrize("autoaugment_on", ["image", "crop"])
def test_cpu_decoding_for_a_gpu_trainer_hands_the_batch_over(tmp_path, autoaugment_on, policy):
    """`data.dali_device=cpu` on a GPU node: host ops on the CPU, then `.gpu()` for both outputs."""
    plan = gpu_plan(tmp_path, decoder="cpu", autoaugment=policy, autoaugment_on=autoaugment_on)
    pipe = train_pipeline(plan)
    assert graph_problems(pipe) == []
    assert [out.device for out in pipe._graph_out] == ["gpu", "gpu"]
    assert {op._op.device for op in pipe._ops} == {"cpu"}  # all image work on the host


def test_the_gpu_graph_decodes_with_nvjpeg_and_the_cpu_graph_does_not(tmp_path):
    gpu = train_pipeline(gpu_plan(tmp_path))
    cpu = train_pipeline(make_plan(tmp_path))
    for pipe in (gpu, cpu):
        pipe._build_graph()
    decoders = lambda pipe: {op._op.device for op in pipe._ops if "decoders" in getattr(op._op, "schema_name", "")}  # noqa: E731
    assert decoders(gpu) == {"mixed"} and decoders(cpu) == {"cpu"}
    assert cpu.device_id is None


def test_the_check_catches_a_cpu_only_op_on_the_gpu(tmp_path, monkeypatch):
    """The defect this file guards against: `ones_like` in the GPU graph (AutoAugment's contrast)."""
    from nvidia.dali import fn

    from resnest_train.data import dali_autoaugment

    def contrast_with_ones_like(images, factor):
        return dali_autoaugment._blend(fn.cast(fn.ones_like(images), dtype=dali_autoaugment.types.FLOAT), images,
                                       factor)

    monkeypatch.setattr(dali_autoaugment.AUGMENTATIONS["contrast"], "_op", contrast_with_ones_like)
    pipe = train_pipeline(gpu_plan(tmp_path, autoaugment="imagenet"))
    assert "OnesLike has no gpu implementation" in graph_problems(pipe)


@pytest.mark.parametrize("decoder", ["gpu", "cpu"])
@pytest.mark.parametrize("autoaugment_on", ["image", "crop"])
def test_drawn_interpolation_of_the_inception_crop_fits_both_gpu_graphs(tmp_path, decoder, autoaugment_on):
    """`data.crop=inception` feeds each image's interpolation; DALI reads it as an argument input (on the
    CPU) of the GPU resize, the host ops as an input of theirs."""
    plan = gpu_plan(tmp_path, decoder=decoder, crop="inception", autoaugment_on=autoaugment_on)
    assert graph_problems(train_pipeline(plan)) == []

@pytest.mark.parametrize("decoder", ["gpu", "cpu"])
@pytest.mark.parametrize("autoaugment_on", ["image", "crop"])
def test_progressive_resizing_feeds_the_size_as_an_argument_input(tmp_path, decoder, autoaugment_on):
    """data.progressive_resize: the epoch's size is one more output of the external source, which DALI's
    resize (the GPU graph's) takes as per-sample argument inputs, read on the host; the CPU graph's host
    resize takes it as an input. One training pipeline then serves every size."""
    plan = gpu_plan(tmp_path, decoder=decoder, autoaugment="imagenet", autoaugment_on=autoaugment_on,
                    progressive_resize=(32, 64, 1, 3))
    pipe = train_pipeline(plan)
    assert graph_problems(pipe) == []
    resizes = [op for op in pipe._ops if getattr(op._op, "schema_name", "") == "Resize"]
    fed = [op.spec.InputName(i) for op in resizes for i in range(op.spec.NumRegularInput(), op.spec.NumInput())]
    assert len(fed) == (2 if decoder == "gpu" else 0)  # resize_x and resize_y (the host resize: a regular input)
    assert all(name.startswith("__ExternalSource") for name in fed)
