"""Driver of the toy baselines comparison on one GPU, in resumable steps that each fit a 10-minute call.

    scripts/train_toy_baselines_gpu.sh --budget fast [--results DIR]     # everything in one call (~9 min, H200)
    scripts/train_toy_baselines_gpu.sh --budget full [--results DIR]     # rerun until it prints "all done"

Steps, in order (each skipped when done; state lives in the run folders under --root):

1. ``teacher`` once (``<root>/teacher``; none with ``--teacher-file``, a teacher trained before): flow matching
   for ``teacher_total_s`` seconds of training loop in total, at most ``teacher_slice_s`` per call (None: all
   in one call; a later call resumes the checkpoint and trains on);
2. per training seed S (``<root>/seed<S>``, ``run.seed = S``, the shared teacher via ``world.teacher_path``,
   ``world.text_seed = 0``, ``compute.budget_s = budget_s``): ``ode_pairs``, ``ode_init``, ``dmd``,
   ``teacher_forcing``, ``diffusion_forcing``, ``export`` -- one step each;
3. ``protocol`` over every seed folder (``python -m self_forcing.training.protocol --runs <root>/seed*``); it
   caches each model's metrics, so a call that runs out of time leaves the rest to the next call.

Before each step the driver estimates its wall time (its budget plus a measured-ish overhead); when the step
would not finish inside ``--max-wall`` seconds of this call it stops and exits with code 3 ("rerun to
continue"). A killed call loses nothing but the step in flight, which resumes from its last checkpoint (its
time budget then restarts: the compute each model actually got is in ``compute.json`` and the protocol's
model table). Results (``--results``): ``protocol/`` (results.md, results.json, raw.npz, plots/),
``seed<S>/compute.json`` and ``curves.json``, ``teacher_curves.json``, ``driver.jsonl`` (wall time of every
step), and with ``--copy-exports`` the four bundles of every seed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time

from self_forcing.training.step_driver import StepBook, compile_once, protocol_seconds, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "training", "configs", "toy_baselines.toml")
SEED_STAGES = ("ode_pairs", "ode_init", "dmd", "teacher_forcing", "diffusion_forcing", "export")

# Budgets. The old demo pipeline took 346 s on an H200 (teacher 165 s, ODE pairs 22 s, ODE init 45 s, DMD
# 80 s). `fast` fits 1 teacher + 1 seed x 4 models + the protocol in one call; `full` is for several calls.
PRESETS = {
    "fast": {"teacher_total_s": 120, "teacher_slice_s": None, "budget_s": 55, "seeds": [0], "max_wall_s": 570,
             "protocol": {"prompts": 64, "seeds": [0, 1, 2], "lengths": [1, 5, 10, 20], "batch_size": 64,
                          "bootstrap": 1000}},
    "full": {"teacher_total_s": 1800, "teacher_slice_s": 480, "budget_s": 360, "seeds": [0, 1, 2],
             "max_wall_s": 560,
             "protocol": {"prompts": 128, "seeds": [0, 1, 2], "lengths": [1, 5, 10, 20], "batch_size": 64,
                          "bootstrap": 2000}},
}
# Seconds a step takes beyond its training budget (model loading, saving), measured on an H200 with the fast
# preset (teacher 5 s, ode_pairs 4.5, ode_init 4, dmd 4, teacher/diffusion forcing 3, export 4) plus a margin;
# WARM_UP_S: the first masked-training step of a call compiles the FlexAttention kernels first (23.5 s);
# the protocol's estimate is per (model, training seed) at 64 prompts x 3 seeds x 20x (35-44 s measured).
OVERHEAD_S = {"teacher": 15, "ode_pairs": 8, "ode_init": 8, "dmd": 8, "teacher_forcing": 8,
              "diffusion_forcing": 8, "export": 8}
WARM_UP_S = 30
WARM_UP_STEPS = ("ode_init", "teacher_forcing", "diffusion_forcing")
PROTOCOL_S_PER_MODEL = 42
MIN_TEACHER_SLICE_S = 60  # a call with less time left than this (+ overhead) does not start a teacher slice


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=sorted(PRESETS), default="fast")
    p.add_argument("--root", default=None, help="run folders (default runs/toy_baselines_<budget>)")
    p.add_argument("--results", default=None, help="results folder (default <root>/results)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--max-wall", type=float, default=None, help="seconds this call may run (default: preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="extra config overrides for every training step")
    p.add_argument("--teacher-s", type=float, default=None, help="override the preset's teacher_total_s")
    p.add_argument("--teacher-file", default=None,
                   help="a toy teacher trained before (e.g. by scripts/toy_teacher_gpu.sh): shared by every seed, "
                        "no teacher step")
    p.add_argument("--budget-s", type=float, default=None, help="override the preset's per-baseline budget_s")
    p.add_argument("--prompts", type=int, default=None, help="override the preset's protocol prompts")
    p.add_argument("--copy-exports", action="store_true", help="copy the exported bundles into --results")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimates, run nothing")
    return p.parse_args(argv)


class Driver:
    """One call of the driver. ``clock`` (seconds, like ``time.time``) is what every time decision and record
    reads (through ``self.book``, a :class:`StepBook`: the call's start, the time left, the markers,
    ``driver.jsonl``); tests pass a fake one."""

    def __init__(self, args, clock=time.time):
        self.args = args
        self.preset = dict(PRESETS[args.budget])
        if args.seeds:
            self.preset["seeds"] = list(args.seeds)
        if args.teacher_s is not None:
            self.preset["teacher_total_s"] = args.teacher_s
        if args.budget_s is not None:
            self.preset["budget_s"] = args.budget_s
        if args.prompts is not None:
            self.preset["protocol"] = {**self.preset["protocol"], "prompts": args.prompts}
        if args.teacher_file and not os.path.isfile(args.teacher_file):
            raise SystemExit(f"--teacher-file {args.teacher_file}: no such file")
        self.root = os.path.abspath(args.root or os.path.join("runs", f"toy_baselines_{args.budget}"))
        self.results = os.path.abspath(args.results or os.path.join(self.root, "results"))
        self.max_wall = args.max_wall or self.preset["max_wall_s"]
        self.book = StepBook(self.results, self.max_wall, clock)
        self.rt = None
        self.warmed = False
        self.sim = {"call": 1, "used": 0.0, "total": 0.0, "warm": False}  # --dry-run bookkeeping
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.results, exist_ok=True)

    # -- configs -------------------------------------------------------------------------------------
    def config(self, folder: str, seed: int, extra=()):
        from self_forcing.training.config import load_config

        sets = [f'run.out_dir="{folder}"', f"run.seed={seed}", "world.text_seed=0",
                f"compute.budget_s={float(self.preset['budget_s'])}", *self.args.overrides, *extra]
        if os.path.basename(folder) != "teacher":
            sets.append(f'world.teacher_path="{self.teacher_file()}"')
        return load_config(self.args.config, sets)

    def teacher_dir(self) -> str:
        return os.path.join(self.root, "teacher")

    def teacher_file(self) -> str:
        if self.args.teacher_file:
            return os.path.abspath(self.args.teacher_file)
        return os.path.join(self.teacher_dir(), "teacher.safetensors")

    def runtime(self, cfg):
        if self.rt is None:
            from self_forcing.training.engine import init_runtime

            self.rt = init_runtime(cfg.run.device, cfg.run.precision)
        return self.rt

    # -- steps -----------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, int | None]]:
        steps = [] if self.args.teacher_file else [("teacher", None)]
        steps += [(stage, s) for s in self.preset["seeds"] for stage in SEED_STAGES]
        return steps + [("protocol", None)]

    def estimate(self, step: str, seed) -> float:
        if step == "teacher":
            from self_forcing.training.baselines import loop_seconds

            used = loop_seconds(os.path.join(self.teacher_dir(), "teacher", "log.jsonl")) or 0
            return OVERHEAD_S["teacher"] + max(0.0, min(MIN_TEACHER_SLICE_S, self.preset["teacher_total_s"] - used))
        if step == "protocol":  # at least one model; the protocol caches each model and resumes
            return 20 + self.protocol_per_model()
        if step == "export":
            return OVERHEAD_S["export"]
        cfg_budget = self.config(self.seed_dir(seed), seed)
        warm = WARM_UP_S if step in WARM_UP_STEPS and not self.warmed else 0
        return getattr(cfg_budget, step).time_budget_s + OVERHEAD_S[step] + warm

    def protocol_per_model(self) -> float:
        p = self.preset["protocol"]
        return protocol_seconds(PROTOCOL_S_PER_MODEL, p["prompts"], p["seeds"], p["lengths"])

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.root, f"seed{seed}")

    def run(self) -> int:
        book = self.book
        for step, seed in self.plan():
            folder = self.teacher_dir() if step == "teacher" else (
                self.results if step == "protocol" else self.seed_dir(seed))
            if book.done(folder, step):
                continue
            need = self.estimate(step, seed)
            if self.args.dry_run:
                self.plan_step(step, seed, need)
                continue
            run = getattr(self, f"step_{step}", self.step_stage)
            code = book.run_step(step, folder, step, need, lambda: run(step, seed, folder), seed=seed)
            if code is not None:
                return code
        if self.args.dry_run:
            print(f"[plan] about {self.sim['total']:.0f} s in {self.sim['call']} call(s) of at most "
                  f"{self.max_wall:.0f} s")
            return 0
        return book.all_done()

    def plan_step(self, step, seed, need) -> None:
        """--dry-run: print the step's expected wall time and the call it would run in (calls of --max-wall;
        the kernel warm-up once per call)."""
        sim = self.sim

        def add(label, seconds, warm_up=False):
            if sim["used"] + seconds + (WARM_UP_S if warm_up and not sim["warm"] else 0) > self.max_wall:
                sim.update(call=sim["call"] + 1, used=0.0, warm=False)
            if warm_up and not sim["warm"]:
                seconds += WARM_UP_S
                sim["warm"] = True
            sim["used"] += seconds
            sim["total"] += seconds
            print(f"[plan] call {sim['call']}: {label} ~{seconds:.0f} s")

        if step == "teacher":  # slices of teacher_slice_s, one per call
            total = self.preset["teacher_total_s"]
            piece = self.preset["teacher_slice_s"] or total
            parts = [min(piece, total - i) for i in range(0, int(total), int(piece))] or [0]
            for i, part in enumerate(parts):
                if i:
                    sim.update(call=sim["call"] + 1, used=0.0, warm=False)
                add(f"teacher slice {i + 1}/{len(parts)}", part + OVERHEAD_S["teacher"])
            return
        label = step if seed is None else f"{step} seed {seed}"
        if step == "protocol":
            for s in self.preset["seeds"]:
                for _ in range(4):
                    add(f"protocol, one model of seed {s}", self.protocol_per_model())
            add("protocol tables and plots", 20)
            return
        base = need - (WARM_UP_S if step in WARM_UP_STEPS and not self.warmed else 0)
        add(label, base, warm_up=step in WARM_UP_STEPS)

    def step_teacher(self, step, seed, folder) -> bool:
        from self_forcing.training.baselines import loop_seconds
        from self_forcing.training.curves import collect
        from self_forcing.training.data import make_world
        from self_forcing.training.stages import run_stages

        total, used = self.preset["teacher_total_s"], loop_seconds(os.path.join(folder, "teacher", "log.jsonl")) or 0
        slack = min(1.0, 0.01 * total)  # the loop stops after the step that crosses its budget
        budget = min(total - used, self.preset["teacher_slice_s"] or total, self.book.left() - OVERHEAD_S["teacher"])
        if total - used > slack and budget > slack:
            cfg = self.config(folder, 0, [f"teacher.time_budget_s={budget:.3f}"])
            run_stages(cfg, ["teacher"], self.runtime(cfg), make_world(cfg))
        used = loop_seconds(os.path.join(folder, "teacher", "log.jsonl")) or 0
        write_json(collect(folder), os.path.join(self.results, "teacher_curves.json"))
        return used >= total - slack and os.path.isfile(self.teacher_file())

    def step_stage(self, step, seed, folder) -> bool:
        from self_forcing.training.curves import collect
        from self_forcing.training.data import make_world
        from self_forcing.training.stages import run_stages

        cfg = self.config(folder, seed)
        world = make_world(cfg)
        if step in WARM_UP_STEPS:
            self.warm_up(cfg, world)
        run_stages(cfg, [step], self.runtime(cfg), world)
        out = os.path.join(self.results, os.path.basename(folder))
        os.makedirs(out, exist_ok=True)
        write_json(collect(folder), os.path.join(out, "curves.json"))
        if step == "export":
            shutil.copy(os.path.join(folder, "compute.json"), os.path.join(out, "compute.json"))
            if self.args.copy_exports:
                for path in glob.glob(os.path.join(folder, "*_toy.safetensors")):
                    shutil.copy(path, out)
        return True

    def warm_up(self, cfg, world) -> None:
        """Compile the FlexAttention kernels of the masked training forwards (block-causal: ode_init, diffusion
        forcing; [clean | noisy]: teacher forcing) once per process before any stage's clock runs, so no
        model's time budget pays for compilation (the compiled kernels are shared in-process)."""
        rt = self.runtime(cfg)
        if self.warmed:
            return
        import torch

        from self_forcing.training.baselines import teacher_forcing_flow

        c, f, h, w = world.clip_shape
        fpb = cfg.sampling.frames_per_block
        shapes = {(cfg.ode_init.batch_size, "block"), (cfg.diffusion_forcing.batch_size, "block"),
                  (cfg.teacher_forcing.batch_size, "teacher_forcing")}

        def forwards(model):
            for batch, kind in sorted(shapes):
                x = torch.randn(batch, c, f, h, w, device=rt.device)
                t = torch.full((batch, f), 500.0, device=rt.device)
                ctx = world.uncond(batch, rt.device)
                with rt.autocast():
                    out = (model(x, t, ctx, frames_per_block=fpb) if kind == "block"
                           else teacher_forcing_flow(model, x, x, t, ctx, fpb))
                out.float().mean().backward()

        self.warmed = compile_once(self.book, rt, cfg.model, forwards, shapes=sorted(shapes))

    def step_protocol(self, step, seed, folder) -> bool:
        from self_forcing.training.protocol import Protocol, collect_models

        p = self.preset["protocol"]
        models = collect_models(runs=[self.seed_dir(s) for s in self.preset["seeds"]])
        proto = Protocol(prompts=p["prompts"], seeds=tuple(p["seeds"]), lengths=tuple(p["lengths"]),
                         batch_size=p["batch_size"], bootstrap=p["bootstrap"])
        return self.book.protocol(models, proto, reserve=20 + self.protocol_per_model())


def main(argv=None, clock=time.time) -> int:
    args = parse_args(argv)
    return Driver(args, clock=clock).run()


if __name__ == "__main__":
    sys.exit(main())
