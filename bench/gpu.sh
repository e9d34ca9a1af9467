#!/usr/bin/env bash
# Step cost of the real-size backbones on a GPU: ViLT-B/32 and BLIP-base (random weights, no download), bf16
# autocast around the forward passes (as `feddat run --precision bf16`), batch 32, on cuda; then the same with
# torch.compile. Run from the repository root:
#
#     bash bench/gpu.sh [OUT]        # OUT defaults to runs/gpu; the printed tables also go to OUT/gpu.log
#
# Each bench writes OUT/<name>/step_cost.json and step_cost.md (docs/performance.md explains the table).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
{
  echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  for backbone in vilt blip; do
    "$PY" bench/step_cost.py --size base --backbone "$backbone" --device cuda --batch-size 32 --precision bf16 \
        --threads 0 --warmup 3 --repeats 24 --out "$OUT/${backbone}-base-bf16"
    "$PY" bench/step_cost.py --size base --backbone "$backbone" --device cuda --batch-size 32 --precision bf16 \
        --compile --threads 0 --warmup 5 --repeats 24 --out "$OUT/${backbone}-base-bf16-compile"
  done
} 2>&1 | tee "$LOG"
