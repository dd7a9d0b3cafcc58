"""How much would CUDA graphs save? One Wan-1.3B block forward (fused kernels, bf16), eager vs replayed.

For a block of --fpb latent frames at 832x480 against a KV cache holding 0 or 18 earlier frames it
prints: the GPU time of one eager forward, the host time to queue it (no sync), and the GPU time of
the same forward captured once in a CUDA graph and replayed. Graphs only pay where the host cannot
queue work as fast as the GPU runs it (the gap between the first two columns), so this decides
whether the sampler needs graph capture.

    python benchmarks/graph_probe.py [--fpb 3] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_stream import build  # benchmarks/ is the script's directory


def gpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fpb", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    bargs = argparse.Namespace(tiny=False, attn="auto", fuse_qkv=False, fuse_gelu=False, fused_kernels=True,
                               fp8=False, compile="none")
    model, cfg = build(bargs, torch.bfloat16, dev)
    g = torch.Generator(dev).manual_seed(0)
    ctx = torch.randn(1, 120, cfg.text_dim, device=dev, generator=g, dtype=torch.bfloat16)
    text = model.encode_text(ctx)
    h, w = 60, 104
    cache = model.new_cache(1, (h // 2) * (w // 2), window=21)
    x = torch.randn(1, cfg.in_dim, args.fpb, h, w, device=dev, generator=g)
    t = torch.full((1, args.fpb), 937.5, device=dev)
    print(f"{'history frames':>15} {'eager GPU ms':>13} {'host queue ms':>14} {'graph GPU ms':>13} {'saved':>7}")
    for history in (0, 18):
        cache.frames_written = history

        def fwd():
            cache.frames_written = history
            return model.forward_chunk(x, t, text, cache, history)

        with torch.no_grad():
            for _ in range(3):
                fwd()
            eager = gpu_ms(fwd, args.repeats)
            host = host_ms(fwd, args.repeats)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fwd()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = fwd()
            except Exception as exc:  # report what breaks capture instead of a traceback
                print(f"{history:15d} {eager:13.2f} {host:14.2f} capture failed: {type(exc).__name__}: {exc}")
                continue
            ref = fwd()
            graph.replay()
            err = ((out - ref).norm() / ref.norm()).item()
            replay = gpu_ms(graph.replay, args.repeats)
            print(f"{history:15d} {eager:13.2f} {host:14.2f} {replay:13.2f} {100 * (1 - replay / eager):6.1f}%"
                  f"  (graph vs eager output: {err:.1e})")
            del graph, out


if __name__ == "__main__":
    main()
