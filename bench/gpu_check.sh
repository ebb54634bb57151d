#!/usr/bin/env bash
# Both benchmarks on one CUDA GPU in bf16 with channels_last, in under 5 minutes; prints the figures.
#
#   bench/gpu_check.sh                 # PYTHON=... to pick the interpreter (default: .venv/bin/python)
#   COMPILE=1 bench/gpu_check.sh       # also time the torch.compile'd generator (adds ~1-2 min)
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
