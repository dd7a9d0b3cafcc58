"""History routing per query token: the selection against a brute-force reference, the cached and the
full-sequence layouts against each other, the FlexAttention block mask against the dense mask."""

import math

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.mask import teacher_forcing_positions, teacher_forcing_visibility
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.routing import (dense_mask, flex_mask, frame_means, routed_attention, select_frames,
                                           split_visibility)
from self_forcing.sf_model.sampler import StreamOptions, commit_chunk


def build_tiny(seed: int) -> CausalWanModel:
    """A tiny float32 model with non-trivial random weights everywhere (the output head included)."""
    torch.manual_seed(seed)
    model = CausalWanModel(TINY, attn_backend="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")) else noise)
    return model.eval().requires_grad_(False)


def brute_force_attention(q, keys, vals, allowed_tokens):
    """Softmax attention token by token over the keys each query may see: q [B, Lq, H, D], keys [B, Lk, H, D],
    allowed_tokens bool [B, H, Lq, Lk]."""
    b, lq, h, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                idx = allowed_tokens[bi, hi, i].nonzero().flatten()
                s = keys[bi, idx, hi] @ q[bi, i, hi] / math.sqrt(d)
                out[bi, i, hi] = torch.softmax(s, 0) @ vals[bi, idx, hi]
    return out


def brute_force_choice(q, frame_keys, candidates, topk):
    """Per token: the candidate frames ranked by q . mean key, best ``topk`` (all when fewer)."""
    b, lq, h, _ = q.shape
    out = torch.zeros(b, h, lq, frame_keys.shape[1], dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                cand = [j for j in range(frame_keys.shape[1]) if candidates[i, j]]
                score = {j: float(q[bi, i, hi] @ frame_keys[bi, j, hi]) for j in cand}
                for j in sorted(cand, key=lambda j: -score[j])[:topk]:
                    out[bi, hi, i, j] = True
    return out


def test_selection_matches_brute_force_per_token():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 10, 3, 8, generator=g)
    keys = torch.randn(2, 6, 3, 8, generator=g)
    cand = torch.rand(10, 6, generator=g) > 0.3
    cand[0] = False  # a token without candidates selects nothing
    cand[1] = torch.tensor([True, False, False, False, False, False])  # fewer than k: all of them
    for topk in (1, 2, 4, 6):
        got = select_frames(q, keys, cand, topk)
        assert torch.equal(got, brute_force_choice(q, keys, cand, topk)), topk
    # tokens of one chunk pick different frames (per token, not per chunk)
    picks = select_frames(q, keys, torch.ones(10, 6, dtype=torch.bool), 2)
    assert len({tuple(r.nonzero().flatten().tolist()) for r in picks[0, 0]}) > 1


@pytest.mark.parametrize("window,sink,topk", [(None, 0, 2), (None, 1, 2), (8, 1, 3), (None, 0, 1)])
def test_cached_routing_matches_a_brute_force_reference(window, sink, topk):
    """Chunk by chunk through a KV cache with key means: each query token attends to its sink frames, its
    own chunk and exactly the top-k history frames a brute-force ranking of the mean keys picks."""
    model = build_tiny(seed=3)
    b, c, h, w, fpb, frames = 2, TINY.in_dim, 4, 4, 2, 10
    ft = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, c, frames, h, w, generator=g)
    text = model.encode_text(torch.randn(b, 5, TINY.text_dim, generator=g))
    cache = model.new_cache(b, ft, window=window or frames, sink=sink, key_means=True)
    opts = StreamOptions(frames_per_block=fpb, window=window, sink=sink, extend_positions=window is not None)
    checked = 0
    with torch.no_grad():
        for start in range(0, frames, fpb):
            xs = x[:, :, start:start + fpb]
            t = torch.full((b, fpb), 500.0)
            cache.begin(start, fpb)
            plan = cache.plan
            layer = 0
            blk = model.blocks[layer]
            e, e0 = model.time_embed(t, b, fpb)
            hidden = model.patch_embedding(xs).flatten(2).transpose(1, 2).float()
            rope = model.rope.cos_sin(start, fpb, h // 2, w // 2, model.device)
            q, k, v = blk.pre_attention(hidden, e0, fpb, *rope)
            cache.write(layer, k, v)
            out = routed_attention(q, k, v, cache, layer, topk)
            # brute force over slots
            cap = cache.capacity
            mine = {s for slot, _, n in plan.runs for s in range(slot, slot + n)}
            sink_valid = min(sink, plan.valid_frames)
            always = torch.tensor([s < plan.valid_frames and (s < sink_valid or s in mine) for s in range(cap)])
            cand = torch.tensor([s < plan.valid_frames and not always[s] for s in range(cap)])
            choice = brute_force_choice(q, cache.key_mean[layer], cand[None].expand(q.shape[1], cap), topk)
            allowed = choice | always
            assert int(allowed[0, 0, 0].sum()) == min(topk, int(cand.sum())) + int(always.sum())
            ref = brute_force_attention(q, cache.k[layer], cache.v[layer], dense_mask(allowed, ft))
            assert (out - ref).abs().max() < 1e-5
            checked += int(cand.sum() > topk)
            commit_chunk(model, text, cache, start, xs, opts)  # the rest of the model writes the other layers
    assert checked >= 2  # routing actually dropped frames in some chunks


def test_full_sequence_routing_matches_the_cached_path():
    """[history | noisy] in one forward with routing == each noisy chunk against a routed KV cache of the
    history (routing in the history's own passes too), with a sink and a window."""
    model = build_tiny(seed=4)
    b, c, f, h, w, fpb = 2, TINY.in_dim, 8, 4, 4, 2
    ft = (h // 2) * (w // 2)
    for window, sink, topk in ((None, 0, 2), (6, 1, 1), (None, 1, 2)):
        g = torch.Generator().manual_seed(2)
        hist = torch.randn(b, c, f, h, w, generator=g)
        xt = torch.randn(b, c, f, h, w, generator=g)
        ctx = torch.randn(b, 5, TINY.text_dim, generator=g)
        t = torch.rand(b, f, generator=g) * 1000
        vis = teacher_forcing_visibility(f, fpb, window, sink)
        x_in = torch.cat([hist, xt], 2)
        t_in = torch.cat([torch.zeros(b, f), t], 1)
        opts = StreamOptions(frames_per_block=fpb, window=window, sink=sink, routing_topk=topk,
                             extend_positions=window is not None)
        with torch.no_grad():
            par = model(x_in, t_in, ctx, visibility=vis, positions=teacher_forcing_positions(f),
                        routing_topk=topk, routing_sink=sink)[:, :, f:]
            text = model.encode_text(ctx)
            ref = []
            for start in range(0, f, fpb):
                cache = model.new_cache(b, ft, window=window or f, sink=sink, key_means=True)
                for s in range(0, start, fpb):
                    commit_chunk(model, text, cache, s, hist[:, :, s:s + fpb], opts)
                ref.append(model.forward_chunk(xt[:, :, start:start + fpb], t[:, start:start + fpb], text, cache,
                                               start, routing_topk=topk, extend_positions=window is not None))
            ref = torch.cat(ref, 2)
            dense = model(x_in, t_in, ctx, visibility=vis, positions=teacher_forcing_positions(f))[:, :, f:]
        assert (par - ref).abs().max() < 2e-5, (window, sink, topk)
        assert (par - dense).abs().max() > 1e-4  # routing dropped frames


def test_routing_covering_all_history_is_the_dense_forward():
    model = build_tiny(seed=5)
    f, fpb = 6, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, TINY.in_dim, 2 * f, 4, 4, generator=g)
    t = torch.rand(1, 2 * f, generator=g) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim, generator=g)
    vis = teacher_forcing_visibility(f, fpb)
    pos = teacher_forcing_positions(f)
    with torch.no_grad():
        a = model(x, t, ctx, visibility=vis, positions=pos, routing_topk=f)
        b = model(x, t, ctx, visibility=vis, positions=pos)
    assert (a - b).abs().max() < 1e-5


def test_split_visibility_of_the_teacher_forcing_layout():
    f, fpb, sink = 6, 2, 1
    always, cand = split_visibility(teacher_forcing_visibility(f, fpb), sink)
    noisy_chunk2 = 2 * f - 1  # the last noisy frame: its chunk is noisy frames 4, 5
    assert always[noisy_chunk2].nonzero().flatten().tolist() == [0, f + 4, f + 5]
    assert cand[noisy_chunk2].nonzero().flatten().tolist() == [1, 2, 3]
    assert cand[5].nonzero().flatten().tolist() == [1, 2, 3]  # history frame 5 routes over frames 1..3


def test_flex_block_mask_equals_the_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(4)
    b, h, ft, frames, lq = 2, 2, 40, 9, 150  # frames straddle the 128-token blocks; lq is not a multiple of 128
    allowed = torch.rand(b, h, lq, frames, generator=g) > 0.6
    allowed[..., 0] = True
    allowed[:, :, :128, 5:] = False  # a whole query block skips the last frames
    q = torch.randn(b, h, lq, 16, generator=g)
    k = torch.randn(b, h, frames * ft, 16, generator=g)
    v = torch.randn(b, h, frames * ft, 16, generator=g)
    dense = dense_mask(allowed, ft)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    bm = flex_mask(allowed, ft)
    out = flex_attention(q, k, v, block_mask=bm)
    assert (out - ref).abs().max() < 1e-5
    blocks = bm.to_dense()  # [B, H, q blocks, kv blocks]: the skipped blocks are absent
    assert blocks.shape == (b, h, 2, 3) and not blocks[:, :, 0, 2].any() and blocks[:, :, 1].all()


def test_routing_carries_gradient_through_attention_not_selection():
    model = CausalWanModel(TINY, attn_backend="sdpa")
    torch.manual_seed(0)
    f, fpb = 4, 1
    x = torch.randn(1, TINY.in_dim, 2 * f, 4, 4)
    t = torch.rand(1, 2 * f) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    out = model(x, t, ctx, visibility=teacher_forcing_visibility(f, fpb), positions=teacher_forcing_positions(f),
                routing_topk=1)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
    assert frame_means(torch.randn(1, 8, 2, 4, requires_grad=True), 4).requires_grad is False
