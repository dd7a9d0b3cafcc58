#!/usr/bin/env bash
# GPU measurements of the CUDA-graph step (H100, one device call, ~7 min): correctness checks (graphs
# replay exactly the eager kernels; staged noise == CPU noise), generator with graphs (bf16, profiled,
# and the FP8 opt-in), end to end with the streaming VAE decode. Run from the repository root:
#     bash benchmarks/speed_round.sh          # results (JSON + logs) go to $OUT (or ./gpu_out)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -i "graph\|noise\|PASSED\|FAILED"
python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --check --profile --json "$OUT/graphs.json" 2>&1 \
    | grep -v -i warn | tail -28
python3 benchmarks/bench_stream.py --fused-kernels --json "$OUT/eager.json" 2>&1 | grep -v -i warn | tail -3
python3 benchmarks/bench_stream.py --fp8 --cuda-graphs --profile --json "$OUT/fp8_graphs.json" 2>&1 | grep -v -i warn | tail -26
timeout 300 python3 benchmarks/bench_stream.py --fused-kernels --cuda-graphs --vae --compile-vae --repeats 3 \
    --json "$OUT/e2e_graphs.json" 2>&1 | grep -v -i warn | tail -7
