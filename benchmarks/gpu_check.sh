#!/usr/bin/env bash
# What one GPU can show about fedmkt, in one script (under 8 minutes on one GPU):
#   1. the tiny federation on CUDA in bf16-mixed: losses finite, adapters saved, and a run stopped
#      after round 1 then continued with --resume equals the uninterrupted run (numbers and adapter bytes);
#   2. the KD-memory benchmark at V = 262,144 with peaks from torch.cuda.max_memory_allocated;
#   3. whether the sparse KD backward (scatter_add_) is bitwise reproducible on CUDA;
#   4. throughput: full-size random-init Gemma-3-270M and SmolLM2 at length 512 in bf16, tokens/s,
#      MFU and peak memory per phase, questions/s in evaluation (gpu_throughput.py).
# No network: tiny random-init models whose config.json and real tokenizers (~35 MiB) come from
# ASSETS, written beforehand where the embedded model packages are installed:
#   python benchmarks/gpu_check.py assets gpu_check_assets
#   ASSETS=gpu_check_assets bash benchmarks/gpu_check.sh
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (fp32, smaller KD sizes): a dry run of the plumbing.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
ASSETS="${ASSETS:-gpu_check_assets}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d -t fedmkt_gpu_check.XXXXXX)}"
mkdir -p "$WORK"
export FEDMKT_CACHE="$WORK/cache"  # vocabulary maps are rebuilt here, nothing is read from a user cache
START=$SECONDS

step() { printf '\n== %s (%ds)\n' "$1" "$((SECONDS - START))"; }

step "environment"
python - "$DEVICE" <<'PY'
import sys, torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device. Fix: run on a GPU machine, or GPU_CHECK_DEVICE=cpu for a dry run")
    print(f"device: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
if [[ ! -f "$ASSETS/gemma3/tokenizer.json" || ! -f "$ASSETS/smollm2/tokenizer.json" ]]; then
  echo "no assets in $ASSETS. Fix: python benchmarks/gpu_check.py assets $ASSETS (where the embedded model packages are installed)" >&2
  exit 1
fi
python benchmarks/gpu_check.py config "$ASSETS" "$WORK/tiny_gpu.yaml" --device "$DEVICE"

fit() { timeout 600 python -m fedmkt.cli fit --config "$WORK/tiny_gpu.yaml" --logging.wandb false "$@"; }

step "1a. tiny federation, 2 rounds, uninterrupted"
fit --run_dir "$WORK/full" >"$WORK/full.log" 2>&1 || { tail -40 "$WORK/full.log"; exit 1; }
grep -A5 "^| party" "$WORK/full.log" || true
python benchmarks/gpu_check.py verify "$WORK/full"

step "1b. the same run stopped after round 1, then --resume to round 2"
fit --run_dir "$WORK/resumed" --federation.rounds 1 >"$WORK/round1.log" 2>&1 || { tail -40 "$WORK/round1.log"; exit 1; }
fit --resume "$WORK/resumed" --federation.rounds 2 >"$WORK/resume.log" 2>&1 || { tail -40 "$WORK/resume.log"; exit 1; }
python benchmarks/gpu_check.py verify "$WORK/resumed"
python benchmarks/gpu_check.py same "$WORK/full" "$WORK/resumed" || echo "(an inexact resume on CUDA: see the determinism step below)"

step "2. KD memory"
if [[ "$DEVICE" == cuda ]]; then
  timeout 300 python benchmarks/kd_memory.py --device cuda --scratch "$WORK"
else
  timeout 300 python benchmarks/kd_memory.py --device cpu --vocab 16384 --length 128 --ks 16 --scratch "$WORK"
fi

step "3. determinism of the KD backward"
if [[ "$DEVICE" == cuda ]]; then
  timeout 120 python benchmarks/kd_determinism.py --device cuda
else
  timeout 120 python benchmarks/kd_determinism.py --device cpu --vocab 16384 --length 64
fi

step "4. throughput per phase (full-size models, length 512, bf16)"
if [[ "$DEVICE" == cuda ]]; then
  timeout 420 python benchmarks/gpu_throughput.py --assets "$ASSETS" --out "$WORK/throughput.json"
else
  timeout 420 python benchmarks/gpu_throughput.py --assets "$ASSETS" --device cpu --quick
fi

step "done"
echo "work folder: $WORK"
