"""Toy teacher training throughput (steps/s and clips/s) at several batch sizes, the figure that bounds every toy
experiment on the GPU (the world-2 teacher ran 11.5 steps/s at batch 16 on an H200 on 2026-12-03, host-bound).

Each batch size trains the toy teacher of ``--config`` for ``--seconds`` of its training loop in a fresh run folder
(the stage's own time budget), then reads the stage's log: steps done, loop seconds, the last logged loss. Since
2026-12-03 a training step needs no host sync (metrics stay device tensors until a log line; batch inputs go to the
GPU through pinned memory): compare with the figure above.

    python benchmarks/toy_train_throughput.py --batches 16,64 --seconds 40 --out $OUT/toy_throughput.json
    python benchmarks/toy_train_throughput.py --config training/configs/toy_cpu.toml --batches 2 --seconds 5  # CPU

The package must be importable as ``self_forcing`` (PYTHONPATH with a ``self_forcing`` link to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def read_log(run_dir: str) -> dict:
    rows = [json.loads(line) for line in Path(run_dir, "teacher", "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    last = steps[-1]
    return {"steps": last["step"], "loop_s": last["time"], "loss": last["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "training" / "configs" / "toy_gpu.toml"))
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = []
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        run = tempfile.mkdtemp(prefix=f"toy_throughput_b{b}_")
        cmd = [sys.executable, "-m", "self_forcing.training", "--config", args.config, "--stages", "teacher",
               "--set", f'run.out_dir="{run}"', "--set", "run.progress=false", "--set", "run.log_every=25",
               "--set", f"teacher.batch_size={b}", "--set", "teacher.steps=1000000",
               "--set", f"teacher.time_budget_s={args.seconds}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if proc.returncode != 0:
            results.append({"batch": b, "error": proc.stderr[-2000:]})
            print(f"batch {b}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = read_log(run)
        r.update(batch=b, steps_per_s=r["steps"] / r["loop_s"], clips_per_s=r["steps"] * b / r["loop_s"])
        results.append(r)
        print(f"batch {b}: {r['steps']} steps in {r['loop_s']:.1f} s = {r['steps_per_s']:.2f} steps/s, "
              f"{r['clips_per_s']:.0f} clips/s, loss {r['loss']:.4f}")
    text = json.dumps({"config": args.config, "seconds": args.seconds, "results": results}, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
