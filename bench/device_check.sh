#!/usr/bin/env bash
# One call on a lent NVIDIA GPU (the `device` tool): the released shape's decoder step
# at canvas 256 with 512 / 2k / 8k cached tokens, eager then compiled with CUDA graphs,
# floors from the GPU's own measured matmul rate and copy bandwidth (--measure).
# Random bf16 weights are made on the GPU (--weights device): no 51 GB checkpoint is
# written or read. Records land in $OUT (the device tool brings them back); commit
# them under bench/results/.
#
#   run: bash bench/device_check.sh            (from the repository root, ~10 min)
#   CPU smoke test: DEVICE=cpu PRESET=tiny CONTEXTS=12,20 STEPS=5 bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-released}
CONTEXTS=${CONTEXTS:-512,2048,8192}
STEPS=${STEPS:-8}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/nvidia-smi.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
step() {
  "$PY" -m bench.run step --backend torch --device "$DEVICE" --weights device \
    --preset "$PRESET" --context "$CONTEXTS" --steps "$STEPS" --repeats 3 --warmup 1 \
    --measure --out "$OUT" "$@"
}
status=0
step || { echo "eager step run failed"; status=1; }
step --compile reduce-overhead || { echo "compiled step run failed"; status=1; }
exit $status
