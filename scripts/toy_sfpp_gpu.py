"""Self-Forcing++ vs Self Forcing on the toy world, on one GPU, in resumable steps that each fit a 10-minute call.

    python scripts/toy_sfpp_gpu.py --baselines-root runs/toy_baselines_full --budget full [--results DIR]
    python scripts/toy_sfpp_gpu.py --baselines-root runs/toy_baselines_fast --budget fast      # 1 seed, 1 call

Input: the folders of the baselines driver (``scripts/toy_baselines_gpu.py``): ``<baselines-root>/teacher/
teacher.safetensors`` (the shared teacher) and per training seed S ``<baselines-root>/seed<S>/`` holding the Self
Forcing run: ``self_forcing.safetensors`` (else its bundle ``self_forcing_toy.safetensors``), ``config.json`` (else
``--base-config`` is used) and, when present, the dmd stage's checkpoint (its critic continues; else the critic
starts from the teacher -- for both models alike).

Steps, in order (each skipped when done; state in ``--root``, default ``runs/toy_sfpp_<budget>``):

1. per seed S (``<root>/seed<S>``): ``continued`` -- plain Self Forcing trained further from its export
   (``sfpp.horizon = 1``: DMD on T-frame rollouts, the "self_forcing_continued" control) -- and ``sfpp`` --
   Self-Forcing++ from the same export (rollouts of ``horizon`` x T frames through the rolling cache, DMD on a
   sampled T-frame window); both for the same ``updates`` generator updates (``updates x critic_ratio`` critic
   steps), same prompts, exit steps and score noise (keyed draws). A call trains a stage for at most the time it
   has left (``sfpp.slice_s``: checkpoint, stop, continue in the next call); each writes its bundle when done;
2. ``protocol`` (``training.protocol``) on self_forcing, self_forcing_continued and sfpp (``--with-baselines``:
   also causal_init, teacher_forcing, diffusion_forcing from the baselines' seed folders) at 1x/5x/10x/20x,
   paired differences sfpp - self_forcing, sfpp - self_forcing_continued, self_forcing_continued - self_forcing.
   It caches each model, so a call that runs out of time leaves the rest to the next call.

Exit code 3: "rerun the same command to continue"; 0: all done. Results (``--results``): ``protocol/``
(results.md, results.json, raw.npz, plots/), ``seed<S>/<name>_compute.json`` (steps, generator updates, loop
and wall seconds of each model) and ``curves.json`` (training logs), ``driver.jsonl``; with ``--copy-exports``
the bundles. Runs on the CPU with tiny sizes for a smoke test (``--set`` overrides, see tests/test_train_sfpp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def importable() -> None:
    """Make the repository importable as ``self_forcing`` (a symlink in a temporary folder), as the shell
    wrappers of the other drivers do."""
    try:
        import self_forcing  # noqa: F401
    except ImportError:
        pkg = tempfile.mkdtemp()
        os.symlink(ROOT, os.path.join(pkg, "self_forcing"))
        sys.path.insert(0, pkg)


importable()
from self_forcing.training.step_driver import StepBook, protocol_seconds, write_json  # noqa: E402

CONFIG = os.path.join(ROOT, "training", "configs", "toy_sfpp.toml")
BASE_CONFIG = os.path.join(ROOT, "training", "configs", "toy_baselines.toml")
MODELS = {"continued": "self_forcing_continued", "sfpp": "sfpp"}
SEED_STEPS = ("continued", "sfpp")

# `fast`: 1 seed, 20 generator updates each, the protocol at 64 prompts: one call (~8 min on an H200, estimated).
# `full`: 3 seeds, 100 generator updates each (the ~100 generator updates of the baselines' full Self Forcing
# run), 128 prompts: several calls.
PRESETS = {
    "fast": {"updates": 20, "horizon": 20, "seeds": [0], "max_wall_s": 570,
             "protocol": {"prompts": 64, "seeds": [0, 1, 2], "lengths": [1, 5, 10, 20], "batch_size": 64,
                          "bootstrap": 1000}},
    "full": {"updates": 100, "horizon": 20, "seeds": [0, 1, 2], "max_wall_s": 560,
             "protocol": {"prompts": 128, "seeds": [0, 1, 2], "lengths": [1, 5, 10, 20], "batch_size": 64,
                          "bootstrap": 2000}},
}
OVERHEAD_S = 15          # loading the models, the export
MIN_SLICE_S = 30         # a call with less training time left than this does not start a training slice
PROTOCOL_S_PER_MODEL = 42  # per (model, training seed) at 64 prompts x 3 seeds x 20x (baselines driver, H200)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baselines-root", required=True, help="the baselines driver's --root (teacher/, seed<S>/)")
    p.add_argument("--budget", choices=sorted(PRESETS), default="fast")
    p.add_argument("--root", default=None, help="run folders (default runs/toy_sfpp_<budget>)")
    p.add_argument("--results", default=None, help="results folder (default <root>/results)")
    p.add_argument("--config", default=CONFIG, help="its [sfpp] table is used")
    p.add_argument("--base-config", default=BASE_CONFIG,
                   help="model/world/sampling when a seed folder has no config.json")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--updates", type=int, default=None, help="generator updates per model (default: preset)")
    p.add_argument("--horizon", type=int, default=None, help="Self-Forcing++ rollout length in training clips")
    p.add_argument("--max-wall", type=float, default=None, help="seconds this call may run (default: preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="extra config overrides for both models")
    p.add_argument("--prompts", type=int, default=None, help="override the preset's protocol prompts")
    p.add_argument("--with-baselines", action="store_true",
                   help="also evaluate causal_init, teacher_forcing and diffusion_forcing of the baselines' folders")
    p.add_argument("--copy-exports", action="store_true", help="copy the two new bundles into --results")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    return p.parse_args(argv)


class Driver:
    """One call. ``clock``: the time source of ``self.book`` (a :class:`StepBook`), which every time decision,
    marker, record and the compute reports' wall seconds read; tests pass a fake one."""

    def __init__(self, args, clock=time.time):
        self.args = args
        self.preset = dict(PRESETS[args.budget])
        for key in ("seeds", "updates", "horizon"):
            if getattr(args, key) is not None:
                self.preset[key] = getattr(args, key)
        if args.prompts is not None:
            self.preset["protocol"] = {**self.preset["protocol"], "prompts": args.prompts}
        self.base = os.path.abspath(args.baselines_root)
        self.root = os.path.abspath(args.root or os.path.join("runs", f"toy_sfpp_{args.budget}"))
        self.results = os.path.abspath(args.results or os.path.join(self.root, "results"))
        self.max_wall = args.max_wall or self.preset["max_wall_s"]
        self.book = StepBook(self.results, self.max_wall, clock)
        self.rt = None
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.results, exist_ok=True)

    # -- inputs ----------------------------------------------------------------------------------------
    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.root, f"seed{seed}")

    def base_dir(self, seed: int) -> str:
        return os.path.join(self.base, f"seed{seed}")

    def teacher_file(self) -> str:
        return os.path.join(self.base, "teacher", "teacher.safetensors")

    def generator_file(self, seed: int) -> str:
        for name in ("self_forcing.safetensors", "self_forcing_toy.safetensors"):
            path = os.path.join(self.base_dir(seed), name)
            if os.path.isfile(path):
                return path
        raise ValueError(f"{self.base_dir(seed)} holds no Self Forcing model (self_forcing.safetensors or "
                         "self_forcing_toy.safetensors): run the baselines driver for this seed first")

    def critic_source(self, seed: int) -> str | None:
        from self_forcing.training.sfpp import has_checkpoint

        folder = os.path.join(self.base_dir(seed), "dmd")
        return folder if has_checkpoint(folder) else None

    def config(self, seed: int, step: str, slice_s: float = 0.0):
        """The Self Forcing run's own model/world/sampling (its config.json), this driver's [sfpp] table."""
        import dataclasses

        from self_forcing.training.config import TrainConfig, load_config

        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        saved = os.path.join(self.base_dir(seed), "config.json")
        if os.path.isfile(saved):
            with open(saved) as fh:
                base = json.load(fh)
        else:
            with open(self.args.base_config, "rb") as fh:
                base = tomllib.load(fh)
        known = {f.name: f.default_factory() for f in dataclasses.fields(TrainConfig)}
        data = {}
        for table, values in base.items():  # keys of another code version are dropped
            if table in known and isinstance(values, dict):
                names = ({f.name for f in dataclasses.fields(known[table])}
                         if dataclasses.is_dataclass(known[table]) else set(values))
                data[table] = {k: v for k, v in values.items() if k in names or table == "model"}
        with open(self.args.config, "rb") as fh:
            sfpp = dict(tomllib.load(fh).get("sfpp", {}))
        critic = self.critic_source(seed)
        sfpp.update(name=MODELS[step], horizon=1 if step == "continued" else int(self.preset["horizon"]),
                    steps=int(self.preset["updates"]) * int(sfpp.get("critic_ratio", 5)),
                    generator_path=self.generator_file(seed), critic_path=critic or "", slice_s=float(slice_s))
        if step == "continued":
            sfpp["sink"] = 0
        data["sfpp"] = sfpp
        data["run"] = {**data.get("run", {}), "out_dir": self.seed_dir(seed), "seed": seed, "progress": False}
        data["world"] = {**data.get("world", {}), "teacher_path": self.teacher_file(), "text_seed": 0}
        data.setdefault("compute", {})["budget_s"] = 0.0
        return load_config(data=data, overrides=self.args.overrides)

    def runtime(self, cfg):
        if self.rt is None:
            from self_forcing.training.engine import init_runtime

            self.rt = init_runtime(cfg.run.device, cfg.run.precision)
        return self.rt

    # -- steps -----------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, int | None]]:
        return [(step, s) for s in self.preset["seeds"] for step in SEED_STEPS] + [("protocol", None)]

    def protocol_per_model(self) -> float:
        p = self.preset["protocol"]
        return protocol_seconds(PROTOCOL_S_PER_MODEL, p["prompts"], p["seeds"], p["lengths"])

    def models(self) -> list[str]:
        names = ["self_forcing", *MODELS.values()]
        return names + (["causal_init", "teacher_forcing", "diffusion_forcing"] if self.args.with_baselines else [])

    def run(self) -> int:
        if not os.path.isfile(self.teacher_file()):
            print(f"error: no shared teacher at {self.teacher_file()}", file=sys.stderr)
            return 2
        book = self.book
        for step, seed in self.plan():
            folder = self.results if step == "protocol" else self.seed_dir(seed)
            if book.done(folder, step):
                continue
            need = 20 + self.protocol_per_model() if step == "protocol" else OVERHEAD_S + MIN_SLICE_S
            if self.args.dry_run:
                print(f"[plan] {step}" + (f" seed {seed}" if seed is not None else "") + f": at least ~{need:.0f} s")
                continue
            code = book.run_step(step, folder, step, need, lambda: (
                self.step_protocol() if step == "protocol" else self.step_train(step, seed)), need_key="need_s",
                seed=seed)
            if code is not None:
                return code
        if self.args.dry_run:
            print(f"[plan] {len(self.preset['seeds'])} seed(s) x 2 models x {self.preset['updates']} generator "
                  f"updates, horizon {self.preset['horizon']}; protocol ~{self.protocol_per_model():.0f} s per "
                  "model and seed")
            return 0
        return book.all_done()

    def step_train(self, step: str, seed: int) -> bool:
        """One slice of a model's training (the time this call has left); True once its bundle exists."""
        from self_forcing.training.baselines import loop_seconds
        from self_forcing.training.curves import collect
        from self_forcing.training.data import make_world
        from self_forcing.training.sfpp import sfpp_export_path
        from self_forcing.training.stages import run_stages

        slice_s = max(1.0, self.book.left() - OVERHEAD_S)
        cfg = self.config(seed, step, slice_s)
        t = self.book.clock()
        out = run_stages(cfg, ["sfpp"], self.runtime(cfg), make_world(cfg))
        name = cfg.sfpp.name
        folder = os.path.join(self.results, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        write_json(collect(cfg.run.out_dir), os.path.join(folder, "curves.json"))
        report_path = os.path.join(folder, f"{name}_compute.json")
        report = _read_json(report_path) or {"wall_s": 0.0}
        report.update(wall_s=round(report["wall_s"] + self.book.clock() - t, 1),
                      generator_updates=self.preset["updates"],
                      critic_steps=cfg.sfpp.steps, horizon=cfg.sfpp.horizon,
                      rollout_frames=cfg.sfpp.horizon * cfg.world.frames, start=cfg.sfpp.generator_path,
                      critic_start=cfg.sfpp.critic_path or "teacher",
                      loop_s=loop_seconds(os.path.join(cfg.run.out_dir, name, "log.jsonl")))
        write_json(report, report_path)
        bundle = sfpp_export_path(cfg)
        if out and self.args.copy_exports:
            shutil.copy(bundle, folder)
        return bool(out) and os.path.isfile(bundle)

    def model_paths(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.models():
            for seed in self.preset["seeds"]:
                folder = self.seed_dir(seed) if name in MODELS.values() else self.base_dir(seed)
                path = os.path.join(folder, f"{name}_toy.safetensors")
                if not os.path.isfile(path):
                    raise ValueError(f"{path} is missing")
                out.setdefault(name, []).append(path)
        return out

    def step_protocol(self) -> bool:
        from self_forcing.training.protocol import Protocol

        p = self.preset["protocol"]
        pairs = (("sfpp", "self_forcing"), ("sfpp", "self_forcing_continued"),
                 ("self_forcing_continued", "self_forcing"))
        proto = Protocol(prompts=p["prompts"], seeds=tuple(p["seeds"]), lengths=tuple(p["lengths"]),
                         batch_size=p["batch_size"], bootstrap=p["bootstrap"], paired=pairs)
        return self.book.protocol(self.model_paths(), proto, reserve=20 + self.protocol_per_model())


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def main(argv=None, clock=time.time) -> int:
    args = parse_args(argv)
    try:
        return Driver(args, clock=clock).run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
