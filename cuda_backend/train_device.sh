#!/usr/bin/env bash
# Train the embedded model's larger twin on a lent NVIDIA GPU (the `device` tool) in
# one call: ~10 minutes of a GPU do what weeks of a 2-core CPU cannot (issue 23).
# Nothing is downloaded there: the corpus travels compressed, the model comes back in
# parts of at most 15 MiB (the device tool returns 8 files of 16 MiB at most).
#
# Here, once (a 20M-token corpus is ~9 MB in xz; the wheels as in cuda_backend/wheels.py;
# --no-stubs: .pyi stubs teach a model to end annotated headers with ` ...`):
#   python -m cuda_backend.corpus --out runs/corpus4 --no-stubs --stdlib-weight 2 \
#     --tokenizer mlx_diffgem/assets/default/tokenizer.json --wheels runs/wheels \
#     --extra numpy matplotlib mlx_lm huggingface_hub _pytest mlx tqdm jinja2 \
#             tokenizers safetensors
#   tar -cJf runs/corpus.tar.xz -C runs corpus4
# On the GPU (device tool, carry ["runs/corpus.tar.xz"], timeout 600):
#   bash cuda_backend/train_device.sh
# Back here, the exported model (best held-out loss, bf16) and the training log:
#   cat <files_at>/model.tar.* | tar -xf - -C runs/   # -> runs/device-model/
#   python -m bench.quality --model runs/device-model --backend torch ...
#
# CPU smoke test (what tests/test_train_device.py runs):
#   DEVICE=cpu PRESET=tiny MINUTES=0 STEPS=3 CORPUS=... OUT=... \
#     TRAIN_ARGS="--seq-len 40 --canvas 16 --batch 2" bash cuda_backend/train_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-runs/corpus.tar.xz}
OUT=${OUT:-runs/device-train}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-large}    # 22.9M parameters: 45.8 MB in bf16, the package's budget
MINUTES=${MINUTES:-7.5}    # training time; the cosine schedule follows it
STEPS=${STEPS:-1000000}    # an upper bound: the minutes end the run
BATCH=${BATCH:-64}         # 64 x 512 tokens a step
LR=${LR:-1.5e-3}
PY=${PY:-python3}
WORK=${WORK:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/corpus"
[ -f "$CORPUS" ] || { echo "$CORPUS: missing (see the top of $0)"; exit 2; }
tar -xJf "$CORPUS" -C "$WORK/corpus"
data=$(dirname "$(find "$WORK/corpus" -name meta.json | head -1)")
[ -f "$data/train.npy" ] || { echo "$CORPUS: no meta.json + train.npy inside"; exit 2; }
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
# Certainty forcing on the low-noise canvases, as the shipped model was trained, so
# that canvases stop early and passes per canvas stay release-like.
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
"$PY" -m cuda_backend.train --out "$WORK/run" --data "$data" --device "$DEVICE" \
  --preset "$PRESET" --steps "$STEPS" --minutes "$MINUTES" --batch "$BATCH" \
  --lr "$LR" --warmup 100 --cf-weight 0.5 --cf-max-t 0.5 --eval-every 200 \
  --log-every 20 --threads 8 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
cp "$WORK/run/metrics.jsonl" "$OUT/"
"$PY" -m cuda_backend.train --out "$WORK/run" --export "$WORK/device-model" \
  --export-which best --export-dtype bfloat16
tar -cf - -C "$WORK" device-model | split -b 15m -d - "$OUT/model.tar."
# One completion in the log, to see at once whether it writes code (not a measure).
"$PY" -m mlx_diffgem generate --model "$WORK/device-model" --backend torch \
  --device "$DEVICE" --prompt "def fibonacci(n):" --max-tokens 64 --seed 0 \
  2>&1 | tee "$OUT/sample.txt" || echo "sample failed (the model is still in $OUT)"
ls -l "$OUT"
