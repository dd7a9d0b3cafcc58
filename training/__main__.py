"""``python -m self_forcing.training --config training/configs/toy_gpu.toml [--stages ...] [--set k=v ...]``

One process, or several under ``torchrun --nproc_per_node N -m self_forcing.training ...`` (DDP: gloo on
the CPU, nccl on GPUs). Stages: teacher, ode_pairs, ode_init, dmd, eval, export (default: all, in order);
'baselines' adds the teacher_forcing and diffusion_forcing baselines.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m self_forcing.training", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a TOML file, e.g. training/configs/toy_cpu.toml")
    p.add_argument("--stages", default="all",
                   help="'all' (default: teacher,ode_pairs,ode_init,dmd,eval,export), 'baselines' (all of it plus "
                        "teacher_forcing,diffusion_forcing), or a comma-separated subset of those stages")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config value, e.g. --set dmd.steps=50 --set run.out_dir=runs/x (repeatable)")
    p.add_argument("--out-dir", default=None, help="shorthand for --set run.out_dir=PATH")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end each training stage after this many steps without a final checkpoint (as a kill "
                        "would; rerun the same command to resume)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="with the export stage: publish the export to this Hugging Face Hub repo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import load_config
    from .engine import runtime_for, shutdown
    from .stages import resolve_stages, run_stages
    from .data import make_world

    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"run.out_dir={args.out_dir!r}".replace("'", '"'))
    if args.push_to_hub:
        overrides.append(f'export.hub_repo="{args.push_to_hub}"')
    try:
        cfg = load_config(args.config, overrides)
        stages = resolve_stages(args.stages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rt = runtime_for(cfg.run)
    try:
        world = make_world(cfg)
        outputs = run_stages(cfg, stages, rt, world, stop_after=args.stop_after)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(rt)
    if rt.is_main:
        for stage, path in outputs.items():
            print(f"{stage}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
