#!/usr/bin/env bash
# The demo on a fresh machine: install into .venv (CPU PyTorch), then generate an mp4 from a prompt with the
# bundled toy checkpoint (assets/self_forcing_toy.safetensors), streaming chunk by chunk on the CPU.
#
#   bash scripts/demo.sh ["a red circle and a blue square bouncing on a black background"] [out.mp4] [frames]
#
# Long videos go through the rolling KV cache (the window defaults to the training clip length).
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"a red circle and a blue square bouncing on a black background"}
OUT=${2:-demo.mp4}
FRAMES=${3:-48}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import self_forcing.cli, av, tqdm" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    # A CPU build is enough. TORCH_SPEC defaults to the CPU build this project is tested with; elsewhere
    # set e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" (an unpinned torch from
    # PyPI pulls several GB of CUDA packages).
    python -c "import torch" 2>/dev/null || python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
    python -m pip install -q -e ".[video]"
fi
self-forcing generate --prompt "$PROMPT" --frames "$FRAMES" --out "$OUT"
