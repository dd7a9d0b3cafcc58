"""Self-Forcing++: long rollouts through the inference cache (the sampler's own stream, same latents), gradient
only at the window's exit forwards (and a check that catches a cache that leaks it), the re-noised window the
teacher and critic see, synced window starts (2 gloo processes), the stage, its export and its GPU driver."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from self_forcing.sf_model.cache import KVCache
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.sampler import StreamOptions, stream
from self_forcing.sf_model.schedule import make_steps
from self_forcing.sf_model.window import CachePolicy
from self_forcing.training.dmd import rollout
from self_forcing.training.engine import Runtime, seeded_randn
from self_forcing.training.long_rollout import Window, draw_window, rollout_window, window_chunks, window_starts
from self_forcing.training.models import build_model, save_dit

CPU = Runtime(device=torch.device("cpu"))
C, H, W = 16, 4, 4


def make_model(seed=0):
    model = build_model(TINY, seed, torch.device("cpu"))
    with torch.no_grad():  # a non-zero head so every path carries gradient
        model.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return model.train()


def context(batch=1, seed=0):
    return torch.randn(batch, 5, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def opts_for(window=6, sink=0):
    return StreamOptions.from_policy(CachePolicy.rolling(3, window, sink))


def sampler_noise(seed):
    """The sampler's own per-chunk noise (``stream`` draws exactly these)."""
    def noise_for(chunk, frames, count):
        return chunk_noise(seed, chunk, count, (1, C, frames, H, W), "cpu")
    return noise_for


def roll(model, window, *, exit_index, prefix_exit, opts, seed=0, grad=True, cache=None):
    steps = make_steps(opts.steps, opts.shift, opts.warp)
    text = model.encode_text(context())
    return rollout_window(model, text, window, batch=1, latent_shape=(C, H, W), steps=steps, opts=opts,
                          exit_index=exit_index, prefix_exit=prefix_exit, noise_for=sampler_noise(seed), grad=grad,
                          cache_dtype=torch.float32, cache=cache)


# -- windows ------------------------------------------------------------------------------------------
def test_window_starts_and_chunks():
    assert window_starts(18, 6, 3, "chunk") == [0, 3, 6, 9, 12]
    assert window_starts(18, 6, 3, "frame") == list(range(13))
    assert window_starts(6, 6, 3) == [0]
    with pytest.raises(ValueError):
        window_starts(4, 6, 3)
    with pytest.raises(ValueError):
        Window(13, 6, 18)
    # chunks up to the window's end; "inside" = overlaps the window
    assert window_chunks(Window(6, 6, 18), 3) == [(0, 3, False), (3, 3, False), (6, 3, True), (9, 3, True)]
    assert window_chunks(Window(7, 6, 18), 3) == [(0, 3, False), (3, 3, False), (6, 3, True), (9, 3, True),
                                                  (12, 3, True)]


def test_window_draws_are_uniform_keyed_and_aligned():
    starts = [draw_window(60, 12, 3, "chunk", CPU, 0, "k", s).start for s in range(3000)]
    assert set(starts) == set(range(0, 49, 3))
    counts = torch.bincount(torch.tensor(starts) // 3).float()
    assert counts.min() > 0.6 * counts.mean()  # 17 values, ~176 each
    assert starts == [draw_window(60, 12, 3, "chunk", CPU, 0, "k", s).start for s in range(3000)]
    frames = {draw_window(20, 6, 3, "frame", CPU, 1, "k", s).start for s in range(1000)}
    assert frames == set(range(15))


# -- the rollout is the sampler -------------------------------------------------------------------------
@pytest.mark.parametrize("sink", [0, 3])
def test_rollout_of_n_frames_is_the_samplers_stream(sink):
    """N = 24 frames through a rolling cache of 6 (+ sink): the same latents as ``sampler.stream`` with the same
    seed; any window of it (chunk-aligned or not, prefix without gradient) is the same frames of that video."""
    model = make_model().eval()
    opts = opts_for(6, sink)
    with torch.no_grad():
        ref = torch.cat([c.latents for c in stream(model, context(), num_frames=24, height=H, width=W, seed=7,
                                                   options=opts)], dim=2)
        whole = roll(model, Window(0, 24, 24), exit_index=3, prefix_exit=3, opts=opts, seed=7, grad=False)
    assert torch.equal(whole, ref)
    for start in (15, 18, 7):
        part = roll(model, Window(start, 6, 24), exit_index=3, prefix_exit=3, opts=opts, seed=7)
        assert torch.equal(part.detach(), ref[:, :, start:start + 6]), start
    # a cache that does not roll would see more history: the 24-frame video differs from the rolling one
    with torch.no_grad():
        fixed = torch.cat([c.latents for c in stream(model, context(), num_frames=24, height=H, width=W, seed=7,
                                                     options=StreamOptions())], dim=2)
    assert not torch.allclose(fixed[:, :, 9:], ref[:, :, 9:])


def test_horizon_one_is_the_self_forcing_rollout():
    """Window = the whole T-frame clip, rolling cache of T: Self Forcing's rollout (fixed cache), gradient
    included -- ``horizon = 1`` is plain Self Forcing trained further."""
    model = make_model()
    opts = opts_for(6, 0)
    steps = make_steps(opts.steps, opts.shift, opts.warp)
    ours = roll(model, Window(0, 6, 6), exit_index=1, prefix_exit=3, opts=opts, seed=3)
    text = model.encode_text(context())
    theirs = rollout(model, text, batch=1, clip_shape=(C, 6, H, W), steps=steps, opts=StreamOptions(), exit_index=1,
                     noise_for=sampler_noise(3), grad=True, cache_dtype=torch.float32)
    assert torch.equal(ours, theirs)
    g1 = torch.autograd.grad(ours.square().mean(), list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(theirs.square().mean(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-8)


# -- gradient only through the window's exit forwards -------------------------------------------------------
class LeakyCache(KVCache):
    """A cache that leaks gradient: later chunks attend to K/V still carrying the earlier chunks' exit-forward
    graph (what in-place writes of grad-carrying tensors do). The checks below must fail on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.live = {}

    def valid_with_current(self, layer, k, v):
        kc, vc = super().valid_with_current(layer, k, v)
        ft = self.frame_tokens
        mine = {slot for slot, _, _ in self.plan.runs}
        for (lay, slot, n), (dk, dv) in self.live.items():
            if lay == layer and slot not in mine and (slot + n) * ft <= kc.shape[1]:
                pad = (0, 0, 0, 0, slot * ft, kc.shape[1] - (slot + n) * ft)
                kc = kc + torch.nn.functional.pad(dk, pad)
                vc = vc + torch.nn.functional.pad(dv, pad)
        for slot, off, n in self.plan.runs:
            if k.requires_grad:
                pk, pv = k[:, off * ft:(off + n) * ft], v[:, off * ft:(off + n) * ft]
                self.live[(layer, slot, n)] = (pk - pk.detach(), pv - pv.detach())
        return kc, vc


def spy_forwards(model, monkeypatch):
    """Record (start frame, input, output) of every chunk forward. A forward run with gradient gets its input as
    a fresh leaf (same values; rollout inputs carry no graph), so any gradient that enters that forward's graph
    -- through its output or through the K/V it computed -- shows up in the leaf's ``grad``."""
    calls = []
    original = model.forward_chunk

    def spy(x, t, text, cache, start, **kw):
        assert not x.requires_grad
        if torch.is_grad_enabled():
            x = x.detach().requires_grad_(True)
        out = original(x, t, text, cache, start, **kw)
        calls.append((start, x, out))
        return out

    monkeypatch.setattr(model, "forward_chunk", spy)
    return calls


def leaky_cache(model, frames):
    c = model.config
    return LeakyCache(c.num_layers, 1, (H // 2) * (W // 2), c.num_heads, c.head_dim, window=frames,
                      dtype=torch.float32, device=torch.device("cpu"))


def window_grads(model, monkeypatch, cache=None, opts=None):
    """Window [9, 15) of a 24-frame rollout (chunks at 9 and 12 inside), loss on its *last* chunk only:
    the chunk forward outputs and their gradients."""
    calls = spy_forwards(model, monkeypatch)
    video = roll(model, Window(9, 6, 24), exit_index=2, prefix_exit=3, opts=opts or opts_for(6, 0), cache=cache)
    video[:, :, 3:].square().mean().backward()
    return calls


def test_gradient_reaches_only_the_window_exit_forwards(monkeypatch):
    model = make_model()
    calls = window_grads(model, monkeypatch)
    # per chunk: its denoising forwards, then (all but the last chunk) one no-grad clean pass
    assert [s for s, _, _ in calls] == [0] * 5 + [3] * 5 + [6] * 5 + [9] * 4 + [12] * 3
    for start, _, out in calls:
        if start < 9:  # before the window: no graph at all
            assert not out.requires_grad, start
    graphed = [(s, x) for s, x, out in calls if out.requires_grad]
    assert [s for s, _ in graphed] == [9, 12]  # exactly the exit forward of each window chunk
    (_, earlier), (_, last) = graphed
    assert float(last.grad.abs().sum()) > 0
    # the earlier window chunk reaches the loss only through the detached cache: nothing enters its forward
    assert earlier.grad is None or torch.count_nonzero(earlier.grad) == 0


def test_the_gradient_check_fails_on_a_leaking_cache(monkeypatch):
    model = make_model()
    calls = window_grads(model, monkeypatch, cache=leaky_cache(model, 24))
    earlier = [x for s, x, out in calls if out.requires_grad][0]
    assert earlier.grad is not None and float(earlier.grad.abs().sum()) > 0  # the leak reaches chunk 9's forward


def test_parameter_gradient_is_the_sum_of_each_window_chunks_own_exit_forward():
    """d loss / d theta over the window == the sum, per window chunk, of its own exit forward's gradient with
    every earlier chunk computed without gradient (stochastic gradient truncation, per chunk)."""
    model = make_model()
    opts = opts_for(6, 3)
    params = list(model.parameters())

    def grads(window, frames):
        video = roll(model, window, exit_index=1, prefix_exit=1, opts=opts, seed=5)
        loss = video[:, :, frames].square().sum() / (1 * C * 6 * H * W)
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    got = grads(Window(12, 6, 24), slice(0, 6))
    first = grads(Window(12, 3, 24), slice(0, 3))   # chunk 12 alone, with gradient
    second = grads(Window(15, 3, 24), slice(0, 3))  # chunk 15 alone; chunk 12 now without gradient
    for g, a, b in zip(got, first, second):
        assert torch.allclose(g, a + b, rtol=1e-4, atol=1e-9)
    assert sum(float(g.abs().sum()) for g in got) > 0


# -- the stage's trainer: backward noise initialisation on the window -------------------------------------
def tiny_cfg(tmp_path, **sfpp):
    from self_forcing.training.config import load_config

    return load_config(data={
        "run": {"out_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "checkpoint_every": 100},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6, "teacher_path": str(tmp_path / "teacher.safetensors")},
        "sfpp": {"batch_size": 2, "critic_ratio": 2, "steps": 2, "horizon": 4, "lr": 1e-3, "lr_critic": 1e-3,
                 "ema_decay": 0.5, "generator_path": str(tmp_path / "gen.safetensors"), **sfpp}})


def write_models(tmp_path, cfg, teacher_file="teacher.safetensors", gen_file="gen.safetensors"):
    for name, seed in ((teacher_file, 1), (gen_file, 2)):
        m = build_model(cfg.model, seed, torch.device("cpu"))
        with torch.no_grad():
            m.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        save_dit(str(tmp_path / name), m, cfg.model, "test", {"frames_per_block": 3})


def test_teacher_and_critic_see_the_rollout_window_renoised(tmp_path):
    """Generator step: the real score and the critic get x_t = (1 - sigma) x0 + sigma eps on frames [i, i+K) of the
    student's own long rollout (i from the synced draw, positions re-based to 0..K-1: a K-frame clip from frame 0),
    not fresh noise."""
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.dmd import score_sigmas
    from self_forcing.training.sfpp import STAGE, SfppTrainer

    cfg = tiny_cfg(tmp_path, prefix_exit="same")
    write_models(tmp_path, cfg)
    world = RandomWorld(clip_shape=(16, 6, 4, 4))
    tr = SfppTrainer.from_paths(cfg, CPU, world, str(tmp_path / "gen.safetensors"),
                                str(tmp_path / "teacher.safetensors"))
    seen = {}

    def hook(name):
        def pre(module, args, kwargs):
            seen.setdefault(name, []).append((args[0].detach().clone(), args[1].clone(), dict(kwargs)))
        return pre

    tr.real.register_forward_pre_hook(hook("real"), with_kwargs=True)
    tr.critic.model.register_forward_pre_hook(hook("critic"), with_kwargs=True)
    step = next(s for s in range(0, 40, 2) if s and draw_window(24, 6, 3, "chunk", CPU, 0, STAGE, "gen-window",
                                                                     s).start > 0)
    window, exit_index = tr.draw("gen", step)  # what generator_step will draw (keyed by the step)
    start = window.start
    # the whole 24-frame rollout with the same noise and exit, computed independently (before the update)
    idx = [step * 2, step * 2 + 1]
    cond = world.contexts(idx, "cpu", stream=STAGE)
    with torch.no_grad():
        full = rollout_window(tr.gen.model, tr.gen.model.encode_text(cond), Window(0, 24, 24), batch=2,
                              latent_shape=(16, 4, 4), steps=tr.steps, opts=tr.opts, exit_index=exit_index,
                              prefix_exit=exit_index, noise_for=tr._noise_for(idx, 0, STAGE, "gen-noise", step),
                              grad=False, cache_dtype=torch.float32)
    tr.generator_step(step)
    assert tr.drawn[-1] == ("gen", step, start, exit_index) and start > 0
    x0 = full[:, :, start:start + 6]
    sigma = score_sigmas(idx, cfg.sfpp, 0, STAGE, "gen-t", step)
    eps = torch.stack([seeded_randn((16, 6, 4, 4), 0, STAGE, "gen-score", step, i) for i in idx])
    want = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * eps
    (fake_x, fake_t, fake_kw), = seen["critic"]
    (real_x, real_t, real_kw), = seen["real"]   # cond and uncond in one batch
    assert torch.allclose(fake_x, want, atol=1e-5) and torch.allclose(real_x, torch.cat([want, want]), atol=1e-5)
    assert torch.allclose(fake_t, (sigma * 1000)[:, None].expand(2, 6))
    for kw in (fake_kw, real_kw):  # bidirectional, from position 0
        assert kw.get("start_frame", 0) == 0 and kw.get("frames_per_block") is None
    # and the re-noised window is not the rollout's first K frames (the window really moved)
    assert not torch.allclose(x0, full[:, :, :6])


# -- the stage: export metadata, resume -----------------------------------------------------------------
def toy_cfg(tmp_path, **sfpp):
    from self_forcing.training.config import load_config

    return load_config(data={
        "run": {"out_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "checkpoint_every": 100},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 32, "text_len": 16,
                  "freq_dim": 32},
        "world": {"size": 16, "frames": 6, "teacher_path": str(tmp_path / "teacher.safetensors")},
        "sfpp": {"batch_size": 1, "critic_ratio": 2, "steps": 3, "horizon": 3, "sink": 3, "lr": 1e-3,
                 "generator_path": str(tmp_path / "gen.safetensors"), **sfpp}})


def test_stage_continues_after_a_slice_and_exports_its_cache(tmp_path):
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.sf_model.window import default_policy
    from self_forcing.toy.bundle import is_toy_bundle
    from self_forcing.training.data import make_world
    from self_forcing.training.stages import run_stages

    cfg = toy_cfg(tmp_path, slice_s=1e-9)
    write_models(tmp_path, cfg)
    world = make_world(cfg)
    assert run_stages(cfg, ["sfpp"], CPU, world) == {}  # one step, checkpointed, no output yet
    assert not os.path.exists(tmp_path / "run" / "sfpp.safetensors")
    cfg2 = toy_cfg(tmp_path, slice_s=1e6)
    out = run_stages(cfg2, ["sfpp"], CPU, world)
    assert set(out) == {"sfpp", "export_sfpp"}
    # the same weights as one uninterrupted run
    cfg3 = toy_cfg(tmp_path / "x")
    os.makedirs(tmp_path / "x")
    write_models(tmp_path / "x", cfg3)
    run_stages(cfg3, ["sfpp"], CPU, world)
    a = load_model(out["sfpp"]).model.state_dict()
    b = load_model(str(tmp_path / "x" / "run" / "sfpp.safetensors")).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    loaded = load_model(out["export_sfpp"])
    meta = loaded.meta
    assert is_toy_bundle(loaded) and meta["role"] == "sfpp" and meta["name"] == "sfpp-toy"
    assert meta["train_frames"] == 6 and meta["sink"] == 3 and meta["sfpp"]["rollout_frames"] == 18
    assert meta["sfpp"]["generator_updates"] == 2 and meta["sfpp"]["critic_steps"] == 3
    assert meta["sfpp"]["critic_start"] == str(tmp_path / "teacher.safetensors") and meta["drift"] is None
    # what the nodes and the CLI default to for a long video: the rolling window and sink of training
    assert default_policy(meta, 60) == CachePolicy.rolling(3, 6, 3)
    assert default_policy(meta, 6) == CachePolicy.fixed(3)
    opts = StreamOptions.from_meta(meta, CachePolicy.fixed(3))  # even a fixed cache asked for: the trained one
    assert (opts.window, opts.sink) == (6, 3)
    log = [json.loads(line) for line in open(tmp_path / "run" / "sfpp" / "log.jsonl")]
    assert [r["step"] for r in log if "note" not in r] == [1, 2, 3]


def test_critic_starts_from_the_dmd_stages_critic(tmp_path):
    from self_forcing.training.engine import Checkpointer, Trainable
    from self_forcing.training.sfpp import critic_source, load_critic

    cfg = toy_cfg(tmp_path)
    write_models(tmp_path, cfg)
    gen = str(tmp_path / "gen.safetensors")
    assert critic_source(cfg) is None  # the critic's role: the toy teacher
    teacher = load_critic(cfg, None, torch.device("cpu"), like=gen)
    want = build_model(cfg.model, 1, torch.device("cpu"))  # write_models' teacher
    with torch.no_grad():
        want.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in want.state_dict().items())
    other = build_model(cfg.model, 9, torch.device("cpu"))
    want = {k: v.clone() for k, v in other.state_dict().items()}
    Checkpointer(str(tmp_path / "run" / "dmd"), CPU).save(5, {"critic": Trainable("critic", other.requires_grad_(True),
                                                                                  CPU, lr=1e-3)})
    assert critic_source(cfg) == str(tmp_path / "run" / "dmd")
    critic = load_critic(cfg, critic_source(cfg), torch.device("cpu"), like=gen)
    assert critic.training and all(p.requires_grad for p in critic.parameters())
    assert all(torch.equal(critic.state_dict()[k], v) for k, v in want.items())


def test_a_reencoded_window_start_leaves_its_first_chunk_out_of_the_loss(tmp_path):
    """With a re-encoder (Wan: the VAE), a window past frame 0 gets its first latent replaced by the re-encoding
    of the rollout up to that frame, and the DMD loss starts after its first chunk."""
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.sfpp import SfppTrainer

    cfg = tiny_cfg(tmp_path, prefix_exit="same")  # every chunk exits at the same step: one reference rollout
    write_models(tmp_path, cfg)
    seen = []

    def reencoder(prefix):
        seen.append(prefix.clone())
        return prefix[:, :, -1:] * 0 + 7.0

    from self_forcing.training.models import load_dit
    gen, _ = load_dit(str(tmp_path / "gen.safetensors"), torch.device("cpu"))
    critic, _ = load_dit(str(tmp_path / "teacher.safetensors"), torch.device("cpu"))
    real, _ = load_dit(str(tmp_path / "teacher.safetensors"), torch.device("cpu"))
    tr = SfppTrainer(cfg, CPU, RandomWorld(clip_shape=(16, 6, 4, 4)), gen, critic, real, reencoder=reencoder)
    text = gen.encode_text(RandomWorld().contexts([0], "cpu", "x"))
    with torch.no_grad():
        full = tr.rollout(gen, text, [0], Window(0, 24, 24), 1, False, "k")[0]
        video, loss_from = tr.rollout(gen, text, [0], Window(9, 6, 24), 1, False, "k")
    assert loss_from == 3 and torch.equal(seen[-1], full[:, :, :10])
    assert torch.all(video[:, :, 0] == 7.0) and torch.equal(video[:, :, 1:], full[:, :, 10:15])
    start, _ = tr.rollout(gen, text, [0], Window(0, 6, 24), 1, False, "k")
    assert len(seen) == 1 and start.shape[2] == 6  # a window at frame 0 is the clip's real start


def test_config_table_and_stage_names(tmp_path):
    from self_forcing.training.config import load_config
    from self_forcing.training.stages import resolve_stages

    assert "sfpp" not in resolve_stages("baselines") and "sfpp" not in resolve_stages(None)
    assert resolve_stages("sfpp,dmd") == ["dmd", "sfpp"]
    with pytest.raises(ValueError, match="align"):
        load_config(data={"sfpp": {"align": "block"}})
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(data={"sfpp": {"horizn": 3}})
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs")
    toy = load_config(os.path.join(root, "toy_sfpp.toml"))
    assert toy.sfpp.horizon == 20 and toy.sfpp.window == 0 and toy.world.frames == 12
    wan = load_config(os.path.join(root, "wan_sfpp.toml"))
    assert wan.world.kind == "wan" and wan.sfpp.window == 21 and wan.sfpp.sink == 3


# -- two processes: the window start is rank 0's ------------------------------------------------------------
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from self_forcing.training.config import load_config
    from self_forcing.training.engine import init_runtime, run_loop, shutdown
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.long_rollout import draw_window
    from self_forcing.training.sfpp import SfppTrainer

    cfg = load_config(data=json.loads(sys.argv[1]))
    rt = init_runtime("cpu")
    tr = SfppTrainer.from_paths(cfg, rt, RandomWorld(clip_shape=(16, 6, 4, 4)), cfg.sfpp.generator_path,
                                cfg.world.teacher_path)
    run_loop("sfpp", cfg.sfpp.steps, tr.step, tr.parts(), os.path.join(cfg.run.out_dir, "sfpp"), rt, progress=False)
    # a draw whose key differs per rank (as unsynced RNG states would): every rank gets rank 0's
    keyed = [draw_window(60, 6, 3, "chunk", rt, "r", rt.rank, s).start for s in range(20)]
    with open(sys.argv[2] + f".rank{rt.rank}.json", "w") as fh:
        json.dump({"drawn": tr.drawn, "keyed": keyed}, fh)
    try:  # whole weights on rank 0 (sharded models gather them collectively)
        from self_forcing.training.engine import full_state_dict
        weights = {p: full_state_dict(t, ema=False) for p, t in tr.parts().items()}
    except ImportError:
        weights = {p: t.model.state_dict() for p, t in tr.parts().items()}
    if rt.is_main:
        torch.save(weights, sys.argv[2] + ".weights.pt")
    shutdown(rt)
''')


def test_two_processes_share_the_window_and_match_one_process(tmp_path):
    base = tiny_cfg(tmp_path, steps=3, batch_size=1)
    write_models(tmp_path, base)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"

    def run(name, nproc, accum):
        cfg = {"run": {"out_dir": str(tmp_path / name), "progress": False, "log_every": 1},
               "model": base.model.to_dict(),
               "world": {"frames": 6, "teacher_path": str(tmp_path / "teacher.safetensors")},
               "sfpp": {"batch_size": 1, "grad_accum": accum, "critic_ratio": 2, "steps": 3, "horizon": 4,
                        "lr": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.5,
                        "generator_path": str(tmp_path / "gen.safetensors")}}
        prefix = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        res = subprocess.run([sys.executable, *prefix, str(script), json.dumps(cfg), str(tmp_path / name)],
                             capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]

    one = run("one", 1, 2)
    two = run("two", 2, 1)
    assert two[0]["drawn"] == two[1]["drawn"] == one[0]["drawn"]
    assert len(one[0]["drawn"]) == 5  # generator at steps 0 and 2, critic at 0, 1, 2
    assert len({d[2] for d in one[0]["drawn"]}) > 1  # the window moves between draws
    assert two[0]["keyed"] == two[1]["keyed"] == one[0]["keyed"]
    w1 = torch.load(tmp_path / "one.weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two.weights.pt", weights_only=True)
    for part in ("generator", "critic"):
        for k, v in w1[part].items():
            assert torch.allclose(v, w2[part][k], rtol=1e-4, atol=1e-5), (part, k)  # reduction order
    from self_forcing.sf_model.checkpoint import load_model

    start = load_model(str(tmp_path / "gen.safetensors")).model.state_dict()
    assert max(float((w1["generator"][k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained


# -- the GPU driver, at test size on the CPU --------------------------------------------------------------
def baselines_root(tmp_path):
    """What the baselines driver leaves: a shared teacher and a seed folder with a Self Forcing run."""
    from self_forcing.training.config import load_config
    from self_forcing.training.data import make_world
    from self_forcing.training.stages import run_stages

    base = {"model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 1, "text_dim": 32, "text_len": 16,
                      "freq_dim": 32},
            "world": {"size": 16, "frames": 6, "text_seed": 0},
            "teacher": {"steps": 2, "batch_size": 2}, "ode_pairs": {"count": 2, "batch_size": 2, "substeps": 1},
            "ode_init": {"steps": 1, "batch_size": 2}, "dmd": {"steps": 2, "batch_size": 1, "critic_ratio": 2},
            "export": {"baselines": False}}
    root = tmp_path / "baselines"
    teacher = load_config(data={**base, "run": {"out_dir": str(root / "teacher"), "progress": False,
                                                "device": "cpu"}})
    run_stages(teacher, ["teacher"], CPU, make_world(teacher))
    seed = load_config(data={**base, "run": {"out_dir": str(root / "seed0"), "progress": False, "device": "cpu"},
                             "world": {**base["world"], "teacher_path": str(root / "teacher" / "teacher.safetensors")}})
    run_stages(seed, ["ode_pairs", "ode_init", "dmd", "export"], CPU, make_world(seed))
    return root


def test_gpu_driver_continues_self_forcing_both_ways_and_runs_the_protocol(tmp_path, monkeypatch):
    from self_forcing.scripts import toy_sfpp_gpu as drv
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.training import protocol, stages
    from self_forcing.training.engine import read_jsonl
    from self_forcing.training.step_driver import ManualClock

    base = baselines_root(tmp_path)
    monkeypatch.setitem(drv.PRESETS, "tiny", {
        "updates": 2, "horizon": 3, "seeds": [0], "max_wall_s": 600,
        "protocol": {"prompts": 2, "seeds": [0], "lengths": [1, 3], "batch_size": 2, "bootstrap": 20}})
    monkeypatch.setattr(drv, "OVERHEAD_S", 0.5)
    monkeypatch.setattr(drv, "MIN_SLICE_S", 0.5)
    monkeypatch.setattr(drv, "PROTOCOL_S_PER_MODEL", 0.01)

    def stand_in(videos, prompts):
        return {"darkness_error": (videos.float().mean(dim=(1, 3, 4)) + 1).abs().numpy()}

    monkeypatch.setattr(protocol, "default_metrics", lambda: (stand_in, ("darkness_error",)))
    # the driver's clock stands still except when a model trains, which takes `cost` seconds of it
    clock, cost, trained = ManualClock(), {"s": 0.0}, []

    def timed(cfg, names, *a, real=stages.run_stages, **kw):
        out = real(cfg, names, *a, **kw)
        trained.append((cfg.sfpp.name, cfg.sfpp.slice_s))
        clock.advance(cost["s"])
        return out

    monkeypatch.setattr(stages, "run_stages", timed)
    args = ["--baselines-root", str(base), "--budget", "tiny", "--root", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--set", 'run.device="cpu"', "--set", "sfpp.batch_size=1",
            "--set", "run.log_every=1"]
    log_path = str(tmp_path / "res" / "driver.jsonl")

    def call(extra=()):
        return drv.main(args + list(extra), clock=clock)

    # call 1, 0.8 s: less than a step's least (0.5 s overhead + 0.5 s slice): no step starts
    assert call(["--max-wall", "0.8"]) == 3
    assert trained == [] and [(r["event"], r["before"], r["need_s"]) for r in read_jsonl(log_path)] == [
        ("stopped", "continued", 1)]
    # call 2, the preset's 600 s, the first model's training takes 599.3 s of them: it trains for the time the
    # call has left (its slice) and finishes; 0.7 s are left, too few to start Self-Forcing++
    cost["s"] = 599.3
    assert call() == 3
    assert trained == [("self_forcing_continued", pytest.approx(600 - 0.5))]
    log = read_jsonl(log_path)[1:]
    assert [(r["event"], r.get("step"), r.get("finished"), r.get("seconds")) for r in log] == [
        ("step", "continued", True, 599.3), ("stopped", None, None, None)]
    assert (log[1]["before"], log[1]["left_s"], log[1]["call_elapsed_s"]) == ("sfpp", 1, 599.3)
    assert os.path.isfile(tmp_path / "runs" / "seed0" / ".done" / "continued")
    assert not os.path.exists(tmp_path / "runs" / "seed0" / ".done" / "sfpp")
    # call 3: Self-Forcing++ (1 s of the clock) and the protocol
    cost["s"] = 1.0
    assert call() == 0
    assert [name for name, _ in trained] == ["self_forcing_continued", "sfpp"]
    log = read_jsonl(log_path)
    done = [(r["step"], r["seed"]) for r in log if r.get("event") == "step" and r["finished"]]
    assert done == [("continued", 0), ("sfpp", 0), ("protocol", None)]
    res = json.loads((tmp_path / "res" / "protocol" / "results.json").read_text())
    assert sorted(res["models"]) == ["self_forcing", "self_forcing_continued", "sfpp"]
    assert {"sfpp - self_forcing", "sfpp - self_forcing_continued", "self_forcing_continued - self_forcing"} \
        <= set(res["paired"])
    metas = {}
    for name in ("sfpp", "self_forcing_continued"):
        report = json.loads((tmp_path / "res" / "seed0" / f"{name}_compute.json").read_text())
        assert report["generator_updates"] == 2 and report["critic_steps"] == 10  # critic_ratio 5
        assert report["critic_start"].endswith("dmd")  # the Self Forcing run's own critic continues
        assert report["wall_s"] == {"sfpp": 1.0, "self_forcing_continued": 599.3}[name]  # the driver's clock
        metas[name] = load_model(str(tmp_path / "runs" / "seed0" / f"{name}_toy.safetensors")).meta
    assert metas["sfpp"]["sfpp"]["rollout_frames"] == 18 and metas["self_forcing_continued"]["sfpp"]["horizon"] == 1
    assert metas["sfpp"]["sfpp"]["start"].endswith("self_forcing.safetensors")
    assert call() == 0  # nothing left: a no-op
    assert len(read_jsonl(log_path)) == len(log) and len(trained) == 2


def test_wan_memory_benchmark_runs_at_test_size(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "train_sfpp_wan_gpu.py")
    spec = importlib.util.spec_from_file_location("train_sfpp_wan_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b.json"
    assert mod.main(["--tiny", "--device", "cpu", "--steps", "1", "--horizon", "2", "--configs", "1.3b:ac",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())["configs"][0]
    assert res["status"] == "ok" and res["rollout_frames"] == 12
    assert [(r["phase"], r["window_start"], r["chunks"]) for r in res["rows"]] == [("generator", 6, 4),
                                                                                   ("critic", 6, 4)]
