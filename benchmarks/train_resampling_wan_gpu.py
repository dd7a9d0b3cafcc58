"""Peak GPU memory and time of Resampling Forcing training at Wan scale on one GPU (random weights, random data).

The model of ``training/configs/wan_resampling.toml`` (Wan2.1-T2V-1.3B: float32 master weights and AdamW state,
bf16 autocast), 21 latent frames of 60x104, batch 1, a random text context of ``model.text_len`` tokens. Each
step runs the trainer's own micro-step (``training.resampling.training_loss``: for the resampling stage the
no-grad degraded history -- autoregressive self-resampling through the KV cache by default -- then the
[x~ | noisy] forward of 2 x 21 frames under the teacher-forcing mask and the loss), backward and an AdamW
step; the warm-up stage (teacher forcing: no resampling) is measured the same way. Weights are random (memory
and time do not depend on them), made on the device through the meta device (``benchmarks/wan_random.py``).
Reported per stage: seconds per step (the first step, which compiles the FlexAttention kernels, listed apart),
peak allocated memory, and for the resampling stage the degraded-history part alone.

    python3 benchmarks/train_resampling_wan_gpu.py --steps 3 --out $OUT/train_resampling_wan.json
    python3 benchmarks/train_resampling_wan_gpu.py --steps 3 --set resampling.routing_topk=5   # history routing
    python3 benchmarks/train_resampling_wan_gpu.py --check              # + FlexAttention routing == dense mask
    python3 benchmarks/train_resampling_wan_gpu.py --tiny --steps 2     # CPU smoke test at test size

Activation checkpointing of every block is on when the model offers it (``set_activation_checkpointing``;
``--no-checkpointing`` to measure without).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "training", "configs", "wan_resampling.toml")
TINY = ["model.dim=64", "model.ffn_dim=128", "model.num_heads=4", "model.num_layers=2", "model.text_dim=32",
        "model.text_len=16", "model.freq_dim=32", "world.frames=6", "world.latent_height=8", "world.latent_width=8",
        "resampling.resample_steps=2", 'run.precision="fp32"']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--steps", type=int, default=3, help="training steps per stage (the first one compiles)")
    p.add_argument("--stages", default="resampling_warmup,resampling")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="test-size model and clip (CPU smoke test)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--check", action="store_true", help="first compare FlexAttention routing with the dense mask")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def flex_check(device) -> dict:
    """History routing with a FlexAttention BlockMask == with the dense mask, on this device (both layouts)."""
    from self_forcing.sf_model.attention import masked_attention
    from self_forcing.sf_model.mask import teacher_forcing_visibility
    from self_forcing.sf_model.routing import (dense_mask, flex_mask, frame_means, select_frames,
                                               split_visibility)

    g = torch.Generator(device).manual_seed(0)
    f, ft, h, d = 8, 150, 4, 64  # frames straddle the 128-token blocks
    always, cand = split_visibility(teacher_forcing_visibility(f, 2), 1)
    n = 2 * f * ft
    q, k, v = (torch.randn(1, n, h, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    chosen = select_frames(q, frame_means(k, ft), cand.repeat_interleave(ft, 0).to(device), 2)
    allowed = chosen | always.repeat_interleave(ft, 0).to(device)
    dense = masked_attention(q, k, v, dense_mask(allowed, ft)).float()
    flex = masked_attention(q, k, v, flex_mask(allowed, ft)).float()
    sync(device)
    err = float((dense - flex).abs().max())
    return {"max_abs_diff": err, "ok": err < 3e-2, "tokens": n}


def main(argv=None) -> int:
    args = parse_args(argv)
    from self_forcing.benchmarks.wan_random import random_model
    from self_forcing.training.config import load_config
    from self_forcing.training.resampling import RESAMPLING, WARMUP, degrade_history, Layout, training_loss

    cfg = load_config(args.config, [*(TINY if args.tiny else []), *args.overrides])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {"config": os.path.relpath(args.config, ROOT), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "model": cfg.model.to_dict(), "resampling": cfg.to_dict()["resampling"],
               "clip": [cfg.model.in_dim, cfg.world.frames, cfg.world.latent_height, cfg.world.latent_width],
               "frames_per_block": cfg.sampling.frames_per_block, "stages": {}}
    if args.check:
        results["flex_check"] = flex_check(device) if device.type == "cuda" else {"skipped": "no CUDA"}
        print(f"[check] {results['flex_check']}", flush=True)
    t0 = time.time()
    model = random_model(cfg.model, device, torch.float32, seed=0)
    model.train().requires_grad_(True)
    checkpointing = not args.no_checkpointing and hasattr(model, "set_activation_checkpointing")
    if checkpointing:
        model.set_activation_checkpointing(True)
    results["activation_checkpointing"] = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    sync(device)
    results["build_s"] = round(time.time() - t0, 1)
    params = sum(p.numel() for p in model.parameters())
    print(f"[build] {params / 1e9:.3f} B parameters on {device} in {results['build_s']} s", flush=True)
    bf16 = cfg.run.precision == "bf16" and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast(
        device.type, enabled=False))
    shape = (1, *results["clip"])
    g = torch.Generator(device).manual_seed(1)
    x0 = torch.randn(shape, device=device, generator=g) * 0.5
    ctx = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, device=device, generator=g)
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in (WARMUP, RESAMPLING):
            raise SystemExit(f"unknown stage {stage!r}: use {WARMUP} and/or {RESAMPLING}")
        seconds, peaks, losses = [], [], []
        for step in range(args.steps):
            reset_peak(device)
            sync(device)
            t = time.time()
            try:
                with autocast():
                    loss, metrics = training_loss(model, x0, ctx, cfg, stage, [step])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
            except torch.OutOfMemoryError as e:
                results["stages"][stage] = {"oom_at_step": step, "error": str(e).splitlines()[0]}
                print(f"[{stage}] out of memory at step {step}", flush=True)
                opt.zero_grad(set_to_none=True)
                break
            seconds.append(time.time() - t)
            peaks.append(peak_gb(device))
            metrics = {k: float(v) for k, v in metrics.items()}  # device tensors (read after the step's sync)
            losses.append(metrics["loss"])
            print(f"[{stage}] step {step}: {seconds[-1]:.2f} s, peak {peaks[-1]} GB, {metrics}", flush=True)
        else:
            entry = {"first_step_s": round(seconds[0], 3), "steps": len(seconds), "losses": losses,
                     "peak_gb": None if device.type != "cuda" else round(max(peaks), 2)}
            if len(seconds) > 1:
                entry["step_s"] = round(statistics.median(seconds[1:]), 3)
            if stage == RESAMPLING:  # the degraded history alone (no gradient)
                r = cfg.resampling
                noise = torch.randn(r.resample_steps, *shape, device=device, generator=g)
                reset_peak(device)
                sync(device)
                t = time.time()
                with autocast():
                    degrade_history(model, x0, torch.tensor([0.4], device=device), noise, ctx, Layout.of(cfg),
                                    r.simulation, r.solver)
                sync(device)
                entry["degrade_history_s"] = round(time.time() - t, 3)
                entry["degrade_history_peak_gb"] = None if device.type != "cuda" else round(peak_gb(device), 2)
            results["stages"][stage] = entry
            print(f"[{stage}] {json.dumps(entry)}", flush=True)
    print(json.dumps(results["stages"], indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
