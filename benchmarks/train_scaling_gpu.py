"""Self Forcing DMD training over 1, 2, 4 and 8 GPUs with FSDP2: the scaling table and its two checks.

    python benchmarks/train_scaling_gpu.py --out $OUT/scaling                 # every count of --gpus the machine has
    python benchmarks/train_scaling_gpu.py --parts checks --gpus 2 --out $OUT/scaling     # the checks only
    python benchmarks/train_scaling_gpu.py --device cpu --tiny --gpus 1,2 --out /tmp/scaling   # CPU smoke (gloo)

1. ``throughput``, per GPU count k (``torchrun --nproc_per_node k benchmarks/train_parallel_gpu.py``): the official
   configuration -- generator and critic Wan2.1-1.3B trained (float32 master weights, bf16 compute, activation
   checkpointing), real score Wan2.1-14B frozen in bf16 and sharded over the k GPUs, 21 latent frames of 60x104,
   batch 1 per GPU, a generator update every 5th step (``--configs``/``--real-score`` pick others). Reported: peak
   memory per GPU (max over ranks), seconds per generator and per critic step, generator samples/s = k x batch /
   (t_generator + 5 t_critic) (one generator update and the 5 critic updates that go with it), and the scaling
   efficiency samples/s(k) / (k samples/s(1)).
2. ``checks``, per count k > 1, on a small model (the trainer's whole pipeline: teacher, ODE pairs, ODE init, DMD,
   ``training.stages.run_stages`` on random clips; bf16 compute on GPUs):
   - equivalence: k processes with ``grad_accum = 1`` against one process with ``grad_accum = k`` (FSDP2 on a
     1-process group, as ``run.optimizer_offload`` makes it): max and mean |difference| of every trained weight,
     EMA and AdamW moment, against ``--tol`` (a bf16 reduction-order bound; on CPUs the two are bit-identical,
     tests/test_train_distributed.py);
   - resume on another count: the DMD stage killed after half its steps on k processes, resumed on one process to
     the end, against the uninterrupted k-process run (same tolerance).

Writes ``<out>/scaling.json`` (rewritten after every part), the workers' JSON and logs next to it, and prints a
markdown table. A count larger than the GPUs present is skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PARALLEL = os.path.join(HERE, "train_parallel_gpu.py")

WORKER = '''
import json, sys
from self_forcing.training.config import load_config
from self_forcing.training.data import RandomWorld
from self_forcing.training.engine import init_runtime, shutdown
from self_forcing.training.stages import run_stages

args = json.loads(sys.argv[1])
cfg = load_config(data=args["config"])
rt = init_runtime(args["device"], args["precision"], optimizer_offload=args["offload"])
run_stages(cfg, args["stages"], rt, RandomWorld(clip_mean=0.3), stop_after=args["stop_after"])
shutdown(rt)
'''


def launch(nproc: int, argv: list[str], log: str, device: str, timeout: float) -> None:
    """Run a python script in ``nproc`` processes (torchrun for more than one; its output into ``log``)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else []) + argv
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{tail}")


# -- 1. throughput ------------------------------------------------------------------------------------------------

def throughput(k: int, args, out: str) -> dict:
    path = os.path.join(out, f"throughput_{k}gpu.json")
    argv = [PARALLEL, "--configs", args.configs, "--real-score", args.real_score, "--steps", str(args.steps),
            "--device", args.device, "--out", path] + (["--tiny"] if args.tiny else [])
    launch(k, argv, path.replace(".json", ".log"), args.device, args.timeout)
    with open(path) as fh:
        rows = json.load(fh)["results"]
    res = []
    for r in rows:
        g, c = r["generator"]["mean_s"], r["critic"]["mean_s"]
        sps = k * args.batch / (g + 5 * c) if r["status"] == "ok" and g and c else None
        res.append({"config": r["config"], "gpus": k, "status": r["status"],
                    "peak_gb_per_gpu": max(x for x in (r["generator"]["peak_gb"], r["critic"]["peak_gb"], 0.0)
                                           if x is not None) or None,
                    "generator_s": g, "critic_s": c, "samples_per_s": round(sps, 4) if sps else None,
                    "all_losses_finite": r["all_losses_finite"]})
    return {"rows": res, "file": os.path.basename(path)}


def efficiency(table: list[dict]) -> None:
    """Fill ``efficiency`` of each row against the 1-GPU row of the same configuration."""
    base = {r["config"]: r["samples_per_s"] for r in table if r["gpus"] == 1 and r["samples_per_s"]}
    for r in table:
        b = base.get(r["config"])
        r["efficiency"] = round(r["samples_per_s"] / (r["gpus"] * b), 3) if b and r["samples_per_s"] else None


# -- 2. checks ----------------------------------------------------------------------------------------------------

def small_config(out_dir: str, accum: int, tiny: bool, device: str, every: int = 100) -> dict:
    dims = ({"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4, "freq_dim": 32}
            if tiny else {"dim": 256, "ffn_dim": 1024, "num_heads": 2, "num_layers": 4, "text_dim": 64,
                          "text_len": 16, "freq_dim": 256})
    opt = {"batch_size": 1, "grad_accum": accum, "lr": 1e-3, "ema_decay": 0.5}
    return {"run": {"out_dir": out_dir, "progress": False, "checkpoint_every": every, "log_every": 1,
                    "device": device},
            "model": dims, "world": {"frames": 6},
            "teacher": {"steps": 3, **opt}, "ode_pairs": {"count": 4, "batch_size": 2, "substeps": 1},
            "ode_init": {"steps": 2, **opt}, "dmd": {"steps": 4, "critic_ratio": 2, "lr_critic": 1e-3, **opt}}


def run_stages_in(nproc: int, out_dir: str, accum: int, args, stages, *, offload=False, stop_after=None,
                  every=100) -> str:
    script = os.path.join(os.path.dirname(out_dir), "stages_worker.py")
    with open(script, "w") as fh:
        fh.write(WORKER)
    precision = "bf16" if args.device == "cuda" else "fp32"
    spec = {"config": small_config(out_dir, accum, args.tiny, args.device, every), "stages": stages,
            "offload": offload, "stop_after": stop_after, "device": args.device, "precision": precision}
    launch(nproc, [script, json.dumps(spec)], out_dir + ".log", args.device, args.timeout)
    return out_dir


def difference(a_dir: str, b_dir: str, stage: str, part: str, part_b: str | None = None) -> dict:
    """Max and mean |a - b| over the trained weights, EMA and AdamW first moments of one part of a stage
    (``part_b``: another part of ``b_dir`` of the same architecture, e.g. the critic against the generator)."""
    import torch

    from self_forcing.training.engine import read_full_checkpoint

    a, b = read_full_checkpoint(os.path.join(a_dir, stage)), read_full_checkpoint(os.path.join(b_dir, stage))
    pa, pb = a["parts"][part], b["parts"][part_b or part]
    groups = [(pa["model"], pb["model"])]
    if pa.get("ema") and pb.get("ema"):
        groups.append((pa["ema"]["shadow"], pb["ema"]["shadow"]))
    groups.append(({k: v["exp_avg"] for k, v in pa["optimizer"]["state"].items()},
                   {k: v["exp_avg"] for k, v in pb["optimizer"]["state"].items()}))
    if a["step"] != b["step"] or any(x.keys() != y.keys() for x, y in groups):
        return {"comparable": False, "steps": [a["step"], b["step"]]}
    d = torch.cat([(x[k].float() - y[k].float()).abs().flatten() for x, y in groups for k in x])
    return {"comparable": True, "step": a["step"], "tensors": sum(len(x) for x, _ in groups),
            "max": float(d.max()), "mean": float(d.mean())}


def checks(k: int, args, out: str) -> dict:
    root = os.path.join(out, f"checks_{k}gpu")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    full = ["teacher", "ode_pairs", "ode_init", "dmd"]
    many = run_stages_in(k, os.path.join(root, "many"), 1, args, full)
    one = run_stages_in(1, os.path.join(root, "one"), k, args, full, offload=True)
    parts = (("teacher", "teacher"), ("ode_init", "student"), ("dmd", "generator"), ("dmd", "critic"))
    same = {f"{s}/{p}": difference(many, one, s, p) for s, p in parts}
    cut = os.path.join(root, "cut")
    os.makedirs(cut)
    for name in ("teacher.safetensors", "ode_init.safetensors"):
        shutil.copy(os.path.join(many, name), os.path.join(cut, name))
    run_stages_in(k, cut, 1, args, ["dmd"], stop_after=2, every=1)
    run_stages_in(1, cut, k, args, ["dmd"], offload=True, every=1)
    resumed = {f"dmd/{p}": difference(many, cut, "dmd", p) for p in ("generator", "critic")}

    def verdict(rows):
        return all(r["comparable"] and r["max"] <= args.tol for r in rows.values())

    return {"gpus": k, "equivalence": same, "equivalence_ok": verdict(same), "resume_k_to_1": resumed,
            "resume_ok": verdict(resumed), "tol": args.tol}


# -- driver -------------------------------------------------------------------------------------------------------

def available(device: str) -> int:
    if device == "cpu":
        return 64
    import torch

    return torch.cuda.device_count()


def markdown(result: dict) -> str:
    lines = ["| GPUs | configuration | peak GB per GPU | generator step s | critic step s | samples/s | efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['gpus']} | {r['config']} | {r['peak_gb_per_gpu']} | {r['generator_s']} | "
                     f"{r['critic_s']} | {r['samples_per_s']} | {r['efficiency']} |"
                     if r["status"] == "ok" else f"| {r['gpus']} | {r['config']} | {r['status']} | | | | |")
    for c in result["checks"]:
        eq = max((v.get("max", float("nan")) for v in c["equivalence"].values()), default=None)
        rs = max((v.get("max", float("nan")) for v in c["resume_k_to_1"].values()), default=None)
        lines.append(f"\n{c['gpus']} GPUs == 1 GPU with accumulation {c['gpus']}: max |dw| {eq:.2e} "
                     f"({'ok' if c['equivalence_ok'] else 'FAILED'}); saved on {c['gpus']}, resumed on 1: max |dw| "
                     f"{rs:.2e} ({'ok' if c['resume_ok'] else 'FAILED'}); tolerance {c['tol']}")
    if result["skipped"]:
        lines.append(f"\nnot run (more GPUs than present): {result['skipped']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4,8", help="GPU (process) counts")
    ap.add_argument("--parts", default="throughput,checks", help="throughput, checks or both")
    ap.add_argument("--configs", default="wan:fsdp+ac+shardreal", help="for train_parallel_gpu.py")
    ap.add_argument("--real-score", default="14b", choices=("14b", "1.3b"))
    ap.add_argument("--steps", type=int, default=10, help="DMD steps per throughput run (generator every 5th)")
    ap.add_argument("--batch", type=int, default=1, help="batch per GPU (train_parallel_gpu.py runs 1)")
    ap.add_argument("--tol", type=float, default=2e-3, help="max |dw| allowed by the checks")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per launched run")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sf_scaling"))
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"throughput", "checks"}:
        raise SystemExit(f"--parts takes throughput and/or checks, got {args.parts!r}")
    counts = sorted({int(v) for v in args.gpus.split(",") if v.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit(f"--gpus needs positive counts, got {args.gpus!r}")
    os.makedirs(args.out, exist_ok=True)
    have = available(args.device)
    result = {"settings": vars(args), "gpus_present": have, "throughput": [], "checks": [],
              "skipped": [k for k in counts if k > have]}
    path = os.path.join(args.out, "scaling.json")

    def save():
        with open(path + ".tmp", "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(path + ".tmp", path)

    for k in (k for k in counts if k <= have):
        if "throughput" in parts:
            result["throughput"] += throughput(k, args, args.out)["rows"]
            efficiency(result["throughput"])
            save()
        if "checks" in parts and k > 1:
            result["checks"].append(checks(k, args, args.out))
            save()
    save()
    print(markdown(result), flush=True)
    ok = all(c["equivalence_ok"] and c["resume_ok"] for c in result["checks"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
