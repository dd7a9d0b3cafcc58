"""``self-forcing generate``: stream a video chunk by chunk from a prompt into an mp4 (or a pipe).

With no ``--model`` it uses the bundled toy checkpoint (``assets/self_forcing_toy.safetensors``), which
carries its own text encoder and codec and runs on a CPU in seconds::

    self-forcing generate --prompt "a red circle and a blue square bouncing on a black background" --out toy.mp4

Long videos: ``--frames 240 --window 12`` keeps a rolling KV cache of 12 latent frames, so memory and time per
chunk stay flat. ``--window auto`` (the default) is the rule the nodes use without a Long-Video Options node
(``sf_model.window.default_policy``): one fixed cache while the video fits the checkpoint's training clip,
else a rolling window of the training clip length with the checkpoint's attention sink.

Prompt switches mid-stream: ``--prompt-at FRAME:[POLICY:]PROMPT`` (repeatable; FRAME a latent frame, the switch
happening at the first chunk starting at or after it; PROMPT the text for a toy model, an embeddings file for Wan;
POLICY keep, recache or reset, default ``--switch``, i.e. recache: LongLive's KV re-cache)::

    self-forcing generate --frames 72 --window 9 --sink 3 --positions rebased \
        --prompt "a red circle bouncing on a navy background" \
        --prompt-at "24:a green triangle bouncing on a navy background" \
        --prompt-at "48:reset:a blue square bouncing on a navy background" --out switch.mp4

Official window values: the official code's ``local_attn_size`` counts the sink frames, ``--window`` does not;
``--local-attn-size N --sink S`` is ``--window N-S --sink S`` (``sf_model.window.from_official``).
``--positions rebased`` keeps the sink right before the window in RoPE positions (no distance beyond sink +
window on endless streams; ``sf_model.positions``).

Wan checkpoints (any layout the loader reads: Self Forcing training files, ComfyUI/Wan or diffusers names)
need the prompt as text embeddings saved by the nodes' 'Save Text Embeddings' (``--embeds``; the umT5
encoder is not bundled) and the Wan2.1 VAE (``--vae``: wan_2.1_vae.safetensors or Wan2.1_VAE.pth)::

    self-forcing generate --model self_forcing_dmd.pt --vae wan_2.1_vae.safetensors \\
        --embeds prompt_00001.safetensors --device cuda --dtype bf16 --fused-kernels --stream --out live.mp4

Streaming outputs:
  --stream        the mp4 is a fragmented mp4 that grows by one fragment per chunk (flushed at once): a
                  player can open it while it is being written (as OUT.part, renamed to OUT when
                  complete); '--stream --out -' pipes it to stdout.
  --raw -|PATH    raw video: rgb24 frames back to back, no header, rows top to bottom, 3 bytes (R, G, B)
                  per pixel, width*height*3 bytes per frame (the size and rate are printed on stderr).
                  PATH may be a FIFO (mkfifo). Without --out or --stream no mp4 is written.
                  self-forcing generate --raw - | ffplay -f rawvideo -pixel_format rgb24 -video_size 64x64 \\
                      -framerate 8 -i -
When stdout carries video, every message and the progress bar go to stderr. Files are written as NAME.part
and renamed to NAME when complete (an interrupted run leaves a previous NAME intact); the folder must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..sf_model.prompt_schedule import DEFAULT_SWITCH, SWITCH_POLICIES
from ..sf_model.window import POSITION_MODES
from .lora import add_generate_arguments, lora_options
from .prompt_at import _prompts_note, prompt_plan
from .video_out import MAX_FPS, STDOUT, FragmentedMP4Writer, RawWriter, VideoWriter, part_path, staged

DEFAULT_PROMPT = "a red circle and a blue square bouncing on a black background"
DEFAULT_OUT = "self_forcing.mp4"
WAN_SIZE = (832, 480)  # pixel width, height
WAN_FRAMES, WAN_FPS = 21, 16


def default_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "self_forcing_toy.safetensors")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate a video (mp4) from a prompt, streaming chunk by chunk",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint: a toy bundle (default: the bundled toy model) or a Wan2.1 Self Forcing DiT")
    p.add_argument("--prompt", default=None, help=f"text prompt (toy models; default {DEFAULT_PROMPT!r})")
    p.add_argument("--embeds", default=None,
                   help="text embeddings .safetensors from 'Save Text Embeddings' (Wan models)")
    p.add_argument("--vae", default=None, help="Wan2.1 VAE: wan_2.1_vae.safetensors or Wan2.1_VAE.pth (Wan models)")
    p.add_argument("--frames", type=int, default=None,
                   help="latent frames to generate (toy: 1 latent frame = 1 video frame, default 2x the training "
                        f"clip; Wan: 1 + 4 (n-1) video frames, default {WAN_FRAMES})")
    p.add_argument("--width", type=int, default=None,
                   help=f"frame width in pixels (Wan default {WAN_SIZE[0]}; multiple of 16; toy: its trained size)")
    p.add_argument("--height", type=int, default=None,
                   help=f"frame height in pixels (Wan default {WAN_SIZE[1]}; multiple of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", default="auto",
                   help="rolling KV cache in latent frames for long videos: an int, 'none' (cache the whole "
                        "video), or 'auto' (a fixed cache while the video fits the training clip, else a rolling "
                        "window of the training clip length)")
    p.add_argument("--sink", type=int, default=None,
                   help="latent frames kept in a rolling cache forever (attention sink), in addition to --window; "
                        "default: the checkpoint's (0 when it stores none)")
    p.add_argument("--local-attn-size", type=int, default=None, metavar="N",
                   help="the official code's local_attn_size instead of --window: it COUNTS the sink, so it is "
                        "--window N-SINK (-1: one cache for the whole video)")
    p.add_argument("--positions", default="absolute", choices=POSITION_MODES,
                   help="RoPE positions with a rolling cache and a sink: absolute (the official sampler) or rebased "
                        "(the sink seen right before the window: no distance beyond sink + window)")
    p.add_argument("--prompt-at", action="append", default=[], metavar="FRAME:[POLICY:]PROMPT",
                   help="switch the prompt at latent frame FRAME (repeatable): the prompt text (toy models) or an "
                        "embeddings .safetensors file (Wan models); POLICY keep, recache or reset (default --switch)")
    p.add_argument("--switch", default=DEFAULT_SWITCH, choices=SWITCH_POLICIES,
                   help="what a prompt switch does to the KV cache: recache (recompute the cached frames under the new "
                        "prompt, LongLive), keep (old keys/values stay) or reset (empty it: a new shot)")
    p.add_argument("--steps", default=None, help="denoising steps, e.g. '1000, 500' (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, or auto")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="model (and VAE) dtype")
    p.add_argument("--fused-kernels", action="store_true",
                   help="fused inference kernels (Triton on CUDA; elsewhere the same math in PyTorch, no faster) "
                        "and, on CUDA, block forwards replayed from CUDA graphs")
    p.add_argument("--kv-fp8", action="store_true",
                   help="opt-in, less exact: keep the KV cache in float8 e4m3 (about half of bf16's cache memory; "
                        "today slower, see docs/benchmarks.md); not with history routing or rebased positions with "
                        "a sink")
    p.add_argument("--fps", type=int, default=None, help="frame rate of the video (default: the model's)")
    p.add_argument("--out", default=None,
                   help=f"output .mp4 (or .gif); '-' = stdout (with --stream). Default {DEFAULT_OUT}, or none "
                        "when --raw is given without --stream")
    p.add_argument("--stream", action="store_true",
                   help="write a fragmented mp4, one fragment per chunk as it is generated (playable while it grows)")
    p.add_argument("--raw", default=None, metavar="-|PATH",
                   help="also write raw rgb24 frames (width*height*3 bytes each, no header) to stdout ('-'), "
                        "a file or a FIFO")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality of the mp4 (0-51, lower is better)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generate_arguments(p)
    p.set_defaults(run=run)
    return p


# -- arguments --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outputs:
    video: str | None   # mp4/gif path, '-' (stdout), or None
    stream: bool        # fragmented mp4, one fragment per chunk
    raw: str | None     # raw rgb24 target: '-' (stdout), a path or a FIFO

    @property
    def uses_stdout(self) -> bool:
        return STDOUT in (self.video, self.raw)


def check_outputs(args) -> Outputs:
    """Where the frames go; every bad combination is refused before anything is loaded."""
    video = args.out
    if video is None:
        video = None if args.raw is not None and not args.stream else DEFAULT_OUT
    if video == "":
        raise ValueError("--out is empty; give a file name, or '-' with --stream for stdout")
    if args.raw == "":
        raise ValueError("--raw is empty; give '-' (stdout), a file name or a FIFO")
    if video == STDOUT and args.raw == STDOUT:
        raise ValueError("--out - and --raw - both want stdout; send one of them to a file or FIFO")
    if video == STDOUT and not args.stream:
        raise ValueError("a regular mp4 needs a seekable file; add --stream to pipe a fragmented mp4 to stdout "
                         "(--stream --out -), or use --raw - for raw frames")
    if args.stream and video is not None and video != STDOUT and not video.lower().endswith(".mp4"):
        raise ValueError(f"--stream writes a fragmented mp4, so --out must end in .mp4 (got {video!r})")
    if video is not None and video != STDOUT and args.raw is not None and \
            os.path.abspath(video) == os.path.abspath(args.raw):
        raise ValueError(f"--out and --raw name the same file ({video}); give them different names")
    if not 0 <= args.crf <= 51:
        raise ValueError(f"--crf must be in 0..51, got {args.crf}")
    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1 latent frame, got {args.frames}")
    if args.fps is not None and not 1 <= args.fps <= MAX_FPS:
        raise ValueError(f"--fps must be in 1..{MAX_FPS}, got {args.fps}")
    for flag, path in (("--out", video), ("--raw", args.raw)):
        if path is not None and path != STDOUT:
            check_path(flag, path)
    return Outputs(video, args.stream, args.raw)


def check_path(flag: str, path: str) -> None:
    """An output path must name a file in a folder that exists and can be written; nothing is created."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist (no folder is created; make it first "
                         "or pick another path)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:1, mps or auto") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: generating needs a device that computes (cpu, cuda, cuda:1, mps or "
                         "auto)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False); "
                             "use --device cpu, or install a CUDA build of PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS is not available here; use --device cpu")
    return device


def latent_size(args, factor: int, patch: tuple[int, int], default_px: tuple[int, int]) -> tuple[int, int]:
    """(latent height, latent width) from --width/--height in pixels (or the defaults)."""
    width = args.width if args.width is not None else default_px[0]
    height = args.height if args.height is not None else default_px[1]
    step_h, step_w = factor * patch[0], factor * patch[1]
    for name, value, step in (("--width", width, step_w), ("--height", height, step_h)):
        if value < step or value % step:
            raise ValueError(f"{name} {value}: frame sizes must be positive multiples of {step} "
                             f"(the codec's {factor}x times the model's patch), e.g. {max(step, value // step * step)}")
    return height // factor, width // factor


# -- what to generate -------------------------------------------------------------------------------
@dataclass
class Job:
    """A prepared generation: where frames come from and what they look like."""

    name: str
    width: int                # pixel frame size
    height: int
    frames: int               # pixel frames in total
    latent_frames: int
    chunks: int
    fps: int
    describe: str             # one line for stderr
    chunk_frames: Callable[[Callable], Iterator]  # on_step -> iterator of uint8 [T, H, W, 3] CPU tensors


def cache_policy(args, meta: dict, num_frames: int):
    """The KV-cache policy of ``--window``/``--sink``/``--local-attn-size``/``--positions`` for ``num_frames``
    latent frames: 'auto' is ``default_policy`` (the nodes' rule without a Long-Video Options node), 'none' one
    fixed cache, an int a rolling window (with ``--sink``, default the checkpoint's); ``--local-attn-size`` is the
    official value, read through ``from_official``."""
    positions = getattr(args, "positions", "absolute")
    return _window_policy(args, meta, num_frames).with_positions(positions)


def _window_policy(args, meta: dict, num_frames: int):
    from ..sf_model.window import CachePolicy, checkpoint_frames_per_block, checkpoint_sink, default_policy

    fpb = checkpoint_frames_per_block(meta)
    text = str(args.window).strip()
    official = getattr(args, "local_attn_size", None)
    if official is not None:
        if text != "auto":
            raise ValueError("give either --window (ours: the frames after the sink) or --local-attn-size (the "
                             "official value: the sink included), not both")
        sink = args.sink if args.sink is not None else checkpoint_sink(meta)
        try:
            return CachePolicy.official(fpb, official, sink if official != -1 else 0)
        except ValueError as e:
            raise ValueError(f"--local-attn-size {official} / --sink {sink}: {e}") from None
    if text == "auto":
        policy = default_policy(meta, num_frames)
        if args.sink is not None and policy.is_rolling:
            policy = CachePolicy.rolling(fpb, policy.window, args.sink)
        return policy
    if text in ("none", "None", ""):
        return CachePolicy.fixed(fpb)
    try:
        window = int(text)
    except ValueError as e:
        raise ValueError(f"--window must be an integer, 'none' or 'auto', got {text!r}") from e
    try:
        return CachePolicy.rolling(fpb, window, args.sink if args.sink is not None else checkpoint_sink(meta))
    except ValueError as e:
        raise ValueError(f"--window {window} / --sink: {e}") from None


def sampling_options(args, meta: dict, num_frames: int):
    from ..sf_model.sampler import StreamOptions
    from ..sf_model.schedule import parse_steps

    steps = parse_steps(args.steps) if args.steps else None
    opts = StreamOptions.from_meta(meta, cache_policy(args, meta, num_frames), steps=steps, partial_last_chunk=True)
    if not getattr(args, "kv_fp8", False):
        return opts
    try:  # StreamOptions holds the rules; an error here is --kv-fp8's (the rest was valid just above)
        return dataclasses.replace(opts, kv_fp8=True)
    except ValueError as e:
        raise ValueError(f"--kv-fp8: {e}; drop --kv-fp8 for this run") from None


def _cache_note(opts) -> str:
    from ..sf_model.window import CachePolicy

    note = CachePolicy(opts.frames_per_block, opts.window, opts.sink, opts.routing_topk, opts.positions).describe()
    return note + (", FP8 K/V cache" if opts.kv_fp8 else "")


def prepare_toy(args, loaded, path: str, device, dtype, build: Callable) -> Job:
    from ..sf_model.memory import estimate_run_bytes
    from ..sf_model.pipeline import frames_to_uint8
    from ..sf_model.sampler import stream
    from ..sf_model.window import trained_frames
    from ..toy.bundle import encode_prompt, latents_to_video

    if args.embeds or args.vae:
        raise ValueError("--embeds/--vae are for Wan checkpoints; this toy model has its own text encoder and codec "
                         "(use --prompt)")
    info = loaded.meta["toy"]
    trained_h, trained_w = (int(v) for v in info["latent_size"])
    factor = max(1, int(info.get("size", 2 * trained_h)) // trained_h)
    patch = tuple(loaded.config.patch_size[1:])
    h, w = latent_size(args, factor, patch, (trained_w * factor, trained_h * factor))
    num_frames = args.frames or 2 * trained_frames(loaded.meta)
    opts = sampling_options(args, loaded.meta, num_frames)
    # the toy encoder's tokenizer is the one rule for prompts (empty or unknown words: a ValueError)
    context = encode_prompt(loaded, args.prompt if args.prompt is not None else DEFAULT_PROMPT, "cpu")
    context = prompt_plan(args, context, num_frames, lambda text: encode_prompt(loaded, text, "cpu"))
    build(estimate_run_bytes(loaded.config, opts, num_frames, h, w, 1, dtype))
    context = context.to(device)
    note = "" if (h, w) == (trained_h, trained_w) else f", trained at {trained_w * factor}x{trained_h * factor}"

    def chunk_frames(on_step):
        for chunk in stream(loaded.model, context, num_frames=num_frames, height=h, width=w, seed=args.seed,
                            options=opts, on_step=on_step):
            yield frames_to_uint8(latents_to_video(loaded, chunk.latents))[0]

    fpb = opts.frames_per_block
    chunks = -(-num_frames // fpb)
    return Job(os.path.basename(path), w * factor, h * factor, num_frames, num_frames, chunks,
               args.fps or int(info.get("fps", 8)),
               f"{num_frames} latent frames in {chunks} chunks of {fpb}, {len(opts.steps)} steps, "
               f"{_cache_note(opts)}{_prompts_note(context)}, {w * factor}x{h * factor}{note}", chunk_frames)


def read_vae(path: str):
    """(state dict on the CPU, WanVAEConfig) of a Wan VAE file; nothing is put on a device yet."""
    from ..sf_model.vae.checkpoint import infer_vae_config, read_state_dict, to_wan_layout

    try:
        sd = to_wan_layout(read_state_dict(path))
        return sd, infer_vae_config(sd)
    except ValueError as e:
        raise ValueError(f"--vae: {e}") from e


def prepare_wan(args, loaded, path: str, device, dtype, build: Callable) -> Job:
    from ..sf_model.latent_format import pixel_frames
    from ..sf_model.memory import estimate_run_bytes
    from ..sf_model.pipeline import stream_video
    from ..sf_model.text_embeds import load_text_embeds
    from ..sf_model.vae.checkpoint import vae_from_state_dict

    if not args.embeds or not args.vae:
        raise ValueError("this is not a self-contained toy model: pass --embeds (prompt embeddings saved by the "
                         "'Save Text Embeddings' node) and --vae (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)")
    if args.prompt is not None:
        raise ValueError("--prompt needs a toy model with a bundled text encoder; for Wan checkpoints encode the "
                         "prompt with umT5-XXL in ComfyUI, save it with 'Save Text Embeddings' and pass --embeds")
    cfg = loaded.config

    def read_embeds(path: str, flag: str):
        try:
            emb, _ = load_text_embeds(path)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the safetensors reader's own errors (no stable import path)
            raise ValueError(f"{flag} {path} cannot be read (not a safetensors file, truncated or damaged; "
                             f"write one with 'Save Text Embeddings'): {e}") from None
        if emb.shape[-1] != cfg.text_dim:
            raise ValueError(f"{os.path.basename(path)} holds embeddings of width {emb.shape[-1]} but the model "
                             f"expects {cfg.text_dim} (Wan: umT5-XXL, 4096)")
        if emb.shape[0] > 1:
            print(f"{os.path.basename(path)} holds {emb.shape[0]} prompts; using the first", file=sys.stderr)
        return emb[:1, :cfg.text_len].float()

    emb = read_embeds(args.embeds, "--embeds")
    vae_sd, vae_cfg = read_vae(args.vae)
    if vae_cfg.z_dim != cfg.in_dim:
        raise ValueError(f"the VAE has {vae_cfg.z_dim} latent channels but the model takes {cfg.in_dim}: "
                         "use the Wan2.1 VAE with a Wan2.1 model")
    factor = vae_cfg.spatial_factor
    h, w = latent_size(args, factor, tuple(cfg.patch_size[1:]), WAN_SIZE)
    num_frames = args.frames or WAN_FRAMES
    opts = sampling_options(args, loaded.meta, num_frames)
    context = prompt_plan(args, emb, num_frames, lambda path: read_embeds(path, "--prompt-at"))
    build(estimate_run_bytes(cfg, opts, num_frames, h, w, 1, dtype, decode=vae_cfg))
    context = context.to(device)
    try:
        vae = vae_from_state_dict(vae_sd, device=device, dtype=dtype, config=vae_cfg)
    except ValueError as e:
        raise ValueError(f"--vae: {args.vae}: {e}") from e
    del vae_sd

    def chunk_frames(on_step):
        for fc in stream_video(loaded.model, vae, context, num_frames=num_frames, height=h, width=w,
                               seed=args.seed, options=opts, on_step=on_step):
            yield fc.frames[0]

    fpb = opts.frames_per_block
    chunks = -(-num_frames // fpb)
    frames = pixel_frames(num_frames, vae.config.temporal_factor)
    return Job(os.path.basename(path), w * factor, h * factor, frames, num_frames, chunks, args.fps or WAN_FPS,
               f"{num_frames} latent frames ({frames} video frames) in {chunks} chunks of {fpb}, "
               f"{len(opts.steps)} steps, {_cache_note(opts)}{_prompts_note(context)}, {w * factor}x{h * factor}",
               chunk_frames)


def prepare(args, device):
    """Read the checkpoint on the CPU, plan the run, check that it fits ``device`` (``sf_model.memory``), and
    only then put the weights there."""
    import torch

    from ..sf_model.checkpoint import LoadedModel, build_model, load_state_dict_file
    from ..sf_model.memory import check_fits
    from ..toy.bundle import is_toy_bundle

    path = args.model or default_model_path()
    if not os.path.isfile(path):
        raise ValueError(f"model not found: {path}" + ("" if args.model else
                         " (the bundled toy model ships in assets/; reinstall, or pass --model)"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lora = lora_options(args)
    sd, config, layout, meta, extras = load_state_dict_file(path, **lora)  # the LoRA (if any) merged here
    if lora:
        print(f"LoRA {os.path.basename(lora['lora'])} merged at strength {lora['lora_strength']:g}", file=sys.stderr)
    loaded = LoadedModel(model=None, config=config, layout=layout, meta=meta, extras=extras)

    def build(bytes_needed: int) -> None:
        check_fits(bytes_needed, device)
        loaded.model = build_model(sd, config, device, dtype, source=os.path.basename(path))
        sd.clear()
        if args.fused_kernels:
            from ..sf_model.speed import use_cuda_graphs, use_fused_kernels

            use_cuda_graphs(use_fused_kernels(loaded.model))  # graphs only act on CUDA tensors

    if is_toy_bundle(loaded):
        return prepare_toy(args, loaded, path, device, dtype, build)
    return prepare_wan(args, loaded, path, device, dtype, build)


# -- writing ----------------------------------------------------------------------------------------
def raw_note(job: Job, target: str) -> str:
    where = "stdout" if target == STDOUT else target
    if target != STDOUT and os.path.exists(target) and stat.S_ISFIFO(os.stat(target).st_mode):
        where = f"FIFO {target} (waiting for a reader to open it)"
    return (f"raw video to {where}: rgb24 {job.width}x{job.height}, {job.width * job.height * 3} bytes per frame, "
            f"{job.frames} frames at {job.fps} fps (e.g. ffplay -f rawvideo -pixel_format rgb24 -video_size "
            f"{job.width}x{job.height} -framerate {job.fps} -i -)")


def open_writers(outputs: Outputs, job: Job, stdout, crf: int) -> list:
    """The writers (context managers, not yet entered), raw first: it has the lowest latency."""
    writers = []
    if outputs.raw is not None:
        writers.append(RawWriter(stdout if outputs.raw == STDOUT else outputs.raw))
    if outputs.video is not None:
        if outputs.stream:
            target = stdout if outputs.video == STDOUT else outputs.video
            writers.append(FragmentedMP4Writer(target, job.width, job.height, job.fps, crf=crf))
        else:
            writers.append(VideoWriter(outputs.video, fps=job.fps, crf=crf))
    return writers


def _stdout_bytes():
    out = sys.stdout
    return getattr(out, "buffer", out)


def _detach_stdout(real_stdout) -> None:
    """After the reader of stdout went away: point its fd at /dev/null so exiting does not fail on a flush."""
    try:
        fd = real_stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation (a captured stream) included
        pass


class Terminated(BaseException):
    """SIGTERM arrived: unwind (writers remove their unfinished .part files) and exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run(args) -> int:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return _run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated; unfinished output removed (a previous file of the same name is untouched)",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as e:  # writing failed midway (a full disk...); a closed pipe is handled in _run
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    outputs = check_outputs(args)
    real_stdout = sys.stdout
    stdout = _stdout_bytes() if outputs.uses_stdout else None
    device = resolve_device(args.device)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr) if stdout is not None else contextlib.nullcontext():
        job = prepare(args, device)
        print(f"{job.name}: {job.describe}, on {device}" + (" with fused kernels" if args.fused_kernels else ""),
              file=sys.stderr)
        if args.fused_kernels and device.type != "cuda":
            print("note: --fused-kernels runs the PyTorch versions of the kernels off CUDA (same math, no speed-up)",
                  file=sys.stderr)
        if outputs.raw is not None:
            print(raw_note(job, outputs.raw), file=sys.stderr)
        if outputs.stream and outputs.video not in (None, STDOUT) and staged(outputs.video):
            print(f"streaming into {part_path(outputs.video)} (playable while it grows); renamed to "
                  f"{outputs.video} when complete", file=sys.stderr)
        written = [0]
        try:
            _write_all(job, open_writers(outputs, job, stdout, args.crf), written, not args.no_progress)
        except BrokenPipeError:
            if stdout is not None:
                _detach_stdout(real_stdout)
            print(f"the reader closed the output after {written[0]} frames; stopped", file=sys.stderr)
            return 0
    where = [w for w in (outputs.video and ("stdout" if outputs.video == STDOUT else outputs.video),
                         outputs.raw and ("raw " + ("stdout" if outputs.raw == STDOUT else outputs.raw))) if w]
    print(f"wrote {' and '.join(where)}: {written[0]} frames at {job.fps} fps in {time.time() - t0:.1f} s",
          file=sys.stderr)
    return 0


def _write_all(job: Job, writers: list, written: list, progress: bool) -> None:
    from ..sf_model.progress import progress_bar

    bar = progress_bar(job.chunks, "generating", "chunk", enabled=progress)

    def on_step(event):
        if bar is not None:
            bar.set_postfix_str(f"chunk {event.chunk_index + 1}/{job.chunks} "
                                f"step {event.step_index + 1}/{event.num_steps}")

    with contextlib.ExitStack() as stack:
        if bar is not None:
            stack.callback(bar.close)
        for w in writers:
            stack.enter_context(w)  # a FIFO target waits here for its reader
        frames_iter = job.chunk_frames(on_step)
        stack.callback(frames_iter.close)
        for frames in frames_iter:
            if tuple(frames.shape[1:3]) != (job.height, job.width):
                raise ValueError(f"the decoder gave {frames.shape[2]}x{frames.shape[1]} frames, expected "
                                 f"{job.width}x{job.height}")
            for w in writers:
                w.write(frames)
            written[0] += frames.shape[0]
            if bar is not None:
                bar.update(1)
