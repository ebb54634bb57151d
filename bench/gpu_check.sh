#!/usr/bin/env bash
# Both benchmarks on one CUDA GPU in bf16 with channels_last, in under 5 minutes; prints the figures.
#
#   bench/gpu_check.sh                 # PYTHON=... to pick the interpreter (default: .venv/bin/python)
#   COMPILE=1 bench/gpu_check.sh       # also time the torch.compile'd generator (adds ~1-2 min)
#   FOLDER=1 bench/gpu_check.sh        # also a folder run end to end (bench/folder.py, 8 volumes of
#                                      # 512 x 512 x 80-120, small preset, bf16), with batches spanning
#                                      # volumes off and on, and GPU utilisation (adds ~3-5 min)
#
# Needs a CUDA build of torch. Figures to compare with the goals (bench/README.md): the training
# step at 256 x 256, batch 4 (25,000 steps in under 15 minutes = 36 ms/step or less) and
# translation at 256 x 256 (above 2,000 slices/s).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
    PYTHON="$(command -v python3)"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== training step, paper preset, 256 x 256, batch 4, bf16 (reference: fp32, literal)"
timeout 150 "$PYTHON" bench/train_step.py --preset paper --image-size 256 --batch-size 4 \
    --steps 30 --warmup 5 --device cuda --precision bf16

if [[ "${COMPILE:-0}" == "1" ]]; then
    echo "== training step with the torch.compile'd generator and shape controller"
    timeout 180 "$PYTHON" bench/train_step.py --preset paper --image-size 256 --batch-size 4 \
        --steps 30 --warmup 5 --device cuda --precision bf16 --compile --no-reference
fi

echo "== translation, paper preset, 256 x 256, bf16, batch 64 (loop: one slice at a time, fp32)"
timeout 120 "$PYTHON" bench/translate.py --preset paper --image-size 256 --slices 2048 \
    --batch-size 64 --rounds 3 --device cuda --precision bf16

if [[ "${FOLDER:-0}" == "1" ]]; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > /tmp/targan-gpu-util.txt &
    sampler=$!
    for span in off on; do
        echo "== folder run, small preset, bf16, batches spanning volumes $span"
        timeout 240 "$PYTHON" bench/folder.py --volumes 8 --rounds 2 --device cuda --precision bf16 \
            --batch-size 64 --span "$span"
    done
    kill "$sampler" || true
    sort -n /tmp/targan-gpu-util.txt | awk '{v[NR]=$1} END {if (NR) print "GPU utilisation over the folder runs: median " v[int((NR+1)/2)] " %, samples " NR}'
fi
