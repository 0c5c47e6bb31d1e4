"""evaluate.py: exact-once counting on any number of processes (with and without test-time flip), crop/resize
sizes, backends agree, and a checkpoint that does not fit is a clear error."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnest_train.cluster.distributed import DistInfo
from resnest_train.models import create_model
from resnest_train.recipe.engine import resolve_precision, validate
from tests.conftest import ROOT, TORCHRUN, run_script, train_args


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """65 val images (13 classes x 5): no process count of 2 or 3 divides it."""
    out = tmp_path_factory.mktemp("odd")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), "--out", str(out),
                    "--classes", "13", "--train-per-class", "2", "--val-per-class", "5", "--size", "40"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnest14", num_classes=13, zero_init_last_bn=False)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path


def evaluate(root, weights, out, *extra, nproc: int = 1, check=True):
    launcher = None if nproc == 1 else [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    args = [str(ROOT / "evaluate.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--checkpoint",
            str(weights), "--output", str(out), f"data.root={root}", "model.num_classes=13", "data.workers=1",
            "train.batch_size=8", *extra]
    result = run_script(args, launcher=launcher, expect=0 if check else None)
    return json.loads(out.read_text()) if check else result


@pytest.mark.slow
@pytest.mark.dist
def test_every_image_counted_once_on_1_2_3_processes(odd_root, weights, tmp_path):
    reports = [evaluate(odd_root, weights, tmp_path / f"{n}.json", "--crop-size", "32", nproc=n) for n in (1, 2, 3)]
    rows = [report["results"][0] for report in reports]
    assert [r["num_images"] for r in rows] == [65, 65, 65]
    assert len({(r["top1"], r["top5"]) for r in rows}) == 1


def test_flip_scores_each_image_by_the_mean_of_its_and_its_mirrors_softmax():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 7))  # not mirror-symmetric
    images, targets = torch.randn(10, 3, 4, 6), torch.randint(0, 7, (10,))
    loader = [(images[:4], targets[:4]), (images[4:], targets[4:])]
    dist, precision = DistInfo(0, 0, 1, torch.device("cpu")), resolve_precision("none", torch.device("cpu"))
    plain = validate(model, loader, dist, precision, predictions=True)
    flipped = validate(model, loader, dist, precision, predictions=True, flip=True)
    with torch.no_grad():
        expected = (model(images).softmax(dim=1) + model(images.flip(3)).softmax(dim=1)) / 2
    top5 = expected.topk(5, dim=1)
    assert flipped.num_images == plain.num_images == 10  # each image counted once, mirror or not
    assert [classes for classes, _ in flipped.predictions] == top5.indices.tolist()
    torch.testing.assert_close(torch.tensor([probs for _, probs in flipped.predictions]), top5.values)
    assert flipped.top1 == pytest.approx(100.0 * (top5.indices[:, 0] == targets).sum().item() / 10)
    assert [probs for _, probs in plain.predictions] != [probs for _, probs in flipped.predictions]


@pytest.mark.slow
@pytest.mark.dist
def test_flip_counts_every_image_once_on_1_and_2_processes(odd_root, weights, tmp_path):
    plain = evaluate(odd_root, weights, tmp_path / "plain.json", "--crop-size", "32", "--predictions",
                     str(tmp_path / "plain.csv"))
    flipped = [evaluate(odd_root, weights, tmp_path / f"flip{n}.json", "--crop-size", "32", "--flip",
                        *(["--predictions", str(tmp_path / "flip.csv")] if n == 1 else []), nproc=n) for n in (1, 2)]
    rows = [report["results"][0] for report in flipped]
    assert [r["num_images"] for r in rows] == [65, 65] and len({(r["top1"], r["top5"]) for r in rows}) == 1
    assert plain["flip"] is False and flipped[0]["flip"] is True and flipped[1]["flip"] is True
    probs = [[row["top5_probs"] for row in csv.DictReader(open(tmp_path / name))] for name in ("plain.csv", "flip.csv")]
    assert len(probs[0]) == len(probs[1]) == 65
    assert sum(a != b for a, b in zip(*probs)) > 60  # the mirror changes the scores of a model that is not symmetric


@pytest.mark.slow
def test_crop_sizes_report_their_resize(odd_root, weights, tmp_path):
    report = evaluate(odd_root, weights, tmp_path / "r.json", "--crop-size", "224", "256", "data.backend=torchvision")
    assert [(r["crop_size"], r["resize_size"]) for r in report["results"]] == [(224, 256), (256, 293)]
    assert report["model"] == "resnest14" and report["checkpoint"] == str(weights)


@pytest.mark.slow
def test_backends_agree(image_root, tmp_path):
    torch.manual_seed(0)
    # A model that has learnt something: a short training run on the generated dataset.
    out = tmp_path / "run"
    run_script(train_args(image_root, out, "train.epochs=3"))
    common = ("--crop-size", "32", "model.num_classes=4")
    ckpt = out / "checkpoints" / "last.pt"
    dali = evaluate(image_root, ckpt, tmp_path / "d.json", *common, "data.backend=dali")["results"][0]
    tv = evaluate(image_root, ckpt, tmp_path / "t.json", *common, "data.backend=torchvision")["results"][0]
    assert dali["num_images"] == tv["num_images"] == 20
    # 20 images: one image is 5 points, so "within 0.5" means the same predictions count.
    assert abs(dali["top1"] - tv["top1"]) <= 0.5


def test_checkpoint_that_does_not_fit_is_an_error(odd_root, weights, tmp_path):
    result = evaluate(odd_root, weights, tmp_path / "x.json", "model.num_classes=10", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "fc.weight" in result.stderr
    result = evaluate(odd_root, weights, tmp_path / "x.json", "model.name=resnet50d", check=False)
    assert result.returncode == 2 and "missing keys" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size must be from 1 to 65536, got 0"),
    (["--batch-size", "-1"], "--batch-size must be from 1 to 65536, got -1"),
    (["--crop-size", "100000"], "--crop-size takes sizes from 8 to 4096"),
    (["--crop-size", "32", "40", "--predictions", "p.csv"], "--predictions takes one crop size"),
    (["--predictions", "/proc/p.csv"], "cannot write /proc/p.csv"),
])
def test_absurd_arguments_are_one_line(odd_root, weights, tmp_path, args, needle):
    result = evaluate(odd_root, weights, tmp_path / "x.json", *args, check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {result.stderr.strip()[7:]}"
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_real_labels_outside_the_classes_are_one_line(odd_root, weights, tmp_path):
    """A ReaL file of another label space scored ReaL-1 0.00 and exited 0."""
    (tmp_path / "real.json").write_text(json.dumps([[0]] * 64 + [[13]]))
    result = evaluate(odd_root, weights, tmp_path / "x.json", "--real-labels", str(tmp_path / "real.json"),
                      check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --real-labels {tmp_path / 'real.json'}: entry 65 ([13], image val_012_00004.jpg) is not a list of "
        "class indices in 0..12"]

def test_predictions_into_a_missing_folder_after_the_results(odd_root, weights, tmp_path):
    predictions = tmp_path / "new" / "folder" / "preds.csv"
    report = evaluate(odd_root, weights, tmp_path / "r.json", "--crop-size", "32", "--predictions",
                      str(predictions), "data.backend=torchvision")
    rows = predictions.read_text().splitlines()
    assert rows[0] == "path,label,top5_classes,top5_probs,label_name,top5_names" and len(rows) == 1 + 65
    assert report["results"][0]["num_images"] == 65


@pytest.mark.slow
def test_our_checkpoint_names_its_classes_for_a_val_only_folder(image_root, tmp_path):
    """The checkpoint's class names label val/ (no train/ needed); val folders with other names are refused
    (they would score 0.00 silently), a class without a val folder is fine."""
    run_script(train_args(image_root, tmp_path / "run", "data.backend=torchvision", "train.epochs=1"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    val_only = tmp_path / "val_only"
    shutil.copytree(image_root / "val", val_only / "val")
    shutil.rmtree(val_only / "val" / "class_003")
    args = [str(ROOT / "evaluate.py"), "--config", str(tmp_path / "run" / "config.yaml"), "--checkpoint",
            str(checkpoint), "--output", str(tmp_path / "r.json"), f"data.root={val_only}"]
    run_script(args)
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["num_images"] == 15
    (val_only / "val" / "class_000").rename(val_only / "val" / "cat")
    refused = run_script(args, expect=2)
    assert refused.stderr.startswith(f"error: class folder {val_only / 'val' / 'cat'} is not a class of the model")
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_weights_without_class_names_on_a_partial_val_folder_are_refused_or_given_classes(image_root, tmp_path):
    """Weights that do not name their classes (checkpoints from before class names were recorded, weights
    from elsewhere) on a val/-only folder without one class: the folders after it took shifted labels (top-1
    33.33 for 91.67, no word). Refused with one line naming --classes; with --classes the checkpoint's own
    result."""
    run_script(train_args(image_root, tmp_path / "run", "data.backend=torchvision", "train.epochs=2"))
    ours = tmp_path / "run" / "checkpoints" / "last.pt"
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(ours, map_location="cpu", weights_only=True)["model"]}, bare)
    val_only = tmp_path / "val_only"
    shutil.copytree(image_root / "val", val_only / "val")
    shutil.rmtree(val_only / "val" / "class_001")
    args = [str(ROOT / "evaluate.py"), "--config", str(tmp_path / "run" / "config.yaml"),
            f"data.root={val_only}", "data.backend=torchvision"]
    refused = run_script([*args, "--checkpoint", str(bare), "--output", str(tmp_path / "bare.json")], expect=2)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {val_only / 'val'} has 3 class folders but the model "
                                                   "has 4 classes") and "--classes FILE" in lines[0], lines
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"class_{i:03d}\n" for i in range(4)))
    run_script([*args, "--checkpoint", str(bare), "--classes", str(names), "--output", str(tmp_path / "bare.json")])
    run_script([*args, "--checkpoint", str(ours), "--output", str(tmp_path / "ours.json")])
    given, own = (json.loads((tmp_path / name).read_text())["results"][0] for name in ("bare.json", "ours.json"))
    assert given["num_images"] == own["num_images"] == 15 and given["top1"] == own["top1"]


def predicted(path) -> dict[str, tuple[int, int]]:
    """file name -> (label, top-1 class) from a --predictions CSV."""
    rows = list(csv.DictReader(open(path)))
    return {Path(row["path"]).name: (int(row["label"]), int(row["top5_classes"].split()[0])) for row in rows}


@pytest.mark.slow
def test_real_labels_and_class_index_folders_give_the_expected_counts(odd_root, weights, tmp_path):
    """--real-labels: a ReaL file indexed by the sorted file names, some lists empty (not counted), some
    holding the image's top-1 (correct), some not; on 2 processes. --class-index-folders: val folders named
    0..12 label as the class folders they were copied from (sorted as strings, '10' would be class 2)."""
    first = evaluate(odd_root, weights, tmp_path / "first.json", "--predictions", str(tmp_path / "first.csv"))
    top1 = predicted(tmp_path / "first.csv")
    names = sorted(top1)
    real = [[] if i % 5 == 0 else [top1[name][1]] if i % 5 in (1, 2) else [(top1[name][1] + 1) % 13]
            for i, name in enumerate(names)]
    (tmp_path / "real.json").write_text(json.dumps(real))
    report = evaluate(odd_root, weights, tmp_path / "real_out.json", "--real-labels", str(tmp_path / "real.json"),
                      nproc=2)["results"][0]
    judged = sum(1 for labels in real if labels)
    assert report["real_images"] == judged == 52 and report["num_images"] == 65
    assert report["real_top1"] == pytest.approx(100.0 * 26 / 52)  # i % 5 in (1, 2): 26 of the 52 judged
    assert report["top1"] == first["results"][0]["top1"]  # the original labels' score beside it
    indexed = tmp_path / "v2"
    for folder in sorted((odd_root / "val").iterdir()):
        shutil.copytree(folder, indexed / "val" / str(int(folder.name.split("_")[-1])))
    evaluate(indexed, weights, tmp_path / "v2.json", "--class-index-folders", "--predictions", str(tmp_path / "v2.csv"))
    assert predicted(tmp_path / "v2.csv") == top1  # every file with the label of its original class folder
