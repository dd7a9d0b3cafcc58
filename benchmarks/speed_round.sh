#!/usr/bin/env bash
# Second round of GPU measurements (H100, one device call, ~7 min): correctness checks, the CUDA-graph
# probe, FP8 with its Triton quantisation, the VAE decode profile and variants, and end to end with
# the high-priority decode stream. Run from the repository root:  bash benchmarks/speed_round.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -i "fp8\|PASSED\|FAILED"
python3 benchmarks/graph_probe.py 2>&1 | grep -v -i warn | tee "$OUT/graph.log"
python3 benchmarks/bench_stream.py --fp8 --check --json "$OUT/fp8.json" 2>&1 | grep -v -i warn | tail -4
python3 benchmarks/bench_vae.py --no-whole --chunk 3 --no-cudnn-benchmark 2>&1 | tail -3 | tee "$OUT/vae_eager_nobench.log"
python3 benchmarks/bench_vae.py --no-whole --chunk 3 --profile 2>&1 | tail -22 | tee "$OUT/vae_eager.log"
timeout 240 python3 benchmarks/bench_vae.py --no-whole --chunk 3 --compile --profile 2>&1 | tail -22 | tee "$OUT/vae_compiled.log"
timeout 300 python3 benchmarks/bench_stream.py --fused-kernels --vae --compile-vae --repeats 3 \
    --json "$OUT/e2e.json" 2>&1 | grep -v -i warn | tail -6
