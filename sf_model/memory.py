"""Device memory of a streaming run, estimated before anything is allocated, and the check that it fits.

``estimate_run_bytes`` is the one estimate of the package (the CLI checks it before the weights move to the
device; the nodes ask ComfyUI to free that much before a run): the DiT's weights, its KV cache (exactly what
``sf_model.sampler.stream`` allocates, see ``sf_model.window.cache_slots``), the prompt's cross-attention K/V,
one chunk's activations and, when asked, the Wan VAE and one chunk's decode. The activation terms are
deliberately generous (measured peaks on a GPU: ``benchmarks/memory_estimate_gpu.py``); the cache term is exact.

``check_fits`` compares an estimate with the device's *total* memory (a CUDA device's, or the machine's
physical memory for the CPU): a request that can never fit is refused with a clear message before anything
is allocated, instead of an allocator traceback -- or, in ComfyUI, every other model being unloaded first.
What is free right now is not checked: other programs and caches come and go.
"""

from __future__ import annotations

import math
import os

import torch

from .window import cache_slots

GB = 1e9
# Values alive per output pixel and pixel frame while the Wan VAE decodes a chunk, in units of the VAE's base
# width (dim, 96 for Wan 2.1): full-resolution feature maps of the last level, the causal caches of its
# convolutions, the upsampled inputs and cuDNN's workspace. Measured on an H200 (bf16, chunks of 3 latent
# frames, benchmarks/memory_estimate_gpu.py): 8.0 at 832x480, 9.1 at 1280x720; 12 covers both.
VAE_DECODE_WIDTHS_PER_PIXEL = 12


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dit_parameters(config) -> int:
    """Parameters of ``CausalWanModel(config)``, from the config alone (nothing is built)."""
    d, f, pt = config.dim, config.ffn_dim, math.prod(config.patch_size)
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(d, d) + (2 * d if config.qk_norm else 0)
    block = 2 * attention + (2 * d if config.cross_attn_norm else 0) + linear(d, f) + linear(f, d) + 6 * d
    return (config.in_dim * pt * d + d                                    # patch embedding
            + linear(config.text_dim, d) + linear(d, d)                   # text MLP
            + linear(config.freq_dim, d) + linear(d, d) + linear(d, 6 * d)  # time MLP and projection
            + config.num_layers * block
            + linear(d, pt * config.out_dim) + 2 * d)                     # head


def frame_tokens(config, latent_h: int, latent_w: int) -> int:
    ph, pw = config.patch_size[1:]
    return (latent_h // ph) * (latent_w // pw)


def kv_cache_bytes(config, options, total_frames: int, latent_h: int, latent_w: int, batch: int,
                   dtype: torch.dtype) -> int:
    """The KV cache a run of ``total_frames`` latent frames (prefix included) allocates: keys and values of
    every layer (plus the routing summaries when routing is on). ``options``: StreamOptions or CachePolicy."""
    slots = sum(cache_slots(options.window, options.sink, total_frames))
    size = 2 * config.num_layers * batch * slots * frame_tokens(config, latent_h, latent_w) * config.dim
    if getattr(options, "kv_fp8", False):  # e4m3 keys/values, float32 scales per (slot, head), key shift per head
        return size + 4 * config.num_layers * batch * config.num_heads * (2 * slots + config.head_dim)
    size *= dtype_bytes(dtype)
    if options.routing_topk is not None:
        size += config.num_layers * batch * slots * config.dim * 4
    return size


def chunk_activation_bytes(config, options, latent_h: int, latent_w: int, batch: int) -> int:
    """A generous bound on one chunk forward's temporaries (float32 residual stream, q/k/v and RoPE
    intermediates, the FFN's hidden layer), plus the chunk's noise and latents."""
    tokens = batch * options.frames_per_block * frame_tokens(config, latent_h, latent_w)
    per_token = 2 * (config.ffn_dim + 8 * config.dim) * 4 + 2 * config.head_dim * 4
    steps = len(getattr(options, "steps", ())) or 4
    latents = (steps + 4) * batch * config.in_dim * options.frames_per_block * latent_h * latent_w * 4
    return tokens * per_token + latents


def vae_decode_bytes(vae_config, frames_per_block: int, latent_h: int, latent_w: int, batch: int,
                     dtype: torch.dtype, weights: bool = True) -> int:
    """The Wan VAE's weights (``weights``) and the decode of one chunk of ``frames_per_block`` latent frames."""
    f = vae_config.spatial_factor
    pixels = batch * (latent_h * f) * (latent_w * f) * frames_per_block * vae_config.temporal_factor
    size = pixels * VAE_DECODE_WIDTHS_PER_PIXEL * vae_config.dim * dtype_bytes(dtype)
    if weights:
        size += vae_parameters(vae_config) * dtype_bytes(dtype)
    return size


def vae_parameters(vae_config) -> int:
    """An upper bound on the Wan VAE's parameters from its config: every level's residual blocks and
    resampling convolutions at the level's widest width, encoder and decoder (3x3x3 kernels)."""
    widths = [vae_config.dim * m for m in vae_config.dim_mult]
    per_level = sum((2 * vae_config.num_res_blocks + 3) * 27 * w * w for w in widths)
    return 2 * per_level + 2 * 27 * widths[-1] * 2 * vae_config.z_dim


def estimate_run_bytes(config, options, total_frames: int, latent_h: int, latent_w: int, batch: int,
                       dtype: torch.dtype, *, decode=None, weights: bool = True) -> int:
    """Device bytes a run needs: the DiT's weights (``weights=False`` when they are already there), the KV
    cache of ``total_frames`` latent frames (prefix included), the prompt's cross-attention K/V, one chunk's
    activations and, with ``decode`` (a ``WanVAEConfig``: the Wan VAE decodes each chunk on the same device),
    the VAE's weights and one chunk's decode. ``options``: StreamOptions or CachePolicy; sizes in latents."""
    size = dtype_bytes(dtype)
    total = kv_cache_bytes(config, options, total_frames, latent_h, latent_w, batch, dtype)
    total += 2 * config.num_layers * batch * config.text_len * config.dim * size  # TextContext
    total += chunk_activation_bytes(config, options, latent_h, latent_w, batch)
    total += batch * config.in_dim * total_frames * latent_h * latent_w * 4  # the video's latents
    if weights:
        total += dit_parameters(config) * size
    if decode is not None:
        total += vae_decode_bytes(decode, options.frames_per_block, latent_h, latent_w, batch, dtype)
    return total


def device_total_bytes(device) -> int | None:
    """All the memory of ``device``: a CUDA device's, else the machine's physical memory (CPU, and MPS whose
    memory is the machine's); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    if device.type == "meta":
        return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf names (Windows)
        return None


def check_fits(bytes_needed: int, device) -> None:
    """Raise ValueError when ``bytes_needed`` exceed all of ``device``'s memory (call before allocating)."""
    total = device_total_bytes(device)
    capped = ""
    if total is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        fraction = torch.cuda.get_per_process_memory_fraction(index)
        if fraction < 1.0:  # torch.cuda.set_per_process_memory_fraction: this process may use only that share
            total, capped = int(total * fraction), f" this process may use ({fraction:.0%} of the device)"
    if total is not None and bytes_needed > total:
        raise ValueError(f"this request needs ~{bytes_needed / GB:,.1f} GB on {device}, which has "
                         f"{total / GB:,.1f} GB{capped or ' in total'}; lower the size/length/window "
                         "(or an FP8 K/V cache, kv_fp8, for about half of the K/V memory)")
