#!/usr/bin/env bash
# GPU benchmark: tokens/s and MFU of jaxgpt's train step, GPT-2 124M, seq 1024, bfloat16 compute
# (float32 master weights), one GPU, against PyTorch at its best (torch.compile, fused AdamW, SDPA
# flash attention, bf16 autocast) and PyTorch eager (bf16 autocast). Fits a 10-minute device call.
#
#   bash tools/bench_gpu.sh                 # uses .venv if present, else python3
#   BATCH=16 STEPS=20 bash tools/bench_gpu.sh   # batch rows of 1024 tokens (default 32, as gpt2-chat.yaml)
#   PROFILE=/tmp/prof bash tools/bench_gpu.sh   # also trace each jaxgpt variant and print where the device time goes
#   bash tools/bench_gpu.sh --gpu-variants all  # more tools/bench.py options: here every one of GPU_VARIANTS
#   BATCH=2 STEPS=8 bash tools/bench_gpu.sh --quick   # a dry run on a CPU: tiny model, seq 128
#
# Needs a CUDA build of jax (pip install "jaxgpt[cuda]") and, for the PyTorch sides, a CUDA torch.
# First tools/check_gpu.py (versions; jaxgpt's Pallas kernels against float32 math, cuDNN and flash
# attention against jaxgpt's own, the kernels against XLA's fusions in a small model, all on the device), then
# tools/bench.py --gpu, each side in its own process: jaxgpt's defaults on packed SFT rows (the
# packing mask) and on causal rows, packed rows with model.attention=flash (jaxgpt.flash: the mask
# from the segment ids; GPU_HEADLINE), then torch.compile, then torch eager. On a CPU (the dry
# run) cuDNN's attention runs as XLA's and the flash kernel in Pallas' interpreter.
# Every side prints tokens/s, MFU, peak device memory, time to first step (process start to the
# first step done, compilation included) and its losses at step 1 and step 10 (same weights and
# batches on every side: they agree within bf16 rounding).
# MFU = tokens/s x training FLOPs per token (6N + attention, as jaxgpt.train logs it) / peak bf16
# FLOP/s of the device (989 TFLOP/s dense for H100/H200 SXM; override with PEAK_FLOPS). Tokens/s
# are timed twice: steps dispatched back to back as jaxgpt.train runs them (the headline), and
# waiting for each step (which adds the host's dispatch to every step).
# Results: printed, and written to $RESULTS (default bench_gpu.json); record them in docs/benchmarks.md
# (current numbers) and docs/benchmarks-history.md (the run's details).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" tools/check_gpu.py
exec "$PY" tools/bench.py --gpu --batch "${BATCH:-32}" --steps "${STEPS:-10}" --worker-timeout "${WORKER_TIMEOUT:-300}" \
  ${PEAK_FLOPS:+--peak-flops "$PEAK_FLOPS"} ${PROFILE:+--profile "$PROFILE"} --out "${RESULTS:-bench_gpu.json}" "$@"
