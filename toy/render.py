"""Closed-form dynamics and rasterisation of toy-world scenes (``toy.world`` re-exports the public names).

Every quantity of frame ``t`` is a closed-form function of ``t``: an object's arena position is a triangle
wave (exact reflections, :func:`bounce`), the camera offset, the lighting and the background drift are
sinusoids. Positions are computed in float64 on the CPU from the absolute frame index, so a frame renders
identically whatever clip it is part of and however far into an unlimited video it lies. Shapes are drawn at
the output resolution with analytic antialiasing (exact box coverage for squares, a one-pixel ramp across
the edge for circles and triangles), farthest first; the lighting multiplies the composited picture.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .scene import MAX_OBJECTS, SHAPE_COLOURS, SHAPES, Scene, centroid_offset, colour_rgb

COLOUR_NAMES: tuple[str, ...] = tuple(SHAPE_COLOURS)


def bounce(start: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor,
           low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Closed-form position at time ``t`` of a point moving in [low, high] with exact reflection.

    Unfolded, the motion is linear; folding it back is a triangle wave of period 2 * (high - low).
    """
    span = high - low
    u = torch.remainder(start - low + velocity * t, 2 * span)
    return low + span - (u - span).abs()


def bounce_velocity(start, velocity, t, low, high) -> torch.Tensor:
    """d/dt of :func:`bounce` (the velocity with the sign of the current leg)."""
    span = high - low
    u = torch.remainder(start - low + velocity * t, 2 * span)
    return torch.where(u < span, velocity, -velocity)


def draw_order(scene: Scene) -> list[int]:
    """Indices of ``scene.objects`` from the farthest (drawn first) to the nearest; ties: larger first."""
    return sorted(range(len(scene.objects)), key=lambda i: (-scene.objects[i].depth, -scene.objects[i].area))


def frame_grid(num_scenes: int, start_frame, num_frames: int, device=None) -> torch.Tensor:
    """Absolute frame indices [B, T] (float64) from one start frame or one per scene."""
    if isinstance(start_frame, (int,)) or (torch.is_tensor(start_frame) and start_frame.dim() == 0):
        starts = [int(start_frame)] * num_scenes
    else:
        starts = [int(s) for s in start_frame]
    if len(starts) != num_scenes:
        raise ValueError(f"got {len(starts)} start frames for {num_scenes} scenes")
    base = torch.tensor(starts, dtype=torch.float64, device=device)
    return base[:, None] + torch.arange(num_frames, dtype=torch.float64, device=device)[None, :]


def _pack(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Scenes -> CPU float64 tensors: per slot [B, K] in draw order, per scene [B, ...]."""
    slots, per_scene = [], []
    for scene in scenes:
        order = draw_order(scene)
        row = []
        for k in range(MAX_OBJECTS):
            if k < len(order):
                o = scene.objects[order[k]]
                hx, hy = o.half_extent
                row.append([o.x, o.y, o.vx, o.vy, hx, hy, SHAPES.index(o.shape), 1.0, *colour_rgb(o.colour),
                            order[k], COLOUR_NAMES.index(o.colour), o.size, o.area])
            else:  # empty slot: never drawn
                row.append([0.5, 0.5, 0.0, 0.0, 0.25, 0.25, 0, 0.0, 0.0, 0.0, 0.0, -1, -1, 0.0, 0.0])
        slots.append(row)
        c, li, d = scene.camera, scene.lighting, scene.drift
        per_scene.append([*scene.arena, c.pan_x, c.pan_y, c.period_x, c.period_y, c.phase_x, c.phase_y,
                          li.depth, li.period, li.phase, *colour_rgb(d.tint), d.amount, d.period, d.phase,
                          *colour_rgb(scene.background)])
    p = torch.tensor(slots, dtype=torch.float64)  # [B, K, 15]
    s = torch.tensor(per_scene, dtype=torch.float64)  # [B, 20]
    names = ("x", "y", "vx", "vy", "hx", "hy", "shape", "present", "r", "g", "b", "index", "colour", "size", "area")
    out = {n: p[..., i] for i, n in enumerate(names)}
    out["rgb"] = p[..., 8:11]
    scene_names = ("arena_w", "arena_h", "pan_x", "pan_y", "period_x", "period_y", "phase_x", "phase_y",
                   "light_depth", "light_period", "light_phase")
    out.update({n: s[:, i] for i, n in enumerate(scene_names)})
    out["tint"], out["drift_amount"], out["drift_period"], out["drift_phase"] = s[:, 11:14], s[:, 14], s[:, 15], s[:, 16]
    out["bg"] = s[:, 17:20]
    return out


def dynamics(scenes: Sequence[Scene], start_frame, num_frames: int) -> dict[str, torch.Tensor]:
    """Per-frame state (CPU float64), slots in draw order: ``cx``/``cy`` bounding-box centres on screen and
    ``vx``/``vy`` screen velocities [B, K, T]; ``camera`` [B, T, 2]; ``lighting`` [B, T]; ``albedo`` (unlit
    background) and ``background`` (as shown) [B, T, 3]; plus the packed scene tensors."""
    p = _pack(scenes)
    t = frame_grid(len(scenes), start_frame, num_frames)  # [B, T]
    tk = t[:, None, :]
    w, h = p["arena_w"][:, None, None], p["arena_h"][:, None, None]
    hx, hy = p["hx"][..., None], p["hy"][..., None]
    args = [(p["x"][..., None], p["vx"][..., None], tk, hx, w - hx), (p["y"][..., None], p["vy"][..., None], tk, hy, h - hy)]
    wx, wy = bounce(*args[0]), bounce(*args[1])
    wvx, wvy = bounce_velocity(*args[0]), bounce_velocity(*args[1])
    cam, cam_v = [], []
    for axis, size in (("x", p["arena_w"]), ("y", p["arena_h"])):
        omega = 2 * math.pi / p[f"period_{axis}"][:, None]
        angle = omega * t + p[f"phase_{axis}"][:, None]
        cam.append((size[:, None] - 1) / 2 + p[f"pan_{axis}"][:, None] * torch.sin(angle))
        cam_v.append(p[f"pan_{axis}"][:, None] * omega * torch.cos(angle))
    light = 1 - p["light_depth"][:, None] * (1 - torch.cos(2 * math.pi * t / p["light_period"][:, None]
                                                          + p["light_phase"][:, None])) / 2
    s = p["drift_amount"][:, None] * (1 - torch.cos(2 * math.pi * t / p["drift_period"][:, None]
                                                    + p["drift_phase"][:, None])) / 2
    albedo = (1 - s[..., None]) * p["bg"][:, None, :] + s[..., None] * p["tint"][:, None, :]
    return {**p, "t": t, "cx": wx - cam[0][:, None], "cy": wy - cam[1][:, None],
            "vx_screen": wvx - cam_v[0][:, None], "vy_screen": wvy - cam_v[1][:, None],
            "camera": torch.stack(cam, -1), "lighting": light, "albedo": albedo,
            "background": light[..., None] * albedo}


def _shape_alpha(shape: int, cx, cy, hx, hy, size: int) -> torch.Tensor:
    """Coverage [M, T, S, S] of M objects of one shape; centres [M, T] and half extents [M] in pixels."""
    grid = torch.arange(size, device=cx.device, dtype=cx.dtype) + 0.5
    hx, hy = hx[:, None, None, None], hy[:, None, None, None]
    if shape == 1:  # square: exact box-filter coverage, separable
        lo_x, hi_x = cx[..., None] - hx[..., 0], cx[..., None] + hx[..., 0]
        lo_y, hi_y = cy[..., None] - hy[..., 0], cy[..., None] + hy[..., 0]
        cov_x = (torch.minimum(grid + 0.5, hi_x) - torch.maximum(grid - 0.5, lo_x)).clamp(0, 1)
        cov_y = (torch.minimum(grid + 0.5, hi_y) - torch.maximum(grid - 0.5, lo_y)).clamp(0, 1)
        return cov_y[..., :, None] * cov_x[..., None, :]
    dx = grid[None, None, None, :] - cx[..., None, None]
    dy = grid[None, None, :, None] - cy[..., None, None]
    if shape == 0:  # circle
        sd = torch.sqrt(dx * dx + dy * dy) - hx
    else:  # equilateral triangle, apex up (image y grows downwards)
        sd = torch.maximum(dy - hy, (2 * hy * dx.abs() - hx * (dy + hy)) / torch.sqrt(4 * hy * hy + hx * hx))
    return (0.5 - sd).clamp(0, 1)


def upload(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (CPU) on ``device`` in ``dtype``; to a CUDA device through pinned memory without waiting (a plain
    copy from pageable memory would wait for the GPU's queue: a host sync per copy in a training step)."""
    device = torch.device(device)
    t = t.to(dtype) if dtype is not None else t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def coverage(d: dict[str, torch.Tensor], size: int, device) -> torch.Tensor:
    """Antialiased coverage [B, K, T, S, S] (float32 on ``device``) of every slot (draw order) of
    :func:`dynamics` output; empty slots are zero."""
    B, K, T = d["cx"].shape
    out = torch.zeros(B * K, T, size, size, device=device, dtype=torch.float32)
    shape, present = d["shape"].reshape(-1), d["present"].reshape(-1) > 0
    cx, cy = (d["cx"] * size).reshape(B * K, T), (d["cy"] * size).reshape(B * K, T)
    hx, hy = (d["hx"] * size).reshape(-1), (d["hy"] * size).reshape(-1)
    for s in range(len(SHAPES)):
        sel = torch.nonzero(present & (shape == s)).flatten()
        if sel.numel() == 0:
            continue

        def on(v):
            return upload(v[sel], device, torch.float32)

        out[upload(sel, device)] = _shape_alpha(s, on(cx), on(cy), on(hx), on(hy), size)
    return out.view(B, K, T, size, size)


def composite(d: dict[str, torch.Tensor], alpha: torch.Tensor, device) -> torch.Tensor:
    """Frames [B, 3, T, S, S] in [0, 1]: the background albedo, the slots blended in draw order, lit."""
    B, K, T, S, _ = alpha.shape
    img = upload(d["albedo"], device, torch.float32).permute(0, 2, 1)[..., None, None].expand(B, 3, T, S, S).clone()
    rgb = upload(d["rgb"], device, torch.float32)
    for k in range(K):
        a = alpha[:, k][:, None]
        img += a * (rgb[:, k][:, :, None, None, None] - img)
    return img * upload(d["lighting"], device, torch.float32)[:, None, :, None, None]


def render_batch(scenes: Sequence[Scene], start_frame: int | Sequence[int], num_frames: int, size: int = 64,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Render frames [start, start + num_frames) of each scene -> [B, 3, T, size, size] in [-1, 1].

    ``start_frame`` is one int for all scenes or one per scene. Any frame of an unlimited video renders
    directly, identically whatever clip it is part of.
    """
    if num_frames < 1 or size < 1:
        raise ValueError(f"num_frames and size must be >= 1, got {num_frames}, {size}")
    if not scenes:
        raise ValueError("render_batch needs at least one scene")
    device = torch.device("cpu") if device is None else torch.device(device)
    d = dynamics(scenes, start_frame, num_frames)
    img = composite(d, coverage(d, size, device), device)
    return (img * 2 - 1).to(dtype)


def render(scene: Scene, start_frame: int = 0, num_frames: int = 16, size: int = 64,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Render one scene -> [3, num_frames, size, size] in [-1, 1]; deterministic for any start frame."""
    return render_batch([scene], start_frame, num_frames, size, device, dtype)[0]


def object_centres(scenes: Sequence[Scene], start_frame: int | Sequence[int], num_frames: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding-box centres (x, y) on screen, each [B, K, T] float64, of every object slot in draw order
    (farthest first); empty slots hold 0.5 minus the camera offset."""
    d = dynamics(scenes, start_frame, num_frames)
    device = torch.device("cpu") if device is None else torch.device(device)
    return d["cx"].to(device), d["cy"].to(device)


def object_states(scenes: Sequence[Scene], start_frame: int | Sequence[int], num_frames: int, size: int = 64,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Ground truth of frames [start, start + num_frames) of each scene (CPU tensors; slot k = object k of
    the scene, i.e. of its prompt; empty slots: ``present`` False, NaN positions, never visible):

    - ``x``, ``y`` [B, K, T] float64: the shape's centroid on screen, in frame sides (outside [0, 1] when the
      object is out of the frame); ``vx``, ``vy``: its screen velocity (frame sides per frame);
    - ``visible_fraction`` [B, K, T]: the share of the shape's area drawn in the frame and not covered by
      nearer objects (rasterised at ``size``); ``visible`` = visible_fraction > 0.001;
    - ``present``, ``colour`` (index into SHAPE_COLOURS), ``shape`` (index into SHAPES), ``size``, ``area``
      (frame sides squared), ``depth_rank`` (0 = farthest, drawn first) [B, K];
    - ``lighting`` [B, T], ``background`` [B, T, 3] (the background colour as shown, lit), ``camera`` [B, T, 2].
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    d = dynamics(scenes, start_frame, num_frames)
    alpha = coverage(d, size, device)  # [B, K, T, S, S], draw order
    B, K, T = d["cx"].shape
    visible_px = torch.zeros(B, K, T, device=device)
    cover = torch.ones_like(alpha[:, 0])
    for k in reversed(range(K)):  # nearest first
        visible_px[:, k] = (alpha[:, k] * cover).sum(dim=(-2, -1))
        cover = cover * (1 - alpha[:, k])
    area_px = (d["area"] * size * size).clamp_min(1e-12)
    frac = (visible_px.cpu().double() / area_px[..., None]).clamp(0, 1) * d["present"][..., None]
    offset = torch.tensor([[centroid_offset(SHAPES[int(s)], float(z)) if p else 0.0
                            for s, z, p in zip(srow, zrow, prow)]
                           for srow, zrow, prow in zip(d["shape"], d["size"], d["present"])], dtype=torch.float64)
    draw = {"x": d["cx"], "y": d["cy"] + offset[..., None], "vx": d["vx_screen"], "vy": d["vy_screen"],
            "visible_fraction": frac}
    # Back from draw order to prompt order.
    index = d["index"].long()
    present = index >= 0
    nan = torch.full((B, K, T), float("nan"), dtype=torch.float64)
    out = {name: nan.clone() for name in draw}
    out["visible_fraction"].zero_()
    meta = {"present": torch.zeros(B, K, dtype=torch.bool), "colour": torch.full((B, K), -1, dtype=torch.long),
            "shape": torch.full((B, K), -1, dtype=torch.long), "size": torch.zeros(B, K, dtype=torch.float64),
            "area": torch.zeros(B, K, dtype=torch.float64),
            "depth_rank": torch.full((B, K), -1, dtype=torch.long)}
    for b in range(B):
        for k in range(K):
            if not present[b, k]:
                continue
            j = int(index[b, k])
            for name, v in draw.items():
                out[name][b, j] = v[b, k]
            meta["present"][b, j] = True
            meta["colour"][b, j] = int(d["colour"][b, k])
            meta["shape"][b, j] = int(d["shape"][b, k])
            meta["size"][b, j] = d["size"][b, k]
            meta["area"][b, j] = d["area"][b, k]
            meta["depth_rank"][b, j] = k
    out["visible"] = out["visible_fraction"] > 1e-3
    out.update(meta)
    out.update(lighting=d["lighting"], background=d["background"], camera=d["camera"])
    return out
