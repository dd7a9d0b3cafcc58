"""Per-frame metrics of toy-world videos, measured against the world's own ground truth.

``video_metrics(videos, prompts_or_scenes, start_frames=None)`` takes videos [B, 3, T, H, W] in [-1, 1] (CPU or
GPU) and, for each, its prompt (what it was generated from) or its :class:`~toy.scene.Scene` (what it should
show: with ``start_frames``, or frame 0 when those are not given, the video is meant to be frames
``[start, start + T)`` of that scene, e.g. a continuation of known history). It returns ``{name: float64
array [B, T]}``, NaN where a metric is undefined in a frame. Names in :data:`ERRORS` are errors (lower is
better, 0 is perfect; a rendered ground-truth video scores ~0, see the tests); the rest are values.

How a frame is read (``toy.tracks``): the background is the median border colour, the lighting the
brightness of the shapes' insides, each pixel is explained by the nearest shape-colour line, blobs are
8-connected components, and each prompt colour's largest blob is that object's track.

Errors (both modes unless said):

- ``background_error``: RGB distance of the background from the scene's (scene mode), or from the set of
  backgrounds the world can show for the prompt's background name under any lighting and drift (prompt mode).
- ``lighting_error``: |lighting - the scene's| (scene mode), or its distance outside [MIN_LIGHT, 1].
- ``flicker_error``: frame-to-frame jumps of the background colour and of the lighting beyond what the slow
  cycles allow (``FLICKER_TOL`` each).
- ``colour_error`` / ``saturation_error``: mean distance of the shape pixels from the nearest prompt colour's
  line (background -> lit colour), and the gap between their HSV saturation and that of those ideal pixels.
- ``count_error``: objects that should not be there (scene mode: distance of the detected count from the
  number of objects the scene shows; prompt mode: extra blobs of a prompt colour plus blobs of colours the
  prompt does not name).
- ``absence_error``: share of objects missing: scene mode, objects the scene clearly shows but the video
  does not; prompt mode, objects unseen for longer than the world ever hides one (``MAX_ABSENCE`` frames;
  NaN below 32 px, where the smallest shapes are too small to be told from a missed detection).
- ``identity_error``: share of the objects whose identity can be judged that have the wrong one: blobs of a
  colour the prompt does not name and second blobs of a prompt colour (always wrong), and whole blobs big
  enough to classify (fill ratio) whose shape is not their colour's prompt shape.
- ``sharpness_error``: |sharpness - 1|, sharpness being sqrt(Laplacian energy / gradient energy) (scales like
  1 / edge width) over that of rendered frames of the prompt (blur lowers it, noise raises it).
- ``motion_error`` / ``speed_error``: how far ``motion`` / ``speed`` lie outside the prompt's ground-truth
  band [p5, p95] (:func:`motion_band`), relative to the band's edge: 0 inside, 1 for a frozen video.
- ``velocity_error``: change of a tracked object's velocity between frames that no reflection explains (a
  reflection reverses one component within two frames, never speeding it up), frame sides per frame^2.
- ``position_error`` (scene mode only): distance of each fully visible object's centroid from the scene's.
- ``presence_error``: how far ``presence`` lies outside the prompt's ground-truth band [p5, p95] of that
  same windowed statistic (:func:`presence_band`; per window length, so the short windows of the first frames
  have their own band), relative to the band's edge (:func:`band_error`): 1 for an empty video of a 2- or
  3-object prompt. The world can hide a lone object for a whole window, so a 1-object prompt's lower edge is
  low (0 for some prompts, where an empty video scores 0, and a ground-truth video that hides its object long
  scores high): one video of such a prompt says little, an empty model shows over many prompts. Scene mode
  uses the same prompt band (``absence_error`` is the per-object check against the scene).

Values: ``object_count`` (detected objects), ``lighting``, ``saturation``, ``saturation_ref``, ``sharpness``,
``motion`` (normal-flow speed: sum |frame difference| over sum |spatial gradient|, frame sides per frame)
and ``speed`` (mean tracked centroid speed of whole objects, frame sides per frame); :data:`MOTION_KEYS`;
``presence``: share of the prompt's objects detected (a prompt colour with a detected blob, as counted in
``object_count``), averaged over the trailing ``PRESENCE_WINDOW`` frames (fewer at the start).
"""

from __future__ import annotations

import functools
import random
import zlib
from typing import Sequence

import numpy as np
import torch

from .render import COLOUR_NAMES, object_states, render_batch
from .scene import (BACKGROUND_COLOURS, DRIFT_AMOUNT, DRIFT_TINTS, MIN_LIGHT, SHAPE_COLOURS, SHAPES, PromptAttributes,
                    Scene, parse_prompt, scene_for)
from .tracks import (classify_pixels, classify_shape, detections, estimate_background, estimate_lighting, frames01,
                     saturation)

ERRORS: tuple[str, ...] = ("background_error", "lighting_error", "flicker_error", "colour_error", "saturation_error",
                           "count_error", "absence_error", "identity_error", "sharpness_error", "motion_error",
                           "speed_error", "velocity_error", "position_error", "presence_error")
MOTION_KEYS: tuple[str, ...] = ("motion", "speed")
VALUES: tuple[str, ...] = ("object_count", "lighting", "saturation", "saturation_ref", "sharpness", "presence"
                           ) + MOTION_KEYS
METRICS: tuple[str, ...] = ERRORS + VALUES
BAND_QUANTILES = (0.05, 0.95)
BAND_FRAMES, BAND_CLIPS = 24, 16   # ground-truth clips per prompt behind a motion band
PRESENCE_WINDOW = 24               # frames: the trailing window of ``presence``
PRESENCE_FRAMES, PRESENCE_CLIPS = 48, 16  # ground-truth clips per prompt behind a presence band
MAX_ABSENCE = 160                  # frames: longer than the world hides an object (at 32 px and up; see tests)
FLICKER_TOL = 0.01                 # per frame; the world's slow cycles change by < 0.005
MOTION_DEADZONE = 0.04             # differences below this (noise) do not count as motion or edges
VELOCITY_TOL = 0.15                # px per frame^2: centroid noise of rendered frames stays below
SHAPE_MIN_PIXELS = 20              # shapes are classified from blobs at least this big


def default_min_area(height: int, width: int) -> int:
    """Smallest blob counted as an object: 6 px at 64x64, scaled with the frame area."""
    return max(2, round(6 * height * width / (64 * 64)))


# --------------------------------------------------------------------------------------------- inputs
def _targets(prompts_or_scenes, start_frames, count: int):
    """[(attributes, scene or None, start)] for each video."""
    items = list(prompts_or_scenes)
    if len(items) != count:
        raise ValueError(f"got {count} videos but {len(items)} prompts or scenes")
    if start_frames is None or isinstance(start_frames, (int, np.integer)):
        starts = [int(start_frames or 0)] * count
    else:
        starts = [int(s) for s in start_frames]
        if len(starts) != count:
            raise ValueError(f"got {len(starts)} start frames for {count} videos")
    out = []
    for item, start in zip(items, starts):
        if isinstance(item, Scene):
            out.append((item.attributes, item, start))
        elif isinstance(item, PromptAttributes):
            out.append((item, None, start))
        elif isinstance(item, str):
            out.append((parse_prompt(item), None, start))
        else:
            raise ValueError(f"expected a prompt, PromptAttributes or Scene, got {type(item).__name__}")
    return out


def _analyse(videos, attrs: Sequence[PromptAttributes], min_area: int | None):
    """The shared reading of a batch: frames, background, lighting, pixel classes, detections."""
    frames = frames01(videos)
    B, T, H, W, _ = frames.shape
    if H < 3 or W < 3:
        raise ValueError(f"frames of {H}x{W} are too small to measure")
    dev = frames.device
    fr = frames.reshape(B * T, H, W, 3)
    bg = estimate_background(fr)
    light = estimate_lighting(fr, bg)
    per_video = light.view(B, T)
    fallback = torch.nan_to_num(torch.nanmedian(per_video, dim=1).values, nan=1.0)
    light_fill = torch.where(torch.isnan(per_video), fallback[:, None], per_video).reshape(-1)
    prompt = torch.zeros(B, len(COLOUR_NAMES), dtype=torch.bool, device=dev)
    for b, a in enumerate(attrs):
        for colour, _ in a.objects:
            prompt[b, COLOUR_NAMES.index(colour)] = True
    rep = prompt[:, None].expand(B, T, -1).reshape(B * T, -1)
    px = classify_pixels(fr, bg, light_fill, rep)
    area = default_min_area(H, W) if min_area is None else int(min_area)
    det = detections(px["cls"], px["alpha"], px["shape"], area, ~rep)
    det = {k: v.view(B, T, -1) for k, v in det.items()}
    return {"frames": frames, "fr": fr, "bg": bg.view(B, T, 3), "light": per_video, "prompt": prompt, "px": px,
            "det": det, "min_area": area, "shape": (B, T, H, W)}


# --------------------------------------------------------------------------------------------- motion
def _motion(fr: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Normal-flow speed [B, T] (frame sides per frame; NaN at t=0 and where a frame has no edges)."""
    H, W = fr.shape[1:3]
    x = fr.view(B, T, H, W, 3)

    def dead(v):
        return (v.abs() - MOTION_DEADZONE).clamp_min(0)

    edges = dead(x[:, :, :, 1:] - x[:, :, :, :-1]).sum(dim=(2, 3, 4)) + dead(x[:, :, 1:] - x[:, :, :-1]).sum(dim=(2, 3, 4))
    change = dead(x[:, 1:] - x[:, :-1]).sum(dim=(2, 3, 4))
    norm = (edges[:, 1:] + edges[:, :-1]) / 2
    ok = norm > 1.0
    val = torch.where(ok, change / norm.clamp_min(1e-6) / W, torch.full_like(change, float("nan")))
    return torch.cat([torch.full((B, 1), float("nan"), device=fr.device), val], dim=1)


def _tracks(det: dict, prompt: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``speed`` and ``velocity_error`` [B, T] from the whole-blob centroids of the prompt's colours."""
    p = torch.stack([det["x"], det["y"]], dim=-1)  # [B, T, C, 2]
    ok = det["whole"] & prompt[:, None, :]
    nan = torch.full(p.shape[:2], float("nan"), device=p.device)
    d = torch.full_like(p, float("nan"))
    d[:, 1:] = p[:, 1:] - p[:, :-1]
    dv = torch.zeros_like(ok)
    dv[:, 1:] = ok[:, 1:] & ok[:, :-1]
    speed_each = d.norm(dim=-1)
    n = dv.sum(-1)
    speed = torch.where(n > 0, torch.where(dv, speed_each, 0).sum(-1) / n.clamp_min(1), nan)
    # Velocity change that no reflection explains.
    prev, prev2 = torch.full_like(d, float("nan")), torch.full_like(d, float("nan"))
    prev[:, 1:], prev2[:, 2:] = d[:, :-1], d[:, :-2]
    v1, v2 = torch.zeros_like(dv), torch.zeros_like(dv)
    v1[:, 1:], v2[:, 2:] = dv[:, :-1], dv[:, :-2]
    use = dv & v1
    acc = d - prev
    p2 = torch.where(v2[..., None], prev2, torch.zeros_like(prev2))
    opposes = (acc * prev < 0) | (v2[..., None] & (acc * p2 < 0))
    no_gain = d.abs() <= torch.maximum(prev.abs(), p2.abs()) + VELOCITY_TOL / width
    unexplained = torch.where(opposes & no_gain, torch.zeros_like(acc), acc).norm(dim=-1)
    err = (unexplained - VELOCITY_TOL / width).clamp_min(0)
    m = use.sum(-1)
    vel = torch.where(m > 0, torch.where(use, err, 0).sum(-1) / m.clamp_min(1), nan)
    return speed, vel


def _motion_values(a: dict) -> dict[str, torch.Tensor]:
    B, T, H, W = a["shape"]
    speed, vel = _tracks(a["det"], a["prompt"], W)
    return {"motion": _motion(a["fr"], B, T), "speed": speed, "velocity_error": vel}


def _true_speed(states: dict) -> torch.Tensor:
    """Ground-truth counterpart of the tracked ``speed`` [B, T]: mean centroid displacement of the objects fully
    visible in both frames."""
    p = torch.stack([states["x"], states["y"]], dim=-1)  # [B, K, T, 2]
    full = states["visible_fraction"] >= 0.98
    both = full[..., 1:] & full[..., :-1]
    step = (p[:, :, 1:] - p[:, :, :-1]).norm(dim=-1)
    n = both.sum(1)
    val = torch.where(n > 0, torch.where(both, step, 0).sum(1) / n.clamp_min(1), float("nan"))
    return torch.cat([torch.full((p.shape[0], 1), float("nan"), dtype=val.dtype), val], dim=1)


@functools.lru_cache(maxsize=512)
def _band(attrs: PromptAttributes, num_frames: int, size: int, clips: int) -> tuple[tuple[float, float], ...]:
    seed = zlib.crc32(repr((attrs, "band")).encode())
    rng = random.Random(seed)
    scenes = [scene_for(attrs, seed + i) for i in range(clips)]
    starts = [rng.randrange(0, 5000) for _ in range(clips)]
    frames = frames01(render_batch(scenes, starts, num_frames, size))
    vals = {"motion": _motion(frames.flatten(0, 1), clips, num_frames),
            "speed": _true_speed(object_states(scenes, starts, num_frames, size))}
    out = []
    for key in MOTION_KEYS:
        v = vals[key].flatten().double()
        v = v[~torch.isnan(v)]
        if v.numel() < 10:
            out.append((float("nan"), float("nan")))
        else:
            lo, hi = torch.quantile(v, torch.tensor(BAND_QUANTILES, dtype=torch.float64)).tolist()
            out.append((lo, hi))
    return tuple(out)


def motion_band(prompts: Sequence[str | PromptAttributes], num_frames: int = BAND_FRAMES, size: int = 64,
                clips: int = BAND_CLIPS) -> dict[str, np.ndarray]:
    """Ground-truth band of each :data:`MOTION_KEYS` statistic per prompt -> {key: [P, 2] (p5, p95)}.

    From ``clips`` rendered clips of ``num_frames`` frames at ``size`` px showing what the prompt says
    (random motion, hidden state and start frames, fixed per prompt); cached.
    """
    rows = [_band(parse_prompt(p) if isinstance(p, str) else p, int(num_frames), int(size), int(clips))
            for p in prompts]
    return {key: np.array([r[i] for r in rows], dtype=np.float64).reshape(len(rows), 2)
            for i, key in enumerate(MOTION_KEYS)}


def _seen(count: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Prompt objects detected per frame [B, T] (a prompt colour with a detection; counts [B, T, C])."""
    return ((count > 0) & prompt[:, None, :]).sum(-1).float()


def presence_values(count: torch.Tensor, prompt: torch.Tensor, window: int = PRESENCE_WINDOW) -> torch.Tensor:
    """``presence`` [B, T]: share of the prompt's objects detected, averaged over the trailing ``window``
    frames (the first frames average what there is)."""
    seen = _seen(count, prompt)  # integers: the running sums below are exact
    B, T = seen.shape
    c = torch.cat([torch.zeros(B, 1, device=seen.device), seen.cumsum(1)], dim=1)
    t = torch.arange(T, device=seen.device)
    lo = (t + 1 - window).clamp_min(0)
    k = prompt.sum(-1, keepdim=True).clamp_min(1)
    return (c[:, t + 1] - c[:, lo]) / (t + 1 - lo) / k


@functools.lru_cache(maxsize=512)
def _presence_band(attrs: PromptAttributes, size: int, min_area: int, window: int, num_frames: int,
                   clips: int) -> tuple[tuple[float, float], ...]:
    seed = zlib.crc32(repr((attrs, "presence")).encode())
    rng = random.Random(seed)
    scenes = [scene_for(attrs, seed + i) for i in range(clips)]
    starts = [rng.randrange(0, 5000) for _ in range(clips)]
    a = _analyse(render_batch(scenes, starts, num_frames, size), [attrs] * clips, min_area)
    share = _seen(a["det"]["count"], a["prompt"]).double() / max(1, attrs.num_objects)
    q = torch.tensor(BAND_QUANTILES, dtype=torch.float64)
    return tuple(tuple(torch.quantile(share.unfold(1, n, 1).mean(-1).flatten(), q).tolist())
                 for n in range(1, window + 1))


def presence_band(prompts: Sequence[str | PromptAttributes], size: int = 64, min_area: int | None = None,
                  window: int = PRESENCE_WINDOW, num_frames: int = PRESENCE_FRAMES,
                  clips: int = PRESENCE_CLIPS) -> np.ndarray:
    """Ground-truth band of ``presence`` per prompt and window length -> [P, window, 2] (p5, p95); row n - 1
    is the band of windows of n frames.

    From ``clips`` rendered clips of ``num_frames`` frames at ``size`` px showing what the prompt says (random
    hidden state and start frames, fixed per prompt), read by the same detection as the videos (``min_area``),
    over every window of each length inside them; cached (on the CPU: about 1 s per prompt at 64 px).
    """
    if not 1 <= window <= num_frames:
        raise ValueError(f"the presence window ({window}) must be 1..num_frames ({num_frames})")
    area = default_min_area(size, size) if min_area is None else int(min_area)
    rows = [_presence_band(parse_prompt(p) if isinstance(p, str) else p, int(size), area, int(window),
                           int(num_frames), int(clips))
            for p in prompts]
    return np.array(rows, dtype=np.float64).reshape(len(rows), window, 2)


def band_error(values: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Relative distance outside [lo, hi] (band [B, 2], values [B, T]): (lo - v) / lo below, (v - hi) / hi above."""
    lo, hi = band[:, :1], band[:, 1:]
    return (lo - values).clamp_min(0) / lo.clamp_min(1e-9) + (values - hi).clamp_min(0) / hi.clamp_min(1e-9)


# ------------------------------------------------------------------------------------------ background
@functools.lru_cache(maxsize=None)
def _background_quads(name: str) -> torch.Tensor:
    """[Q, 4, 3]: for each drift tint, the planar quadrilateral of backgrounds lighting x drift can show."""
    b = torch.tensor(BACKGROUND_COLOURS[name], dtype=torch.float64)
    s = DRIFT_AMOUNT[1]
    quads = []
    for tint in DRIFT_TINTS:
        far = (1 - s) * b + s * torch.tensor(SHAPE_COLOURS[tint], dtype=torch.float64)
        quads.append(torch.stack([MIN_LIGHT * b, b, far, MIN_LIGHT * far]))
    return torch.stack(quads)


def quad_distance(points: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
    """Distance of points [M, 3] from the union of planar convex quadrilaterals [Q, 4, 3] -> [M]."""
    p = points[:, None, :]  # [M, 1, 3]
    v = quads[None]  # [1, Q, 4, 3]
    best = torch.full(p.shape[:2], float("inf"), dtype=points.dtype, device=points.device)
    for i in range(4):  # edges
        a, b = v[:, :, i], v[:, :, (i + 1) % 4]
        ab = b - a
        t = (((p - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-12)).clamp(0, 1)
        best = torch.minimum(best, (p - a - t[..., None] * ab).norm(dim=-1))
    n = torch.cross(v[:, :, 1] - v[:, :, 0], v[:, :, 3] - v[:, :, 0], dim=-1)
    nn = n.norm(dim=-1, keepdim=True)
    unit = n / nn.clamp_min(1e-12)
    h = ((p - v[:, :, 0]) * unit).sum(-1)
    q = p - h[..., None] * unit
    inside = (nn[..., 0] > 1e-9).expand_as(h).clone()
    for i in range(4):
        a, b = v[:, :, i], v[:, :, (i + 1) % 4]
        inside &= (torch.cross(b - a, q - a, dim=-1) * n).sum(-1) >= -1e-12
    best = torch.where(inside, torch.minimum(best, h.abs()), best)
    return best.min(dim=1).values


# ------------------------------------------------------------------------------------------- sharpness
def sharpness_statistic(frames: torch.Tensor, min_energy: float | None = None) -> torch.Tensor:
    """sqrt(Laplacian energy / gradient energy) of [N, H, W, 3] frames -> [N]; NaN where the gradient energy
    is below ``min_energy`` (default ``8 * W / 64``: a sliver of a shape at the border is no edge to judge)."""
    x = frames.permute(0, 3, 1, 2)
    gx, gy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    grad = gx.pow(2).sum(dim=(1, 2, 3)) + gy.pow(2).sum(dim=(1, 2, 3))
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    lap = lap.pow(2).sum(dim=(1, 2, 3))
    floor = 8 * x.shape[-1] / 64 if min_energy is None else min_energy
    return torch.where(grad > floor, (lap / grad.clamp_min(1e-8)).sqrt(), torch.full_like(grad, float("nan")))


@functools.lru_cache(maxsize=512)
def reference_sharpness(attrs: PromptAttributes, size: int) -> float:
    """Mean sharpness statistic of rendered frames of the prompt at ``size`` px (frames with shapes)."""
    seed = zlib.crc32(repr((attrs, "sharpness")).encode())
    scenes = [scene_for(attrs, seed + i) for i in range(4)]
    video = render_batch(scenes, [1000 * i for i in range(4)], 8, size)
    stat = sharpness_statistic(frames01(video).flatten(0, 1))
    return float(torch.nanmean(stat)) if bool((~torch.isnan(stat)).any()) else float("nan")


# --------------------------------------------------------------------------------------------- metrics
def _nanmean_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along the last dims -> [N]; NaN where the mask is empty."""
    dims = tuple(range(1, values.dim()))
    n = mask.sum(dim=dims)
    s = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dims)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


@torch.no_grad()
def video_metrics(videos, prompts_or_scenes, start_frames=None, *, min_area: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Per-frame metrics {name: float64 [B, T]} (all of :data:`METRICS`) of videos [B, 3, T, H, W] in [-1, 1].

    ``prompts_or_scenes``: one prompt (str or PromptAttributes) or Scene per video. A Scene means the video
    should be frames [start, start + T) of it (``start_frames``: one int or one per video, default 0): then
    background, lighting, count, absence and position are compared with the scene itself; a prompt gives the
    prompt-only comparison (see the module docstring).
    """
    v = torch.as_tensor(videos)
    if v.dim() != 5:
        raise ValueError(f"expected videos [B, 3, T, H, W] in [-1, 1], got shape {tuple(v.shape)}")
    targets = _targets(prompts_or_scenes, start_frames, v.shape[0])
    attrs = [t[0] for t in targets]
    a = _analyse(v, attrs, min_area)
    B, T, H, W = a["shape"]
    if H != W:
        raise ValueError(f"toy videos are square; got {H}x{W} frames")
    dev = a["fr"].device
    det, px, prompt = a["det"], a["px"], a["prompt"]
    nan = torch.full((B, T), float("nan"), device=dev)
    out: dict[str, torch.Tensor] = {}

    # Colour and saturation of the shape pixels.
    shape_px = px["shape"]
    out["colour_error"] = _nanmean_masked(px["colour_error"], shape_px).view(B, T)
    sat, sat_ref = saturation(a["fr"]), saturation(px["ideal"])
    out["saturation"] = _nanmean_masked(sat, shape_px).view(B, T)
    out["saturation_ref"] = _nanmean_masked(sat_ref, shape_px).view(B, T)
    out["saturation_error"] = _nanmean_masked((sat - sat_ref).abs(), shape_px).view(B, T)

    # Objects: counts, identities.
    count = det["count"]  # [B, T, C]
    pm = prompt[:, None, :].expand_as(count)
    in_prompt = torch.where(pm, count, 0).sum(-1)
    foreign = torch.where(pm, 0, count).sum(-1)
    extra = torch.where(pm, (count - 1).clamp_min(0), 0).sum(-1)
    detected = in_prompt + foreign
    out["object_count"] = detected.float()
    want = torch.full(prompt.shape, -1, dtype=torch.long, device=dev)
    for b, at in enumerate(attrs):
        for colour, shape in at.objects:
            want[b, COLOUR_NAMES.index(colour)] = SHAPES.index(shape)
    shape_seen = classify_shape(torch.where(det["area"] >= SHAPE_MIN_PIXELS, det["fill"], float("nan")))
    judged = pm & (shape_seen >= 0)
    wrong = foreign + extra + (judged & (shape_seen != want[:, None, :])).sum(-1)
    n_judged = foreign + extra + judged.sum(-1)
    out["identity_error"] = torch.where(n_judged > 0, wrong / n_judged.clamp_min(1), nan)

    # Motion.
    mv = _motion_values(a)
    out.update(mv)
    bands = motion_band(attrs, size=H)
    for key in MOTION_KEYS:
        band = torch.as_tensor(bands[key], dtype=torch.float32, device=dev)
        out[f"{key}_error"] = band_error(mv[key], band)

    # Presence: against the band of windows as long as each frame's.
    pres = presence_values(count, prompt)
    pband = torch.as_tensor(presence_band(attrs, H, a["min_area"]), dtype=torch.float32, device=dev)
    length = (torch.arange(T, device=dev) + 1).clamp_max(PRESENCE_WINDOW) - 1
    out["presence"] = pres
    out["presence_error"] = band_error(pres.reshape(-1, 1), pband[:, length].reshape(-1, 2)).view(B, T)

    # Sharpness.
    ref = torch.tensor([reference_sharpness(at, H) for at in attrs], device=dev)
    sharp = sharpness_statistic(a["fr"]).view(B, T) / ref[:, None]
    out["sharpness"], out["sharpness_error"] = sharp, (sharp - 1).abs()

    # Lighting and background.
    light, bg = a["light"], a["bg"]
    out["lighting"] = light
    jump = (bg[:, 1:] - bg[:, :-1]).norm(dim=-1)
    ljump = torch.nan_to_num((light[:, 1:] - light[:, :-1]).abs(), nan=0.0)
    out["flicker_error"] = torch.cat([nan[:, :1], (jump - FLICKER_TOL).clamp_min(0) + (ljump - FLICKER_TOL).clamp_min(0)],
                                     dim=1)
    out["lighting_error"] = (MIN_LIGHT - light).clamp_min(0) + (light - 1).clamp_min(0)
    out["background_error"] = torch.stack([quad_distance(bg[b].double(), _background_quads(at.background).to(dev))
                                           for b, at in enumerate(attrs)]).float()
    out["count_error"] = (foreign + extra).float()
    out["absence_error"] = _long_absence(count, prompt) if H >= 32 else nan.clone()
    out["position_error"] = nan.clone()

    scened = [b for b, t in enumerate(targets) if t[1] is not None]
    if scened:
        _scene_metrics(out, a, [targets[b] for b in scened], torch.tensor(scened, device=dev), detected)
    return {k: out[k].detach().to("cpu", torch.float64).numpy() for k in METRICS}


def _long_absence(count: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Share of the prompt's objects unseen for more than MAX_ABSENCE frames up to each frame [B, T]."""
    B, T, C = count.shape
    run = torch.zeros(B, C, device=count.device)
    out = torch.zeros(B, T, device=count.device)
    k = prompt.sum(-1).clamp_min(1)
    for t in range(T):
        run = torch.where(count[:, t] == 0, run + 1, torch.zeros_like(run))
        out[:, t] = ((run > MAX_ABSENCE) & prompt).sum(-1) / k
    return out


def _scene_metrics(out: dict, a: dict, targets, rows: torch.Tensor, detected: torch.Tensor) -> None:
    """Scene mode: background, lighting, count, absence and position against the scenes' ground truth."""
    B, T, H, W = a["shape"]
    dev = rows.device
    gt = object_states([t[1] for t in targets], [t[2] for t in targets], T, size=H)
    area_px = a["min_area"]
    gbg = gt["background"].to(dev, torch.float32)
    out["background_error"][rows] = (a["bg"][rows] - gbg).norm(dim=-1)
    out["lighting_error"][rows] = (a["light"][rows] - gt["lighting"].to(dev, torch.float32)).abs()
    vis_px = (gt["visible_fraction"] * gt["area"][..., None] * H * W).to(dev)  # [b, K, T]
    must = (vis_px >= 2 * area_px).sum(1)
    either = ((vis_px >= 0.5 * area_px) & (vis_px < 2 * area_px)).sum(1)
    det = detected[rows]
    out["count_error"][rows] = ((must - det).clamp_min(0) + (det - must - either).clamp_min(0)).float()
    colour = gt["colour"].to(dev)  # [b, K]
    index = colour.clamp_min(0)[:, None, :].expand(-1, T, -1)  # [b, T, K]: each object's colour

    def of_objects(v):
        return torch.gather(v[rows], 2, index)

    seen = of_objects(a["det"]["count"]) > 0
    should = (vis_px >= 2 * area_px).permute(0, 2, 1)
    miss = (should & ~seen).sum(-1).float()
    n = should.sum(-1)
    out["absence_error"][rows] = torch.where(n > 0, miss / n.clamp_min(1), torch.full_like(miss, float("nan")))
    xs, ys, whole = of_objects(a["det"]["x"]), of_objects(a["det"]["y"]), of_objects(a["det"]["whole"])
    full = (gt["visible_fraction"].to(dev) >= 0.98).permute(0, 2, 1) & whole
    dist = torch.hypot(xs - gt["x"].to(dev, torch.float32).permute(0, 2, 1),
                       ys - gt["y"].to(dev, torch.float32).permute(0, 2, 1))
    n_full = full.sum(-1)
    out["position_error"][rows] = torch.where(n_full > 0, torch.where(full, dist, 0).sum(-1) / n_full.clamp_min(1),
                                              torch.full_like(miss, float("nan")))


def per_window(values, window: int) -> np.ndarray:
    """Means of ``values`` [B, T] over consecutive windows of ``window`` frames -> [B, T // window] (NaNs
    skipped; NaN where a window has no value; a last partial window is dropped)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or window < 1:
        raise ValueError(f"per_window takes values [B, T] and a window >= 1, got {v.shape} and {window}")
    n = v.shape[1] // window
    w = v[:, : n * window].reshape(v.shape[0], n, window)
    valid = ~np.isnan(w)
    with np.errstate(invalid="ignore"):
        return np.where(valid.any(-1), np.nansum(w, -1) / np.maximum(valid.sum(-1), 1), np.nan)
