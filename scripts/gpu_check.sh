#!/usr/bin/env bash
# The GPU-only behaviours, on a machine with one NVIDIA GPU, from this checkout as it is (PYTHONPATH, no
# install step): one PASS / FAIL / SKIP line per check, measurements as JSON lines, and last
# "N passed, N failed, N skipped". Sized for the GPU machines lent to this project (Python 3.12 with torch,
# torchvision, timm, tensorboard, pyyaml, safetensors, pytest, pytest-xdist; no DALI, no package registry):
# about 8 minutes. Every check has a timeout and the whole run a budget: checks past it are skipped, and so
# are the DALI checks where DALI cannot be imported. What one GPU cannot check (NCCL across GPUs, SyncBN,
# the mixed-device check): BENCHMARKS.md.
#   scripts/gpu_check.sh    # PYTHON=python3, WORK=(a new temp folder), TOTAL_BUDGET=480 (seconds)
# Exit status: 0 nothing failed, 1 a check failed, 2 no CUDA device (or no torch) for $PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_BUDGET=${TOTAL_BUDGET:-480}
START=$SECONDS
passed=0 failed=0 skipped=0

# ------------------------------------------------------------------------------------------------ probes
cuda=$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null)
case "$cuda" in
  *" True") ;;
  "") echo "error: no CUDA device: $PY does not run or cannot import torch"; exit 2 ;;
  *) echo "error: no CUDA device visible to torch ${cuda% *} ($PY: torch.cuda.is_available() is False)"; exit 2 ;;
esac
if "$PY" -c 'import nvidia.dali' >/dev/null 2>&1; then DALI=1; else DALI=0; fi
"$PY" -c 'import sys, torch, timm
try:
    import nvidia.dali as dali; dali = dali.__version__
except ImportError:
    dali = "not importable"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "timm",
      timm.__version__, "dali", dali, "gpu", torch.cuda.get_device_name(0))'
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK" || exit 2
echo "logs and runs in $WORK"

# ------------------------------------------------------------------------------------------------ helpers
result() {  # result PASS|FAIL|SKIP NAME [WHY]: one line, counted
  case $1 in PASS) passed=$((passed + 1)) ;; FAIL) failed=$((failed + 1)) ;; SKIP) skipped=$((skipped + 1)) ;; esac
  echo "$1 $2${3:+ ($3)}"
}

check() {  # check NAME SECONDS [--dali] COMMAND...: run with a timeout, output in $WORK/NAME.log
  # Returns 0 on PASS, 1 on FAIL, 2 on SKIP.
  local name=$1 limit=$2; shift 2
  if [ "$1" = --dali ]; then
    shift
    [ "$DALI" = 1 ] || { result SKIP "$name" "DALI not importable"; return 2; }
  fi
  local left=$((TOTAL_BUDGET - (SECONDS - START))) cut=0 rc=0
  [ "$left" -gt 0 ] || { result SKIP "$name" "time budget"; return 2; }
  if [ "$limit" -gt "$left" ]; then limit=$left; cut=1; fi
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then result PASS "$name"; return 0; fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    if [ "$cut" = 1 ]; then result SKIP "$name" "time budget, stopped after $limit s"; return 2; fi
    result FAIL "$name" "timed out after $limit s, log: $WORK/$name.log"; return 1
  fi
  result FAIL "$name" "exit $rc: $(tail -1 "$WORK/$name.log" | cut -c1-120); log: $WORK/$name.log"; return 1
}

verify() {  # verify NAME RUN_RC PYTHON-CODE ARGS...: a condition on a run that passed (none if it was skipped)
  local name=$1 run_rc=$2; shift 2
  [ "$run_rc" != 2 ] || return 2
  [ "$run_rc" = 0 ] || { result SKIP "$name" "its run failed"; return 2; }
  check "$name" 30 "$PY" -c "$@"
}

# A run's last epoch (images/s over the whole epoch, from metrics.jsonl) as a JSON line; fails on a
# non-finite loss or another number of epochs than expected.
LAST_EPOCH='import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
last = rows[-1]
print(json.dumps({"run": sys.argv[1].rsplit("/", 1)[-1], "epoch": last["epoch"],
                  "images_per_sec": round(last["images_per_sec"], 1), "train_loss": last["train_loss"]}))
assert all(math.isfinite(row["train_loss"]) for row in rows), "non-finite loss"
assert [row["epoch"] for row in rows] == list(range(1, int(sys.argv[2]) + 1)), "epochs"'

run() {  # run NAME SECONDS EPOCHS [--dali] OVERRIDES...: train.py into $WORK/NAME, then its last epoch
  local name=$1 limit=$2 epochs=$3 rc=0 dali=(); shift 3
  if [ "$1" = --dali ]; then dali=(--dali); shift; fi
  check "$name" "$limit" "${dali[@]}" "$PY" train.py "${R50[@]}" "output_dir=$WORK/$name" "train.epochs=$epochs" \
    "$@" || rc=$?
  verify "${name}_metrics" "$rc" "$LAST_EPOCH" "$WORK/$name" "$epochs" && tail -1 "$WORK/${name}_metrics.log"
  return "$rc"
}

# ------------------------------------------------------------------------------------------------ training
check images 60 "$PY" scripts/make_synthetic_dataset.py --out "$WORK/images" --classes 8 --train-per-class 64 \
  --val-per-class 8 --size 256
# resnest50 at 224, the demo recipe otherwise (AutoAugment, mixup, warmup + cosine): configs/demo.yaml holds
# one process's batch values, as a one-GPU run needs them.
R50=(--config configs/demo.yaml model.name=resnest50 model.num_classes=8 "data.root=$WORK/images" data.workers=8
     data.crop_size=224 data.val_crop_size=224 train.batch_size=64 train.device=cuda train.amp=bf16
     train.log_interval=8 checkpoint.keep_last=1)
SYNTHETIC=(data.backend=synthetic data.synthetic_size=2560)  # 40 steps an epoch

run synthetic_bf16 120 2 "${SYNTHETIC[@]}"
run synthetic_bf16_channels_last 120 2 "${SYNTHETIC[@]}" train.channels_last=true
run synthetic_fp16_gradscaler 120 2 "${SYNTHETIC[@]}" train.amp=fp16
# The bf16 run (a copy of its folder) continued in fp16: a disabled GradScaler's state resumed into an
# enabled one.
if [ -f "$WORK/synthetic_bf16/checkpoints/last.pt" ] && cp -r "$WORK/synthetic_bf16" "$WORK/bf16_then_fp16"; then
  run bf16_then_fp16 120 3 "${SYNTHETIC[@]}" train.amp=fp16
  verify bf16_then_fp16_resumed $? "import sys; assert 'resuming from' in open(sys.argv[1]).read()" \
    "$WORK/bf16_then_fp16.log"
else
  result SKIP bf16_then_fp16 "no bf16 run to resume"
fi
run torchvision_bf16 150 2 data.backend=torchvision
run torchvision_bf16_channels_last 150 2 data.backend=torchvision train.channels_last=true

# ------------------------------------------------------------------------------------------------ test suite
# Tests marked `cuda` (real CUDA tensors: autocast dtypes, channels_last, fp16 + GradScaler, pinned batches)
# and evaluate.py on the GPU through the torchvision backend; none needs DALI or several GPUs.
check pytest_cuda_marked 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
check pytest_evaluate_on_gpu 180 "$PY" -m pytest -q -p no:cacheprovider -n 2 \
  tests/test_evaluate.py::test_crop_sizes_report_their_resize \
  tests/test_evaluate.py::test_predictions_into_a_missing_folder_after_the_results

# ------------------------------------------------------------------------------------------------ benchmark
for layout in nchw channels_last; do
  flag=(); [ "$layout" = channels_last ] && flag=(--channels-last)
  check "benchmark_resnest50_vs_timm_$layout" 150 "$PY" scripts/benchmark.py model --model resnest50 --compare \
    --device cuda --amp bf16 --batch-size 128 --steps 20 --rounds 3 "${flag[@]}" &&
    tail -1 "$WORK/benchmark_resnest50_vs_timm_$layout.log"
done

# ------------------------------------------------------------------------------------------------ compile
# DropBlock's probability ramps every step, a buffer changed in place: the switch to evaluation and the
# last partial batch may recompile, the ramp must not. resnest14: the same blocks, a shorter compile.
check compile_dropblock_ramp 240 env TORCH_LOGS=recompiles "$PY" train.py "${R50[@]}" "${SYNTHETIC[@]}" \
  "output_dir=$WORK/compile" model.name=resnest14 model.dropblock_prob=0.1 train.compile=true train.epochs=2
verify compile_at_most_3_recompilations $? 'import sys
count = open(sys.argv[1]).read().count("Recompiling function")
print({"recompilations": count}); assert count <= 3, f"{count} recompilations"' "$WORK/compile_dropblock_ramp.log" &&
  tail -1 "$WORK/compile_at_most_3_recompilations.log"

# ------------------------------------------------------------------------------------------------ DALI
run dali_gpu_decode 150 2 --dali data.dali_device=gpu
run dali_cpu_decode_for_gpu 150 2 --dali data.dali_device=cpu
check pytest_dali_ops_on_gpu 180 --dali "$PY" -m pytest -q -p no:cacheprovider tests/test_autoaugment.py -k gpu
# A file, not `python -`: the index scan spawns processes, which re-import the main module (FACTS.md).
cat >"$WORK/gpu_vs_cpu_decode.py" <<'PY'
import dataclasses
import sys

import torch

from resnest_train.data import build_val_loader, load_dataset_index
from resnest_train.cluster.distributed import DistInfo
from tests.conftest import make_plan

if __name__ == "__main__":
    plan = make_plan(sys.argv[1], val_crop_size=224, workers=4)
    index = load_dataset_index(plan, DistInfo(0, 0, 1, torch.device("cpu")))
    gpu, cpu = (dataclasses.replace(plan, device=torch.device("cuda", 0), decoder=d) for d in ("gpu", "cpu"))
    diff = (torch.cat([x for x, _ in build_val_loader(gpu, index, batch_size=16)])
            - torch.cat([x for x, _ in build_val_loader(cpu, index, batch_size=16)])).abs()
    print({"gpu_vs_cpu_decode_mean_abs": diff.mean().item(), "max": diff.max().item()})
    assert diff.mean() < 0.02, diff.mean()
PY
check dali_gpu_vs_cpu_decode 120 --dali "$PY" "$WORK/gpu_vs_cpu_decode.py" "$WORK/images" &&
  tail -1 "$WORK/dali_gpu_vs_cpu_decode.log"
for threads in 4 8; do
  check "benchmark_dali_gpu_pipeline_${threads}_threads" 60 --dali "$PY" scripts/benchmark.py data \
    --root "$WORK/images" --backend dali --device cuda --autoaugment imagenet --autoaugment-on image \
    --batch-size 128 --workers "$threads" --seconds 10 --rounds 2 &&
    tail -1 "$WORK/benchmark_dali_gpu_pipeline_${threads}_threads.log"
done

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
