"""The Wan2.1 video VAE: the network with streaming encode/decode, and its weight files.

- ``model``: ``WanVAE``, its config (``WanVAEConfig``, ``WAN21_VAE``, ``TINY_VAE``) and the stream
  objects (``StreamDecoder``, ``StreamEncoder``);
- ``layers``: the causal building blocks (convolutions, norms, resampling) with explicit caches;
- ``checkpoint``: reading Wan / diffusers / ``.pth`` VAE files (``load_vae``, ``vae_from_state_dict``)
  and writing them (``save_vae``).
"""

from .checkpoint import (
    VAECheckpointError,
    infer_vae_config,
    load_vae,
    save_vae,
    to_wan_layout,
    vae_from_state_dict,
)
from .model import TINY_VAE, WAN21_VAE, StreamDecoder, StreamEncoder, WanVAE, WanVAEConfig

__all__ = [
    "TINY_VAE", "WAN21_VAE", "StreamDecoder", "StreamEncoder", "VAECheckpointError", "WanVAE", "WanVAEConfig",
    "infer_vae_config", "load_vae", "save_vae", "to_wan_layout", "vae_from_state_dict",
]
