#!/usr/bin/env bash
# The project's checks on a lent NVIDIA GPU, in under 10 minutes, every figure
# under one results folder:
#
#   pip install "mlx[cuda12]" && pip install torch diffusers transformers peft   # CUDA builds
#   bash scripts/gpu_check.sh [-o RESULTS_DIR] [--tiny]
#
# Steps (each a log RESULTS/<step>.txt, its figures in RESULTS/<step>.json where
# it writes some; RESULTS/steps.txt records each step's exit code and seconds;
# RESULTS/meta.json the machine, libraries and devices; RESULTS/results.json
# all of it together):
#   tests     the fast test subset on MLX's default device (the GPU backend)
#   dit       a full-size DiT forward (30 blocks of Fun-InP-1.3B, bfloat16,
#             random weights, 81x480x832: 32,760 tokens) in MLX and in diffusers
#   branch    the dual-branch forward (2 x 32,760 tokens), Effect and Quality experts
#   vae       VAE encode and decode at 81x480x832
#   unet      one U-Net optimization iteration, MLX vs torch (384x672, batch 16)
#   train     one expert training step at full width (1536) and depth (30)
#   fixtures  parity/make_fixtures.py's reference on CUDA (meta.json says so),
#             compared with the committed CPU fixture
#
# Caps per step (a step past its cap is killed, recorded rc=124): 150 + 120 + 60 +
# 90 + 60 + 60 + 30 s, under 10 minutes with the start-up. The U-Net step's torch
# side runs where parity/bench_optimize.py puts it.
# On a machine where MLX's default device is not a CUDA GPU, or with --tiny, the
# same steps run at tiny sizes on the CPU (CI runs it so: parity/test_gpu_check.py).
# Environment: PYTHON (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT="gpu-check-results/$(date -u +%Y%m%dT%H%M%SZ)"
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -o) OUT="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (-o DIR, --tiny)" >&2; exit 2 ;;
  esac
done
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "gpu_check.sh: $OUT exists and is not empty (give another -o)" >&2
  exit 2
fi
mkdir -p "$OUT"

MODE=$("$PY" parity/gpu_check.py mode) || { echo "gpu_check.sh: cannot import mlx with $PY" >&2; exit 2; }
[ "$TINY" = 1 ] && MODE=cpu  # tiny sizes (on MLX's default device, torch on the CPU)
"$PY" parity/gpu_check.py meta "$OUT/meta.json"
echo "gpu_check.sh: mode $MODE, results in $OUT"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, record exit code and seconds
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/steps.txt"
}

if [ "$MODE" = gpu ]; then
  step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_transformer.py tests/test_vae.py \
    tests/test_branch_forward.py tests/test_branch_attention.py tests/test_lora_replica.py tests/test_sampling.py \
    tests/test_windows.py tests/test_unet.py
  step dit 120 "$PY" parity/bench_transformer.py --dim 1.3b --layers 30 --frames 21 --height 60 --width 104 \
    --dtype bfloat16 --repeats 1 --device cuda
  step branch 60 "$PY" parity/gpu_check.py branch --layers 30 --grid 21x30x52 --dtype bfloat16 --json "$OUT/branch.json"
  step vae 90 "$PY" parity/bench_vae.py --cases 81x480x832 --dtype bfloat16
  step unet 60 "$PY" parity/bench_optimize.py --size 672x384 --batch 16 --iters 1
  step train 60 "$PY" parity/bench_train.py --layers 30 --dtype bfloat16 --kind quality --kind effect --backend mlx
  step fixtures 30 "$PY" parity/gpu_check.py fixtures "$OUT/fixtures" --device cuda --json "$OUT/fixtures.json"
else
  step tests 60 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_sampling.py tests/test_windows.py
  step dit 60 "$PY" parity/bench_transformer.py --dim 1.3b --layers 1 --frames 2 --height 4 --width 4 \
    --dtype float32 --repeats 1 --device cpu
  step branch 60 "$PY" parity/gpu_check.py branch --layers 1 --grid 2x2x2 --dtype float32 --json "$OUT/branch.json"
  step vae 60 "$PY" parity/bench_vae.py --cases 5x32x32 --dtype float32
  step unet 60 "$PY" parity/bench_optimize.py --size 64x64 --batch 2 --iters 1
  step train 60 "$PY" parity/bench_train.py --layers 1 --frames 2 --height 4 --width 4 --dtype float32 \
    --kind quality --backend mlx
  step fixtures 60 "$PY" parity/gpu_check.py fixtures "$OUT/fixtures" --device cpu --json "$OUT/fixtures.json"
fi
"$PY" parity/gpu_check.py summary "$OUT"
