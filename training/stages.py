"""Run the stages of a config in order: teacher -> ode_pairs -> ode_init -> dmd -> eval -> export.

Every stage reads its inputs from and writes its outputs to ``run.out_dir``, so stages can run in separate
invocations (and the training stages resume from their checkpoints after a kill)::

    <out_dir>/teacher.safetensors          (toy; Wan uses world.teacher_path)
    <out_dir>/ode_pairs/rank<R>.pt
    <out_dir>/ode_init.safetensors
    <out_dir>/self_forcing.safetensors     (EMA generator)
    <out_dir>/<stage>/checkpoint.pt, <out_dir>/<stage>/log.jsonl
    export.path                            (bundled, fp16)
    <out_dir>/eval.json                    (drift curves)
"""

from __future__ import annotations

import json
import os
import time

from .config import STAGES, TrainConfig
from .engine import Runtime


def resolve_stages(text: str | None) -> list[str]:
    if not text or text == "all":
        return list(STAGES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)} (comma-separated) or 'all'")
    return [s for s in STAGES if s in names]


def teacher_file(cfg: TrainConfig) -> str:
    if cfg.world.kind == "wan":
        if not cfg.world.teacher_path:
            raise ValueError("set world.teacher_path to the released Wan2.1 T2V weights (the real score)")
        return cfg.world.teacher_path
    from .teacher import teacher_path

    return teacher_path(cfg)


def generator_start(cfg: TrainConfig) -> str:
    if cfg.world.generator_path:
        return cfg.world.generator_path
    from .ode_init import ode_init_path

    return ode_init_path(cfg)


def require(path: str, stage: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; run the '{stage}' stage first")
    return path


def run_stages(cfg: TrainConfig, stages: list[str], rt: Runtime, world, *,
               stop_after: int | None = None) -> dict[str, str]:
    """Run ``stages``; returns {stage: output path}. ``stop_after`` caps the steps of each training stage."""
    out: dict[str, str] = {}
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    if rt.is_main:
        with open(os.path.join(cfg.run.out_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=1, sort_keys=True)
    for stage in stages:
        t0 = time.time()
        _run_stage(cfg, stage, rt, world, out, stop_after)
        if rt.is_main:
            print(f"[{stage}] done in {time.time() - t0:.1f} s", flush=True)
    return out


def _run_stage(cfg: TrainConfig, stage: str, rt: Runtime, world, out: dict, stop_after: int | None) -> None:
    from .models import load_dit

    if stage == "teacher":
        if world.kind == "wan":
            out[stage] = teacher_file(cfg)
            return
        from .teacher import train_teacher

        out[stage] = train_teacher(cfg, rt, world, stop_after=stop_after)
    elif stage == "ode_pairs":
        from .ode_pairs import generate_pairs

        teacher, _ = load_dit(require(teacher_file(cfg), "teacher"), rt.device)
        out[stage] = generate_pairs(cfg, rt, world, teacher)
        del teacher
    elif stage == "ode_init":
        from .ode_init import train_ode_init

        out[stage] = train_ode_init(cfg, rt, world, require(teacher_file(cfg), "teacher"), stop_after=stop_after)
    elif stage == "dmd":
        from .dmd import train_dmd

        out[stage] = train_dmd(cfg, rt, world, require(generator_start(cfg), "ode_init"),
                               require(teacher_file(cfg), "teacher"), stop_after=stop_after)
    elif stage == "eval":
        from .evaluate import evaluate_drift

        if rt.is_main:
            out[stage] = evaluate_drift(cfg, rt, world)
        rt.barrier()
    elif stage == "export":
        from .dmd import self_forcing_path
        from .export import export_model

        if rt.is_main:
            out[stage] = export_model(cfg, world, require(self_forcing_path(cfg), "dmd"))
            if cfg.export.causal_init:
                from .ode_init import ode_init_path

                path = os.path.join(os.path.dirname(os.path.abspath(out[stage])),
                                    f"causal_init_{cfg.world.kind}.safetensors")
                out["export_causal_init"] = export_model(cfg, world, require(ode_init_path(cfg), "ode_init"),
                                                         path, role="causal_init", publish=False)
        rt.barrier()
