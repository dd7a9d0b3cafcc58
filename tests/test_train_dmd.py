"""The DMD gradient: zero when the fake and real scores agree, the paper's normalisation, and a loss whose
gradient on the video is exactly the normalised gradient."""

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
