"""Training curves: the JSON-lines logs of every stage of a run merged into one JSON file.

    python -m self_forcing.training.curves runs/toy_gpu curves.json

Each stage's numeric metrics become lists over the logged steps (losses, gradient norms, ...), with the
step numbers and seconds since the stage started.
"""

from __future__ import annotations

import json
import os
import sys

from .config import STAGES
from .engine import read_jsonl


def collect(run_dir: str) -> dict:
    out = {}
    for stage in STAGES:
        path = os.path.join(run_dir, stage, "log.jsonl")
        if not os.path.isfile(path):
            continue
        records = read_jsonl(path)
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
        curves = {"step": [r["step"] for r in records]}
        for k in keys:
            curves[k] = [r.get(k) for r in records]
        notes = [r["note"] for r in records if "note" in r]
        if notes:
            curves["notes"] = notes
        out[stage] = curves
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m self_forcing.training.curves RUN_DIR OUT.json", file=sys.stderr)
        return 2
    data = collect(argv[0])
    with open(argv[1], "w") as fh:
        json.dump(data, fh)
    for stage, c in data.items():
        parts = []
        for k in (k for k in c if k.endswith("loss")):
            vals = [v for v in c[k] if v is not None]
            if vals:
                parts.append(f"{k} {vals[0]:.4g} -> {vals[-1]:.4g}")
        summary = ", ".join(parts)
        print(f"{stage}: {c['step'][-1] if c['step'] else 0} steps; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
