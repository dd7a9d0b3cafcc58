"""Quality cost of the opt-in FP8 linear layers, measured on the trained toy model (CPU is fine).

Generates the same prompts and seeds with the exact fused path and with FP8 GEMMs, and reports the
relative error of the latents and the drift metrics of both (training/drift.py).

    python benchmarks/fp8_quality.py [--prompts 8] [--frames 24]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.speed import use_fused_kernels
from self_forcing.sf_model.window import CachePolicy, checkpoint_frames_per_block
from self_forcing.toy.bundle import encode_prompt, latents_to_video
from self_forcing.training.drift import frame_metrics
from self_forcing.toy.world import sample_scene

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                     "self_forcing_toy.safetensors")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=ASSET)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=torch.float32)
    meta = loaded.meta
    opts = StreamOptions.from_meta(meta, CachePolicy.rolling(checkpoint_frames_per_block(meta), 12))
    prompts = [sample_scene(1000 + i).prompt for i in range(args.prompts)]
    keys = ("count_error", "colour_error", "saturation_error", "sharpness_error", "background_error")
    sums = {mode: {k: [] for k in keys} for mode in ("exact", "fp8")}
    errs = []
    size = 64 // 2
    for i, prompt in enumerate(prompts):
        ctx = encode_prompt(loaded, [prompt], device=args.device)
        out = {}
        for mode in ("exact", "fp8"):
            use_fused_kernels(loaded.model, fp8=(mode == "fp8"))
            lat = generate(loaded.model, ctx, num_frames=args.frames, height=size, width=size, seed=i, options=opts)
            out[mode] = lat
            m = frame_metrics(latents_to_video(loaded, lat)[0], prompt)
            for k in keys:
                sums[mode][k].append(float(np.nanmean(m[k])))
        errs.append(((out["fp8"] - out["exact"]).norm() / out["exact"].norm()).item())
    print(f"{len(prompts)} prompts x {args.frames} frames, toy model {os.path.basename(args.model)}")
    print(f"FP8 vs exact latents: relative error {np.mean(errs):.3f} (median {np.median(errs):.3f})")
    print(f"{'metric (lower is better)':28s} {'exact':>8s} {'fp8':>8s}")
    for k in keys:
        print(f"{k:28s} {np.mean(sums['exact'][k]):8.3f} {np.mean(sums['fp8'][k]):8.3f}")


if __name__ == "__main__":
    main()
