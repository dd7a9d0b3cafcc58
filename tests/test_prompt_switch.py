"""Prompt switching mid-stream (sf_model.prompt_schedule): keep, re-cache (== recomputing the window from scratch
under the new prompt) and reset, the schedule's rules, and a stream that goes on across switches."""

import pytest
import torch

from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.prompt_schedule import LatentWindow, PromptSchedule, PromptSwitch, recache_pieces
from self_forcing.sf_model.sampler import StreamOptions, chunk_plan, commit_chunk, denoise_chunk, generate, stream
from self_forcing.sf_model.schedule import make_steps


def ctx(seed=0):
    return torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(seed))


A, B, C = ctx(0), ctx(1), ctx(2)
H, W, FT = 4, 6, 6  # latent size and tokens per frame of the tiny model


def run(model, schedule, frames, opts, seed=4):
    return list(stream(model, schedule, num_frames=frames, height=H, width=W, seed=seed, options=opts))


def latents(chunks):
    return torch.cat([c.latents for c in chunks], 2)


def full_sequence(model, context, history, chunks, window, sink, opts):
    """The denoised chunks computed by full-sequence forwards (no KV cache): ``history`` is a list of pieces
    (latents [B, C, n, H, W], frame indices, temporal positions) written from scratch under ``context``, each
    piece seeing the pieces before it and itself; ``chunks`` a list of (noise, frame indices, positions), each
    denoised against everything before it inside its window (frame k visible to a piece ending at frame e when
    k < sink or k >= e - window) and then appended as clean history."""
    steps = make_steps(opts.steps, opts.shift)
    pieces = list(history)
    out = []

    def layout(extra):
        all_pieces = pieces + [extra]
        idx = [f for _, fr, _ in all_pieces for f in fr]
        pos = [p for _, _, ps in all_pieces for p in ps]
        piece_of = [i for i, (_, fr, _) in enumerate(all_pieces) for _ in fr]
        ends = [max(all_pieces[i][1]) + 1 for i in piece_of]
        vis = torch.tensor([[piece_of[k] <= piece_of[q] and (window is None or idx[k] < sink
                                                             or idx[k] >= ends[q] - window)
                             for k in range(len(idx))] for q in range(len(idx))])
        return vis, pos

    for noise, frames, positions in chunks:
        x, n = noise[0], len(frames)
        vis, pos = layout((None, frames, positions))
        hist = torch.cat([p[0] for p in pieces], 2) if pieces else x[:, :, :0]
        for i, s in enumerate(steps):
            t = torch.tensor([[opts.context_noise] * hist.shape[2] + [s.timestep] * n])
            flow = model(torch.cat([hist, x], 2), t, context, visibility=vis, positions=pos,
                         extend_positions=True)[:, :, -n:]
            x0 = x - s.sigma * flow
            if i + 1 < len(steps):
                x = (1 - steps[i + 1].sigma) * x0 + steps[i + 1].sigma * noise[i + 1]
        out.append(x0)
        pieces.append((x0, frames, positions))
    return torch.cat(out, 2)


def opts_of(window=9, sink=3, positions="absolute"):
    return StreamOptions(frames_per_block=3, steps=(1000, 500), window=window, sink=sink, positions=positions,
                         extend_positions=True)


@pytest.mark.parametrize("switch_at", [15, 13])  # 13: the prompt takes over at the next chunk start, 15
def test_recache_equals_recomputing_the_window_from_scratch_under_the_new_prompt(tiny_model, switch_at):
    opts = opts_of()
    chunks = run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(switch_at, B, "recache")]), 21, opts)
    video = latents(chunks)
    assert [c.prompt for c in chunks] == [0] * 5 + [1, 1]
    before = latents(run(tiny_model, PromptSchedule.single(A), 15, opts))
    assert torch.equal(video[:, :, :15], before)  # nothing changes before the switch
    # from scratch: the sink [0, 3) and the window frames chunk 5 sees, [9, 15), in chunks ending at the switch
    history = [(video[:, :, 0:3], range(0, 3), range(0, 3)), (video[:, :, 9:12], range(9, 12), range(9, 12)),
               (video[:, :, 12:15], range(12, 15), range(12, 15))]
    new = [(chunk_noise(4, ci, 2, (1, 16, 3, H, W), "cpu"), range(3 * ci, 3 * ci + 3), range(3 * ci, 3 * ci + 3))
           for ci in (5, 6)]
    ref = full_sequence(tiny_model, B, history, new, 9, 3, opts)
    assert torch.allclose(video[:, :, 15:], ref, atol=5e-5), (video[:, :, 15:] - ref).abs().max()
    keep = latents(run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(15, B, "keep")]), 21, opts))
    assert (keep[:, :, 15:] - ref).abs().max() > 100 * (video[:, :, 15:] - ref).abs().max()  # re-caching mattered


def test_a_second_recache_recomputes_from_the_kept_latents_again(tiny_model):
    opts = opts_of()
    schedule = PromptSchedule([PromptSwitch(0, A), PromptSwitch(15, B, "recache"), PromptSwitch(24, C, "recache")])
    video = latents(run(tiny_model, schedule, 30, opts))
    history = [(video[:, :, 0:3], range(0, 3), range(0, 3))] + [
        (video[:, :, s:s + 3], range(s, s + 3), range(s, s + 3)) for s in (18, 21)]
    new = [(chunk_noise(4, ci, 2, (1, 16, 3, H, W), "cpu"), range(3 * ci, 3 * ci + 3), range(3 * ci, 3 * ci + 3))
           for ci in (8, 9)]
    ref = full_sequence(tiny_model, C, history, new, 9, 3, opts)
    assert torch.allclose(video[:, :, 24:], ref, atol=5e-5), (video[:, :, 24:] - ref).abs().max()


def test_recache_with_a_window_of_one_chunk_keeps_only_the_sink(tiny_model):
    opts = opts_of(window=3)
    video = latents(run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(9, B, "recache")]), 15, opts))
    history = [(video[:, :, 0:3], range(0, 3), range(0, 3))]
    new = [(chunk_noise(4, ci, 2, (1, 16, 3, H, W), "cpu"), range(3 * ci, 3 * ci + 3), range(3 * ci, 3 * ci + 3))
           for ci in (3, 4)]
    ref = full_sequence(tiny_model, B, history, new, 3, 3, opts)
    assert torch.allclose(video[:, :, 9:], ref, atol=5e-5), (video[:, :, 9:] - ref).abs().max()


def test_recache_with_rebased_positions_packs_the_window_after_the_sink(tiny_model):
    opts = opts_of(positions="rebased")
    video = latents(run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(15, B, "recache")]), 18, opts))
    # the rebased rule: sink at 0..2, the window frames the next chunk sees right after it
    history = [(video[:, :, 0:3], range(0, 3), range(0, 3)), (video[:, :, 9:12], range(9, 12), range(3, 6)),
               (video[:, :, 12:15], range(12, 15), range(6, 9))]
    new = [(chunk_noise(4, 5, 2, (1, 16, 3, H, W), "cpu"), range(15, 18), range(9, 12))]
    ref = full_sequence(tiny_model, B, history, new, 9, 3, opts)
    assert torch.allclose(video[:, :, 15:], ref, atol=5e-5), (video[:, :, 15:] - ref).abs().max()


def test_recache_of_a_fixed_cache_recomputes_every_frame(tiny_model):
    opts = StreamOptions(frames_per_block=3, steps=(1000, 500))
    video = latents(run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(6, B, "recache")]), 9, opts))
    history = [(video[:, :, s:s + 3], range(s, s + 3), range(s, s + 3)) for s in (0, 3)]
    new = [(chunk_noise(4, 2, 2, (1, 16, 3, H, W), "cpu"), range(6, 9), range(6, 9))]
    ref = full_sequence(tiny_model, B, history, new, None, 0, opts)
    assert torch.allclose(video[:, :, 6:], ref, atol=5e-5), (video[:, :, 6:] - ref).abs().max()


def manual(model, switch_at, frames, opts, reset):
    """The keep/reset reference: the plain chunk loop, the text switched at ``switch_at`` and, for a reset, a new
    cache whose frame 0 is the switch frame."""
    steps = make_steps(opts.steps, opts.shift)
    texts = [model.encode_text(A), model.encode_text(B)]
    cache = model.new_cache(1, FT, window=opts.window, sink=opts.sink)
    origin, out = 0, []
    with torch.no_grad():
        for ci, (start, n) in enumerate(chunk_plan(0, frames, 3)):
            if start == switch_at and reset:
                cache, origin = model.new_cache(1, FT, window=opts.window, sink=opts.sink), start
            text = texts[start >= switch_at]
            x0 = denoise_chunk(model, text, cache, start - origin, chunk_noise(4, ci, 2, (1, 16, n, H, W), "cpu"),
                               steps, opts)
            commit_chunk(model, text, cache, start - origin, x0, opts)
            out.append(x0)
    return torch.cat(out, 2)


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_keep_switches_only_the_text_and_reset_starts_a_new_segment(tiny_model, policy):
    opts = opts_of(window=6)
    chunks = run(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(12, B, policy)]), 24, opts)
    ref = manual(tiny_model, 12, 24, opts, reset=policy == "reset")
    assert torch.allclose(latents(chunks), ref, atol=1e-6)
    assert [c.start_frame for c in chunks] == list(range(0, 24, 3)) and [c.prompt for c in chunks] == [0] * 4 + [1] * 4


def test_the_stream_goes_on_across_switches_chunk_by_chunk(tiny_model):
    events = []
    schedule = PromptSchedule.of(A, [(9, B, "reset"), (3, C, "keep"), (6, A)])
    assert [(e.start_frame, e.policy) for e in schedule.entries] == [(0, "recache"), (3, "keep"), (6, "recache"),
                                                                   (9, "reset")]
    seen = []
    for chunk in stream(tiny_model, schedule, num_frames=12, height=H, width=W, seed=0, on_step=events.append,
                        options=opts_of(window=6)):
        seen.append((chunk.index, chunk.start_frame, chunk.prompt))
        assert events[-1].chunk_index == chunk.index  # handed out right after its last pass
    assert seen == [(0, 0, 0), (1, 3, 1), (2, 6, 2), (3, 9, 3)]
    assert [e.passes_done for e in events] == list(range(1, 9)) and events[-1].passes_total == 8
    one = generate(tiny_model, PromptSchedule.single(A), num_frames=6, height=H, width=W, seed=0)
    assert torch.equal(one, generate(tiny_model, A, num_frames=6, height=H, width=W, seed=0))


def test_a_prefix_is_prefilled_under_its_frames_prompt_and_the_first_new_chunk_switches(tiny_model):
    opts = opts_of()
    prefix = torch.randn(1, 16, 6, H, W, generator=torch.Generator().manual_seed(5))
    schedule = PromptSchedule([PromptSwitch(0, A), PromptSwitch(6, B, "recache")])
    got = latents(list(stream(tiny_model, schedule, num_frames=3, height=H, width=W, seed=1, prefix=prefix,
                              options=opts)))
    # re-cached: the prefix's K/V under B, which is a prefix prefilled under B
    ref = latents(list(stream(tiny_model, B, num_frames=3, height=H, width=W, seed=1, prefix=prefix, options=opts)))
    assert torch.allclose(got, ref, atol=1e-5)
    under_a = latents(list(stream(tiny_model, PromptSchedule([PromptSwitch(0, A), PromptSwitch(6, B, "keep")]),
                                  num_frames=3, height=H, width=W, seed=1, prefix=prefix, options=opts)))
    assert not torch.allclose(got, under_a, atol=1e-4)


def test_schedule_rules():
    with pytest.raises(ValueError, match="must start at frame 0"):
        PromptSchedule([PromptSwitch(3, A)])
    with pytest.raises(ValueError, match="strictly increasing"):
        PromptSchedule([PromptSwitch(0, A), PromptSwitch(6, B), PromptSwitch(6, C)])
    with pytest.raises(ValueError, match="keep, recache, reset"):
        PromptSchedule([PromptSwitch(0, A), PromptSwitch(6, B, "forget")])
    with pytest.raises(ValueError, match="whole latent frame"):
        PromptSchedule([PromptSwitch(0, A), PromptSwitch(2.5, B)])
    s = PromptSchedule.of(A, [(0, B), (4, C, "keep")])
    assert s.entries[0].context is B and [s.index_at(f) for f in (0, 3, 4, 100)] == [0, 0, 1, 1]
    assert not s.needs_latents and PromptSchedule.of(A, [(4, C)]).needs_latents


def test_recache_pieces_and_the_kept_latents_are_bounded_by_the_cache():
    # sink 3, window 9, next chunk of 3 at cache frame 15: the sink and frames [9, 15) in chunks ending at 15
    assert recache_pieces(3, 15, 3, 9, 3) == ([(0, 3)], [(9, 3), (12, 3)], 9)
    assert recache_pieces(3, 16, 3, 9, 3) == ([(0, 3)], [(10, 3), (13, 3)], 10)  # unaligned: the first piece ends at 13
    assert recache_pieces(1, 10, 3, 6, 3) == ([(0, 1)], [(7, 3)], 7)
    assert recache_pieces(3, 2, 3, 9, 3) == ([(0, 2)], [], 3)  # the sink is not complete yet: all of it
    assert recache_pieces(0, 7, 3, None, 3) == ([], [(0, 1), (1, 3), (4, 3)], 0)  # fixed cache: everything
    from self_forcing.sf_model.cache import KVCache

    cache = KVCache(2, 1, FT, 4, 16, window=9, sink=3, dtype=torch.float32, device=torch.device("cpu"))
    store = LatentWindow(cache, 1, 16, H, W, "cpu")
    assert store.buf.shape[2] == 12  # sink + window, whatever the video length
    x = torch.randn(1, 16, 30, H, W)
    for s in range(0, 30, 3):
        store.write(s, x[:, :, s:s + 3])
    assert torch.equal(store.read(0, 3), x[:, :, :3]) and torch.equal(store.read(21, 30), x[:, :, 21:])


# -- the nodes: 'Self Forcing Prompt Schedule' and the sampler/extend nodes taking it --------------------------
@pytest.fixture(scope="module")
def toy():
    from self_forcing.nodes import toy as toy_nodes
    from self_forcing.nodes.model import load_handle

    cpu = torch.device("cpu")
    return load_handle(toy_nodes.toy_model_path(toy_nodes.TOY_MODELS[0]), toy_nodes.TOY_MODELS[0], dtype="fp32",
                       attention="sdpa", load_device=cpu, offload_device=cpu, keep_loaded=True, supports_bf16=False)


RED = "a red circle bouncing on a black background"
GREEN = "a green square bouncing on a black background"
BLUE = "a blue triangle bouncing on a black background"


def test_the_schedule_node_chains_prompts_inside_one_conditioning():
    from self_forcing.nodes.long_video import SCHEDULE, add_prompt, scheduled_prompts
    from self_forcing.nodes.text import conditioning_from_context, tensor_of

    a, b, c = (conditioning_from_context(x) for x in (A, B, C))
    two = add_prompt(a, b, 40, "keep")
    three = add_prompt(two, c, 20)
    assert tensor_of(three) is A and len(three) == 1  # any other node sees the first prompt
    assert [(s, cond[0][0] is x, p) for (s, cond, p), x in zip(scheduled_prompts(three), (C, B))] == [
        (20, True, "recache"), (40, True, "keep")]
    assert scheduled_prompts(a) == [] and scheduled_prompts(two) != scheduled_prompts(three)  # inputs untouched
    with pytest.raises(ValueError, match="two prompts of the schedule start at frame 40"):
        add_prompt(three, a, 40)
    with pytest.raises(ValueError, match="is itself a schedule"):
        add_prompt(a, two, 8)
    with pytest.raises(ValueError, match="keep, recache, reset"):
        add_prompt(a, b, 8, "forget")
    assert SCHEDULE.input("switch").default == "recache" and "local" not in SCHEDULE.input("switch").tooltip


def test_video_frames_become_latent_frames_rounded_up_and_extend_counts_new_frames():
    from types import SimpleNamespace

    from self_forcing.nodes.long_video import add_prompt, prompt_schedule
    from self_forcing.nodes.text import conditioning_from_context

    wan = SimpleNamespace(temporal=4, check_prompt=lambda cond: None)
    cond = add_prompt(add_prompt(conditioning_from_context(A), conditioning_from_context(B), 41),
                      conditioning_from_context(C), 0)
    s = prompt_schedule(cond, A, text_dim=32, text_len=16, space=wan)
    assert [e.start_frame for e in s.entries] == [0, 11] and s.entries[0].context.shape == A.shape
    assert torch.equal(s.entries[0].context, C)  # frame 0 replaces the first prompt
    ext = prompt_schedule(cond, A.expand(2, -1, -1), text_dim=32, text_len=16, space=wan, offset=7, batch=2)
    assert [e.start_frame for e in ext.entries] == [0, 7, 18] and ext.entries[2].context.shape[0] == 2
    assert prompt_schedule(conditioning_from_context(A), A, text_dim=32, text_len=16, space=wan) is None


def test_the_toy_sampler_node_streams_the_schedule_as_the_core_does(toy):
    from self_forcing.nodes.long_video import LongVideoOptions, add_prompt
    from self_forcing.nodes.sampling import sample_video
    from self_forcing.nodes.toy import encode_toy_prompt
    from self_forcing.nodes.text import conditioning_from_context
    from self_forcing.toy.bundle import encode_prompt

    red, green, blue = (encode_toy_prompt(toy, p) for p in (RED, GREEN, BLUE))
    cond = add_prompt(add_prompt(red, green, 8, "recache"), blue, 14, "reset")
    options = LongVideoOptions("rolling", window=6, sink=3, routing_topk=0, positions="rebased")
    out = sample_video(toy, cond, width=32, height=32, length=18, seed=2, long_video=options)
    enc = lambda p: encode_prompt(toy.loaded, p, device="cpu")  # noqa: E731
    schedule = PromptSchedule([PromptSwitch(0, enc(RED)), PromptSwitch(8, enc(GREEN), "recache"),
                               PromptSwitch(14, enc(BLUE), "reset")])
    opts = StreamOptions.from_policy(options.policy(3, toy.meta), steps=tuple(toy.meta["steps"]),
                                     shift=float(toy.meta["shift"]), partial_last_chunk=True)
    ref = generate(toy.model, schedule, num_frames=18, height=16, width=16, seed=2, options=opts)
    assert torch.equal(out, ref)
    plain = sample_video(toy, red, width=32, height=32, length=18, seed=2, long_video=options)
    assert torch.equal(out[:, :, :9], plain[:, :, :9]) and not torch.allclose(out[:, :, 9:], plain[:, :, 9:])
    wan_prompt = add_prompt(red, conditioning_from_context(torch.randn(1, 4, 4096)), 8)
    with pytest.raises(ValueError, match="not made by 'Self Forcing Toy Text Encode'"):
        sample_video(toy, wan_prompt, width=32, height=32, length=18, seed=2, long_video=options)


def test_the_toy_extend_node_switches_at_its_new_frames(toy):
    from self_forcing.nodes.latent import latent_space
    from self_forcing.nodes.long_video import LongVideoOptions, add_prompt
    from self_forcing.nodes.sampling import extend_video, sample_video
    from self_forcing.nodes.toy import encode_toy_prompt

    red, green = encode_toy_prompt(toy, RED), encode_toy_prompt(toy, GREEN)
    first = latent_space(toy).wrap(sample_video(toy, red, width=32, height=32, length=6, seed=1))
    options = LongVideoOptions("rolling", window=6, sink=3, routing_topk=0)
    kw = dict(extend_frames=12, history_frames=0, resample_strength=0.0, seed=3, output="new frames only",
              long_video=options)
    switched = extend_video(toy, add_prompt(red, green, 3, "keep"), first, **kw)
    plain = extend_video(toy, red, first, **kw)
    assert torch.equal(switched[:, :, :3], plain[:, :, :3])  # new frames 0-2 under red, then green
    assert not torch.allclose(switched[:, :, 3:], plain[:, :, 3:])
    # a switch takes over at the first chunk starting at or after it: frame 1 -> the chunk at new frame 3
    assert torch.equal(switched, extend_video(toy, add_prompt(red, green, 1, "keep"), first, **kw))
    at_once = extend_video(toy, add_prompt(red, green, 0, "keep"), first, **kw)
    assert not torch.allclose(at_once[:, :, :3], plain[:, :, :3])


# -- the CLI: --prompt-at FRAME:[POLICY:]PROMPT -------------------------------------------------------------
def test_cli_prompt_at_parsing():
    from self_forcing.cli.prompt_at import parse_prompt_at, prompt_plan

    assert parse_prompt_at(["24:a b: c", "6:reset:x.safetensors", "12:keep:y"], "recache") == [
        (6, "reset", "x.safetensors"), (12, "keep", "y"), (24, "recache", "a b: c")]
    for bad, match in [("x:prompt", "not a latent frame"), ("0:p", ">= 1"), ("5", "expected FRAME:PROMPT"),
                       ("5:keep: ", "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_prompt_at([bad])
    with pytest.raises(ValueError, match="same frame"):
        parse_prompt_at(["3:a", "3:b"])

    class Args:
        prompt_at, switch = ["9:keep:B", "3:C"], "reset"

    plan = prompt_plan(Args, A, 12, {"B": B, "C": C}.get)
    assert [(e.start_frame, e.policy) for e in plan.entries] == [(0, "recache"), (3, "reset"), (9, "keep")]
    assert plan.entries[1].context is C and prompt_plan(type("N", (), {})(), A, 12, None) is A
    with pytest.raises(ValueError, match="frame 9 is past the video's last latent frame 8"):
        prompt_plan(Args, A, 9, {"B": B, "C": C}.get)


def test_cli_switches_prompts_as_the_core_stream_does(tmp_path, monkeypatch, capsysbinary):
    import numpy as np

    from self_forcing.cli import main
    from self_forcing.cli.generate import default_model_path
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.sf_model.pipeline import frames_to_uint8
    from self_forcing.toy.bundle import encode_prompt, latents_to_video

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--frames", "9", "--raw", "-", "--no-progress", "--width", "32", "--height", "32",
                 "--window", "3", "--sink", "3", "--positions", "rebased", "--prompt", RED,
                 "--prompt-at", f"3:keep:{GREEN}", "--prompt-at", f"6:{BLUE}"]) == 0
    captured = capsysbinary.readouterr()
    assert b"rebased positions, prompts at frame 0; frame 3 (keep); frame 6 (recache)" in captured.err
    got = np.frombuffer(captured.out, dtype=np.uint8).reshape(9, 32, 32, 3)
    loaded = load_model(default_model_path(), dtype=torch.float32)
    meta = loaded.meta
    enc = lambda p: encode_prompt(loaded, p, "cpu")  # noqa: E731
    schedule = PromptSchedule([PromptSwitch(0, enc(RED)), PromptSwitch(3, enc(GREEN), "keep"),
                               PromptSwitch(6, enc(BLUE), "recache")])
    opts = StreamOptions(frames_per_block=3, steps=meta["steps"], shift=meta["shift"], context_noise=0.0, window=3,
                         sink=3, extend_positions=True, positions="rebased", partial_last_chunk=True)
    lat = generate(loaded.model, schedule, num_frames=9, height=16, width=16, seed=0, options=opts)
    ref = torch.cat([frames_to_uint8(latents_to_video(loaded, lat[:, :, s:s + 3]))[0] for s in (0, 3, 6)]).numpy()
    assert np.array_equal(got, ref)


def test_a_schedule_of_many_switches_prepares_each_prompt_once_and_keeps_few(tiny_model, monkeypatch):
    calls = []
    encode = tiny_model.encode_text
    monkeypatch.setattr(tiny_model, "encode_text", lambda c: calls.append(c) or encode(c))
    schedule = PromptSchedule([PromptSwitch(0, A)] + [PromptSwitch(f, (B, A)[i % 2], "keep")
                                                      for i, f in enumerate(range(3, 30, 3))])
    run(tiny_model, schedule, 30, StreamOptions(frames_per_block=3, steps=(1000,), window=6))
    assert len(calls) == 2  # A and B, alternating ten times
    many = [ctx(10 + i) for i in range(8)]
    calls.clear()
    gen = stream(tiny_model, PromptSchedule([PromptSwitch(3 * i, c) for i, c in enumerate(many)]), num_frames=24,
                 height=H, width=W, options=StreamOptions(frames_per_block=3, steps=(1000,), window=6))
    for _ in gen:
        held = gen.gi_frame.f_locals["texts"].ready
        assert len(held) <= 4  # only the most recent prompts stay prepared
    assert len(calls) == 8
