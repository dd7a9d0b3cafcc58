"""Teacher forcing and diffusion forcing baselines: the [clean | noisy] mask against a brute-force reference,
the parallel teacher-forcing forward against running each chunk through a clean-history KV cache, diffusion
forcing's independent noise levels, resumable stages, equal-compute budgets and the exported bundles."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.mask import (frame_visibility, teacher_forcing_positions, teacher_forcing_visibility,
                                        visibility_mask)
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk
from self_forcing.sf_model.schedule import add_noise, make_steps
from self_forcing.training.baselines import (DIFFUSION_FORCING, TEACHER_FORCING, diffusion_forcing_loss,
                                             draw_levels, frame_levels, level_table, loop_seconds,
                                             teacher_forcing_flow, teacher_forcing_loss)
from self_forcing.training.config import load_config
from self_forcing.training.data import RandomWorld as World
from self_forcing.training.engine import Runtime, read_jsonl
from self_forcing.training.stages import resolve_stages, run_stages
from self_forcing.training.step_driver import ManualClock

CPU = Runtime(device=torch.device("cpu"))


def random_model(seed=0):
    """A tiny model with random (non-zero) weights everywhere, the output head included."""
    torch.manual_seed(seed)
    return CausalWanModel(TINY, attn_backend="sdpa").eval()


# -- the mask ------------------------------------------------------------------------------------------
def brute_force_tf(f, fpb, window=None, sink=0):
    """The rule spelled out frame pair by frame pair: [history | noisy]."""
    vis = torch.zeros(2 * f, 2 * f, dtype=torch.bool)
    for q in range(2 * f):
        for k in range(2 * f):
            qn, qf = q >= f, q % f
            kn, kf = k >= f, k % f
            qc, kc = qf // fpb, kf // fpb
            end = min((qc + 1) * fpb, f)
            in_window = window is None or kf >= end - window or kf < sink
            if not qn:       # history: block-causal among history frames, never a noisy frame
                vis[q, k] = (not kn) and kc <= qc and in_window
            elif kn:         # noisy -> noisy: its own chunk only
                vis[q, k] = kc == qc
            else:            # noisy -> history: strictly earlier chunks only
                vis[q, k] = kc < qc and in_window
    return vis


@pytest.mark.parametrize("f,fpb,window,sink", [(6, 3, None, 0), (12, 3, None, 0), (8, 2, None, 0), (5, 1, None, 0),
                                               (7, 3, None, 0), (12, 3, 6, 0), (12, 3, 6, 3), (9, 3, 3, 0)])
def test_teacher_forcing_mask_matches_brute_force(f, fpb, window, sink):
    vis = teacher_forcing_visibility(f, fpb, window, sink)
    assert torch.equal(vis, brute_force_tf(f, fpb, window, sink))
    # the history block is the ordinary block-causal mask; nothing of history sees a noisy frame
    assert torch.equal(vis[:f, :f], frame_visibility(f, fpb, window, sink)) and not vis[:f, f:].any()
    assert teacher_forcing_positions(f) == list(range(f)) * 2
    dense = visibility_mask(vis, 4, torch.device("cpu"), use_flex=False)
    assert dense.shape == (8 * f, 8 * f) and torch.equal(dense[::4, ::4], vis)


def test_noisy_chunk_depends_only_on_earlier_clean_chunks_and_itself():
    """Functional check through the model: perturbing any frame a noisy chunk must not see leaves its output
    unchanged; perturbing one it sees changes it."""
    model = random_model(1)
    b, c, f, h, w, fpb = 1, TINY.in_dim, 6, 4, 4, 3
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(b, c, f, h, w, generator=g), torch.randn(b, c, f, h, w, generator=g)
    t = torch.full((b, f), 700.0)
    ctx = torch.randn(b, 5, TINY.text_dim, generator=g)
    with torch.no_grad():
        base = teacher_forcing_flow(model, x0, xt, t, ctx, fpb)
        for which, frame in (("clean", 0), ("clean", 4), ("noisy", 1), ("noisy", 5)):
            x0p, xtp = x0.clone(), xt.clone()
            (x0p if which == "clean" else xtp)[:, :, frame] += 1.0
            out = teacher_forcing_flow(model, x0p, xtp, t, ctx, fpb)
            changed = [(out[:, :, i] - base[:, :, i]).abs().max().item() > 1e-6 for i in range(f)]
            chunk = frame // fpb
            if which == "clean":  # clean chunk j is seen by noisy chunks > j only
                expect = [i // fpb > chunk for i in range(f)]
            else:                 # a noisy frame is seen by its own chunk only
                expect = [i // fpb == chunk for i in range(f)]
            assert changed == expect, (which, frame, changed)


# -- teacher forcing == per-chunk sampling against a clean-history cache -----------------------------------
@pytest.mark.parametrize("context_noise,window", [(0.0, None), (40.0, None), (0.0, 6)])
def test_teacher_forcing_equals_per_chunk_kv_cache_reference(context_noise, window):
    model = random_model(2)
    b, c, f, h, w, fpb = 2, TINY.in_dim, 9, 4, 4, 3
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, c, f, h, w, generator=g)
    noise = torch.randn(b, c, f, h, w, generator=g)
    ctx = torch.randn(b, 7, TINY.text_dim, generator=g)
    steps = make_steps((1000, 750, 500, 250), 5.0, True)
    levels = torch.tensor([[0, 2, 3], [1, 3, 0]])  # per sample and chunk
    t = frame_levels(torch.tensor([[steps[i].timestep for i in row] for row in levels.tolist()]), f, fpb)
    sigma = frame_levels(torch.tensor([[steps[i].sigma for i in row] for row in levels.tolist()]), f, fpb)
    xt = add_noise(x0, noise, sigma[:, None, :, None, None])
    opts = StreamOptions(frames_per_block=fpb, context_noise=context_noise, window=window,
                         extend_positions=window is not None)
    with torch.no_grad():
        parallel = teacher_forcing_flow(model, x0, xt, t, ctx, fpb, context_noise, window=window)
        text = model.encode_text(ctx)
        ref = []
        for ci in range(f // fpb):
            cache = model.new_cache(b, (h // 2) * (w // 2), window=window or f)
            for cj in range(ci):  # the clean history, committed as the sampler commits a finished chunk
                commit_chunk(model, text, cache, cj * fpb, x0[:, :, cj * fpb:(cj + 1) * fpb], opts)
            s = slice(ci * fpb, (ci + 1) * fpb)
            ref.append(model.forward_chunk(xt[:, :, s], t[:, s], text, cache, ci * fpb,
                                           extend_positions=window is not None))
        ref = torch.cat(ref, dim=2)
    assert (parallel - ref).abs().max() < 2e-5
    with torch.no_grad():
        loss = teacher_forcing_loss(model, x0, noise, sigma, t, ctx, fpb, context_noise) if window is None else None
    if loss is not None:
        ref_loss = torch.nn.functional.mse_loss(ref, noise - x0)
        assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, float(ref_loss))


# -- diffusion forcing -----------------------------------------------------------------------------------
def tiny_config(out_dir, **tables):
    data = {
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": 1, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 3, "batch_size": 2, "lr": 1e-3},
        "teacher_forcing": {"steps": 4, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.5},
        "diffusion_forcing": {"steps": 4, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.5},
    }
    for k, v in tables.items():
        data.setdefault(k, {}).update(v)
    return load_config(data=data)


def test_diffusion_forcing_levels_are_independent(tmp_path):
    cfg = tiny_config(tmp_path)
    table = level_table(cfg, with_context=True)
    steps = make_steps(cfg.sampling.steps, cfg.sampling.shift, cfg.sampling.warp)
    assert table[0].tolist() == pytest.approx([s.timestep for s in steps] + [0.0])
    assert table[1].tolist() == pytest.approx([s.sigma for s in steps] + [0.0])
    # per frame: 12 frames x 4000 samples; each level ~1/5; pairs of frames independent (P(equal) ~ 1/5)
    draws = torch.stack([draw_levels(12, "sampler", table, 5.0, 0, "df", "levels", i)[1] for i in range(4000)])
    freq = torch.stack([(draws == s).float().mean() for s in table[1]])
    assert torch.allclose(freq, torch.full_like(freq, 0.2), atol=0.02)
    same = (draws[:, :, None] == draws[:, None, :]).float().mean(0)
    off = same[~torch.eye(12, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, 0.2), atol=0.03)
    corr = torch.corrcoef(draws.T)[~torch.eye(12, dtype=torch.bool)]
    assert corr.abs().max() < 0.08
    # the same key gives the same levels (resumable); continuous levels fill (0, 1]
    assert torch.equal(draw_levels(12, "sampler", table, 5.0, 0, "df", "levels", 3)[1], draws[3])
    t, s = draw_levels(1000, "continuous", table, 5.0, 0, "x")
    assert torch.allclose(t, s * 1000) and 0 < float(s.min()) and float(s.max()) <= 1 and s.unique().numel() > 990
    # chunk levels expand to their frames
    assert frame_levels(torch.tensor([[1.0, 2.0]]), 6, 3).tolist() == [[1, 1, 1, 2, 2, 2]]


def test_diffusion_forcing_loss_is_finite_and_decreases():
    torch.manual_seed(0)
    small = TINY.replace(dim=32, ffn_dim=64, num_heads=2, num_layers=1)
    model = CausalWanModel(small, attn_backend="sdpa").train()
    world = World(clip_shape=(small.in_dim, 6, 4, 4), text_len=4, text_dim=small.text_dim, clip_scale=0.2,
                  clip_mean=0.7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    table = level_table(tiny_config("unused"), with_context=True)
    losses = []
    for step in range(30):
        idx = list(range(step * 4, step * 4 + 4))
        x0, ctx = world.clips(idx, "cpu", "df"), world.contexts(idx, "cpu", "df")
        lv = [draw_levels(6, "sampler", table, 5.0, "df", step, i) for i in idx]
        t, sigma = torch.stack([a for a, _ in lv]), torch.stack([b for _, b in lv])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(step))
        loss = diffusion_forcing_loss(model, x0, noise, sigma, t, ctx, 3)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


# -- the stages ------------------------------------------------------------------------------------------
def weights(stage_dir):
    from self_forcing.training.engine import read_full_checkpoint

    return read_full_checkpoint(str(stage_dir))


@pytest.mark.parametrize("every,kill_at", [(2, 3)])  # resumes from step 2, redoes step 3
def test_baseline_stages_resume_after_a_kill_like_an_uninterrupted_run(tmp_path, every, kill_at):
    stages = ["teacher", TEACHER_FORCING, DIFFUSION_FORCING]
    full = tiny_config(tmp_path / "full", diffusion_forcing={"noise": "frame"})
    run_stages(full, stages, CPU, World())
    cut = tiny_config(tmp_path / "cut", run={"checkpoint_every": every}, diffusion_forcing={"noise": "frame"})
    run_stages(cut, ["teacher"], CPU, World())
    for stage in (TEACHER_FORCING, DIFFUSION_FORCING):
        run_stages(cut, [stage], CPU, World(), stop_after=kill_at)  # killed mid-run
        assert not os.path.exists(tmp_path / "cut" / f"{stage}.safetensors")
        run_stages(cut, [stage], CPU, World())
    for stage in (TEACHER_FORCING, DIFFUSION_FORCING):
        a = weights(tmp_path / "full" / stage)
        b = weights(tmp_path / "cut" / stage)
        assert a["step"] == b["step"] == 4
        for k, v in a["parts"]["student"]["model"].items():
            assert torch.equal(v, b["parts"]["student"]["model"][k]), (stage, k)
        for k, v in a["parts"]["student"]["ema"]["shadow"].items():
            assert torch.equal(v, b["parts"]["student"]["ema"]["shadow"][k]), (stage, k)
        log = read_jsonl(str(tmp_path / "cut" / stage / "log.jsonl"))
        assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
        assert os.path.isfile(tmp_path / "cut" / f"{stage}.safetensors")


def test_stage_names_and_equal_compute_budgets(tmp_path):
    assert resolve_stages(None) == ["teacher", "ode_pairs", "ode_init", "dmd", "eval", "export"]
    assert resolve_stages("all") == resolve_stages(None)
    assert resolve_stages("baselines") == ["teacher", "ode_pairs", "ode_init", "dmd", TEACHER_FORCING,
                                           DIFFUSION_FORCING, "eval", "export"]
    assert resolve_stages("diffusion_forcing,teacher_forcing") == [TEACHER_FORCING, DIFFUSION_FORCING]
    cfg = tiny_config(tmp_path, compute={"budget_s": 100.0, "split": [0.2, 0.3, 0.5]})
    sf = cfg.ode_pairs.time_budget_s + cfg.ode_init.time_budget_s + cfg.dmd.time_budget_s
    assert sf == pytest.approx(100.0)
    assert cfg.teacher_forcing.time_budget_s == cfg.diffusion_forcing.time_budget_s == 100.0
    assert cfg.teacher.time_budget_s == 0.0  # the shared teacher is outside the budget
    with pytest.raises(ValueError, match="split"):
        tiny_config(tmp_path, compute={"budget_s": 1.0, "split": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match="schedule"):
        tiny_config(tmp_path, teacher_forcing={"schedule": "cosine"})
    with pytest.raises(ValueError, match="noise"):
        tiny_config(tmp_path, diffusion_forcing={"noise": "token"})


def test_loop_seconds_adds_up_resumed_invocations(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "time": 0.5}, {"step": 2, "time": 3.0},
                                                          {"step": 3, "time": 0.2}, {"step": 4, "time": 2.0}]))
    assert loop_seconds(str(path)) == pytest.approx(5.0)
    assert loop_seconds(str(tmp_path / "missing.jsonl")) is None


def test_time_boxed_baselines_export_as_toy_bundles_with_their_compute(tmp_path):
    """Toy world at test size: a shared teacher in one run folder, the other stages in a second folder that
    names it (world.teacher_path, same text encoder seed); every model exported with what it got."""
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.sf_model.sampler import generate
    from self_forcing.toy.bundle import encode_prompt, is_toy_bundle
    from self_forcing.training.data import make_world

    base = {"model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32, "text_len": 16,
                      "freq_dim": 32},
            "world": {"size": 16, "frames": 6, "text_seed": 0},
            "teacher": {"steps": 3, "batch_size": 2}, "ode_pairs": {"count": 4, "batch_size": 4, "substeps": 1},
            "ode_init": {"steps": 2, "batch_size": 2}, "dmd": {"steps": 2, "batch_size": 1, "critic_ratio": 2},
            "teacher_forcing": {"steps": 3, "batch_size": 2}, "diffusion_forcing": {"steps": 3, "batch_size": 2},
            "export": {"causal_init": True}}
    teacher_cfg = load_config(data={**base, "run": {"out_dir": str(tmp_path / "teacher"), "progress": False}})
    run_stages(teacher_cfg, ["teacher"], CPU, make_world(teacher_cfg))
    seed_cfg = load_config(data={**base, "run": {"out_dir": str(tmp_path / "seed1"), "seed": 1, "progress": False},
                                 "world": {**base["world"], "teacher_path": str(tmp_path / "teacher" /
                                                                               "teacher.safetensors")},
                                 "compute": {"budget_s": 3600.0}})
    world = make_world(seed_cfg)
    paths = run_stages(seed_cfg, ["ode_pairs", "ode_init", "dmd", TEACHER_FORCING, DIFFUSION_FORCING, "export"],
                       CPU, world)
    with open(tmp_path / "seed1" / "compute.json") as fh:
        report = json.load(fh)
    assert report["teacher"]["steps"] == 3 and report["budget_s"] == 3600.0
    models = report["models"]
    assert models["self_forcing"]["budget_s"] == pytest.approx(3600.0)
    assert models[TEACHER_FORCING]["budget_s"] == models[DIFFUSION_FORCING]["budget_s"] == 3600.0
    assert models["causal_init"]["stages"]["ode_pairs"]["pairs"] == 4
    assert models[TEACHER_FORCING]["stages"][TEACHER_FORCING]["steps"] == 3
    assert models["self_forcing"]["stages"]["dmd"]["steps"] == 2
    assert all(m["wall_s"] > 0 for m in models.values())
    for role in ("self_forcing", "causal_init", TEACHER_FORCING, DIFFUSION_FORCING):
        key = "export" if role == "self_forcing" else f"export_{role}"
        loaded = load_model(paths[key], dtype=torch.float32)
        meta = loaded.meta
        assert is_toy_bundle(loaded) and meta["role"] == role and meta["compute"] == models[role]
        assert meta["steps"] == [1000, 750, 500, 250] and meta["toy"]["train_frames"] == 6
        ctx = encode_prompt(loaded, "a red circle bouncing on a black background", "cpu")
        lat = generate(loaded.model, ctx, num_frames=9, height=8, width=8, seed=0, options=StreamOptions(window=6))
        assert lat.shape == (1, 16, 9, 8, 8) and torch.isfinite(lat).all()
    tf = load_model(paths[f"export_{TEACHER_FORCING}"]).meta
    assert tf["training"]["steps_trained"] == 3 and tf["shared_teacher"]["steps"] == 3
    # the shared teacher's text encoder is the one every seed's export bundles
    t_world = make_world(teacher_cfg)
    p = ["a blue square bouncing on a gray background"]
    assert torch.equal(t_world.encode_prompts(p, "cpu"), world.encode_prompts(p, "cpu"))


# -- the GPU driver, at test size on the CPU --------------------------------------------------------------
class StageClock(ManualClock):
    """The driver's clock in the test: it stands still except when a stage runs, which advances it by what the
    driver models that stage to take (its time budget plus the driver's overhead), whatever the machine's speed."""

    def __init__(self, drv):
        super().__init__()
        self.drv, self.budgets = drv, []

    def wrap(self, run_stages):
        def timed(cfg, stages, *args, **kwargs):
            out = run_stages(cfg, stages, *args, **kwargs)
            for stage in stages:
                budget = getattr(getattr(cfg, stage, None), "time_budget_s", 0.0)
                self.budgets.append((stage, budget))
                self.advance(budget + self.drv.OVERHEAD_S[stage])
            return out
        return timed


class LoopTime:
    """``time`` for ``training.engine`` in the driver test: every reading is 0.1 s after the previous one, so a
    stage's time budget ends after the same steps however loaded the machine is (the real clock let a busy CPU
    overshoot the teacher's 1.2 s slice past its 2 s total)."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        self.now += 0.1
        return self.now


def test_gpu_driver_stops_when_out_of_time_and_continues_where_it_stopped(tmp_path, monkeypatch):
    from self_forcing.scripts import toy_baselines_gpu as drv
    from self_forcing.training import engine, protocol, stages

    monkeypatch.setattr(engine, "time", LoopTime())

    monkeypatch.setitem(drv.PRESETS, "tiny", {
        "teacher_total_s": 2.0, "teacher_slice_s": 1.2, "budget_s": 0.6, "seeds": [0, 1], "max_wall_s": 600,
        "protocol": {"prompts": 2, "seeds": [0], "lengths": [1, 2], "batch_size": 2, "bootstrap": 20}})
    monkeypatch.setattr(drv, "OVERHEAD_S", {k: 0.5 for k in drv.OVERHEAD_S})
    monkeypatch.setattr(drv, "WARM_UP_S", 5.0)  # never paid on the CPU, so every masked stage's estimate has it
    monkeypatch.setattr(drv, "PROTOCOL_S_PER_MODEL", 0.01)
    monkeypatch.setattr(drv, "MIN_TEACHER_SLICE_S", 0.3)
    clock = StageClock(drv)
    monkeypatch.setattr(stages, "run_stages", clock.wrap(stages.run_stages))

    def stand_in(videos, prompts):
        return {"darkness_error": (videos.float().mean(dim=(1, 3, 4)) + 1).abs().numpy()}

    monkeypatch.setattr(protocol, "default_metrics", lambda: (stand_in, ("darkness_error",)))
    tiny = ["run.device=\"cpu\"", "run.precision=\"fp32\"", "model.dim=32", "model.ffn_dim=64", "model.num_heads=2",
            "model.num_layers=1", "model.text_dim=32", "model.freq_dim=32", "world.size=16", "world.frames=6",
            "teacher.batch_size=2", "ode_pairs.batch_size=2", "ode_pairs.substeps=1", "ode_init.batch_size=2",
            "dmd.batch_size=1", "teacher_forcing.batch_size=2", "diffusion_forcing.batch_size=2",
            "run.checkpoint_every=5"]
    args = ["--budget", "tiny", "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            "--copy-exports"] + [a for s in tiny for a in ("--set", s)]
    teacher_log = str(tmp_path / "runs" / "teacher" / "teacher" / "log.jsonl")

    def call(extra=()):
        return drv.main(args + list(extra), clock=clock)

    # call 1, 3 s: the teacher runs one slice (1.2 s of its 2 s) and the call stops, the teacher unfinished
    assert call(["--max-wall", "3"]) == 3
    assert clock.budgets == [("teacher", 1.2)]
    log = read_jsonl(str(tmp_path / "res" / "driver.jsonl"))
    assert [(r["event"], r["step"], r["finished"]) for r in log] == [("step", "teacher", False)]
    first = loop_seconds(teacher_log)
    assert 1.2 <= first < 2.0
    # call 2, 4 s: the rest of the teacher (<= 1.3 s with its overhead) and ode_pairs (0.59 s) fit; ode_init
    # (0.18 s + 0.5 s overhead + 5 s warm-up) does not fit in what is left, so the call stops before it
    assert call(["--max-wall", "4"]) == 3
    assert [s for s, _ in clock.budgets] == ["teacher", "teacher", "ode_pairs"]
    assert clock.budgets[1][1] == pytest.approx(2.0 - first, abs=1e-3)
    assert clock.budgets[2][1] == pytest.approx(0.6 * 0.15)
    log = read_jsonl(str(tmp_path / "res" / "driver.jsonl"))[1:]
    assert [(r["event"], r.get("step"), r.get("finished")) for r in log[:2]] == [
        ("step", "teacher", True), ("step", "ode_pairs", True)]
    assert log[2]["event"] == "stopped" and (log[2]["before"], log[2]["seed"]) == ("ode_init", 0)
    assert log[2]["estimate_s"] == round(0.6 * 0.3 + 0.5 + 5.0) and log[2]["left_s"] <= 3
    assert log[2]["call_elapsed_s"] == pytest.approx((2.0 - first + 0.5) + (0.6 * 0.15 + 0.5), abs=0.051)
    assert loop_seconds(teacher_log) >= 1.98
    assert not os.path.exists(tmp_path / "runs" / "seed0" / ".done" / "ode_init")
    # call 3, the preset's 600 s: everything else, starting at ode_init of seed 0
    assert call() == 0
    log = read_jsonl(str(tmp_path / "res" / "driver.jsonl"))
    done = [(r["step"], r["seed"]) for r in log if r.get("event") == "step" and r["finished"]]
    assert done[0] == ("teacher", None) and done[-1] == ("protocol", None)
    assert done[2] == ("ode_init", 0) and len(done) == 1 + 2 * len(drv.SEED_STAGES) + 1  # each step once
    assert [s for s, seed in done if seed == 1] == list(drv.SEED_STAGES)
    for seed in (0, 1):
        report = json.loads((tmp_path / "res" / f"seed{seed}" / "compute.json").read_text())
        assert report["budget_s"] == 0.6 and report["models"]["teacher_forcing"]["budget_s"] == 0.6
        assert len(os.listdir(tmp_path / "res" / f"seed{seed}")) == 6  # 4 bundles, compute.json, curves.json
    res = json.loads((tmp_path / "res" / "protocol" / "results.json").read_text())
    assert sorted(res["models"]) == ["causal_init", "diffusion_forcing", "self_forcing", "teacher_forcing"]
    assert res["table"]["mean"]["darkness_error"]["2"]["self_forcing"]["n"] == 4  # 2 training seeds x 2 prompts
    assert "self_forcing - teacher_forcing" in res["paired"]
    runs = len(clock.budgets)
    assert call() == 0  # nothing left: a no-op
    assert len(clock.budgets) == runs


def test_teacher_goes_on_from_init_path_and_refuses_another_shape(tmp_path):
    run_stages(tiny_config(tmp_path / "a"), ["teacher"], CPU, World())
    first = str(tmp_path / "a" / "teacher.safetensors")
    # lr 0: the weights cannot move, so the new teacher's EMA is exactly the one it started from
    cfg = tiny_config(tmp_path / "b", teacher={"init_path": first, "lr": 0.0, "steps": 2})
    run_stages(cfg, ["teacher"], CPU, World())
    a, b = load_file(first), load_file(str(tmp_path / "b" / "teacher.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = tiny_config(tmp_path / "c", teacher={"lr": 0.0, "steps": 2})
    run_stages(fresh, ["teacher"], CPU, World())
    c = load_file(str(tmp_path / "c" / "teacher.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())  # without it: random init
    other = tiny_config(tmp_path / "d", model={"dim": 64, "ffn_dim": 64, "num_heads": 2},
                        teacher={"init_path": first})
    with pytest.raises(ValueError, match="not a model of"):
        run_stages(other, ["teacher"], CPU, World())


def test_gpu_driver_with_a_teacher_file_has_no_teacher_step_and_shares_that_file(tmp_path, capsys):
    from self_forcing.scripts import toy_baselines_gpu as drv

    teacher = tmp_path / "t.safetensors"
    with pytest.raises(SystemExit, match="no such file"):
        drv.main(["--teacher-file", str(teacher), "--root", str(tmp_path / "r"), "--dry-run"])
    teacher.write_bytes(b"x")
    args = drv.parse_args(["--teacher-file", str(teacher), "--root", str(tmp_path / "r"), "--budget", "fast"])
    d = drv.Driver(args)
    assert d.plan()[0] == ("ode_pairs", 0) and all(step != "teacher" for step, _ in d.plan())
    assert d.config(d.seed_dir(0), 0).world.teacher_path == str(teacher)
    assert drv.main(["--teacher-file", str(teacher), "--root", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "teacher" not in capsys.readouterr().out.replace("teacher_forcing", "")
