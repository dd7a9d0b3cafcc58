#!/usr/bin/env bash
# The GPU measurements still owed by the speed and streaming-output issues, in one device call
# (about 6-8 minutes on an H100). Run from the repository root on the GPU machine:
#     bash benchmarks/pending_gpu.sh            # results (JSON + logs) go to $OUT (or ./gpu_out)
# Prints one table per benchmark; compare only figures taken on the same device kind.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
# 1. correctness of the CUDA paths (Triton kernels, FlexAttention, streaming vs full sequence)
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | tail -4
# 2. generator: fused kernels (first chunk now yielded before its cache pass) and the FP8 opt-in
python3 benchmarks/bench_stream.py --fused-kernels --check --json "$OUT/fused.json" 2>&1 | grep -v -i warn | tail -4
python3 benchmarks/bench_stream.py --fp8 --check --json "$OUT/fp8.json" 2>&1 | grep -v -i warn | tail -4
# 3. streaming decode and end to end (decode overlapped on a side stream vs in line)
timeout 300 python3 benchmarks/bench_stream.py --fused-kernels --vae --compile-vae --repeats 3 \
    --json "$OUT/e2e.json" 2>&1 | grep -v -i warn | tail -6
python3 benchmarks/bench_vae.py --compile --chunk 3 2>&1 | tail -6 | tee "$OUT/vae.log"
python3 benchmarks/cli_gpu_check.py 2>&1 | tail -12 | tee "$OUT/cli.log"
