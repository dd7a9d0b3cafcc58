"""Long video on the bundled toy model (CPU, minutes): prompt switches (keep vs re-cache vs reset) and drift at 20x
the training length (absolute vs rebased positions), measured with the toy world's metrics (``toy.metrics``).

    python benchmarks/long_video_toy.py [--batch 4] [--json out.json]           # both tables
    python benchmarks/long_video_toy.py --only switch --switch-at 18 --after 24
    python benchmarks/long_video_toy.py --device cuda --batch 32 --json out.json   # more videos, on a GPU

Every run is one batch of ``--batch`` videos (one seed; the chunk noise differs per batch item).

1. Switch: rolling cache of 9 frames + a sink of 3 (sink + window = the 12-frame training clip), rebased
   positions; prompt A ("a red circle and a yellow square ...") until ``--switch-at`` (past the first window
   slide), then prompt B ("a green triangle ...", same navy background) with each policy. Per chunk after the
   switch, from the prompt-mode ``count_error`` (blobs of colours a prompt does not name, and second blobs of a
   colour it names): ``old`` = that count against B (A's objects still there), ``new`` = against A (B's object
   there). Both are put on a 0..1 scale between a video of A only and a video of B only at the same frames
   (same seed): ``follow = (1 - old_scaled + new_scaled) / 2``, 0 = looks like the A video, 1 = like the B video.
   "Chunks to follow" = the first chunk after the switch from which ``follow`` stays >= 0.8 (batch mean).
   Background continuity: the background's jump across the switch (``flicker_error`` at the first frame after it:
   jumps beyond the world's slow drift, 0 = none) and the background error against B after the switch.
2. Drift: prompt A for 20 x 12 = 240 frames, rolling 9 + sink 3, absolute vs rebased positions: colour, count,
   background and sharpness errors (toy.metrics) in the first 12 frames vs the last 12 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.prompt_schedule import SWITCH_POLICIES, PromptSchedule, PromptSwitch
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.toy.bundle import encode_prompt, latents_to_video
from self_forcing.toy.metrics import per_window, video_metrics

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "self_forcing_toy.safetensors")
PROMPT_A = "a red circle and a yellow square bouncing on a navy background"
PROMPT_B = "a green triangle bouncing on a navy background"
TRAIN_FRAMES = 12


def options(meta, positions: str) -> StreamOptions:
    return StreamOptions(frames_per_block=3, steps=tuple(meta["steps"]), shift=float(meta["shift"]),
                         context_noise=float(meta.get("context_noise", 0.0)), window=9, sink=3,
                         extend_positions=True, positions=positions)


def run(loaded, context, frames: int, batch: int, opts: StreamOptions) -> torch.Tensor:
    """Videos [batch, 3, T, 64, 64] in [-1, 1] of one run (``context``: a prompt [1, L, D] or a PromptSchedule)."""
    h, w = (int(v) for v in loaded.meta["toy"]["latent_size"])
    grow = lambda c: c.expand(batch, -1, -1).to(loaded.model.device)  # noqa: E731
    context = context.map_contexts(grow) if isinstance(context, PromptSchedule) else grow(context)
    lat = generate(loaded.model, context, num_frames=frames, height=h, width=w, seed=0, options=opts)
    return latents_to_video(loaded, lat)


def per_chunk(values: np.ndarray) -> np.ndarray:
    """[B, T] -> batch mean per chunk of 3 frames [T // 3]."""
    return np.nanmean(values[:, : values.shape[1] // 3 * 3].reshape(values.shape[0], -1, 3), axis=(0, 2))


def switch_table(loaded, batch: int, switch_at: int, after: int) -> dict:
    a, b = (encode_prompt(loaded, p, "cpu") for p in (PROMPT_A, PROMPT_B))
    opts = options(loaded.meta, "rebased")
    total = switch_at + after

    def measures(videos):
        post = videos[:, :, switch_at:]
        vs_b, vs_a = video_metrics(post, [PROMPT_B] * batch), video_metrics(post, [PROMPT_A] * batch)
        return per_chunk(vs_b["count_error"]), per_chunk(vs_a["count_error"]), vs_b

    t0 = time.time()
    old_a, new_a, _ = measures(run(loaded, a, total, batch, opts))   # A only: old objects there, no new one
    old_b, new_b, _ = measures(run(loaded, b, total, batch, opts))   # B only
    out = {"baselines": {"a_only": {"old": old_a.round(3).tolist(), "new": new_a.round(3).tolist()},
                         "b_only": {"old": old_b.round(3).tolist(), "new": new_b.round(3).tolist()},
                         "seconds": round(time.time() - t0, 1)}}
    span_old = max(float(np.mean(old_a - old_b)), 1e-6)
    span_new = max(float(np.mean(new_b - new_a)), 1e-6)
    for policy in SWITCH_POLICIES:
        t0 = time.time()
        schedule = PromptSchedule([PromptSwitch(0, a), PromptSwitch(switch_at, b, policy)])
        videos = run(loaded, schedule, total, batch, opts)
        old, new, vs_b = measures(videos)
        follow = (1 - np.clip((old - old_b) / span_old, 0, 1) + np.clip((new - new_a) / span_new, 0, 1)) / 2
        bad = np.nonzero(follow < 0.8)[0]
        first = 0 if not len(bad) else (int(bad[-1]) + 1 if bad[-1] + 1 < len(follow) else None)
        whole = video_metrics(videos, [PROMPT_B] * batch)
        out[policy] = {
            "chunks_to_follow": first,
            "follow_first_3_chunks": round(float(np.mean(follow[:3])), 3),
            "follow_by_chunk": follow.round(2).tolist(),
            "old_by_chunk": old.round(2).tolist(), "new_by_chunk": new.round(2).tolist(),
            "background_jump_at_switch": float(np.nanmean(whole["flicker_error"][:, switch_at])),
            "background_error_after": float(np.nanmean(vs_b["background_error"])),
            "seconds": round(time.time() - t0, 1),
        }
    return out


def drift_table(loaded, batch: int, frames: int) -> dict:
    a = encode_prompt(loaded, PROMPT_A, "cpu")
    out = {}
    keys = ("colour_error", "count_error", "background_error", "sharpness_error")
    for positions in ("absolute", "rebased"):
        t0 = time.time()
        videos = run(loaded, a, frames, batch, options(loaded.meta, positions))
        m = video_metrics(videos, [PROMPT_A] * batch)
        row = {}
        for k in keys:
            w = per_window(m[k], TRAIN_FRAMES)
            row[k] = {"first_clip": float(np.nanmean(w[:, 0])), "last_clip": float(np.nanmean(w[:, -1]))}
        row["seconds"] = round(time.time() - t0, 1)
        out[positions] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="videos per run")
    ap.add_argument("--switch-at", type=int, default=18, help="latent frame of the switch (a chunk start)")
    ap.add_argument("--after", type=int, default=24, help="frames generated after the switch")
    ap.add_argument("--drift-frames", type=int, default=20 * TRAIN_FRAMES)
    ap.add_argument("--only", choices=("switch", "drift"), default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    loaded = load_model(ASSET, dtype=torch.float32)
    loaded.model.to(torch.device(args.device)).eval()
    results = {"batch": args.batch, "device": args.device, "prompts": [PROMPT_A, PROMPT_B], "cache": "rolling window 9 + sink 3"}
    if args.only in (None, "switch"):
        sw = results["switch"] = switch_table(loaded, args.batch, args.switch_at, args.after)
        print(f"\nPrompt switch at frame {args.switch_at}: {PROMPT_A!r} -> {PROMPT_B!r}; rolling 9 + sink 3, rebased "
              f"positions, {args.batch} videos. follow: 0 = like the A-only video, 1 = like the B-only video")
        print("| policy | chunks to follow (>= 0.8 from then on) | follow, first 3 chunks | follow, chunk +0, +1, ... | "
              "background jump at switch | background error after |")
        print("|---|---|---|---|---|---|")
        for policy in SWITCH_POLICIES:
            r = sw[policy]
            first = "never" if r["chunks_to_follow"] is None else r["chunks_to_follow"]
            print(f"| {policy} | {first} | {r['follow_first_3_chunks']:.2f} | {r['follow_by_chunk']} | {r['background_jump_at_switch']:.4f} | "
                  f"{r['background_error_after']:.4f} |")
    if args.only in (None, "drift"):
        dr = results["drift"] = drift_table(loaded, args.batch, args.drift_frames)
        print(f"\nDrift over {args.drift_frames} frames ({args.drift_frames // TRAIN_FRAMES}x the training clip), "
              f"{PROMPT_A!r}, {args.batch} videos: first 12 frames -> last 12 frames")
        print("| positions | colour error | count error | background error | sharpness error |")
        print("|---|---|---|---|---|")
        for positions, r in dr.items():
            cells = " | ".join(f"{r[k]['first_clip']:.4f} -> {r[k]['last_clip']:.4f}"
                               for k in ("colour_error", "count_error", "background_error", "sharpness_error"))
            print(f"| {positions} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
