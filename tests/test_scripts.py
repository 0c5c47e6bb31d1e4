"""The dataset scripts: ImageNet layout preparation from the official release's shape."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_prepare_imagenet_from_kaggle_layout(image_root, tmp_path):
    train, val = tmp_path / "CLS-LOC" / "train", tmp_path / "CLS-LOC" / "val"
    shutil.copytree(image_root / "train", train)
    val.mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for index, path in enumerate(sorted((image_root / "val").glob("*/*.jpg"))):
        name = f"ILSVRC2012_val_{index:08d}"
        shutil.copy(path, val / f"{name}.JPEG")
        rows.append(f"{name},{path.parent.name} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "imagenet"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_imagenet.py"), "--train", str(train),
                             "--val", str(val), "--labels", str(tmp_path / "LOC_val_solution.csv"), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 classes, 48 train and 20 val images" in result.stdout
    assert (out / "val" / "class_002").is_dir() and len(list((out / "val" / "class_002").iterdir())) == 5
    script = str(ROOT / "scripts" / "prepare_imagenet.py")
    missing = subprocess.run([sys.executable, script, "--train", "/nope", "--val", str(val), "--labels", "x.csv",
                              "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: not found: /nope")
