#!/usr/bin/env bash
# The GPU-only behaviours, on a machine with one NVIDIA GPU and the project installed (`make venv`):
# one PASS/FAIL line per behaviour, then the throughput figures as JSON lines. Under 15 minutes on one
# H100/H200. What one GPU cannot check (NCCL across GPUs, SyncBN) is listed in BENCHMARKS.md.
#   scripts/gpu_check.sh            # PYTHON=... to pick the interpreter, WORK=... for the scratch folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
failed=0
check() {  # check NAME COMMAND...: PASS/FAIL, the command's output in $WORK/NAME.log
  local name=$1; shift
  if "$@" >"$WORK/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (log: $WORK/$name.log)"; failed=1; fi
}
"$PY" -c 'import torch, nvidia.dali, timm; assert torch.cuda.is_available(), "no CUDA"
print("torch", torch.__version__, "cuda", torch.version.cuda, "dali", nvidia.dali.__version__, "timm", timm.__version__,
      torch.cuda.get_device_name(0))' || exit 2
"$PY" scripts/make_synthetic_dataset.py --out "$WORK/small" --classes 4 --train-per-class 40 --val-per-class 10 --size 72 >/dev/null
"$PY" scripts/make_synthetic_dataset.py --out "$WORK/large" --classes 8 --train-per-class 128 --val-per-class 8 --size 320 >/dev/null
TRAIN=("$PY" train.py --config configs/demo.yaml "data.root=$WORK/small" model.num_classes=4 data.crop_size=64
       data.val_crop_size=64 train.batch_size=32 train.epochs=2 train.device=cuda train.log_interval=5)
check dali_mixed_training "${TRAIN[@]}" "output_dir=$WORK/mixed" data.dali_device=gpu
check dali_cpu_decode_on_gpu_training "${TRAIN[@]}" "output_dir=$WORK/cpu_decode" data.dali_device=cpu
check torchvision_on_gpu_training "${TRAIN[@]}" "output_dir=$WORK/tv" data.backend=torchvision
check channels_last "${TRAIN[@]}" "output_dir=$WORK/cl" train.channels_last=true
check bf16 "${TRAIN[@]}" "output_dir=$WORK/bf16" train.amp=bf16
check fp16_gradscaler "${TRAIN[@]}" "output_dir=$WORK/fp16" train.amp=fp16
check fp16_resume_after_bf16 "${TRAIN[@]}" "output_dir=$WORK/bf16" train.amp=fp16 train.epochs=3
check compile_dropblock_few_recompiles env TORCH_LOGS=recompiles "${TRAIN[@]}" "output_dir=$WORK/compile" \
  train.compile=true model.dropblock_prob=0.1
if [ "$(grep -c 'Recompiling function' "$WORK/compile_dropblock_few_recompiles.log")" -gt 3 ]; then
  echo "FAIL compile_dropblock_few_recompiles (more than 3 recompilations)"; failed=1
fi
# The test suite's resume and evaluation tests run on the GPU here (train.device: auto).
check resume_bit_exact "$PY" -m pytest -q -p no:cacheprovider tests/test_resume.py -k "kill_after or sigterm"
check exact_once_evaluation "$PY" -m pytest -q -p no:cacheprovider tests/test_evaluate.py
check gpu_vs_cpu_decode "$PY" - "$WORK/large" <<'PY'
import sys, torch
from tests.conftest import make_plan
from resnest_train.data import build_val_loader, load_dataset_index
from resnest_train.distributed import DistInfo
import dataclasses
plan = make_plan(sys.argv[1], val_crop_size=224, workers=4)
gpu = dataclasses.replace(plan, device=torch.device("cuda", 0), decoder="gpu")
cpu = dataclasses.replace(plan, device=torch.device("cuda", 0), decoder="cpu")
index = load_dataset_index(plan, DistInfo(0, 0, 1, torch.device("cpu")))
a = torch.cat([x for x, _ in build_val_loader(gpu, index, batch_size=16)])
b = torch.cat([x for x, _ in build_val_loader(cpu, index, batch_size=16)])
diff = (a - b).abs()
print({"gpu_vs_cpu_decode_mean_abs": diff.mean().item(), "max": diff.max().item()})
assert diff.mean() < 0.02, diff.mean()
PY
cat "$WORK/gpu_vs_cpu_decode.log" | tail -1
for layout in "" "--channels-last"; do
  "$PY" scripts/benchmark.py model --model resnest50 --compare --device cuda --amp bf16 --batch-size 128 \
    --steps 20 --rounds 5 $layout | tail -1
done
for threads in 4 8; do
  "$PY" scripts/benchmark.py data --root "$WORK/large" --backend dali --device cuda --autoaugment imagenet \
    --autoaugment-on image --batch-size 128 --workers "$threads" --seconds 20 | tail -1
done
exit $failed
