#!/usr/bin/env bash
# One call on a lent NVIDIA GPU (the `device` tool), at most ~8 minutes on an H100/H200
# with the machine's own torch and no network. The released shape (canvas 256) from
# random bf16 weights made on the GPU (--weights device: no 51 GB checkpoint):
#   1. the step at 512 / 2k / 8k cached tokens: eager, compiled (one decoder layer
#      compiled and reused: compile time in the record), and with CUDA graphs;
#      and with FP8 weights (eager);
#   2. end-to-end generation at 16 passes per canvas (tokens/s);
#   3. the drafters' pass cost next to the target's (spec-cost);
# floors from the GPU's own measured matmul rate and copy bandwidth (--measure).
# Every record names the expert-GEMM path, the sampler and host syncs per step. A
# short table comes last. Records land in $OUT; commit them under bench/results/.
#
#   run: bash bench/device_check.sh            (from the repository root)
#   CPU smoke test: DEVICE=cpu PRESET=tiny CONTEXTS=12,20 STEPS=5 \
#       CHEAP_DRAFTER=self:layers=0,3 bash bench/device_check.sh
# The transformers peer does not run here: at the released shape it holds a second
# copy of the weights (~102 GB with ours), see bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-released}
CONTEXTS=${CONTEXTS:-512,2048,8192}
STEPS=${STEPS:-8}
CHEAP_DRAFTER=${CHEAP_DRAFTER:-self:layers=0,5}  # 2 of 30 layers: ~14% of the bytes
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Inductor's cache in one place: the later runs reuse what the first one compiled.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/diffgem-inductor}
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/nvidia-smi.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
common=(--backend torch --device "$DEVICE" --weights device --preset "$PRESET")
status=0
run() {
  echo "== bench.run $*"
  "$PY" -m bench.run "$@" "${common[@]}" --out "$OUT" >/dev/null \
    || { echo "failed: bench.run $*"; status=1; }
}
step=(step --context "$CONTEXTS" --steps "$STEPS" --repeats 3 --warmup 1 --measure)
run "${step[@]}"
run "${step[@]}" --compile default
run "${step[@]}" --compile reduce-overhead
# FP8 (e4m3, per-row scales): Linear layers through torch._scaled_mm; the experts'
# weights are fp8 in memory, dequantized per call (no fused fp8 grouped GEMM yet)
run "${step[@]}" --quantization fp8
run generate --context 512 --canvases 2 --max-denoising-steps 16 --repeats 2 \
  --warmup 1 --compile default
run spec-cost --context 512 --steps "$STEPS" --repeats 2 --warmup 1 \
  --drafter self --drafter "$CHEAP_DRAFTER"
"$PY" -m bench.device_table "$OUT"
exit $status
