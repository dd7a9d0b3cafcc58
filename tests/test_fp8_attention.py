"""Opt-in FP8 K/V cache: quantisation round trip, a cached video against the exact one, memory, refusals."""

import pytest
import torch

from self_forcing.sf_model.cache import KVCache
from self_forcing.sf_model.sampler import StreamOptions, generate, stream
from self_forcing.sf_model.speed import kv_fp8
from self_forcing.sf_model.speed.graphs import ChunkGraphs
from self_forcing.sf_model.speed.kv_fp8 import Fp8KVCache, attend_fp8, dequantize_frames, quantize_frames

FT = 6  # tokens per frame of a 4x6 latent with 2x2 patches


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def within_e4m3(x, y, scale_per_elem):
    """|x - y| within e4m3 rounding: half an ulp of 3 mantissa bits (2^-4 relative) for normal values, half
    the smallest subnormal step (2^-10 of the block scale) below."""
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale_per_elem * 2.0 ** -10) * 1.0001 + 1e-12
    return bool(((x - y).abs() <= bound).all())


def test_frame_quantisation_round_trips_within_the_e4m3_bound_per_frame_and_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4 * FT, 3, 16, generator=g)
    x = x * torch.tensor([1e-3, 1.0, 30.0, 1e3]).repeat_interleave(FT)[None, :, None, None]  # frames of other sizes
    x[:, :, 1] *= 50  # and a louder head
    q, s = quantize_frames(x, FT)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 4, 3) and s.dtype == torch.float32
    assert (q.float().abs().amax(dim=(1, 3)) <= 448).all()
    per_elem = s[:, :, None, :, None].expand(2, 4, FT, 3, 16).flatten(1, 2)
    y = dequantize_frames(q, s, FT, torch.float32)
    assert within_e4m3(x, y, per_elem)
    # the block's maximum maps to e4m3's largest value: each frame and head uses the whole range
    torch.testing.assert_close(s, x.abs().unflatten(1, (4, FT)).amax(dim=(2, 4)) / 448)
    # the tiny frame keeps its own precision (a single scale for the tensor would flush it to zero)
    assert rel(y[:, :FT], x[:, :FT]) < 0.04


def test_cache_stores_e4m3_in_ring_slots_and_reads_back_within_the_bound():
    cache = Fp8KVCache(2, 1, FT, 2, 8, window=3, sink=1, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)
    written = {}
    for start in range(0, 7, 2):  # chunks of 2 frames through a sink of 1 and a ring of 3
        cache.begin(start, 2)
        k = torch.randn(1, 2 * FT, 2, 8, generator=g) * (start + 1)
        v = torch.randn(1, 2 * FT, 2, 8, generator=g)
        for layer in range(2):
            cache.write(layer, k * (layer + 1), v)
        for i in range(2):
            written[cache.slot(start + i)] = k[:, i * FT:(i + 1) * FT]
        if start == 0:
            first_chunk_mean = k.mean(1)
    assert cache.k.dtype == torch.float8_e4m3fn and cache.v.dtype == torch.float8_e4m3fn
    kr, vr = cache.valid(0)
    assert kr.dtype == torch.float32 and kr.shape == (1, 4 * FT, 2, 8)
    shift = cache.k_shift[0][:, None]  # keys are stored minus the mean key of the chunk of frame 0
    torch.testing.assert_close(shift[:, 0], first_chunk_mean)
    for slot, k in written.items():
        got = kr[:, slot * FT:(slot + 1) * FT]
        scale = (k - shift).abs().amax(dim=(1, 3), keepdim=True) / 448
        assert within_e4m3(k - shift, got - shift, scale.expand_as(k))
        assert rel(got, k) < 0.04
    k8, v8, ks, vs = cache.valid_fp8(1)  # raw for an FP8 kernel: e4m3 + [B, frames, heads] scales
    assert k8.dtype == torch.float8_e4m3fn and ks.shape == (1, 4, 2)
    torch.testing.assert_close(dequantize_frames(k8, ks, FT, torch.float32, cache.k_shift[1]), cache.valid(1)[0])
    torch.testing.assert_close(dequantize_frames(v8, vs, FT, torch.float32), cache.valid(1)[1])
    # history pieces (activation checkpointing, valid_with_current) are the same dequantised values
    hk, hv, order = cache.history(1)
    spans, same_order = cache.history_spans()
    assert spans and same_order == order
    for pk, pv, (lo, hi) in zip(hk, hv, spans):
        assert pk.dtype == torch.float32
        torch.testing.assert_close(pk, cache.valid(1)[0][:, lo * FT:hi * FT])
        torch.testing.assert_close(pv, cache.valid(1)[1][:, lo * FT:hi * FT])


def test_fp8_kv_video_is_close_to_the_exact_one_and_really_quantised(tiny_model):
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    for extra in ({}, {"window": 3, "sink": 1}):
        exact = generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=2, options=StreamOptions(**extra))
        fp8 = generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=2,
                       options=StreamOptions(kv_fp8=True, **extra))
        err = rel(fp8, exact)
        assert 1e-4 < err < 0.03, (extra, err)  # measured ~0.005-0.008; fails if quantisation is skipped
    again = generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=2, options=StreamOptions(kv_fp8=True))
    assert torch.equal(again, generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=2,
                                       options=StreamOptions(kv_fp8=True)))


def test_history_is_quantised_once_when_written_not_per_step(tiny_model, monkeypatch):
    seen = []
    real = kv_fp8.quantize_frames

    def counting(x, ft):
        seen.append(x.shape[1] // ft)
        return real(x, ft)

    monkeypatch.setattr(kv_fp8, "quantize_frames", counting)
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    opts = StreamOptions(kv_fp8=True, steps=(1000, 750, 500))
    generate(tiny_model, ctx, num_frames=9, height=4, width=6, seed=2, options=opts)
    # 3 chunks x (3 denoising passes + a clean pass for the first two) x 2 layers x (K, V), 3 frames each:
    # only the chunk's own frames are ever quantised, never the history it reads
    assert seen == [3] * ((3 * 3 + 2) * 2 * 2)


def test_fp8_cache_halves_the_kv_bytes_of_bf16():
    shape = dict(num_layers=30, batch=1, frame_tokens=1560, num_heads=12, head_dim=128, window=21)
    bf16 = KVCache(**shape, dtype=torch.bfloat16, device="meta")
    fp8 = Fp8KVCache(**shape, dtype=torch.bfloat16, device="meta")
    kv = lambda c: c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()  # noqa: E731
    assert kv(fp8) * 2 == kv(bf16)
    assert bf16.nbytes() == kv(bf16) and 0.5 < fp8.nbytes() / bf16.nbytes() < 0.5001  # scales, key shift: tiny
    assert fp8.quantized and not bf16.quantized


def test_refusals_and_the_graph_key():
    with pytest.raises(ValueError, match="routing"):
        StreamOptions(kv_fp8=True, routing_topk=2, window=6)
    with pytest.raises(ValueError, match="rebased"):
        StreamOptions(kv_fp8=True, window=6, sink=1, positions="rebased")
    with pytest.raises(ValueError, match="routing"):
        Fp8KVCache(1, 1, FT, 2, 8, window=3, dtype=torch.float32, device="cpu", key_means=True)
    cache = Fp8KVCache(1, 1, FT, 2, 8, window=3, dtype=torch.float32, device="cpu")
    cache.begin(0, 1)
    key = ChunkGraphs.situation(torch.zeros(1, 2, 1, 4, 6), torch.zeros(1, 1), cache, ())
    assert cache.k_scale.data_ptr() in key[-2] and cache.v_scale.data_ptr() in key[-2]


def test_given_cache_must_match_the_option(tiny_model):
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    plain = tiny_model.new_cache(1, FT, window=3)
    with pytest.raises(ValueError, match="FP8"):
        next(stream(tiny_model, ctx, num_frames=3, height=4, width=6, options=StreamOptions(kv_fp8=True),
                    cache=plain))
    quant = Fp8KVCache.for_model(tiny_model, 1, FT, window=3)
    chunk = next(stream(tiny_model, ctx, num_frames=3, height=4, width=6, options=StreamOptions(kv_fp8=True),
                        cache=quant))
    assert chunk.latents.shape == (1, 16, 3, 4, 6) and quant.k_scale.abs().sum() > 0


def test_attend_fp8_is_attention_on_the_dequantised_cache():
    cache = Fp8KVCache(1, 1, FT, 2, 8, window=2, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(3)
    cache.begin(0, 2)
    k, v = torch.randn(1, 2 * FT, 2, 8, generator=g), torch.randn(1, 2 * FT, 2, 8, generator=g)
    cache.write(0, k, v)
    q = torch.randn(1, 2 * FT, 2, 8, generator=g)
    out = attend_fp8(q, cache, 0, "sdpa")
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    err = rel(out, ref.transpose(1, 2))
    assert 1e-4 < err < 0.05
    # the stored (shifted) keys give the same attention: softmax ignores the shift common to every key
    k8, v8, ks, vs = cache.valid_fp8(0)
    shifted = dequantize_frames(k8, ks, FT, torch.float32)
    assert rel(shifted, k) > 0.1  # really shifted
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), shifted.transpose(1, 2), dequantize_frames(v8, vs, FT, torch.float32).transpose(1, 2)
    ).transpose(1, 2), out, atol=1e-5, rtol=1e-4)


def test_the_key_shift_lowers_the_error_of_keys_with_a_common_offset():
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 3 * FT, 2, 8, generator=g) + torch.randn(1, 1, 2, 8, generator=g) * 8  # a big common part
    v = torch.randn(1, 3 * FT, 2, 8, generator=g)
    cache = Fp8KVCache(1, 1, FT, 2, 8, window=3, dtype=torch.float32, device="cpu")
    cache.begin(0, 3)
    cache.write(0, k, v)
    plain = dequantize_frames(*quantize_frames(k, FT), FT, torch.float32)
    # rounding error relative to how keys differ from their mean (what attention weights depend on)
    spread = (k - k.mean(1, keepdim=True)).norm()
    assert (cache.valid(0)[0] - k).norm() / spread < 0.5 * (plain - k).norm() / spread
