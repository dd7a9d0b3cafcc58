#!/usr/bin/env bash
# The embedded demo on one GPU, end to end in one go (about 9 minutes on an H100):
#   teacher -> ODE pairs -> ODE init -> Self Forcing DMD -> drift eval (causal init vs Self Forcing, same
#   prompts and seeds, 6x the training length through the rolling cache) -> fp16 export with bundled parts.
#
#   scripts/train_toy_gpu.sh [RESULTS_DIR] [extra args for python -m self_forcing.training]
#
# Works from a plain checkout (no install): the repository root is the package `self_forcing`, so it is made
# importable through a symlink. Results: the export, eval.json (drift curves), curves.json (training losses),
# eval_samples.npz (a few decoded eval videos), the causal-init export, train.log. Rerunning resumes the training stages from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-runs/toy_gpu_results}}
shift || true
RUN_DIR=${RUN_DIR:-runs/toy_gpu}
mkdir -p "$RESULTS" "$RUN_DIR"
PKG=$(mktemp -d)
ln -s "$PWD" "$PKG/self_forcing"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
set -o pipefail
$PY -m self_forcing.training --config training/configs/toy_gpu.toml --set run.out_dir="\"$RUN_DIR\"" \
    --set run.progress=false "$@" 2>&1 | tee "$RESULTS/train.log"
$PY -m self_forcing.training.curves "$RUN_DIR" "$RESULTS/curves.json"
for f in eval.json eval_samples.npz self_forcing_toy.safetensors causal_init_toy.safetensors; do
    [ -f "$RUN_DIR/$f" ] && cp "$RUN_DIR/$f" "$RESULTS/"
done
ls -la "$RESULTS"
