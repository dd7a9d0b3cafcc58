"""The streaming chunk sampler of Self Forcing: one chunk of frames at a time against a KV cache.

Per chunk: start from noise; for each step predict x0 (flow -> x0) and, unless it is the last step,
re-noise x0 with fresh noise to the next step's level; then run one forward on the final x0 at
``context_noise`` to write the chunk's clean K/V into the cache, and move on. ``stream`` is a Python
generator that yields every finished chunk as soon as it exists (right after its last denoising pass;
the clean cache pass follows when the next chunk is requested). The same ``denoise_chunk`` /
``commit_chunk`` functions drive the trainer's rollouts (with an exit step and gradient at that step).

Noise is drawn on the CPU from a generator seeded per chunk (``sf_model.noise``), so a seed gives the
same video on every device and every chunk is reproducible on its own.

Long videos: ``context`` may be a ``PromptSchedule`` (prompt switches mid-stream with a cache policy per switch:
keep, LongLive's KV re-cache, or reset; ``sf_model.prompt_schedule``), and ``StreamOptions.positions`` picks the
position rule of a rolling cache with a sink ('absolute' as the official sampler, or 'rebased';
``sf_model.positions``). With one prompt and absolute positions the stream is exactly the plain loop above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .cache import KVCache, TextContext
from .noise import NoiseStream
from .positions import StreamPositions
from .prompt_schedule import LatentWindow, PromptSchedule, recache_pieces
from .schedule import DEFAULT_SHIFT, DEFAULT_STEPS, Step, add_noise, finite_number, make_steps
from .window import CachePolicy, cache_slots, check_cache, check_positions, trained_attention

SOLVERS = ("renoise", "euler")


@dataclass(frozen=True)
class StreamOptions:
    """How to stream. Frames are *latent* frames (Wan: 1 latent frame = 4 pixel frames, the first 1)."""

    frames_per_block: int = 3
    steps: Sequence[float] = DEFAULT_STEPS
    warp: bool = True                 # index the shifted 1000-entry table with the nominal steps
    shift: float = DEFAULT_SHIFT
    context_noise: float = 0.0        # timestep of the clean pass that writes a chunk's K/V
    window: int | None = None         # None: cache the whole video (fixed); int: rolling window of W frames
    sink: int = 0                     # first S frames always kept in the cache
    routing_topk: int | None = None   # attend to the top-k history frames (plus sink and current chunk)
    extend_positions: bool = False    # allow RoPE positions beyond the model's table (long rolling videos)
    final_context_pass: bool = False  # also write the last chunk's clean K/V (needed only to continue)
    partial_last_chunk: bool = False  # allow a frame count that is not a multiple of frames_per_block
    solver: str = "renoise"           # between steps: "renoise" (x0 + fresh noise, Self Forcing) or "euler" (flow ODE)
    positions: str = "absolute"       # rolling cache + sink: "absolute" (official) or "rebased" (sf_model.positions)
    kv_fp8: bool = False              # opt-in, less exact: K/V cache in float8 e4m3 (sf_model.speed.kv_fp8)

    def __post_init__(self):
        if isinstance(self.steps, (str, bytes)):
            raise ValueError(f"steps must be a list of timesteps, got the text {self.steps!r} (see parse_steps)")
        object.__setattr__(self, "steps", tuple(self.steps))
        check_cache(self.frames_per_block, self.window, self.sink, self.routing_topk)
        if not 0 <= finite_number("context_noise", self.context_noise) <= 1000:
            raise ValueError(f"context_noise is a timestep in [0, 1000], got {self.context_noise}")
        make_steps(self.steps, self.shift, self.warp)  # validates the step list
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        check_positions(self.positions)
        if self.kv_fp8 and self.routing_topk is not None:
            raise ValueError("the FP8 K/V cache (kv_fp8) does not support history routing (routing_topk)")
        if self.kv_fp8 and self.positions == "rebased" and self.sink:
            raise ValueError("the FP8 K/V cache (kv_fp8) does not support rebased positions with a sink")

    @classmethod
    def from_policy(cls, cache: CachePolicy, *, steps: Sequence[float] = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT,
                    warp: bool = True, context_noise: float = 0.0, **flags) -> "StreamOptions":
        """The options of a run with the cache ``cache`` (its chunk size, window, sink, routing and position
        rules); ``flags``: ``final_context_pass``, ``partial_last_chunk``, ``solver``, ``kv_fp8``."""
        return cls(frames_per_block=cache.frames_per_block, steps=steps, warp=warp, shift=shift,
                   context_noise=context_noise, window=cache.window, sink=cache.sink,
                   routing_topk=cache.routing_topk, extend_positions=cache.extend_positions,
                   positions=cache.positions, **flags)

    @classmethod
    def from_meta(cls, meta, cache: CachePolicy, *, steps: Sequence[float] | None = None, **flags) -> "StreamOptions":
        """The sampling settings a checkpoint stores (``steps``, ``shift``, ``warp``, ``context_noise``,
        ``solver``; the official values where it stores none) with the cache ``cache`` as the checkpoint's
        attention asks (``sf_model.window.trained_attention``: its routing k, its sliding window); ``steps``
        overrides the stored list."""
        flags.setdefault("solver", str(meta.get("solver", "renoise")))
        return cls.from_policy(trained_attention(meta, cache),
                               steps=tuple(steps if steps is not None else meta.get("steps", DEFAULT_STEPS)),
                               shift=float(meta.get("shift", DEFAULT_SHIFT)), warp=bool(meta.get("warp", True)),
                               context_noise=float(meta.get("context_noise", 0.0)), **flags)


@dataclass
class Chunk:
    index: int
    start_frame: int       # absolute latent frame index of the chunk's first frame
    latents: torch.Tensor  # [B, C, F, H, W] float32, model space
    prompt: int = 0        # the entry of the prompt schedule it was generated under


@dataclass
class StepEvent:
    chunk_index: int
    step_index: int
    num_steps: int
    passes_done: int
    passes_total: int
    x0: torch.Tensor = field(repr=False)


class Cancelled(Exception):
    """Raised by a ``check_cancel`` callback to stop sampling (any exception works)."""


def chunk_plan(start: int, total: int, frames_per_block: int) -> list[tuple[int, int]]:
    """(start_frame, frames) of each chunk covering [start, total); the last one may be shorter."""
    return [(s, min(frames_per_block, total - s)) for s in range(start, total, frames_per_block)]


def denoise_chunk(model, text: TextContext, cache: KVCache, start: int, noise: Sequence[torch.Tensor],
                  steps: Sequence[Step], opts: StreamOptions, *, exit_index: int | None = None,
                  grad_at_exit: bool = False, on_pass: Callable[[int, torch.Tensor], None] | None = None,
                  check_cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Few-step denoising of one chunk from ``noise[0]``; returns x0 [B, C, F, H, W] (float32).

    ``exit_index`` stops after that step (Self Forcing's random exit); with ``grad_at_exit`` only the
    exit step's forward records gradient (the cache is always written from detached K/V).
    """
    last = len(steps) - 1 if exit_index is None else exit_index
    x = noise[0]
    b, f = x.shape[0], x.shape[2]
    x0 = None
    for i in range(last + 1):
        if check_cancel is not None:
            check_cancel()
        t = torch.full((b, f), steps[i].timestep, device=x.device, dtype=torch.float32)
        with torch.set_grad_enabled(grad_at_exit and i == last):
            flow = model.forward_chunk(x, t, text, cache, start, routing_topk=opts.routing_topk,
                                       extend_positions=opts.extend_positions)
            x0 = x - steps[i].sigma * flow
        if on_pass is not None:
            on_pass(i, x0)
        if i < last:  # Euler: the predicted noise x0 + flow in place of fresh noise (x + (sigma' - sigma) flow)
            nxt = (x0 + flow).detach() if opts.solver == "euler" else noise[i + 1]
            x = add_noise(x0.detach(), nxt, steps[i + 1].sigma)
    return x0


def commit_chunk(model, text: TextContext, cache: KVCache, start: int, x0: torch.Tensor,
                 opts: StreamOptions) -> None:
    """Write the chunk's clean K/V: one forward on x0 at timestep ``context_noise`` (no gradient)."""
    b, f = x0.shape[0], x0.shape[2]
    t = torch.full((b, f), float(opts.context_noise), device=x0.device, dtype=torch.float32)
    with torch.no_grad():
        model.forward_chunk(x0.detach(), t, text, cache, start, routing_topk=opts.routing_topk,
                            extend_positions=opts.extend_positions)


def prefill(model, text: TextContext, cache: KVCache, prefix: torch.Tensor, opts: StreamOptions,
            check_cancel: Callable[[], None] | None = None) -> None:
    """Fill the cache with given clean latents (image-to-video: 1 frame; continuation: many)."""
    for start, frames in chunk_plan(0, prefix.shape[2], opts.frames_per_block):
        if check_cancel is not None:
            check_cancel()
        commit_chunk(model, text, cache, start, prefix[:, :, start:start + frames], opts)


def recache(model, text: TextContext, cache: KVCache, positions: StreamPositions, latents: LatentWindow, n: int,
            next_frames: int, opts: StreamOptions, check_cancel: Callable[[], None] | None = None) -> None:
    """LongLive's KV re-cache before a chunk of ``next_frames`` at cache frame ``n``: empty the cache and refill it
    under ``text`` with clean context passes over the kept frames' clean latents -- the sink, then the window
    frames the next chunk sees, packed right after the sink (``positions`` keeps every distance as it was) --
    in ``sf_model.prompt_schedule.recache_pieces``' chunks."""
    sink_pieces, window_pieces, lo = recache_pieces(cache.sink, n, next_frames, opts.window, opts.frames_per_block)
    kept = [(c, latents.read(c, c + f)) for c, f in sink_pieces + window_pieces]
    removed = lo - cache.sink if n > cache.sink else 0  # frames between the sink and the kept window (none kept:
    # a window of one chunk sees only the sink and itself)
    cache.reset()
    positions.repack(removed)
    for c, lat in kept:
        if check_cancel is not None:
            check_cancel()
        c = c if c < cache.sink else c - removed
        positions.before(c, lat.shape[2])
        commit_chunk(model, text, cache, c, lat, opts)
        positions.after_commit(c, lat.shape[2])
        latents.write(c, lat)


def prepare(model, context, batch_hint: int | None = None) -> TextContext:
    if isinstance(context, TextContext):
        return context
    if not isinstance(context, torch.Tensor):
        raise ValueError(f"context must be a tensor of text states or a TextContext, got {type(context).__name__}")
    if context.is_floating_point() and context.numel():  # once per run (one device sync), not per chunk
        lo, hi = torch.aminmax(context.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError("the text context holds NaN or Inf values, which would give NaN latents (a black "
                             "video); check the text encoder or the saved embeddings")
    with torch.no_grad():
        return model.encode_text(context)


class _Texts:
    """The prepared prompt (cross-attention K/V) of each schedule entry, made when first needed and kept for the
    few most recent contexts only, so a schedule of many switches costs the memory of a few prompts."""

    KEEP = 4

    def __init__(self, model, entries):
        self.model, self.contexts = model, [getattr(e, "context", e) for e in entries]
        batches = [c.batch if isinstance(c, TextContext) else (c.shape[0] if isinstance(c, torch.Tensor) else None)
                   for c in self.contexts]
        if len({b for b in batches if b is not None}) > 1:
            raise ValueError(f"the prompts of a schedule must have one batch size, got {batches}")
        self.ready: dict[int, TextContext] = {}

    def __getitem__(self, k: int) -> TextContext:
        ctx = self.contexts[k]
        text = self.ready.get(id(ctx))
        if text is None:
            if len(self.ready) >= self.KEEP:
                self.ready.pop(next(iter(self.ready)))
            text = self.ready[id(ctx)] = prepare(self.model, ctx)
        return text


def check_request(model, num_frames: int, height: int, width: int, prefix, opts: StreamOptions, batch: int):
    cfg = model.config
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 latent frame, got {num_frames}")
    ph, pw = cfg.patch_size[1:]
    if height < ph or width < pw or height % ph or width % pw:
        raise ValueError(f"latent size {height}x{width} must be a positive multiple of {ph}x{pw} "
                         f"(pixel sizes multiple of {8 * ph}x{8 * pw} for Wan)")
    if prefix is not None:
        if prefix.ndim != 5 or prefix.shape[1] != cfg.in_dim or tuple(prefix.shape[3:]) != (height, width):
            raise ValueError(f"prefix latents must be [B, {cfg.in_dim}, P, {height}, {width}], "
                             f"got {tuple(prefix.shape)}")
        if prefix.shape[0] != batch:
            raise ValueError(f"prefix batch {prefix.shape[0]} does not match the text batch {batch}")
        if prefix.device != model.device:
            raise ValueError(f"prefix latents are on {prefix.device} but the model is on {model.device}")
    fpb = opts.frames_per_block
    if num_frames % fpb and not opts.partial_last_chunk:
        lo, hi = num_frames - num_frames % fpb, num_frames - num_frames % fpb + fpb
        hint = f"use {lo} or {hi}" if lo else f"use {hi}"
        raise ValueError(f"{num_frames} latent frames is not a multiple of frames_per_block {fpb}; {hint} "
                         "(or allow a shorter last chunk with partial_last_chunk=True)")
    total = num_frames + (prefix.shape[2] if prefix is not None else 0)
    model.rope.check_frames(0, total, opts.extend_positions)
    return total


def stream(model, context, *, num_frames: int, height: int, width: int, seed: int = 0,
           options: StreamOptions | None = None, prefix: torch.Tensor | None = None,
           on_step: Callable[[StepEvent], None] | None = None,
           check_cancel: Callable[[], None] | None = None,
           cache: KVCache | None = None) -> Iterator[Chunk]:
    """Generate ``num_frames`` latent frames chunk by chunk, yielding each finished ``Chunk``.

    ``context``: text states [B, L, text_dim] (or a prepared TextContext), or a ``PromptSchedule`` of them
    (prompt switches; its start frames count the prefix); ``height``/``width``: latent size; ``prefix``: clean
    model-space latents [B, C, P, H, W] to prefill the cache with (each prefill chunk under the prompt of its
    first frame). ``cache``: an existing KVCache to reuse (it is reset, not reallocated). The cache is released
    (or reset) when the generator finishes, is closed, or raises -- also on cancellation.
    """
    opts = options or StreamOptions()
    model.check_dtypes()
    schedule = context if isinstance(context, PromptSchedule) else None
    texts = _Texts(model, schedule.entries if schedule is not None else [context])
    batch = texts[0].batch
    total = check_request(model, num_frames, height, width, prefix, opts, batch)
    steps = make_steps(opts.steps, opts.shift, opts.warp)
    ph, pw = model.config.patch_size[1:]
    frame_tokens = (height // ph) * (width // pw)
    window, sink = cache_slots(opts.window, opts.sink, total)  # no more slots than the run has frames
    own = cache is None
    if own and opts.kv_fp8:
        from .speed.kv_fp8 import Fp8KVCache  # opt-in speed feature: imported only when asked for

        cache = Fp8KVCache.for_model(model, batch, frame_tokens, window=window, sink=sink)
    elif own:
        cache = model.new_cache(batch, frame_tokens, window=window, sink=sink,
                                key_means=opts.routing_topk is not None)
    else:
        if getattr(cache, "quantized", False) != opts.kv_fp8:
            raise ValueError(f"the given cache {'is' if cache.quantized else 'is not'} an FP8 K/V cache but "
                             f"options.kv_fp8 is {opts.kv_fp8}")
        fits = ((window, sink), (opts.window if opts.window is not None else total, opts.sink))
        if (cache.frame_tokens, cache.batch) != (frame_tokens, batch) or (cache.window, cache.sink) not in fits:
            raise ValueError("the given cache does not match this request (tokens per frame, batch, window, sink)")
        if opts.routing_topk is not None and cache.key_mean is None:
            raise ValueError("history routing needs a cache built with key_means=True")
        cache.reset()
    recaching = schedule is not None and schedule.needs_latents
    positions = StreamPositions(model, cache, window=opts.window, mode=opts.positions,
                                active=opts.positions == "rebased" or recaching)
    if positions.active and opts.kv_fp8:
        if own:
            cache.release()
        raise ValueError("the FP8 K/V cache (kv_fp8) cannot re-rotate a sink: no KV re-caching prompt switches "
                         "with a sink")
    latents = LatentWindow(cache, batch, model.config.in_dim, height, width, model.device) if recaching else None
    at = schedule.index_at if schedule is not None else (lambda _frame: 0)
    start0 = prefix.shape[2] if prefix is not None else 0
    plan = chunk_plan(start0, total, opts.frames_per_block)
    passes_total = len(plan) * len(steps)
    shape_of = lambda f: (batch, model.config.in_dim, f, height, width)  # noqa: E731
    noise_source = NoiseStream(seed, model.device, math.prod(shape_of(opts.frames_per_block)))
    current = None  # the schedule entry the cached frames were made under (None: nothing cached yet)
    try:
        if prefix is not None:
            for start, frames in chunk_plan(0, start0, opts.frames_per_block):  # ``prefill``, prompt by prompt
                if check_cancel is not None:
                    check_cancel()
                current, piece = at(start), prefix[:, :, start:start + frames].float()
                positions.before(start, frames)
                commit_chunk(model, texts[current], cache, start, piece, opts)
                positions.after_commit(start, frames)
                if latents is not None:
                    latents.write(start, piece)
        for ci, (start, frames) in enumerate(plan):
            k = at(start)
            if current is not None and k != current:
                policy = schedule.entries[k].policy
                if policy == "reset":
                    cache.reset()
                    positions.reset(start)
                elif policy == "recache":
                    recache(model, texts[k], cache, positions, latents, positions.cache_frame(start), frames, opts,
                            check_cancel)
            current = k
            c_start = positions.cache_frame(start)
            noise = noise_source.chunk(ci, len(steps), shape_of(frames))

            def on_pass(i, x0, ci=ci):
                if on_step is not None:
                    on_step(StepEvent(ci, i, len(steps), ci * len(steps) + i + 1, passes_total, x0))

            positions.before(c_start, frames)
            with torch.no_grad():
                x0 = denoise_chunk(model, texts[k], cache, c_start, noise, steps, opts, on_pass=on_pass,
                                   check_cancel=check_cancel)
            # The chunk is final after its last denoising pass: hand it out before the clean context
            # pass, which runs when the consumer asks for the next chunk (lower first-chunk latency,
            # and a decoder can start on it meanwhile). The consumer gets its own copy.
            yield Chunk(ci, start, x0.clone(), k)
            if ci < len(plan) - 1 or opts.final_context_pass:
                if check_cancel is not None:
                    check_cancel()
                nxt = at(plan[ci + 1][0]) if ci < len(plan) - 1 else k
                # a switch that re-caches or resets replaces this chunk's K/V anyway: no clean pass for them
                if nxt == k or schedule.entries[nxt].policy == "keep":
                    commit_chunk(model, texts[k], cache, c_start, x0, opts)
                    positions.after_commit(c_start, frames)
                if latents is not None:
                    latents.write(c_start, x0)
    finally:
        if own:
            cache.release()
        else:
            cache.reset()


def generate(model, context, *, num_frames: int, height: int, width: int, seed: int = 0,
             options: StreamOptions | None = None, prefix: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Run ``stream`` to the end and return the generated latents [B, C, num_frames, H, W]."""
    chunks = [c.latents for c in stream(model, context, num_frames=num_frames, height=height, width=width,
                                        seed=seed, options=options, prefix=prefix, **kwargs)]
    return torch.cat(chunks, dim=2)
