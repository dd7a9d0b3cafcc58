"""Self-resampling of history (Resampling Forcing; Self-Forcing++'s backward noise re-injection).

Two uses: ``resample_history`` (inference: degrade the tail of a history before continuing it, below) and
``self_resample`` (training: Resampling Forcing's degraded history x~ of a whole clip, per sample noise level,
see ``training.resampling``).

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


# -- Resampling Forcing's self-resampling of a training clip ---------------------------------------------------
def resample_sigmas(sigma_s: torch.Tensor, steps: int) -> torch.Tensor:
    """The solver's noise levels [B, steps] from each sample's ``sigma_s`` [B] down towards 0 (uniform in sigma;
    the last step predicts x0 from sigma_s / steps)."""
    if steps < 1:
        raise ValueError(f"resampling needs >= 1 solver step, got {steps}")
    frac = 1.0 - torch.arange(steps, dtype=torch.float32, device=sigma_s.device) / steps
    return sigma_s.float()[:, None] * frac[None, :]


def denoise_levels(model, text, cache, start: int, x: torch.Tensor, sigmas: torch.Tensor, noise, *,
                   solver: str, routing_topk: int | None = None, extend_positions: bool = False) -> torch.Tensor:
    """Denoise one chunk ``x`` [B, C, F, H, W] at levels ``sigmas`` [B, n] (per sample) through ``cache``; returns
    the x0 prediction of the last level. Between levels: "euler" moves along the predicted flow
    (x + (sigma' - sigma) v), "renoise" re-noises x0 with ``noise[j + 1]`` (the sampler's two solvers)."""
    b, f = x.shape[0], x.shape[2]
    n = sigmas.shape[1]
    x0 = x
    for j in range(n):
        s = sigmas[:, j]
        t = (s * 1000.0)[:, None].expand(b, f).contiguous()
        flow = model.forward_chunk(x, t, text, cache, start, routing_topk=routing_topk,
                                   extend_positions=extend_positions)
        x0 = x - s.view(b, 1, 1, 1, 1) * flow
        if j < n - 1:
            nxt = x0 + flow if solver == "euler" else noise[j + 1]
            x = add_noise(x0, nxt, sigmas[:, j + 1].view(b, 1, 1, 1, 1))
    return x0


@torch.no_grad()
def self_resample(model, context, clip: torch.Tensor, sigma_s: torch.Tensor, noise: torch.Tensor, *,
                  frames_per_block: int, solver: str = "renoise", context_noise: float = 0.0,
                  window: int | None = None, sink: int = 0, routing_topk: int | None = None,
                  frames: int | None = None) -> torch.Tensor:
    """Resampling Forcing's degraded history x~ of ``clip`` [B, C, F, H, W] (model space), without gradient.

    Chunk by chunk, in order: the clean chunk is noised to its sample's ``sigma_s`` [B] with ``noise[0]``, then
    denoised by the model through ``noise.shape[0]`` solver levels (``resample_sigmas``) against a KV cache of
    the already resampled chunks, and committed to the cache at ``context_noise`` (as the sampler commits a
    finished chunk). ``noise`` [n, B, C, F, H, W]: the first noise and, for "renoise", one fresh noise per
    further level. Only the first ``frames`` frames (default all) are resampled; later ones are returned clean
    (Resampling Forcing never uses the last chunk as history)."""
    b, _, total, h, w = clip.shape
    frames = total if frames is None else max(0, min(int(frames), total))
    out = clip.detach().float().clone()
    if frames == 0:
        return out
    opts = StreamOptions(frames_per_block=frames_per_block, context_noise=context_noise, window=window, sink=sink,
                         routing_topk=routing_topk, extend_positions=window is not None, partial_last_chunk=True)
    text = prepare(model, context)
    ph, pw = model.config.patch_size[1:]
    ring, sink_slots = cache_slots(window, sink, frames)
    cache = model.new_cache(b, (h // ph) * (w // pw), window=ring, sink=sink_slots, key_means=routing_topk is not None)
    sigmas = resample_sigmas(sigma_s.to(clip.device), noise.shape[0])
    s0 = sigmas[:, 0].view(b, 1, 1, 1, 1)
    try:
        for start, n in chunk_plan(0, frames, frames_per_block):
            part = slice(start, start + n)
            noisy = add_noise(out[:, :, part], noise[0][:, :, part].float(), s0)
            x0 = denoise_levels(model, text, cache, start, noisy, sigmas, [z[:, :, part].float() for z in noise],
                                solver=solver, routing_topk=routing_topk, extend_positions=opts.extend_positions)
            out[:, :, part] = x0
            if start + n < frames:
                commit_chunk(model, text, cache, start, x0, opts)
    finally:
        cache.release()
    return out
