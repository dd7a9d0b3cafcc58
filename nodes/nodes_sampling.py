"""Stream sampler, extend-video and live-frames nodes (thin: schema from specs, work in logic_*)."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from .comfy_glue import build_schema, image_output_blocked, run_hooks, stream_decode
from .logic_latent import latent_space
from .logic_live import LiveFrameOptions
from .logic_sampling import extend_video, sample_video
from .logic_validate import SPATIAL_STRIDE, validate_extension, validate_generation, validate_live_frames
from .specs import EXTEND, LIVE, SAMPLER


def _latent(samples, model) -> dict:
    """The LATENT dict in the model's format (toy latents are tagged as such)."""
    return latent_space(model).wrap(samples.to(mm.intermediate_device()))


def _batch_and_size(tensor, batch: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """(batch, latent height, latent width) for the decode memory estimate; the logic checks the inputs."""
    if hasattr(tensor, "shape") and len(tensor.shape) == 5:
        return int(tensor.shape[0]), int(tensor.shape[3]), int(tensor.shape[4])
    return batch, *size


def _outputs(result, node_name: str, model) -> io.NodeOutput:
    """(LATENT, IMAGE): the IMAGE is the decoded video, or blocks its users when nothing was decoded."""
    if isinstance(result, tuple):
        samples, images = result
        return io.NodeOutput(_latent(samples, model), images.to(mm.intermediate_device()))
    return io.NodeOutput(_latent(result, model), image_output_blocked(node_name, toy=latent_space(model).is_toy))


class SelfForcingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SAMPLER)

    @classmethod
    def validate_inputs(cls, width=None, height=None, length=None, frames_per_block=None, steps=None, shift=None,
                        context_noise=None):
        # Linked inputs arrive as None; naming an input here switches off core's min/max check for it,
        # so validate_generation checks the ranges too.
        return validate_generation(width, height, length, frames_per_block, steps, shift, context_noise)

    @classmethod
    def execute(cls, model, positive, width: int, height: int, length: int, seed: int, frames_per_block: int = 3,
                steps: str = "1000, 750, 500, 250", shift: float = 5.0, context_noise: float = 0.0,
                options=None, vae=None, live_frames=None) -> io.NodeOutput:
        decode = None
        if vae is not None:
            prompt = positive[0][0] if positive and positive[0] else None
            batch = int(prompt.shape[0]) if hasattr(prompt, "shape") else 1
            decode = stream_decode(vae, batch=batch, frames_per_block=frames_per_block,
                                   latent_height=height // SPATIAL_STRIDE, latent_width=width // SPATIAL_STRIDE,
                                   live=live_frames)
        result = sample_video(model, positive, width=width, height=height, length=length, seed=seed,
                              frames_per_block=frames_per_block, steps=steps, shift=shift,
                              context_noise=context_noise, long_video=options, hooks=run_hooks(), decode=decode)
        return _outputs(result, SAMPLER.display_name, model)


class SelfForcingExtendVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(EXTEND)

    @classmethod
    def validate_inputs(cls, extend_frames=None, history_frames=None, resample_strength=None, frames_per_block=None,
                        steps=None, shift=None, context_noise=None):
        return validate_extension(extend_frames, history_frames, resample_strength, frames_per_block, steps, shift,
                                  context_noise)

    @classmethod
    def execute(cls, model, positive, latent, extend_frames: int, history_frames: int, resample_strength: float,
                seed: int, frames_per_block: int = 3, steps: str = "1000, 750, 500, 250", shift: float = 5.0,
                context_noise: float = 0.0, output: str = "joined", options=None, vae=None,
                live_frames=None) -> io.NodeOutput:
        decode = None
        if vae is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else latent
            batch, h, w = _batch_and_size(samples, 1, (60, 104))
            decode = stream_decode(vae, batch=batch, frames_per_block=frames_per_block, latent_height=h,
                                   latent_width=w, live=live_frames)
        result = extend_video(model, positive, latent, extend_frames=extend_frames, history_frames=history_frames,
                              resample_strength=resample_strength, seed=seed, frames_per_block=frames_per_block,
                              steps=steps, shift=shift, context_noise=context_noise, output=output,
                              long_video=options, hooks=run_hooks(), decode=decode)
        return _outputs(result, EXTEND.display_name, model)


class SelfForcingLiveFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(LIVE)

    @classmethod
    def validate_inputs(cls, every_nth=None, max_size=None, format=None, quality=None):
        return validate_live_frames(every_nth, max_size, format, quality)

    @classmethod
    def execute(cls, send: bool = True, every_nth: int = 1, max_size: int = 512, format: str = "jpeg",
                quality: int = 85) -> io.NodeOutput:
        return io.NodeOutput(LiveFrameOptions(send=send, every_nth=every_nth, max_size=max_size, format=format,
                                              quality=quality).check())
