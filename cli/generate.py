"""``self-forcing generate``: stream a video chunk by chunk from a prompt into an mp4.

With no ``--model`` it uses the bundled toy checkpoint (``assets/self_forcing_toy.safetensors``), which
carries its own text encoder and codec and runs on a CPU in seconds::

    self-forcing generate --prompt "a red circle and a blue square bouncing on a black background" --out toy.mp4

Long videos: ``--frames 240 --window 12`` keeps a rolling KV cache of 12 latent frames, so memory and time per
chunk stay flat (``--window auto``, the default, picks the training clip length once the video is longer).
Wan checkpoints need prompt embeddings saved by the nodes (``--embeds``) and the Wan2.1 VAE (``--vae``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_PROMPT = "a red circle and a blue square bouncing on a black background"


def default_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "self_forcing_toy.safetensors")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate a video (mp4) from a prompt, streaming chunk by chunk",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled toy model)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt (toy models)")
    p.add_argument("--embeds", default=None, help="text embeddings .safetensors from 'Save Text Embeddings' (Wan)")
    p.add_argument("--vae", default=None, help="Wan2.1 VAE weights (Wan models)")
    p.add_argument("--frames", type=int, default=None,
                   help="latent frames to generate (toy: 1 latent frame = 1 video frame; default 2x the training "
                        "clip, Wan 21)")
    p.add_argument("--height", type=int, default=None, help="latent height (Wan only; default 60)")
    p.add_argument("--width", type=int, default=None, help="latent width (Wan only; default 104)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", default="auto",
                   help="rolling KV cache in latent frames for long videos: an int, 'none' (cache the whole "
                        "video), or 'auto' (the training clip length when the video is longer)")
    p.add_argument("--sink", type=int, default=0, help="frames kept in the cache forever (attention sink)")
    p.add_argument("--steps", default=None, help="denoising steps, e.g. '1000,750,500,250' (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, or auto")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--fps", type=int, default=None, help="frame rate of the mp4 (default: the model's)")
    p.add_argument("--out", default="self_forcing.mp4", help="output .mp4 (or .gif)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


class VideoWriter:
    """Append uint8 frames [T, H, W, 3] to an mp4 (PyAV, H.264) or a GIF (Pillow) as they are produced."""

    def __init__(self, path: str, fps: int):
        self.path, self.fps = path, int(fps)
        self.kind = "gif" if path.lower().endswith(".gif") else "mp4"
        self.container = self.stream = None
        self.gif_frames = []

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if self.kind == "mp4":
            try:
                import av
            except ImportError as e:
                raise ValueError("writing mp4 needs PyAV: pip install av (or write a .gif with --out x.gif)") from e
            self.container = av.open(self.path, mode="w")
        return self

    def write(self, frames) -> None:
        arr = frames.cpu().numpy()
        if self.kind == "gif":
            from PIL import Image

            self.gif_frames += [Image.fromarray(a) for a in arr]
            return
        import av

        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.height, self.stream.width = arr.shape[1], arr.shape[2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "18"}
        for a in arr:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                self.container.mux(packet)

    def __exit__(self, *exc):
        if self.kind == "gif":
            if self.gif_frames:
                self.gif_frames[0].save(self.path, save_all=True, append_images=self.gif_frames[1:],
                                        duration=round(1000 / self.fps), loop=0)
            return False
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        if self.container is not None:
            self.container.close()
        return False


def _device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def resolve_window(text: str, num_frames: int, train_frames: int | None):
    if text in ("none", "None", ""):
        return None
    if text == "auto":
        return train_frames if train_frames is not None and num_frames > train_frames else None
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f"--window must be an integer, 'none' or 'auto', got {text!r}") from e


def run(args) -> int:
    try:
        return _run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from ..sf_model.checkpoint import load_model
    from ..sf_model.sampler import StreamOptions, stream
    from ..sf_model.schedule import parse_steps
    from ..training.bundle import encode_prompt, is_toy_bundle, latents_to_video

    path = args.model or default_model_path()
    if not os.path.isfile(path):
        raise ValueError(f"model not found: {path}" + ("" if args.model else
                         " (the bundled toy model ships in assets/; reinstall, or pass --model)"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = _device(args.device)
    t0 = time.time()
    loaded = load_model(path, device=device, dtype=dtype)
    meta = loaded.meta
    toy = is_toy_bundle(loaded)
    if toy:
        info = meta["toy"]
        context = encode_prompt(loaded, args.prompt, device)
        height, width = info["latent_size"]
        train_frames = int(info["train_frames"])
        num_frames = args.frames or 2 * train_frames
        fps = args.fps or int(info.get("fps", 8))
        decoder = None
    else:
        if not args.embeds or not args.vae:
            raise ValueError("this is not a self-contained toy model: pass --embeds (prompt embeddings saved by the "
                             "'Save Text Embeddings' node) and --vae (Wan2.1 VAE weights)")
        from ..nodes.logic_text import load_text_embeds
        from ..sf_model.latent_format import to_raw
        from ..sf_model.vae_checkpoint import load_vae

        emb, _ = load_text_embeds(args.embeds)
        context = emb[:1, :loaded.config.text_len].float().to(device)
        height, width = args.height or 60, args.width or 104
        train_frames = 21
        num_frames = args.frames or 21
        fps = args.fps or 16
        decoder = load_vae(args.vae, device=device, dtype=dtype).stream_decoder()
    steps = parse_steps(args.steps) if args.steps else tuple(meta.get("steps", (1000, 750, 500, 250)))
    window = resolve_window(args.window, num_frames, train_frames)
    fpb = int(meta.get("frames_per_block", 3))
    opts = StreamOptions(frames_per_block=fpb, steps=steps, shift=float(meta.get("shift", 5.0)),
                         warp=bool(meta.get("warp", True)), context_noise=float(meta.get("context_noise", 0.0)),
                         window=window, sink=args.sink, extend_positions=window is not None,
                         partial_last_block=True)
    chunks = -(-num_frames // fpb)
    from ..training.progress import progress_bar

    bar = progress_bar(chunks, "generating", "chunk", enabled=not args.no_progress)

    def on_step(event):
        if bar is not None:
            bar.set_postfix_str(f"chunk {event.chunk_index + 1}/{chunks} step {event.step_index + 1}/{event.num_steps}")

    cache_note = f"rolling window {window}" if window else "full cache"
    print(f"{os.path.basename(path)}: {num_frames} latent frames in {chunks} chunks of {fpb}, {len(steps)} steps, "
          f"{cache_note}, on {device}", file=sys.stderr)
    written = 0
    with VideoWriter(args.out, fps=fps) as writer:
        for chunk in stream(loaded.model, context, num_frames=num_frames, height=height, width=width, seed=args.seed,
                            options=opts, on_step=on_step):
            if decoder is None:
                video = latents_to_video(loaded, chunk.latents)[0]
            else:
                video = decoder.push(to_raw(chunk.latents).to(dtype))[0].float().cpu()
            writer.write(((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0))
            written += video.shape[1]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    print(f"wrote {args.out}: {written} frames at {fps} fps in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0
