"""FSDP2 against DDP for Self Forcing DMD training over several GPUs (random weights), run under torchrun.

Every configuration builds a generator and a critic (trained, float32 master weights, bf16 compute on CUDA)
and a frozen real score (bf16 on CUDA), then runs ``training.dmd.DmdTrainer`` steps (a critic update every
step, a generator update every ``critic_ratio``) with the parallel scheme of ``run.parallel``:

- ``fsdp``: FSDP2 on every block + root (``training.distributed.shard_model``), bf16 MixedPrecisionPolicy;
- ``ddp``: one replica per process, bf16 autocast;

options joined with ``+``: ``ac`` (activation checkpointing of generator and critic), ``offload``
(CPUOffloadPolicy for the trained blocks; fsdp only), ``shardreal`` (the real score sharded too,
``engine.shard_frozen``; fsdp only). Sizes: ``toy`` (the demo DiT of ``training/configs/toy_gpu.toml``, 12x16x16
latents) and ``wan`` (Wan2.1-T2V-1.3B generator/critic and a 1.3B real score, or the paper's 14B with
``--real-score 14b``; --frames x --height x --width).

Per configuration: seconds per generator and critic step (the first of each left out of the mean), peak
memory (max over processes), whether the losses are finite, and with ``--checkpoint`` the seconds of one
sharded checkpoint save and load (``training.sharded_checkpoint``, into --tmp) and of gathering the EMA
weights for export (``engine.full_state_dict``). One JSON on rank 0, rewritten after every configuration.

    torchrun --standalone --nproc_per_node 2 benchmarks/train_parallel_gpu.py --out $OUT/parallel.json
    torchrun --standalone --nproc_per_node 2 benchmarks/train_parallel_gpu.py --configs wan:fsdp+ac --steps 10
    torchrun --standalone --nproc_per_node 2 benchmarks/train_parallel_gpu.py --tiny --device cpu   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from self_forcing.benchmarks.wan_random import random_model
from self_forcing.sf_model.config import WAN_1_3B, WAN_14B, WanConfig

SIZES = ("toy", "wan")
SCHEMES = ("fsdp", "ddp")
OPTIONS = ("ac", "offload", "shardreal")
DEFAULT_CONFIGS = "toy:fsdp,toy:ddp,wan:fsdp+ac,wan:ddp+ac,wan:fsdp+ac+shardreal,wan:fsdp+ac+offload"
TOY = WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, text_dim=4096, text_len=16, freq_dim=256)
TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=4, freq_dim=32)


def parse_configs(text: str) -> list[tuple[str, str, set[str]]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        size, _, rest = item.partition(":")
        scheme, *opts = (rest or "fsdp").split("+")
        bad = [o for o in opts if o not in OPTIONS]
        if size not in SIZES or scheme not in SCHEMES or bad or (scheme == "ddp" and {"offload", "shardreal"} & set(opts)):
            raise SystemExit(f"bad configuration {item!r}: <{'|'.join(SIZES)}>:<{'|'.join(SCHEMES)}>[+{'|+'.join(OPTIONS)}]"
                             " (offload and shardreal need fsdp)")
        out.append((size, scheme, set(opts)))
    return out


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    t = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return round(float(t), 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def run_config(size: str, scheme: str, opts: set[str], args, device: torch.device, rank: int, world: int) -> dict:
    from self_forcing.training.config import load_config
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.dmd import DmdTrainer
    from self_forcing.training.engine import Checkpointer, Runtime, full_state_dict, shard_frozen

    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg_model = TINY if args.tiny else (TOY if size == "toy" else WAN_1_3B.replace(text_len=args.text_len))
    frames, h, w = ((6, 4, 4) if args.tiny else (12, 16, 16) if size == "toy" else (args.frames, args.height, args.width))
    name = f"{size}:{'+'.join([scheme, *sorted(opts)])}"
    res = {"config": name, "status": "ok", "world_size": world,
           "real_score": "tiny" if args.tiny else "toy" if size == "toy" else args.real_score}
    rt = Runtime(device, precision, rank, world, rank, parallel=scheme, optimizer_offload="offload" in opts,
                 group=True)
    cfg = load_config(data={
        "run": {"out_dir": "unused", "device": str(device), "precision": precision, "progress": False},
        "model": cfg_model.to_dict(),
        "world": {"kind": "wan", "frames": frames, "latent_height": h, "latent_width": w},
        "dmd": {"steps": args.steps, "batch_size": 1, "grad_accum": 1, "critic_ratio": 5, "ema_decay": 0.99}})
    world_data = RandomWorld(clip_shape=(cfg_model.in_dim, frames, h, w), text_len=cfg_model.text_len,
                             text_dim=cfg_model.text_dim)
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, trainer = [], None
    t0 = time.perf_counter()
    try:
        gen = random_model(cfg_model, device, torch.float32, 1).train().requires_grad_(True)
        critic = random_model(cfg_model, device, torch.float32, 2).train().requires_grad_(True)
        real_cfg = cfg_model if args.tiny or size == "toy" or args.real_score == "1.3b" else \
            WAN_14B.replace(text_len=args.text_len)
        real = random_model(real_cfg, device, frozen, 3)
        if "ac" in opts:
            gen.set_activation_checkpointing(True)
            critic.set_activation_checkpointing(True)
        trainer = DmdTrainer.from_models(cfg, rt, world_data, gen, critic, real)
        if "shardreal" in opts:
            shard_frozen(trainer.real, rt)
        sync(device)
        res["build_s"] = round(time.perf_counter() - t0, 2)
        for step in range(args.steps):
            phases = (("generator", trainer.generator_step),) if step % 5 == 0 else ()
            for phase, fn in phases + (("critic", trainer.critic_step),):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t = time.perf_counter()
                metrics = fn(step)
                sync(device)
                loss = metrics.get(f"{phase}_loss")
                rows.append({"phase": phase, "seconds": round(time.perf_counter() - t, 3), "peak_gb": peak_gb(device),
                             "finite": loss is not None and math.isfinite(loss)})
        if args.checkpoint:
            parts = trainer.parts()
            tmp = os.path.join(args.tmp, f"ckpt_{name.replace(':', '_').replace('+', '_')}")
            ck = Checkpointer(tmp, rt)
            t = time.perf_counter()
            ck.save(args.steps, parts)
            res["checkpoint_save_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            ck.load(parts)
            res["checkpoint_load_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            full = full_state_dict(trainer.gen, ema=True)
            res["export_gather_s"] = round(time.perf_counter() - t, 2)
            res["export_tensors"] = len(full) if rank == 0 else None
            del full
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 -- out of memory is a result
        if not (isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()):
            raise
        res.update(status="oom", oom_after_steps=len(rows))
    finally:
        trainer = gen = critic = real = None  # noqa: F841
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for phase in ("generator", "critic"):
        mine = [r for r in rows if r["phase"] == phase]
        later = mine[1:] or mine
        res[phase] = {"steps": len(mine), "first_s": mine[0]["seconds"] if mine else None,
                      "mean_s": round(sum(r["seconds"] for r in later) / len(later), 3) if later else None,
                      "peak_gb": max((r["peak_gb"] for r in mine if r["peak_gb"] is not None), default=None)}
    res["all_losses_finite"] = all(r["finite"] for r in rows) if rows else None
    res["total_s"] = round(time.perf_counter() - t0, 2)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"default {DEFAULT_CONFIGS}")
    ap.add_argument("--steps", type=int, default=10, help="DMD steps per configuration (generator every 5th)")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--real-score", default="1.3b", choices=("1.3b", "14b"),
                    help="the real score of the wan size (14b: the paper's; toy and --tiny use their own size)")
    ap.add_argument("--checkpoint", action="store_true", help="also time a sharded save/load and the export gather")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where --checkpoint writes (deleted after)")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    configs = parse_configs(args.configs)
    from self_forcing.training.distributed import init_group

    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    init_group(device, world, rank)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "world_size": world,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    for size, scheme, opts in configs:
        res = run_config(size, scheme, opts, args, device, rank, world)
        info["results"].append(res)
        if rank == 0:
            g, c = res["generator"], res["critic"]
            print(f"{res['config']:>28}: {res['status']}; generator {g['mean_s']} s/step {g['peak_gb']} GB; critic "
                  f"{c['mean_s']} s/step {c['peak_gb']} GB; finite {res['all_losses_finite']}"
                  + (f"; save {res.get('checkpoint_save_s')} s load {res.get('checkpoint_load_s')} s export "
                     f"{res.get('export_gather_s')} s" if args.checkpoint and res["status"] == "ok" else ""), flush=True)
            if args.out:
                with open(args.out + ".tmp", "w") as fh:
                    json.dump(info, fh, indent=1)
                os.replace(args.out + ".tmp", args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
