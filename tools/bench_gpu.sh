#!/usr/bin/env bash
# GPU benchmark: tokens/s and MFU of jaxgpt's train step, GPT-2 124M, seq 1024, bfloat16 compute
# (float32 master weights), one GPU, plus the same step in PyTorch eager (bf16 autocast) for the ratio.
#
#   bash tools/bench_gpu.sh                 # uses .venv if present, else python3
#   BATCH=16 STEPS=20 bash tools/bench_gpu.sh   # batch rows of 1024 tokens (default 32, as gpt2-chat.yaml)
#   PROFILE=/tmp/prof bash tools/bench_gpu.sh   # also trace each variant and print where the device time goes
#   bash tools/bench_gpu.sh --gpu-variants 5,8,9  # more tools/bench.py options: here three of GPU_VARIANTS only
#
# Needs a CUDA build of jax (pip install "jaxgpt[cuda]") and, for the PyTorch side, a CUDA torch.
# First tools/check_gpu.py (versions; jaxgpt's Pallas kernels against float32 math, cuDNN attention
# against jaxgpt's own, the kernels against XLA's fusions in a small model, all on the device), then
# tools/bench.py --gpu: each jaxgpt variant (attention einsum / cudnn, vocab padding, with and
# without a packing mask) in its own process, then torch.
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
