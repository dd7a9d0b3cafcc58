"""Streaming through the KV cache == the full-sequence training view under the block-causal mask."""

import pytest
import torch

from self_forcing.sf_model.mask import frame_visibility
from self_forcing.sf_model.sampler import chunk_plan


def inputs(frames=9, h=4, w=6, seed=0, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, h, w, generator=g)
    ctx = torch.randn(1, 10, text_dim, generator=g)
    t = torch.rand(1, frames, generator=g) * 1000
    return x, ctx, t


def incremental(model, x, t, ctx, fpb, window=None, sink=0):
    _, _, frames, h, w = x.shape
    text = model.encode_text(ctx)
    cache = model.new_cache(1, (h // 2) * (w // 2), window=window or frames, sink=sink)
    outs = [model.forward_chunk(x[:, :, s:s + n], t[:, s:s + n], text, cache, s)
            for s, n in chunk_plan(0, frames, fpb)]
    return torch.cat(outs, 2)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fpb", [1, 3])
def test_block_by_block_equals_block_causal_full_sequence(tiny_model, fpb):
    x, ctx, t = inputs()
    with torch.no_grad():
        full = tiny_model(x, t, ctx, frames_per_block=fpb)
        inc = incremental(tiny_model, x, t, ctx, fpb)
    assert rel(inc, full) <= 1e-5


def test_block_causal_differs_from_bidirectional(tiny_model):
    """The mask matters: the first block is unaffected by later frames, later blocks are not bidirectional."""
    x, ctx, t = inputs()
    with torch.no_grad():
        causal = tiny_model(x, t, ctx, frames_per_block=3)
        bidir = tiny_model(x, t, ctx)
        x2 = x.clone()
        x2[:, :, 6:] += 1.0  # change the last block only
        causal2 = tiny_model(x2, t, ctx, frames_per_block=3)
    assert rel(causal, bidir) > 1e-2
    assert torch.allclose(causal[:, :, :6], causal2[:, :, :6], atol=1e-6)
    assert not torch.allclose(causal[:, :, 6:], causal2[:, :, 6:], atol=1e-3)


def test_frame_visibility_is_block_causal():
    vis = frame_visibility(7, 3)
    for q in range(7):
        end = min((q // 3 + 1) * 3, 7)
        assert vis[q].tolist() == [k < end for k in range(7)]


def test_whole_video_block_is_bidirectional(tiny_model):
    x, ctx, t = inputs(frames=3)
    with torch.no_grad():
        assert torch.equal(tiny_model(x, t, ctx, frames_per_block=3), tiny_model(x, t, ctx))


def test_rope_tables_match_reference_angles(tiny_model):
    rope = tiny_model.rope
    cos, sin = rope.cos_sin(5, 3, 2, 3, torch.device("cpu"))
    ref = rope.angles(5, 3, 2, 3)
    assert torch.allclose(cos[0, :, 0].double(), torch.cos(ref), atol=1e-7)
    assert torch.allclose(sin[0, :, 0].double(), torch.sin(ref), atol=1e-7)
    cos2, _ = rope.cos_sin(2000, 1, 2, 3, torch.device("cpu"))  # grows past the 1024 table on demand
    assert torch.allclose(cos2[0, :, 0].double(), torch.cos(rope.angles(2000, 1, 2, 3)), atol=1e-6)


def test_fused_qkv_and_compiled_blocks_compute_the_same_function(make_tiny, tmp_path):
    from self_forcing.sf_model.checkpoint import load_model, save_model
    from self_forcing.sf_model.sampler import generate

    ref_model, fast = make_tiny(seed=9), make_tiny(seed=9)
    ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    ref = generate(ref_model, ctx, num_frames=6, height=4, width=6, seed=1)
    fast.fuse_qkv()
    assert fast.blocks[0].self_attn.q.weight.data_ptr() == fast.blocks[0].self_attn.fused[0].data_ptr()
    assert torch.allclose(generate(fast, ctx, num_frames=6, height=4, width=6, seed=1), ref, atol=1e-5)
    fast.to(torch.float64).to(torch.float32)  # stale fused weights are re-fused, not silently used
    assert torch.allclose(generate(fast, ctx, num_frames=6, height=4, width=6, seed=1), ref, atol=1e-5)
    save_model(tmp_path / "f.safetensors", fast, fast.config)  # shared views save fine
    assert torch.equal(load_model(tmp_path / "f.safetensors").model.blocks[0].self_attn.k.weight,
                       ref_model.blocks[0].self_attn.k.weight)


def test_fused_kernel_trunk_matches_the_reference_path(make_tiny):
    """The fused inference trunk (PyTorch versions of the kernels on CPU) == the block-by-block path."""
    from self_forcing.sf_model.config import TINY
    from self_forcing.sf_model.sampler import StreamOptions, generate
    from self_forcing.sf_model.speed import use_fused_kernels

    for cfg in (TINY, TINY.replace(cross_attn_norm=False)):
        ref_model, fast = make_tiny(cfg, seed=11), make_tiny(cfg, seed=11)
        use_fused_kernels(fast)
        ctx = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
        opts = StreamOptions(window=6, sink=1)
        ref = generate(ref_model, ctx, num_frames=9, height=4, width=6, seed=1, options=opts)
        out = generate(fast, ctx, num_frames=9, height=4, width=6, seed=1, options=opts)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
        x, _, t = inputs()
        with torch.enable_grad():  # gradient-recording forwards keep the plain path
            assert torch.allclose(fast(x, t, ctx, frames_per_block=3), ref_model(x, t, ctx, frames_per_block=3),
                                  atol=1e-5)
