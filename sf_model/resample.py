"""Self-resampling of history (Resampling Forcing; Self-Forcing++'s backward noise re-injection).

Before continuing a video, the last ``frames`` latent frames of the history are noised to a strength
and re-denoised autoregressively by the model itself, chunk by chunk against a cache prefilled with the
untouched history. The context the model then attends to is in its own output distribution, not a
VAE-encoded real video or a drifted rollout. Strength 0 returns the history unchanged.

``strength`` in [0, 1] is a nominal step on the same scale as the sampler's steps (strength 0.25 =
nominal step 250, warped through the shifted table like every step); denoising resumes from that level
through the sampler's remaining steps.
"""

from __future__ import annotations

import torch

from .noise import chunk_noise
from .sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk, prefill, prepare
from .schedule import add_noise, make_steps
from .window import cache_slots

RESAMPLE_SEED_OFFSET = 0x5E5A


def resample_steps(strength: float, opts: StreamOptions):
    """The steps that re-denoise history from ``strength``: [strength] + the sampler's lower steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"resample strength must be in [0, 1], got {strength}")
    nominal = round(strength * 1000)
    if nominal == 0:
        return []
    if opts.warp:
        lower = [s for s in opts.steps if s < nominal]
        return make_steps([nominal, *lower], opts.shift, warp=True)
    start = make_steps([nominal], opts.shift, warp=True)[0]  # the level; then the sampler's lower timesteps
    rest = [s for s in make_steps(opts.steps, opts.shift, warp=False) if s.timestep < start.timestep]
    return [start, *rest]


def resample_history(model, context, history: torch.Tensor, *, frames: int, strength: float, seed: int = 0,
                     options: StreamOptions | None = None, check_cancel=None) -> torch.Tensor:
    """Return ``history`` [B, C, P, H, W] with its last ``frames`` frames resampled by the model.

    Frames before them are returned bit-identical. The cache used here is released before returning.
    """
    opts = options or StreamOptions()
    total = history.shape[2]
    frames = max(0, min(int(frames), total))
    steps = resample_steps(strength, opts)
    if frames == 0 or not steps:
        return history.clone()
    model.check_dtypes()
    text = prepare(model, context)
    if history.device != model.device:
        raise ValueError(f"history latents are on {history.device} but the model is on {model.device}")
    model.rope.check_frames(0, total, opts.extend_positions)
    b, c, _, h, w = history.shape
    ph, pw = model.config.patch_size[1:]
    window, sink = cache_slots(opts.window, opts.sink, total)  # no more slots than the history has frames
    cache = model.new_cache(b, (h // ph) * (w // pw), window=window, sink=sink,
                            key_means=opts.routing_topk is not None)
    keep = total - frames
    out = history.clone()
    x = history.float()
    try:
        with torch.no_grad():
            if keep:
                prefill(model, text, cache, x[:, :, :keep], opts, check_cancel)
            for ci, (start, n) in enumerate(chunk_plan(keep, total, opts.frames_per_block)):
                noise = chunk_noise(seed + RESAMPLE_SEED_OFFSET, ci, len(steps), (b, c, n, h, w), model.device)
                noisy = add_noise(x[:, :, start:start + n], noise[0], steps[0].sigma)
                x0 = denoise_chunk(model, text, cache, start, [noisy, *noise[1:len(steps)]], steps, opts,
                                   check_cancel=check_cancel)
                commit_chunk(model, text, cache, start, x0, opts)
                out[:, :, start:start + n] = x0.to(out.dtype)
    finally:
        cache.release()
    return out
