"""Run the stages of a config in order: teacher -> ode_pairs -> ode_init -> dmd -> [teacher_forcing ->
diffusion_forcing] -> eval -> export (the two baselines of ``training.baselines`` run when named, or with
``--stages baselines``).

Every stage reads its inputs from and writes its outputs to ``run.out_dir``, so stages can run in separate
invocations (and the training stages resume from their checkpoints after a kill)::

    <out_dir>/teacher.safetensors          (toy: the teacher plays every role; Wan: [models], ``training.roles``)
    <out_dir>/ode_pairs/rank<R>.pt
    <out_dir>/ode_init.safetensors
    <out_dir>/self_forcing.safetensors     (EMA generator; with [lora] enabled the merged generator, and its
                                            adapters in <out_dir>/self_forcing_lora.safetensors)
    <out_dir>/teacher_forcing.safetensors, <out_dir>/diffusion_forcing.safetensors   (baselines, EMA)
    <out_dir>/<sfpp.name>.safetensors      (Self-Forcing++, EMA; ``--stages sfpp`` after a Self Forcing run,
                                            which also writes its bundle <sfpp.name>_<kind>.safetensors)
    <out_dir>/grpo.safetensors             (optional GRPO after sfpp, EMA; ``--stages grpo``, toy world; also
                                            writes its bundle grpo_<kind>.safetensors)
    <out_dir>/resampling_warmup.safetensors, <out_dir>/<resampling.name>.safetensors   (Resampling Forcing,
                                            EMA, asked for by name; the second also writes its bundle)
    <out_dir>/<stage>/checkpoint/latest    (the committed step folder's name; ``training.sharded_checkpoint``)
    <out_dir>/<stage>/checkpoint/step_<N>/ (torch.distributed.checkpoint shards + meta.pt; the previous
                                            step folder is kept as the fallback)
    <out_dir>/<stage>/log.jsonl
    <out_dir>/stage_times.jsonl            (wall seconds of every stage run)
    export.path                            (bundled, fp16; next to it causal_init_/teacher_forcing_/
                                            diffusion_forcing_<kind>.safetensors when configured/present,
                                            and <stem>_lora.safetensors with [lora] enabled)
    <out_dir>/compute.json                 (steps and seconds each model got, written by export)
    <out_dir>/eval.json                    (drift curves)
"""

from __future__ import annotations

import json
import os
import time

from .config import PIPELINE, RESAMPLING_STAGES, STAGES, TrainConfig
from .engine import Runtime


def resolve_stages(text: str | None) -> list[str]:
    """'all' (or nothing): the Self Forcing pipeline; 'baselines': every stage, the teacher forcing and
    diffusion forcing baselines included; else a comma-separated subset, run in pipeline order."""
    if not text or text in ("all", "pipeline"):
        return list(PIPELINE)
    if text == "baselines":
        return [s for s in STAGES if s not in ("sfpp", "grpo") and s not in RESAMPLING_STAGES]  # by name only
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)} (comma-separated), 'all' "
                         "(the Self Forcing pipeline) or 'baselines' (all of it and the two baselines)")
    return [s for s in STAGES if s in names]


def teacher_file(cfg: TrainConfig) -> str:
    """The real score's file (``roles.real_score_path``; the toy teacher for the toy world)."""
    from .roles import real_score_path

    return real_score_path(cfg)


def generator_start(cfg: TrainConfig) -> str:
    """The DMD generator's starting weights (``roles.generator_init_path``)."""
    from .roles import generator_init_path

    return generator_init_path(cfg)


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
            seconds = time.time() - t0
            print(f"[{stage}] done in {seconds:.1f} s", flush=True)
            with open(os.path.join(cfg.run.out_dir, "stage_times.jsonl"), "a") as fh:
                fh.write(json.dumps({"stage": stage, "seconds": round(seconds, 3), "time": round(time.time(), 1),
                                     "stop_after": stop_after}) + "\n")
    return out


def _run_stage(cfg: TrainConfig, stage: str, rt: Runtime, world, out: dict, stop_after: int | None) -> None:
    from . import roles

    if stage == "teacher":
        if world.kind == "wan":
            out[stage] = teacher_file(cfg)
            return
        from .teacher import train_teacher

        out[stage] = train_teacher(cfg, rt, world, stop_after=stop_after)
    elif stage == "ode_pairs":
        from .ode_pairs import generate_pairs

        teacher = roles.load_frozen(require(roles.ode_teacher_path(cfg), "teacher"), rt.device)
        out[stage] = generate_pairs(cfg, rt, world, teacher)
        del teacher
    elif stage == "ode_init":
        from .ode_init import train_ode_init

        out[stage] = train_ode_init(cfg, rt, world, require(roles.student_init_path(cfg), "teacher"),
                                    stop_after=stop_after)
    elif stage == "dmd":
        from .dmd import train_dmd

        out[stage] = train_dmd(cfg, rt, world, require(roles.generator_init_path(cfg), "ode_init"),
                               require(roles.critic_init_path(cfg), "teacher"),
                               require(roles.real_score_path(cfg), "teacher"), stop_after=stop_after)
    elif stage == "sfpp":
        from .sfpp import train_sfpp

        out.update(train_sfpp(cfg, rt, world, require(teacher_file(cfg), "teacher"), stop_after=stop_after))
    elif stage == "grpo":  # optional GRPO after Self-Forcing++ (toy world: rewards from its own rules)
        from .grpo import train_grpo

        out.update(train_grpo(cfg, rt, world, stop_after=stop_after))
    elif stage in ("teacher_forcing", "diffusion_forcing"):
        from .baselines import train_baseline

        out[stage] = train_baseline(cfg, rt, world, require(roles.student_init_path(cfg), "teacher"), stage,
                                    stop_after=stop_after)
    elif stage in RESAMPLING_STAGES:  # Resampling Forcing: teacher-forcing warm-up, then self-resampled history
        from .resampling import run_resampling_stage

        out.update(run_resampling_stage(cfg, rt, world, stage, lambda: roles.student_init_path(cfg),
                                         stop_after=stop_after))
    elif stage == "eval":
        from .evaluate import evaluate_drift

        if rt.is_main:
            out[stage] = evaluate_drift(cfg, rt, world)
        rt.barrier()
    elif stage == "export":
        from .dmd import self_forcing_path
        from .export import export_model

        if rt.is_main:
            report = _compute_report(cfg)
            out[stage] = export_model(cfg, world, require(self_forcing_path(cfg), "dmd"),
                                      extra_meta={"compute": report["models"]["self_forcing"]})
            if cfg.export.causal_init:
                from .ode_init import ode_init_path

                path = os.path.join(os.path.dirname(os.path.abspath(out[stage])),
                                    f"causal_init_{cfg.world.kind}.safetensors")
                out["export_causal_init"] = export_model(cfg, world, require(ode_init_path(cfg), "ode_init"),
                                                         path, role="causal_init", publish=False,
                                                         extra_meta={"compute": report["models"]["causal_init"]})
            if cfg.export.baselines:
                out.update(_export_baselines(cfg, world, out[stage], report))
        rt.barrier()


def _compute_report(cfg: TrainConfig) -> dict:
    """What each model got after the teacher (``baselines.compute_report``), also written to
    ``<out_dir>/compute.json``."""
    from .baselines import compute_report

    report = compute_report(cfg)
    with open(os.path.join(cfg.run.out_dir, "compute.json"), "w") as fh:
        json.dump(report, fh, indent=1, sort_keys=True)
    return report


def _export_baselines(cfg: TrainConfig, world, main_export: str, report: dict) -> dict[str, str]:
    """Bundles of the baselines whose stage outputs exist, next to the main export, each with the compute it
    got (``compute`` in its metadata)."""
    from .baselines import BASELINES, baseline_path
    from .export import export_model

    out = {}
    folder = os.path.dirname(os.path.abspath(main_export))
    for stage in BASELINES:
        source = baseline_path(cfg, stage)
        if os.path.isfile(source):
            path = os.path.join(folder, f"{stage}_{cfg.world.kind}.safetensors")
            out[f"export_{stage}"] = export_model(cfg, world, source, path, role=stage, publish=False,
                                                  extra_meta={"compute": report["models"][stage],
                                                              "shared_teacher": report["teacher"]})
    return out
