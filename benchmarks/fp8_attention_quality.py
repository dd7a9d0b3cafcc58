"""Quality cost of the opt-in FP8 K/V cache, measured on the trained toy model (CPU is fine).

Generates the same prompts and seeds with the exact cache, with the FP8 K/V cache (``StreamOptions(kv_fp8=True)``,
``sf_model.speed.kv_fp8``) and with the FP8 K/V cache plus the FP8 linear layers (``use_fused_kernels(fp8=True)``),
and reports the relative error of the latents against the exact run and the toy-world metrics of each
(``toy.metrics``, lower is better).

    python benchmarks/fp8_attention_quality.py [--prompts 8] [--frames 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.speed import use_fused_kernels
from self_forcing.sf_model.window import CachePolicy, checkpoint_frames_per_block
from self_forcing.toy.bundle import encode_prompt, latents_to_video
from self_forcing.toy.metrics import video_metrics
from self_forcing.toy.world import sample_scene

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "self_forcing_toy.safetensors")
KEYS = ("count_error", "colour_error", "saturation_error", "sharpness_error", "background_error",
        "flicker_error", "motion_error")
MODES = {"exact": (False, False), "fp8 K/V": (True, False), "fp8 K/V + fp8 linear": (True, True)}


def run(model_path: str, prompts: int, frames: int, device: str, window: int, size: int = 32,
        dtype: torch.dtype = torch.float32) -> dict:
    """{mode: {"rel_error": [...per prompt], metric: [...per prompt]}} for every mode of ``MODES``."""
    loaded = load_model(model_path, device=device, dtype=dtype)
    meta = loaded.meta
    policy = CachePolicy.rolling(checkpoint_frames_per_block(meta), window)
    texts = [sample_scene(1000 + i).prompt for i in range(prompts)]
    fpb = checkpoint_frames_per_block(meta)
    out = {mode: {k: [] for k in ("rel_error", "first_chunk_error") + KEYS} for mode in MODES}
    for i, prompt in enumerate(texts):
        ctx = encode_prompt(loaded, [prompt], device=device).to(dtype)
        exact = None
        for mode, (kv, linear) in MODES.items():
            use_fused_kernels(loaded.model, enabled=linear, fp8=linear)
            opts = StreamOptions.from_meta(meta, policy, kv_fp8=kv)
            with torch.no_grad():
                lat = generate(loaded.model, ctx, num_frames=frames, height=size, width=size, seed=i, options=opts)
            exact = lat if exact is None else exact
            out[mode]["rel_error"].append(((lat - exact).norm() / exact.norm()).item())
            first, first_exact = lat[:, :, :fpb], exact[:, :, :fpb]
            out[mode]["first_chunk_error"].append(((first - first_exact).norm() / first_exact.norm()).item())
            m = video_metrics(latents_to_video(loaded, lat), [prompt])
            for k in KEYS:
                out[mode][k].append(float(np.nanmean(m[k][0])))
    use_fused_kernels(loaded.model, enabled=False)
    return out


def table(res: dict) -> str:
    modes = list(res)
    lines = [f"{'':28s}" + "".join(f"{m:>22s}" for m in modes)]
    lines.append(f"{'latent rel. error vs exact':28s}" + "".join(f"{np.mean(res[m]['rel_error']):22.4f}" for m in modes))
    lines.append(f"{'  median over prompts':28s}" + "".join(f"{np.median(res[m]['rel_error']):22.4f}" for m in modes))
    lines.append(f"{'  first chunk only':28s}"
                 + "".join(f"{np.mean(res[m]['first_chunk_error']):22.4f}" for m in modes))
    for k in KEYS:
        lines.append(f"{k:28s}" + "".join(f"{np.nanmean(res[m][k]):22.3f}" for m in modes))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ASSET)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--window", type=int, default=12, help="rolling cache window (latent frames)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the per-prompt numbers here")
    args = p.parse_args(argv)
    res = run(args.model, args.prompts, args.frames, args.device, args.window)
    print(f"{args.prompts} prompts x {args.frames} frames, rolling window {args.window}, toy model "
          f"{os.path.basename(args.model)}, float32 on {args.device}")
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
