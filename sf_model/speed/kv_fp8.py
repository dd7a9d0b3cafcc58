"""FP8 K/V cache (opt-in, less exact): keys and values stored as ``float8_e4m3fn`` with float32 scales.

``Fp8KVCache`` is a ``KVCache`` whose buffers hold e4m3 values. A chunk's keys/values are quantised when they
are written (``write``), so a history frame is quantised once -- by the clean context pass that commits it --
and never again, however many denoising steps read it; only the current chunk's own slots are rewritten per
step (as in the exact cache). Each frame slot has one scale per head and per layer (a block of
``frame_tokens x head_dim`` values: the frame's amax of that head maps to e4m3's largest value, 448), stored
next to the buffers in ``k_scale`` / ``v_scale`` [layers, B, slots, heads]; a slot's scale is rewritten with
the slot, so rewriting one frame never touches another frame's numbers.

Keys are stored shifted: before quantisation every key loses ``k_shift`` [layers, B, heads, head_dim], the mean
key of the chunk that writes frame 0 (set by each pass over that chunk, then kept), so e4m3's few bits go to
how keys differ rather than to what they share. All keys a query sees carry the same shift, and softmax
ignores a term ``q . shift`` common to every key, so an FP8 kernel may use the shifted keys as they are;
the reads below add it back. (On the toy model this halves the error of one forward, 7 % -> 4 %: keys, not
values, carry nearly all of it; see docs/benchmarks.md.)

Reading: ``valid`` / ``history`` dequantise into the compute dtype (what the SDPA / flash backends take), so
``CausalWanModel.forward_chunk`` runs unchanged. ``valid_fp8`` hands out the raw e4m3 tensors and their
scales without dequantising, for an FP8 attention kernel that takes them directly (``attend_fp8`` is that
seam: today it dequantises and calls ``sf_model.attention.attention``).

Memory: the K/V buffers take half of bf16's bytes (a quarter of float32's), plus 8 bytes per frame, head and
layer for the scales and one float32 key shift per layer and head (``nbytes``). Quantisation reuses ``fp8.quantize_by_amax`` (the FP8 linear layers'
rounding). Not supported (refused): history routing (``key_means``, whose mean keys would need the exact
keys) and re-rotating a sink in place (``sf_model.positions`` with rebased positions or KV re-caching), which
writes keys into the buffers directly.
"""

from __future__ import annotations

import torch

from ..attention import attention
from ..cache import KVCache
from .fp8 import FP8, quantize_by_amax


def quantize_frames(x: torch.Tensor, frame_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, F*frame_tokens, H, D] -> (e4m3 [B, F*frame_tokens, H, D], float32 scales [B, F, H]): one scale per
    frame and head."""
    xf = x.float().unflatten(1, (-1, frame_tokens))                 # [B, F, T, H, D]
    q, scale = quantize_by_amax(xf, xf.abs().amax(dim=(2, 4), keepdim=True))
    return q.flatten(1, 2), scale[:, :, 0, :, 0]


def dequantize_frames(q: torch.Tensor, scale: torch.Tensor, frame_tokens: int, dtype: torch.dtype,
                      shift: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``quantize_frames`` into ``dtype`` (e4m3 -> bf16/fp16/fp32 is exact; the scale multiply
    rounds once in ``dtype``); ``shift`` [B, H, D], if given, is added back (the keys' shift, see the cache)."""
    s = scale.to(dtype)[:, :, None, :, None]
    out = q.unflatten(1, (-1, frame_tokens)).to(dtype) * s
    if shift is not None:
        out = out + shift.to(dtype)[:, None, None]
    return out.flatten(1, 2)


class Fp8KVCache(KVCache):
    """A ``KVCache`` storing e4m3 keys/values with per-(frame slot, head) float32 scales (module docstring).
    ``dtype`` is the compute dtype reads come back in."""

    quantized = True

    def __init__(self, num_layers: int, batch: int, frame_tokens: int, num_heads: int, head_dim: int,
                 *, window: int, sink: int = 0, dtype: torch.dtype, device: torch.device,
                 key_means: bool = False):
        if key_means:
            raise ValueError("the FP8 K/V cache does not support history routing (key_means); "
                             "use the exact cache for routing_topk")
        super().__init__(num_layers, batch, frame_tokens, num_heads, head_dim, window=window, sink=sink,
                         dtype=FP8, device=device)
        self.compute_dtype = dtype
        shape = (num_layers, batch, self.capacity, num_heads)
        self.k_scale = torch.zeros(shape, dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(shape, dtype=torch.float32, device=device)
        self.k_shift = torch.zeros(num_layers, batch, num_heads, head_dim, dtype=torch.float32, device=device)

    @classmethod
    def for_model(cls, model, batch: int, frame_tokens: int, *, window: int, sink: int = 0) -> "Fp8KVCache":
        """An FP8 cache shaped for ``model`` (a ``CausalWanModel``), on its device, reading back in its dtype."""
        cfg = model.config
        return cls(cfg.num_layers, batch, frame_tokens, cfg.num_heads, cfg.head_dim, window=window, sink=sink,
                   dtype=model.dtype, device=model.device)

    # -- writing -----------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantise the chunk's keys/values [B, F*frame_tokens, H, D] and store them with their scales."""
        ft = self.frame_tokens
        if self._tracking:
            self._notice_foreign_changes()
        if self.plan.start_frame == 0:  # the chunk of frame 0 sets the keys' shift (every pass of it)
            self.k_shift[layer].copy_(k.float().mean(1))
        k = k.float() - self.k_shift[layer][:, None]
        for buf, sbuf, x in ((self.k[layer], self.k_scale[layer], k), (self.v[layer], self.v_scale[layer], v)):
            q, s = quantize_frames(x, ft)
            for slot, off, n in self.plan.runs:
                buf[:, slot * ft:(slot + n) * ft].copy_(q[:, off * ft:(off + n) * ft])
                sbuf[:, slot:slot + n].copy_(s[:, off:off + n])
        if self._tracking:
            self._seen_versions = self._versions()

    # -- reading -----------------------------------------------------------------------------
    def valid_fp8(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The valid slots as stored: (k e4m3 [B, n*frame_tokens, H, D], v e4m3, k scales [B, n, H],
        v scales [B, n, H]) views, n = valid frames; value ~= e4m3 * scale of its frame and head, key ~= that
        + ``k_shift[layer]`` (which attention may leave out)."""
        nf = self.plan.valid_frames
        n = nf * self.frame_tokens
        return self.k[layer, :, :n], self.v[layer, :, :n], self.k_scale[layer, :, :nf], self.v_scale[layer, :, :nf]

    def valid(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every valid slot, dequantised into the compute dtype."""
        k8, v8, ks, vs = self.valid_fp8(layer)
        ft, dt = self.frame_tokens, self.compute_dtype
        return dequantize_frames(k8, ks, ft, dt, self.k_shift[layer]), dequantize_frames(v8, vs, ft, dt)

    def history(self, layer: int):
        """As ``KVCache.history``, with the pieces dequantised (new tensors, not views of the buffers)."""
        ft, dt = self.frame_tokens, self.compute_dtype
        spans, order = self.history_spans()

        def read(buf, sbuf, shift=None):
            return tuple(dequantize_frames(buf[layer, :, lo * ft:hi * ft], sbuf[layer, :, lo:hi], ft, dt, shift)
                         for lo, hi in spans)
        return read(self.k, self.k_scale, self.k_shift[layer]), read(self.v, self.v_scale), order

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def graph_key(self) -> tuple:
        """Buffers a recorded CUDA graph reads besides ``k``/``v`` (``speed.graphs`` situation key)."""
        return (self.k_scale.data_ptr(), self.v_scale.data_ptr(), self.k_shift.data_ptr())

    def _versions(self) -> tuple:
        return super()._versions() + (self.k_scale._version, self.v_scale._version, self.k_shift._version)

    def nbytes(self) -> int:
        return super().nbytes() + 4 * (2 * self.k_scale.numel() + self.k_shift.numel())

    def release(self) -> None:
        super().release()
        self.k_scale = self.v_scale = self.k_shift = None


def attend_fp8(q: torch.Tensor, cache: Fp8KVCache, layer: int, backend: str) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] to the valid slots of an FP8 cache: the place for an FP8 kernel taking
    ``cache.valid_fp8(layer)`` (e4m3 K/V + per-frame, per-head scales) directly; today the K/V are
    dequantised into q's dtype and go through ``attention`` (SDPA / flash)."""
    k, v = cache.valid(layer)
    return attention(q, k, v, backend)
