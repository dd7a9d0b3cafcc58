"""'Self Forcing Long-Video Options' and 'Self Forcing Prompt Schedule': their specs, what they output, and what a
run gets from them (plain Python, no ComfyUI import).

The options node's settings become an ``sf_model.window.CachePolicy`` (which validates them); without the node a
run gets ``default_policy`` narrowed to the checkpoint's trained attention (``trained_attention``), the same rule
as the CLI's ``--window auto``. Window semantics: our ``window`` does not count the sink, the official code's
``local_attn_size`` does (``window = local_attn_size - sink``, ``sf_model.window.from_official``).

The prompt schedule travels inside a core CONDITIONING: the node returns the ``previous`` prompt's entry with the
new prompt, its start frame and its switch policy added under ``SCHEDULE_KEY`` of the entry's dict, so the sampler
and extend nodes take it on their ``positive`` input (any other node sees the first prompt) and chains of schedule
nodes add one switch each. ``prompt_schedule`` turns it into an ``sf_model.prompt_schedule.PromptSchedule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..sf_model.prompt_schedule import DEFAULT_SWITCH, SWITCH_POLICIES, PromptSchedule, check_policy
from ..sf_model.window import (POSITION_MODES, CachePolicy, checkpoint_sink, checkpoint_window, default_policy,
                               routing_error, trained_attention, trained_frames)
from .schema import CAT_CONDITIONING, CAT_SAMPLING, OPTIONS_TYPE, InputSpec, NodeSpec, OutputSpec, check_inputs
from .text import context_from_conditioning, tensor_of

CACHE_POLICIES = ("fixed", "rolling")
NODE_NAME = "Self Forcing Long-Video Options"
SCHEDULE_NAME = "Self Forcing Prompt Schedule"
SCHEDULE_KEY = "self_forcing_prompt_schedule"


@dataclass(frozen=True)
class LongVideoOptions:
    """What the 'Long-Video Options' node outputs."""

    cache: str = "rolling"
    window: int = 21
    sink: int = 3
    routing_topk: int = 0
    positions: str = "absolute"
    kv_fp8: bool = False  # opt-in, less exact: the K/V cache in float8 (StreamOptions.kv_fp8)

    def check(self) -> "LongVideoOptions":
        """These settings against the node's spec: ranges, options and the routing rule (raises ValueError)."""
        ok = check_inputs(OPTIONS, cache=self.cache, window=self.window, sink=self.sink,
                          routing_topk=self.routing_topk, positions=self.positions, kv_fp8=self.kv_fp8)
        if ok is not True:
            raise ValueError(f"{NODE_NAME}: {ok}")
        return self

    def policy(self, frames_per_block: int, meta: Mapping | None = None) -> CachePolicy:
        """The cache of these settings (raises ValueError with a fix-it text); 'fixed' ignores window and sink.
        ``window`` 0 and ``sink`` -1 are the checkpoint's (``meta``): its sink, and its trained window, else its
        training clip less the sink (sink + window = the clip: the distances it was trained on)."""
        if self.cache not in CACHE_POLICIES:
            raise ValueError(f"cache '{self.cache}' is not one of: {', '.join(CACHE_POLICIES)}")
        if self.cache == "fixed":
            return CachePolicy.fixed(frames_per_block, self.routing_topk)
        meta = meta or {}
        sink = checkpoint_sink(meta) if self.sink < 0 else self.sink
        window = self.window
        if window == 0:
            trained = checkpoint_window(meta)
            window = trained if trained is not None else trained_frames(meta) - sink
            window = max(window, frames_per_block)
        return CachePolicy.rolling(frames_per_block, window, sink, self.routing_topk, self.positions)


def _routing_rule(values: Mapping) -> str | None:
    if values.get("cache") != "rolling" or not values.get("window"):  # no window to compare with
        return None
    return routing_error(values.get("window"), values.get("routing_topk"))


OPTIONS = NodeSpec(
    node_id="SelfForcingLongVideoOptions",
    display_name=NODE_NAME,
    category=CAT_SAMPLING,
    description="KV-cache policy for videos longer than the training length: rolling window with an "
                "attention sink, history routing and the position rule. Connect to the sampler's or extend "
                "node's options.",
    inputs=(
        InputSpec("cache", "COMBO",
                  "fixed: one cache holding the whole video (exact for <= 81 frames, memory grows with "
                  "length). rolling: keep only the sink frames plus the last `window` latent frames "
                  "(bounded memory, any length).", default="rolling", options=CACHE_POLICIES),
        InputSpec("window", "INT",
                  "Rolling window in latent frames (1 latent frame = 4 video frames) AFTER the sink, the current "
                  "chunk included: the sink is NOT counted (the official code's local_attn_size counts it: "
                  "window = local_attn_size - sink, e.g. LongLive's local_attn_size 12 with sink 3 is window 9). "
                  "0 = the checkpoint's: its trained window, else its training clip minus the sink (official: "
                  "21). Must be at least frames_per_block. Ignored for 'fixed'.", default=21, min=0, max=1024),
        InputSpec("sink", "INT",
                  "Attention sink: the first N latent frames of the video stay in the cache forever (keeps "
                  "the scene anchored on long videos), in addition to the window. 0 = none, -1 = the "
                  "checkpoint's (none for the official one). Ignored for 'fixed'.",
                  default=3, min=-1, max=64),
        InputSpec("routing_topk", "INT",
                  "History routing: each chunk attends only to the k cached history frames whose mean-pooled "
                  "keys match it best, plus the sink and itself. 0 = off (attend to everything cached). "
                  "Useful values 3-12.", default=0, min=0, max=1024),
        InputSpec("positions", "COMBO",
                  "Temporal RoPE positions with a rolling cache and a sink. absolute: every frame at its own index "
                  "(the official sampler; the sink-to-chunk distance grows without bound on long videos). "
                  "rebased: the model sees the sink at positions 0..sink-1 and the window right after it, so no "
                  "distance exceeds sink + window (keep that <= 21, the official training length). Identical "
                  "until the window first slides past the sink, and without a sink.",
                  default="absolute", options=POSITION_MODES, optional=True),
        InputSpec("kv_fp8", "BOOLEAN",
                  "Opt-in, less exact: keep the cached keys/values in float8 e4m3 (about half of bf16's cache "
                  "memory; today slower, and the video drifts from the exact one; figures in docs/benchmarks.md). "
                  "Any device, the CPU included. Not with routing_topk, nor rebased positions with a sink, nor a "
                  "KV re-cache prompt switch with a sink.", default=False, optional=True),
    ),
    outputs=(OutputSpec(OPTIONS_TYPE, "options", "Long-video settings for the sampler / extend node."),),
    rules=(_routing_rule,),
)

# The sampler's and extend node's 'options' input (its unconnected default is ``cache_policy``'s).
OPTIONS_INPUT = InputSpec(
    "options", OPTIONS_TYPE,
    f"Optional long-video settings from '{NODE_NAME}' (rolling KV cache window, attention sink, history "
    "routing, positions). Not connected: one fixed cache while the video (for Extend Video: the input plus the new "
    "frames) fits the length the model was trained on (81 frames for the official checkpoint; a toy model: its "
    "training clip); a longer video gets a rolling window of that length with the checkpoint's attention sink (none "
    "for the official one), narrowed to the sliding window the checkpoint was trained with if it stores one, the same "
    "rule as the CLI's --window auto.",
    optional=True)


def cache_policy(long_video: LongVideoOptions | None, *, frames_per_block: int, total_frames: int, meta: Mapping,
                 rope_max_frames: int | None = None) -> CachePolicy:
    """The cache of a run of ``total_frames`` latent frames (prefix included): the options node's, or
    without it ``default_policy`` of the checkpoint's metadata as its training asks (``trained_attention``: its
    sliding window, its routing). Raises ValueError with a fix-it text."""
    if long_video is None:
        return trained_attention(meta, default_policy(meta, total_frames, frames_per_block=frames_per_block,
                                                      rope_max_frames=rope_max_frames))
    policy = long_video.policy(frames_per_block, meta)
    err = policy.fixed_cache_error(total_frames, rope_max_frames) if rope_max_frames is not None else None
    if err:
        raise ValueError(f"{err}: set cache to 'rolling' in '{NODE_NAME}'")
    return policy


# -- the prompt schedule --------------------------------------------------------------------------------
SCHEDULE = NodeSpec(
    node_id="SelfForcingPromptSchedule",
    display_name=SCHEDULE_NAME,
    category=CAT_CONDITIONING,
    description="Switches the prompt mid-video: the sampler (or extend node) fed with this output generates under "
                "'previous' until start_frame, then under 'conditioning'; the video streams on across the switch. "
                "Chain several (each one's output into the next one's 'previous') for more switches.",
    inputs=(
        InputSpec("previous", "CONDITIONING",
                  "The prompt before the switch (CLIPTextEncode, 'Load Text Embeddings', 'Self Forcing Toy Text "
                  "Encode'), or the output of another Prompt Schedule node (chaining adds a switch)."),
        InputSpec("conditioning", "CONDITIONING", "The prompt from start_frame on (one prompt, not a schedule)."),
        InputSpec("start_frame", "INT",
                  "Video frame from which the new prompt applies: counted from the first frame of the sampler's "
                  "video, or from the first NEW frame for Extend Video (0 there = all new frames). It takes over at "
                  "the first chunk starting at or after it (Wan: 4 video frames per latent frame, 3 latent frames "
                  "per chunk = 12 video frames; toy: 3). 0 on the sampler replaces 'previous'.",
                  default=40, min=0, max=1_000_000),
        InputSpec("switch", "COMBO",
                  "What the switch does to the KV cache. recache: recompute the cached frames' keys/values under "
                  "the new prompt from their clean latents (LongLive's KV re-cache: the new prompt takes over "
                  "quickly while the scene stays continuous; costs (sink + window) / 3 extra forwards). keep: keep "
                  "the old keys/values (cheapest; the old content lingers while it is in the window). reset: empty "
                  "the cache (a new shot: the new prompt at once, no continuity).",
                  default=DEFAULT_SWITCH, options=SWITCH_POLICIES),
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning",
                        "'previous' with the switch added: connect to the sampler's or extend node's 'positive' (or "
                        "to another Prompt Schedule)."),),
    search_aliases=("prompt switch", "prompt travel", "interactive prompt", "longlive"),
)


def _entry(conditioning, name: str):
    tensor_of(conditioning, name)  # one prompt, a text-encoder tensor
    entry = conditioning[0]
    extra = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
    return entry[0] if isinstance(entry, (list, tuple)) else entry, extra


def add_prompt(previous, conditioning, start_frame: int, switch: str = DEFAULT_SWITCH) -> list:
    """The node's output: ``previous`` (a prompt or a schedule) with ``conditioning`` from ``start_frame``."""
    check_policy(switch)
    if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
        raise ValueError(f"start_frame must be a whole video frame >= 0, got {start_frame!r}")
    tensor, extra = _entry(previous, "previous")
    _, new_extra = _entry(conditioning, "conditioning")
    if new_extra.get(SCHEDULE_KEY):
        raise ValueError(f"'conditioning' of '{SCHEDULE_NAME}' is itself a schedule; connect one prompt there and "
                         "chain schedules through 'previous'")
    entries = tuple(extra.get(SCHEDULE_KEY, ()))
    clash = [e for e in entries if e[0] == start_frame]
    if clash:
        raise ValueError(f"two prompts of the schedule start at frame {start_frame}; give each switch its own "
                         "start_frame")
    out = dict(extra)
    out[SCHEDULE_KEY] = entries + ((start_frame, [list(conditioning[0])], switch),)
    return [[tensor, out]]


def scheduled_prompts(conditioning) -> list[tuple[int, list, str]]:
    """(start video frame, one-prompt CONDITIONING, switch) of every switch a CONDITIONING carries, by start."""
    if not (isinstance(conditioning, (list, tuple)) and conditioning and isinstance(conditioning[0], (list, tuple))
            and len(conditioning[0]) > 1 and isinstance(conditioning[0][1], dict)):
        return []
    return sorted(conditioning[0][1].get(SCHEDULE_KEY, ()), key=lambda e: e[0])


def prompt_schedule(conditioning, first: torch.Tensor, *, text_dim: int, text_len: int, space, offset: int = 0,
                    batch: int | None = None) -> PromptSchedule | None:
    """The ``PromptSchedule`` of a sampler's ``positive`` (None when it holds one prompt): ``first`` (its prompt
    tensor) from frame 0, each switch at latent frame ``offset + ceil(start / space.temporal)`` (``offset``: the
    extend node's input length). Every prompt is checked as the first one is; batches of 1 are expanded to
    ``batch``."""
    entries = scheduled_prompts(conditioning)
    if not entries:
        return None
    batch = batch or first.shape[0]

    def fit(ctx: torch.Tensor, what: str) -> torch.Tensor:
        if ctx.shape[0] not in (1, batch):
            raise ValueError(f"{what} has batch {ctx.shape[0]} but the video has batch {batch}; use one prompt")
        return ctx.expand(batch, -1, -1)

    switches = []
    for start, cond, switch in entries:
        what = f"the prompt scheduled at frame {start}"
        space.check_prompt(cond)
        ctx = context_from_conditioning(cond, text_dim, text_len)
        switches.append((offset + -(-int(start) // space.temporal), fit(ctx, what), switch))
    return PromptSchedule.of(fit(first, "positive"), switches)
