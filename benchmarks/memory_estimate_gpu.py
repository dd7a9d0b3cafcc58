"""sf_model.memory's estimate against measured CUDA peaks (run on the GPU machine; not part of CI).

For each case: build the model on the GPU (random weights: memory does not depend on the values), stream a
video (or decode a chunk with the Wan VAE) and compare ``torch.cuda.max_memory_allocated`` with the estimate.
The estimate must cover the peak and stay within 2x of it.

    python benchmarks/memory_estimate_gpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from self_forcing.sf_model.config import TINY, WAN_1_3B
from self_forcing.sf_model.memory import estimate_run_bytes, kv_cache_bytes, vae_decode_bytes
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.sampler import StreamOptions, stream
from self_forcing.sf_model.vae.model import WAN21_VAE, WanVAE


def fresh(device):
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def random_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def dit_case(name, cfg, opts, frames, lat_h, lat_w, dtype, device) -> dict:
    base = fresh(device)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model = random_(model.to_empty(device=device).to(dtype)).eval().requires_grad_(False)
    ctx = torch.randn(1, min(cfg.text_len, 64), cfg.text_dim, device=device)
    for _ in stream(model, ctx, num_frames=frames, height=lat_h, width=lat_w, options=opts):
        pass
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    est = estimate_run_bytes(cfg, opts, frames, lat_h, lat_w, 1, dtype)
    del model
    return {"case": name, "peak_gb": peak / 1e9, "estimate_gb": est / 1e9, "ratio": est / peak,
            "cache_gb": kv_cache_bytes(cfg, opts, frames, lat_h, lat_w, 1, dtype) / 1e9}


def vae_case(name, lat_h, lat_w, chunk, dtype, device) -> dict:
    base = fresh(device)
    vae = random_(WanVAE(WAN21_VAE).to(device=device, dtype=dtype)).eval()
    dec = vae.stream_decoder()
    with torch.no_grad():
        for _ in range(3):  # the first chunk and two later ones (their causal caches are full)
            dec.push(torch.randn(1, 16, chunk, lat_h, lat_w, device=device, dtype=dtype))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    est = vae_decode_bytes(WAN21_VAE, chunk, lat_h, lat_w, 1, dtype)
    del vae, dec
    return {"case": name, "peak_gb": peak / 1e9, "estimate_gb": est / 1e9, "ratio": est / peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    bf16 = torch.bfloat16
    fixed = StreamOptions(frames_per_block=3)
    rolling = StreamOptions(frames_per_block=3, window=12, sink=3, extend_positions=True)
    rows = [
        dit_case("Wan 1.3B 832x480, 21 latent frames, fixed cache", WAN_1_3B, fixed, 21, 60, 104, bf16, device),
        dit_case("Wan 1.3B 832x480, 30 latent frames, window 12 + sink 3", WAN_1_3B, rolling, 30, 60, 104, bf16,
                 device),
        dit_case("tiny 2048x2048 latents, 6 frames, fp32", TINY, fixed, 6, 512, 512, torch.float32, device),
        vae_case("Wan 2.1 VAE decode 832x480, chunks of 3 latent frames", 60, 104, 3, bf16, device),
        vae_case("Wan 2.1 VAE decode 1280x720, chunks of 3 latent frames", 90, 160, 3, bf16, device),
    ]
    for r in rows:
        print(f"{r['case']}: peak {r['peak_gb']:.2f} GB, estimate {r['estimate_gb']:.2f} GB (x{r['ratio']:.2f})")
    ok = all(1.0 <= r["ratio"] <= 2.0 for r in rows)
    print("estimate covers every peak within 2x" if ok else "ESTIMATE OUTSIDE [1x, 2x] OF A PEAK")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
