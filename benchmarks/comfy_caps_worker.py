"""One capped-memory run of ``benchmarks/comfy_server_gpu.py`` (its ``caps`` / ``caps14b`` steps), in ComfyUI's python
without a server: one memory cap (``torch.cuda.set_per_process_memory_fraction`` plus ComfyUI's own
``reserve_vram`` and ``lowvram``), then the core-MODEL path (core UNETLoader; fp8 weights too) and our loader's
path through the Stream Sampler node; seconds, peak memory, whether ComfyUI loaded the model partially, what the
run bound (our log line: layers kept in float8, layers streamed from the CPU), or the error. The 14B runs first
with a Long-Video Options node's ``kv_fp8=True`` (its K/V cache is 25 GiB in bf16 at 832x480x81, 12.5 GiB in
FP8: what lets it near 24 GB), then without (``kv_fp8`` in each path's record). Writes ``--worker-out`` after
each path. Launched by comfy_server_gpu.py; ``--tiny`` runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from self_forcing.benchmarks.comfy_server_gpu import GPU_SIZES, MODEL, TINY_SIZES


def worker(args) -> int:
    """In ComfyUI's python, no server: one memory cap, the core-MODEL path then our loader's path."""
    sys.path.insert(0, str(args.comfy_dir))
    import comfy.cli_args

    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    res = {"size": args.size, "cap_gb": args.cap_gb}
    work = Path(args.work)
    models = work / "base" / "models"
    if args.size == "14B":  # written once, before the cap (built on the GPU: seconds, not minutes)
        models = work / "big" / "models"
        (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
        if not (models / "diffusion_models" / MODEL).exists():
            from self_forcing.sf_model.checkpoint import save_model
            from self_forcing.sf_model.config import WAN_14B
            from self_forcing.sf_model.model import CausalWanModel

            t = time.perf_counter()
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = CausalWanModel(WAN_14B, attn_backend="sdpa").to(torch.bfloat16)
            part = models / "diffusion_models" / ("partial_" + MODEL)  # renamed when whole
            save_model(str(part), model, WAN_14B, meta={"frames_per_block": 3}, dtype=torch.bfloat16)
            os.replace(part, models / "diffusion_models" / MODEL)
            del model
            torch.cuda.empty_cache()
            res["write_14b_s"] = time.perf_counter() - t
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        cap = args.cap_gb * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        comfy.cli_args.args.reserve_vram = max(0.0, (total - cap) / 2**30)  # ComfyUI's planner sees the cap too
        comfy.cli_args.args.lowvram = True
        res.update(total_gib=total / 2**30, fraction=cap / total, reserve_vram_gb=comfy.cli_args.args.reserve_vram,
                   lowvram=True)
    comfy.cli_args.args.cpu = not cuda
    import comfy.model_management as mm
    import folder_paths
    import nodes as core_nodes

    from self_forcing.nodes import comfy as sf

    res["vram_state"] = str(mm.vram_state)
    folder_paths.add_model_folder_path("diffusion_models", str(models / "diffusion_models"))
    tiny = args.tiny
    sizes = TINY_SIZES if tiny else GPU_SIZES
    kw = dict(width=sizes["width"], height=sizes["height"], length=sizes["length"], seed=0, frames_per_block=3)
    positive = [[torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1)) * 0.1, {}]]
    unet = core_nodes.UNETLoader().load_unet
    core = lambda: unet(MODEL, "fp8_e4m3fn" if args.size == "14B" else "default")[0]  # noqa: E731
    paths = {"core_kv_fp8": core} if args.size == "14B" else {}  # the 14B: FP8 K/V cache first
    paths["core"] = core
    kv_fp8 = sf.SelfForcingLongVideoOptions.execute(kv_fp8=True).args[0]
    bound = []  # our log line per run: what was bound (float8 layers, streamed layers, bytes copied)
    handler = logging.Handler()
    handler.emit = lambda record: bound.append(record.getMessage()) if "core MODEL bound" in record.getMessage() else None
    logging.getLogger("self_forcing").addHandler(handler)
    logging.getLogger("self_forcing").setLevel(logging.INFO)
    if args.size != "14B":  # 1.3B: core with fp8 weights too, and our loader
        paths["core_fp8"] = lambda: unet(MODEL, "fp8_e4m3fn")[0]
        paths["ours"] = lambda: sf.SelfForcingModelLoader.execute(
            model_name=MODEL, dtype="bf16", attention="auto", device="cpu" if not cuda else "default",
            keep_loaded=True).args[0]
    for name, load in paths.items():
        r = {"kv_fp8": name.endswith("kv_fp8")}
        model = None
        bound.clear()
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            model = load()
            r["load_s"] = time.perf_counter() - t
            for i in range(1 if args.size == "14B" else 2):  # warm-up, then timed
                t = time.perf_counter()
                sf.SelfForcingSampler.execute(model=model, positive=positive, options=kv_fp8 if r["kv_fp8"] else None,
                                              **kw)
                if cuda:
                    torch.cuda.synchronize()
                r["first_s" if i == 0 else "warm_s"] = time.perf_counter() - t
            r["status"] = "ok"
        except Exception as e:  # OOM included: that is a result here
            import traceback

            r.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}",
                     where=traceback.format_exc(limit=12)[-2500:])
        r["bound"] = bound[-1] if bound else None
        if cuda:
            r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if name.startswith("core") and model is not None:
            r["loaded_partially"] = bool(getattr(model.model, "model_lowvram", False))
            r["loaded_gib"] = model.loaded_size() / 2**30 if hasattr(model, "loaded_size") else None
            r["model_gib"] = model.model_size() / 2**30
            r["weight_dtype"] = str(model.model_dtype())
        res[name] = r
        del model
        mm.unload_all_models()
        mm.soft_empty_cache()
        Path(args.worker_out).write_text(json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy-dir", required=True)
    ap.add_argument("--size", default="1.3B", choices=("1.3B", "14B"))
    ap.add_argument("--work", required=True, help="comfy_server_gpu.py's work folder (its models)")
    ap.add_argument("--worker-out", required=True)
    ap.add_argument("--cap-gb", type=float, default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    args.comfy_dir = Path(args.comfy_dir).resolve()
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
