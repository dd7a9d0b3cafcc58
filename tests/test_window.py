"""One cache policy for the nodes, the CLI and the trainer: validation, the position rule, the default policy."""

import argparse
import ast
from pathlib import Path

import pytest

from self_forcing.cli.generate import cache_policy
from self_forcing.sf_model.sampler import StreamOptions
from self_forcing.sf_model.schedule import DEFAULT_STEPS, DEFAULT_STEPS_TEXT, format_steps, parse_steps
from self_forcing.sf_model.window import WAN_TRAIN_FRAMES, CachePolicy, default_policy, trained_frames

REPO = Path(__file__).resolve().parent.parent
TOY_META = {"frames_per_block": 3, "toy": {"train_frames": 12}}


def test_the_constructor_validates_and_derives_the_position_rule():
    rolling = CachePolicy.rolling(3, 21, 3, routing_topk=6)
    assert (rolling.window, rolling.sink, rolling.routing_topk, rolling.extend_positions) == (21, 3, 6, True)
    fixed = CachePolicy.fixed(3, routing_topk=0)
    assert (fixed.window, fixed.sink, fixed.routing_topk, fixed.extend_positions) == (None, 0, None, False)
    assert CachePolicy(3, None, sink=5).sink == 0  # a fixed cache never evicts: no sink
    with pytest.raises(ValueError, match="must hold at least one block.*raise the window to 3"):
        CachePolicy.rolling(3, 2)
    with pytest.raises(ValueError, match="sink must be >= 0"):
        CachePolicy.rolling(3, 6, -1)
    with pytest.raises(ValueError, match="routing_topk 6 is not smaller than the window 6"):
        CachePolicy.rolling(3, 6, 0, routing_topk=6)
    assert CachePolicy.fixed(3, routing_topk=50).routing_topk == 50  # no window to compare with
    assert rolling.cache_frames(1000) == 24 and fixed.cache_frames(40) == 40
    assert "rolling" in fixed.fixed_cache_error(1025, 1024) and fixed.fixed_cache_error(1024, 1024) is None


def test_stream_options_are_built_from_the_policy_and_checked_by_the_same_rules():
    opts = StreamOptions.from_policy(CachePolicy.rolling(3, 6, 1, 2), steps=(1000, 500), partial_last_chunk=True)
    assert (opts.frames_per_block, opts.window, opts.sink, opts.routing_topk, opts.extend_positions) == (3, 6, 1, 2, True)
    assert opts.steps == (1000, 500) and opts.partial_last_chunk
    meta = {"steps": [1000, 500], "shift": 3.0, "warp": False, "context_noise": 10.0}
    stored = StreamOptions.from_meta(meta, CachePolicy.fixed(1))
    assert (stored.steps, stored.shift, stored.warp, stored.context_noise, stored.window) == ((1000, 500), 3.0, False,
                                                                                              10.0, None)
    assert StreamOptions.from_meta({}, CachePolicy.fixed()).steps == DEFAULT_STEPS
    with pytest.raises(ValueError, match="routing_topk 5 is not smaller than the window 5"):
        StreamOptions(frames_per_block=1, window=5, routing_topk=5)


def test_default_policy_fixed_while_the_video_fits_the_trained_length_else_a_rolling_window():
    assert trained_frames({}) == WAN_TRAIN_FRAMES == 21 and trained_frames(TOY_META) == 12
    assert trained_frames({"train_frames": 30, "toy": {"train_frames": 12}}) == 30
    assert default_policy({}, 21) == CachePolicy.fixed(3)
    assert default_policy({}, 22) == CachePolicy.rolling(3, 21, 0)
    assert default_policy({"sink": 3, "frames_per_block": 1}, 100) == CachePolicy.rolling(1, 21, 3)
    assert default_policy(TOY_META, 12) == CachePolicy.fixed(3)
    assert default_policy(TOY_META, 24) == CachePolicy.rolling(3, 12, 0)
    assert default_policy({}, 100, frames_per_block=1) == CachePolicy.rolling(1, 21, 0)
    assert default_policy({"train_frames": 40}, 30, rope_max_frames=24).is_rolling  # past the RoPE table


def cli_args(window="auto", sink=None):
    return argparse.Namespace(window=window, sink=sink, steps=None)


def test_cli_window_flags_map_to_the_policy():
    assert cache_policy(cli_args(), TOY_META, 24) == default_policy(TOY_META, 24)
    assert cache_policy(cli_args(sink=2), TOY_META, 24) == CachePolicy.rolling(3, 12, 2)
    assert cache_policy(cli_args("none", sink=2), TOY_META, 240) == CachePolicy.fixed(3)
    assert cache_policy(cli_args("6"), {"sink": 1}, 240) == CachePolicy.rolling(3, 6, 1)
    with pytest.raises(ValueError, match="--window 2.*raise the window to 3"):
        cache_policy(cli_args("2"), {}, 240)
    with pytest.raises(ValueError, match="--window must be an integer"):
        cache_policy(cli_args("soon"), {}, 240)


def test_one_step_list_and_one_parser():
    assert DEFAULT_STEPS_TEXT == format_steps(DEFAULT_STEPS) and parse_steps(DEFAULT_STEPS_TEXT) == DEFAULT_STEPS
    assert parse_steps("1000.0; 500") == (1000, 500)
    for bad, match in [(None, "empty"), ("nan", "whole"), ("inf", "whole"), ("1000, 1000", "strictly decreasing")]:
        with pytest.raises(ValueError, match=match):
            parse_steps(bad)
    defined = []
    for folder in ("sf_model", "toy", "nodes", "cli", "training", "workflows"):
        for path in (REPO / folder).rglob("*.py"):
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.FunctionDef) and n.name == "parse_steps":
                    defined.append(str(path.relative_to(REPO)))
    assert defined == ["sf_model/schedule.py"]


@pytest.mark.parametrize("meta, total", [({}, 21), ({}, 22), ({}, 400), ({"sink": 2, "frames_per_block": 1}, 30),
                                         (TOY_META, 12), (TOY_META, 13), ({"train_frames": 30}, 31)])
def test_cli_auto_and_unconnected_nodes_get_the_same_cache(meta, total):
    from self_forcing.cli.generate import sampling_options
    from self_forcing.nodes.long_video import cache_policy as node_policy
    from self_forcing.nodes.sampling import run_options

    fpb = meta.get("frames_per_block", 3)
    cli = cache_policy(cli_args(), meta, total)
    assert node_policy(None, frames_per_block=fpb, total_frames=total, meta=meta, rope_max_frames=1024) == cli
    a = sampling_options(cli_args(), meta, total)
    b = run_options(fpb, DEFAULT_STEPS_TEXT, 5.0, 0.0, None, total_frames=total, meta=meta, rope_max_frames=1024)
    assert (a.frames_per_block, a.window, a.sink, a.routing_topk, a.extend_positions, a.steps) == \
        (b.frames_per_block, b.window, b.sink, b.routing_topk, b.extend_positions, b.steps)
    assert a.window == (None if total <= trained_frames(meta) else trained_frames(meta))


def test_toy_sampler_node_without_options_streams_what_the_cli_streams():
    import torch

    from self_forcing.cli.generate import sampling_options
    from self_forcing.nodes.model import load_handle
    from self_forcing.nodes.sampling import sample_video
    from self_forcing.nodes.toy import TOY_MODELS, TOY_PROMPT, encode_toy_prompt, toy_model_path
    from self_forcing.sf_model.sampler import generate
    from self_forcing.toy.bundle import encode_prompt

    cpu = torch.device("cpu")
    toy = load_handle(toy_model_path(TOY_MODELS[0]), TOY_MODELS[0], dtype="fp32", attention="sdpa", load_device=cpu,
                      offload_device=cpu, keep_loaded=True, supports_bf16=False)
    frames = trained_frames(toy.meta) + 3  # longer than the training clip: the default rolls
    out = sample_video(toy, encode_toy_prompt(toy, TOY_PROMPT), width=32, height=32, length=frames, seed=4)
    opts = sampling_options(cli_args(), toy.meta, frames)
    assert opts.window == trained_frames(toy.meta) and opts.extend_positions
    ref = generate(toy.model, encode_prompt(toy.loaded, TOY_PROMPT, device="cpu"), num_frames=frames, height=16,
                   width=16, seed=4, options=opts)
    assert torch.equal(out, ref)


# -- official window semantics: local_attn_size counts the sink, our window does not ----------------------
def official_attended(num_frames: int, fpb: int, local_attn_size: int, sink_size: int) -> list[set]:
    """The frames each chunk attends to in the official rolling KV cache (pipeline/causal_inference.py's cache of
    local_attn_size frames: sink frames pinned at its front, the rest shifted left on eviction, attention over the
    last local_attn_size frames of the cache), simulated frame by frame."""
    cache, seen = [], []
    for start in range(0, num_frames, fpb):
        new = list(range(start, start + fpb))
        if len(cache) + fpb > local_attn_size:  # roll: evict the oldest frames after the sink
            evicted = len(cache) + fpb - local_attn_size
            cache = cache[:sink_size] + cache[sink_size + evicted:]
        cache += new
        seen.append(set(cache[max(0, len(cache) - local_attn_size):]))
    return seen


def ours_attended(num_frames: int, fpb: int, window: int | None, sink: int) -> list[set]:
    from self_forcing.sf_model.mask import frame_visibility

    vis = frame_visibility(num_frames, fpb, window, sink)
    return [set(torch_nonzero(vis[start])) for start in range(0, num_frames, fpb)]


def torch_nonzero(row) -> list[int]:
    return [int(i) for i in row.nonzero().flatten()]


@pytest.mark.parametrize("local_attn_size, sink_size", [(12, 3), (21, 0), (21, 3), (9, 1)])
def test_from_official_gives_the_official_attention(local_attn_size, sink_size):
    from self_forcing.sf_model.window import from_official, to_official

    window, sink = from_official(local_attn_size, sink_size)
    assert window == local_attn_size - sink_size and sink == sink_size
    assert to_official(window, sink) == local_attn_size
    assert ours_attended(60, 3, window, sink) == official_attended(60, 3, local_attn_size, sink_size)
    if sink_size:  # the official number taken as our window attends to sink_size more frames
        wrong = ours_attended(60, 3, local_attn_size, sink_size)
        assert all(len(w) == len(o) + sink_size for w, o in zip(wrong[-5:], official_attended(60, 3, local_attn_size,
                                                                                             sink_size)[-5:]))


def test_the_official_values_are_read_through_the_one_mapping():
    from self_forcing.sf_model.window import (checkpoint_sink, checkpoint_window, from_official, to_official,
                                              trained_attention)

    assert from_official(-1) == (None, 0) and to_official(None, 0) == -1
    for bad, match in [((3, 3), "larger than sink_size 3"), ((2.5, 0), "whole number"), ((12, -1), ">= 0")]:
        with pytest.raises(ValueError, match=match):
            from_official(*bad)
    longlive = {"local_attn_size": 12, "sink_size": 3}
    assert checkpoint_window(longlive) == 9 and checkpoint_sink(longlive) == 3
    assert checkpoint_window({"window": 9, "sink": 3, "local_attn_size": 12}) == 9
    assert checkpoint_window({"local_attn_size": -1}) is None and checkpoint_window({}) is None
    with pytest.raises(ValueError, match="local_attn_size counts the sink"):
        checkpoint_window({"window": 12, "sink": 3, "local_attn_size": 12})
    with pytest.raises(ValueError, match="must agree"):
        checkpoint_sink({"sink": 1, "sink_size": 3})
    assert trained_attention(longlive, CachePolicy.fixed(3)) == CachePolicy.rolling(3, 9, 3)
    opts = StreamOptions.from_meta(longlive, CachePolicy.fixed(3))
    assert (opts.window, opts.sink) == (9, 3)
    policy = CachePolicy.official(3, 12, 3, positions="rebased")
    assert policy == CachePolicy.rolling(3, 9, 3, positions="rebased") and policy.local_attn_size == 12
    assert "local_attn_size 12" in policy.describe() and "rebased" in policy.describe()
    assert StreamOptions.from_policy(policy).positions == "rebased"
    with pytest.raises(ValueError, match="positions must be one of absolute, rebased"):
        CachePolicy.rolling(3, 9, 3, positions="relative")


def test_cli_local_attn_size_and_positions_map_through_the_official_mapping():
    args = argparse.Namespace(window="auto", sink=3, steps=None, local_attn_size=12, positions="rebased")
    assert cache_policy(args, {}, 240) == CachePolicy.rolling(3, 9, 3, positions="rebased")
    args.local_attn_size, args.sink = -1, None
    assert cache_policy(args, {}, 240) == CachePolicy.fixed(3).with_positions("rebased")
    args.local_attn_size, args.sink = 3, 3
    with pytest.raises(ValueError, match="--local-attn-size 3 / --sink 3: .*larger than sink_size"):
        cache_policy(args, {}, 240)
    args.window = "9"
    with pytest.raises(ValueError, match="either --window .* or --local-attn-size"):
        cache_policy(args, {}, 240)


def test_the_options_node_states_both_semantics_and_defaults_from_the_checkpoint():
    from self_forcing.nodes.long_video import OPTIONS, LongVideoOptions, cache_policy as node_policy

    tip = OPTIONS.input("window").tooltip
    assert "local_attn_size" in tip and "window = local_attn_size - sink" in tip
    longlive = {"local_attn_size": 12, "sink_size": 3, "frames_per_block": 3}
    auto = LongVideoOptions("rolling", window=0, sink=-1, routing_topk=0, positions="rebased")
    assert auto.check().policy(3, longlive) == CachePolicy.rolling(3, 9, 3, positions="rebased")
    assert auto.policy(3, {}) == CachePolicy.rolling(3, 21, 0, positions="rebased")  # official: 21, no sink
    assert LongVideoOptions("rolling", 0, 3).policy(3, TOY_META) == CachePolicy.rolling(3, 9, 3)  # 12 - 3
    assert node_policy(None, frames_per_block=3, total_frames=100, meta=longlive) == CachePolicy.rolling(3, 9, 3)
