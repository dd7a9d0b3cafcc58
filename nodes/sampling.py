"""The Stream Sampler and Extend Video nodes: their specs, and what they do as plain functions over
tensors (no ComfyUI import).

ComfyUI specifics come in through ``RunHooks`` (progress bar, interrupt check, memory manager), so the
same code runs in CI with tiny random models. Latents cross the node boundary in the model's LATENT format
(``latent``): core's Wan 2.1 format (raw VAE latents, converted to the model's normalised space inside) for
Wan models, the model's own latents (unchanged, tagged) for self-contained toy models. The KV cache of a
run is ``long_video.cache_policy``'s (the options node's, or the default rule when it is not connected).
"""

from __future__ import annotations

import dataclasses
import gc
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ..sf_model.latent_format import pixel_frames
from ..sf_model.memory import check_fits, estimate_run_bytes
from ..sf_model.resample import resample_history
from ..sf_model.sampler import StreamOptions, stream
from ..sf_model.schedule import DEFAULT_STEPS_TEXT, parse_steps
from .decode import StreamDecode, decode_latents, run_decoded_stream
from .latent import WAN21_SPACE, LatentSpace, latent_space
from .live import LIVE_NAME
from .long_video import NODE_NAME as OPTIONS_NAME
from .long_video import OPTIONS_INPUT, SCHEDULE_NAME, LongVideoOptions, cache_policy, prompt_schedule
from .model import ModelHandle
from .schema import CAT_SAMPLING, LIVE_TYPE, MODEL_TYPE, SEED_MAX, InputSpec, NodeSpec, OutputSpec
from .text import context_from_conditioning
from .validate import all_errors, check_extend_frames, check_length, check_size, check_steps

EXTEND_OUTPUTS = ("joined", "new frames only", "joined, resampled history")


# -- the specs ----------------------------------------------------------------------------------------
def _model_input() -> InputSpec:
    # In ComfyUI the socket also takes a core MODEL (nodes.comfy: type 'SELF_FORCING_MODEL,MODEL'; nodes.core_model).
    return InputSpec("model", MODEL_TYPE, "The Self Forcing model from 'Load Self Forcing Model' (or 'Load "
                     "Self Forcing Toy Model' for the bundled toy model), or a core MODEL holding a Wan 2.1 model "
                     "(UNETLoader, then LoRAs with LoraLoaderModelOnly).")


def _positive_input() -> InputSpec:
    return InputSpec(
        "positive", "CONDITIONING",
        "The prompt: umT5-XXL hidden states [1, tokens, 4096] from core CLIPLoader (type 'wan') + "
        "CLIPTextEncode, or from 'Load Text Embeddings'. Self Forcing uses no negative prompt (CFG is "
        "distilled into the model). Tokens beyond 512 are dropped, as in Wan. A toy model takes only prompts from "
        f"'Self Forcing Toy Text Encode'. Prompt switches mid-video: connect a '{SCHEDULE_NAME}' output here.")


def _seed_input() -> InputSpec:
    return InputSpec("seed", "INT", "Random seed of the initial and re-injected noise. Same seed + same "
                     "inputs = same video on any device.", default=0, min=0, max=SEED_MAX,
                     control_after_generate=True)


def _block_inputs() -> tuple[InputSpec, ...]:
    return (
        InputSpec("frames_per_block", "INT",
                  "Latent frames generated together per chunk (each latent frame is 4 video frames). Must "
                  "match how the checkpoint was trained: 3 for the official chunk-wise Self Forcing model, "
                  "1 for frame-wise models.", default=3, min=1, max=21),
        InputSpec("steps", "STRING",
                  "Denoising timesteps per chunk, comma-separated, strictly decreasing, each in (0, 1000]. "
                  "They are warped onto the shifted schedule (see shift), as Self Forcing does. The default "
                  "4-step list is what the official checkpoint was distilled for; fewer steps are faster "
                  "and blurrier.", default=DEFAULT_STEPS_TEXT),
        InputSpec("shift", "FLOAT",
                  "Timestep shift of the flow schedule used to warp the steps (Self Forcing: 5.0). 1.0 uses "
                  "the steps as they are.", default=5.0, min=1.0, max=20.0, step=0.1),
        InputSpec("context_noise", "FLOAT",
                  "Timestep at which a finished chunk is written into the KV cache (0 = clean, as the "
                  "official checkpoint was trained). Small values (0-100) can reduce error build-up on "
                  "long videos.", default=0.0, min=0.0, max=1000.0, step=1.0),
    )


def _decode_inputs() -> tuple[InputSpec, ...]:
    return (
        InputSpec("vae", "VAE",
                  "Optional: the Wan 2.1 VAE (VAELoader with wan_2.1_vae.safetensors). Connected: every chunk is "
                  "decoded as soon as it is generated (overlapped with sampling on a GPU), the IMAGE output holds "
                  "the video for CreateVideo, the progress bar shows the newest decoded frame and each chunk's "
                  "frames are sent to the client live (websocket event 'self_forcing.frames'). Not connected: "
                  "nothing is decoded and the IMAGE output must stay unconnected (decode the LATENT with VAE "
                  "Decode instead).", optional=True),
        InputSpec("live_frames", LIVE_TYPE,
                  f"Optional settings for the frames sent to the client while decoding, from '{LIVE_NAME}' "
                  "(every n-th frame, size, JPEG/PNG, or off). Not connected: every frame, at most 512 "
                  "px, JPEG quality 85. Only used when a VAE is connected.", optional=True),
    )


def _image_output(what: str) -> OutputSpec:
    return OutputSpec("IMAGE", "images", f"{what} [frames, height, width, 3] in 0-1 for core CreateVideo, decoded "
                      "while sampling. Only filled when the 'vae' input is connected; without it any node using "
                      "this output stops with an error saying so.")


def _generation_rule(v) -> str | None:
    return all_errors(check_size("width", v.get("width")), check_size("height", v.get("height")),
                      check_length(v.get("length")), check_steps(v.get("steps")))


def _extension_rule(v) -> str | None:
    return all_errors(check_extend_frames(v.get("extend_frames")), check_steps(v.get("steps")))


SAMPLER = NodeSpec(
    node_id="SelfForcingSampler",
    display_name="Self Forcing Stream Sampler",
    category=CAT_SAMPLING,
    description="Generates a video chunk by chunk with a KV cache (Self Forcing streaming). Outputs a Wan 2.1 "
                "LATENT for core VAEDecode; shows a preview of every finished chunk while it runs.",
    inputs=(
        _model_input(),
        _positive_input(),
        InputSpec("width", "INT", "Video width in pixels, a multiple of 16. Self Forcing was trained at "
                  "832x480.", default=832, min=16, max=4096, step=16),
        InputSpec("height", "INT", "Video height in pixels, a multiple of 16.",
                  default=480, min=16, max=4096, step=16),
        InputSpec("length", "INT", "Number of video frames, of the form 4k+1 (Wan's VAE packs 4 frames "
                  "per latent frame plus the first): 81 = 5 s at 16 fps. Longer than the model's training "
                  "length (81 frames for the official checkpoint), a rolling cache is used (see options). With a "
                  "toy model every video frame is one latent frame (45 frames = 15 chunks of 3).",
                  default=81, min=1, max=4093, step=4),
        _seed_input(),
        *_block_inputs(),
        OPTIONS_INPUT,
        *_decode_inputs(),
    ),
    outputs=(OutputSpec("LATENT", "latent", "Wan 2.1 video latent [1, 16, (length-1)/4+1, height/8, width/8] "
                        "for core VAEDecode (with a toy model: its own latents [1, 16, length, height/2, width/2] for "
                        "'Self Forcing Toy Decode')."),
             _image_output("The decoded video, length frames")),
    search_aliases=("self forcing", "stream", "autoregressive video", "causal video"),
    rules=(_generation_rule,),
)

EXTEND = NodeSpec(
    node_id="SelfForcingExtendVideo",
    display_name="Self Forcing Extend Video",
    category=CAT_SAMPLING,
    description="Continues a video LATENT (a previous output, or a video/image through core VAEEncode) by N "
                "frames. The last history frames are first re-noised and re-denoised by the model itself "
                "(self-resampling) so the context looks like its own output, then prefilled into the cache. "
                "Image-to-video is the one-frame case.",
    inputs=(
        _model_input(),
        _positive_input(),
        InputSpec("latent", "LATENT", "The video to continue: a Wan 2.1 LATENT (a sampler output, or "
                  "VAEEncode of a video or of one image for image-to-video)."),
        InputSpec("extend_frames", "INT", "Video frames to add, a multiple of 4 (4 frames per latent "
                  "frame). 80 turns one image into an 81-frame video.",
                  default=80, min=4, max=4092, step=4),
        InputSpec("history_frames", "INT", "How many of the last latent frames of the input are resampled "
                  "(re-noised and re-denoised by the model) before continuing; 0 = none. The whole input is "
                  "prefilled into the KV cache as context (a rolling cache keeps only its last window). 1 for "
                  "image-to-video, 3-6 for a video.", default=3, min=0, max=1024),
        InputSpec("resample_strength", "FLOAT", "How strongly the history is re-noised before the model "
                  "re-denoises it (0 = use the history exactly as it is; 1 = regenerate it from noise). "
                  "0.2-0.5 keeps the content and moves it into the model's own distribution.",
                  default=0.3, min=0.0, max=1.0, step=0.01),
        _seed_input(),
        *_block_inputs(),
        InputSpec("output", "COMBO", "joined: the input video (bit-identical) followed by the new frames. "
                  "new frames only: just the continuation. joined, resampled history: the last history "
                  "frames replaced by their resampled version.", default="joined", options=EXTEND_OUTPUTS),
        OPTIONS_INPUT,
        *_decode_inputs(),
    ),
    outputs=(OutputSpec("LATENT", "latent", "The joined (or new-only) Wan 2.1 video latent."),
             _image_output("The decoded LATENT output (for 'new frames only': the extend_frames new frames, "
                           "decoded as the continuation of the input),")),
    search_aliases=("continue video", "image to video", "i2v", "video extension"),
    rules=(_extension_rule,),
)


# -- running --------------------------------------------------------------------------------------------
@dataclass
class RunHooks:
    """ComfyUI's services, as plain callables (all optional)."""

    progress: Callable[[int, int, torch.Tensor | None], None] | None = None  # done, total, preview [H, W, 3] uint8
    check_cancel: Callable[[], None] | None = None  # raises to stop (interrupt)
    free_memory: Callable[[int, torch.device], None] | None = None  # make room on a device
    empty_cache: Callable[[], None] | None = None  # return cached allocator blocks


def run_options(frames_per_block: int, steps: str, shift: float, context_noise: float,
                long_video: LongVideoOptions | None, *, total_frames: int, meta, rope_max_frames: int | None = None
                ) -> StreamOptions:
    """The sampler's StreamOptions from node inputs for a run of ``total_frames`` latent frames (prefix
    included) of a checkpoint with metadata ``meta`` (raises ValueError with a fix-it text)."""
    cache = cache_policy(long_video, frames_per_block=frames_per_block, total_frames=total_frames, meta=meta,
                         rope_max_frames=rope_max_frames)
    opts = StreamOptions.from_policy(cache, steps=parse_steps(steps), shift=shift, context_noise=context_noise,
                                     partial_last_chunk=True)
    if long_video is None or not long_video.kv_fp8:
        return opts
    try:  # StreamOptions holds the rules; an error here is kv_fp8's (the rest was valid just above)
        return dataclasses.replace(opts, kv_fp8=True)
    except ValueError as e:
        raise ValueError(f"{OPTIONS_NAME}: {e}; turn kv_fp8 off for this run") from None


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_bytes(cfg, opts: StreamOptions, total_frames: int, lat_h: int, lat_w: int, batch: int,
              dtype: torch.dtype) -> int:
    """Device memory a run needs besides the weights (``sf_model.memory``'s one estimate: KV cache, prompt K/V,
    one chunk's activations, the latents), so ComfyUI can unload other models first."""
    return estimate_run_bytes(cfg, opts, total_frames, lat_h, lat_w, batch, dtype, weights=False)


def check_request_fits(handle: ModelHandle, opts: StreamOptions, total_frames: int, lat_h: int, lat_w: int,
                       batch: int, decode_bytes: int = 0) -> int:
    """Refuse a run that can never fit its device (weights + run + decode), before anything is allocated or
    unloaded; returns the run's bytes besides the weights."""
    extra = run_bytes(handle.config, opts, total_frames, lat_h, lat_w, batch, handle.model.dtype) + decode_bytes
    check_fits(extra + device_weight_bytes(handle), handle.load_device)
    return extra


def device_weight_bytes(handle: ModelHandle) -> int:
    """The weights a run holds on its device: all of them when the run moves them there; for weights that stay
    where they are (``keep_loaded``, e.g. a core MODEL's, partially loaded by ComfyUI) only those on the load
    device -- the others are streamed one linear layer at a time (``sf_model.weight_cast``)."""
    if not handle.keep_loaded:
        return model_bytes(handle.model)
    kind = torch.device(handle.load_device).type
    return sum(p.numel() * p.element_size() for p in handle.model.parameters() if p.device.type == kind)


@contextmanager
def model_on_device(handle: ModelHandle, hooks: RunHooks, extra_bytes: int = 0):
    """Use the model on its load device for a run; park it on the offload device when no run uses it any more.

    Runs sharing the handle (other threads) are counted (``handle.users``): the first to enter moves the weights
    to the load device, the last to leave parks them (unless ``keep_loaded``), so one run ending never moves
    the weights out from under another. Before the run, ComfyUI is asked to free room for the weights (if
    they must move) and ``extra_bytes``.
    """
    model, users = handle.model, handle.users
    with users.lock:
        moving = model.device != handle.load_device
        need = extra_bytes + (model_bytes(model) if moving else 0)
        if need and hooks.free_memory is not None:
            hooks.free_memory(need, handle.load_device)
        if moving:
            model.to(handle.load_device)
        users.count += 1
    try:
        yield model
    finally:
        with users.lock:
            users.count -= 1
            if users.count == 0 and not handle.keep_loaded and handle.offload_device != handle.load_device:
                model.to(handle.offload_device)


class _Progress:
    """Counts denoising passes across chunks and attaches a preview of every finished chunk."""

    def __init__(self, hooks: RunHooks, total: int, space: LatentSpace = WAN21_SPACE):
        self.hooks, self.total, self.done, self.space = hooks, total, 0, space
        self.report(None)

    def report(self, preview):
        if self.hooks.progress is not None:
            self.hooks.progress(self.done, self.total, preview)

    def on_step(self, event) -> None:
        self.done, self.total = event.passes_done, event.passes_total
        self.report(None)

    def on_chunk(self, latents: torch.Tensor) -> None:
        self.report(self.space.preview(latents) if self.hooks.progress is not None else None)


def _run_stream(model, context, *, num_frames, height, width, seed, opts, prefix, hooks: RunHooks,
                space: LatentSpace = WAN21_SPACE) -> torch.Tensor:
    """Drain ``stream`` into a CPU tensor (model space, float32); previews per chunk; clean-up on any exit."""
    per_chunk = len(opts.steps)
    chunks = -(-num_frames // opts.frames_per_block)
    progress = _Progress(hooks, chunks * per_chunk, space)
    gen = stream(model, context, num_frames=num_frames, height=height, width=width, seed=seed, options=opts,
                 prefix=prefix, on_step=progress.on_step, check_cancel=hooks.check_cancel)
    out = []
    try:
        for chunk in gen:
            out.append(chunk.latents.to("cpu", torch.float32))
            progress.on_chunk(out[-1])
            del chunk
        return torch.cat(out, dim=2)
    finally:
        gen.close()
        del gen


def _run_decoded(model, vae, context, *, num_frames, height, width, seed, opts, prefix, hooks: RunHooks,
                 decode: StreamDecode, image_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``_run_stream``, decoding as it goes: (model-space latents, frames [B, N, H, W, 3]); the progress
    preview is the newest decoded frame and live frames go to ``decode.sender`` (flushed before returning,
    dropped on any error)."""
    chunks = -(-num_frames // opts.frames_per_block)
    progress = _Progress(hooks, chunks * len(opts.steps))
    ok = False
    try:
        out = run_decoded_stream(model, vae, context, num_frames=num_frames, height=height, width=width, seed=seed,
                                 opts=opts, prefix=prefix, image_offset=image_offset, on_step=progress.on_step,
                                 check_cancel=hooks.check_cancel,
                                 preview=progress.report if hooks.progress is not None else None,
                                 sender=decode.sender)
        ok = True
    finally:
        if decode.sender is not None:
            decode.sender.close(cancel=not ok)
    return out


def as_image_batch(frames: torch.Tensor) -> torch.Tensor:
    """[B, N, H, W, 3] -> core's IMAGE [B*N, H, W, 3] (batch items one after the other, as VAEDecode)."""
    return frames.reshape(-1, *frames.shape[2:])


def _release(hooks: RunHooks) -> None:
    gc.collect()
    if hooks.empty_cache is not None:
        hooks.empty_cache()


def _drop_frames(exc: BaseException) -> None:
    """Free tensors held by the frames of a propagating exception's traceback (caches, activations).

    ComfyUI keeps the exception (to report it) long after the run, which would otherwise keep every
    local of the failed call alive.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def check_video_request(width: int, height: int, length: int, patch: tuple[int, int, int],
                        space: LatentSpace = WAN21_SPACE) -> None:
    space.check_request(width, height, length, patch)


def _check_decode(space: LatentSpace, decode: StreamDecode | None) -> None:
    if decode is not None and space.is_toy:
        raise ValueError("a self-contained toy model decodes with its own bundled codec, not a VAE: disconnect the "
                         "'vae' input and decode the LATENT with 'Self Forcing Toy Decode'")


def _guarded(work, hooks: RunHooks):
    """Run ``work()`` so that nothing it allocated outlives it: on any exception (interrupt, OOM, error) the
    frames of the traceback are cleared, and the allocator cache is emptied in every case."""
    try:
        return work()
    except BaseException as e:
        _drop_frames(e)
        raise
    finally:
        _release(hooks)


def sample_video(handle: ModelHandle, conditioning, *, width: int, height: int, length: int, seed: int,
                 frames_per_block: int = 3, steps: str = DEFAULT_STEPS_TEXT, shift: float = 5.0,
                 context_noise: float = 0.0, long_video: LongVideoOptions | None = None,
                 hooks: RunHooks | None = None, decode: StreamDecode | None = None):
    """Text-to-video: LATENT samples (float32, CPU) in the model's format (``latent_space(handle)``).

    Wan models: raw Wan 2.1 latents [B, 16, (length-1)/4+1, height/8, width/8]. Self-contained toy models: the
    model's own latents [B, 16, length, height/2, width/2] (one latent frame per video frame), not normalised.
    With ``decode`` (Wan only) the chunks are also decoded as they come: returns (latents, IMAGE [B*length, H, W, 3]).
    """
    hooks = hooks or RunHooks()
    cfg = handle.config
    space = latent_space(handle)
    check_video_request(width, height, length, cfg.patch_size, space)
    _check_decode(space, decode)
    frames = space.latent_frames(length)
    opts = run_options(frames_per_block, steps, shift, context_noise, long_video, total_frames=frames,
                       meta=handle.meta, rope_max_frames=cfg.rope_max_frames)
    lat_h, lat_w = height // space.spatial, width // space.spatial
    first = context_from_conditioning(conditioning, cfg.text_dim, cfg.text_len)  # fail early, before moving weights
    space.check_prompt(conditioning)
    prompt_schedule(conditioning, first, text_dim=cfg.text_dim, text_len=cfg.text_len, space=space)

    def work():
        context = context_from_conditioning(conditioning, cfg.text_dim, cfg.text_len)
        schedule = prompt_schedule(conditioning, context, text_dim=cfg.text_dim, text_len=cfg.text_len, space=space)
        extra = check_request_fits(handle, opts, frames, lat_h, lat_w, context.shape[0],
                                   decode.reserve_bytes if decode is not None else 0)
        with model_on_device(handle, hooks, extra) as model:
            kw = dict(num_frames=frames, height=lat_h, width=lat_w, seed=seed, opts=opts, prefix=None, hooks=hooks)
            if decode is None:
                prompts = context.to(model.device) if schedule is None else schedule.to(model.device)
                latents = _run_stream(model, prompts, space=space, **kw)
                return space.from_model(latents)
            with decode.open_vae(model.device) as vae:
                prompts = context.to(model.device) if schedule is None else schedule.to(model.device)
                latents, images = _run_decoded(model, vae, prompts, decode=decode, image_offset=0,
                                               **kw)
        return space.from_model(latents), as_image_batch(images)

    return _guarded(work, hooks)


def _latent_samples(latent, cfg, space: LatentSpace = WAN21_SPACE) -> torch.Tensor:
    samples = space.unwrap(latent)
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != cfg.in_dim:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        if space.is_toy:
            raise ValueError(f"latent must be a toy LATENT [batch, {cfg.in_dim}, frames, height, width] (got {shape})")
        raise ValueError(f"latent must be a Wan 2.1 video LATENT [batch, {cfg.in_dim}, frames, height, width] "
                         f"(got {shape}); encode the video or image with the Wan 2.1 VAE (core VAEEncode)")
    ph, pw = cfg.patch_size[1:]
    h, w = samples.shape[3:]
    s = space.spatial
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} (= {h * s}x{w * s} pixels) is not a multiple of {ph}x{pw}; resize the "
                         f"input to a multiple of {s * ph} pixels (e.g. ImageScale to 832x480) before VAEEncode")
    return samples


def extend_video(handle: ModelHandle, conditioning, latent, *, extend_frames: int, history_frames: int,
                 resample_strength: float, seed: int, frames_per_block: int = 3,
                 steps: str = DEFAULT_STEPS_TEXT, shift: float = 5.0, context_noise: float = 0.0,
                 output: str = "joined", long_video: LongVideoOptions | None = None,
                 hooks: RunHooks | None = None, decode: StreamDecode | None = None):
    """Continue a LATENT by ``extend_frames`` video frames; returns LATENT samples (CPU) in the model's format
    (raw Wan 2.1 latents for Wan models; a toy model's own latents, one per video frame, for toy models).

    The last ``history_frames`` latent frames of the input are resampled (noised to ``resample_strength``
    and re-denoised by the model against the untouched earlier history), the whole (resampled) history is
    prefilled into the KV cache, and ``extend_frames / 4`` new latent frames are streamed after it.
    ``output``: 'joined' = input frames bit-identical + new frames; 'new frames only'; 'joined, resampled
    history' = input with its last frames replaced by their resampled version + new frames.

    With ``decode`` the new chunks are decoded as they come, continuing the decoder over the history the
    model continued from; returns (latents, IMAGE). The IMAGE holds the decoded LATENT output: for the joined
    outputs the input part is decoded on its own (as VAEDecode would), for 'new frames only' it is the
    ``extend_frames`` new frames.
    """
    hooks = hooks or RunHooks()
    cfg = handle.config
    err = check_extend_frames(extend_frames)
    if err:
        raise ValueError(err)
    if output not in EXTEND_OUTPUTS:
        raise ValueError(f"output '{output}' is not one of: {', '.join(EXTEND_OUTPUTS)}")
    if history_frames < 0:
        raise ValueError(f"history_frames {history_frames} must be >= 0")
    space = latent_space(handle)
    _check_decode(space, decode)
    samples = _latent_samples(latent, cfg, space)
    new_frames = extend_frames // space.temporal
    prefix_len = samples.shape[2]
    opts = run_options(frames_per_block, steps, shift, context_noise, long_video, total_frames=prefix_len + new_frames,
                       meta=handle.meta, rope_max_frames=cfg.rope_max_frames)
    resampled_count = min(history_frames, prefix_len)
    context = context_from_conditioning(conditioning, cfg.text_dim, cfg.text_len)
    space.check_prompt(conditioning)
    batch = samples.shape[0]
    if context.shape[0] not in (1, batch):
        raise ValueError(f"positive has batch {context.shape[0]} but the latent has batch {batch}; use one prompt")
    prompt_schedule(conditioning, context, text_dim=cfg.text_dim, text_len=cfg.text_len, space=space,
                    offset=prefix_len, batch=batch)  # fail early
    del context
    h, w = samples.shape[3:]
    resampled = bool(resampled_count and resample_strength > 0)

    def head(resampled_tail: torch.Tensor) -> torch.Tensor | None:
        """The raw latents that come before the new ones in the output."""
        if output == "new frames only":
            return None
        if output == "joined" or not resampled:  # the input as it is (bit-identical)
            return samples.cpu()
        return torch.cat([samples[:, :, :prefix_len - resampled_count].cpu(), resampled_tail], dim=2)

    def work():
        ctx = context_from_conditioning(conditioning, cfg.text_dim, cfg.text_len).expand(batch, -1, -1)
        schedule = prompt_schedule(conditioning, ctx, text_dim=cfg.text_dim, text_len=cfg.text_len, space=space,
                                   offset=prefix_len, batch=batch)
        extra = check_request_fits(handle, opts, prefix_len + new_frames, h, w, batch,
                                   decode.reserve_bytes if decode is not None else 0)
        with model_on_device(handle, hooks, extra) as model:
            ctx = ctx.to(model.device)
            history = space.to_model(samples).to(model.device)
            if resampled:
                history = resample_history(model, ctx, history, frames=resampled_count, strength=resample_strength,
                                           seed=seed, options=opts, check_cancel=hooks.check_cancel)
                if hooks.progress is not None:
                    hooks.progress(0, 1, space.preview(history[:, :, prefix_len - resampled_count:].cpu()))
            if decode is None:
                prompts = ctx if schedule is None else schedule.to(model.device)
                new = _run_stream(model, prompts, num_frames=new_frames, height=h, width=w, seed=seed, opts=opts,
                                  prefix=history, hooks=hooks, space=space)
                tail = history[:, :, prefix_len - resampled_count:].to("cpu", torch.float32)
                return space.from_model(new).to(samples.dtype), space.from_model(tail).to(samples.dtype), None
            kw = dict(num_frames=new_frames, height=h, width=w, seed=seed, opts=opts, prefix=history, hooks=hooks)
            tail = space.from_model(history[:, :, prefix_len - resampled_count:].to("cpu", torch.float32)).to(samples.dtype)
            first = head(tail)
            offset = 0 if first is None else pixel_frames(prefix_len, space.temporal)
            with decode.open_vae(model.device) as vae:
                prompts = ctx if schedule is None else schedule.to(model.device)
                new, images = _run_decoded(model, vae, prompts, decode=decode, image_offset=offset, **kw)
                del history, kw
                if first is not None:  # the input part, decoded on its own as VAEDecode would
                    decode_latents(vae, first, opts.frames_per_block, out=images[:, :offset])
            return space.from_model(new).to(samples.dtype), tail, images

    new_raw, resampled_tail, images = _guarded(work, hooks)
    if decode is not None:
        first = head(resampled_tail)
        latent = new_raw if first is None else torch.cat([first, new_raw], dim=2)
        return latent, as_image_batch(images)
    if output == "new frames only":
        return new_raw
    if output == "joined" or not resampled:  # the input as it is (bit-identical), then the new frames
        return torch.cat([samples.cpu(), new_raw], dim=2)
    kept = samples[:, :, :prefix_len - resampled_count].cpu()
    return torch.cat([kept, resampled_tail, new_raw], dim=2)
