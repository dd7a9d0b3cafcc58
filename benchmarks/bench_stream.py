"""Benchmark: stream a Wan2.1-1.3B-sized causal DiT (random weights) through the nodes' sampler.

Prints a table: generator time and FPS, first-chunk latency, time per chunk, peak memory, attention
backend, dtype, compile mode; optionally a long rolling-cache run (time per chunk and memory along the
way) and an accuracy check of the optimised bf16 path against the eager fp32 path.

    python benchmarks/bench_stream.py                       # 832x480, 81 frames, eager bf16
    python benchmarks/bench_stream.py --compile default --fuse-qkv --check
    python benchmarks/bench_stream.py --long 2000 --window 21 --sink 3
    python benchmarks/bench_stream.py --device cpu --tiny    # a smoke run on a CPU

Times use CUDA events around the sampler's chunks after a warm-up video; the figure is the median
of --repeats videos. Pixel frames: the first latent frame decodes to 1 frame, every later one to 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from self_forcing.sf_model.config import TINY, WAN_1_3B
from self_forcing.sf_model.latent_format import latent_frames, pixel_frames
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.sampler import StreamOptions, stream
from self_forcing.sf_model.speed import compile_blocks, fuse_gelu, use_cuda_graphs, use_fused_kernels


def build(args, dtype, device):
    cfg = TINY if args.tiny else WAN_1_3B
    with torch.device("meta"):
        model = CausalWanModel(cfg, attn_backend=args.attn)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(dtype).eval().requires_grad_(False)
    if args.fuse_qkv:
        model.fuse_qkv()
    if args.fuse_gelu:
        fuse_gelu(model)
    if args.fused_kernels or args.fp8:
        use_fused_kernels(model, fp8=args.fp8)
    if args.compile != "none":
        compile_blocks(model, mode=None if args.compile == "default" else args.compile)
    if getattr(args, "cuda_graphs", False):
        use_cuda_graphs(model)
    return model, cfg


class Timer:
    """Host or CUDA-event timestamps, milliseconds since start()."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
            self.marks = []
        else:
            self.t0, self.marks = time.perf_counter(), []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def elapsed(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [self.t0.elapsed_time(e) for e in self.marks]
        return [(m - self.t0) * 1000 for m in self.marks]


def run_video(model, context, args, opts, device, frames, on_chunk=None, host=None):
    """GPU-side chunk times (ms since start). ``host``, a list, receives the host clock (ms) at which
    each chunk was handed out: far below the GPU times means the host queues work well ahead."""
    timer = Timer(device)
    timer.start()
    t0 = time.perf_counter()
    chunks = []
    for chunk in stream(model, context, num_frames=frames, height=args.height // 8, width=args.width // 8,
                        seed=args.seed, options=opts):
        timer.mark()
        if host is not None:
            host.append((time.perf_counter() - t0) * 1000)
        chunks.append(chunk.latents)
        if on_chunk is not None:
            on_chunk(chunk)
    return timer.elapsed(), chunks


def short_run(model, context, args, opts, device):
    frames = latent_frames(args.frames)
    run_video(model, context, args, opts, device, frames)  # warm-up (and compilation)
    totals, firsts, per_chunk = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    hosts = []
    for _ in range(args.repeats):
        host = []
        marks, _ = run_video(model, context, args, opts, device, frames, host=host)
        hosts.append(host[-1])
        totals.append(marks[-1])
        firsts.append(marks[0])
        per_chunk.append([b - a for a, b in zip([0.0] + marks[:-1], marks)])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    med = statistics.median(totals)
    chunks_med = [statistics.median(c[i] for c in per_chunk) for i in range(len(per_chunk[0]))]
    return {
        "latent_frames": frames, "pixel_frames": pixel_frames(frames),
        "generator_s": med / 1000, "generator_s_min": min(totals) / 1000, "generator_s_max": max(totals) / 1000,
        "generator_fps": pixel_frames(frames) / (med / 1000),
        "first_chunk_s": statistics.median(firsts) / 1000,
        "chunk_ms": [round(c, 1) for c in chunks_med], "peak_gib": peak,
        "host_issue_s": statistics.median(hosts) / 1000,
        "forwards": (len(chunks_med)) * (len(opts.steps) + 1) - (0 if opts.final_context_pass else 1),
    }


def build_vae(args, dtype, device):
    from self_forcing.sf_model.vae import WAN21_VAE, WanVAE, WanVAEConfig

    cfg = WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1) if args.tiny else WAN21_VAE
    with torch.device("meta"):
        vae = WanVAE(cfg)
    vae = vae.to_empty(device=device)
    g = torch.Generator(device).manual_seed(2)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    vae = vae.to(dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        vae.to_channels_last()
    if args.compile_vae:
        vae.decoder.compile()
    return vae


def end_to_end(model, vae, context, args, opts, device, overlap=True):
    """Text context -> last pixel frame on the host (uint8), decode overlapped with generation."""
    from self_forcing.sf_model.pipeline import stream_video

    frames = latent_frames(args.frames)

    def once():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        marks, count = [], 0
        for fc in stream_video(model, vae, context, num_frames=frames, height=args.height // 8,
                               width=args.width // 8, seed=args.seed, options=opts, overlap=overlap):
            marks.append(time.perf_counter() - t0)  # frames are on the host when yielded
            count += fc.frames.shape[1]
        return marks, count

    once()
    runs = [once() for _ in range(args.repeats)]
    totals = [m[-1] for m, _ in runs]
    med = statistics.median(totals)
    return {"e2e_s": med, "e2e_fps": runs[0][1] / med, "first_pixels_s": statistics.median(m[0] for m, _ in runs),
            "pixel_frames": runs[0][1], "overlap": overlap}


def decode_only(vae, args, device):
    """Whole-video streamed decode of random latents in chunks of --fpb (no generator running)."""
    frames = latent_frames(args.frames)
    z = torch.randn(1, 16, frames, args.height // 8, args.width // 8, device=device, dtype=vae.dtype)
    timer = Timer(device)

    def once():
        dec = vae.stream_decoder()
        timer.start()
        with torch.no_grad():
            for s in range(0, frames, args.fpb):
                dec.push(z[:, :, s:s + args.fpb])
                timer.mark()
        return timer.elapsed()

    once()
    runs = [once() for _ in range(args.repeats)]
    return {"decode_s": statistics.median(r[-1] for r in runs) / 1000,
            "decode_first_chunk_s": statistics.median(r[0] for r in runs) / 1000}


def long_run(model, context, args, device):
    opts = StreamOptions(frames_per_block=args.fpb, window=args.window or 21, sink=args.sink,
                         extend_positions=True)
    rows = []

    def on_chunk(chunk):
        end = chunk.start_frame + chunk.latents.shape[2]
        if end % args.long_every < args.fpb or end >= args.long - args.fpb:
            mem = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append({"end_frame": end, "mem_gib": round(mem, 3)})

    timer = Timer(device)
    timer.start()
    ends = []

    def on_chunk_timed(chunk):
        timer.mark()
        ends.append(chunk.start_frame + chunk.latents.shape[2])
        on_chunk(chunk)

    for chunk in stream(model, context, num_frames=args.long, height=args.height // 8, width=args.width // 8,
                        seed=args.seed, options=opts):
        on_chunk_timed(chunk)
    marks = timer.elapsed()
    per = [b - a for a, b in zip([0.0] + marks[:-1], marks)]
    by_end = dict(zip(ends, per))
    for r in rows:
        # median of the 5 chunks ending around this frame, to smooth single-chunk noise
        near = [by_end[e] for e in ends if abs(e - r["end_frame"]) <= 2 * args.fpb]
        r["chunk_ms"] = round(statistics.median(near), 1)
    return rows, sum(per) / 1000


def check_accuracy(args, device, context):
    """Optimised path (this run's settings) vs eager fp32 on the same weights: relative error of x0."""
    frames = min(6, latent_frames(args.frames))
    ref_args = argparse.Namespace(**{**vars(args), "compile": "none", "fuse_qkv": False, "fuse_gelu": False,
                                             "fused_kernels": False, "fp8": False, "cuda_graphs": False})
    ref, _ = build(ref_args, torch.float32, device)
    fast, _ = build(args, DTYPES[args.dtype], device)
    opts = StreamOptions(frames_per_block=args.fpb)
    a = torch.cat([c.latents for c in stream(ref, context.float(), num_frames=frames, height=args.height // 8,
                                             width=args.width // 8, seed=1, options=opts)], 2)
    b = torch.cat([c.latents for c in stream(fast, context.to(DTYPES[args.dtype]), num_frames=frames,
                                             height=args.height // 8, width=args.width // 8, seed=1, options=opts)], 2)
    return ((a - b).norm() / a.norm()).item(), ((a - b).abs().max() / a.abs().max()).item()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

CATEGORIES = [  # kernel-name fragments -> category (first match wins)
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul", "mm_", "cublas")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
    ("fused elementwise", ("triton",)),
]


def profile_video(model, context, args, opts, device):
    """Kernel time by category for one streamed video, and GPU busy time vs wall time."""
    from torch.profiler import ProfilerActivity, profile

    frames = latent_frames(args.frames)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run_video(model, context, args, opts, device, frames)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    sums, names = {}, {}
    for ev in prof.key_averages():
        dt = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if dt <= 0 or ev.key.startswith(("aten::", "cuda", "Torch-Compiled", "CompiledFunction", "## ")):
            continue
        low = ev.key.lower()
        cat = next((c for c, frags in CATEGORIES if any(f in low for f in frags)), "other elementwise")
        sums[cat] = sums.get(cat, 0.0) + dt
        names[ev.key] = (cat, dt, ev.count)
    busy = sum(sums.values()) / 1e6
    print(f"profile: wall {wall:.3f} s, kernels {busy:.3f} s ({100 * busy / wall:.0f}% busy)")
    for cat, dt in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:18s} {dt / 1e6:7.3f} s  {100 * dt / 1e6 / busy:5.1f}%")
    print("  top kernels:")
    for key, (cat, dt, n) in sorted(names.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"    {dt / 1e3:8.1f} ms x{n:<5d} [{cat}] {key[:90]}")
    # where the host spends its time in CUDA runtime calls (a long one is the host waiting on the GPU)
    api = sorted(((ev.self_cpu_time_total, ev.count, ev.key) for ev in prof.key_averages()
                  if ev.key.startswith("cuda") and ev.self_cpu_time_total > 0), reverse=True)[:8]
    print("  host time in CUDA runtime calls:")
    for dt, n, key in api:
        print(f"    {dt / 1e3:8.1f} ms x{n:<5d} {key[:80]}")
    return {"wall_s": wall, "kernel_s": busy, "by_category_s": {k: v / 1e6 for k, v in sums.items()},
            "host_cuda_calls_ms": {key: dt / 1e3 for dt, _, key in api}}


def host_profile(model, context, args, opts, device, top: int = 14):
    """cProfile of the host while it queues one video; per-chunk host vs GPU timestamps."""
    import cProfile
    import pstats

    frames = latent_frames(args.frames)
    prof, host = cProfile.Profile(), []
    prof.enable()
    marks, _ = run_video(model, context, args, opts, device, frames, host=host)
    prof.disable()
    print("  chunk handed out: host ms " + str([round(h) for h in host]) + " | GPU ms " + str([round(m) for m in marks]))
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny test config (smoke runs on a CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="auto", help="attention backend: auto, sdpa, flash3, flash2")
    p.add_argument("--compile", default="none", help="none, default, max-autotune-no-cudagraphs, ...")
    p.add_argument("--fuse-qkv", action="store_true")
    p.add_argument("--fuse-gelu", action="store_true", help="FFN GEMM with a GELU epilogue (CUDA)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="inference trunk with fused Triton elementwise kernels (implies --fuse-qkv --fuse-gelu)")
    p.add_argument("--fp8", action="store_true", help="fused kernels + FP8 linear layers (opt-in, less exact)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay block forwards from CUDA graphs")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81, help="pixel frames (4k+1)")
    p.add_argument("--fpb", type=int, default=3, help="latent frames per block")
    p.add_argument("--window", type=int, default=None, help="rolling window in latent frames (default: fixed)")
    p.add_argument("--sink", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-context-pass", action="store_true", help="also run the last chunk's cache pass")
    p.add_argument("--long", type=int, default=0, help="latent frames of a rolling-cache long run (0: skip)")
    p.add_argument("--long-every", type=int, default=100)
    p.add_argument("--check", action="store_true", help="compare with the eager fp32 path")
    p.add_argument("--profile", action="store_true", help="kernel time by category for one video (CUDA)")
    p.add_argument("--host-profile", action="store_true", help="Python profile of the host side of one video")
    p.add_argument("--vae", action="store_true", help="also time the streaming VAE decode and end to end")
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.height = min(args.width, 64), min(args.height, 48)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model, cfg = build(args, dtype, device)
    g = torch.Generator(device).manual_seed(1)
    context = torch.randn(1, min(cfg.text_len, 120), cfg.text_dim, device=device, generator=g).to(dtype)
    opts = StreamOptions(frames_per_block=args.fpb, window=args.window, sink=args.sink,
                         final_context_pass=args.final_context_pass)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "attention": model.attn_backend,
        "compile": args.compile, "fuse_qkv": args.fuse_qkv, "fuse_gelu": args.fuse_gelu, "fused_kernels": args.fused_kernels, "fp8": args.fp8,
        "cuda_graphs": args.cuda_graphs, "size": f"{args.width}x{args.height}",
        "command": "python benchmarks/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if device.type == "cuda":
        info["cudnn_sdpa"] = torch.backends.cuda.cudnn_sdp_enabled()
    res = short_run(model, context, args, opts, device)
    info.update(res)
    print(f"device {info['device']} | torch {info['torch']} | {info['dtype']} | attention {info['attention']} | "
          f"compile {info['compile']} | fused qkv {info['fuse_qkv']} | gelu epilogue {info['fuse_gelu']} | fused kernels {info['fused_kernels']} "
          f"| fp8 {info['fp8']} | CUDA graphs {info['cuda_graphs']}")
    print(f"{'video':>22} {'generator s':>12} {'gen FPS':>8} {'first chunk s':>14} {'peak GiB':>9} {'forwards':>9}")
    print(f"{info['size'] + ' x' + str(res['pixel_frames']):>22} {res['generator_s']:12.3f} {res['generator_fps']:8.1f} "
          f"{res['first_chunk_s']:14.3f} {res['peak_gib']:9.2f} {res['forwards']:9d}")
    print(f"  range {res['generator_s_min']:.3f}-{res['generator_s_max']:.3f} s over {args.repeats} videos; "
          f"per chunk ms: {res['chunk_ms']}; host had queued the last chunk at {res['host_issue_s']:.3f} s")
    if model.chunk_graphs is not None:
        gr = model.chunk_graphs
        info["graphs"] = {"recorded": gr.recorded, "replayed": gr.replayed, "kept": len(gr.graphs), "failed": gr.failed}
        print(f"  CUDA graphs: {gr.recorded} recorded, {gr.replayed} replays, {len(gr.graphs)} kept"
              + (f", FAILED: {gr.failed}" if gr.failed else ""))
    if args.profile and device.type == "cuda":
        info["profile"] = profile_video(model, context, args, opts, device)
    if args.host_profile:
        host_profile(model, context, args, opts, device)
    if args.check:
        rel_norm, rel_max = check_accuracy(args, device, context)
        info["check_rel_norm"], info["check_rel_max"] = rel_norm, rel_max
        print(f"  optimised {args.dtype} vs eager fp32: relative error {rel_norm:.2e} (norm), {rel_max:.2e} (max)")
    if args.vae:
        vae = build_vae(args, dtype, device)
        info.update(decode_only(vae, args, device))
        print(f"VAE decode of {res['latent_frames']} latents in chunks of {args.fpb}: {info['decode_s']:.3f} s "
              f"(first chunk {info['decode_first_chunk_s']:.3f} s)")
        for overlap in ((True, False) if device.type == "cuda" else (False,)):
            e2e = end_to_end(model, vae, context, args, opts, device, overlap)
            key = "e2e" if overlap or device.type != "cuda" else "e2e_serial"
            info[key] = e2e
            print(f"end to end ({'decode overlapped on a side stream' if overlap else 'decode in line'}): "
                  f"{e2e['e2e_s']:.3f} s for {e2e['pixel_frames']} frames = {e2e['e2e_fps']:.1f} FPS, "
                  f"first pixels on the host at {e2e['first_pixels_s']:.3f} s")
    if args.long:
        rows, total_s = long_run(model, context, args, device)
        info["long"] = rows
        info["long_total_s"] = total_s
        print(f"long run: {args.long} latent frames, window {args.window or 21}, sink {args.sink}: {total_s:.1f} s")
        print(f"{'end frame':>10} {'chunk ms':>9} {'alloc GiB':>10}")
        for r in rows:
            print(f"{r['end_frame']:10d} {r['chunk_ms']:9.1f} {r['mem_gib']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    main()
