#!/usr/bin/env bash
# GPU measurements of the CUDA-graph step (H100, one device call, ~6 min): correctness checks (graphs
# replay exactly the eager kernels; staged noise == CPU noise), generator with graphs (profiled: kernels
# and the host's CUDA calls), the FP8 opt-in with graphs, end to end with the streaming VAE decode, and
# the CLI on CUDA. Run from the repository root:
#     bash benchmarks/speed_round.sh          # results (JSON + logs) go to $OUT (or ./gpu_out)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -i "PASSED\|FAILED"
python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --profile --json "$OUT/graphs.json" 2>&1 \
    | grep -v -i warn | grep -v "^      " | tail -22
python3 benchmarks/bench_stream.py --fp8 --cuda-graphs --check --profile --json "$OUT/fp8_graphs.json" 2>&1 \
    | grep -v -i warn | tail -30 | head -20
timeout 300 python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --vae --compile-vae --repeats 3 \
    --json "$OUT/e2e_graphs.json" 2>&1 | grep -v -i warn | grep -v "^      " | tail -8
python3 benchmarks/cli_gpu_check.py 2>&1 | grep CHECK | tee "$OUT/cli.log"
