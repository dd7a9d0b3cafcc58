"""Drift metric: how far each frame of a generated toy-world video strays from the world's rules.

A thin layer over :mod:`self_forcing.toy.metrics` (which has the definitions): :func:`frame_metrics` gives
the per-frame metrics of one video against its prompt (or its scene), :func:`drift_curve` their mean over
videos per frame index. All errors are ~0 for a rendered toy video; a frozen, shuffled, blurred, recoloured,
washed-out or drifting one scores clearly worse (tests/test_toy_metrics.py, tests/test_drift.py).

CLI: ``python -m self_forcing.training.drift VIDEO.mp4 --prompt "..." [--json out.json]`` (.mp4 through
PyAV; .pt / .npy tensors [3, T, H, W] in [-1, 1], or uint8 [T, H, W, 3]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import Sequence

import numpy as np
import torch

from ..toy.metrics import ERRORS, METRICS, default_min_area, sharpness_statistic, video_metrics  # noqa: F401
from ..toy.scene import PromptAttributes, Scene
from ..toy.tracks import connected_components, count_objects, estimate_background, saturation  # noqa: F401

TABLE = ("background_error", "colour_error", "count_error", "identity_error", "sharpness_error", "motion_error",
         "speed_error", "velocity_error", "presence_error", "object_count", "motion", "presence")


def frame_metrics(video, prompt: str | PromptAttributes | Scene, min_area: int | None = None,
                  start_frame: int | None = None) -> dict[str, np.ndarray]:
    """Per-frame metrics of one video [3, T, H, W] in [-1, 1] against its prompt (or Scene, shown from
    ``start_frame``) -> {name: float64 [T]} for every name of :data:`METRICS` (NaN where undefined)."""
    v = torch.as_tensor(video)
    if v.dim() != 4 or v.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] in [-1, 1], got shape {tuple(v.shape)}; "
                         "use load_video() for files or permute channels first")
    out = video_metrics(v[None], [prompt], None if start_frame is None else [start_frame], min_area=min_area)
    return {name: values[0] for name, values in out.items()}


def drift_curve(videos, prompts: Sequence[str], min_area: int | None = None) -> dict[str, np.ndarray]:
    """Metrics averaged over videos per frame index -> {name: [T_max]} plus ``num_videos`` [T_max].

    ``videos``: a batch [B, 3, T, H, W] or a list of [3, T_i, H, W]; frame i averages the videos that
    have it (NaN entries are skipped).
    """
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    if len(videos) == 0:
        raise ValueError("drift_curve needs at least one video")
    per = [frame_metrics(v, p, min_area) for v, p in zip(videos, prompts)]
    t_max = max(len(m["count_error"]) for m in per)
    curve = {}
    for name in METRICS:
        table = np.full((len(per), t_max), np.nan)
        for i, m in enumerate(per):
            table[i, : len(m[name])] = m[name]
        with np.errstate(all="ignore"):
            valid = ~np.isnan(table)
            curve[name] = np.where(valid.any(0), np.nansum(table, 0) / np.maximum(valid.sum(0), 1), np.nan)
    curve["num_videos"] = np.array([sum(len(m["count_error"]) > t for m in per) for t in range(t_max)],
                                   dtype=np.float64)
    return curve


# -------------------------------------------------------------------------------------------- CLI
def load_video(path: str) -> torch.Tensor:
    """Read .mp4 (etc., via PyAV), .pt or .npy -> float32 [3, T, H, W] in [-1, 1]."""
    if path.endswith((".pt", ".pth")):
        data = torch.load(path, map_location="cpu", weights_only=True)
    elif path.endswith(".npy"):
        data = torch.from_numpy(np.load(path))
    else:
        try:
            import av
        except ImportError as e:
            raise ValueError(f"reading {path!r} needs PyAV: pip install av (or pass a .pt/.npy tensor)") from e
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise ValueError(f"no video frames in {path!r}")
        data = torch.from_numpy(np.stack(frames))  # [T, H, W, 3] uint8
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path!r} does not hold a tensor")
    if data.dim() == 5 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 4:
        raise ValueError(f"expected a video [3, T, H, W] or [T, H, W, 3], got shape {tuple(data.shape)}")
    if data.dtype == torch.uint8:
        data = data.to(torch.float32) / 127.5 - 1
    if data.shape[0] != 3 and data.shape[-1] == 3:
        data = data.permute(3, 0, 1, 2)
    return data.to(torch.float32).contiguous()


def format_table(metrics: dict[str, np.ndarray], names: Sequence[str] = TABLE) -> str:
    width = max(len(n) for n in names) + 1
    rows = [" frame " + " ".join(f"{n:>{width}}" for n in names)]
    for t in range(len(metrics[names[0]])):
        rows.append(f"{t:6d} " + " ".join(f"{metrics[n][t]:{width}.4f}" for n in names))
    with warnings.catch_warnings():  # all-NaN columns print nan
        warnings.simplefilter("ignore", RuntimeWarning)
        rows.append("  mean " + " ".join(f"{np.nanmean(metrics[n]):{width}.4f}" for n in names))
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m self_forcing.training.drift",
                                 description="Per-frame drift of a toy-world video against its prompt.")
    ap.add_argument("video", help=".mp4 (PyAV), .pt or .npy video")
    ap.add_argument("--prompt", required=True, help="the toy prompt the video was generated from")
    ap.add_argument("--json", help="also write the per-frame metrics to this JSON file")
    ap.add_argument("--min-area", type=int, default=None, help="smallest component counted as an object")
    args = ap.parse_args(argv)
    try:
        metrics = frame_metrics(load_video(args.video), args.prompt, args.min_area)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompt": args.prompt, "video": args.video,
                       "metrics": {k: [None if math.isnan(x) else float(x) for x in v] for k, v in metrics.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
