"""Opt-in FP8 linear layers: quantisation round trip, the GEMM, and a whole streamed video's error."""

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.sampler import generate
from self_forcing.sf_model.speed import use_fused_kernels
from self_forcing.sf_model.speed.fp8 import Fp8Weight, fp8_linear, quantize_rows


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_row_quantisation_keeps_each_row_within_fp8_precision():
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitude
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert rel(q.float() * s, x) < 0.04  # e4m3: 3 mantissa bits
    assert (q.float().abs().amax(1) <= 448).all()


def test_gelu_is_applied_before_quantisation():
    x = torch.randn(32, 96) * 3
    q, s = quantize_rows(x, gelu=True)
    ref_q, ref_s = quantize_rows(torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(s, ref_s)
    assert torch.equal(q.float(), ref_q.float())
    lin = torch.nn.Linear(96, 48)
    w = Fp8Weight.from_weight(lin.weight, lin.bias)
    exact = lin(torch.nn.functional.gelu(x, approximate="tanh"))
    assert rel(fp8_linear(x, w, gelu=True), exact) < 0.06
    assert rel(fp8_linear(x, w), exact) > 0.1  # without the flag the GELU is not applied


def test_fp8_linear_is_close_to_the_float_linear_and_checks_sizes():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    x = torch.randn(2, 10, 128, generator=g)
    w = Fp8Weight.from_weight(lin.weight, lin.bias)
    out = fp8_linear(x, w)
    assert out.shape == (2, 10, 64)
    assert rel(out, lin(x)) < 0.06
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Weight.from_weight(torch.randn(10, 128), None)


def test_fp8_trunk_video_error_is_bounded_and_weights_refresh(make_tiny):
    ref = make_tiny(TINY, seed=3)
    fast = use_fused_kernels(make_tiny(TINY, seed=3), fp8=True)
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))
    a = generate(ref, ctx, num_frames=6, height=4, width=6, seed=2)
    b = generate(fast, ctx, num_frames=6, height=4, width=6, seed=2)
    err = rel(b, a)
    assert 1e-4 < err < 0.15  # really quantised, and still the same video
    assert len(fast.inference_trunk.fp8_weights) == 6 * TINY.num_layers  # qkv, o, cross q, cross o, ffn0, ffn2 per block
    with torch.no_grad():
        fast.blocks[0].ffn[0].weight.mul_(0)  # in-place change: same tensor, FP8 copy is stale by design
    fast.blocks[0].ffn[0].weight.data = torch.zeros_like(fast.blocks[0].ffn[0].weight)  # a new tensor
    c = generate(fast, ctx, num_frames=6, height=4, width=6, seed=2)
    assert not torch.allclose(c, b)  # the FP8 copy was rebuilt from the new weight
    back = use_fused_kernels(make_tiny(TINY, seed=3), fp8=True)
    generate(back, ctx, num_frames=3, height=4, width=6, seed=2)
    use_fused_kernels(back, fp8=False)  # switching FP8 off drops the copies and restores the exact path
    assert back.inference_trunk.fp8_weights == {}
    assert rel(generate(back, ctx, num_frames=6, height=4, width=6, seed=2), a) < 1e-5


def test_bias_fused_into_the_gemm_or_added_after_gives_the_same_result():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    fused = Fp8Weight.from_weight(lin.weight, lin.bias)
    separate = Fp8Weight.from_weight(lin.weight, lin.bias)
    separate.bias_in_gemm = False  # what a build without the epilogue does after its first try
    a, b = fp8_linear(x, fused), fp8_linear(x, separate)
    assert fused.bias_in_gemm is True and separate.bias_in_gemm is False
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert rel(a, lin(x)) < 0.06
