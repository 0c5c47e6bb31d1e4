"""scripts/gpu_check.sh without a GPU: the one-line error and exit 2 where torch sees no CUDA, and its
bookkeeping in a dry run with a stand-in interpreter (FAKE_PYTHON) that answers the probes and fakes the
runs: one line per check, DALI checks skipped (never passed) without DALI, a failed run or too many
recompilations is a FAIL and exit 1, the time budget skips checks, the last line counts them all."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "gpu_check.sh")
FAKE_PYTHON = r"""#!/usr/bin/env bash
# The probes' answers, then train.py (metrics.jsonl rows; "resuming from" where it has some), pytest and
# benchmark.py faked; anything else (the script's own checks of a run) goes to the real interpreter.
arg() { local key=$1; shift; for a in "$@"; do case $a in "$key="*) echo "${a#*=}" ;; esac; done | tail -1; }
case "$*" in
  *"torch.cuda.is_available()"*) echo "2.11.0+cu130 True"; exit 0 ;;
  "-c import nvidia.dali") exit 1 ;;
  *"import sys, torch, timm"*) echo "fake interpreter"; exit 0 ;;
  *make_synthetic_dataset.py*) exit 0 ;;
  *train.py*)
    out=$(arg output_dir "$@"); epochs=$(arg train.epochs "$@"); mkdir -p "$out/checkpoints"; start=1
    if [ -f "$out/metrics.jsonl" ]; then echo "resuming from"; start=$(( $(wc -l <"$out/metrics.jsonl") + 1 )); fi
    for ((e = start; e <= epochs; e++)); do
      echo "{\"epoch\": $e, \"train_loss\": 1.5, \"images_per_sec\": 100.0}" >>"$out/metrics.jsonl"
    done
    touch "$out/checkpoints/last.pt"
    for ((i = 0; i < ${FAKE_RECOMPILES:-0}; i++)); do [ -n "${TORCH_LOGS:-}" ] && echo "Recompiling function"; done
    case " ${FAKE_FAIL:-} " in *" ${out##*/} "*) exit 1 ;; esac
    exit 0 ;;
  *"-m pytest"*) exit 0 ;;
  *benchmark.py*) echo '{"images_per_sec": 100.0}'; exit 0 ;;
  *) exec REAL_PYTHON "$@" ;;
esac
"""


def gpu_check(python: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": python, "WORK": str(tmp_path / "work"), **env})


@pytest.fixture
def fake_python(tmp_path) -> str:
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON.replace("REAL_PYTHON", sys.executable))
    path.chmod(0o755)
    return str(path)


def lines_by_status(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    return {status: [line.split()[1] for line in lines if line.startswith(status + " ")]
            for status in ("PASS", "FAIL", "SKIP")}


def check_summary(stdout: str) -> dict[str, list[str]]:
    """The last line counts the PASS / FAIL / SKIP lines above it."""
    found = lines_by_status(stdout)
    summary = stdout.splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, \d+ failed, \d+ skipped", summary), summary
    assert summary == f"{len(found['PASS'])} passed, {len(found['FAIL'])} failed, {len(found['SKIP'])} skipped"
    return found


def test_without_cuda_one_error_line_and_exit_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path needs a machine without it")
    result = gpu_check(sys.executable, tmp_path)
    assert result.returncode == 2 and result.stderr == ""
    assert result.stdout.startswith("error: no CUDA device") and len(result.stdout.splitlines()) == 1
    assert not (tmp_path / "work").exists()  # stopped before anything ran


def test_dry_run_passes_and_skips_every_dali_check(fake_python, tmp_path):
    result = gpu_check(fake_python, tmp_path, FAKE_RECOMPILES="3")
    found = check_summary(result.stdout)
    assert result.returncode == 0 and found["FAIL"] == [], result.stdout
    dali_lines = [line for line in result.stdout.splitlines() if "dali" in line.split(" (")[0].lower()]
    assert dali_lines and all(line.endswith("(DALI not importable)") for line in dali_lines)
    assert "bf16_then_fp16_resumed" in found["PASS"] and "compile_at_most_3_recompilations" in found["PASS"]
    assert '"images_per_sec": 100.0' in result.stdout  # the runs' figures, read from metrics.jsonl


def test_dry_run_failures_exit_1(fake_python, tmp_path):
    result = gpu_check(fake_python, tmp_path, FAKE_FAIL="torchvision_bf16", FAKE_RECOMPILES="4")
    found = check_summary(result.stdout)
    assert result.returncode == 1
    assert found["FAIL"] == ["torchvision_bf16", "compile_at_most_3_recompilations"], result.stdout
    assert "SKIP torchvision_bf16_metrics (its run failed)" in result.stdout


def test_dry_run_past_the_budget_skips(fake_python, tmp_path):
    result = gpu_check(fake_python, tmp_path, TOTAL_BUDGET="0")
    found = check_summary(result.stdout)
    assert result.returncode == 0 and found["PASS"] == found["FAIL"] == [] and found["SKIP"]
    assert "SKIP synthetic_bf16 (time budget)" in result.stdout
