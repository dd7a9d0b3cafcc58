"""The streaming sampler: schedule values, determinism, cancellation, prefixes, routing, bad input."""

import pytest
import torch

from self_forcing.sf_model.resample import resample_history
from self_forcing.sf_model.noise import NoiseStream, chunk_noise
from self_forcing.sf_model.sampler import Cancelled, StreamOptions, chunk_plan, generate, stream
from self_forcing.sf_model.schedule import make_steps, parse_steps, sigma_table


def ctx(seed=0, batch=1):
    return torch.randn(batch, 10, 32, generator=torch.Generator().manual_seed(seed))


def test_warped_steps_match_the_official_table():
    steps = make_steps((1000, 750, 500, 250), shift=5.0)
    assert [s.timestep for s in steps] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert [s.sigma for s in steps] == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    table = sigma_table(5.0)
    assert table.dtype == torch.float32 and table.shape == (1000,)
    assert steps[2].sigma == float(table[500])  # exactly the float32 table entry the official code indexes


def test_step_list_errors():
    for bad in ([], [250, 500], [1000, 0], [1001]):
        with pytest.raises(ValueError):
            make_steps(bad)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_steps("1000, abc")
    assert parse_steps("1000,750; 500 ,250") == (1000, 750, 500, 250)


def test_same_seed_same_video_and_chunks_independent_of_length(tiny_model):
    a = generate(tiny_model, ctx(), num_frames=6, height=4, width=6, seed=7)
    b = generate(tiny_model, ctx(), num_frames=6, height=4, width=6, seed=7)
    c = generate(tiny_model, ctx(), num_frames=6, height=4, width=6, seed=8)
    longer = generate(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.allclose(longer[:, :, :6], a, atol=1e-6)  # chunk seeds do not depend on the video length


def test_stream_yields_chunks_as_they_finish_and_reports_every_pass(tiny_model):
    events = []
    chunks = []
    for chunk in stream(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=1,
                        on_step=events.append):
        chunks.append(chunk)
        assert events[-1].chunk_index == chunk.index  # yielded right after its last pass
    assert [c.start_frame for c in chunks] == [0, 3, 6]
    assert all(c.latents.shape == (1, 16, 3, 4, 6) for c in chunks)
    assert [e.passes_done for e in events] == list(range(1, 13))
    assert all(e.passes_total == 12 for e in events)


def test_stream_matches_manual_reference_loop(tiny_model):
    """The sampler is exactly: x0 per step, fresh re-noise, clean context pass, next block."""
    opts = StreamOptions()
    steps = make_steps(opts.steps, opts.shift)
    context = ctx()
    out = generate(tiny_model, context, num_frames=6, height=4, width=6, seed=3)
    text = tiny_model.encode_text(context)
    cache = tiny_model.new_cache(1, 6, window=6)
    ref = []
    with torch.no_grad():
        for ci, (start, n) in enumerate(chunk_plan(0, 6, 3)):
            noise = chunk_noise(3, ci, 4, (1, 16, n, 4, 6), "cpu")
            x = noise[0]
            for i, s in enumerate(steps):
                flow = tiny_model.forward_chunk(x, torch.full((1, n), s.timestep), text, cache, start)
                x0 = x - s.sigma * flow
                if i + 1 < len(steps):
                    x = (1 - steps[i + 1].sigma) * x0 + steps[i + 1].sigma * noise[i + 1]
            tiny_model.forward_chunk(x0, torch.zeros(1, n), text, cache, start)
            ref.append(x0)
    assert torch.equal(out, torch.cat(ref, 2))


def test_cancellation_leaves_model_reusable_and_next_run_identical(tiny_model):
    reference = generate(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=5)
    calls = {"n": 0}

    def cancel_after_5():
        calls["n"] += 1
        if calls["n"] > 5:
            raise Cancelled("user pressed cancel")

    got = []
    with pytest.raises(Cancelled):
        for chunk in stream(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=5,
                            check_cancel=cancel_after_5):
            got.append(chunk)
    assert len(got) == 1  # the first chunk finished, the second was interrupted between passes
    again = generate(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=5)
    assert torch.equal(again, reference)


def test_closing_the_generator_releases_its_cache(tiny_model):
    gen = stream(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=5)
    next(gen)
    frame = gen.gi_frame
    cache = frame.f_locals["cache"]
    gen.close()
    assert cache.k is None and cache.v is None


def test_prefix_prefills_the_cache_like_generated_history(tiny_model):
    """Continuing from the first 6 frames as a prefix == the full run's last chunk."""
    full = generate(tiny_model, ctx(), num_frames=9, height=4, width=6, seed=2)
    cont = list(stream(tiny_model, ctx(), num_frames=3, height=4, width=6, seed=2, prefix=full[:, :, :6]))
    assert cont[0].start_frame == 6
    # chunk seeds restart at 0 for the continuation, so compare with a run whose chunk 0 noise matches
    text = tiny_model.encode_text(ctx())
    cache = tiny_model.new_cache(1, 6, window=9)
    from self_forcing.sf_model.sampler import commit_chunk, denoise_chunk

    opts = StreamOptions()
    with torch.no_grad():
        commit_chunk(tiny_model, text, cache, 0, full[:, :, :3], opts)
        commit_chunk(tiny_model, text, cache, 3, full[:, :, 3:6], opts)
        ref = denoise_chunk(tiny_model, text, cache, 6, chunk_noise(2, 0, 4, (1, 16, 3, 4, 6), "cpu"),
                            make_steps(), opts)
    assert torch.equal(cont[0].latents, ref)


def test_image_to_video_one_frame_prefix(tiny_model):
    image = torch.randn(1, 16, 1, 4, 6)
    out = generate(tiny_model, ctx(), num_frames=6, height=4, width=6, seed=0, prefix=image)
    assert out.shape == (1, 16, 6, 4, 6)
    other = generate(tiny_model, ctx(), num_frames=6, height=4, width=6, seed=0, prefix=image + 1)
    assert not torch.allclose(out, other)  # the prefix conditions the video


def test_rolling_stream_and_routing_run_long(tiny_model):
    opts = StreamOptions(frames_per_block=1, steps=(1000, 500), window=6, sink=1, routing_topk=2)
    out = generate(tiny_model, ctx(), num_frames=12, height=4, width=6, seed=0, options=opts)
    plain = generate(tiny_model, ctx(), num_frames=12, height=4, width=6, seed=0,
                     options=StreamOptions(frames_per_block=1, steps=(1000, 500), window=6, sink=1))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :, :4], plain[:, :, :4], atol=1e-6)  # history <= k: routing attends to all
    assert not torch.allclose(out, plain, atol=1e-4)  # later blocks attend to a subset


def test_routing_with_k_covering_history_equals_full_window(tiny_model):
    base = dict(frames_per_block=1, steps=(1000,), window=5, sink=1)
    a = generate(tiny_model, ctx(), num_frames=8, height=4, width=6, seed=0,
                 options=StreamOptions(**base, routing_topk=4))  # window 5 = current + 4 history frames
    b = generate(tiny_model, ctx(), num_frames=8, height=4, width=6, seed=0, options=StreamOptions(**base))
    assert torch.allclose(a, b, atol=1e-6)


def test_resample_history_keeps_untouched_frames_and_strength_zero_is_identity(tiny_model):
    history = torch.randn(1, 16, 6, 4, 6)
    out = resample_history(tiny_model, ctx(), history, frames=3, strength=0.5, seed=1)
    assert torch.equal(out[:, :, :3], history[:, :, :3])
    assert not torch.allclose(out[:, :, 3:], history[:, :, 3:])
    assert torch.equal(resample_history(tiny_model, ctx(), history, frames=3, strength=0.0), history)
    again = resample_history(tiny_model, ctx(), history, frames=3, strength=0.5, seed=1)
    assert torch.equal(out, again)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=7), "not a multiple of frames_per_block 3; use 6 or 9"),
    (dict(height=5), "multiple of 2x2"),
    (dict(num_frames=0), "num_frames must be >= 1"),
    (dict(num_frames=1200, options=StreamOptions(window=6)), "RoPE positions"),
])
def test_bad_requests_get_clear_errors(tiny_model, kwargs, match):
    args = dict(num_frames=6, height=4, width=6, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, ctx(), **args)


def test_bad_inputs_to_the_model(tiny_model):
    x = torch.randn(1, 16, 3, 4, 6)
    with pytest.raises(ValueError, match="width 31, the model expects 32"):
        tiny_model(x, 500.0, torch.randn(1, 5, 31))
    with pytest.raises(ValueError, match="more than the model's 16"):
        tiny_model(x, 500.0, torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="8 channels"):
        tiny_model(torch.randn(1, 8, 3, 4, 6), 500.0, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tiny_model(torch.randn(1, 16, 3, 5, 6), 500.0, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="on meta but the model is on cpu"):
        tiny_model(torch.randn(1, 16, 3, 4, 6, device="meta"), 500.0, torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="not a multiple of frames_per_block"):
        tiny_model(torch.randn(1, 16, 4, 4, 6), 500.0, torch.randn(1, 5, 32), frames_per_block=3)
    tiny_model.blocks[0].ffn[0].to(torch.float64)
    with pytest.raises(ValueError, match="several devices/dtypes"):
        generate(tiny_model, ctx(), num_frames=3, height=4, width=6)


def test_options_validation():
    with pytest.raises(ValueError, match="must hold at least one block"):
        StreamOptions(window=2, frames_per_block=3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        StreamOptions(steps=(250, 500))


def test_lazy_noise_draws_the_same_numbers_as_a_whole_chunk_draw():
    source = NoiseStream(7, "cpu", max_numel=16 * 3 * 4 * 6)
    for ci in (0, 3):
        ref = chunk_noise(7, ci, 4, (1, 16, 3, 4, 6), "cpu")
        lazy = source.chunk(ci, 4, (1, 16, 3, 4, 6))
        assert len(lazy) == 4 and not lazy.items  # nothing drawn before it is needed
        assert torch.equal(lazy[0], ref[0]) and len(lazy.items) == 1
        assert all(torch.equal(a, b) for a, b in zip(lazy[1:], ref[1:]))
        assert torch.equal(lazy[-1], ref[3])
        with pytest.raises(IndexError):
            lazy[4]
