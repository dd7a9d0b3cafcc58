"""Stream sampler and extend-video nodes (thin: schema from specs, work in logic_sampling)."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from .comfy_glue import build_schema, run_hooks
from .logic_sampling import extend_video, sample_video
from .logic_validate import validate_extension, validate_generation
from .specs import EXTEND, SAMPLER


def _latent(samples) -> dict:
    return {"samples": samples.to(mm.intermediate_device())}


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
                options=None) -> io.NodeOutput:
        samples = sample_video(model, positive, width=width, height=height, length=length, seed=seed,
                               frames_per_block=frames_per_block, steps=steps, shift=shift,
                               context_noise=context_noise, long_video=options, hooks=run_hooks())
        return io.NodeOutput(_latent(samples))


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
                context_noise: float = 0.0, output: str = "joined", options=None) -> io.NodeOutput:
        samples = extend_video(model, positive, latent, extend_frames=extend_frames, history_frames=history_frames,
                               resample_strength=resample_strength, seed=seed, frames_per_block=frames_per_block,
                               steps=steps, shift=shift, context_noise=context_noise, output=output,
                               long_video=options, hooks=run_hooks())
        return io.NodeOutput(_latent(samples))
