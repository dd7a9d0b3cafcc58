"""Two CPU processes under torchrun (gloo, DDP) train exactly what one process trains with gradient
accumulation: teacher, ODE pairs (sharded), ODE init and Self Forcing DMD (rollouts through DDP)."""

import json
import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from self_forcing.training.config import load_config
    from self_forcing.training.engine import init_runtime, shutdown
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.stages import run_stages

    cfg = load_config(data=json.loads(sys.argv[1]))
    rt = init_runtime("cpu")
    run_stages(cfg, ["teacher", "ode_pairs", "ode_init", "dmd"], rt, RandomWorld(clip_mean=0.3))
    shutdown(rt)
''')


def config(out_dir, batch, accum):
    opt = {"batch_size": batch, "grad_accum": accum, "lr": 1e-3, "ema_decay": 0.5}
    return {
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": 100, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 3, **opt},
        "ode_pairs": {"count": 4, "batch_size": 2, "substeps": 1},
        "ode_init": {"steps": 2, **opt},
        "dmd": {"steps": 3, "critic_ratio": 2, "lr_critic": 1e-3, **opt},
    }


def run(tmp_path, name, nproc, batch, accum):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / name
    cfg = json.dumps(config(out, batch, accum))
    if nproc == 1:
        cmd = [sys.executable, str(script), cfg]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), str(script), cfg]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def live_weights(out, stage):
    state = torch.load(out / stage / "checkpoint.pt", map_location="cpu", weights_only=False)
    return state["step"], state["parts"]


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    one = run(tmp_path, "one", 1, batch=1, accum=2)
    two = run(tmp_path, "two", 2, batch=1, accum=1)
    for stage, part in (("teacher", "teacher"), ("ode_init", "student"), ("dmd", "generator"), ("dmd", "critic")):
        s1, p1 = live_weights(one, stage)
        s2, p2 = live_weights(two, stage)
        assert s1 == s2
        w1, w2 = p1[part]["model"], p2[part]["model"]
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), (stage, part, k)
        if "ema" in p1[part]:
            for k, v in p1[part]["ema"]["shadow"].items():
                assert torch.allclose(v, p2[part]["ema"]["shadow"][k], rtol=1e-4, atol=1e-6), (stage, "ema", k)
    # the pairs were generated in two shards and read back in the same order
    a = torch.load(one / "ode_pairs" / "rank0.pt", weights_only=True)
    b = [torch.load(two / "ode_pairs" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    merged = torch.cat([x["trajectories"] for x in b])[torch.argsort(torch.cat([x["indices"] for x in b]))]
    assert torch.allclose(a["trajectories"].float(), merged.float(), atol=2e-3)
    # and DMD moved the generator away from its ODE-init start
    from self_forcing.sf_model.checkpoint import load_model

    start = load_model(str(one / "ode_init.safetensors")).model.state_dict()
    _, p1 = live_weights(one, "dmd")
    assert max(float((p1["generator"]["model"][k] - start[k]).abs().max()) for k in start) > 1e-4
