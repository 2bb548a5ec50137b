#!/usr/bin/env bash
# One call on a lent NVIDIA GPU (the `device` tool), at most ~8 minutes on an H100/H200
# with the machine's own torch and no network. The released shape (canvas 256) from
# random bf16 weights made on the GPU (--weights device: no 51 GB checkpoint):
#   1. the step at 512 / 2k / 8k cached tokens: eager, compiled (one decoder layer
#      compiled and reused: compile time in the record), and with CUDA graphs;
#      and with FP8 weights (eager);
#   2. end-to-end generation at 16 passes per canvas (tokens/s);
#   3. the drafters' pass cost next to the target's (spec-cost);
#   4. transformers' reference and ours, each alone in its process with the same
#      random weights (bench/peer_weights.py: the reference's tied weights made once,
#      ~51 GB, not the ~102 GB that from_pretrained builds first);
# floors from the GPU's own measured matmul rate and copy bandwidth (--measure).
# Every record names the expert-GEMM path, the sampler and host syncs per step. A
# short table comes last. Records land in $OUT; commit them under bench/results/.
#
#   run: bash bench/device_check.sh            (from the repository root)
#   CPU smoke test: DEVICE=cpu PRESET=tiny CONTEXTS=12,20 STEPS=5 \
#       CHEAP_DRAFTER=self:layers=0,3 bash bench/device_check.sh
# The peer needs transformers >= 5.23 (DiffusionGemma); the GPU image has 5.17, so
# carry its wheel: here, once, `echo /.whl/ >> .git/info/exclude; pip download
# --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.23.0`,
# and the device call names ".whl" in carry; this script installs it to /tmp/site.
# PEERS=0 skips step 4.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-released}
CONTEXTS=${CONTEXTS:-512,2048,8192}
STEPS=${STEPS:-8}
CHEAP_DRAFTER=${CHEAP_DRAFTER:-self:layers=0,5}  # 2 of 30 layers: ~14% of the bytes
PEERS=${PEERS:-1}
WHEELS=${WHEELS-.whl}  # empty: install nothing
PY=${PY:-python3}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
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
# fp8 weights read as stored by the Triton grouped GEMM, scaled in the kernel (on
# the grouped_mm paths they are dequantized per call)
run "${step[@]}" --quantization fp8
run generate --context 512 --canvases 2 --max-denoising-steps 16 --repeats 2 \
  --warmup 1 --compile default
run spec-cost --context 512 --steps "$STEPS" --repeats 2 --warmup 1 \
  --drafter self --drafter "$CHEAP_DRAFTER"
if [ "$PEERS" = 1 ]; then
  peers=(peers --context "${CONTEXTS%%,*}" --steps "$STEPS" --repeats 3 --warmup 1)
  run "${peers[@]}" --solo ours
  run "${peers[@]}" --solo transformers
fi
"$PY" -m bench.device_table "$OUT"
exit $status
