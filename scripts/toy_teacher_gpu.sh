#!/usr/bin/env bash
# A toy teacher alone, time-boxed, then judged before any distillation (one device call):
#   teacher (flow matching, training/configs/toy_gpu.toml, TEACHER_S seconds of training loop)
#   -> 16 ODE pairs with the config's sampler (substeps 6, CFG 3) and 16 with 4x the substeps
#   -> scripts/toy_teacher_check.py on each (metrics + contact sheet) -> the EMA teacher in bf16 for later calls.
#
#   scripts/toy_teacher_gpu.sh RESULTS_DIR [extra --set args for the teacher]
#   (env: TEACHER_S=450 RUN_DIR=/tmp/toy_teacher PYTHON=python3 CFG=training/configs/toy_gpu.toml)
#
# Results: teacher.log, curves.json, check_s6/ and check_s24/ (teacher_check.json, teacher_samples.png),
# teacher_bf16.safetensors (world.teacher_path for the later stages).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?RESULTS_DIR}
shift || true
RUN_DIR=${RUN_DIR:-/tmp/toy_teacher}
TEACHER_S=${TEACHER_S:-450}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS" "$RUN_DIR"
PKG=$(mktemp -d)
ln -s "$PWD" "$PKG/self_forcing"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CFG=${CFG:-training/configs/toy_gpu.toml}
train() { $PY -m self_forcing.training --config $CFG --set run.progress=false "$@"; }
set -o pipefail
train --out-dir "$RUN_DIR" --stages teacher --set teacher.steps=1000000 --set teacher.time_budget_s="$TEACHER_S" \
    --set run.checkpoint_every=2000 "$@" 2>&1 | grep -v -i warn | tee "$RESULTS/teacher.log" | tail -4
$PY -m self_forcing.training.curves "$RUN_DIR" "$RESULTS/curves.json"
for sub in 6 24; do
    dir="$RUN_DIR-s$sub"
    mkdir -p "$dir" && cp "$RUN_DIR/teacher.safetensors" "$dir/"
    train --out-dir "$dir" --stages ode_pairs --set ode_pairs.count=16 --set ode_pairs.substeps=$sub \
        --set ode_pairs.time_budget_s=0 2>&1 | grep -v -i warn | tail -2
    $PY scripts/toy_teacher_check.py "$dir" "$RESULTS/check_s$sub" --count 8 | tail -3
done
$PY - "$RUN_DIR/teacher.safetensors" "$RESULTS/teacher_bf16.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file, safe_open
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
t = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(sys.argv[1]).items()}
save_file(t, sys.argv[2], metadata=meta)
print("teacher (bf16):", sys.argv[2], sum(v.numel() for v in t.values()), "values")
PY
ls -la "$RESULTS"
