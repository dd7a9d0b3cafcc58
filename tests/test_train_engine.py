"""Trainer engine: config files, EMA, deterministic sample keys, atomic checkpoints and exact resume."""

import json
import os

import pytest
import torch

from self_forcing.training.config import OdeInitConfig, TeacherConfig, load_config, parse_override
from self_forcing.training.engine import (EMA, JsonlLog, Runtime, atomic_torch_save, read_full_checkpoint,
                                          read_jsonl, sample_indices)
from self_forcing.training.data import RandomWorld as World
from self_forcing.training.stages import resolve_stages, run_stages

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs")
CPU = Runtime(device=torch.device("cpu"))


def tiny_config(out_dir, **tables):
    data = {
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": 1, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 4, "batch_size": 2, "lr": 1e-3},
        "ode_pairs": {"count": 4, "batch_size": 4, "substeps": 1},
        "ode_init": {"steps": 3, "batch_size": 2, "lr": 1e-3},
        "dmd": {"steps": 4, "batch_size": 1, "critic_ratio": 2, "lr": 1e-3, "lr_critic": 1e-3},
    }
    for k, v in tables.items():
        data.setdefault(k, {}).update(v)
    return load_config(data=data)


# -- config --------------------------------------------------------------------------------------------
def test_checked_in_configs_load():
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".toml"))
    assert {"toy_cpu.toml", "toy_gpu.toml", "wan_dmd.toml"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(CONFIGS, name))
        assert cfg.world.frames % cfg.sampling.frames_per_block == 0


def test_config_errors_and_overrides(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dmd]\nstepz = 3\n")
    with pytest.raises(ValueError, match="unknown keys in \\[dmd\\]"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="unknown tables"):
        load_config(data={"dmdd": {}})
    with pytest.raises(ValueError, match="multiple of"):
        load_config(data={"world": {"frames": 7}})
    cfg = load_config(data={}, overrides=["dmd.steps=7", "run.out_dir=/tmp/x", "dmd.betas=[0.5, 0.9]"])
    assert (cfg.dmd.steps, cfg.run.out_dir, cfg.dmd.betas) == (7, "/tmp/x", (0.5, 0.9))
    assert parse_override("model.dim=128") == (["model", "dim"], 128)
    with pytest.raises(ValueError, match="table.key=value"):
        parse_override("nonsense")
    assert resolve_stages("dmd,teacher") == ["teacher", "dmd"]
    with pytest.raises(ValueError, match="unknown stage"):
        resolve_stages("distill")


# -- pieces --------------------------------------------------------------------------------------------
def test_ema_follows_the_formula():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, start=1)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)  # before/at start: copy
    assert torch.equal(ema.shadow["weight"], model.weight.detach())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 2)
    assert torch.allclose(ema.shadow["weight"], 0.9 * (w0 + 1) + 0.1 * (w0 + 2))


def test_ema_warmup_forgets_the_initial_weights():
    """With warm-up the decay n steps after start is min(decay, (1 + n) / (10 + n)); without it a 100-step run
    keeps 0.998**100 = 82 % of the initial weights."""
    plain, warm = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    emas = [EMA(plain, decay=0.998), EMA(warm, decay=0.998, warmup=True)]
    for m in (plain, warm):
        torch.nn.init.zeros_(m.weight)
    for e, m in zip(emas, (plain, warm)):
        e.shadow["weight"].zero_()
        with torch.no_grad():
            m.weight.fill_(1.0)
        for step in range(1, 101):
            e.update(m, step)
    kept_plain = 1 - float(emas[0].shadow["weight"])
    kept_warm = 1 - float(emas[1].shadow["weight"])
    assert abs(kept_plain - 0.998 ** 100) < 1e-5
    expected = 1.0
    for n in range(1, 101):
        expected *= min(0.998, (1 + n) / (10 + n))
    assert abs(kept_warm - expected) < 1e-6 and kept_warm < 0.01


def test_teacher_ema_warms_up_by_default():
    assert TeacherConfig().ema_warmup and not OdeInitConfig().ema_warmup


def test_sample_indices_partition_the_global_batch():
    one = [i for m in range(4) for i in sample_indices(3, m, Runtime(torch.device("cpu")), 2, 4)]
    two = sorted(i for r in range(2) for m in range(2)
                 for i in sample_indices(3, m, Runtime(torch.device("cpu"), rank=r, world_size=2), 2, 2))
    assert one == two == list(range(24, 32))


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    atomic_torch_save({"v": 1}, path)

    def dying_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1


def test_jsonl_log_trims_past_a_resumed_step(tmp_path):
    log = JsonlLog(str(tmp_path / "log.jsonl"), CPU)
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": 1.0 / s})
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # a line cut by a kill
    log.trim(2)
    assert [r["step"] for r in read_jsonl(str(tmp_path / "log.jsonl"))] == [1, 2]


# -- exact resume ----------------------------------------------------------------------------------------
def weights(stage_dir):
    return read_full_checkpoint(str(stage_dir))


@pytest.mark.parametrize("every,kill_at", [(1, 2), (2, 3)])
def test_kill_and_resume_gives_the_same_weights(tmp_path, every, kill_at):
    stages = ["teacher", "ode_pairs", "ode_init", "dmd"]
    full = tiny_config(tmp_path / "full")
    run_stages(full, stages, CPU, World())
    cut = tiny_config(tmp_path / "cut", run={"checkpoint_every": every})
    run_stages(cut, ["teacher"], CPU, World(), stop_after=kill_at)  # killed mid-run
    assert not os.path.exists(tmp_path / "cut" / "teacher.safetensors")
    stray = tmp_path / "cut" / "teacher" / "checkpoint" / "step_000000099"  # a save killed before its meta.pt
    stray.mkdir()
    (stray / "__0_0.distcp").write_bytes(b"half-written")
    run_stages(cut, ["teacher", "ode_pairs", "ode_init"], CPU, World())
    run_stages(cut, ["dmd"], CPU, World(), stop_after=kill_at)
    run_stages(cut, ["dmd"], CPU, World())
    for stage, parts in (("teacher", ["teacher"]), ("ode_init", ["student"]), ("dmd", ["generator", "critic"])):
        a = weights(tmp_path / "full" / stage)
        b = weights(tmp_path / "cut" / stage)
        assert a["step"] == b["step"]
        for part in parts:
            for k, v in a["parts"][part]["model"].items():
                assert torch.equal(v, b["parts"][part]["model"][k]), (stage, part, k)
            assert a["parts"][part]["optimizer"]["state"].keys() == b["parts"][part]["optimizer"]["state"].keys()
    assert not stray.exists()
    log = read_jsonl(str(tmp_path / "cut" / "teacher" / "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # no duplicate lines from the killed run
    with open(tmp_path / "full" / "config.json") as fh:
        assert json.load(fh)["teacher"]["steps"] == 4
