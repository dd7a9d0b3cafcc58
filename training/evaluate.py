"""Drift evaluation: long videos from the causal-initialised and the Self-Forcing-trained students.

Both models generate the same prompts with the same seeds for ``eval.length_factor`` x the training clip
length, streaming through a rolling KV cache of ``eval.window`` latent frames (default: the training clip
length, the longest context either model saw in training). The toy codec decodes each video and the
per-frame drift metrics of ``training.drift`` give one curve per metric over the frame index (mean over
prompts). ``<out_dir>/eval.json`` holds the curves, the setup and a summary (mean of each metric over the
first training-length clip and over the last one; their ratio says how much the model drifts);
``<out_dir>/eval_samples.npz`` keeps a few decoded videos (uint8) for inspection.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..sf_model.sampler import generate
from .config import TrainConfig
from .engine import Runtime


def models_to_compare(cfg: TrainConfig) -> dict[str, str]:
    from .dmd import self_forcing_path
    from .ode_init import ode_init_path

    out = {}
    for name, path in (("causal_init", ode_init_path(cfg)), ("self_forcing", self_forcing_path(cfg))):
        if os.path.isfile(path):
            out[name] = path
    if not out:
        raise ValueError(f"nothing to evaluate in {cfg.run.out_dir}: run the ode_init and dmd stages first")
    return out


@torch.no_grad()
def long_videos(model, world, contexts: torch.Tensor, num_frames: int, window: int, seed: int, cfg: TrainConfig,
                batch_size: int, rt: Runtime) -> torch.Tensor:
    """Decoded pixel videos [N, 3, T, H, W] in [-1, 1] (CPU float32), generated batch by batch."""
    c, _, h, w = world.clip_shape
    opts = cfg.sampling.stream_options(window=window, extend_positions=True)
    out = []
    for b, start in enumerate(range(0, contexts.shape[0], batch_size)):
        ctx = contexts[start:start + batch_size].to(rt.device)
        # float32 (TF32 matmuls on GPUs): the sampler's cache is in the model's dtype
        lat = generate(model, ctx, num_frames=num_frames, height=h, width=w, seed=seed + b, options=opts)
        out.append(world.codec.decode(lat.float().cpu()).clamp(-1, 1))
    return torch.cat(out)


def drift_curves(world, video: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per-frame drift metrics {name: [N, T]} of decoded videos (see ``training.drift``)."""
    try:
        from .drift import per_frame_drift
    except ImportError:
        from .drift_local import per_frame_drift

    curves = per_frame_drift(video, prompts)
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in curves.items()}


def summarise(curves: dict[str, list[float]], clip: int) -> dict:
    out = {}
    for k, v in curves.items():
        first, last = float(np.mean(v[:clip])), float(np.mean(v[-clip:]))
        out[k] = {"first_clip": first, "last_clip": last, "mean": float(np.mean(v)),
                  "growth": last / first if first > 0 else None}
    return out


def evaluate_drift(cfg: TrainConfig, rt: Runtime, world, models: dict[str, str] | None = None) -> str:
    from .models import load_dit

    if world.kind != "toy":
        raise ValueError("the drift evaluation needs the toy world's codec and rules; for Wan, generate with the "
                         "CLI or the nodes and judge the videos")
    ec = cfg.eval
    clip = world.frames
    num_frames = ec.length_factor * clip
    window = ec.window or clip
    indices = list(range(ec.prompts))
    prompts = world.prompts(indices, "eval")
    contexts = world.encode_prompts(prompts, "cpu")
    result = {"prompts": prompts, "seed": ec.seed, "frames": num_frames, "train_frames": clip, "window": window,
              "frames_per_block": cfg.sampling.frames_per_block, "steps": list(cfg.sampling.steps),
              "curves": {}, "per_prompt": {}, "summary": {}}
    samples = {}
    for name, path in (models or models_to_compare(cfg)).items():
        model, meta = load_dit(path, rt.device)
        video = long_videos(model, world, contexts, num_frames, window, ec.seed, cfg, ec.batch_size, rt)
        curves = drift_curves(world, video, prompts)
        result["curves"][name] = {k: v.mean(0).tolist() for k, v in curves.items()}
        result["per_prompt"][name] = {k: v.tolist() for k, v in curves.items()}
        result["summary"][name] = summarise(result["curves"][name], clip)
        result["summary"][name]["steps_trained"] = meta.get("steps_trained")
        keep = min(4, video.shape[0])
        samples[name] = ((video[:keep] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        del model
    path = os.path.join(cfg.run.out_dir, "eval.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)
    np.savez_compressed(os.path.join(cfg.run.out_dir, "eval_samples.npz"), prompts=np.array(prompts[:4]), **samples)
    return path
