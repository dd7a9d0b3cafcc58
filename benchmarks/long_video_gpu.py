"""Endless stream check: time per chunk and memory at frame ~100 and at frame N (default 10 000 latent frames) of a
Wan2.1-1.3B-sized causal DiT (random weights) at 832x480 with a rolling cache (window 18 + sink 3, rebased
positions), optionally with prompt switches (KV re-cache) along the way. Both should be flat: the script reports
the ratios (the issue asks for time per chunk and peak memory within 2 %).

    python benchmarks/long_video_gpu.py --out long_video_gpu.json                 # H200: see the docstring's budget
    python benchmarks/long_video_gpu.py --tiny --device cpu --frames 300 --out /tmp/lv.json   # CPU smoke test

Per chunk: CUDA-event time of the whole chunk (denoising passes + its clean context pass, measured between the
hand-outs of consecutive chunks) and ``torch.cuda.memory_allocated``; the peak (``max_memory_allocated``) is
taken over two windows of ``--span`` latent frames: the one ending at frame ~100 and the last one (the peak
statistics are reset at the start of each window). Prompt switches (``--switch-every``, 0 = none) alternate two
random prompts with a re-cache; the chunks right after a switch carry its cost and are reported apart. Writes the
JSON after each window, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from self_forcing.benchmarks.wan_random import random_model
from self_forcing.sf_model.config import TINY, WAN_1_3B
from self_forcing.sf_model.prompt_schedule import PromptSchedule, PromptSwitch
from self_forcing.sf_model.sampler import StreamOptions, stream
from self_forcing.sf_model.schedule import parse_steps


def build(tiny: bool, dtype, device, fused: bool):
    cfg = TINY if tiny else WAN_1_3B
    model = random_model(cfg, device, dtype, seed=0, attn_backend="auto" if device.type == "cuda" else "sdpa")
    model = model.eval().requires_grad_(False)
    if fused:
        from self_forcing.sf_model.speed import use_cuda_graphs, use_fused_kernels

        use_cuda_graphs(use_fused_kernels(model))
    return model, cfg


@torch.no_grad()  # a context, not a global switch: tests call main() in-process
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=10_002, help="latent frames (a multiple of 3)")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--window", type=int, default=18)
    ap.add_argument("--sink", type=int, default=3)
    ap.add_argument("--positions", default="rebased", choices=("absolute", "rebased"))
    ap.add_argument("--steps", default="1000, 750, 500, 250")
    ap.add_argument("--switch-every", type=int, default=0, help="latent frames between prompt switches (re-cache)")
    ap.add_argument("--span", type=int, default=30, help="latent frames per measurement window")
    ap.add_argument("--at", default="1000,2500,5000,7500",
                    help="more windows ending at these latent frames (besides frame 100 and the last), so a run cut "
                         "short by a time limit still shows the trend; empty for none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--fused", action="store_true", help="fused kernels + CUDA graphs")
    ap.add_argument("--tiny", action="store_true", help="the tiny test config (CPU smoke test)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, cfg = build(args.tiny, dtype, device, args.fused)
    h, w = (4, 6) if args.tiny else (args.height // 8, args.width // 8)
    g = torch.Generator().manual_seed(1)
    prompts = [(torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) * 0.1).to(device)
               for _ in range(2)]
    switches = [PromptSwitch(f, prompts[(i + 1) % 2], "recache")
                for i, f in enumerate(range(args.switch_every, args.frames, args.switch_every or args.frames))
                if args.switch_every]
    context = PromptSchedule([PromptSwitch(0, prompts[0])] + switches) if switches else prompts[0]
    opts = StreamOptions(frames_per_block=3, steps=parse_steps(args.steps), window=args.window, sink=args.sink,
                         extend_positions=True, positions=args.positions)
    windows = {"frame_100": (max(0, 100 - args.span), 100)}
    for f in (int(v) for v in args.at.split(",") if v.strip()):
        if args.span <= f < args.frames - args.span:
            windows[f"frame_{f}"] = (f - args.span, f)
    windows["last"] = (args.frames - args.span, args.frames)
    result = {"config": vars(args), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "model": "tiny" if args.tiny else "Wan2.1-1.3B (random weights)", "windows": {}}
    switch_frames = {s.start_frame for s in switches}

    def now():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1000

    marks, ends = [now()], []
    t0 = time.time()
    window_rows = {name: [] for name in windows}
    for chunk in stream(model, context, num_frames=args.frames, height=h, width=w, seed=0, options=opts):
        marks.append(now())
        end = chunk.start_frame + chunk.latents.shape[2]
        ends.append((chunk.start_frame, end))
        for name, (lo, hi) in windows.items():
            if chunk.start_frame == lo - lo % 3 and cuda:
                torch.cuda.reset_peak_memory_stats(device)
            if lo <= chunk.start_frame and end <= hi:
                window_rows[name].append(len(ends) - 1)
            if end == hi - hi % 3 or (name == "last" and end == args.frames):
                if cuda:
                    torch.cuda.synchronize(device)
                times = [ms(marks[i], marks[i + 1]) for i in window_rows[name]
                         if ends[i][0] not in switch_frames and ends[i][0] > 0]
                result["windows"][name] = {
                    "frames": [lo, hi], "chunks": len(times),
                    "chunk_ms_median": round(statistics.median(times), 3) if times else None,
                    "chunk_ms_mean": round(statistics.fmean(times), 3) if times else None,
                    "memory_allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 4) if cuda else None,
                    "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 4) if cuda else None,
                    "wall_s_so_far": round(time.time() - t0, 1)}
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
                print(name, json.dumps(result["windows"][name]), flush=True)
        del chunk
    if cuda:
        torch.cuda.synchronize(device)
    per_chunk = [ms(a, b) for a, b in zip(marks, marks[1:])]
    after_switch = [t for (s, _), t in zip(ends, per_chunk) if s in switch_frames]
    plain = [t for (s, _), t in zip(ends, per_chunk) if s not in switch_frames and s > 0]
    result["all_chunks"] = {"count": len(per_chunk), "median_ms": round(statistics.median(plain), 3),
                            "after_switch_median_ms": round(statistics.median(after_switch), 3) if after_switch else None,
                            "wall_s": round(time.time() - t0, 1)}
    a, b = result["windows"].get("frame_100"), result["windows"].get("last")
    if a and b and a["chunk_ms_median"]:
        result["ratio_last_over_frame_100"] = {
            "chunk_ms_median": round(b["chunk_ms_median"] / a["chunk_ms_median"], 4),
            "peak_allocated": round(b["peak_allocated_gib"] / a["peak_allocated_gib"], 4) if cuda else None}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
