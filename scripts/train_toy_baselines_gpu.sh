#!/usr/bin/env bash
# Self Forcing vs its baselines (causal ODE init, teacher forcing, diffusion forcing) on the toy world at equal
# compute, then the evaluation protocol -- on one GPU, in resumable steps (scripts/toy_baselines_gpu.py):
#
#   scripts/train_toy_baselines_gpu.sh --budget fast [--results DIR]   # one call, ~9 min on an H200
#   scripts/train_toy_baselines_gpu.sh --budget full [--results DIR]   # exits 3 until done: rerun it
#
# Other options: --root DIR (run folders), --seeds S..., --max-wall SECONDS, --set TABLE.KEY=VALUE,
# --copy-exports, --dry-run. Works from a plain checkout: the repository root is the package
# `self_forcing`, made importable through a symlink (as scripts/train_toy_gpu.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=$(mktemp -d)
ln -s "$PWD" "$PKG/self_forcing"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
exec $PY scripts/toy_baselines_gpu.py "$@"
