"""Drift metric: how far each frame of a generated toy-world video strays from the world's rules.

The prompt fixes the background colour, the objects' colours and their number; rendered toy frames
have exact colours and one-pixel antialiased edges. Per frame we measure (all errors are ~0 for a clean
rendered video):

- ``background_error``: RGB distance ([0, 1] units) between the frame's background (per-channel median of
  the border pixels) and the prompt's background colour.
- ``saturation`` / ``saturation_ref`` / ``saturation_error``: mean HSV saturation of the shape pixels, that
  of the ideal pixels (the prompt colour blended with the prompt background at each pixel's estimated
  coverage), and their absolute difference.
- ``colour_error``: mean RGB distance of shape pixels from those ideal pixels (hue/brightness drift).
- ``object_count`` / ``count_error``: objects found (see :func:`count_objects`: connected blobs of shape
  pixels, counted once per prompt colour holding >= ``min_area`` pixels of the blob) and the absolute
  difference to the prompt's count.
- ``sharpness`` / ``sharpness_error``: sqrt(Laplacian energy / gradient energy) of the frame, which scales
  like 1 / edge width whatever the edges' length and contrast, divided by the same statistic on rendered
  reference frames of the prompt; the error is |ratio - 1| (blur lowers the ratio, noise raises it).

Shape pixels: each pixel is assigned the prompt colour whose blend line (background -> colour) passes
nearest; it is a shape pixel when its distance from the background is at least half that colour's.

CLI: ``python -m self_forcing.training.drift VIDEO.mp4 --prompt "..." [--json out.json]`` (.mp4 through
PyAV; .pt / .npy tensors [3, T, H, W] in [-1, 1], or uint8 [T, H, W, 3]).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..toy.world import (BACKGROUND_COLOURS, MAX_SIZE, MIN_SIZE, SHAPE_COLOURS, PromptAttributes, Scene,
                       ToyObject, parse_prompt, render_batch)

METRICS = ("background_error", "saturation", "saturation_ref", "saturation_error", "colour_error",
           "object_count", "count_error", "sharpness", "sharpness_error")
ERRORS = ("background_error", "saturation_error", "colour_error", "count_error", "sharpness_error")


# ---------------------------------------------------------------------------------------- helpers
def _frames01(video) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] (tensor or array) -> float32 CPU [T, H, W, 3] in [0, 1]."""
    v = torch.as_tensor(video).detach().to("cpu", torch.float32)
    if v.dim() != 4 or v.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] in [-1, 1], got shape {tuple(v.shape)}; "
                         "use load_video() for files or permute channels first")
    return ((v.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)


def estimate_background(frames: torch.Tensor) -> torch.Tensor:
    """Per-frame background colour [T, 3]: per-channel median of the border pixels of [T, H, W, 3]."""
    border = torch.cat([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0], frames[:, 1:-1, -1]], dim=1)
    return border.median(dim=1).values


def saturation(rgb: torch.Tensor) -> torch.Tensor:
    """HSV saturation of [..., 3] RGB in [0, 1] (0 for black)."""
    hi, lo = rgb.max(dim=-1).values, rgb.min(dim=-1).values
    return torch.where(hi > 1e-6, (hi - lo) / hi.clamp_min(1e-6), torch.zeros_like(hi))


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a bool mask [N, H, W] -> int64 labels (0 = off, else a component id).

    Min-label propagation over 3x3 neighbourhoods with pointer jumping; a label is the flat index + 1
    of some pixel of its component, the same for all pixels of it.
    """
    N, H, W = mask.shape
    big = float(H * W + 1)
    idx = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(N, H, W)
    lab = torch.where(mask, idx, torch.full_like(idx, big))
    for _ in range(H * W):
        nb = -F.max_pool2d(-lab[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(mask, torch.minimum(lab, nb), lab)
        flat = new.view(N, -1)
        for _ in range(4):  # pointer jumping: take the label of the pixel my label points at
            ptr = (flat.clamp(max=H * W) - 1).long()
            flat = torch.where(flat < big, torch.minimum(flat, flat.gather(1, ptr)), flat)
        new = flat.view(N, H, W)
        if torch.equal(new, lab):
            break
        lab = new
    return torch.where(mask, lab, torch.zeros_like(lab)).long()


def count_objects(shape_px: torch.Tensor, colour_index: torch.Tensor, num_colours: int,
                  min_area: int) -> torch.Tensor:
    """Objects per frame: over the 8-connected blobs of shape pixels [T, H, W], the number of
    (blob, colour) pairs with at least ``min_area`` pixels of that colour -> [T].

    A shape split in two by a smaller one drawn over it stays one object (its parts touch the
    occluder), two shapes of different colours that touch stay two, and a stray blob counts extra.
    """
    T, H, W = shape_px.shape
    lab = connected_components(shape_px).view(T, -1)
    key = (torch.arange(T)[:, None] * (H * W + 1) + lab) * num_colours + colour_index.view(T, -1)
    areas = torch.bincount(key[shape_px.view(T, -1)], minlength=T * (H * W + 1) * num_colours)
    return (areas.view(T, -1) >= min_area).sum(dim=1)


def sharpness_statistic(frames: torch.Tensor) -> torch.Tensor:
    """sqrt(Laplacian energy / gradient energy) of [T, H, W, 3] frames -> [T] (0 for flat frames)."""
    x = frames.permute(0, 3, 1, 2)
    gx, gy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    grad = gx.pow(2).sum(dim=(1, 2, 3)) + gy.pow(2).sum(dim=(1, 2, 3))
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    lap = lap.pow(2).sum(dim=(1, 2, 3))
    return torch.where(grad > 1e-8, (lap / grad.clamp_min(1e-8)).sqrt(), torch.zeros_like(grad))


def reference_scenes(attributes: PromptAttributes, count: int = 4) -> list[Scene]:
    """Deterministic scenes showing what a prompt describes (sizes and motions spread over the ranges)."""
    scenes = []
    for i in range(count):
        objects = []
        n = len(attributes.objects)
        for j, (colour, shape) in enumerate(attributes.objects):
            frac = ((i + j) % count + 0.5) / count
            size = MIN_SIZE + (MAX_SIZE - MIN_SIZE) * frac
            ang = 2 * math.pi * (i * 0.37 + j / n)
            hx, hy = ToyObject(shape, colour, size, 0.5, 0.5, 0, 0).half_extent
            x = hx + (1 - 2 * hx) * (j + 0.5) / n
            y = hy + (1 - 2 * hy) * ((i + 0.5) / count)
            objects.append(ToyObject(shape, colour, size, x, y, 0.02 * math.cos(ang), 0.02 * math.sin(ang)))
        scenes.append(Scene(attributes.background, tuple(objects)))
    return scenes


@functools.lru_cache(maxsize=256)
def _reference_sharpness(attributes: PromptAttributes, height: int, width: int) -> float:
    if height != width:
        raise ValueError(f"toy videos are square; got {height}x{width} frames")
    ref = render_batch(reference_scenes(attributes), 0, 8, size=height)  # [S, 3, 8, H, W]
    stats = [sharpness_statistic(_frames01(v)) for v in ref]
    return float(torch.cat(stats).mean())


def default_min_area(height: int, width: int) -> int:
    """Smallest component counted as an object: 6 px at 64x64, scaled with the frame area."""
    return max(2, round(6 * height * width / (64 * 64)))


# ---------------------------------------------------------------------------------------- metrics
def frame_metrics(video, prompt: str | PromptAttributes, min_area: int | None = None) -> dict[str, np.ndarray]:
    """Per-frame metrics of one video [3, T, H, W] in [-1, 1] against its prompt -> {name: float64 [T]}.

    ``saturation``, ``saturation_error`` and ``colour_error`` are NaN in frames without shape pixels
    (``count_error`` reports those).
    """
    attrs = prompt if isinstance(prompt, PromptAttributes) else parse_prompt(prompt)
    frames = _frames01(video)
    T, H, W, _ = frames.shape
    if H < 3 or W < 3:
        raise ValueError(f"frames of {H}x{W} are too small to measure")
    min_area = default_min_area(H, W) if min_area is None else int(min_area)
    bg_true = torch.tensor(BACKGROUND_COLOURS[attrs.background])
    colours = torch.tensor([SHAPE_COLOURS[c] for c, _ in attrs.objects])  # [K, 3]
    K = colours.shape[0]

    bg = estimate_background(frames)  # [T, 3]
    out = {"background_error": (bg - bg_true).norm(dim=-1)}

    # Assign each pixel the colour whose blend line bg -> colour is nearest; coverage alpha along it.
    d = frames[:, :, :, None, :] - bg[:, None, None, None, :]  # [T, H, W, 1, 3]
    axis = colours[None, :, :] - bg[:, None, :]  # [T, K, 3]
    axis_len2 = axis.pow(2).sum(-1).clamp_min(1e-6)[:, None, None, :]  # [T, 1, 1, K]
    alpha = ((d * axis[:, None, None]).sum(-1) / axis_len2).clamp(0, 1)  # [T, H, W, K]
    resid = (d - alpha[..., None] * axis[:, None, None]).norm(dim=-1)
    k = resid.argmin(dim=-1)  # [T, H, W]
    a = alpha.gather(-1, k[..., None])[..., 0]
    dist = d[..., 0, :].norm(dim=-1)
    shape_px = dist >= 0.5 * axis_len2.expand(T, H, W, K).gather(-1, k[..., None])[..., 0].sqrt()

    ideal = a[..., None] * colours[k] + (1 - a[..., None]) * bg_true  # ideal pixel under the prompt
    n_px = shape_px.sum(dim=(1, 2)).to(torch.float32)
    has = n_px > 0
    nan = torch.full((T,), float("nan"))

    def masked_mean(v):
        return torch.where(has, (v * shape_px).sum(dim=(1, 2)) / n_px.clamp_min(1), nan)

    sat, sat_ref = masked_mean(saturation(frames)), masked_mean(saturation(ideal))
    out.update(saturation=sat, saturation_ref=sat_ref, saturation_error=(sat - sat_ref).abs(),
               colour_error=masked_mean((frames - ideal).norm(dim=-1)))

    count = count_objects(shape_px, k, K, min_area).to(torch.float32)
    out.update(object_count=count, count_error=(count - K).abs())

    sharp = sharpness_statistic(frames) / _reference_sharpness(attrs, H, W)
    out.update(sharpness=sharp, sharpness_error=(sharp - 1).abs())
    return {name: out[name].to(torch.float64).numpy() for name in METRICS}


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


def format_table(metrics: dict[str, np.ndarray], names: Sequence[str] = ERRORS + ("object_count", "sharpness")) -> str:
    rows = [" frame " + " ".join(f"{n:>17}" for n in names)]
    for t in range(len(metrics[names[0]])):
        rows.append(f"{t:6d} " + " ".join(f"{metrics[n][t]:17.4f}" for n in names))
    rows.append("  mean " + " ".join(f"{np.nanmean(metrics[n]):17.4f}" for n in names))
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
