"""Correctness checks that need a CUDA device (run on the GPU machine; not part of CI).

1. FlexAttention block mask == dense SDPA mask in the full-sequence (training) view.
2. Streaming through the KV cache == the block-causal full-sequence view, on CUDA, fp32.
3. Rolling window + sink on CUDA == the explicitly masked full sequence.
4. bf16 (fused QKV, optionally compiled) vs fp32 eager: relative error of a streamed video.

    python benchmarks/gpu_checks.py [--compile]
"""

from __future__ import annotations

import argparse

import torch

from self_forcing.sf_model import model as model_mod
from self_forcing.sf_model.config import TINY, WanConfig
from self_forcing.sf_model.mask import token_mask
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.sampler import StreamOptions, chunk_plan, generate
from self_forcing.sf_model.speed import compile_blocks, use_cuda_graphs, use_fused_kernels


def random_model(cfg: WanConfig, device, dtype=torch.float32, seed=0) -> CausalWanModel:
    torch.manual_seed(seed)
    m = CausalWanModel(cfg, attn_backend="sdpa").to(device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return m.to(dtype).eval().requires_grad_(False)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def incremental(m, x, t, ctx, fpb, window, sink):
    text = m.encode_text(ctx)
    _, _, f, h, w = x.shape
    cache = m.new_cache(x.shape[0], (h // 2) * (w // 2), window=window or f, sink=sink)
    return torch.cat([m.forward_chunk(x[:, :, s:s + n], t[:, s:s + n], text, cache, s)
                      for s, n in chunk_plan(0, f, fpb)], 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    cfg = TINY.replace(dim=256, num_heads=2, ffn_dim=512, num_layers=3)  # head_dim 128 like Wan
    m = random_model(cfg, dev)
    g = torch.Generator(dev).manual_seed(0)
    f, h, w = 12, 16, 24
    x = torch.randn(1, 16, f, h, w, device=dev, generator=g)
    ctx = torch.randn(1, 10, cfg.text_dim, device=dev, generator=g)
    t = torch.rand(1, f, device=dev, generator=g) * 1000
    results = {}
    with torch.no_grad():
        for fpb, window, sink in [(3, None, 0), (1, None, 0), (3, 6, 0), (3, 6, 3)]:
            flex = m(x, t, ctx, frames_per_block=fpb, window=window, sink=sink)  # CUDA: FlexAttention
            orig = model_mod.build_mask
            model_mod.build_mask = lambda *a, **k: token_mask(f, (h // 2) * (w // 2), fpb, window, sink, dev)
            dense = m(x, t, ctx, frames_per_block=fpb, window=window, sink=sink)
            model_mod.build_mask = orig
            inc = incremental(m, x, t, ctx, fpb, window, sink)
            results[f"flex_vs_dense fpb={fpb} W={window} S={sink}"] = rel(flex, dense)
            results[f"stream_vs_full fpb={fpb} W={window} S={sink}"] = rel(inc, dense)
    from self_forcing.sf_model.speed import kernels as K

    rows, d, fr = 4680 * 2, 1536, 6
    for dt in (torch.float32, torch.bfloat16):
        xk = torch.randn(rows, d, device=dev)
        yk = torch.randn(rows, d, device=dev, dtype=dt)
        mod = torch.randn(fr, 6, d, device=dev)
        wk, bk = torch.randn(d, device=dev, dtype=dt), torch.randn(d, device=dev, dtype=dt)
        for kw in (dict(), dict(y=yk, gate=mod[:, 2], scale=mod[:, 1], shift=mod[:, 0]),
                   dict(y=yk, gate=mod[:, 2], weight=wk, bias=bk), dict(y=yk, normalize=False)):
            x1, x2 = xk.clone(), xk.clone()
            a1 = K.residual_norm(x1, rows_per_frame=rows // fr, eps=1e-6, out_dtype=dt, **kw)
            kw_ref = dict(kw)
            y_ref = kw_ref.pop("y", None)
            a2 = K.residual_norm_ref(x2, y_ref, kw_ref.get("gate"), kw_ref.get("scale"), kw_ref.get("shift"),
                                     kw_ref.get("weight"), kw_ref.get("bias"), rows // fr, 1e-6, dt,
                                     kw_ref.get("normalize", True))
            results[f"triton residual_norm {dt} {sorted(kw)}"] = max(rel(a1, a2), rel(x1, x2))
        qkv = torch.randn(rows, 3 * d, device=dev, dtype=dt)
        wqk = torch.randn(2 * d, device=dev, dtype=dt)
        cr, sr = torch.rand(4680, 64, device=dev), torch.rand(4680, 64, device=dev)
        q1, k1 = K.qk_norm_rope(qkv, wqk, cr, sr, tokens=4680, heads=12, eps=1e-6)
        q2, k2 = K.qk_norm_rope_ref(qkv, wqk[:d], wqk[d:], cr, sr, 4680, 12, 1e-6)
        results[f"triton qk_norm_rope {dt}"] = max(rel(q1, q2), rel(k1, k2))
        xq = torch.randn(rows, d, device=dev, dtype=dt)
        results[f"triton rms_norm {dt}"] = rel(K.rms_norm(xq, wqk[:d], 1e-6), K.rms_rows(xq, wqk[:d], 1e-6).to(dt))
    from self_forcing.sf_model.speed import fp8 as fp8_mod

    for kdim in (1536, 8960):
        xq = torch.randn(rows, kdim, device=dev, dtype=torch.bfloat16) * 2
        for gelu in (False, True):
            q1, s1 = fp8_mod.quantize_rows(xq, gelu)
            q2, s2 = fp8_mod.quantize_rows_ref(xq, gelu)
            results[f"triton fp8 quantise bf16 K={kdim} gelu={gelu}"] = rel(q1.float() * s1, q2.float() * s2)
    from self_forcing.sf_model.noise import NoiseStream, chunk_noise

    source = NoiseStream(11, dev, max_numel=16 * 3 * 8 * 8, slots=3)
    for ci in range(4):  # more draws than staging slots: slots are reused
        staged = list(source.chunk(ci, 4, (1, 16, 3, 8, 8)))
        ref = chunk_noise(11, ci, 4, (1, 16, 3, 8, 8), "cpu")
        results[f"staged CUDA noise == CPU noise chunk {ci}"] = max(rel(a.cpu(), b) for a, b in zip(staged, ref))
    lin = torch.nn.Linear(256, 512).to(dev, torch.bfloat16)
    xin = torch.randn(2, 4680, 256, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        fused = K.linear_gelu(lin, xin)
        plain = torch.nn.functional.gelu(lin(xin).float(), approximate="tanh")
    results["bf16 GEMM+GELU epilogue vs tanh GELU"] = rel(fused, plain)
    ref = random_model(cfg, dev)
    fast = use_fused_kernels(random_model(cfg, dev, torch.bfloat16))
    fused32 = use_fused_kernels(random_model(cfg, dev))
    if args.compile:
        compile_blocks(fast)
    opts = StreamOptions(frames_per_block=3)
    a = generate(ref, ctx, num_frames=9, height=h, width=w, seed=2, options=opts)
    b = generate(fast, ctx.bfloat16(), num_frames=9, height=h, width=w, seed=2, options=opts)
    results["bf16 optimised vs fp32 eager (video x0)"] = rel(b, a)
    c = generate(fused32, ctx, num_frames=9, height=h, width=w, seed=2, options=opts)
    results["fp32 fused-kernel trunk vs fp32 eager (video x0)"] = rel(c, a)
    # CUDA graphs replay exactly the eager kernels: fixed cache, then a rolling cache with a sink
    for window, sink, frames in ((None, 0, 9), (6, 3, 24)):
        opts = StreamOptions(frames_per_block=3, window=window, sink=sink, extend_positions=True)
        eager_v = generate(fast, ctx.bfloat16(), num_frames=frames, height=h, width=w, seed=4, options=opts)
        use_cuda_graphs(fast)
        cache = fast.new_cache(1, (h // 2) * (w // 2), window=window or frames, sink=sink)
        for rep in range(2):  # the second video replays only
            graphed_v = generate(fast, ctx.bfloat16(), num_frames=frames, height=h, width=w, seed=4,
                                 options=opts, cache=cache)
            results[f"CUDA graphs vs eager (exact) W={window} S={sink} video {rep}"] = rel(graphed_v, eager_v)
        gr = fast.chunk_graphs
        print(f"graphs W={window} S={sink}: recorded {gr.recorded}, replayed {gr.replayed}, failed {gr.failed}")
        if gr.failed or gr.replayed == 0:
            results[f"CUDA graphs used W={window}"] = float("nan")
        use_cuda_graphs(fast, False)
    for k, v in results.items():
        print(f"{k:45s} rel err {v:.2e}")
    bad = [k for k, v in results.items() if not v < (3e-2 if ("bf16" in k or "16" in k) else 1e-4)]
    print("ALL CHECKS PASSED" if not bad else f"FAILED: {bad}")


if __name__ == "__main__":
    main()
