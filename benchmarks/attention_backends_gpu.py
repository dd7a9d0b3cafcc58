"""Attention backends at this model's shapes: PyTorch SDPA vs FlashInfer's Hopper kernel vs the FP8 K/V cache.

One KV-cached chunk forward of Wan-1.3B at 832x480 attends q = 3 frames x 1560 tokens = 4680 queries to
4680..32760 keys (1..21 cached frames), 12 heads x 128, bf16. For each key length this times:

- ``sdpa``: ``sf_model.attention.attention(..., "sdpa")`` (cuDNN / flash inside PyTorch), the reference;
- ``flashinfer``: the same call with backend "flashinfer" (FlashInfer "fa3"), when ``flashinfer`` imports and the
  GPU is sm90 (its first call JIT-compiles the kernel, ~1.5 min, cached on disk; not timed);
- ``fp8kv``: what ``Fp8KVCache`` costs per forward: dequantise the e4m3 K/V (per frame and head scales) to bf16,
  then SDPA (``speed.kv_fp8.attend_fp8``); ``fp8kv_write`` is the quantisation of one chunk's K/V on write;
- ``flashinfer_graph``: the same FlashInfer call captured in a CUDA graph and replayed (as the nodes run);
- ``flashinfer_fp8``: FlashInfer's kernel on e4m3 q/k/v with per-head scales (a probe of an FP8 kernel; the
  row says why when this FlashInfer build refuses it).

and prints time, TFLOP/s (4 * Lq * Lk * heads * head_dim per call) and the max / relative error vs SDPA (the
error of fp8kv is the K/V quantisation's). Then (unless ``--no-video``) whole videos of a random-weight
Wan-1.3B (21 latent frames at 832x480, 4 steps, fused kernels + CUDA graphs as the nodes run, bf16) with the
exact cache and with ``kv_fp8``, on each backend: generator seconds (median of ``--videos`` after a warm-up
video), peak memory, and the latents' relative error against the exact SDPA video. Results go to ``--out`` (JSON; default $OUT/attention_backends.json
when $OUT is set).

    python benchmarks/attention_backends_gpu.py            # H200, 2-3 minutes (+ FlashInfer's JIT once)
    python benchmarks/attention_backends_gpu.py --tiny     # CPU smoke run, small shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from self_forcing.sf_model.attention import _flash_module, attention, available_backends
from self_forcing.sf_model.cache import CachePlan
from self_forcing.sf_model.speed.fp8 import FP8, quantize_rows_ref
from self_forcing.sf_model.speed.kv_fp8 import Fp8KVCache, attend_fp8, quantize_frames


def timer(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.float() - ref.float())
    return d.abs().max().item(), (d.norm() / ref.float().norm()).item()


def fp8_cache_with(k: torch.Tensor, v: torch.Tensor, frame_tokens: int, dtype) -> Fp8KVCache:
    """A one-layer FP8 cache holding k/v [1, L, H, D] in its first L / frame_tokens slots."""
    frames = k.shape[1] // frame_tokens
    cache = Fp8KVCache(1, 1, frame_tokens, k.shape[2], k.shape[3], window=frames, dtype=dtype, device=k.device)
    cache.plan = CachePlan(0, frames, ((0, 0, frames),), frames)
    cache.frames_written = frames
    cache.write(0, k, v)
    return cache


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up call on a side stream) -> a callable replaying it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def flashinfer_fp8(q, k, v):
    """FlashInfer on e4m3 q/k/v with per-head float32 scales -> (callable, (q8, k8, v8, scales))."""
    mod = _flash_module("flashinfer")

    def per_head(x):  # [L, H, D] -> e4m3, scale [H]
        q8, s = quantize_rows_ref(x.transpose(0, 1).reshape(x.shape[1], -1))
        return q8.view(x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1).contiguous(), s.view(-1)

    (q8, sq), (k8, sk), (v8, sv) = per_head(q[0]), per_head(k[0]), per_head(v[0])

    def call():
        return mod.single_prefill_with_kv_cache(q8, k8, v8, scale_q=sq, scale_k=sk, scale_v=sv, o_dtype=q.dtype,
                                                causal=False, kv_layout="NHD", backend="fa3")
    return call


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ft, heads, hd, qf = args.frame_tokens, args.heads, args.head_dim, args.chunk_frames
    g = torch.Generator(device=device).manual_seed(0)
    backends = available_backends(device)
    have_fi = "flashinfer" in backends
    rows = []
    lq = qf * ft
    q = torch.randn(1, lq, heads, hd, device=device, dtype=dtype, generator=g)
    for frames in args.kv_frames:
        lk = frames * ft
        k = torch.randn(1, lk, heads, hd, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, lk, heads, hd, device=device, dtype=dtype, generator=g)
        flop = 4.0 * lq * lk * heads * hd
        ref = attention(q, k, v, "sdpa")
        cases = {"sdpa": lambda: attention(q, k, v, "sdpa")}
        if have_fi:
            cases["flashinfer"] = lambda: attention(q, k, v, "flashinfer")
        if have_fi and device.type == "cuda":  # the nodes replay forwards from CUDA graphs: can the kernel be captured?
            try:
                cases["flashinfer_graph"] = graphed(lambda: attention(q, k, v, "flashinfer"))
            except Exception as e:  # noqa: BLE001 - a probe: report why, go on
                rows.append({"kv_tokens": lk, "case": "flashinfer_graph", "error": f"{type(e).__name__}: {e}"[:300]})
        cache = fp8_cache_with(k, v, ft, dtype)
        cases["fp8kv"] = lambda: attend_fp8(q, cache, 0, "sdpa")
        if have_fi:
            try:
                call = flashinfer_fp8(q, k, v)
                call()
                cases["flashinfer_fp8"] = lambda: call().unsqueeze(0)
            except Exception as e:  # noqa: BLE001 - a probe: report why, go on
                rows.append({"kv_tokens": lk, "case": "flashinfer_fp8", "error": f"{type(e).__name__}: {e}"[:300]})
        for name, fn in cases.items():
            out = fn()
            mx, rel = errors(out, ref)
            sec = timer(device, fn, args.warmup, args.iters)
            rows.append({"kv_tokens": lk, "case": name, "ms": sec * 1e3, "tflops": flop / sec / 1e12,
                         "max_err": mx, "rel_err": rel})
        kc, vc = k[:, :lq], v[:, :lq]
        sec = timer(device, lambda: (quantize_frames(kc, ft), quantize_frames(vc, ft)), args.warmup, args.iters)
        rows.append({"kv_tokens": lk, "case": "fp8kv_write", "ms": sec * 1e3, "note": "quantise one chunk's K+V"})
        del cache
    kv_bytes = {"bf16": 2 * 2 * heads * hd, "fp8": 2 * heads * hd}  # per token, K and V
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "backends": backends,
            "flashinfer_version": getattr(_flash_module("flashinfer"), "__version__", None),
            "q_tokens": lq, "heads": heads, "head_dim": hd, "kv_bytes_per_token": kv_bytes,
            "fp8_dtype": str(FP8), "rows": rows}


def videos(args) -> list[dict]:
    """Random-weight Wan videos: exact vs FP8 K/V cache on every available exact backend (module docstring)."""
    from self_forcing.benchmarks.wan_random import random_model
    from self_forcing.sf_model.config import TINY, WAN_1_3B
    from self_forcing.sf_model.sampler import StreamOptions, generate
    from self_forcing.sf_model.speed import use_cuda_graphs, use_fused_kernels

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = TINY if args.tiny else WAN_1_3B
    frames, h, w = (6, 4, 6) if args.tiny else (21, 60, 104)
    model = random_model(cfg, device, dtype, seed=0)
    if device.type == "cuda":
        use_cuda_graphs(use_fused_kernels(model))
    g = torch.Generator(device=device).manual_seed(1)
    ctx = torch.randn(1, min(cfg.text_len, 512), cfg.text_dim, device=device, dtype=dtype, generator=g)
    ref, rows = None, []
    for backend in [b for b in available_backends(device) if b in ("sdpa", "flashinfer")]:
        model.attn_backend_request, model._backend = backend, None
        for kv in (False, True):
            opts = StreamOptions(kv_fp8=kv)

            def one():
                return generate(model, ctx, num_frames=frames, height=h, width=w, seed=0, options=opts)
            lat = one()  # warm-up (graph recording, JIT)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            secs = []
            for _ in range(args.videos):
                t0 = time.perf_counter()
                lat = one()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                secs.append(time.perf_counter() - t0)
            ref = lat if ref is None else ref
            rows.append({"backend": backend, "kv_fp8": kv, "seconds": statistics.median(secs), "all_seconds": secs,
                         "rel_err_vs_exact_sdpa": ((lat.float() - ref.float()).norm() / ref.float().norm()).item(),
                         "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                         else None})
            print(f"video {backend:>10s} kv_fp8={kv!s:5s} {rows[-1]['seconds']:.3f} s  rel err vs exact sdpa "
                  f"{rows[-1]['rel_err_vs_exact_sdpa']:.2e}  peak {rows[-1]['peak_gib'] or 0:.2f} GiB", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (smoke run)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    p.add_argument("--kv-frames", type=int, nargs="+", default=None, help="cached frames (keys = frames x tokens)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-video", action="store_true", help="only the attention calls, no whole videos")
    p.add_argument("--videos", type=int, default=None, help="timed videos per case (after a warm-up one)")
    args = p.parse_args(argv)
    if args.tiny:
        defaults = dict(device="cpu", dtype="fp32", kv_frames=[3, 6], warmup=1, iters=2, videos=1)
        args.frame_tokens, args.heads, args.head_dim, args.chunk_frames = 16, 2, 32, 3
    else:
        defaults = dict(device="cuda", dtype="bf16", kv_frames=[3, 6, 9, 12, 15, 18, 21], warmup=5, iters=20,
                        videos=3)
        args.frame_tokens, args.heads, args.head_dim, args.chunk_frames = 1560, 12, 128, 3
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    with torch.no_grad():
        res = run(args)
    print(f"{res['device']}, torch {res['torch']}, {res['dtype']}, q {res['q_tokens']} tokens, "
          f"{res['heads']} heads x {res['head_dim']}; backends here: {', '.join(res['backends'])}")
    print(f"{'kv tokens':>9s} {'case':>15s} {'ms':>9s} {'TFLOP/s':>9s} {'max err':>9s} {'rel err':>9s}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['kv_tokens']:9d} {r['case']:>15s}  not run: {r['error']}")
        elif "tflops" in r:
            print(f"{r['kv_tokens']:9d} {r['case']:>15s} {r['ms']:9.3f} {r['tflops']:9.1f} {r['max_err']:9.2e} "
                  f"{r['rel_err']:9.2e}")
        else:
            print(f"{r['kv_tokens']:9d} {r['case']:>15s} {r['ms']:9.3f}   ({r['note']})")
    if not args.no_video:
        with torch.no_grad():
            res["videos"] = videos(args)
    out = args.out or (os.path.join(os.environ["OUT"], "attention_backends.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
