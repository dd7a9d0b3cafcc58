"""Self Forcing rollouts: the sampler's own code, gradient only at each block's exit-step forward,
and a cache that never carries gradient between blocks (a test that fails with in-place cache writes)."""

import pytest
import torch

from self_forcing.sf_model.cache import KVCache
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk, denoise_chunk, generate
from self_forcing.sf_model.schedule import make_steps
from self_forcing.training.dmd import rollout
from self_forcing.training.models import build_model

OPTS = StreamOptions()
STEPS = make_steps(OPTS.steps, OPTS.shift, OPTS.warp)
SHAPE = (16, 6, 4, 4)  # C, F (2 blocks of 3), H, W


def make_model(seed=0):
    model = build_model(TINY, seed, torch.device("cpu"))
    with torch.no_grad():  # a non-zero head so every path carries gradient
        model.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return model.train()


def context(batch=1, seed=0):
    return torch.randn(batch, 5, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def noise_source(seed=0):
    def noise_for(block, frames, count):
        return chunk_noise(seed, block, count, (1, 16, frames, 4, 4), "cpu")
    return noise_for


class LeakyCache(KVCache):
    """The official code's pattern, emulated: later blocks attend to K/V that still carry the gradient
    path of earlier blocks' exit-step forwards (in-place writes of grad-carrying tensors)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leaks = {}

    def valid_with_current(self, layer, k, v):
        kc, vc = super().valid_with_current(layer, k, v)
        ft = self.frame_tokens
        mine = {slot for slot, _, _ in self.plan.runs}
        for (lay, slot, n), (dk, dv) in self.leaks.items():
            if lay == layer and slot not in mine and (slot + n) * ft <= kc.shape[1]:
                ek, ev = torch.zeros_like(kc), torch.zeros_like(vc)
                ek[:, slot * ft:(slot + n) * ft] = dk
                ev[:, slot * ft:(slot + n) * ft] = dv
                kc, vc = kc + ek, vc + ev
        for slot, off, n in self.plan.runs:
            part_k, part_v = k[:, off * ft:(off + n) * ft], v[:, off * ft:(off + n) * ft]
            self.leaks[(layer, slot, n)] = (part_k - part_k.detach(), part_v - part_v.detach())
        return kc, vc


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def new_cache(model, cls=KVCache):
    c = model.config
    return cls(c.num_layers, 1, 4, c.num_heads, c.head_dim, window=6, dtype=torch.float32, device=torch.device("cpu"))


def run_rollout(model, exit_index, cache=None):
    text = model.encode_text(context())
    return rollout(model, text, batch=1, clip_shape=SHAPE, steps=STEPS, opts=OPTS, exit_index=exit_index,
                   noise_for=noise_source(), grad=True, cache_dtype=torch.float32, cache=cache)


def reference_block1_grads(model, exit_index):
    """Block 0 entirely without gradient, block 1 with gradient at its exit step: what truncation means."""
    text = model.encode_text(context())
    cache = new_cache(model)
    noise = noise_source()
    with torch.no_grad():
        x0 = denoise_chunk(model, text, cache, 0, noise(0, 3, exit_index + 1), STEPS, OPTS, exit_index=exit_index)
        commit_chunk(model, text, cache, 0, x0, OPTS)
    x1 = denoise_chunk(model, text, cache, 3, noise(1, 3, exit_index + 1), STEPS, OPTS, exit_index=exit_index,
                       grad_at_exit=True)
    return grads_of(model, x1.square().mean())


@pytest.mark.parametrize("exit_index", [1, 3])
def test_later_block_gradient_reaches_only_its_own_exit_forward(exit_index):
    model = make_model()
    video = run_rollout(model, exit_index)
    got = grads_of(model, video[:, :, 3:].square().mean())
    want = reference_block1_grads(model, exit_index)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-8), name
    assert sum(float(g.abs().sum()) for g in got.values()) > 0


def test_the_isolation_test_catches_in_place_cache_writes():
    model = make_model()
    leaky = run_rollout(model, 2, cache=new_cache(model, LeakyCache))
    clean = run_rollout(model, 2)
    assert torch.equal(leaky, clean)  # same values: only the gradient path differs
    got = grads_of(model, leaky[:, :, 3:].square().mean())
    want = reference_block1_grads(model, 2)
    worst = max(float((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-12)) for n in want)
    assert worst > 1e-2  # the leak reaches block 0's exit-step forward


def test_first_block_gets_gradient_only_from_its_own_output():
    model = make_model()
    video = run_rollout(model, 2)
    got = grads_of(model, video[:, :, :3].square().mean())
    text = model.encode_text(context())
    cache = new_cache(model)
    x0 = denoise_chunk(model, text, cache, 0, noise_source()(0, 3, 3), STEPS, OPTS, exit_index=2, grad_at_exit=True)
    want = grads_of(model, x0.square().mean())
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-8), name


def test_only_exit_step_forwards_record_gradient(monkeypatch):
    model = make_model()
    calls = []
    original = model.forward_chunk

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.requires_grad)
        return out

    monkeypatch.setattr(model, "forward_chunk", spy)
    run_rollout(model, 2)
    # per block: steps 0..2 (only step 2 with grad), then the no-grad clean pass of block 0
    assert calls == [False, False, True, False, False, False, True]


def test_blocks_before_grad_from_exit_without_gradient(monkeypatch):
    """The official trainer's last-window rule: only blocks starting at ``grad_from`` or later record
    gradient at their exit step; earlier blocks exit at the same step under no_grad."""
    model = make_model()
    calls = []
    original = model.forward_chunk

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.requires_grad)
        return out

    monkeypatch.setattr(model, "forward_chunk", spy)
    text = model.encode_text(context())
    video = rollout(model, text, batch=1, clip_shape=SHAPE, steps=STEPS, opts=OPTS, exit_index=2,
                    noise_for=noise_source(), grad=True, cache_dtype=torch.float32, grad_from=3)
    assert calls == [False, False, False, False, False, False, True]
    got = grads_of(model, video.square().mean())
    want = reference_block1_grads(model, 2)  # block 0 without gradient, block 1 at its exit: the same graph
    for name in want:
        assert torch.allclose(got[name] * video.numel() / video[:, :, 3:].numel(), want[name], rtol=1e-4,
                              atol=1e-8), name
    video = rollout(model, model.encode_text(context()), batch=1, clip_shape=SHAPE, steps=STEPS, opts=OPTS,
                    exit_index=2, noise_for=noise_source(), grad=True, cache_dtype=torch.float32, grad_from=3)
    first = grads_of(model, video[:, :, :3].square().mean() + 0 * video[:, :, 3:].sum())
    assert all(torch.count_nonzero(g) == 0 for g in first.values())


def test_rollout_without_exit_is_the_sampler():
    model = make_model().eval()
    ctx = context()
    with torch.no_grad():
        ours = rollout(model, model.encode_text(ctx), batch=1, clip_shape=SHAPE, steps=STEPS, opts=OPTS,
                       exit_index=len(STEPS) - 1, noise_for=noise_source(7), grad=False,
                       cache_dtype=torch.float32)
    theirs = generate(model, ctx, num_frames=6, height=4, width=4, seed=7, options=OPTS)
    assert torch.equal(ours, theirs)


def test_rollout_rejects_bad_exit():
    model = make_model()
    with pytest.raises(ValueError, match="exit_index"):
        run_rollout(model, 4)
