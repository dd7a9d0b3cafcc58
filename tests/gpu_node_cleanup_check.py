#!/usr/bin/env python3
"""Manual GPU check (not CI): the sampler/extend node logic frees CUDA memory after a run, an interrupt
and an OOM, while the exception is still held (as ComfyUI holds it to report it); weights go back to
the offload device unless keep_loaded.

    python tests/gpu_node_cleanup_check.py        # needs a CUDA device; prints measurements
"""

import gc
import json

import torch

from self_forcing.nodes.model import ModelHandle
from self_forcing.nodes.sampling import RunHooks, extend_video, sample_video
from self_forcing.sf_model.checkpoint import LoadedModel
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.model import CausalWanModel


def allocated_mb() -> float:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**20


def main() -> dict:
    cfg = TINY.replace(dim=256, ffn_dim=512, num_layers=4)
    model = CausalWanModel(cfg, attn_backend="auto").eval().requires_grad_(False)
    handle = ModelHandle(LoadedModel(model, cfg, "test", {}), "test", torch.device("cuda"), torch.device("cpu"),
                         torch.float32)
    cond = [[torch.randn(1, 8, cfg.text_dim), {}]]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "weights_mb": sum(p.numel() * 4 for p in model.parameters()) / 2**20,
              "allocated_before_mb": allocated_mb()}
    peak = [0]

    def watch(done, total, preview):
        peak[0] = max(peak[0], torch.cuda.memory_allocated())

    out = sample_video(handle, cond, width=512, height=512, length=81, seed=0,
                       hooks=RunHooks(progress=watch, empty_cache=torch.cuda.empty_cache))
    report["full_run"] = {"latent": list(out.shape), "peak_mb": peak[0] / 2**20, "after_mb": allocated_mb(),
                          "model_rests_on": str(model.device)}
    for name, error in (("interrupt", RuntimeError("Processing interrupted")),
                        ("oom", torch.OutOfMemoryError("CUDA out of memory"))):
        for which in ("sample", "extend"):
            passes = [0]

            def check():
                passes[0] += 1
                if passes[0] > 10:
                    raise error

            hooks = RunHooks(check_cancel=check, empty_cache=torch.cuda.empty_cache)
            try:
                if which == "sample":
                    sample_video(handle, cond, width=512, height=512, length=81, seed=0, hooks=hooks)
                else:
                    extend_video(handle, cond, {"samples": out}, extend_frames=40, history_frames=3,
                                 resample_strength=0.4, seed=1, hooks=hooks)
            except type(error) as held:  # keep it alive while measuring, as ComfyUI does
                report[f"{name}_{which}"] = {"stopped_after_passes": passes[0] - 1,
                                             "allocated_mb_while_exception_held": allocated_mb(),
                                             "model_rests_on": str(model.device),
                                             "exception": type(held).__name__}
    handle.keep_loaded = True
    sample_video(handle, cond, width=512, height=512, length=9, seed=0)
    report["keep_loaded"] = {"model_rests_on": str(model.device), "allocated_mb": allocated_mb()}
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
