"""RandAugment (data/randaugment.py): timm's strings, table, magnitudes and signs; the framework's draws, a
function of (seed, epoch, sample) alone, the same on every backend, process count and worker; one short
training run on each backend."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as timm_aa

from resnest_train.config import ConfigError
from resnest_train.config_yaml import from_dict
from resnest_train.data.autoaugment import apply_op
from resnest_train.data.draws import draw_batch
from resnest_train.data.index import load_index
from resnest_train.data.randaugment import (
    LEVEL_TO_ARG,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugmentSpec,
    apply_rand_augment,
    draw,
    op_arg,
    parse_rand_augment,
)
from resnest_train.data.torchvision import build_torch_train
from tests.conftest import dali_importable, make_order, make_plan, metrics, run_script, script_env, train_args
from tests.test_autoaugment import structured

POLICIES = ("rand-m9-n2-mstd0.5", "rand-m6-mstd0.5-inc1")  # the recipe configs' strings


@pytest.mark.parametrize("text", [*POLICIES, "rand", "rand-n3-m15-mmax20-p0.7", "rand-mstd101-inc0",
                                  "rand-m7-mstd0"])
def test_strings_parse_as_timm_reads_them(text):
    """Every part as timm's `rand_augment_transform` reads it: layers, table, probability, magnitude, noise
    (above 100: uniform, i.e. inf), bound."""
    spec, theirs = parse_rand_augment(text), timm_aa.rand_augment_transform(text)
    assert spec.num_layers == theirs.num_layers and theirs.choice_weights is None
    assert spec.transforms == tuple(op.name for op in theirs.ops)
    for op in theirs.ops:
        assert (op.prob, op.magnitude, op.magnitude_std) == (spec.prob, spec.magnitude, spec.magnitude_std)
        assert (op.magnitude_max or timm_aa._LEVEL_DENOM) == spec.upper


@pytest.mark.parametrize("text,fragment", [
    ("rand-m9-x3", "unknown part 'x3'"),
    ("rand-m9.5", "part 'm9.5'"),
    ("rand-n0", "part 'n0'"),
    ("rand-n11", "part 'n11'"),
    ("rand-inc2", "part 'inc2'"),
    ("rand-p1.5", "part 'p1.5'"),
    ("rand-mstd0.5x", "part 'mstd0.5x'"),
    ("rand-m9-m8", "part 'm8'"),
    ("rand-tweights", "part 'tweights'"),
    ("rand-", "unknown part ''"),
    ("rand-m", "unknown part 'm'"),
])
def test_a_malformed_string_is_one_config_error_naming_the_part(text, fragment):
    with pytest.raises(ConfigError, match="'data.autoaugment'") as error:
        from_dict({"data": {"autoaugment": text}})
    assert fragment in str(error.value) and text in str(error.value)


def test_other_values_are_the_choices():
    for value in ("imagenet", "gluon", "none"):
        assert from_dict({"data": {"autoaugment": value}}).data.autoaugment == value
    with pytest.raises(ConfigError, match="'data.autoaugment' must be one of imagenet, gluon, none, rand-"):
        from_dict({"data": {"autoaugment": "randaugment"}})


def test_tables_are_timms():
    assert RAND_TRANSFORMS == tuple(timm_aa._RAND_TRANSFORMS)
    assert RAND_INCREASING_TRANSFORMS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert set(LEVEL_TO_ARG) == set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize("name", sorted(LEVEL_TO_ARG))
def test_arguments_are_timms_bit_for_bit(name, monkeypatch):
    """`op_arg` is timm's LEVEL_TO_ARG at every magnitude (floats, not levels), with the sign the draw gives
    (timm's `_randomly_negate` pinned to it); translate in pixels of the image, as timm's *_rel ops scale."""
    height, width = 41, 47
    for negate in (False, True):
        monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, negate=negate: -v if negate else v)
        for magnitude in [*np.linspace(0, 10, 81), 9.433574676513672, 0.05, 5.55]:
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            theirs = level_fn(float(magnitude), timm_aa._HPARAMS_DEFAULT)[0] if level_fn else 0.0
            theirs *= {"TranslateXRel": width, "TranslateYRel": height}.get(name, 1)
            assert op_arg(name, magnitude, negate, height, width) == theirs, (name, magnitude, negate)


@pytest.mark.parametrize("name", sorted(LEVEL_TO_ARG))
def test_pil_ops_are_timms_with_nearest_and_black_fill(name):
    """autoaugment.py's op at timm's argument is timm's op (NAME_TO_OP) warped nearest-neighbour with fill 0,
    pixel for pixel; equalize excepted (DALI's formula: autoaugment.py), and posterize to 0 bits, which Pillow
    >= 10 refuses (timm's op raises) and is black here (Pillow < 10's result)."""
    image = Image.fromarray(structured(41, 47))
    op = LEVEL_TO_ARG[name][0]
    for magnitude, negate in ((3.3, False), (7.0, True), (10.0, False)):
        arg = op_arg(name, magnitude, negate, 41, 47)
        value = int(arg) if op in ("posterize", "solarize", "solarize_add") else arg
        theirs_arg = {"TranslateXRel": arg / 47, "TranslateYRel": arg / 41}.get(name, value)
        args = () if timm_aa.LEVEL_TO_ARG[name] is None else (theirs_arg,)
        if op == "posterize" and value == 0:
            theirs = np.zeros((41, 47, 3), np.uint8)
        else:
            theirs = timm_aa.NAME_TO_OP[name](image, *args, fillcolor=(0, 0, 0), resample=Image.NEAREST)
        ours = np.asarray(apply_op(image, op, value)).astype(np.int16)
        if op == "equalize":
            # DALI's formula vs PIL's differs most where the lowest bin is crowded (this image is clipped at
            # 15): 9.7 grey levels on average here, 1.9 and 3.9 on photographs (autoaugment.py)
            assert np.abs(ours - np.asarray(theirs)).mean() < 12
        else:
            np.testing.assert_array_equal(ours, np.asarray(theirs), err_msg=f"{name} {magnitude} {negate}")


def _draws(spec: RandAugmentSpec, count: int) -> dict:
    rows = [draw(np.random.default_rng(i), spec) for i in range(count)]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def test_draws_follow_timms_distributions():
    """Ops uniform with replacement over the table, each run with probability p, magnitude m + N(0, mstd)
    clipped to [0, 10] (or uniform in [0, m]), signs even."""
    drawn = _draws(parse_rand_augment("rand-m9-n2-mstd0.5"), 3000)
    assert np.bincount(drawn["op"].ravel(), minlength=15).min() > 6000 / 15 * 0.8
    assert (drawn["op"][:, 0] == drawn["op"][:, 1]).mean() == pytest.approx(1 / 15, abs=0.02)  # replacement
    assert (drawn["run"] < 0.5).mean() == pytest.approx(0.5, abs=0.03)
    assert drawn["magnitude"].mean() == pytest.approx(9.0, abs=0.05) and drawn["magnitude"].max() <= 10.0
    assert drawn["magnitude"].std() == pytest.approx(0.5, abs=0.05) and (drawn["magnitude"] == 10.0).any()
    assert drawn["negate"].mean() == pytest.approx(0.5, abs=0.03)
    uniform = _draws(parse_rand_augment("rand-m6-mstd101"), 2000)["magnitude"]
    assert 0.0 <= uniform.min() < 0.1 and 5.9 < uniform.max() <= 6.0 and uniform.mean() == pytest.approx(3, abs=0.15)
    assert set(_draws(parse_rand_augment("rand-m7"), 10)["magnitude"].ravel()) == {7.0}
    assert set(_draws(parse_rand_augment("rand-m15-mmax12"), 10)["magnitude"].ravel()) == {12.0}


def test_apply_runs_the_drawn_layers():
    spec, image = parse_rand_augment("rand-m9-n2"), Image.fromarray(structured())
    rotate, invert = RAND_TRANSFORMS.index("Rotate"), RAND_TRANSFORMS.index("Invert")
    assert apply_rand_augment(image, spec, [rotate, invert], [0.7, 0.9], [27.0, 0.0]) is image  # none ran
    both = apply_rand_augment(image, spec, [rotate, invert], [0.2, 0.4], [-27.0, 0.0])
    np.testing.assert_array_equal(np.asarray(both), np.asarray(apply_op(apply_op(image, "rotate", -27.0), "invert", 0)))


def test_draws_depend_on_seed_epoch_and_sample_only(image_root):
    """As tests/test_draws.py for AutoAugment: any batch, any order; a new epoch or seed draws anew; the
    translation in pixels of the image RandAugment sees (the decoded image, or the crop)."""
    plan = make_plan(image_root, autoaugment=POLICIES[0], color_jitter=0.4, lighting=0.1)
    first = draw_batch(plan, 1, [5, 9], [(40, 40), (30, 50)])
    again = draw_batch(plan, 1, [9, 5], [(30, 50), (40, 40)])
    assert first.row(0) == again.row(1) and first.row(1) == again.row(0)
    assert set(first.row(0)) == {"crop", "flip", "jitter", "lighting", "op", "run", "magnitude", "negate", "arg"}
    assert draw_batch(plan, 2, [5], [(40, 40)]).row(0) != first.row(0)
    assert draw_batch(make_plan(image_root, seed=1, autoaugment=POLICIES[0]), 1, [5], [(40, 40)]).row(0) \
        != first.row(0)
    translate = RAND_TRANSFORMS.index("TranslateXRel")
    for on, width in (("image", 400), ("crop", 32)):
        rows = draw_batch(make_plan(image_root, autoaugment=POLICIES[0], autoaugment_on=on), 0, list(range(300)),
                          [(300, 400)] * 300)
        shifts = [abs(arg) / mag for row_op, row_arg, row_mag in zip(rows.op, rows.arg, rows.magnitude)
                  for op, arg, mag in zip(row_op, row_arg, row_mag) if op == translate and mag > 0]
        assert shifts and np.allclose(shifts, 0.045 * width, rtol=1e-5), on


def _loader_draws(loader) -> dict:
    loader.set_epoch(1)
    draws = {}
    for _ in loader:
        batch = loader.last_draws
        rows = [batch.row(i) for i in range(len(loader.last_samples))] if hasattr(batch, "row") else batch
        draws.update(zip(loader.last_samples.tolist(), rows))
    loader.close()
    return draws


def test_draws_are_the_same_on_any_process_count_and_worker(image_root):
    """One process with two DataLoader workers, and each rank of two with none, deliver each sample with the
    draws of one process with none: the draws are a function of (seed, epoch, sample)."""
    index = load_index(image_root)
    plan = lambda workers, rank=0, world=1: make_plan(image_root, autoaugment=POLICIES[1], workers=workers,
                                                      rank=rank, world_size=world)
    one = _loader_draws(build_torch_train(plan(0), index.train, make_order(48, 8)))
    workers = _loader_draws(build_torch_train(plan(2), index.train, make_order(48, 8)))
    ranks = {}
    for rank in (0, 1):
        ranks.update(_loader_draws(build_torch_train(plan(0, rank, 2), index.train,
                                                     make_order(48, 8, world_size=2, rank=rank, global_batch=16))))
    assert len(one) == 48 and one == workers == ranks


@pytest.mark.skipif(not dali_importable(), reason="DALI cannot be imported")
def test_dali_and_torchvision_get_the_same_draws_for_each_sample(image_root):
    from resnest_train.data.dali_train import build_dali_train
    index = load_index(image_root)
    plan = make_plan(image_root, autoaugment=POLICIES[0], color_jitter=0.4, lighting=0.1, workers=0)
    dali = _loader_draws(build_dali_train(plan, index.train, make_order(48, 8)))
    assert len(dali) == 48 and dali == _loader_draws(build_torch_train(plan, index.train, make_order(48, 8)))
    assert {op for row in dali.values() for op in row["op"]} >= set(range(8))


@pytest.mark.slow
def test_one_epoch_on_each_backend_with_rand_augment(image_root, tmp_path):
    """A short run per backend with `data.autoaugment=rand-m9-n2-mstd0.5`: it trains and evaluates, and the
    per-sample record shows both backends applying the same draws to every sample."""
    records = {}
    for backend in ("torchvision", "dali"):
        out, record = tmp_path / backend, tmp_path / backend / "samples"
        record.mkdir(parents=True)
        run_script(train_args(image_root, out, f"data.backend={backend}", f"data.autoaugment={POLICIES[0]}",
                              "train.epochs=1"), env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record)))
        row = metrics(out)[0]
        assert row["val_images"] == 20 and math.isfinite(row["train_loss"])
        lines = [json.loads(line) for line in (record / "rank0.jsonl").read_text().splitlines()]
        records[backend] = {(r["epoch"], s): d for r in lines for s, d in zip(r["samples"], r["draws"])}
    assert len(records["dali"]) == 48 and records["dali"] == records["torchvision"]
    assert all({"op", "magnitude", "arg"} <= set(draws) for draws in records["dali"].values())
