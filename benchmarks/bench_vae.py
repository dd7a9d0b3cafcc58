"""Benchmark the Wan2.1 VAE decoder: whole-video decode vs streamed decode in latent chunks.

Builds the real-size VAE (or --tiny) with random weights, decodes --latents latent frames of
--height x --width (default 21 x 60 x 104 = 81 frames of 480x832) and prints a table with the
median total decode time, the first-chunk latency of the streamed decode, peak memory and the
max abs difference streamed vs whole.

    python benchmarks/bench_vae.py                       # CUDA, bf16
    python benchmarks/bench_vae.py --dtype fp32 --compile --chunk 3 --repeats 10
    python benchmarks/bench_vae.py --device cpu --tiny    # quick check that it runs

Run from the repository root with the package importable as ``self_forcing`` (pip install -e .).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from self_forcing.sf_model.vae import TINY_VAE, WAN21_VAE, WanVAE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    p.add_argument("--channels-last", action="store_true", help="also store conv weights channels-last")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs for fp32 (less exact)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per streamed push")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--latents", type=int, default=21, help="latent frames")
    p.add_argument("--height", type=int, default=60, help="latent height (pixels / 8)")
    p.add_argument("--width", type=int, default=104, help="latent width (pixels / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="do not let cuDNN time its algorithms")
    p.add_argument("--profile", action="store_true", help="kernel time of one streamed decode, top kernels")
    p.add_argument("--tiny", action="store_true", help="tiny random VAE (for a CPU smoke run)")
    p.add_argument("--no-whole", action="store_true", help="skip the whole-video decode")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny and (args.height, args.width) == (60, 104):
        args.height, args.width, args.latents = 4, 6, min(args.latents, 9)
    return args


class Timer:
    """Marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def run_whole(vae, z, timer):
    start = timer.mark()
    out = vae.decode(z)
    end = timer.mark()
    return out, timer.ms(start, end), None


def run_streamed(vae, z, chunk, timer):
    dec = vae.stream_decoder()
    start = timer.mark()
    marks, outs = [], []
    for s in range(0, z.shape[2], chunk):
        outs.append(dec.push(z[:, :, s : s + chunk]))
        marks.append(timer.mark())
    out = torch.cat(outs, dim=2)
    end = timer.mark()
    return out, timer.ms(start, end), timer.ms(start, marks[0])


def measure(name, fn, args, device, timer):
    for _ in range(args.warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    totals, firsts, out = [], [], None
    for _ in range(args.repeats):
        out, total, first = fn()
        totals.append(total)
        if first is not None:
            firsts.append(first)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    first = statistics.median(firsts) if firsts else float("nan")
    return dict(name=name, total=statistics.median(totals), first=first, peak=peak, out=out)


def profile_decode(fn, top: int = 16):
    """Device time of one streamed decode by kernel (after the warm-up in ``measure``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(ev.device_time_total, ev.count, ev.key) for ev in prof.key_averages()
            if ev.device_time_total > 0 and not ev.key.startswith(("aten::", "cuda", "Torch-Compiled", "## "))]
    total = sum(r[0] for r in rows)
    print(f"profile of one streamed decode: {total / 1e3:.1f} ms of kernels")
    for dt, n, key in sorted(rows, reverse=True)[:top]:
        print(f"  {dt / 1e3:8.1f} ms {100 * dt / total:5.1f}% x{n:<4d} {key[:100]}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    config = TINY_VAE if args.tiny else WAN21_VAE
    with torch.device(device):
        vae = WanVAE(config, cudnn_benchmark=not args.no_cudnn_benchmark)
    vae = vae.to(dtype).eval().requires_grad_(False)
    if args.channels_last:
        vae.to_channels_last()
    if args.compile:
        vae.decoder.compile()
    z = torch.randn(args.batch, config.z_dim, args.latents, args.height, args.width, device=device, dtype=dtype)
    timer = Timer(device)

    rows = []
    if not args.no_whole:
        rows.append(measure("whole", lambda: run_whole(vae, z, timer), args, device, timer))
    rows.append(
        measure(f"stream x{args.chunk}", lambda: run_streamed(vae, z, args.chunk, timer), args, device, timer)
    )

    if args.profile and device.type == "cuda":
        profile_decode(lambda: run_streamed(vae, z, args.chunk, timer))
    s = config.spatial_factor
    frames = vae.pixel_frames(args.latents)
    print(
        f"\nWan2.1 VAE decode{' (tiny)' if args.tiny else ''}: {args.batch} x {args.latents} latents "
        f"{args.height}x{args.width} -> {frames} frames {args.height * s}x{args.width * s}, "
        f"{args.dtype}, {device}{', compiled' if args.compile else ''}"
        f"{', channels-last' if args.channels_last else ''}; median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"{'mode':<12} {'total ms':>10} {'first-chunk ms':>15} {'frames/s':>9} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['name']:<12} {r['total']:>10.1f} {r['first']:>15.1f} {frames * 1e3 / r['total']:>9.1f} {r['peak']:>9.2f}"
        )
    if len(rows) == 2:
        diff = (rows[0]["out"].float() - rows[1]["out"].float()).abs().max().item()
        print(f"max |streamed - whole| = {diff:.3e}")
    return rows


if __name__ == "__main__":
    main()
