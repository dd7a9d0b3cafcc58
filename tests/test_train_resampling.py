"""Resampling Forcing: the shifted logit-normal simulation timestep, the sparse causal mask (frame i sees the
degraded history of frames < i and itself), the three history simulations against independent references,
no gradient through resampling, the parallel loss == a per-frame KV-cache reference, the stages (resume, budgets,
export) and how an export's metadata drives the sampler."""

import json
import math
import os

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.mask import teacher_forcing_visibility
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.resample import resample_sigmas, self_resample
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk, denoise_chunk
from self_forcing.sf_model.schedule import add_noise, make_steps
from self_forcing.sf_model.window import CachePolicy, trained_attention
from self_forcing.training.baselines import teacher_forcing_flow
from self_forcing.training.config import load_config
from self_forcing.training.data import RandomWorld as World
from self_forcing.training.engine import Runtime, read_jsonl
from self_forcing.training.resampling import (Layout, degrade_history, history_flow, resampling_loss,
                                              shift_timestep, simulation_timesteps)
from self_forcing.training.stages import resolve_stages, run_stages

CPU = Runtime(device=torch.device("cpu"))


def random_model(seed=0):
    """A tiny model with random weights everywhere (the output head included)."""
    torch.manual_seed(seed)
    model = CausalWanModel(TINY, attn_backend="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")) else noise)
    return model.eval()


def inputs(b=2, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, TINY.in_dim, f, 4, 4, generator=g)
    noise = torch.randn(b, TINY.in_dim, f, 4, 4, generator=g)
    ctx = torch.randn(b, 5, TINY.text_dim, generator=g)
    return x0, noise, ctx, g


# -- the simulation timestep ------------------------------------------------------------------------------
def test_shift_formula_and_its_sampling():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timestep(t, 1.0), t)
    assert float(shift_timestep(torch.tensor(0.5), 0.6)) == pytest.approx(0.375)
    assert float(shift_timestep(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    for s in (0.1, 0.6, 3.0):  # monotone, fixes 0 and 1, and s -> 1/s is its inverse
        y = shift_timestep(t, s)
        assert torch.all(y[1:] > y[:-1]) and float(y[0]) == 0 and float(y[-1]) == pytest.approx(1.0)
        assert torch.allclose(shift_timestep(y, 1 / s), t, atol=1e-6)
    normal = torch.distributions.Normal(0.0, 1.0)
    for s in (0.1, 0.6, 3.0):
        draws = simulation_timesteps(40000, s, 0, "test", s)
        assert 0 < float(draws.min()) and float(draws.max()) < 1
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # quantiles of sigmoid(N(0, 1)) pushed through the shift
            expect = float(shift_timestep(torch.sigmoid(normal.icdf(torch.tensor(q))), s))
            assert float(draws.quantile(q)) == pytest.approx(expect, abs=0.01), (s, q)
    mean = {s: float(simulation_timesteps(20000, s, 1, "m").mean()) for s in (0.1, 0.6, 3.0)}
    assert mean[0.1] < 0.2 < mean[0.6] < 0.5 < mean[3.0]  # small s: light degradation; large s: heavy
    assert torch.equal(simulation_timesteps(5, 0.6, 7, "k"), simulation_timesteps(5, 0.6, 7, "k"))  # keyed


# -- the sparse causal mask --------------------------------------------------------------------------------
def test_frame_sees_exactly_the_degraded_history_before_it_and_itself():
    f = 5
    vis = teacher_forcing_visibility(f, 1)  # frame-level: the paper's mask
    for i in range(f):
        row = vis[f + i]
        assert row[:f].nonzero().flatten().tolist() == list(range(i))  # x~ of frames < i
        assert row[f:].nonzero().flatten().tolist() == [i]             # itself, no other noisy frame
    # through the model: perturb one history / noisy frame, see which noisy outputs move
    model = random_model(1)
    x0, noise, ctx, g = inputs(1, f)
    hist = torch.randn(x0.shape, generator=g)
    t = torch.full((1, f), 600.0)
    layout = Layout(frames_per_block=1)
    with torch.no_grad():
        base = history_flow(model, hist, x0, t, ctx, layout)
        for which in ("history", "noisy"):
            for j in range(f):
                h2, x2 = hist.clone(), x0.clone()
                (h2 if which == "history" else x2)[:, :, j] += 1.0
                out = history_flow(model, h2, x2, t, ctx, layout)
                moved = [(out[:, :, i] - base[:, :, i]).abs().max().item() > 1e-6 for i in range(f)]
                assert moved == ([i > j for i in range(f)] if which == "history" else [i == j for i in range(f)])


# -- the degraded history -------------------------------------------------------------------------------------
def reference_resample(model, x0, sigma_s, noise, ctx, fpb, solver, autoregressive, context_noise=0.0):
    """Chunk by chunk with the *full-sequence* block-causal forward (no KV cache): the chunk at the solver's
    levels after its history (the degraded chunks, or the clean ones for parallel) at the commit level."""
    b, _, f, _, _ = x0.shape
    sig = resample_sigmas(sigma_s, noise.shape[0])
    out = x0.clone()
    for start in range(0, f - fpb, fpb):
        part = slice(start, start + fpb)
        prefix = (out if autoregressive else x0)[:, :, :start]
        x = add_noise(x0[:, :, part], noise[0][:, :, part], sig[:, 0].view(b, 1, 1, 1, 1))
        for j in range(sig.shape[1]):
            t = torch.cat([torch.full((b, start), context_noise), (sig[:, j] * 1000)[:, None].expand(b, fpb)], 1)
            flow = model(torch.cat([prefix, x], 2), t, ctx, frames_per_block=fpb)[:, :, start:]
            xh = x - sig[:, j].view(b, 1, 1, 1, 1) * flow
            if j + 1 < sig.shape[1]:
                nxt = xh + flow if solver == "euler" else noise[j + 1][:, :, part]
                x = add_noise(xh, nxt, sig[:, j + 1].view(b, 1, 1, 1, 1))
        out[:, :, part] = xh
    return out


@pytest.mark.parametrize("simulation,solver,fpb", [("autoregressive", "renoise", 2), ("autoregressive", "euler", 1),
                                                   ("parallel", "renoise", 2), ("parallel", "euler", 1)])
def test_resampling_matches_an_independent_reference(simulation, solver, fpb):
    model = random_model(2)
    f = 6
    x0, _, ctx, g = inputs(2, f)
    sigma_s = torch.tensor([0.35, 0.7])
    noise = torch.randn(3, *x0.shape, generator=g)
    with torch.no_grad():
        got = degrade_history(model, x0, sigma_s, noise, ctx, Layout(fpb), simulation, solver)
        ref = reference_resample(model, x0, sigma_s, noise, ctx, fpb, solver, simulation == "autoregressive")
    hist = slice(0, f - fpb)  # the last chunk is never anyone's history
    assert (got[:, :, hist] - ref[:, :, hist]).abs().max() < 2e-5
    assert not torch.allclose(got[:, :, hist], x0[:, :, hist], atol=1e-3)


def test_autoregressive_and_parallel_differ_only_after_the_first_chunk_and_noise_is_just_noise():
    model = random_model(3)
    x0, _, ctx, g = inputs(1, 6)
    sigma_s, noise = torch.tensor([0.5]), torch.randn(2, 1, *x0.shape[1:], generator=g)
    with torch.no_grad():
        ar = degrade_history(model, x0, sigma_s, noise, ctx, Layout(2), "autoregressive")
        par = degrade_history(model, x0, sigma_s, noise, ctx, Layout(2), "parallel")
        na = degrade_history(model, x0, sigma_s, noise, ctx, Layout(2), "noise")
    assert (ar[:, :, :2] - par[:, :, :2]).abs().max() < 2e-5  # chunk 0 has no history either way
    assert (ar[:, :, 2:4] - par[:, :, 2:4]).abs().max() > 1e-3  # AR conditions on x~, parallel on x
    assert torch.allclose(na, add_noise(x0, noise[0], 0.5))


def test_resampling_has_no_gradient():
    model = random_model(4).train().requires_grad_(True)
    x0, noise, ctx, g = inputs(2, 4)
    rnoise = torch.randn(2, *x0.shape, generator=g)
    sigma_s = torch.tensor([0.4, 0.6])
    layout = Layout(2)
    t = torch.full((2, 4), 500.0)
    sigma = t / 1000
    for simulation in ("autoregressive", "parallel", "noise"):
        hist = degrade_history(model, x0, sigma_s, rnoise, ctx, layout, simulation)
        assert not hist.requires_grad and hist.grad_fn is None
        # the same history as a constant gives the same gradient: nothing flows back through resampling
        grads = []
        for h in (hist, hist.clone()):
            model.zero_grad()
            resampling_loss(model, x0, h, noise, sigma, t, ctx, layout).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))


# -- the training loss == per-frame reference -------------------------------------------------------------------
@pytest.mark.parametrize("fpb,topk,window,context_noise", [(1, None, None, 0.0), (2, None, None, 30.0),
                                                           (1, 2, None, 0.0), (2, 1, 4, 0.0)])
def test_training_loss_equals_a_per_frame_kv_cache_reference(fpb, topk, window, context_noise):
    """The parallel loss over [x~ | noisy] == running every noisy chunk against a KV cache of the degraded
    history (committed at context_noise, routed like inference) and averaging the per-frame flow losses."""
    model = random_model(5)
    f = 6
    x0, noise, ctx, g = inputs(2, f, seed=1)
    layout = Layout(fpb, context_noise, window, 0, topk)
    with torch.no_grad():
        hist = degrade_history(model, x0, torch.tensor([0.3, 0.8]), torch.randn(2, *x0.shape, generator=g), ctx,
                               layout, "autoregressive")
        steps = make_steps((1000, 750, 500, 250), 5.0, True)
        chunk_levels = torch.randint(0, 4, (2, f // fpb), generator=g)
        t = torch.tensor([[steps[i].timestep for i in r] for r in chunk_levels.tolist()]).repeat_interleave(fpb, 1)
        sigma = torch.tensor([[steps[i].sigma for i in r] for r in chunk_levels.tolist()]).repeat_interleave(fpb, 1)
        loss = resampling_loss(model, x0, hist, noise, sigma, t, ctx, layout)
        text = model.encode_text(ctx)
        opts = StreamOptions(frames_per_block=fpb, context_noise=context_noise, window=window, routing_topk=topk,
                             extend_positions=window is not None)
        xt = add_noise(x0, noise, sigma[:, None, :, None, None])
        per_frame = []
        for start in range(0, f, fpb):
            cache = model.new_cache(2, 4, window=window or f, key_means=topk is not None)
            for s in range(0, start, fpb):
                commit_chunk(model, text, cache, s, hist[:, :, s:s + fpb], opts)
            part = slice(start, start + fpb)
            v = model.forward_chunk(xt[:, :, part], t[:, part], text, cache, start, routing_topk=topk,
                                    extend_positions=window is not None)
            for i in range(fpb):
                per_frame.append(((noise - x0)[:, :, start + i] - v[:, :, i]).square().mean())
        ref = torch.stack(per_frame).mean()
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, float(ref))
    if topk is None and window is None:  # and the forward itself is teacher forcing's on this history
        with torch.no_grad():
            a = history_flow(model, hist, xt, t, ctx, layout)
            b = teacher_forcing_flow(model, hist, xt, t, ctx, fpb, context_noise)
        assert torch.equal(a, b)


# -- the sampler reads what the export says ----------------------------------------------------------------------------
def test_euler_solver_and_metadata_driven_sampling_options():
    model = random_model(6)
    x0, noise, ctx, _ = inputs(1, 2)
    steps = make_steps((1000, 600, 300), 5.0, True)
    opts = StreamOptions(frames_per_block=2, steps=(1000, 600, 300), solver="euler")
    text = model.encode_text(ctx)
    with torch.no_grad():
        cache = model.new_cache(1, 4, window=2)
        got = denoise_chunk(model, text, cache, 0, [noise, None, None], steps, opts)
        x = noise
        for i, st in enumerate(steps):  # Euler on the flow ODE, then x0 from the last level
            cache = model.new_cache(1, 4, window=2)
            v = model.forward_chunk(x, torch.full((1, 2), st.timestep), text, cache, 0)
            x = x + ((steps[i + 1].sigma if i + 1 < len(steps) else 0.0) - st.sigma) * v
    assert (got - x).abs().max() < 1e-5
    with pytest.raises(ValueError, match="solver"):
        StreamOptions(solver="heun")
    meta = {"steps": [1000, 800, 600, 400, 200], "solver": "euler", "routing_topk": 2, "window": 6, "sink": 1,
            "method": "resampling_forcing"}
    o = StreamOptions.from_meta(meta, CachePolicy.rolling(3, 12))
    assert (o.solver, o.routing_topk, o.window, o.sink, tuple(o.steps)) == ("euler", 2, 6, 0, (1000, 800, 600, 400, 200))
    fixed = trained_attention(meta, CachePolicy.fixed(3))  # a fixed cache becomes the trained window + sink
    assert (fixed.window, fixed.sink, fixed.routing_topk, fixed.extend_positions) == (6, 1, 2, True)
    assert trained_attention(meta, CachePolicy.rolling(3, 12, routing_topk=4)).routing_topk == 4  # caller's k
    assert trained_attention({"routing_topk": 8}, CachePolicy.rolling(3, 6)).routing_topk is None  # k >= window
    assert trained_attention({}, CachePolicy.rolling(3, 12)) == CachePolicy.rolling(3, 12)
    plain = StreamOptions.from_meta({}, CachePolicy.fixed(3))
    assert (plain.solver, plain.routing_topk, plain.window) == ("renoise", None, None)


# -- the stages ---------------------------------------------------------------------------------------------------
def tiny_config(out_dir, **tables):
    data = {
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": 1, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 2, "batch_size": 2, "lr": 1e-3},
        "resampling": {"steps": 4, "warmup_steps": 2, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.5,
                       "resample_steps": 2, "routing_topk": 1, "export": False},
    }
    for k, v in tables.items():
        data.setdefault(k, {}).update(v)
    return load_config(data=data)


def test_stages_resume_after_a_kill_like_an_uninterrupted_run(tmp_path):
    full = tiny_config(tmp_path / "full")
    run_stages(full, ["teacher", "resampling_warmup", "resampling"], CPU, World())
    cut = tiny_config(tmp_path / "cut", run={"checkpoint_every": 2})
    run_stages(cut, ["teacher", "resampling_warmup"], CPU, World())
    run_stages(cut, ["resampling"], CPU, World(), stop_after=3)  # killed after step 3 (checkpoint at 2)
    assert not os.path.exists(tmp_path / "cut" / "resampling_forcing.safetensors")
    run_stages(cut, ["resampling"], CPU, World())
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "resampling_forcing.safetensors"))  # EMA weights: the whole trajectory
    b = load_file(str(tmp_path / "cut" / "resampling_forcing.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())
    warm = load_file(str(tmp_path / "full" / "resampling_warmup.safetensors"))
    assert any(not torch.equal(v, warm[k]) for k, v in a.items())  # it trained on from the warm-up
    log = read_jsonl(str(tmp_path / "cut" / "resampling_forcing" / "log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(0 < r["t_s"] < 1 and r["history_mse"] > 0 and r["loss"] > 0 for r in log)
    warm = read_jsonl(str(tmp_path / "cut" / "resampling_warmup" / "log.jsonl"))
    assert len(warm) == 2 and "t_s" not in warm[0]  # the warm-up is teacher forcing: clean history


def test_stage_names_and_budget_split(tmp_path):
    assert "resampling" not in resolve_stages("baselines") and "resampling" not in resolve_stages(None)
    assert resolve_stages("resampling,resampling_warmup") == ["resampling_warmup", "resampling"]
    cfg = tiny_config(tmp_path, compute={"budget_s": 100.0}, resampling={"warmup_fraction": 0.2})
    assert cfg.resampling.warmup_time_budget_s == pytest.approx(20.0)
    assert cfg.resampling.time_budget_s == pytest.approx(80.0)
    assert cfg.teacher_forcing.time_budget_s == 100.0  # the baselines keep the whole budget each
    for bad in ({"simulation": "replay"}, {"solver": "rk4"}, {"shift_s": 0.0}, {"warmup_fraction": 1.0}):
        with pytest.raises(ValueError):
            tiny_config(tmp_path, resampling=bad)


def test_toy_bundle_of_a_variant_carries_its_sampler_and_compute(tmp_path):
    """Toy world at test size: a teacher, one shared warm-up, a routed resampling variant in another folder
    starting from it; the bundle samples with its own steps, solver and routing k."""
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.sf_model.sampler import generate
    from self_forcing.toy.bundle import encode_prompt, is_toy_bundle
    from self_forcing.training.data import make_world

    base = {"model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 32, "text_len": 16,
                      "freq_dim": 32},
            "world": {"size": 16, "frames": 6, "text_seed": 0}, "teacher": {"steps": 2, "batch_size": 2},
            "resampling": {"steps": 2, "warmup_steps": 2, "batch_size": 2, "resample_steps": 2}}
    warm = load_config(data={**base, "run": {"out_dir": str(tmp_path / "warm"), "progress": False}})
    world = make_world(warm)
    run_stages(warm, ["teacher", "resampling_warmup"], CPU, world)
    variant = load_config(data={**base, "run": {"out_dir": str(tmp_path / "route"), "progress": False},
                                "resampling": {**base["resampling"], "routing_topk": 1, "solver": "euler",
                                               "sample_steps": [1000, 800, 600, 400, 200],
                                               "init_path": str(tmp_path / "warm" / "resampling_warmup.safetensors")}})
    out = run_stages(variant, ["resampling"], CPU, make_world(variant))
    loaded = load_model(out["export_resampling"], dtype=torch.float32)
    meta = loaded.meta
    assert is_toy_bundle(loaded) and os.path.basename(out["export_resampling"]) == "resampling_forcing_toy.safetensors"
    assert (meta["method"], meta["solver"], meta["routing_topk"], meta["steps"]) == \
        ("resampling_forcing", "euler", 1, [1000, 800, 600, 400, 200])
    assert meta["variant"]["simulation"] == "autoregressive" and meta["toy"]["train_frames"] == 6
    stages = meta["compute"]["stages"]
    assert stages["resampling_warmup"]["steps"] == 2 and stages["resampling"]["steps"] == 2
    opts = StreamOptions.from_meta(meta, CachePolicy.rolling(3, 6))
    assert (opts.solver, opts.routing_topk, len(opts.steps)) == ("euler", 1, 5)
    ctx = encode_prompt(loaded, "a red circle bouncing on a black background", "cpu")
    lat = generate(loaded.model, ctx, num_frames=12, height=8, width=8, seed=0, options=opts)
    assert lat.shape == (1, 16, 12, 8, 8) and torch.isfinite(lat).all()
    with open(tmp_path / "route" / "stage_times.jsonl") as fh:
        assert [json.loads(line)["stage"] for line in fh] == ["resampling"]


# -- the GPU driver, at test size on the CPU ----------------------------------------------------------------------
def test_gpu_driver_trains_variants_from_one_warm_up_and_runs_the_protocol(tmp_path, monkeypatch):
    from self_forcing.scripts import toy_resampling_gpu as drv
    from self_forcing.training import protocol, stages
    from self_forcing.training.step_driver import ManualClock

    monkeypatch.setattr(drv, "OVERHEAD_S", {k: 0.5 for k in drv.OVERHEAD_S})
    monkeypatch.setattr(drv, "WARM_UP_S", 5.0)  # never paid on the CPU, so every training step's estimate has it
    monkeypatch.setattr(drv, "PROTOCOL_S_PER_MODEL", 0.01)
    # the driver's clock stands still except when a stage trains: it takes its time budget plus the overhead
    clock, trained = ManualClock(), []
    budget_of = {"teacher": lambda c: (c.teacher.time_budget_s, "teacher"),
                 "resampling_warmup": lambda c: (c.resampling.warmup_time_budget_s, "warmup"),
                 "resampling": lambda c: (c.resampling.time_budget_s, "variant")}

    def timed(cfg, names, *a, real=stages.run_stages, **kw):
        out = real(cfg, names, *a, **kw)
        for name in names:
            budget, overhead = budget_of[name](cfg)
            trained.append((name, budget))
            clock.advance(budget + drv.OVERHEAD_S[overhead])
        return out

    monkeypatch.setattr(stages, "run_stages", timed)

    def stand_in(videos, prompts):
        return {"darkness_error": (videos.float().mean(dim=(1, 3, 4)) + 1).abs().numpy()}

    monkeypatch.setattr(protocol, "default_metrics", lambda: (stand_in, ("darkness_error",)))
    tiny = ['run.device="cpu"', 'run.precision="fp32"', "model.dim=32", "model.ffn_dim=64", "model.num_heads=2",
            "model.num_layers=1", "model.text_dim=32", "model.freq_dim=32", "world.size=16", "world.frames=6",
            "teacher.batch_size=2", "resampling.batch_size=2", "resampling.resample_steps=2", "run.checkpoint_every=5"]
    args = ["--baselines", str(tmp_path / "base"), "--results", str(tmp_path / "res"), "--variants", "rf,rf_noise_aug",
            "--budget-s", "0.8", "--teacher-s", "0.5", "--prompts", "2", "--protocol-seeds", "0", "--lengths", "1", "2",
            "--batch-size", "2", "--bootstrap", "20"] + [a for s in tiny for a in ("--set", s)]
    log_path = str(tmp_path / "res" / "driver.jsonl")

    def call(argv, extra=()):
        return drv.main(argv + list(extra), clock=clock)

    assert call(args, ["--max-wall", "0.2"]) == 3  # not even the teacher (0.5 s + 0.5 s) fits: stop, nothing done
    assert trained == [] and [(r["event"], r["before"], r["estimate_s"]) for r in read_jsonl(log_path)] == [
        ("stopped", "teacher", 1)]
    # 7.5 s: the teacher (1 s of the clock) and the shared warm-up (0.2 + 0.5 s; estimate 5.7 s with the kernels'
    # warm-up) fit; the first variant (0.6 + 0.5 + 5 s) does not fit in the 5.8 s left: stop before it
    assert call(args, ["--max-wall", "7.5"]) == 3
    assert trained == [("teacher", 0.5), ("resampling_warmup", pytest.approx(0.2))]
    log = read_jsonl(log_path)[1:]
    assert [(r["event"], r.get("step"), r.get("finished")) for r in log] == [
        ("step", "teacher", True), ("step", "warmup", True), ("stopped", None, None)]
    assert (log[2]["before"], log[2]["variant"], log[2]["estimate_s"], log[2]["left_s"]) == ("variant", "rf", 6, 6)
    assert log[2]["call_elapsed_s"] == pytest.approx(1.0 + 0.7)
    # the rest with the default 570 s
    assert call(args) == 0
    assert [name for name, _ in trained] == ["teacher", "resampling_warmup", "resampling", "resampling"]
    log = read_jsonl(log_path)
    done = [(r["step"], r["variant"]) for r in log if r.get("event") == "step" and r["finished"]]
    assert done == [("teacher", None), ("warmup", None), ("variant", "rf"), ("variant", "rf_noise_aug"),
                    ("protocol", None)]
    root = tmp_path / "base" / "resampling" / "seed0"
    warm = str(root / "resampling_warmup.safetensors")
    for v, simulation in (("rf", "autoregressive"), ("rf_noise_aug", "noise")):
        meta = json.loads(json.dumps(load_bundle_meta(root / v / "resampling_forcing_toy.safetensors")))
        assert meta["variant"]["simulation"] == simulation
        assert meta["compute"]["stages"]["resampling"]["start"] == warm  # both from the one warm-up
        assert meta["compute"]["budget_s"] == pytest.approx(0.8)  # warm-up 0.2 + resampling 0.6
    res = json.loads((tmp_path / "res" / "protocol" / "results.json").read_text())
    assert sorted(res["models"]) == ["rf", "rf_noise_aug"] and "rf - rf_noise_aug" in res["paired"]
    assert call(args) == 0  # nothing left: a no-op
    assert len([r for r in read_jsonl(log_path) if r.get("event") == "step"]) == 5 and len(trained) == 4
    # a new variant trains from the same warm-up and the protocol runs again with all three
    assert call([a if a != "rf,rf_noise_aug" else "rf_parallel" for a in args]) == 0
    assert trained[4:] == [("resampling", pytest.approx(0.6))]
    res = json.loads((tmp_path / "res" / "protocol" / "results.json").read_text())
    assert sorted(res["models"]) == ["rf", "rf_noise_aug", "rf_parallel"]


def load_bundle_meta(path):
    from self_forcing.sf_model.checkpoint import load_model

    return load_model(str(path), dtype=torch.float32).meta
