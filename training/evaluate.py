"""Drift evaluation: long videos from the causal-initialised and the Self-Forcing-trained students.

Both models generate the same prompts with the same seeds for ``length_factor`` x the training clip length,
streaming through a rolling KV cache of ``window`` latent frames (default: the training clip length, the
longest context either model saw in training). The toy codec decodes each video and the per-frame metrics
of ``training.drift`` (background, colour, saturation, object count, sharpness errors) give one curve per
metric over the frame index (mean over prompts). The result JSON holds the curves, the setup and a summary
(mean of each metric over the first and the last training-length clip, and their ratio ``growth``).

In the pipeline this is the ``eval`` stage (``<out_dir>/eval.json`` and ``eval_samples.npz`` with a few
decoded videos). For exported toy checkpoints (each bundles its text encoder and codec)::

    python -m self_forcing.training.evaluate causal_init=a.safetensors self_forcing=b.safetensors \\
        --prompts 16 --length-factor 6 --out eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch

from ..sf_model.sampler import StreamOptions, generate
from ..sf_model.window import CachePolicy, checkpoint_frames_per_block, trained_frames
from .config import TrainConfig
from .engine import Runtime

SUMMARY_METRICS = ("background_error", "colour_error", "saturation_error", "count_error", "sharpness_error",
                   "presence_error", "object_count", "presence")


def eval_prompts(seed: int, count: int, max_objects: int | None = None) -> list[str]:
    """The evaluation prompts of a run seeded with ``seed`` (stream 'eval' of the toy world)."""
    from .data import toy_scene

    return [toy_scene(seed, "eval", i, max_objects)[0].prompt for i in range(count)]


@torch.no_grad()
def long_videos(model, encode, decode, prompts: list[str], *, num_frames: int, latent_hw, options: StreamOptions,
                seed: int, batch_size: int) -> torch.Tensor:
    """Decoded pixel videos [N, 3, T, H, W] in [-1, 1] (CPU float32), generated batch by batch in the model's
    dtype; batch b uses seed ``seed + b``."""
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        ctx = encode(prompts[start:start + batch_size])
        lat = generate(model, ctx, num_frames=num_frames, height=latent_hw[0], width=latent_hw[1], seed=seed + b,
                       options=options)
        out.append(decode(lat.float()).float().cpu().clamp(-1, 1))
    return torch.cat(out)


def video_drift(videos: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-frame drift metrics {name: [N, T]} of decoded videos [N, 3, T, H, W] (``training.drift``)."""
    from .drift import frame_metrics

    per = [frame_metrics(v, p) for v, p in zip(videos, prompts)]
    return {k: np.stack([m[k] for m in per]) for k in per[0]}


def summarise(curves: dict[str, list], clip: int) -> dict:
    out = {}
    for k in SUMMARY_METRICS:
        if k not in curves:
            continue
        v = np.asarray(curves[k], dtype=np.float64)
        first, last = float(np.nanmean(v[:clip])), float(np.nanmean(v[-clip:]))
        out[k] = {"first_clip": first, "last_clip": last, "mean": float(np.nanmean(v)),
                  "growth": last / first if first > 0 else None}
    return out


def _clean(v: np.ndarray) -> list:
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, dtype=np.float64).ravel()]


def compare(models: dict, prompts: list[str], *, clip: int, num_frames: int, latent_hw, options: StreamOptions,
            seed: int, batch_size: int, keep_samples: int = 4) -> tuple[dict, dict]:
    """``models``: {name: (model, encode(prompts) -> context, decode(latents) -> video, meta)}.
    Returns (result JSON, {name: uint8 samples [k, 3, T, H, W]})."""
    result = {"prompts": prompts, "seed": seed, "frames": num_frames, "train_frames": clip,
              "window": options.window, "frames_per_block": options.frames_per_block,
              "steps": list(options.steps), "curves": {}, "per_prompt": {}, "summary": {}}
    samples = {}
    for name, (model, encode, decode, meta) in models.items():
        video = long_videos(model, encode, decode, prompts, num_frames=num_frames, latent_hw=latent_hw,
                            options=options, seed=seed, batch_size=batch_size)
        per = video_drift(video, prompts)
        with warnings.catch_warnings():  # all-NaN frames (no shape pixels) stay NaN -> null
            warnings.simplefilter("ignore", RuntimeWarning)
            curves = {k: np.nanmean(v, axis=0) for k, v in per.items()}
            result["summary"][name] = summarise(curves, clip)
        result["curves"][name] = {k: _clean(v) for k, v in curves.items()}
        result["per_prompt"][name] = {k: [_clean(row) for row in v] for k, v in per.items()}
        result["summary"][name]["steps_trained"] = meta.get("steps_trained")
        keep = min(keep_samples, video.shape[0])
        samples[name] = ((video[:keep] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return result, samples


def _write(result: dict, samples: dict, path: str, prompts: list[str]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)
    np.savez_compressed(os.path.splitext(path)[0] + "_samples.npz", prompts=np.array(prompts[:4]), **samples)
    return path


def models_to_compare(cfg: TrainConfig) -> dict[str, str]:
    from .dmd import self_forcing_path
    from .ode_init import ode_init_path

    out = {name: path for name, path in (("causal_init", ode_init_path(cfg)), ("self_forcing", self_forcing_path(cfg)))
           if os.path.isfile(path)}
    if not out:
        raise ValueError(f"nothing to evaluate in {cfg.run.out_dir}: run the ode_init and dmd stages first")
    return out


def evaluate_drift(cfg: TrainConfig, rt: Runtime, world, models: dict[str, str] | None = None) -> str:
    """The pipeline's eval stage: ``<out_dir>/eval.json`` (+ ``eval_samples.npz``)."""
    from .models import load_dit

    if world.kind != "toy":
        raise ValueError("the drift evaluation needs the toy world's codec and rules; for Wan, generate with the "
                         "CLI or the nodes and judge the videos")
    ec = cfg.eval
    clip = world.frames
    window = ec.window or clip
    prompts = eval_prompts(cfg.run.seed, ec.prompts, cfg.world.max_objects)
    loaded = {}
    for name, path in (models or models_to_compare(cfg)).items():
        model, meta = load_dit(path, rt.device)  # float32 (TF32 matmuls on GPUs)
        loaded[name] = (model, lambda p: world.encode_prompts(p, rt.device), world.decode, meta)
    # the sampler keeps its cache in the model's dtype, so no autocast here
    opts = cfg.sampling.stream_options(window=window)  # rolling: positions may pass the RoPE table
    result, samples = compare(loaded, prompts, clip=clip, num_frames=ec.length_factor * clip,
                              latent_hw=world.clip_shape[2:], options=opts, seed=ec.seed, batch_size=ec.batch_size)
    return _write(result, samples, os.path.join(cfg.run.out_dir, "eval.json"), prompts)


def evaluate_bundles(paths: dict[str, str], *, prompts: int = 16, run_seed: int = 0, seed: int = 1234,
                     length_factor: int = 6, window: int | None = None, batch_size: int = 8,
                     device: str = "cpu", out: str = "eval.json") -> str:
    """Compare exported toy checkpoints (each with its bundled text encoder and codec)."""
    from ..sf_model.checkpoint import load_model
    from ..toy.bundle import encode_prompt, is_toy_bundle, latents_to_video

    dev = torch.device(device)
    loaded, first = {}, None
    for name, path in paths.items():
        lm = load_model(path, device=dev, dtype=torch.float32)
        if not is_toy_bundle(lm):
            raise ValueError(f"{path} is not a self-contained toy checkpoint")
        first = first or lm
        loaded[name] = (lm.model, lambda p, lm=lm: encode_prompt(lm, p, dev),
                        lambda z, lm=lm: latents_to_video(lm, z), lm.meta)
    meta, toy = first.meta, first.meta["toy"]
    clip = trained_frames(meta)
    opts = StreamOptions.from_meta(meta, CachePolicy.rolling(checkpoint_frames_per_block(meta), window or clip))
    names = eval_prompts(run_seed, prompts)
    result, samples = compare(loaded, names, clip=clip, num_frames=length_factor * clip,
                              latent_hw=tuple(toy["latent_size"]), options=opts, seed=seed, batch_size=batch_size)
    return _write(result, samples, out, names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m self_forcing.training.evaluate",
                                 description="Drift curves of exported toy checkpoints (same prompts and seeds).")
    ap.add_argument("models", nargs="+", help="NAME=PATH of each exported toy checkpoint")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--run-seed", type=int, default=0, help="run.seed of the training config (picks the prompts)")
    ap.add_argument("--seed", type=int, default=1234, help="sampling seed (batch b uses seed + b)")
    ap.add_argument("--length-factor", type=int, default=6)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="eval.json")
    args = ap.parse_args(argv)
    try:
        paths = dict(m.split("=", 1) for m in args.models)
    except ValueError:
        print("error: give models as NAME=PATH", file=sys.stderr)
        return 2
    try:
        path = evaluate_bundles(paths, prompts=args.prompts, run_seed=args.run_seed, seed=args.seed,
                                length_factor=args.length_factor, window=args.window, batch_size=args.batch_size,
                                device=args.device, out=args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(path) as fh:
        summary = json.load(fh)["summary"]
    for name, s in summary.items():
        print(name, {k: (round(s[k]["first_clip"], 4), round(s[k]["last_clip"], 4)) for k in SUMMARY_METRICS
                     if k in s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
