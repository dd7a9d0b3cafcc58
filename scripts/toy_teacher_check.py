"""Look at a toy teacher before distilling it: its ODE pairs' clean ends ARE its samples (guided Euler, the CFG
the students are distilled from), so decode the first N of them, measure them against their prompts with the
toy-world metrics (prompt mode) and draw every 3rd frame of each as one PNG row.

    python scripts/toy_teacher_check.py RUN_DIR OUT_DIR [--count 8] [--seed 0]

RUN_DIR is a training run's out_dir after the ode_pairs stage (``<RUN_DIR>/ode_pairs/rank*.pt``); ``--seed`` is
that run's ``run.seed`` (the scenes of the pairs are keyed by it). Writes ``OUT_DIR/teacher_samples.png`` and
``OUT_DIR/teacher_check.json`` (per metric the mean over the samples, and the prompts). Needs Pillow and numpy.
The package must be importable as ``self_forcing``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=3, help="draw every k-th frame")
    args = ap.parse_args(argv)
    from PIL import Image

    from self_forcing.toy.codec import ToyCodec
    from self_forcing.toy.metrics import video_metrics
    from self_forcing.training.data import toy_scene
    from self_forcing.training.ode_pairs import load_pairs

    pairs = load_pairs(os.path.join(args.run_dir, "ode_pairs"))
    n = min(args.count, len(pairs["indices"]))
    if n == 0:
        print(f"no ODE pairs in {args.run_dir}", file=sys.stderr)
        return 2
    latents = pairs["trajectories"][:n, -1].float()  # [n, C, F, h, w], the clean ends
    video = ToyCodec().decode(latents).clamp(-1, 1)  # [n, 3, F, H, W]
    prompts = [toy_scene(args.seed, "ode_pairs", int(i))[0].prompt for i in pairs["indices"][:n]]
    metrics = video_metrics(video, prompts)
    summary = {k: (None if np.isnan(v).all() else float(np.nanmean(v))) for k, v in metrics.items()}
    os.makedirs(args.out_dir, exist_ok=True)
    frames = ((video.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    picks = list(range(0, frames.shape[1], args.every))
    size, pad = frames.shape[2], 2
    sheet = np.full((n * (size + pad), len(picks) * (size + pad), 3), 60, np.uint8)
    for r in range(n):
        for c, f in enumerate(picks):
            sheet[r * (size + pad):r * (size + pad) + size, c * (size + pad):c * (size + pad) + size] = frames[r, f]
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(
        os.path.join(args.out_dir, "teacher_samples.png"))
    result = {"run_dir": args.run_dir, "count": n, "metrics_mean": summary, "prompts": prompts}
    with open(os.path.join(args.out_dir, "teacher_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"count": n, **{k: v for k, v in summary.items() if v is not None}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
