"""Peak GPU memory and time of Self Forcing DMD training at Wan scale on one GPU (random weights).

The official configuration: generator and critic Wan2.1-T2V-1.3B trained (float32 master weights and AdamW
state, bf16 compute), real score Wan2.1-T2V-14B frozen in bf16 (or a 1.3B real score), 21 latent frames of
60x104, batch 1, text length 512 (random context), DMD with 5 critic updates per generator update. Every
step runs the trainer's own code: ``training.dmd.DmdTrainer.step`` (``generator_step`` every 5th step, then
``critic_step``), over models built by ``DmdTrainer.from_models``. Weights are random (memory and time do
not depend on their values) and made directly on the GPU: the 14B real score is built on the meta device,
allocated in bf16 with ``to_empty`` and filled by a fast on-device random init (``benchmarks/wan_random.py``:
no 28 GB file, no float32 copy).

Each configuration is ``<real score>:<options>``: real score ``14b`` or ``1.3b``; options ``plain``, ``ac``
(activation checkpointing of every block: ``CausalWanModel.set_activation_checkpointing``), ``offload``
(CPU optimizer offload: FSDP2 ``CPUOffloadPolicy`` through ``training.engine.init_runtime(
optimizer_offload=True)``) or ``ac+offload``. Peak memory (``torch.cuda.max_memory_allocated``, reset before
every generator and critic step) and seconds per step are reported per phase; a configuration that runs out
of memory is recorded as such (with the step it reached) and the next one runs.

    python3 benchmarks/train_wan_memory_gpu.py --steps 10 --out $OUT/train_memory.json
    python3 benchmarks/train_wan_memory_gpu.py --configs 14b:ac,1.3b:ac --steps 20 --ema-on-cpu
    python3 benchmarks/train_wan_memory_gpu.py --tiny --device cpu --steps 2   # CPU smoke test, tiny dims

On an H200 the default six configurations at 20 steps exceed one 10-minute call (estimated from FLOPs, not
measured: ~4-5 s per generator step with the 1.3B real score and ~11 s with the 14B one, ~4 s per critic step,
up to about twice that with CPU offload): split them over calls with ``--configs`` and bound each with
``--max-seconds``; the JSON is rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import sys
import time

import torch

from self_forcing.benchmarks.wan_random import random_model
from self_forcing.sf_model.config import WAN_1_3B, WAN_14B, WanConfig

REAL = {"14b": WAN_14B, "1.3b": WAN_1_3B}
OPTIONS = ("plain", "ac", "offload", "ac+offload")
DEFAULT_CONFIGS = "14b:ac+offload,14b:ac,1.3b:ac+offload,1.3b:ac,14b:offload,14b:plain"
# --tiny: the same roles at test size (a real score of its own, bigger shape, as 14B is to 1.3B)
TINY_GEN = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32)
TINY_REAL = {"14b": TINY_GEN.replace(dim=96, ffn_dim=192, num_heads=6, num_layers=3), "1.3b": TINY_GEN}


def parse_configs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        real, _, opts = item.partition(":")
        opts = opts or "plain"
        if real not in REAL or opts not in OPTIONS:
            raise SystemExit(f"bad configuration {item!r}: use <{'|'.join(REAL)}>:<{'|'.join(OPTIONS)}>")
        out.append((real, opts))
    return out


# -- runtime and options --------------------------------------------------------------------------------
def make_runtime(device: torch.device, precision: str, offload: bool, ema_on_cpu: bool = False):
    from self_forcing.training import engine

    params = inspect.signature(engine.init_runtime).parameters
    if (offload and "optimizer_offload" not in params) or (ema_on_cpu and "ema_on_cpu" not in params):
        raise RuntimeError("CPU optimizer offload / a CPU EMA need training.engine.init_runtime(optimizer_offload=, "
                           "ema_on_cpu=) (FSDP2 CPUOffloadPolicy), which this checkout does not have")
    extra = {"ema_on_cpu": True} if ema_on_cpu else {}
    if not offload:
        return engine.Runtime(device=device, precision=precision, **extra)
    return engine.init_runtime(str(device), precision, optimizer_offload=True, **extra)


def enable_activation_checkpointing(model) -> None:
    if not hasattr(model, "set_activation_checkpointing"):
        raise RuntimeError("activation checkpointing needs CausalWanModel.set_activation_checkpointing, which "
                           "this checkout does not have")
    model.set_activation_checkpointing(True)


def train_config(gen: WanConfig, frames: int, height: int, width: int, steps: int, device: torch.device,
                 precision: str):
    from self_forcing.training.config import load_config

    return load_config(data={
        "run": {"out_dir": "unused", "device": str(device), "precision": precision, "progress": False},
        "model": gen.to_dict(),
        "world": {"kind": "wan", "frames": frames, "latent_height": height, "latent_width": width},
        "dmd": {"steps": steps, "batch_size": 1, "grad_accum": 1, "critic_ratio": 5},
    })


# -- measuring ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_alloc_gb": None, "peak_reserved_gb": None}
    return {"peak_alloc_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 3)}


def allocated_gb(device: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def summarize(rows: list[dict], phase: str) -> dict:
    mine = [r for r in rows if r["phase"] == phase]
    if not mine:
        return {"steps": 0}
    secs = [r["seconds"] for r in mine]
    later = secs[1:] or secs  # the first step of a phase includes one-time work (allocator, kernels)
    peaks = [r["peak_alloc_gb"] for r in mine if r["peak_alloc_gb"] is not None]
    return {"steps": len(mine), "first_s": round(secs[0], 3), "mean_s": round(sum(later) / len(later), 3),
            "peak_alloc_gb": max(peaks) if peaks else None,
            "peak_reserved_gb": max((r["peak_reserved_gb"] for r in mine if r["peak_reserved_gb"] is not None),
                                    default=None)}


def run_config(real: str, opts: str, args, device: torch.device) -> dict:
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.dmd import DmdTrainer
    from self_forcing.training.roles import frozen_dtype

    gen_cfg = TINY_GEN if args.tiny else WAN_1_3B.replace(text_len=args.text_len)
    real_cfg = (TINY_REAL if args.tiny else {k: v.replace(text_len=args.text_len) for k, v in REAL.items()})[real]
    precision = "bf16" if device.type == "cuda" else "fp32"
    name = f"{real}:{opts}"
    result = {"config": name, "real_score": real, "activation_checkpointing": "ac" in opts,
              "optimizer_offload": "offload" in opts, "status": "ok"}
    trainer = models = None
    reset_peak(device)
    base = allocated_gb(device)
    t0 = time.perf_counter()
    rows: list[dict] = []
    try:
        rt = make_runtime(device, precision, "offload" in opts, args.ema_on_cpu)
        cfg = train_config(gen_cfg, args.frames, args.height, args.width, args.steps, device, precision)
        world = RandomWorld(clip_shape=(gen_cfg.in_dim, args.frames, args.height, args.width),
                            text_len=gen_cfg.text_len, text_dim=gen_cfg.text_dim)
        generator = random_model(gen_cfg, device, torch.float32, 1).requires_grad_(True)
        critic = random_model(gen_cfg, device, torch.float32, 2).requires_grad_(True)
        real_score = random_model(real_cfg, device, frozen_dtype(device), 3)
        models = (generator, critic, real_score)
        if "ac" in opts:
            for m in (generator, critic):
                enable_activation_checkpointing(m)
        trainer = DmdTrainer.from_models(cfg, rt, world, generator, critic, real_score)
        sync(device)
        result["build_s"] = round(time.perf_counter() - t0, 2)
        result["weights_gb"] = None if base is None else round(allocated_gb(device) - base, 3)
        result["checkpointed"] = {n: bool(getattr(m, "activation_checkpointing", False))
                                  for n, m in (("generator", generator), ("critic", critic))}
        result["offloaded"] = {n: bool(getattr(t, "sharded", False) and rt.optimizer_offload)
                               for n, t in (("generator", trainer.gen), ("critic", trainer.critic))}
        result["real_score_dtype"] = str(trainer.real.dtype).replace("torch.", "")
        result["real_score_params"] = sum(p.numel() for p in real_score.parameters())
        loop0 = time.perf_counter()
        for step in range(args.steps):
            if args.max_seconds and time.perf_counter() - loop0 > args.max_seconds:
                result["status"] = f"stopped after {step} steps (--max-seconds {args.max_seconds})"
                break
            phases = (("generator", trainer.generator_step),) if step % cfg.dmd.critic_ratio == 0 else ()
            for phase, fn in phases + (("critic", trainer.critic_step),):
                reset_peak(device)
                t = time.perf_counter()
                try:
                    metrics = fn(step)
                except Exception as e:  # noqa: BLE001 -- out of memory is a result, anything else is raised
                    if not is_oom(e):
                        raise
                    result.update(status="oom", oom_phase=phase, oom_step=step, **{
                        f"oom_{k}": v for k, v in peak_gb(device).items()})
                    raise _Stop from None
                sync(device)
                row = {"step": step, "phase": phase, "seconds": round(time.perf_counter() - t, 3), **peak_gb(device)}
                loss = metrics.get(f"{phase}_loss")
                row["loss_finite"] = loss is not None and math.isfinite(loss)
                rows.append(row)
                if args.verbose:
                    print(f"  {name} step {step} {phase}: {row['seconds']:.2f} s, peak {row['peak_alloc_gb']} GB",
                          flush=True)
        if args.export and rows and result["status"] != "oom" and trainer is not None:
            result["export"] = export_and_reload(trainer, gen_cfg, args.export, device)
    except _Stop:
        pass
    finally:
        trainer = models = generator = critic = real_score = None  # noqa: F841 -- free before the next config
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["generator"] = summarize(rows, "generator")
    result["critic"] = summarize(rows, "critic")
    result["all_losses_finite"] = all(r["loss_finite"] for r in rows) if rows else None
    result["steps"] = rows
    result["total_s"] = round(time.perf_counter() - t0, 2)
    return result


class _Stop(Exception):
    pass


def export_and_reload(trainer, gen_cfg: WanConfig, path: str, device: torch.device) -> dict:
    """Write the trained generator's EMA as the export stage does (``save_dit``, bf16) and load it back through
    the nodes' loader (``nodes.model.load_handle``), then run one chunk of the sampler on it: the export of a
    Wan-scale run loads where users load models."""
    from self_forcing.nodes.model import load_handle
    from self_forcing.sf_model.sampler import StreamOptions, stream
    from self_forcing.sf_model.window import CachePolicy
    from self_forcing.training.models import save_dit

    t0 = time.perf_counter()
    trainer.gen.prepare_export() if hasattr(trainer.gen, "prepare_export") else None
    model = trainer.gen.ema_model()
    save_dit(path, model, gen_cfg, role="self_forcing", meta={"frames_per_block": 3, "benchmark": True},
             dtype=torch.bfloat16)
    del model
    saved_s = time.perf_counter() - t0
    handle = load_handle(path, os.path.basename(path), dtype="bf16" if device.type == "cuda" else "fp32",
                         attention="auto", load_device=device, offload_device=device, keep_loaded=True,
                         supports_bf16=device.type == "cuda")
    m = handle.loaded.model
    ctx = torch.randn(1, gen_cfg.text_len, gen_cfg.text_dim, device=device)
    opts = StreamOptions.from_meta(handle.loaded.meta, CachePolicy(int(handle.loaded.meta.get("frames_per_block", 3))))
    with torch.no_grad():
        chunks = [c.latents for c in stream(m, ctx, num_frames=3, height=16, width=16, seed=0, options=opts)]
    out = {"path": path, "bytes": os.path.getsize(path), "save_s": round(saved_s, 2),
           "loaded_dtype": str(m.dtype).replace("torch.", ""), "params": sum(p.numel() for p in m.parameters())}
    if chunks:
        out["sample_finite"] = bool(all(torch.isfinite(c).all() for c in chunks))
    del handle, m
    os.remove(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated <real>:<options> (real: 14b|1.3b; options: {'|'.join(OPTIONS)}); "
                         f"default {DEFAULT_CONFIGS}")
    ap.add_argument("--steps", type=int, default=20, help="DMD loop steps per configuration (a critic update each, "
                                                          "a generator update every 5th); default 20")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stop a configuration's loop after this many seconds (0: run every step)")
    ap.add_argument("--ema-on-cpu", action="store_true",
                    help="keep the generator's EMA shadow in host memory (run.ema_on_cpu; the official trainer does)")
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test); frames/height/width too")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--verbose", action="store_true", help="one line per step")
    ap.add_argument("--export", default="", help="after a configuration, export the generator's EMA (bf16) here, "
                                                 "load it back with the nodes' loader, then delete it")
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.height, args.width = min(args.frames, 6), min(args.height, 4), min(args.width, 4)
    configs = parse_configs(args.configs)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "results": []}
    print(f"{info['device']}, torch {info['torch']}: {len(configs)} configurations x {args.steps} steps, "
          f"{args.frames}x{args.height}x{args.width} latents, text {TINY_GEN.text_len if args.tiny else args.text_len}",
          flush=True)
    for real, opts in configs:
        res = run_config(real, opts, args, device)
        info["results"].append(res)
        g, c = res["generator"], res["critic"]
        print(f"{res['config']:>16}: {res['status']}; generator {g.get('mean_s')} s/step peak {g.get('peak_alloc_gb')} "
              f"GB; critic {c.get('mean_s')} s/step peak {c.get('peak_alloc_gb')} GB; weights "
              f"{res.get('weights_gb')} GB; {res['total_s']} s", flush=True)
        if args.out:  # after every configuration: a later one that is killed leaves the earlier figures
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(info, fh, indent=1)
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
