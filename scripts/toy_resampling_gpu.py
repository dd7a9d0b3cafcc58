"""Driver of the Resampling Forcing comparison on the toy world, on one GPU, in resumable steps that each fit a
10-minute call, next to a baselines run (scripts/toy_baselines_gpu.py) at the same compute.

    PYTHONPATH=<dir holding self_forcing> python3 scripts/toy_resampling_gpu.py \\
        --baselines runs/toy_baselines_fast --variants ablation        # rerun until it prints "all done"

It reuses the baselines run: its teacher (``<baselines>/teacher/teacher.safetensors``; trained here for
``--teacher-s`` seconds when missing), its per-model budget (``<baselines>/seed<S>/compute.json``, else
``--budget-s``) and its exports (``--refs``, compared in the protocol). Steps, in order, each skipped when done:

1. ``warmup`` per training seed S (``<root>/seed<S>``): stage ``resampling_warmup`` (teacher forcing from the
   teacher) for ``warmup_fraction`` of the budget, shared by every variant that starts from the teacher;
2. ``variant`` per variant V and seed S (``<root>/seed<S>/<V>``): stage ``resampling`` from the shared warm-up
   for the rest of the budget (so warm-up + resampling = one baseline's budget), which writes the bundle
   ``resampling_forcing_toy.safetensors``; the ``rf_scratch`` variant (no teacher) has its own warm-up from
   random weights and the budget plus the teacher's training seconds;
3. ``protocol`` over the trained variants and the references, at 1, 6 and 20 x the training length
   (``python -m self_forcing.training.protocol`` as a function; each model's metrics are cached, so a call that
   runs out of time continues in the next), with the paired differences the comparison is about.

Variants (``--variants``: names or groups, comma-separated): ``rf`` (autoregressive resampling, s = 0.6),
``rf_parallel``, ``rf_noise_aug``, ``rf_s0.1``, ``rf_s3.0``, ``rf_route<k>`` (history routing, top-k of the 9
history frames), ``rf_window<k + 3>`` (a sliding window of the same attention budget), ``rf_scratch``; groups
``ablation`` (rf, rf_parallel, rf_noise_aug), ``shift`` (rf_s0.1, rf, rf_s3.0), ``routing`` (rf, rf_route<k>,
rf_window<k + 3>), ``teacher`` (rf, rf_scratch), ``all``. Before a step the driver estimates its wall time;
when it would not finish inside ``--max-wall`` it exits with code 3 ("rerun to continue"). Results
(``--results``): ``protocol/`` (results.md, results.json, raw.npz, plots/), ``driver.jsonl``, per seed and variant
``curves.json`` (training logs) and with ``--copy-exports`` the bundles.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

from self_forcing.training.step_driver import StepBook, compile_once, protocol_seconds, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "training", "configs", "toy_resampling.toml")
GROUPS = {"ablation": ("rf", "rf_parallel", "rf_noise_aug"), "shift": ("rf_s0.1", "rf", "rf_s3.0"),
          "routing": ("rf", "rf_route{k}", "rf_window{w}"), "teacher": ("rf", "rf_scratch")}
# Seconds a step takes besides its training budget (loading, saving, export), and the one-off compilation of
# the FlexAttention kernels of the masked training forward per call (measured by the baselines driver: 23.5 s)
OVERHEAD_S = {"teacher": 15, "warmup": 8, "variant": 12}
WARM_UP_S = 40
PROTOCOL_S_PER_MODEL = 42  # one model and training seed at 64 prompts x 3 seeds x 20x (H200, baselines driver)
DEFAULT_BUDGET_S = 55      # the baselines' fast preset


def variant_table(k: int, fpb: int) -> dict[str, dict]:
    """name -> [resampling] overrides (``_own_warmup``: trains its own warm-up)."""
    return {"rf": {}, "rf_parallel": {"simulation": "parallel"}, "rf_noise_aug": {"simulation": "noise"},
            "rf_s0.1": {"shift_s": 0.1}, "rf_s3.0": {"shift_s": 3.0}, f"rf_route{k}": {"routing_topk": k},
            f"rf_window{k + fpb}": {"window": k + fpb},
            "rf_scratch": {"warmup_init": "scratch", "_own_warmup": True}}


def pairs_for(names, refs, k: int, fpb: int) -> list[tuple[str, str]]:
    want = [("rf", "rf_noise_aug"), ("rf", "rf_parallel"), ("rf_parallel", "rf_noise_aug"), ("rf", "rf_s0.1"),
            ("rf", "rf_s3.0"), (f"rf_route{k}", f"rf_window{k + fpb}"), (f"rf_route{k}", "rf"), ("rf", "rf_scratch"),
            *[("rf", r) for r in refs], *[("rf_scratch", r) for r in refs if r == "self_forcing"]]
    have = set(names) | set(refs)
    return [p for p in want if p[0] in have and p[1] in have]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baselines", default=os.path.join("runs", "toy_baselines_fast"),
                   help="the baselines run folder (teacher/, seed<S>/)")
    p.add_argument("--root", default=None, help="run folders (default <baselines>/resampling)")
    p.add_argument("--results", default=None, help="results folder (default <root>/results)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--variants", default="ablation", help="variant names and/or groups, comma-separated")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--budget-s", type=float, default=None, help="per-model budget (default: the baselines')")
    p.add_argument("--teacher-s", type=float, default=120.0, help="teacher seconds when the baselines have none")
    p.add_argument("--routing-k", type=int, default=2, help="k of rf_route<k> (and rf_window<k + chunk>)")
    p.add_argument("--refs", default="teacher_forcing,self_forcing",
                   help="baseline exports to compare with (from <baselines>/seed<S>)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--protocol-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 6, 20])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--max-wall", type=float, default=570.0, help="seconds this call may run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="config overrides for every training step")
    p.add_argument("--no-protocol", action="store_true")
    p.add_argument("--copy-exports", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimates, run nothing")
    return p.parse_args(argv)


class Driver:
    """One call; its time decisions, markers and ``driver.jsonl`` go through ``self.book`` (a :class:`StepBook`
    on ``clock``, a fake one in the tests)."""

    def __init__(self, args, clock=time.time):
        from self_forcing.training.config import load_config

        self.args = args
        self.base = os.path.abspath(args.baselines)
        self.root = os.path.abspath(args.root or os.path.join(self.base, "resampling"))
        self.results = os.path.abspath(args.results or os.path.join(self.root, "results"))
        self.book = StepBook(self.results, args.max_wall, clock)
        self.rt = None
        self.warmed = False
        self.fpb = load_config(args.config, args.overrides).sampling.frames_per_block
        table = variant_table(args.routing_k, self.fpb)
        names: list[str] = []
        for item in (s.strip() for s in args.variants.split(",") if s.strip()):
            group = [n.format(k=args.routing_k, w=args.routing_k + self.fpb) for n in
                     (GROUPS[item] if item in GROUPS else (table if item == "all" else (item,)))]
            for n in group:
                if n not in table:
                    raise SystemExit(f"unknown variant {n!r}; variants: {', '.join(table)}; groups: "
                                     f"{', '.join(GROUPS)}, all")
                if n not in names:
                    names.append(n)
        self.variants = {n: table[n] for n in names}
        self.refs = [r.strip() for r in args.refs.split(",") if r.strip()]
        self.sim_used = 0.0
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.results, exist_ok=True)

    # -- what the baselines run gives -------------------------------------------------------------------
    def teacher_dir(self) -> str:
        return os.path.join(self.base, "teacher")

    def teacher_file(self) -> str:
        return os.path.join(self.teacher_dir(), "teacher.safetensors")

    def teacher_seconds(self) -> float:
        from self_forcing.training.baselines import loop_seconds

        return loop_seconds(os.path.join(self.teacher_dir(), "teacher", "log.jsonl")) or self.args.teacher_s

    def budget(self, seed: int) -> float:
        if self.args.budget_s is not None:
            return float(self.args.budget_s)
        path = os.path.join(self.base, f"seed{seed}", "compute.json")
        if os.path.isfile(path):
            with open(path) as fh:
                value = json.load(fh).get("budget_s")
            if value:
                return float(value)
        return float(DEFAULT_BUDGET_S)

    def ref_paths(self) -> dict[str, list[str]]:
        from self_forcing.training.protocol import EXPORT_NAMES

        out = {}
        for ref in self.refs:
            paths = [os.path.join(self.base, f"seed{s}", EXPORT_NAMES.get(ref, f"{ref}_toy.safetensors"))
                     for s in self.args.seeds]
            if all(os.path.isfile(p) for p in paths):
                out[ref] = paths
        return out

    # -- configs -----------------------------------------------------------------------------------------
    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.root, f"seed{seed}")

    def folder(self, step: str, seed, variant) -> str:
        if step == "teacher":
            return self.teacher_dir()
        if step == "protocol":
            return self.results
        return self.seed_dir(seed) if step == "warmup" else os.path.join(self.seed_dir(seed), variant)

    def config(self, folder: str, seed: int, budget: float, extra=()):
        from self_forcing.training.config import load_config

        sets = [f'run.out_dir="{folder}"', f"run.seed={seed}", "world.text_seed=0",
                f"compute.budget_s={float(budget)}", *self.args.overrides, *extra]
        if os.path.abspath(folder) != self.teacher_dir():
            sets.append(f'world.teacher_path="{self.teacher_file()}"')
        return load_config(self.args.config, sets)

    def variant_sets(self, name: str, seed: int) -> tuple[list[str], float]:
        """(config overrides, budget) of a variant's folder."""
        spec = dict(self.variants[name])
        own = spec.pop("_own_warmup", False)
        budget = self.budget(seed) + (self.teacher_seconds() if name == "rf_scratch" else 0.0)
        sets = [f"resampling.{k}={json.dumps(v)}" for k, v in spec.items()]
        if not own:
            sets.append(f'resampling.init_path="{os.path.join(self.seed_dir(seed), "resampling_warmup.safetensors")}"')
        return sets, budget

    def runtime(self, cfg):
        if self.rt is None:
            from self_forcing.training.engine import init_runtime

            self.rt = init_runtime(cfg.run.device, cfg.run.precision)
        return self.rt

    # -- the plan ------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, int | None, str | None]]:
        steps = [] if os.path.isfile(self.teacher_file()) else [("teacher", None, None)]
        shared = any(not v.get("_own_warmup") for v in self.variants.values())
        for s in self.args.seeds:
            if shared:
                steps.append(("warmup", s, None))
            steps += [("variant", s, v) for v in self.variants]
        return steps + ([] if self.args.no_protocol else [("protocol", None, None)])

    def estimate(self, step: str, seed, variant) -> float:
        if step == "teacher":
            return self.args.teacher_s + OVERHEAD_S["teacher"]
        if step == "protocol":  # at least one model; the protocol caches each model and resumes
            return 20 + self.protocol_per_model()
        warm = 0 if self.warmed else WARM_UP_S
        if step == "warmup":
            cfg = self.config(self.seed_dir(seed), seed, self.budget(seed))
            return cfg.resampling.warmup_time_budget_s + OVERHEAD_S["warmup"] + warm
        sets, budget = self.variant_sets(variant, seed)
        cfg = self.config(self.folder(step, seed, variant), seed, budget, sets)
        own = cfg.resampling.warmup_time_budget_s + OVERHEAD_S["warmup"] if self.variants[variant].get("_own_warmup") else 0
        return cfg.resampling.time_budget_s + own + OVERHEAD_S["variant"] + warm

    def protocol_per_model(self) -> float:
        a = self.args
        return protocol_seconds(PROTOCOL_S_PER_MODEL, a.prompts, a.protocol_seeds, a.lengths)

    def run(self) -> int:
        book = self.book
        for step, seed, variant in self.plan():
            folder = self.folder(step, seed, variant)
            name = self.protocol_marker() if step == "protocol" else (step if step != "variant" else "resampling")
            if book.done(folder, name):
                continue
            need = self.estimate(step, seed, variant)
            if self.args.dry_run:
                if step == "protocol":  # every model of the comparison, none cached
                    count = len(set(self.protocol_models()[0]) | set(self.variants)) + len(self.ref_paths())
                    need = 20 + count * len(self.args.seeds) * self.protocol_per_model()
                self.sim_used += need
                self.warmed = self.warmed or step in ("warmup", "variant")
                print(f"[plan] {step} seed={seed} variant={variant}: ~{need:.0f} s")
                continue
            run = getattr(self, f"step_{step}")
            code = book.run_step(step, folder, name, need, lambda: run(seed, variant, folder),
                                 label=f"{step} {variant}" if variant else step, seed=seed, variant=variant)
            if code is not None:
                return code
        if self.args.dry_run:
            print(f"[plan] about {self.sim_used:.0f} s (calls of at most {self.args.max_wall:.0f} s)")
            return 0
        return book.all_done()

    # -- steps ---------------------------------------------------------------------------------------------
    def step_teacher(self, seed, variant, folder) -> bool:
        from self_forcing.training.data import make_world
        from self_forcing.training.stages import run_stages

        cfg = self.config(folder, 0, 0.0, [f"teacher.time_budget_s={self.args.teacher_s}"])
        run_stages(cfg, ["teacher"], self.runtime(cfg), make_world(cfg))
        return os.path.isfile(self.teacher_file())

    def step_warmup(self, seed, variant, folder) -> bool:
        cfg = self.config(folder, seed, self.budget(seed))
        return self.train(cfg, ["resampling_warmup"], folder)

    def step_variant(self, seed, variant, folder) -> bool:
        sets, budget = self.variant_sets(variant, seed)
        cfg = self.config(folder, seed, budget, sets)
        own = bool(self.variants[variant].get("_own_warmup"))
        ok = self.train(cfg, ["resampling_warmup", "resampling"] if own else ["resampling"], folder)
        out = os.path.join(self.results, f"seed{seed}", variant)
        if self.args.copy_exports:
            for path in glob.glob(os.path.join(folder, "*_toy.safetensors")):
                shutil.copy(path, out)
        return ok and os.path.isfile(os.path.join(folder, "resampling_forcing_toy.safetensors"))

    def train(self, cfg, stages, folder) -> bool:
        from self_forcing.training.curves import collect
        from self_forcing.training.data import make_world
        from self_forcing.training.stages import run_stages

        world = make_world(cfg)
        self.warm_up(cfg, world)
        for stage in stages:
            if not self.book.done(folder, stage):
                run_stages(cfg, [stage], self.runtime(cfg), world)
                self.book.mark(folder, stage)
        rel = os.path.relpath(folder, self.root)
        out = os.path.join(self.results, rel)
        os.makedirs(out, exist_ok=True)
        write_json(collect(folder), os.path.join(out, "curves.json"))
        return True

    def warm_up(self, cfg, world) -> None:
        """Compile the FlexAttention kernels of the [history | noisy] forward (with and without gradient) once
        per process before any stage's clock runs, so that no model's budget pays for compilation."""
        rt = self.runtime(cfg)
        if self.warmed:
            return
        import torch

        from self_forcing.training.resampling import Layout, history_flow

        c, f, h, w = world.clip_shape
        layout = Layout.of(cfg)

        def forwards(model):
            x = torch.randn(cfg.resampling.batch_size, c, f, h, w, device=rt.device)
            t = torch.full((x.shape[0], f), 500.0, device=rt.device)
            ctx = world.uncond(x.shape[0], rt.device)
            with rt.autocast():
                history_flow(model, x, x, t, ctx, layout).float().mean().backward()
                with torch.no_grad():
                    history_flow(model, x, x, t, ctx, layout)

        self.warmed = compile_once(self.book, rt, cfg.model, forwards)

    def protocol_models(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(every variant trained for all seeds so far -- this call's and earlier calls' --, the references)."""
        a = self.args
        table = variant_table(a.routing_k, self.fpb)
        models = {}
        for name in table:
            paths = [os.path.join(self.seed_dir(s), name, "resampling_forcing_toy.safetensors") for s in a.seeds]
            if all(os.path.isfile(p) for p in paths):
                models[name] = paths
        return models, self.ref_paths()

    def protocol_marker(self) -> str:
        """The protocol is done for one set of models and settings (a new variant makes it run again)."""
        import hashlib

        models, refs = self.protocol_models()
        a = self.args
        names = sorted(set(models) | set(self.variants)) + sorted(refs)
        key = json.dumps([names, a.seeds, a.prompts, a.protocol_seeds, a.lengths, a.batch_size, a.bootstrap])
        return "protocol-" + hashlib.sha1(key.encode()).hexdigest()[:12]

    def step_protocol(self, seed, variant, folder) -> bool:
        from self_forcing.training.protocol import Protocol

        a = self.args
        models, refs = self.protocol_models()
        models.update(refs)
        if not models:
            raise SystemExit("nothing to evaluate: no variant or reference bundle exists")
        pairs = tuple(pairs_for(list(models), list(refs), a.routing_k, self.fpb))
        proto = Protocol(prompts=a.prompts, seeds=tuple(a.protocol_seeds), lengths=tuple(a.lengths),
                         batch_size=a.batch_size, bootstrap=a.bootstrap, paired=pairs)
        return self.book.protocol(models, proto, reserve=20 + self.protocol_per_model())


def main(argv=None, clock=time.time) -> int:
    return Driver(parse_args(argv), clock=clock).run()


if __name__ == "__main__":
    sys.exit(main())
