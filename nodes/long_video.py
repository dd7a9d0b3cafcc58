"""'Self Forcing Long-Video Options': its spec, what it outputs, and the cache a run gets from it (plain
Python, no ComfyUI import).

The node's settings become an ``sf_model.window.CachePolicy`` (which validates them); without the node a
run gets ``default_policy``, the same rule as the CLI's ``--window auto``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..sf_model.window import CachePolicy, default_policy, routing_error
from .schema import CAT_SAMPLING, OPTIONS_TYPE, InputSpec, NodeSpec, OutputSpec, check_inputs

CACHE_POLICIES = ("fixed", "rolling")
NODE_NAME = "Self Forcing Long-Video Options"


@dataclass(frozen=True)
class LongVideoOptions:
    """What the 'Long-Video Options' node outputs."""

    cache: str = "rolling"
    window: int = 21
    sink: int = 3
    routing_topk: int = 0

    def check(self) -> "LongVideoOptions":
        """These settings against the node's spec: ranges, options and the routing rule (raises ValueError)."""
        ok = check_inputs(OPTIONS, cache=self.cache, window=self.window, sink=self.sink,
                          routing_topk=self.routing_topk)
        if ok is not True:
            raise ValueError(f"{NODE_NAME}: {ok}")
        return self

    def policy(self, frames_per_block: int) -> CachePolicy:
        """The cache of these settings (raises ValueError with a fix-it text); 'fixed' ignores window and sink."""
        if self.cache not in CACHE_POLICIES:
            raise ValueError(f"cache '{self.cache}' is not one of: {', '.join(CACHE_POLICIES)}")
        if self.cache == "fixed":
            return CachePolicy.fixed(frames_per_block, self.routing_topk)
        return CachePolicy.rolling(frames_per_block, self.window, self.sink, self.routing_topk)


def _routing_rule(values: Mapping) -> str | None:
    if values.get("cache") != "rolling":  # the window does not apply to a fixed cache
        return None
    return routing_error(values.get("window"), values.get("routing_topk"))


OPTIONS = NodeSpec(
    node_id="SelfForcingLongVideoOptions",
    display_name=NODE_NAME,
    category=CAT_SAMPLING,
    description="KV-cache policy for videos longer than the training length: rolling window with an "
                "attention sink, and history routing. Connect to the sampler's or extend node's options.",
    inputs=(
        InputSpec("cache", "COMBO",
                  "fixed: one cache holding the whole video (exact for <= 81 frames, memory grows with "
                  "length). rolling: keep only the sink frames plus the last `window` latent frames "
                  "(bounded memory, any length).", default="rolling", options=CACHE_POLICIES),
        InputSpec("window", "INT",
                  "Rolling window in latent frames (1 latent frame = 4 video frames), the current chunk "
                  "included. 21 = the official training length (81 frames). Must be at least frames_per_block. "
                  "Ignored for 'fixed'.", default=21, min=1, max=1024),
        InputSpec("sink", "INT",
                  "Attention sink: the first N latent frames of the video stay in the cache forever (keeps "
                  "the scene anchored on long videos). 0 = none. Ignored for 'fixed'.",
                  default=3, min=0, max=64),
        InputSpec("routing_topk", "INT",
                  "History routing: each chunk attends only to the k cached history frames whose mean-pooled "
                  "keys match it best, plus the sink and itself. 0 = off (attend to everything cached). "
                  "Useful values 3-12.", default=0, min=0, max=1024),
    ),
    outputs=(OutputSpec(OPTIONS_TYPE, "options", "Long-video settings for the sampler / extend node."),),
    rules=(_routing_rule,),
)

# The sampler's and extend node's 'options' input (its unconnected default is ``cache_policy``'s).
OPTIONS_INPUT = InputSpec(
    "options", OPTIONS_TYPE,
    f"Optional long-video settings from '{NODE_NAME}' (rolling KV cache window, attention sink, history "
    "routing). Not connected: one fixed cache while the video (for Extend Video: the input plus the new frames) "
    "fits the length the model was trained on (81 frames for the official checkpoint; a toy model: its training "
    "clip); a longer video gets a rolling window of that length with the checkpoint's attention sink (none for "
    "the official one), the same rule as the CLI's --window auto.",
    optional=True)


def cache_policy(long_video: LongVideoOptions | None, *, frames_per_block: int, total_frames: int, meta: Mapping,
                 rope_max_frames: int | None = None) -> CachePolicy:
    """The cache of a run of ``total_frames`` latent frames (prefix included): the options node's, or
    without it ``default_policy`` of the checkpoint's metadata. Raises ValueError with a fix-it text."""
    if long_video is None:
        return default_policy(meta, total_frames, frames_per_block=frames_per_block, rope_max_frames=rope_max_frames)
    policy = long_video.policy(frames_per_block)
    err = policy.fixed_cache_error(total_frames, rope_max_frames) if rope_max_frames is not None else None
    if err:
        raise ValueError(f"{err}: set cache to 'rolling' in '{NODE_NAME}'")
    return policy
