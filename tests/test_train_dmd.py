"""The DMD gradient: zero when the fake and real scores agree, the paper's normalisation, and a loss whose
gradient on the video is exactly the normalised gradient."""

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.sampler import StreamOptions
from self_forcing.sf_model.schedule import make_steps
from self_forcing.training.dmd import critic_loss, dmd_gradient, dmd_loss, predict_x0, rollout, score_sigmas
from self_forcing.training.config import DmdConfig
from self_forcing.training.models import build_model, frozen_copy

OPTS = StreamOptions()
STEPS = make_steps(OPTS.steps, OPTS.shift, OPTS.warp)


def models(seed=0):
    gen = build_model(TINY, seed, torch.device("cpu"))
    score = build_model(TINY, seed + 1, torch.device("cpu"))
    with torch.no_grad():
        for m, s in ((gen, seed + 2), (score, seed + 3)):
            m.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(s))
    return gen.train(), score


def inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(batch, 5, TINY.text_dim, generator=g)
    uncond = torch.zeros_like(cond)
    noise = torch.randn(batch, 16, 6, 4, 4, generator=g)
    return cond, uncond, noise, torch.tensor([0.3, 0.8])[:batch]


def roll(gen, cond, grad=True):
    def noise_for(block, frames, count):
        return [torch.cat([n, n * 0.5]) for n in chunk_noise(1, block, count, (1, 16, frames, 4, 4), "cpu")]
    return rollout(gen, gen.encode_text(cond), batch=cond.shape[0], clip_shape=(16, 6, 4, 4), steps=STEPS,
                   opts=OPTS, exit_index=1, noise_for=noise_for, grad=grad, cache_dtype=torch.float32)


def test_dmd_gradient_is_zero_when_fake_and_real_scores_agree():
    gen, score = models()
    cond, uncond, noise, sigma = inputs()
    video = roll(gen, cond)
    fake = frozen_copy(score)  # the critic equals the teacher; guidance 0: real = the conditional teacher
    grad, info = dmd_gradient(video, fake, score, cond, uncond, sigma, noise, guidance=0.0)
    assert torch.count_nonzero(grad) == 0 and info["fake_real_gap"] == 0
    gen.zero_grad(set_to_none=True)
    dmd_loss(video, grad).backward(retain_graph=True)
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in gen.parameters())
    # ... and not zero once the scores disagree (guidance on, or a different critic)
    grad_cfg, _ = dmd_gradient(video, fake, score, cond, uncond, sigma, noise, guidance=3.0)
    other = build_model(TINY, 9, torch.device("cpu"))
    grad_other, _ = dmd_gradient(video, other, score, cond, uncond, sigma, noise, guidance=0.0)
    assert grad_cfg.abs().mean() > 1e-4 and grad_other.abs().mean() > 1e-4
    gen.zero_grad(set_to_none=True)
    dmd_loss(video, grad_cfg).backward()
    assert sum(float(p.grad.abs().sum()) for p in gen.parameters() if p.grad is not None) > 0


def test_dmd_gradient_is_fake_minus_real_normalised_per_sample():
    gen, score = models()
    fake = build_model(TINY, 7, torch.device("cpu"))
    cond, uncond, noise, sigma = inputs()
    with torch.no_grad():
        video = roll(gen, cond, grad=False)
    g = 3.0
    grad, _ = dmd_gradient(video, fake, score, cond, uncond, sigma, noise, guidance=g)
    x_t = (1 - sigma[:, None, None, None, None]) * video + sigma[:, None, None, None, None] * noise
    with torch.no_grad():
        f = predict_x0(fake, x_t, sigma, cond)
        c = predict_x0(score, x_t, sigma, cond)
        u = predict_x0(score, x_t, sigma, uncond)
    real = c + g * (c - u)
    for b in range(2):
        norm = (video[b] - real[b]).abs().mean()
        assert torch.allclose(grad[b], (f[b] - real[b]) / norm, rtol=1e-4, atol=1e-6)


def test_dmd_loss_gradient_on_the_video_is_the_dmd_gradient():
    video = torch.randn(2, 16, 3, 2, 2, requires_grad=True)
    grad = torch.randn(2, 16, 3, 2, 2)
    dmd_loss(video, grad).backward()
    assert torch.allclose(video.grad, grad / video.numel(), rtol=1e-6)


def test_score_levels_are_shifted_and_clamped():
    dc = DmdConfig()
    s = score_sigmas(range(2000), dc, 0, "t")
    lo, hi = torch.tensor(dc.min_t), torch.tensor(dc.max_t)  # float32, as the levels are
    assert s.min() >= lo and s.max() <= hi
    assert float((s == hi).float().mean()) > 0.05  # shift 5 pushes many levels to the top
    assert torch.equal(s, score_sigmas(range(2000), dc, 0, "t"))  # keyed: reproducible


def test_critic_learns_the_flow_of_the_students_samples():
    gen, critic = models()
    critic.train()
    cond, _, noise, sigma = inputs()
    with torch.no_grad():
        video = roll(gen, cond, grad=False)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = critic_loss(critic, video, cond, sigma, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- rollouts longer than the loss window (the official >21-frame path) ---------------------------------------
from self_forcing.toy.codec import ToyCodec  # noqa: E402
from self_forcing.training.loss_window import (ToyReencoder, VaeReencoder, draw_rollout_frames,  # noqa: E402
                                               loss_window)


def test_loss_window_reencodes_the_first_latent_through_the_codec_without_gradient():
    codec = ToyCodec()
    video = torch.randn(2, 16, 9, 4, 4, requires_grad=True)
    win = loss_window(video, 3, 6, reencode_first=ToyReencoder(codec), masked_frames=3)
    assert win.video.shape == (2, 16, 6, 4, 4) and win.loss_from == 3 and win.reencoded
    want_first = codec.encode(codec.decode(video[:, :, 3:4].detach()).clamp(-1, 1))
    assert torch.allclose(win.video[:, :, :1], want_first, atol=1e-5)
    # a random latent is off the codec's 12-dimensional image: re-encoding really changes it
    assert (win.video[:, :, 0] - video[:, :, 3]).abs().max() > 0.1
    assert torch.equal(win.video[:, :, 1:], video[:, :, 4:9])
    win.video.sum().backward()
    expect = torch.zeros_like(video)
    expect[:, :, 4:9] = 1  # the re-encoded frame and the frames outside the window get no gradient
    assert torch.equal(video.grad, expect)


def test_loss_window_at_the_start_or_without_reencoding_is_a_plain_slice():
    video = torch.randn(1, 16, 9, 4, 4)
    for win in (loss_window(video, 0, 6, reencode_first=ToyReencoder(ToyCodec()), masked_frames=3),
                loss_window(video, 3, 6, reencode_first=None, masked_frames=3)):
        assert win.loss_from == 0 and not win.reencoded
    assert torch.equal(loss_window(video, 3, 6).video, video[:, :, 3:])
    with pytest.raises(ValueError, match="outside"):
        loss_window(video, 4, 6)


def test_vae_reencoder_decodes_the_prefix_and_encodes_its_last_pixel_frame_alone():
    from self_forcing.sf_model.latent_format import to_model_space, to_raw
    from self_forcing.sf_model.vae.model import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()
    prefix = torch.randn(1, 16, 7, 2, 2)
    got = VaeReencoder(vae, chunk=3)(prefix)
    with torch.no_grad():
        pixels = vae.decode(to_raw(prefix))  # one pass: 1 + 4 * 6 = 25 pixel frames
        want = to_model_space(vae.encode(pixels[:, :, -1:]))
    assert pixels.shape[2] == 25 and got.shape == (1, 16, 1, 2, 2)
    assert torch.allclose(got, want, atol=1e-5)


def test_dmd_loss_leaves_the_masked_frames_out():
    video = torch.randn(1, 16, 6, 2, 2, requires_grad=True)
    grad = torch.randn(1, 16, 6, 2, 2)
    dmd_loss(video, grad, loss_from=3).backward()
    assert torch.count_nonzero(video.grad[:, :, :3]) == 0
    assert torch.allclose(video.grad[:, :, 3:], grad[:, :, 3:] / video[:, :, 3:].numel(), rtol=1e-6)


def test_rollout_lengths_are_whole_blocks_between_the_window_and_the_maximum():
    seen = {draw_rollout_frames(21, 30, 3, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {21, 24, 27, 30}
    assert {draw_rollout_frames(21, 21, 3, torch.Generator().manual_seed(s)) for s in range(5)} == {21}


def long_config(tmp_path, **dmd):
    from self_forcing.training.config import load_config

    return load_config(data={
        "run": {"out_dir": str(tmp_path), "progress": False},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32, "text_len": 16,
                  "freq_dim": 32},
        "world": {"size": 8, "frames": 6},
        "dmd": {"batch_size": 1, "critic_ratio": 1, "lr": 1e-3, "rollout_frames": 12, **dmd}})


def three_models(cfg):
    """Generator, critic and real score with non-zero heads (so the scores disagree)."""
    out = []
    for seed in range(3):
        m = build_model(cfg.model, seed, torch.device("cpu"))
        with torch.no_grad():
            m.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 10))
        out.append(m)
    return out


def test_long_rollouts_train_on_the_last_window_with_the_first_latent_reencoded(tmp_path, monkeypatch):
    from self_forcing.training import dmd as dmd_mod
    from self_forcing.training.data import make_world
    from self_forcing.training.engine import Runtime

    cfg = long_config(tmp_path)
    world = make_world(cfg)
    trainer = dmd_mod.DmdTrainer.from_models(cfg, Runtime(device=torch.device("cpu")), world,
                                             *three_models(cfg))
    assert isinstance(trainer.reencoder, ToyReencoder)
    calls = []
    original_rollout, original_window = dmd_mod.rollout, dmd_mod.loss_window

    def spy_rollout(*args, **kwargs):
        video = original_rollout(*args, **kwargs)
        calls.append({"frames": video.shape[2], "grad_from": kwargs["grad_from"], "grad": kwargs["grad"]})
        return video

    def spy_window(video, start, length, **kwargs):
        win = original_window(video, start, length, **kwargs)
        calls[-1].update(start=start, length=length, loss_from=win.loss_from, reencoded=win.reencoded)
        return win

    monkeypatch.setattr(dmd_mod, "rollout", spy_rollout)
    monkeypatch.setattr(dmd_mod, "loss_window", spy_window)
    lengths = set()
    for step in range(8):
        m = trainer.step(step)
        lengths.add(int(m["rollout_frames"]))
        assert torch.isfinite(torch.as_tensor(m["generator_loss"])) and m["generator_grad_norm"] > 0
    assert lengths == {6, 9, 12}  # whole blocks from the window (6) to rollout_frames (12)
    for c in calls:
        assert c["length"] == 6 and c["start"] == c["frames"] - 6 == c["grad_from"]
        assert c["reencoded"] == (c["frames"] > 6) and c["loss_from"] == (3 if c["frames"] > 6 else 0)
    # keyed: the same steps draw the same lengths
    again = dmd_mod.DmdTrainer.from_models(cfg, Runtime(device=torch.device("cpu")), world, *three_models(cfg))
    assert [again.rollout_frames(0, "dmd", "gen-frames", s) for s in range(8)] == \
           [trainer.rollout_frames(0, "dmd", "gen-frames", s) for s in range(8)]


def test_long_rollout_config_is_checked(tmp_path):
    from self_forcing.training.config import load_config

    with pytest.raises(ValueError, match="rollout_frames"):
        long_config(tmp_path, rollout_frames=10)  # not whole blocks
    with pytest.raises(ValueError, match="rollout_frames"):
        long_config(tmp_path, rollout_frames=3)  # shorter than the window
    cfg = load_config(data={"world": {"kind": "wan", "frames": 21}, "dmd": {"rollout_frames": 27}})
    from self_forcing.training.dmd import make_reencoder

    with pytest.raises(ValueError, match=r"set models\.vae"):
        make_reencoder(cfg, object(), torch.device("cpu"))


def test_alternate_updates_the_generator_every_critic_ratio_steps_and_the_critic_every_step():
    """``dmd.alternate`` (the step of DmdTrainer and SfppTrainer): on a step divisible by the ratio the
    generator first, then the critic; their metrics merged."""
    from self_forcing.training.dmd import alternate

    calls = []

    def gen(step):
        calls.append(("generator", step))
        return {"generator_loss": float(step)}

    def critic(step):
        calls.append(("critic", step))
        return {"critic_loss": -float(step)}

    out = [alternate(s, 3, gen, critic) for s in range(5)]
    assert calls == [("generator", 0), ("critic", 0), ("critic", 1), ("critic", 2), ("generator", 3),
                     ("critic", 3), ("critic", 4)]
    assert out[3] == {"generator_loss": 3.0, "critic_loss": -3.0} and out[4] == {"critic_loss": -4.0}
