#!/usr/bin/env bash
# Every GPU figure of the README's Benchmarks section, in two device calls of < 10 minutes each (H100):
#     bash benchmarks/pending_gpu.sh          # checks, generator variants, FP8, VAE, end to end, CLI, nodes
#     bash benchmarks/pending_gpu.sh long     # the 2 001-frame rolling-cache run (~5.5 min)
# Run from the repository root on the GPU machine; JSON and logs go to $OUT (or ./gpu_out). Compare only
# figures taken on the same device kind.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/sf_pkg && ln -sfn "$PWD" /tmp/sf_pkg/self_forcing && export PYTHONPATH=/tmp/sf_pkg
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 benchmarks/bench_stream.py"
if [ "${1:-}" = "long" ]; then
    timeout 560 $B --fused-kernels --cuda-graphs --repeats 1 --window 21 --sink 3 --long 2001 \
        --json "$OUT/long.json" 2>&1 | grep -v -i warn | tail -26
    exit
fi
# correctness of the CUDA paths (Triton kernels, FlexAttention, graphs, staged noise), the nodes and the CLI
python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -i "PASSED\|FAILED"
python3 benchmarks/nodes_gpu_check.py 2>&1 | grep -v -i warn | tee "$OUT/nodes.log" | tail -1
python3 benchmarks/cli_gpu_check.py 2>&1 | grep CHECK | tee "$OUT/cli.log"
# generator: fused kernels with and without CUDA graphs (profiled), FP8 opt-in
$B --fused-kernels --cuda-graphs --check --profile --json "$OUT/graphs.json" 2>&1 | grep -v -i warn | tee "$OUT/graphs.log" | head -16
$B --fused-kernels --json "$OUT/fused.json" 2>&1 | grep -v -i warn | tail -3
$B --fp8 --cuda-graphs --check --json "$OUT/fp8.json" 2>&1 | grep -v -i warn | tail -4
# streaming decode and end to end
timeout 200 $B --fused-kernels --cuda-graphs --vae --compile-vae --repeats 3 --json "$OUT/e2e.json" 2>&1 \
    | grep -v -i warn | tail -4
python3 benchmarks/bench_vae.py --no-whole --chunk 3 2>&1 | tail -2 | tee "$OUT/vae_eager.log"
