"""Shared fixtures: a small generated JPEG dataset (made once per session) and CPU-friendly defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs of 40 px, classes recoverable from the pixels."""
    out = tmp_path_factory.mktemp("images")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), "--out", str(out),
                    "--classes", "4", "--train-per-class", "12", "--val-per-class", "5", "--size", "40"],
                   check=True, capture_output=True)
    return out
