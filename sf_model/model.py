"""The Wan2.1 text-to-video DiT as a causal video model.

Parameter names are Wan's own (``patch_embedding``, ``blocks.N.self_attn.q``, ``head.head`` ...), so
Wan, ComfyUI and Self Forcing checkpoints load without renaming. The math follows Wan2.1: patch
embedding, text MLP, a sinusoidal time embedding *per frame* (timesteps [B, F]), 6-way modulation,
3-D RoPE, q/k RMSNorm, cross-attention to the text, GELU-tanh FFN and the modulated head. The residual
stream and the modulation are kept in float32 (as Wan does under autocast); linear layers run in the
model's dtype.

Two ways to run the same weights:

- ``forward(x, t, context, frames_per_block=..)``: the whole sequence under a block-causal mask
  (training, teacher; ``frames_per_block=None`` is Wan's bidirectional model);
- ``forward_chunk(x, t, text, cache, start_frame)``: one chunk against a ``KVCache`` (sampling).

Inference speed-ups live in ``sf_model.speed`` and are switched on from outside through hook
points: ``CausalWanModel.inference_trunk`` (gradient-free forwards), ``CausalWanModel.chunk_graphs``
(CUDA-graph replay of ``forward_chunk``), ``Block.ffn_first`` and ``Block.pre_attention`` /
``Block.post_attention``. This module imports none of it.

Training memory: ``set_activation_checkpointing(True)`` recomputes every block in backward
(``sf_model.recompute``: cached chunk forwards then take their history K/V as explicit inputs).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, masked_attention, resolve_backend
from .cache import KVCache, TextContext
from .config import WanConfig
from .mask import build_mask, visibility_mask
from .recompute import check_mode, gather_history, history_stamp, run_checkpointed
from .rope import Rope3D, apply_rope
from .routing import history_frames, routed_attend, routed_attention
from .weight_cast import check_not_cast, linear_bias, linear_dtype, linear_weight, parameter_kinds


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [N, dim]: cos then sin of t * 10000^(-i/half), in float64 where
    the device has it (float32 on MPS)."""
    half = dim // 2
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    t = t.to(dtype)
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=dtype) / half)
    args = torch.outer(t, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def linear_f32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 whatever the weights' dtype (Wan's time MLPs)."""
    bias = linear_bias(layer)
    return F.linear(x.float(), linear_weight(layer).float(), bias.float() if bias is not None else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in float32 (the residual stream's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    """q, k, v, o projections with Wan's RMSNorm over the full width on q and k."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(Attention):
    def __init__(self, cfg: WanConfig):
        super().__init__(cfg)
        self.fused: tuple[torch.Tensor, torch.Tensor] | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_dim)
        if self.fused is not None:  # one GEMM for q, k and v (see fuse_qkv)
            q, k, v = F.linear(x, *self.fused).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return self.norm_q(q).unflatten(-1, heads), self.norm_k(k).unflatten(-1, heads), v.unflatten(-1, heads)

    def fuse_qkv(self) -> None:
        """Store q/k/v weights in one tensor; q/k/v parameters become views of it (no extra memory)."""
        check_not_cast(self, "fused QKV (fuse_qkv, also used by the fused inference trunk)")
        with torch.no_grad():
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
            dim = self.q.weight.shape[0]
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.data = w[i * dim:(i + 1) * dim]
                lin.bias.data = b[i * dim:(i + 1) * dim]
        self.fused = (w, b)


class CrossAttention(Attention):
    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o(attention(q, kv[0], kv[1], backend).flatten(2))


def per_frame(t: torch.Tensor, frames: int, scale=None, shift=None, gate=None) -> torch.Tensor:
    """Apply per-frame modulation terms [B, F, dim] to tokens [B, F*T, dim]."""
    t = t.unflatten(1, (frames, -1))
    if scale is not None:
        t = t * (1 + scale[:, :, None]) + shift[:, :, None]
    if gate is not None:
        t = t * gate[:, :, None]
    return t.flatten(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        # Hook points for inference speed-ups (sf_model.speed), all optional:
        # ffn_first(linear, h) -> GELU-tanh(linear(h)), replacing the FFN's first layer and its GELU
        self.ffn_first: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None
        self.pre_attention = self._pre_attention     # may be replaced by compiled versions
        self.post_attention = self._post_attention
        # Activation checkpointing (set through CausalWanModel.set_activation_checkpointing).
        self.checkpoint = False

    def _pre_attention(self, x, e, frames: int, rope_cos, rope_sin):
        """Modulated norm, q/k/v with RMSNorm and RoPE. x [B, L, dim] f32, e [B, F, 6, dim] f32."""
        shift1, scale1 = (self.modulation[:, 0].float() + e[:, :, 0]), (self.modulation[:, 1].float() + e[:, :, 1])
        h = per_frame(self.norm1(x), frames, scale1, shift1).to(linear_dtype(self.self_attn.q))
        q, k, v = self.self_attn.qkv(h)
        return apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin), v

    def _post_attention(self, x, y, e, frames: int, text_k, text_v, backend: str):
        """Output projection, gated residual, cross-attention and the modulated FFN."""
        dtype = linear_dtype(self.self_attn.q)
        mod = self.modulation.float().unsqueeze(1) + e
        gate1, shift2, scale2, gate2 = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]
        y = self.self_attn.o(y.flatten(2))
        x = x + per_frame(y.float(), frames, gate=gate1)
        x = x + self.cross_attn(self.norm3(x).to(dtype), (text_k, text_v), backend).float()
        h = per_frame(self.norm2(x), frames, scale2, shift2).to(dtype)
        if self.ffn_first is not None:
            y = self.ffn[2](self.ffn_first(self.ffn[0], h))
        else:
            y = self.ffn(h)
        return x + per_frame(y.float(), frames, gate=gate2)

    def forward(self, x, e, frames, rope, text_kv, attend, backend, return_kv: bool = False):
        """x: [B, L, dim] float32; e: [B, F, 6, dim] float32 time projection; attend(q, k, v) -> out.

        ``return_kv``: also return the block's own keys/values (detached) -> (x, k, v). With
        ``checkpoint`` set, a gradient-recording call is recomputed in backward (``attend`` must then
        read no mutable state: ``sf_model.recompute.ChunkAttention`` for cached chunks)."""
        if self.checkpoint and torch.is_grad_enabled():
            return run_checkpointed(self._forward, x, e, frames, rope, text_kv, attend, backend, return_kv)
        return self._forward(x, e, frames, rope, text_kv, attend, backend, return_kv)

    def _forward(self, x, e, frames, rope, text_kv, attend, backend, return_kv):
        q, k, v = self.pre_attention(x, e, frames, *rope)
        out = self.post_attention(x, attend(q, k, v), e, frames, text_kv[0], text_kv[1], backend)
        return (out, k.detach(), v.detach()) if return_kv else out


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # [B, F, dim]
        h = self.norm(x).unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(h.flatten(1, 2).to(linear_dtype(self.head)))


class CausalWanModel(nn.Module):
    """Wan2.1 DiT with a block-causal full-sequence forward and a KV-cached chunk forward."""

    def __init__(self, config: WanConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = cfg = config
        self.attn_backend_request = attn_backend
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        # Not a buffer: never in the state dict, never cast by .to(dtype).
        self.rope = Rope3D(cfg.head_dim, cfg.rope_split, cfg.rope_theta, cfg.rope_max_frames)
        self._backend: tuple[str, str] | None = None
        # Hook points for inference speed-ups (sf_model.speed), None when unused:
        # inference_trunk(model, h, e, e0, frames, rope, text, attend_for_layer) -> head output, run for
        #   gradient-free forwards instead of the block loop; its ``graph_key`` attribute (if any)
        #   names its variant in the CUDA-graph situation key.
        self.inference_trunk: Callable | None = None
        # chunk_graphs: replays forward_chunk from CUDA graphs (accepts / situation / run / clear).
        self.chunk_graphs = None
        # History K/V of checkpointed chunk forwards: "view" or "copy" (sf_model.recompute).
        self.checkpoint_history = "view"

    # -- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def attn_backend(self) -> str:
        """The concrete attention backend for the model's current device."""
        key = str(self.device)
        if self._backend is None or self._backend[0] != key:
            self._backend = (key, resolve_backend(self.attn_backend_request, self.device))
        return self._backend[1]

    @property
    def activation_checkpointing(self) -> bool:
        """Whether blocks are recomputed in backward (``set_activation_checkpointing``)."""
        return any(blk.checkpoint for blk in self.blocks)

    def set_activation_checkpointing(self, enabled: bool = True, *, history: str = "view") -> "CausalWanModel":
        """Recompute every block in backward instead of keeping its activations (default off).

        Applies to gradient-recording calls of ``forward`` and ``forward_chunk``; gradient-free calls
        (sampling, CUDA graphs, the inference trunk) are unchanged. ``history``: how checkpointed chunk
        forwards hold the cached K/V they attend to, "view" (no copy; backward raises if those cache slots
        were rewritten before it) or "copy" (detached copies; safe with rolling windows). See
        ``sf_model.recompute``.
        """
        self.checkpoint_history = check_mode(history)
        for blk in self.blocks:
            blk.checkpoint = bool(enabled)
        return self

    def _explicit_history(self) -> bool:
        """Gradient-recording chunk forwards give blocks their history as inputs (needed for recompute)."""
        return self.activation_checkpointing

    def check_dtypes(self) -> None:
        """Refuse a model whose parameters are on several devices or in several float dtypes (float8 weights
        cast per layer, ``sf_model.weight_cast``, count in the dtype they compute in)."""
        kinds = parameter_kinds(self)
        if len(kinds) > 1:
            desc = ", ".join(sorted(f"{d}/{t}" for d, t in kinds))
            raise ValueError(f"model parameters are spread over several devices/dtypes ({desc}); "
                             "move the whole model with model.to(device, dtype)")

    # -- inputs ------------------------------------------------------------------------------
    def latent_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Validate a latent [B, C, F, H, W] and return its token grid (F', H', W')."""
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"latents must be [batch, channels, frames, height, width], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents have {x.shape[1]} channels, the model expects {cfg.in_dim}")
        pt, ph, pw = cfg.patch_size
        f, h, w = x.shape[2:]
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {f}x{h}x{w} (frames x height x width) is not a multiple of the "
                             f"patch size {pt}x{ph}x{pw}; for Wan use even latent height/width "
                             "(pixel sizes multiple of 16)")
        if x.device != self.device:
            raise ValueError(f"latents are on {x.device} but the model is on {self.device}")
        if not x.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor, got {x.dtype}")
        return f // pt, h // ph, w // pw

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pad text states [B, L, text_dim] to text_len (as Wan does) and apply the text MLP."""
        cfg = self.config
        if context.ndim != 3:
            raise ValueError(f"text context must be [batch, tokens, {cfg.text_dim}], got shape {tuple(context.shape)}")
        if context.shape[-1] != cfg.text_dim:
            raise ValueError(f"text context has width {context.shape[-1]}, the model expects {cfg.text_dim} "
                             "(Wan: umT5-XXL hidden states, 4096)")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens, more than the model's {cfg.text_len}")
        if context.device != self.device:
            raise ValueError(f"text context is on {context.device} but the model is on {self.device}")
        pad = cfg.text_len - context.shape[1]
        if pad:
            context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context.to(self.dtype))

    def encode_text(self, context: torch.Tensor) -> TextContext:
        """Cross-attention K/V of every layer for one prompt batch (computed once per prompt)."""
        c = self.embed_text(context)
        return TextContext([blk.cross_attn.context_kv(c) for blk in self.blocks])

    def time_embed(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame time embedding [B, F, dim] and projection [B, F, 6, dim], float32."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch, frames)
        elif t.ndim == 1:
            if t.shape[0] != batch:
                raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match batch {batch}")
            t = t[:, None].expand(batch, frames)
        elif tuple(t.shape) != (batch, frames):
            raise ValueError(f"timesteps must be [batch, frames] = [{batch}, {frames}], got {tuple(t.shape)}")
        emb = sinusoidal_embedding(self.config.freq_dim, t.reshape(-1))
        e = linear_f32(self.time_embedding[2], F.silu(linear_f32(self.time_embedding[0], emb)))
        e0 = linear_f32(self.time_projection[1], F.silu(e))
        return e.view(batch, frames, -1), e0.view(batch, frames, 6, -1)

    # -- shared trunk ------------------------------------------------------------------------
    def _run(self, x, t, text: TextContext, start_frame: int, attend_for_layer, extend_positions: bool,
             rope=None, layer=None):
        """The trunk; ``layer(i, blk, h, e0, frames, rope, text_kv, backend) -> h``, if given, runs each
        block instead of ``blk(..., attend_for_layer(i), ...)`` (gradient-recording calls only)."""
        grid = self.latent_grid(x)
        b = x.shape[0]
        if text.batch != b:
            raise ValueError(f"text context batch {text.batch} does not match latent batch {b}")
        fr, hh, ww = grid
        if rope is None:
            self.rope.check_frames(start_frame, fr, extend_positions)
            rope = self.rope.cos_sin(start_frame, fr, hh, ww, self.device)
        self._refresh_fused()
        e, e0 = self.time_embed(t, b, fr)
        h = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()  # [B, L, dim]
        if self.inference_trunk is not None and not torch.is_grad_enabled():
            out = self.inference_trunk(self, h, e, e0, fr, rope, text, attend_for_layer)
        else:
            backend = self.attn_backend
            for i, blk in enumerate(self.blocks):
                if layer is None:
                    h = blk(h, e0, fr, rope, text[i], attend_for_layer(i), backend)
                else:
                    h = layer(i, blk, h, e0, fr, rope, text[i], backend)
            out = self.head(h, e, fr)
        return self.unpatchify(out, grid)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        b, c = out.shape[0], self.config.out_dim
        out = out.float().view(b, *grid, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    # -- (a) full sequence under a block-causal mask ------------------------------------------
    def forward(self, x: torch.Tensor, t, context, *, frames_per_block: int | None = None,
                window: int | None = None, sink: int = 0, start_frame: int = 0,
                extend_positions: bool = False, visibility: torch.Tensor | None = None,
                positions=None, routing_topk: int | None = None, routing_sink: int = 0) -> torch.Tensor:
        """Flow prediction [B, out_dim, F, H, W] (float32) for the whole latent sequence.

        ``context`` is text states [B, L, text_dim] or a prepared ``TextContext``. Frames attend
        bidirectionally inside chunks of ``frames_per_block`` and causally across chunks (None: one chunk,
        Wan's bidirectional model); ``window``/``sink`` restrict history like a rolling cache.

        Any other layout (teacher forcing's [history | noisy] sequence, ``sf_model.mask``): ``visibility``,
        a bool [F, F] frame mask (frame q may attend to frame k), replaces the block-causal mask, and
        ``positions`` (F ints) gives each frame's temporal RoPE position (several frames may share one)
        instead of ``start_frame + i``.

        ``routing_topk`` (with ``visibility``): history routing -- each query token sees its own chunk, the
        sink frames [0, ``routing_sink``) and its top-k other visible frames (``sf_model.routing``).
        """
        text = context if isinstance(context, TextContext) else self.encode_text(context)
        fr, hh, ww = self.latent_grid(x)
        use_flex = self.device.type == "cuda"
        if visibility is not None:
            if frames_per_block is not None or window is not None or sink:
                raise ValueError("give either a frame visibility or frames_per_block/window/sink, not both")
            if tuple(visibility.shape) != (fr, fr):
                raise ValueError(f"visibility must be [{fr}, {fr}] for {fr} latent frames, got {tuple(visibility.shape)}")
            mask = None if routing_topk is not None else visibility_mask(visibility, hh * ww, self.device, use_flex)
        else:
            if frames_per_block is not None and frames_per_block < fr and fr % frames_per_block:
                raise ValueError(f"{fr} latent frames is not a multiple of frames_per_block {frames_per_block}")
            mask = build_mask(fr, hh * ww, frames_per_block, window, sink, self.device, use_flex=use_flex)
        if positions is not None and len(positions) != fr:
            raise ValueError(f"positions must give one temporal position per latent frame ({fr}), got {len(positions)}")
        rope = None if positions is None else self.rope_at(positions, hh, ww, extend_positions)
        backend = self.attn_backend

        def attend_for_layer(_i):
            if mask is None:
                return lambda q, k, v: attention(q, k, v, backend)
            return lambda q, k, v: masked_attention(q, k, v, mask)

        if routing_topk is not None:  # the mask of each layer comes from its own q and k
            attend_for_layer = routed_attend(visibility, hh * ww, routing_topk, routing_sink, self.device)
        return self._run(x, t, text, start_frame, attend_for_layer, extend_positions, rope)

    def rope_at(self, positions, height: int, width: int, extend_positions: bool = False):
        """RoPE cos/sin [1, len(positions)*height*width, 1, D/2] for frames at the given temporal positions
        (runs of consecutive positions are read from the table at once)."""
        pos = [int(p) for p in positions]
        if not pos:
            raise ValueError("positions must name one temporal position per frame")
        runs: list[list[int]] = []
        for p in pos:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        parts = []
        for start, n in runs:
            self.rope.check_frames(start, n, extend_positions)
            parts.append(self.rope.cos_sin(start, n, height, width, self.device))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([c for c, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)

    # -- (b) one chunk against a KV cache ----------------------------------------------------
    def forward_chunk(self, x: torch.Tensor, t, text: TextContext, cache: KVCache, start_frame: int,
                      *, routing_topk: int | None = None, extend_positions: bool = False) -> torch.Tensor:
        """Flow prediction for one chunk of frames starting at ``start_frame``, attending to the cache.

        The chunk's K/V are written into its cache slots (overwriting a previous pass of the same chunk).
        With ``routing_topk`` the chunk attends to the sink, the top-k history frames and itself.
        With activation checkpointing, a gradient-recording call gathers each block's history K/V
        before the block runs and writes the block's returned K/V afterwards (``sf_model.recompute``).
        """
        fr, hh, ww = self.latent_grid(x)
        if hh * ww != cache.frame_tokens:
            raise ValueError(f"the cache was built for {cache.frame_tokens} tokens per frame, this chunk has "
                             f"{hh * ww}; build a new cache for a new resolution")
        cache.begin(start_frame, fr)
        backend = self.attn_backend
        route = routing_topk is not None and cache.key_mean is not None and history_frames(cache) > routing_topk

        def attend_for_layer(i):
            def attend(q, k, v):
                cache.write(i, k.detach(), v.detach())  # the cache never joins the autograd graph
                if route:
                    return routed_attention(q, k, v, cache, i, routing_topk)
                if k.requires_grad or v.requires_grad:
                    kc, vc = cache.valid_with_current(i, k, v)
                else:
                    kc, vc = cache.valid(i)
                return attention(q, kc, vc, backend)
            return attend

        if torch.is_grad_enabled() and self._explicit_history():
            stamp = history_stamp(cache, self.checkpoint_history)
            topk = routing_topk if route else None

            def layer(i, blk, h, e0, frames, rope, text_kv, backend_):
                attend = gather_history(cache, i, backend_, stamp, routing_topk=topk)
                h, k, v = blk(h, e0, frames, rope, text_kv, attend, backend_, return_kv=True)
                cache.write(i, k, v)
                return h
            return self._run(x, t, text, start_frame, None, extend_positions, None, layer)

        def run(x_, t_, rope, text_):
            return self._run(x_, t_, text_, start_frame, attend_for_layer, extend_positions, rope)

        graphs = self.chunk_graphs
        if (graphs is not None and graphs.accepts(x) and not route and not torch.is_grad_enabled()
                and isinstance(t, torch.Tensor) and t.device == x.device and tuple(t.shape) == (x.shape[0], fr)):
            self.rope.check_frames(start_frame, fr, extend_positions)
            rope = self.rope.cos_sin(start_frame, fr, hh, ww, self.device)
            key = graphs.situation(x, t, cache, (extend_positions, self.dtype, self._trunk_key(), backend))
            return graphs.run(key, run, x, t, rope, text)
        return run(x, t, None, text)

    # -- structure -----------------------------------------------------------------------------
    def fuse_qkv(self) -> "CausalWanModel":
        """Run q/k/v of every self-attention as one GEMM (weights shared, nothing copied twice).

        Call after moving the model to its final device/dtype; ``.to()`` afterwards makes the fused
        tensors stale, which is detected and repaired at the next forward.
        """
        for blk in self.blocks:
            blk.self_attn.fuse_qkv()
        self._drop_graphs()
        return self

    def _refresh_fused(self) -> None:
        attn = self.blocks[0].self_attn if len(self.blocks) else None
        if attn is not None and attn.fused is not None and attn.fused[0].data_ptr() != attn.q.weight.data_ptr():
            self.fuse_qkv()

    def _trunk_key(self):
        trunk = self.inference_trunk
        return None if trunk is None else getattr(trunk, "graph_key", trunk)

    def _drop_graphs(self) -> None:
        if getattr(self, "chunk_graphs", None) is not None:
            self.chunk_graphs.clear()

    def _apply(self, fn, *args, **kwargs):
        self._drop_graphs()  # .to()/.cuda()/.half() move the tensors the graphs read
        return super()._apply(fn, *args, **kwargs)

    def new_cache(self, batch: int, frame_tokens: int, *, window: int, sink: int = 0,
                  key_means: bool = False) -> KVCache:
        """A KV cache shaped for this model, on its device and in its dtype."""
        cfg = self.config
        return KVCache(cfg.num_layers, batch, frame_tokens, cfg.num_heads, cfg.head_dim, window=window,
                       sink=sink, dtype=self.dtype, device=self.device, key_means=key_means)
