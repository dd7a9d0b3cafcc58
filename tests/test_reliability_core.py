"""Reliability of sf_model against bad inputs: every test here failed on the code before its fix."""

import math

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.resample import resample_history
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.window import CachePolicy

CTX = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))


def recording_caches(model):
    """Wrap ``model.new_cache`` to remember the slots (capacity) of every cache it builds."""
    sizes, build = [], model.new_cache

    def new_cache(*args, **kwargs):
        cache = build(*args, **kwargs)
        sizes.append(cache.capacity)
        return cache

    model.new_cache = new_cache
    return sizes


# -- item 2: the KV cache never holds more slots than the run has frames --------------------------------
def test_a_window_longer_than_the_video_allocates_only_the_video_and_gives_the_same_latents(make_tiny):
    model = make_tiny(TINY, seed=3)
    sizes = recording_caches(model)
    huge = StreamOptions(frames_per_block=3, window=1024, sink=64, extend_positions=True)
    exact = StreamOptions(frames_per_block=3, window=3, extend_positions=True)
    a = generate(model, CTX, num_frames=3, height=4, width=6, seed=1, options=huge)
    b = generate(model, CTX, num_frames=3, height=4, width=6, seed=1, options=exact)
    c = generate(model, CTX, num_frames=3, height=4, width=6, seed=1)  # the fixed cache
    assert torch.equal(a, b) and torch.equal(a, c)
    assert sizes == [3, 3, 3]  # was 1088 slots for window 1024 + sink 64


def test_a_bounded_cache_keeps_routing_and_sink_results_and_a_wrapping_ring_is_unchanged(make_tiny):
    model = make_tiny(TINY, seed=5)
    sizes = recording_caches(model)
    # 9 frames, sink 2, routing top 2: a ring of 1000 never wraps, so it is the ring of the 7 frames after the sink
    big = StreamOptions(frames_per_block=3, window=1000, sink=2, routing_topk=2, extend_positions=True)
    fit = StreamOptions(frames_per_block=3, window=7, sink=2, routing_topk=2, extend_positions=True)
    assert torch.equal(generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=big),
                       generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=fit))
    # a sink longer than the video: sink slots only
    sink_only = StreamOptions(frames_per_block=3, window=3, sink=100, extend_positions=True)
    plain = StreamOptions(frames_per_block=3, window=9, extend_positions=True)
    assert torch.equal(generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=sink_only),
                       generate(model, CTX, num_frames=9, height=4, width=6, seed=2, options=plain))
    ring = StreamOptions(frames_per_block=3, window=6, sink=1, extend_positions=True)
    generate(model, CTX, num_frames=24, height=4, width=6, seed=2, options=ring)
    assert sizes == [9, 9, 9, 9, 7]  # the ring that wraps keeps its window + sink


def test_resampling_history_allocates_no_more_than_the_history(make_tiny):
    model = make_tiny(TINY, seed=6)
    sizes = recording_caches(model)
    history = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(2))
    opts = StreamOptions(frames_per_block=3, window=4096, sink=64, extend_positions=True)
    out = resample_history(model, CTX, history, frames=3, strength=0.5, options=opts)
    ref = resample_history(model, CTX, history, frames=3, strength=0.5,
                           options=StreamOptions(frames_per_block=3, window=6, extend_positions=True))
    assert torch.equal(out, ref) and sizes == [6, 6]


ABSURD_POLICIES = [
    (dict(window=math.nan), "rolling window must be a whole number.*nan"),
    (dict(window=6.5), "rolling window must be a whole number.*6.5"),
    (dict(window="12"), "rolling window must be a whole number"),
    (dict(window=True), "rolling window must be a whole number"),
    (dict(window=6, sink=math.nan), "sink must be a whole number"),
    (dict(window=None, sink=math.nan), "sink must be a whole number"),  # not silently dropped by a fixed cache
    (dict(window=6, sink=1e9), "sink must be a whole number"),
    (dict(frames_per_block=2.0), "frames_per_block must be a whole number"),
    (dict(window=12, routing_topk=math.inf), "routing_topk must be a whole number"),
    (dict(window=-1), "rolling window must be >= 1"),
    (dict(window=6, sink=-2), "sink must be >= 0"),
]


def test_cache_policy_and_stream_options_refuse_absurd_inputs_with_a_clear_message():
    for kwargs, match in ABSURD_POLICIES:
        for build in (CachePolicy, StreamOptions):
            with pytest.raises(ValueError, match=match):
                build(**{"frames_per_block": 3, **kwargs})
