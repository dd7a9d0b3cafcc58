"""GRPO stage (Self-Forcing++ section 3.3): the recorded rollout is the sampler's stream, its log-probabilities are
the Gaussian formula and come back under a replay with unchanged weights, group-normalised advantages, the clipped
objective's zero gradient outside the trust region, the toy reward's ordering, and the stage itself."""

import json
import os

import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk, stream
from self_forcing.sf_model.schedule import make_steps
from self_forcing.sf_model.window import CachePolicy
from self_forcing.training.engine import Runtime
from self_forcing.training.grpo import (clipped_objective, gaussian_logp, group_advantages, new_cache,
                                        record_rollout, reward_terms, toy_rewards, transition_logps)
from self_forcing.training.models import build_model, save_dit

CPU = Runtime(device=torch.device("cpu"))
C, H, W = 16, 4, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(seed=0):
    model = build_model(TINY, seed, torch.device("cpu"))
    with torch.no_grad():  # a non-zero head so the prediction depends on the weights
        model.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def context(batch=1, seed=0):
    return torch.randn(batch, 5, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def sampler_noise(seed):
    def noise_for(chunk, frames, count):
        return chunk_noise(seed, chunk, count, (1, C, frames, H, W), "cpu")
    return noise_for


def record(model, opts, frames=24, seed=7):
    steps = make_steps(opts.steps, opts.shift, opts.warp)
    with torch.no_grad():
        text = model.encode_text(context())
    ro = record_rollout(model, text, frames=frames, batch=1, latent_shape=(C, H, W), steps=steps, opts=opts,
                        noise_for=sampler_noise(seed), cache_dtype=torch.float32)
    return ro, text, steps


def replay_logps(model, text, ro, opts):
    """Each chunk's transition log-probabilities under ``model``, the cache rebuilt from the recorded chunks."""
    cache = new_cache(model, 1, (C, H, W), opts, 24, torch.float32)
    out = []
    for ch in ro.chunks:
        out.append(transition_logps(model, text, cache, ch, ro.steps, opts, grad=False)[0])
        commit_chunk(model, text, cache, ch.start, ch.x0, opts)
    return out


def test_recorded_rollout_is_the_samplers_stream_and_its_logps_the_gaussian_formula():
    """24 frames through a rolling cache of 6 + sink 3: the recorded video is ``sampler.stream``'s with the same
    seed; states/actions chain (x_{t_{k+1}} of one transition is the next one's state, x_{t_0} the chunk's
    noise); each log-probability is -mean((a - (1 - s) x0_k)^2) / (2 s^2) with the stream's own x0_k."""
    model = make_model()
    opts = StreamOptions.from_policy(CachePolicy.rolling(3, 6, 3))
    preds = {}
    with torch.no_grad():
        ref = torch.cat([c.latents for c in stream(
            model, context(), num_frames=24, height=H, width=W, seed=7, options=opts,
            on_step=lambda e: preds.__setitem__((e.chunk_index, e.step_index), e.x0.clone()))], dim=2)
    ro, _, steps = record(model, opts)
    assert torch.equal(ro.latents, ref)
    assert len(ro.chunks) == 8 and len(steps) == 4
    for ci, ch in enumerate(ro.chunks):
        noise = sampler_noise(7)(ci, 3, 4)
        assert torch.equal(ch.states[0], noise[0]) and ch.states.shape[0] == ch.actions.shape[0] == 3
        assert torch.equal(ch.states[1:], ch.actions[:-1])
        for k in range(3):
            s = steps[k + 1].sigma
            a = ch.actions[k]
            assert torch.allclose(a, (1 - s) * preds[ci, k] + s * noise[k + 1], atol=1e-6)
            by_hand = -((a - (1 - s) * preds[ci, k]) ** 2).mean() / (2 * s * s)
            assert torch.allclose(ch.logp_old[k, 0], by_hand, rtol=1e-5, atol=1e-6)
            # a - mu = s eps: the old log-probability is -mean(eps^2) / 2 up to rounding
            assert abs(float(ch.logp_old[k, 0]) + float((noise[k + 1] ** 2).mean()) / 2) < 1e-3


def test_replay_with_unchanged_weights_gives_the_old_logps_back():
    model = make_model()
    opts = StreamOptions.from_policy(CachePolicy.rolling(3, 6, 3))
    ro, text, _ = record(model, opts)
    with torch.no_grad():
        same = replay_logps(model, text, ro, opts)
        for ch, lp in zip(ro.chunks, same):
            assert torch.allclose(torch.exp(lp - ch.logp_old), torch.ones_like(lp), atol=1e-5)
        other = make_model(seed=3)  # other weights: the ratio leaves 1 (the check can fail)
        moved = replay_logps(other, other.encode_text(context()), ro, opts)
    assert max(float((torch.exp(lp - ch.logp_old) - 1).abs().max()) for ch, lp in zip(ro.chunks, moved)) > 1e-3


def test_gaussian_logp_is_the_per_element_mean():
    a, mu = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    got = gaussian_logp(a, mu, 0.5)
    assert torch.allclose(got, -((a - mu) ** 2).flatten(1).mean(1) / 0.5)


def test_advantages_are_group_normalised():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, -5.0, 0.0, 7.0])
    a = group_advantages(r, 3).view(3, 3)
    assert torch.allclose(a.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[0], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(3))  # a group of equal rewards teaches nothing
    assert a[2].argmax() == 2 and a[2].argmin() == 0


def test_clipped_objective_has_no_gradient_past_the_clip_on_the_favoured_side():
    eps = 0.2
    old = torch.zeros(2, 1)

    def grad(log_rho, adv):
        logp = torch.full((2, 1), log_rho, requires_grad=True)
        clipped_objective(logp, old, torch.tensor([adv]), eps).backward()
        return float(logp.grad.abs().sum())

    import math
    assert grad(math.log(1.5), 1.0) == 0.0      # A > 0, rho > 1 + eps: clipped, no push further
    assert grad(math.log(0.5), -1.0) == 0.0     # A < 0, rho < 1 - eps
    assert grad(math.log(1.1), 1.0) > 0         # inside the trust region
    assert grad(math.log(0.9), -1.0) > 0
    assert grad(math.log(0.5), 1.0) > 0         # outside, on the side the advantage does not favour: still pulled
    assert grad(math.log(1.5), -1.0) > 0
    # the value at rho = 1 is -mean(A)
    assert float(clipped_objective(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([2.0, 4.0]), eps)) == -3.0


def test_reward_prefers_the_worlds_own_video_to_a_frozen_and_a_shuffled_copy():
    from self_forcing.toy.world import render_batch
    from self_forcing.training.data import toy_scene

    items = [toy_scene(0, "grpo", i) for i in range(3)]
    video = render_batch([s for s, _ in items], [t for _, t in items], 12, 16)
    prompts = [s.prompt for s, _ in items]
    frozen = video[:, :, :1].expand_as(video)
    shuffled = video[:, :, torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    r, rf, rs = (toy_rewards(v, prompts) for v in (video, frozen, shuffled))
    assert (r > rf).all() and (r > rs).all()
    assert (reward_terms(frozen, prompts)["motion_error"] == 1).all()
    assert all(map(lambda x: x.shape == (3,) and (x == x).all(), reward_terms(video, prompts).values()))


# -- the stage -------------------------------------------------------------------------------------------------
def toy_cpu_cfg(tmp_path, **grpo):
    from self_forcing.training.config import load_config

    return load_config(os.path.join(ROOT, "training", "configs", "toy_cpu.toml"), data={
        "run": {"out_dir": str(tmp_path / "run"), "progress": False, "log_every": 1},
        "world": {"teacher_path": str(tmp_path / "teacher.safetensors")},
        "export": {"path": str(tmp_path / "export" / "self_forcing_toy.safetensors")},
        "grpo": {"generator_path": str(tmp_path / "gen.safetensors"), **grpo}})


def load_config_with(cfg, **run):
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run))


def test_stage_trains_resumes_and_exports_its_cache(tmp_path):
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.toy.bundle import is_toy_bundle
    from self_forcing.training.data import make_world
    from self_forcing.training.stages import run_stages

    cfg = toy_cpu_cfg(tmp_path, steps=3)
    cfg = load_config_with(cfg, checkpoint_every=1)
    gen = build_model(cfg.model, 2, torch.device("cpu"))
    with torch.no_grad():
        gen.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    save_dit(str(tmp_path / "gen.safetensors"), gen, cfg.model, "test", {"frames_per_block": 3, "sink": 3})
    world = make_world(cfg)
    # killed after two steps (checkpoint at step 1 only): no output; the rerun continues from step 1
    assert run_stages(cfg, ["grpo"], CPU, world, stop_after=2) == {}
    assert not os.path.exists(tmp_path / "run" / "grpo.safetensors")
    out = run_stages(cfg, ["grpo"], CPU, world)
    assert set(out) == {"grpo", "export_grpo"}
    log = [json.loads(line) for line in open(tmp_path / "run" / "grpo" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert all(map(lambda v: v == v and abs(v) < 1e6, (r["loss"], r["reward"], r["grad_norm"])))
        assert abs(r["ratio"] - 1) < 1e-4  # one update per rollout batch: the replay is the rollout's policy
    start = gen.state_dict()
    trained = load_model(out["grpo"]).model.state_dict()
    assert any(not torch.allclose(trained[k], start[k]) for k in start)
    meta = load_model(out["export_grpo"]).meta
    assert is_toy_bundle(load_model(out["export_grpo"])) and meta["role"] == "grpo"
    assert meta["train_frames"] == 6 and meta["sink"] == 3 and meta["grpo"]["rollout_frames"] == 6 * cfg.grpo.horizon
    assert meta["grpo"]["steps"] == 3 and meta["grpo"]["start"] == str(tmp_path / "gen.safetensors")
    mtime = os.path.getmtime(out["grpo"])
    again = run_stages(cfg, ["grpo"], CPU, world)  # rerun: nothing left to train, the same weights
    assert again == out and os.path.getmtime(out["grpo"]) >= mtime
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "grpo" / "log.jsonl")] == [1, 2, 3]
    b = load_model(out["grpo"]).model.state_dict()
    assert all(torch.equal(trained[k], b[k]) for k in trained)
    # the resumed run trained the weights of an uninterrupted one
    os.makedirs(tmp_path / "x")
    save_dit(str(tmp_path / "x" / "gen.safetensors"), gen, cfg.model, "test", {"frames_per_block": 3, "sink": 3})
    whole = run_stages(toy_cpu_cfg(tmp_path / "x", steps=3), ["grpo"], CPU, world)
    c = load_model(whole["grpo"]).model.state_dict()
    assert all(torch.allclose(trained[k], c[k], atol=1e-6) for k in trained)


def test_wan_world_and_deterministic_solver_are_refused(tmp_path):
    import pytest

    from self_forcing.training.grpo import GrpoTrainer, check_policy

    cfg = toy_cpu_cfg(tmp_path)

    class Wan:
        kind = "wan"

    with pytest.raises(ValueError, match="toy world"):
        GrpoTrainer(cfg, CPU, Wan(), build_model(cfg.model, 0, torch.device("cpu")))
    with pytest.raises(ValueError, match="stochastic"):
        check_policy(make_steps((1000, 500), 5.0, True), StreamOptions(solver="euler"))


def test_reference_kl_starts_at_zero_and_a_second_inner_update_moves_the_ratio(tmp_path):
    """beta > 0: the frozen reference (the start weights) replays on its own cache; KL is 0 before any update and
    > 0 after one; with two inner updates the second sees rho != 1 (logp_old stays the rollout's)."""
    import copy

    from self_forcing.training.data import make_world
    from self_forcing.training.grpo import GrpoTrainer

    cfg = toy_cpu_cfg(tmp_path, beta=0.1, lr=1e-3)
    world = make_world(cfg)
    gen = build_model(cfg.model, 2, torch.device("cpu"))
    with torch.no_grad():
        gen.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(gen).eval().requires_grad_(False)
    trainer = GrpoTrainer(cfg, CPU, world, gen, ref, {"sink": 0})
    ro, cond, rewards, adv = trainer.rollout(0)
    assert ro.latents.shape[2] == 6 * cfg.grpo.horizon and torch.allclose(adv.view(-1, 2).sum(1), torch.zeros(1),
                                                                          atol=1e-5)
    first = trainer.update(ro, cond, adv)
    assert float(first["kl"]) < 1e-10 and abs(float(first["ratio"]) - 1) < 1e-5
    second = trainer.update(ro, cond, adv)
    assert float(second["kl"]) > 0 and abs(float(second["ratio"]) - 1) > 1e-6
