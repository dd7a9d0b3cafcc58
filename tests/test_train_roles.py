"""Model roles with their own paths (``training.roles``, the ``[models]`` table): the critic starts from
``models.critic_init``, never from the real score's file; a real score of another size (a tiny stand-in for
Wan 14B) trains a generator of the 1.3B shape end to end; the deprecated ``world.teacher_path`` alias still
works with a warning; the toy teacher keeps every role."""

import copy
import warnings

import pytest
import torch

from self_forcing.sf_model.checkpoint import load_model, save_model
from self_forcing.training import roles
from self_forcing.training.config import load_config
from self_forcing.training.data import make_world
from self_forcing.training.dmd import DmdTrainer
from self_forcing.training.engine import Runtime
from self_forcing.training.models import build_model
from self_forcing.training.stages import run_stages

CPU = torch.device("cpu")
GEN = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32, "text_len": 16, "freq_dim": 32}
# A real score of its own, bigger shape (the 14B stand-in): another width, head count, depth and FFN.
BIG = {**GEN, "dim": 48, "ffn_dim": 96, "num_heads": 3, "num_layers": 3}


def base(out_dir, **tables):
    data = {"run": {"out_dir": str(out_dir), "progress": False, "log_every": 1, "checkpoint_every": 50},
            "model": GEN, "world": {"size": 8, "frames": 6},
            "dmd": {"steps": 1, "batch_size": 1, "critic_ratio": 1, "lr": 1e-3, "lr_critic": 1e-3}}
    for k, v in tables.items():
        data[k] = {**data.get(k, {}), **v}
    return load_config(data=data)


def save(path, arch: dict, seed: int, role="teacher"):
    cfg = load_config(data={"model": arch}).model
    model = build_model(cfg, seed, CPU)
    with torch.no_grad():  # a non-zero head, so every model predicts something different
        model.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 100))
    save_model(str(path), model, cfg, meta={"role": role})
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(state: dict, model) -> bool:
    sd = model.state_dict()
    return set(sd) == set(state) and all(torch.equal(sd[k].float(), state[k].float()) for k in state)


def capture_trainer(monkeypatch):
    """Record every DmdTrainer built from paths, with its models' starting weights."""
    seen = []
    original = DmdTrainer.from_paths.__func__

    def spy(cls, *args, **kwargs):
        trainer = original(cls, *args, **kwargs)
        seen.append({"trainer": trainer, "critic": copy.deepcopy(trainer.critic.model.state_dict()),
                     "generator": copy.deepcopy(trainer.gen.model.state_dict()),
                     "real": copy.deepcopy(trainer.real.state_dict())})
        return trainer

    monkeypatch.setattr(DmdTrainer, "from_paths", classmethod(spy))
    return seen


def test_the_critic_starts_from_critic_init_not_from_the_real_score(tmp_path, monkeypatch):
    real = save(tmp_path / "real.safetensors", GEN, 1)
    critic = save(tmp_path / "critic.safetensors", GEN, 2)
    gen = save(tmp_path / "gen.safetensors", GEN, 3, role="ode_init")
    cfg = base(tmp_path / "run", models={"real_score": str(tmp_path / "real.safetensors"),
                                         "critic_init": str(tmp_path / "critic.safetensors"),
                                         "generator_init": str(tmp_path / "gen.safetensors")})
    seen = capture_trainer(monkeypatch)
    out = run_stages(cfg, ["dmd"], Runtime(device=CPU), make_world(cfg))
    (built,) = seen
    assert same(critic, load_model(str(tmp_path / "critic.safetensors")).model)  # the files differ ...
    assert not same(real, load_model(str(tmp_path / "critic.safetensors")).model)
    assert built["critic"].keys() == critic.keys()
    assert all(torch.equal(built["critic"][k], critic[k]) for k in critic)  # ... and the critic is critic_init's
    assert not all(torch.equal(built["critic"][k], real[k]) for k in real)
    assert all(torch.equal(built["real"][k], real[k]) for k in real)
    assert all(torch.equal(built["generator"][k], gen[k]) for k in gen)
    trainer = built["trainer"]
    assert trainer.critic.model is not trainer.real
    assert not any(p.requires_grad for p in trainer.real.parameters())
    assert same(real, trainer.real)  # the real score never trains
    assert not same(critic, trainer.critic.model)  # the critic did (one step)
    assert load_model(out["dmd"]).meta["role"] == "self_forcing"


def test_critic_init_defaults_to_the_real_score_only_with_the_generators_architecture(tmp_path):
    save(tmp_path / "real.safetensors", GEN, 1)
    cfg = base(tmp_path / "run", models={"real_score": str(tmp_path / "real.safetensors")})
    assert roles.critic_init_path(cfg) == str(tmp_path / "real.safetensors")
    assert roles.ode_teacher_path(cfg) == str(tmp_path / "real.safetensors")
    save(tmp_path / "big.safetensors", BIG, 1)
    cfg = base(tmp_path / "run", models={"real_score": str(tmp_path / "big.safetensors")})
    with pytest.raises(ValueError, match=r"Set models\.critic_init.*Wan2\.1-T2V-1\.3B"):
        roles.critic_init_path(cfg)
    with pytest.raises(ValueError, match=r"models\.critic_init"):
        roles.ode_teacher_path(cfg)  # the ODE teacher defaults to the critic's start
    # the ode_init stage and the baselines start their students from critic_init: it must fit [model]
    wrong = base(tmp_path / "run", models={"critic_init": str(tmp_path / "big.safetensors")})
    with pytest.raises(ValueError, match="causal student would start from .*big"):
        roles.student_init_path(wrong)
    # a critic_init of the wrong size is refused before anything is loaded
    gen = tmp_path / "gen.safetensors"
    save(gen, GEN, 3)
    with pytest.raises(ValueError, match="the critic would start from .*big"):
        DmdTrainer.from_paths(cfg, Runtime(device=CPU), make_world(cfg), str(gen), str(tmp_path / "big.safetensors"),
                              str(tmp_path / "big.safetensors"))


def test_architecture_is_read_from_the_header_for_any_layout(tmp_path):
    save(tmp_path / "ours.safetensors", BIG, 1)
    assert roles.checkpoint_architecture(str(tmp_path / "ours.safetensors")).dim == 48
    # a file without our metadata (released Wan weights): inferred from key shapes, head_dim 128 assumed
    from safetensors.torch import save_file

    cfg = load_config(data={"model": {**GEN, "dim": 256, "num_heads": 2}}).model
    sd = {f"model.diffusion_model.{k}": v for k, v in build_model(cfg, 0, CPU).state_dict().items()}
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    arch = roles.checkpoint_architecture(str(tmp_path / "comfy.safetensors"))
    assert (arch.dim, arch.num_heads, arch.num_layers, arch.ffn_dim) == (256, 2, 2, 64)


def test_a_bigger_real_score_trains_a_small_generator_end_to_end(tmp_path, monkeypatch):
    """The 14B/1.3B split at tiny size: real score of another shape, critic and generator of [model]'s."""
    real = save(tmp_path / "big.safetensors", BIG, 1)
    critic = save(tmp_path / "critic.safetensors", GEN, 2)
    gen = save(tmp_path / "gen.safetensors", GEN, 3, role="ode_init")
    cfg = base(tmp_path / "run", models={"real_score": str(tmp_path / "big.safetensors"),
                                         "critic_init": str(tmp_path / "critic.safetensors"),
                                         "generator_init": str(tmp_path / "gen.safetensors")})
    seen = capture_trainer(monkeypatch)
    out = run_stages(cfg, ["dmd"], Runtime(device=CPU), make_world(cfg))
    trainer = seen[0]["trainer"]
    assert trainer.real.config.dim == 48 and trainer.real.config.num_layers == 3
    assert trainer.critic.model.config.dim == 32 and trainer.gen.model.config.dim == 32
    assert same(real, trainer.real)
    assert not same(critic, trainer.critic.model) and not same(gen, trainer.gen.model)  # both trained a step
    assert trainer.gen.updates == 1 and trainer.critic.updates == 1
    student = load_model(out["dmd"])
    assert student.config.dim == 32


def test_the_real_score_must_read_the_generators_latents_and_text():
    cfg = base("unused")
    gen, critic = build_model(cfg.model, 0, CPU), build_model(cfg.model, 1, CPU)
    other_text = build_model(cfg.model.replace(text_dim=16), 2, CPU)
    with pytest.raises(ValueError, match="text_dim 16 != 32"):
        DmdTrainer.from_models(cfg, Runtime(device=CPU), make_world(cfg), gen, critic, other_text)
    real = build_model(cfg.model, 3, CPU)
    with pytest.raises(ValueError, match="model of its own"):
        DmdTrainer.from_models(cfg, Runtime(device=CPU), make_world(cfg), gen, real, real)
    big = build_model(load_config(data={"model": BIG}).model, 4, CPU)
    with pytest.raises(ValueError, match="critic .*generator's architecture"):
        DmdTrainer.from_models(cfg, Runtime(device=CPU), make_world(cfg), gen, big, real)
    trainer = DmdTrainer.from_models(cfg, Runtime(device=CPU), make_world(cfg), gen, critic, big)
    assert trainer.critic.model is critic and trainer.real is big and not big.training


def test_frozen_models_are_bf16_on_cuda_and_without_gradient(tmp_path):
    assert roles.frozen_dtype(torch.device("cuda")) == torch.bfloat16
    assert roles.frozen_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert roles.frozen_dtype(CPU) == torch.float32
    save(tmp_path / "real.safetensors", BIG, 1)
    model = roles.load_frozen(str(tmp_path / "real.safetensors"), CPU)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.dim == 48


def test_world_teacher_path_is_a_deprecated_alias_for_wan(tmp_path):
    save(tmp_path / "t.safetensors", GEN, 1)
    cfg = base(tmp_path / "run", world={"kind": "wan", "teacher_path": str(tmp_path / "t.safetensors"),
                                        "generator_path": "released_ode_init.safetensors"})
    with pytest.warns(FutureWarning, match=r"world\.teacher_path is deprecated.*models\.real_score"):
        assert roles.real_score_path(cfg) == str(tmp_path / "t.safetensors")
    with pytest.warns(FutureWarning):
        assert roles.critic_init_path(cfg) == str(tmp_path / "t.safetensors")
    with pytest.warns(FutureWarning, match=r"models\.generator_init"):
        assert roles.generator_init_path(cfg) == "released_ode_init.safetensors"
    # the new keys win over the alias; without either, Wan asks for models.real_score
    cfg = base(tmp_path / "run", world={"kind": "wan", "teacher_path": "old"}, models={"real_score": "new"})
    assert roles.real_score_path(cfg) == "new"
    with pytest.raises(ValueError, match=r"set models\.real_score"):
        roles.real_score_path(base(tmp_path / "run", world={"kind": "wan"}))


def test_the_toy_teacher_plays_every_role_without_warnings(tmp_path):
    cfg = base(tmp_path / "run")
    teacher = str(tmp_path / "run" / "teacher.safetensors")
    assert roles.real_score_path(cfg) == teacher
    assert roles.generator_init_path(cfg) == str(tmp_path / "run" / "ode_init.safetensors")
    (tmp_path / "run").mkdir()
    save(teacher, GEN, 1)
    shared = str(tmp_path / "shared.safetensors")
    save(shared, GEN, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert roles.critic_init_path(cfg) == roles.ode_teacher_path(cfg) == roles.student_init_path(cfg) == teacher
        cfg = base(tmp_path / "run", world={"teacher_path": shared})  # a toy teacher trained elsewhere
        assert roles.real_score_path(cfg) == roles.critic_init_path(cfg) == roles.ode_teacher_path(cfg) == shared


def test_missing_toy_teacher_asks_for_the_teacher_stage(tmp_path):
    cfg = base(tmp_path / "run")
    with pytest.raises(ValueError, match=r"teacher\.safetensors does not exist; run the 'teacher' stage"):
        run_stages(cfg, ["ode_pairs"], Runtime(device=CPU), make_world(cfg))


def test_the_memory_benchmark_runs_the_trainer_at_tiny_size(tmp_path, monkeypatch):
    """benchmarks/train_wan_memory_gpu.py --tiny on the CPU: the real trainer's generator and critic steps
    (counted through DmdTrainer), a bigger real score in the 14b configuration, the JSON written."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_wan_memory_gpu.py"
    spec = importlib.util.spec_from_file_location("train_wan_memory_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    for name in ("generator_step", "critic_step"):
        original = getattr(DmdTrainer, name)

        def spy(self, step, _original=original, _name=name):
            calls.append((_name, step))
            return _original(self, step)

        monkeypatch.setattr(DmdTrainer, name, spy)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "6", "--configs", "14b:plain,1.3b:ac",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    big, small = data["results"]
    for res in (big, small):
        assert res["status"] == "ok" and res["all_losses_finite"]
        assert res["generator"]["steps"] == 2 and res["critic"]["steps"] == 6  # every 5th step: 0 and 5
    assert big["real_score_params"] > small["real_score_params"]
    assert small["checkpointed"] == {"generator": True, "critic": True}
    assert big["checkpointed"] == {"generator": False, "critic": False}
    assert calls[:3] == [("generator_step", 0), ("critic_step", 0), ("critic_step", 1)]
    assert len(calls) == 2 * (2 + 6)
    with pytest.raises(SystemExit, match="bad configuration"):
        bench.main(["--tiny", "--configs", "7b:plain"])


def test_the_memory_benchmark_offloads_the_optimizer_in_its_own_process(tmp_path):
    """The offload configuration (FSDP2 CPUOffloadPolicy in a 1-process group) as the lead runs it: a separate
    process (the group must not outlive it), tiny dims on the CPU."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "offload.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "train_wan_memory_gpu.py"), "--tiny",
                           "--device", "cpu", "--steps", "2", "--configs", "14b:ac+offload", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (res,) = json.loads(out.read_text())["results"]
    assert res["status"] == "ok" and res["all_losses_finite"] and res["optimizer_offload"]
    assert res["offloaded"] == {"generator": True, "critic": True}
    assert res["generator"]["steps"] == 1 and res["critic"]["steps"] == 2


def test_run_activation_checkpointing_reaches_the_trained_models_and_changes_no_number():
    """``run.activation_checkpointing`` (runtime_for -> Trainable) recomputes the generator's and the critic's
    blocks; a DMD generator + critic step then gives the same weights as without it."""
    from self_forcing.training.engine import runtime_for

    results = []
    for ac in (False, True):
        cfg = base("unused", run={"activation_checkpointing": ac})
        rt = runtime_for(cfg.run)
        assert rt.activation_checkpointing is ac
        gen, critic, real = (build_model(cfg.model, s, CPU) for s in (0, 1, 2))
        with torch.no_grad():
            for m in (gen, critic, real):
                m.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
        trainer = DmdTrainer.from_models(cfg, rt, make_world(cfg), gen, critic, real)
        assert gen.activation_checkpointing is ac and critic.activation_checkpointing is ac
        assert not real.activation_checkpointing  # frozen: nothing to recompute
        trainer.step(0)
        results.append([p.detach().clone() for m in (gen, critic) for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
