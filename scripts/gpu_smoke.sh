#!/usr/bin/env bash
# GPU smoke test of the whole pipeline on the synthetic dataset (about a minute on one GPU):
# teacher, calibration, a cached and an online distillation, evaluation; then the GPU check.
# Usage (on a machine with CUDA and the dependencies installed): bash scripts/gpu_smoke.sh [OUT]
set -euo pipefail
OUT=${1:-/tmp/cqkd-gpu-smoke}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
common=(--dataset synthetic --train-samples 2000 --epochs 2 --accelerator gpu --devices 1 --quiet --force)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m cqkd train "${common[@]}" --model cnn-large --size 28 --out "$OUT/teacher"
$PY -m cqkd calibrate "$OUT/teacher" --quiet
$PY -m cqkd distill "${common[@]}" --teacher "$OUT/teacher" --size 7 --temperature 4 --out "$OUT/cached"
$PY -m cqkd distill "${common[@]}" --teacher "$OUT/teacher" --size 7 --temperature 4 --teacher-cache off --out "$OUT/online"
$PY -m cqkd evaluate "$OUT/cached" --quiet | grep -E "top1|ece " || true
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{r}/metrics.json")) for r in ("cached", "online"))
print("teacher source:", a["teacher_source"], "/", b["teacher_source"])
print(f"cached top1 {a['top1']:.4f} ece {a['ece']:.4f}; online top1 {b['top1']:.4f} ece {b['ece']:.4f}")
PYEOF
$PY benchmarks/gpu_check.py
