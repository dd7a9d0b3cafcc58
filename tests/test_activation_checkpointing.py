"""Activation checkpointing (sf_model.recompute): recomputed blocks give the same outputs and gradients,
cached chunk forwards never read the cache when recomputed, and blocks really are recomputed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from self_forcing.sf_model.cache import KVCache
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.mask import teacher_forcing_positions, teacher_forcing_visibility
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.recompute import HistoryRewritten
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk, denoise_chunk, generate
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.schedule import make_steps
from self_forcing.training.dmd import rollout
from self_forcing.training.models import frozen_copy, load_dit, save_dit

OPTS = StreamOptions()
STEPS = make_steps(OPTS.steps, OPTS.shift, OPTS.warp)
C, H, W = 16, 4, 4
FT = (H // 2) * (W // 2)


def trainable(make_tiny, seed=0):
    return make_tiny(seed=seed).train().requires_grad_(True)


def context(seed=0):
    return torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def noise_for(block, frames, count):
    return chunk_noise(3, block, count, (1, C, frames, H, W), "cpu")


def weights_like(x, seed=5):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def new_cache(model, window, sink=0, key_means=False):
    return model.new_cache(1, FT, window=window, sink=sink, key_means=key_means)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-6, atol=1e-8):
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=rtol, atol=atol), n


def worst_rel(a, b):
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)


def rollout_grads(model, frames=9, window=None, sink=0, exit_index=1):
    """The trainer's generator rollout (gradient at every block's exit-step forward; later blocks are
    committed to the cache before backward), then backward through a weighted sum of the video."""
    text = model.encode_text(context())
    cache = new_cache(model, window or frames, sink)
    video = rollout(model, text, batch=1, clip_shape=(C, frames, H, W), steps=STEPS, opts=OPTS,
                    exit_index=exit_index, noise_for=noise_for, grad=True, cache_dtype=torch.float32, cache=cache)
    return video.detach(), grads(model, (video * weights_like(video)).sum())


# -- (a) rollouts: same video, same gradients --------------------------------------------------------
@pytest.mark.parametrize("history", ["view", "copy"])
def test_rollout_gradients_equal_with_checkpointing(make_tiny, history):
    model = trainable(make_tiny)
    video, want = rollout_grads(model)
    model.set_activation_checkpointing(True, history=history)
    video_ckpt, got = rollout_grads(model)
    assert torch.equal(video, video_ckpt)
    assert_same(got, want)
    assert "text_embedding.0.weight" in got and "blocks.0.self_attn.k.weight" in got


def test_rolling_window_rollout_needs_copied_history(make_tiny):
    """Window 6 < 9 frames: the third block overwrites the first block's slots, which the second block's
    exit-step forward attends to. Copies stay correct; views are refused at backward, never wrong."""
    model = trainable(make_tiny)
    video, want = rollout_grads(model, window=6, sink=1)
    model.set_activation_checkpointing(True, history="copy")
    video_ckpt, got = rollout_grads(model, window=6, sink=1)
    assert torch.equal(video, video_ckpt)
    assert_same(got, want)
    model.set_activation_checkpointing(True, history="view")
    with pytest.raises(HistoryRewritten, match="history='copy'"):
        rollout_grads(model, window=6, sink=1)


# -- (b) recompute never reads the cache ----------------------------------------------------------------
def overwritten_cache_grads(model, checkpointed: bool, history: str = "copy", advance: bool = True):
    """Block 0 committed; block 1's exit-step forward records gradient; then block 1 is committed,
    block 2 too (``advance``), and every cache slot is overwritten with other values before backward."""
    model.set_activation_checkpointing(checkpointed, history=history)
    text = model.encode_text(context())
    cache = new_cache(model, 9)
    with torch.no_grad():
        x0 = denoise_chunk(model, text, cache, 0, noise_for(0, 3, 2), STEPS, OPTS, exit_index=1)
        commit_chunk(model, text, cache, 0, x0, OPTS)
    x1 = denoise_chunk(model, text, cache, 3, noise_for(1, 3, 2), STEPS, OPTS, exit_index=1, grad_at_exit=True)
    with torch.no_grad():
        commit_chunk(model, text, cache, 3, x1, OPTS)
        if advance:
            commit_chunk(model, text, cache, 6, torch.randn(1, C, 3, H, W), OPTS)
        g = torch.Generator().manual_seed(11)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return grads(model, (x1 * weights_like(x1)).sum())


@pytest.mark.parametrize("advance", [False, True])
def test_recompute_ignores_later_cache_contents(make_tiny, advance):
    model = trainable(make_tiny)
    want = overwritten_cache_grads(model, checkpointed=False, advance=advance)
    got = overwritten_cache_grads(model, checkpointed=True, history="copy", advance=advance)
    assert_same(got, want)


def test_view_history_refuses_an_overwritten_cache(make_tiny):
    model = trainable(make_tiny)
    with pytest.raises(HistoryRewritten):
        overwritten_cache_grads(model, checkpointed=True, history="view")


def test_the_recompute_test_catches_blocks_that_read_the_cache(make_tiny, monkeypatch):
    """The deliberately wrong implementation: checkpointed blocks whose attention closure reads the cache
    (``cache.valid_with_current`` under the cache's current plan) when called, i.e. again in backward."""
    model = trainable(make_tiny)
    want = overwritten_cache_grads(model, checkpointed=False, advance=False)
    monkeypatch.setattr(model, "_explicit_history", lambda: False)
    # same plan at backward (block 1's clean pass), other slot contents: a silently wrong gradient
    wrong = overwritten_cache_grads(model, checkpointed=True, history="copy", advance=False)
    assert all(blk.checkpoint for blk in model.blocks)
    assert worst_rel(wrong, want) > 1e-2
    # a later plan at backward (block 2 committed): recompute sees other shapes, checkpoint refuses
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        overwritten_cache_grads(model, checkpointed=True, history="copy", advance=True)


def test_routed_history_under_checkpointing(make_tiny):
    """History routing (top-1 of the cached frames): the routed snapshot is an input too."""
    opts = StreamOptions(frames_per_block=1, routing_topk=1)

    def run(history=None):
        model.set_activation_checkpointing(history is not None, history=history or "view")
        text = model.encode_text(context())
        cache = new_cache(model, 4, key_means=True)
        with torch.no_grad():
            for f in range(3):
                commit_chunk(model, text, cache, f, torch.randn(1, C, 1, H, W, generator=gen(f)), opts)
        x = denoise_chunk(model, text, cache, 3, noise_for(3, 1, 2), STEPS, opts, exit_index=1, grad_at_exit=True)
        with torch.no_grad():
            commit_chunk(model, text, cache, 3, x, opts)
            commit_chunk(model, text, cache, 4, torch.randn(1, C, 1, H, W, generator=gen(4)), opts)
        if not any(p.requires_grad for p in model.parameters()):
            return {"x": x.detach()}
        return grads(model, (x * weights_like(x)).sum())

    gen = lambda s: torch.Generator().manual_seed(100 + s)  # noqa: E731
    model = trainable(make_tiny)
    want = run()
    assert_same(run("copy"), want)
    with pytest.raises(HistoryRewritten):  # frame 4 wrapped onto slot 0 of the 4-frame window
        run("view")
    model.requires_grad_(False)  # gradient mode on, nothing to differentiate: the same chunk output
    assert torch.equal(run("copy")["x"], run()["x"])


# -- (c) full-sequence forward ----------------------------------------------------------------------
def full_inputs(frames=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, C, frames, H, W, generator=g), torch.rand(1, frames, generator=g) * 1000


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional", "teacher_forcing", "routed"])
def test_full_sequence_forward_equal_with_checkpointing(make_tiny, layout):
    model = trainable(make_tiny)
    x, t = full_inputs()
    kwargs = {"block_causal": dict(frames_per_block=3), "bidirectional": {},
              # [clean | noisy] sequence of 2 x 3 frames with duplicated RoPE positions
              "teacher_forcing": dict(visibility=teacher_forcing_visibility(3, 1),
                                      positions=teacher_forcing_positions(3)),
              "routed": dict(visibility=teacher_forcing_visibility(3, 1), positions=teacher_forcing_positions(3),
                             routing_topk=1)}[layout]

    def run():
        out = model(x, t, context(), **kwargs)
        return out.detach(), grads(model, (out * weights_like(out)).sum())

    out, want = run()
    model.set_activation_checkpointing(True)
    out_ckpt, got = run()
    assert torch.equal(out, out_ckpt)
    assert_same(got, want)


def test_checkpointing_composes_with_bf16_autocast(make_tiny):
    model = trainable(make_tiny)
    x, t = full_inputs()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, context(), frames_per_block=3)
            video, _ = rollout_grads(model, frames=6)
        return out.detach(), grads(model, (out.float() * weights_like(out)).sum()), video

    out, want, video = run()
    model.set_activation_checkpointing(True)
    out_ckpt, got, video_ckpt = run()
    assert torch.equal(out, out_ckpt) and torch.equal(video, video_ckpt)
    assert_same(got, want, rtol=1e-5, atol=1e-6)


# -- (d) blocks are recomputed; less is kept; gradient-free calls unchanged -------------------------
def count_block_calls(model):
    calls = []
    for i, blk in enumerate(model.blocks):
        inner = blk.pre_attention
        blk.pre_attention = lambda *a, _i=i, _f=inner: (calls.append(_i), _f(*a))[1]
    return calls


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("chunked", [False, True])
def test_blocks_are_recomputed_and_keep_less(make_tiny, chunked):
    x, t = full_inputs(frames=3)
    layers = TINY.num_layers

    def forward(model):
        if not chunked:
            return model(x, t, context(), frames_per_block=3)
        cache = new_cache(model, 3)
        return model.forward_chunk(x, t, model.encode_text(context()), cache, 0)

    counts, kept = {}, {}
    for ckpt in (False, True):
        model = trainable(make_tiny).set_activation_checkpointing(ckpt)
        assert model.activation_checkpointing is ckpt
        calls = count_block_calls(model)
        out, kept[ckpt] = saved_bytes(lambda: forward(model))
        forward_calls = len(calls)
        out.sum().backward()
        counts[ckpt] = (forward_calls, len(calls))
    assert counts[False] == (layers, layers)
    assert counts[True] == (layers, 2 * layers)
    assert kept[True] < 0.5 * kept[False]


def test_off_by_default_and_gradient_free_sampling_unchanged(make_tiny):
    model = make_tiny()
    assert model.activation_checkpointing is False
    with torch.no_grad():
        plain = generate(model, context(), num_frames=6, height=H, width=W, seed=4, options=OPTS)
        model.set_activation_checkpointing(True)
        calls, forwards, inner = count_block_calls(model), [], model.forward_chunk
        model.forward_chunk = lambda *a, **k: (forwards.append(1), inner(*a, **k))[1]
        ckpt = generate(model, context(), num_frames=6, height=H, width=W, seed=4, options=OPTS)
    assert torch.equal(plain, ckpt)
    assert len(forwards) >= 2 * len(OPTS.steps) and len(calls) == TINY.num_layers * len(forwards)
    with pytest.raises(ValueError, match="history mode"):
        model.set_activation_checkpointing(True, history="clone")


# -- bf16 frozen models ------------------------------------------------------------------------------
class Allocations(TorchDispatchMode):
    """Records (dtype, numel) of every new non-meta tensor an aten op returns (not views of its inputs)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        known = {t.untyped_storage().data_ptr() for t in inputs if t.device.type != "meta"}
        for o in tree_flatten(out)[0]:
            if (isinstance(o, torch.Tensor) and o.device.type != "meta"
                    and o.untyped_storage().data_ptr() not in known):
                self.seen.append((o.dtype, o.numel()))
        return out

    def float32_weights(self, min_numel):
        return [n for d, n in self.seen if d == torch.float32 and n >= min_numel]


def test_bf16_loading_and_copies_never_hold_float32_weights(make_tiny, tmp_path):
    source = make_tiny(seed=2)
    path = str(tmp_path / "teacher.safetensors")
    save_dit(path, source, TINY, "teacher", dtype=torch.bfloat16)
    big = TINY.dim * TINY.dim  # the size of one attention projection

    with Allocations() as seen:
        model, meta = load_dit(path, torch.device("cpu"), dtype=torch.bfloat16)
    assert meta["role"] == "teacher"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert seen.float32_weights(big) == []
    for (n, p), (_, q) in zip(model.named_parameters(), source.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n

    reference, _ = load_dit(path, torch.device("cpu"))  # the float32 default is unchanged
    assert {p.dtype for p in reference.parameters()} == {torch.float32}

    with Allocations() as seen:
        real = frozen_copy(reference, dtype=torch.bfloat16)
    assert seen.float32_weights(big) == []
    assert isinstance(real, CausalWanModel) and {p.dtype for p in real.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in real.parameters()) and not real.training
    for (n, p), (_, q) in zip(real.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n
    x, t = full_inputs()
    with torch.no_grad():
        assert torch.equal(real(x, t, context()), model(x, t, context()))
    same = frozen_copy(reference)
    assert same.dtype == torch.float32 and same is not reference
