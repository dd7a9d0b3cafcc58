"""KV cache policies: fixed, rolling window, sink; bounded memory; slot overwrite; reset."""

import gc
import warnings

import pytest
import torch

from self_forcing.sf_model.cache import KVCache
from self_forcing.sf_model.sampler import StreamOptions, chunk_plan, stream


def inputs(frames, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, frames, h, w, generator=g), torch.randn(1, 10, 32, generator=g),
            torch.rand(1, frames, generator=g) * 1000)


def run_blocks(model, x, t, ctx, fpb, window, sink):
    _, _, frames, h, w = x.shape
    text = model.encode_text(ctx)
    cache = model.new_cache(1, (h // 2) * (w // 2), window=window, sink=sink)
    outs = [model.forward_chunk(x[:, :, s:s + n], t[:, s:s + n], text, cache, s)
            for s, n in chunk_plan(0, frames, fpb)]
    return torch.cat(outs, 2)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_rolling_window_at_least_video_length_equals_fixed(tiny_model):
    x, ctx, t = inputs(9)
    with torch.no_grad():
        fixed = run_blocks(tiny_model, x, t, ctx, 3, window=9, sink=0)
        rolling = run_blocks(tiny_model, x, t, ctx, 3, window=12, sink=0)
        with_sink = run_blocks(tiny_model, x, t, ctx, 3, window=9, sink=2)
    assert rel(rolling, fixed) <= 1e-6
    assert rel(with_sink, fixed) <= 1e-6


def explicit_visibility(frames, fpb, window, sink):
    """Written from the definition, independently of sf_model.mask: [sink frames | last W frames]."""
    vis = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        end = min((q // fpb + 1) * fpb, frames)
        allowed = set(range(min(sink, end))) | set(range(max(0, end - window), end))
        for k in allowed:
            vis[q, k] = True
    return vis


@pytest.mark.parametrize("fpb,window,sink", [(3, 6, 0), (3, 4, 1), (1, 3, 2), (2, 5, 1), (3, 5, 3)])
def test_window_and_sink_equal_explicitly_masked_attention(tiny_model, monkeypatch, fpb, window, sink):
    frames = 12 - 12 % fpb
    x, ctx, t = inputs(frames)
    import self_forcing.sf_model.model as model_mod

    # Full-sequence forward whose mask is the explicit one built above (not sf_model.mask's).
    def explicit_mask(num_frames, frame_tokens, *_args, **_kw):
        vis = explicit_visibility(num_frames, fpb, window, sink)
        return vis.repeat_interleave(frame_tokens, 0).repeat_interleave(frame_tokens, 1)

    monkeypatch.setattr(model_mod, "build_mask", explicit_mask)
    with torch.no_grad():
        full = tiny_model(x, t, ctx, frames_per_block=fpb)
    monkeypatch.undo()
    with torch.no_grad():
        inc = run_blocks(tiny_model, x, t, ctx, fpb, window, sink)
    assert rel(inc, full) <= 1e-5


@pytest.mark.parametrize("fpb,window,sink", [(3, 6, 0), (3, 4, 1), (1, 3, 2), (2, 5, 1)])
def test_valid_slots_hold_exactly_sink_and_last_window_frames(fpb, window, sink):
    cache = KVCache(1, 1, 2, 1, 2, window=window, sink=sink, dtype=torch.float32, device="cpu")
    slot_frame = {}
    for start, n in chunk_plan(0, 40, fpb):
        plan = cache.begin(start, n)
        for i in range(n):
            slot_frame[cache.slot(start + i)] = start + i
        seen = {slot_frame[s] for s in range(plan.valid_frames)}
        end = start + n
        assert seen == set(range(min(sink, end))) | set(range(max(0, end - window), end))


def test_memory_is_flat_after_the_window_fills(tiny_model):
    """200 further blocks after the window is full: same buffers, same size, no growing tensor count."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 10, 32, generator=g)
    cache = tiny_model.new_cache(1, 6, window=4, sink=1)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    size = cache.nbytes()
    opts = StreamOptions(frames_per_block=1, steps=(1000,), window=4, sink=1)
    counts = {}

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some torch module objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for chunk in stream(tiny_model, ctx, num_frames=210, height=4, width=6, seed=1, options=opts, cache=cache):
        if chunk.index in (10, 209):
            counts[chunk.index] = live_tensors()
        assert (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
        assert cache.nbytes() == size
    assert counts[209] <= counts[10]


def test_rerunning_a_block_overwrites_its_own_slots(tiny_model):
    x, ctx, t = inputs(6)
    text = tiny_model.encode_text(ctx)
    cache = tiny_model.new_cache(1, 6, window=6)
    with torch.no_grad():
        tiny_model.forward_chunk(x[:, :, :3], t[:, :3], text, cache, 0)
        noisy = tiny_model.forward_chunk(x[:, :, 3:], t[:, 3:] * 0 + 1000, text, cache, 3)  # a noisy pass
        assert cache.frames_written == 6
        out = tiny_model.forward_chunk(x[:, :, 3:], t[:, 3:], text, cache, 3)  # same block again
        ref = tiny_model(x, t, ctx, frames_per_block=3)[:, :, 3:]
    assert cache.frames_written == 6
    assert rel(out, ref) <= 1e-5 and rel(noisy, ref) > 1e-3


def test_reset_reuses_buffers_and_gives_identical_results(tiny_model):
    x, ctx, t = inputs(6)
    text = tiny_model.encode_text(ctx)
    cache = tiny_model.new_cache(1, 6, window=6)
    ptr = cache.k.data_ptr()
    with torch.no_grad():
        a = [tiny_model.forward_chunk(x[:, :, s:s + 3], t[:, s:s + 3], text, cache, s) for s in (0, 3)]
        cache.reset()
        b = [tiny_model.forward_chunk(x[:, :, s:s + 3], t[:, s:s + 3], text, cache, s) for s in (0, 3)]
    assert cache.k.data_ptr() == ptr
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_cache_refuses_out_of_order_blocks():
    cache = KVCache(1, 1, 2, 1, 2, window=6, dtype=torch.float32, device="cpu")
    cache.begin(0, 3)
    with pytest.raises(ValueError, match="in order"):
        cache.begin(6, 3)
    cache.begin(3, 3)
    with pytest.raises(ValueError, match="only the newest chunk"):
        cache.begin(0, 3)
    with pytest.raises(ValueError, match="does not fit"):
        cache.begin(6, 7)
