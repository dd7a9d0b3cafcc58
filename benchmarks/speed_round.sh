#!/usr/bin/env bash
# GPU measurements of the CUDA-graph step (H100, one device call, ~7 min): correctness checks (graphs
# replay exactly the eager kernels), generator with graphs (bf16 and the FP8 opt-in), end to end with the
# streaming VAE decode, and a rolling-cache run with graphs. Run from the repository root:
#     bash benchmarks/speed_round.sh          # results (JSON + logs) go to $OUT (or ./gpu_out)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -i "graph\|fp8\|PASSED\|FAILED"
python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --check --json "$OUT/graphs.json" 2>&1 | grep -v -i warn | tail -5
python3 benchmarks/bench_stream.py --fp8 --cuda-graphs --json "$OUT/fp8_graphs.json" 2>&1 | grep -v -i warn | tail -4
timeout 300 python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --vae --compile-vae --repeats 3 \
    --json "$OUT/e2e_graphs.json" 2>&1 | grep -v -i warn | tail -7
timeout 200 python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --repeats 1 --window 21 --sink 3 \
    --long 501 --json "$OUT/long_graphs.json" 2>&1 | grep -v -i warn | tail -12
