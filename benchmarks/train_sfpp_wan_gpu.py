"""Peak GPU memory and time of Self-Forcing++ training at Wan scale on one GPU (random weights).

The roles of ``training/configs/wan_sfpp.toml``: generator and critic Wan2.1-T2V-1.3B trained (float32 master
weights and AdamW state, bf16 compute), the real score frozen in bf16 (14B or 1.3B), 21-frame windows of 60x104
latents, rolling cache of 21 + sink 3, batch 1, text length 512. Each configuration runs the trainer's own code
(``training.sfpp.SfppTrainer``: ``generator_step`` then ``critic_step``, ``--steps`` times) over random models
made on the GPU (``benchmarks/wan_random.random_model``). The window is put at the end of the rollout
(``--start last``, the most chunks: the longest step) or drawn as in training (``--start random``). With
``--reencode`` a random Wan2.1 VAE re-encodes the window's first latent (decoding every frame before it).

    python3 benchmarks/train_sfpp_wan_gpu.py --horizon 5 --steps 2 --out $OUT/sfpp_wan.json
    python3 benchmarks/train_sfpp_wan_gpu.py --configs 14b:ac --horizon 20 --steps 1 --reencode
    python3 benchmarks/train_sfpp_wan_gpu.py --tiny --device cpu --steps 1      # CPU smoke test

Reported per configuration and phase (generator / critic step): seconds (first and mean of the later ones),
peak allocated / reserved GB (reset before every step), the rollout frames and window start of each step, and
seconds per generated chunk (a step's time over the chunks it rolled out) to extrapolate to other horizons.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from self_forcing.benchmarks import train_wan_memory_gpu as base  # configurations, runtime, measuring
from self_forcing.benchmarks.wan_random import random_model

OPTIONS = ("plain", "ac")


def parse_configs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        real, _, opts = item.partition(":")
        opts = opts or "plain"
        if real not in base.REAL or opts not in OPTIONS:
            raise SystemExit(f"bad configuration {item!r}: use <{'|'.join(base.REAL)}>:<{'|'.join(OPTIONS)}>")
        out.append((real, opts))
    return out


def sfpp_config(gen, frames: int, height: int, width: int, horizon: int, sink: int, device, precision: str):
    from self_forcing.training.config import load_config

    return load_config(data={
        "run": {"out_dir": "unused", "device": str(device), "precision": precision, "progress": False},
        "model": gen.to_dict(),
        "world": {"kind": "wan", "frames": frames, "latent_height": height, "latent_width": width},
        "sfpp": {"steps": 10, "batch_size": 1, "grad_accum": 1, "critic_ratio": 5, "horizon": horizon,
                 "window": frames, "sink": sink, "reencode_first": False},
    })


def run_config(real: str, opts: str, args, device: torch.device) -> dict:
    from self_forcing.sf_model.vae import WAN21_VAE, WanVAE
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.long_rollout import Window, window_chunks
    from self_forcing.training.loss_window import VaeReencoder
    from self_forcing.training.sfpp import SfppTrainer

    gen_cfg = base.TINY_GEN if args.tiny else base.REAL["1.3b"]
    real_cfg = (base.TINY_REAL if args.tiny else base.REAL)[real]
    frames, h, w = (6, 4, 4) if args.tiny else (21, 60, 104)
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = sfpp_config(gen_cfg, frames, h, w, args.horizon, args.sink, device, precision)
    rt = base.make_runtime(device, precision, False)
    entry = {"real_score": real, "options": opts, "horizon": args.horizon, "rollout_frames": args.horizon * frames,
             "window": frames, "sink": args.sink, "start": args.start, "reencode": args.reencode, "rows": []}
    trainer = None
    try:
        generator = random_model(gen_cfg, device, torch.float32, 1)
        critic = random_model(gen_cfg, device, torch.float32, 2)
        real_model = random_model(real_cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32, 3)
        if opts == "ac":  # 'copy': the rolling cache wraps between a window chunk's forward and its backward
            for m in (generator, critic):
                m.set_activation_checkpointing(True, history="copy")
        reencoder = None
        if args.reencode:
            vae = WanVAE(WAN21_VAE).to(device=device, dtype=real_model.dtype).eval()  # 16-channel latents
            reencoder = VaeReencoder(vae)
        world = RandomWorld(clip_shape=(gen_cfg.in_dim, frames, h, w), text_len=gen_cfg.text_len,
                            text_dim=gen_cfg.text_dim)
        trainer = SfppTrainer(cfg, rt, world, generator, critic, real_model, reencoder=reencoder)
        if args.start == "last":
            draw = trainer.draw

            def last(kind, step, draw=draw):
                window, exit_index = draw(kind, step)
                return Window(window.total - window.frames, window.frames, window.total), exit_index
            trainer.draw = last
        entry["resident_gb"] = base.allocated_gb(device)
        for step in range(args.steps):
            for phase in ("generator", "critic"):
                base.reset_peak(device)
                t0 = time.time()
                metrics = (trainer.generator_step if phase == "generator" else trainer.critic_step)(
                    step * cfg.sfpp.critic_ratio)
                base.sync(device)
                seconds = time.time() - t0
                start = int(metrics["window_start" if phase == "generator" else "critic_window_start"])
                chunks = len(window_chunks(Window(start, frames, args.horizon * frames),
                                           cfg.sampling.frames_per_block))
                row = {"phase": phase, "step": step, "seconds": round(seconds, 3), "window_start": start,
                       "chunks": chunks, "s_per_chunk": round(seconds / chunks, 4), **base.peak_gb(device)}
                entry["rows"].append(row)
                print(f"[sfpp {real}:{opts}] {json.dumps(row)}", flush=True)
        entry["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- an OOM is a result; anything else is re-raised
        if not base.is_oom(e):
            raise
        entry["status"] = f"out of memory after {len(entry['rows'])} measured steps"
        print(f"[sfpp {real}:{opts}] {entry['status']}", flush=True)
    finally:
        trainer = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    entry["generator"] = base.summarize(entry["rows"], "generator")
    entry["critic"] = base.summarize(entry["rows"], "critic")
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="14b:ac,1.3b:ac,1.3b:plain", help="<14b|1.3b>:<plain|ac>, comma-separated")
    p.add_argument("--horizon", type=int, default=5, help="rollout length in 21-frame clips (training: 20)")
    p.add_argument("--sink", type=int, default=3)
    p.add_argument("--start", choices=("last", "random"), default="last")
    p.add_argument("--reencode", action="store_true", help="re-encode the window's first latent (random VAE)")
    p.add_argument("--steps", type=int, default=2, help="generator + critic steps per configuration")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    p.add_argument("--out", default=None, help="JSON file (written after each configuration)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "configs": []}
    for real, opts in parse_configs(args.configs):
        results["configs"].append(run_config(real, opts, args, device))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)
    for c in results["configs"]:
        print(f"{c['real_score']}:{c['options']} {c['status']}: generator {c['generator']}, critic {c['critic']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
