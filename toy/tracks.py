"""Finding the toy world's objects in a video: background, lighting, per-pixel colour, blobs and tracks.

Works on any device (the video's). Frames are [N, H, W, 3] in [0, 1] (``N`` = videos x frames).

- background: per-channel median of the border pixels; lighting: the upper quartile of the brightest
  channel over the inside of the shapes (every shape colour has a brightest channel of 1, so a shape's
  inside shows the lighting directly);
- colour: each pixel is explained as ``background + alpha * (lighting * colour - background)`` by the shape
  colour whose line passes nearest; it is a *shape pixel* when it lies at least half way along that line;
- blobs: 8-connected components of shape pixels; a *detection* is a (component, colour) pair with at least
  ``min_area`` shape pixels of that colour (a shape split by a nearer one stays one component). Each colour
  of a scene belongs to one object, so tracking is by colour: an object's track is its colour's largest
  detection. Its centroid is alpha-weighted over the detection and the one-pixel ring around it, so it is
  accurate to a small fraction of a pixel. A detection is *whole* when it is its colour's only detection,
  its component holds no other colour and it does not touch the frame border: then its centroid is the
  shape's and its shape can be classified (area over the product of the longest column and row: square 1,
  circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scene import SHAPE_COLOURS

PALETTE = torch.tensor(list(SHAPE_COLOURS.values()), dtype=torch.float32)  # [C, 3]
# Shape classification by fill ratio: below the first threshold a triangle, above the second a square.
SHAPE_THRESHOLDS = (0.735, 0.9)


def frames01(videos) -> torch.Tensor:
    """[B, 3, T, H, W] (or [3, T, H, W]) in [-1, 1] -> float32 [B, T, H, W, 3] in [0, 1], same device."""
    v = torch.as_tensor(videos).detach()
    if v.dim() == 4:
        v = v[None]
    if v.dim() != 5 or v.shape[1] != 3:
        raise ValueError(f"expected videos [B, 3, T, H, W] in [-1, 1], got shape {tuple(v.shape)}")
    return ((v.to(torch.float32).permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1)


def estimate_background(frames: torch.Tensor) -> torch.Tensor:
    """Per-frame background colour [..., 3]: per-channel median of the border pixels of [..., H, W, 3]."""
    border = torch.cat([frames[..., 0, :, :], frames[..., -1, :, :], frames[..., 1:-1, 0, :],
                        frames[..., 1:-1, -1, :]], dim=-2)
    return border.median(dim=-2).values


def estimate_lighting(frames: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Per-frame lighting [...] of frames [..., H, W, 3]: the upper quartile of the brightest channel over the
    inside of the shapes (pixels well above the background whose 8 neighbours are too: the quartile skips the
    partly covered ones left at small shapes); NaN where there is no inside."""
    bright = frames.max(dim=-1).values  # [..., H, W]
    lead = bright.shape[:-2]
    b = bright.reshape(-1, 1, *bright.shape[-2:])
    cand = (b > background.max(dim=-1).values.reshape(-1, 1, 1, 1) + 0.15).float()
    inside = -F.max_pool2d(-cand, 3, stride=1, padding=1) > 0.5  # eroded: all 8 neighbours bright too
    vals = torch.where(inside, b, torch.full_like(b, float("nan"))).flatten(1)
    return torch.nanquantile(vals, 0.75, dim=1).reshape(lead)


def saturation(rgb: torch.Tensor) -> torch.Tensor:
    """HSV saturation of [..., 3] RGB in [0, 1] (0 for black)."""
    hi, lo = rgb.max(dim=-1).values, rgb.min(dim=-1).values
    return torch.where(hi > 1e-6, (hi - lo) / hi.clamp_min(1e-6), torch.zeros_like(hi))


def classify_pixels(frames: torch.Tensor, background: torch.Tensor, light: torch.Tensor,
                    prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel colour of frames [N, H, W, 3] given background [N, 3], lighting [N] and the prompt's colours
    (bool [N, C] over SHAPE_COLOURS) -> ``cls`` (nearest colour line), ``alpha`` (coverage along it),
    ``shape`` (shape pixel), ``colour_error`` (distance to the nearest *prompt* colour line) [N, H, W] and
    ``ideal`` [N, H, W, 3] (that line's point: what the pixel should be). Pixels within 0.02 of the background
    are background (``cls`` 0, ``alpha`` 0) without further work."""
    N, H, W, _ = frames.shape
    palette = PALETTE.to(frames.device)
    d = frames - background[:, None, None, :]
    active = d.abs().amax(-1) > 0.02
    n, y, x = torch.nonzero(active, as_tuple=True)
    dv = d[n, y, x]  # [P, 3]
    axis = light[n, None, None] * palette[None] - background[n][:, None, :]  # [P, C, 3]
    len2 = axis.pow(2).sum(-1).clamp_min(1e-6)  # [P, C]
    dot = (dv[:, None, :] * axis).sum(-1)  # elementwise, not a matmul: no TF32 on GPUs
    al = (dot / len2).clamp(0, 1)
    resid = (dv.pow(2).sum(-1, keepdim=True) - 2 * al * dot + al * al * len2).clamp_min(0).sqrt()  # [P, C]
    cls = resid.argmin(-1)
    a = al.gather(1, cls[:, None])[:, 0]
    shape = dv.norm(dim=-1) >= 0.5 * len2.gather(1, cls[:, None])[:, 0].sqrt()
    rp = torch.where(prompt[n], resid, torch.full_like(resid, float("inf")))
    kp = rp.argmin(-1)
    ideal = background[n] + al.gather(1, kp[:, None]) * axis[torch.arange(len(kp), device=kp.device), kp]
    out = {"cls": torch.zeros(N, H, W, dtype=torch.long, device=frames.device),
           "alpha": torch.zeros(N, H, W, device=frames.device),
           "shape": torch.zeros(N, H, W, dtype=torch.bool, device=frames.device),
           "colour_error": torch.zeros(N, H, W, device=frames.device),
           "ideal": background[:, None, None, :].expand(N, H, W, 3).clone()}
    for k, v in (("cls", cls), ("alpha", a), ("shape", shape), ("colour_error", rp.gather(1, kp[:, None])[:, 0]),
                 ("ideal", ideal)):
        out[k][n, y, x] = v
    return out


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of a bool mask [N, H, W] -> int64 labels (0 = off, else a component id).

    Union-find over the set pixels, all edges at once: every round hooks the larger of two neighbouring
    roots onto the smaller, then compresses paths fully, until no edge joins two roots. A label is the flat
    index (within its frame) + 1 of a pixel of its component, the same for all pixels of it.
    """
    N, H, W = mask.shape
    dev = mask.device
    m = mask.reshape(-1)
    P = int(m.sum())
    if P == 0:
        return torch.zeros(N, H, W, dtype=torch.long, device=dev)
    dense = torch.where(m, torch.cumsum(m, 0) - 1, -1).view(N, H, W)  # index among set pixels, else -1
    src, dst = [], []
    for a, b in ((dense[:, :, :-1], dense[:, :, 1:]), (dense[:, :-1, :], dense[:, 1:, :]),
                 (dense[:, :-1, :-1], dense[:, 1:, 1:]), (dense[:, :-1, 1:], dense[:, 1:, :-1])):
        both = (a >= 0) & (b >= 0)  # each undirected neighbour pair once
        src.append(a[both])
        dst.append(b[both])
    src, dst = torch.cat(src), torch.cat(dst)
    parent = torch.arange(P, device=dev)
    while True:
        ri, rj = parent[src], parent[dst]
        join = ri != rj
        if not bool(join.any()):
            break
        lo, hi = torch.minimum(ri[join], rj[join]), torch.maximum(ri[join], rj[join])
        parent.scatter_reduce_(0, hi, lo, "amin")
        while True:
            up = parent[parent]
            if torch.equal(up, parent):
                break
            parent = up
        src, dst = src[join], dst[join]  # edges inside one component stay joined
    pixel = torch.arange(H * W, device=dev).repeat(N)[m]  # flat index within the frame of each set pixel
    out = torch.zeros(N * H * W, dtype=torch.long, device=dev)
    out[m] = pixel[parent] + 1
    return out.view(N, H, W)


def count_objects(shape_px: torch.Tensor, colour_index: torch.Tensor, num_colours: int,
                  min_area: int) -> torch.Tensor:
    """Objects per frame: over the 8-connected blobs of shape pixels [T, H, W], the number of
    (blob, colour) pairs with at least ``min_area`` pixels of that colour -> [T]."""
    T, H, W = shape_px.shape
    lab = connected_components(shape_px).view(T, -1)
    key = (torch.arange(T, device=lab.device)[:, None] * (H * W + 1) + lab) * num_colours + colour_index.view(T, -1)
    areas = torch.bincount(key[shape_px.view(T, -1)], minlength=T * (H * W + 1) * num_colours)
    return (areas.view(T, -1) >= min_area).sum(dim=1)


def interior(cls: torch.Tensor, shape_px: torch.Tensor) -> torch.Tensor:
    """Shape pixels whose 8 neighbours are shape pixels of the same colour [N, H, W] (mixed edge pixels
    between two shapes can look like a third colour, but never have an inside)."""
    c = torch.where(shape_px, cls, torch.full_like(cls, -1))
    p = F.pad(c, (1, 1, 1, 1), value=-2)
    H, W = c.shape[-2:]
    out = shape_px.clone()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= p[:, dy:dy + H, dx:dx + W] == c
    return out


def detections(cls: torch.Tensor, alpha: torch.Tensor, shape_px: torch.Tensor, min_area: int,
               foreign: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per frame and colour [N, C]: ``count`` (detections), and of the largest detection ``area`` (alpha
    sum, px), ``x``/``y`` (alpha-weighted centroid, frame sides), ``whole`` and ``fill`` (area over longest
    column x longest row; NaN unless whole). Colours flagged in ``foreign`` [N, C] (not in the prompt) count
    only with an inside (see :func:`interior`)."""
    N, H, W = cls.shape
    C = PALETTE.shape[0]
    dev = cls.device
    lab = connected_components(shape_px)
    # One-pixel ring: pixels next to a component take its label (for the alpha-weighted moments only).
    ring_lab = F.max_pool2d(lab[:, None].float(), 3, stride=1, padding=1)[:, 0].long()
    lab_all = torch.where(shape_px, lab, ring_lab)
    use = lab_all > 0
    n_idx, y_idx, x_idx = torch.nonzero(use, as_tuple=True)
    key = n_idx * (H * W + 1) + lab_all[use]
    comp, comp_inv = torch.unique(key, return_inverse=True)
    comp_frame = torch.div(comp, H * W + 1, rounding_mode="floor")
    colour = cls[use]
    pair_key = comp_inv * C + colour
    pairs, inv = torch.unique(pair_key, return_inverse=True)
    P = pairs.numel()
    if P == 0:
        nan = torch.full((N, C), float("nan"), device=dev)
        return {"count": torch.zeros(N, C, device=dev), "area": nan, "x": nan, "y": nan,
                "whole": torch.zeros(N, C, dtype=torch.bool, device=dev), "fill": nan}
    pair_comp, pair_colour = torch.div(pairs, C, rounding_mode="floor"), pairs % C
    pair_frame = comp_frame[pair_comp]
    core = shape_px[use].float()
    a = alpha[use].float()

    def total(w):
        return torch.zeros(P, device=dev).index_add_(0, inv, w)

    count, asum = total(core), total(a)
    ax, ay = total(a * (x_idx.float() + 0.5)), total(a * (y_idx.float() + 0.5))
    on_border = ((x_idx == 0) | (x_idx == W - 1) | (y_idx == 0) | (y_idx == H - 1)).float()
    border = total(on_border * core) > 0
    inside = total(interior(cls, shape_px)[use].float()) > 0
    cols = torch.zeros(P * W, device=dev).index_add_(0, inv * W + x_idx, a).view(P, W).amax(1)
    rows = torch.zeros(P * H, device=dev).index_add_(0, inv * H + y_idx, a).view(P, H).amax(1)
    is_foreign = foreign[pair_frame, pair_colour]
    valid = (count >= min_area) & (inside | ~is_foreign)
    # Colours per component (pairs with a shape pixel) -> purity.
    ncol = torch.zeros(comp.numel(), device=dev).index_add_(0, pair_comp, (count >= 1).float())
    group = pair_frame * C + pair_colour
    out_count = torch.zeros(N * C, device=dev).index_add_(0, group, valid.float())
    score = torch.where(valid, asum, torch.full_like(asum, -1.0))
    best = torch.full((N * C,), -1.0, device=dev).scatter_reduce(0, group, score, "amax")
    main = valid & (score == best[group])
    # Ties: keep the first pair of each group.
    first = torch.full((N * C,), P, device=dev, dtype=torch.long).scatter_reduce(
        0, group, torch.where(main, torch.arange(P, device=dev), torch.full_like(group, P)), "amin")
    nan = torch.full((N * C,), float("nan"), device=dev)
    has = first < P
    sel = first.clamp(max=P - 1)
    area = torch.where(has, asum[sel], nan)
    x = torch.where(has, ax[sel] / asum[sel].clamp_min(1e-6) / W, nan)
    y = torch.where(has, ay[sel] / asum[sel].clamp_min(1e-6) / H, nan)
    whole = has & (out_count == 1) & ~border[sel] & (ncol[pair_comp[sel]] <= 1)
    fill = torch.where(whole, area / (cols[sel] * rows[sel]).clamp_min(1e-6), nan)
    return {"count": out_count.view(N, C), "area": area.view(N, C), "x": x.view(N, C), "y": y.view(N, C),
            "whole": whole.view(N, C), "fill": fill.view(N, C)}


def classify_shape(fill: torch.Tensor) -> torch.Tensor:
    """Shape index (SHAPES order: circle 0, square 1, triangle 2) from fill ratios; -1 where NaN."""
    lo, hi = SHAPE_THRESHOLDS
    out = torch.where(fill < lo, 2, torch.where(fill > hi, 1, 0))
    return torch.where(torch.isnan(fill), torch.full_like(out, -1), out)
