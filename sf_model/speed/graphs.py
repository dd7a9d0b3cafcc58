"""CUDA graphs of the KV-cached chunk forward (inference speed-up, exact).

A chunk forward is some hundreds of small kernels, each queued from Python; where the host needs
about as long to queue them as the GPU needs to run them, the host sets the pace. A CUDA graph
replays the whole forward with one launch (figures: benchmarks/NOTES.md). Switched on with
``sf_model.speed.use_cuda_graphs(model)``, which sets ``model.chunk_graphs``.

A graph is recorded for each distinct *situation* of ``CausalWanModel.forward_chunk``: the chunk's
shape and dtype, the cache slots it writes and reads (``CachePlan.runs`` / ``valid_frames``), and the
address of the KV cache it reads and writes in place. Everything that changes between calls in the
same situation -- the latents, the timesteps, the RoPE angles of the chunk's absolute position -- is
copied into the graph's static input buffers before each replay, and the prompt's cross-attention
K/V into one static copy shared by all graphs (once per prompt). So the 5 forwards
of a chunk share one graph, and with a rolling cache the slot pattern repeats every few chunks, so
a long video cycles through a handful of graphs instead of recording one per chunk.

The first call in a new situation runs eagerly (its result is returned, and it also serves as the
warm-up) and records the graph; later calls replay it. Graphs share one memory pool, and a replay's
output is copied out at once, so a replay never clobbers another graph's result. At most
``max_graphs`` are kept (least recently used first out). Everything is dropped when the model's
weights move (``.to()``) or its fused weights are rebuilt.

Concurrent runs on one model (threads, each with its own cache) are safe: the static prompt copy, the
static inputs, the shared memory pool and the recordings are one state, so ``run`` holds a lock from the
prompt copy to the copied-out result, and on CUDA each graphed forward's device work also waits (an event,
no host sync) for the previous one's, in case the threads queue on different streams. Graphed forwards of
concurrent runs therefore take turns; a run alone pays one uncontended lock per forward.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from ..cache import TextContext

Rope = tuple[torch.Tensor, torch.Tensor]


def _with_text(forward, text, x, t, rope):
    return forward(x, t, rope, text)


@dataclass
class _Graph:
    replay: Callable[[], None]
    x: torch.Tensor
    t: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    out: torch.Tensor


def unsupported_reason() -> str | None:
    """Why CUDA graphs must not be recorded in this process (None: they can be).

    Under PyTorch's ``cudaMallocAsync`` allocator backend (``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync``,
    which ComfyUI sets by default on recent GPUs) a tensor recorded in a graph's pool and freed outside the
    capture aborts the whole process (CUDA "invalid argument" in the allocator's free, measured on an H200 with
    ComfyUI 0.3.64), so graphs stay off there; the replay saves only the host's launch time (~1 %).
    """
    if torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return ("PyTorch's cudaMallocAsync allocator is active (ComfyUI's default; start ComfyUI with "
                "--disable-cuda-malloc to use CUDA graphs); graphs there abort the process when freed")
    return None


class ChunkGraphs:
    """Recorded forwards keyed by situation (see the module docstring)."""

    def __init__(self, max_graphs: int = 32):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self.recorded = 0
        self.replayed = 0
        self.failed: str | None = None  # why recording failed (then every forward runs eagerly)
        self._text: TextContext | None = None
        self._text_shapes = None
        self._text_src = None
        self._lock = threading.RLock()  # one graphed forward at a time (see the module docstring)
        self._done = None  # CUDA event after the last graphed forward's device work

    def clear(self) -> None:
        """Drop every recording (and the static prompt copy)."""
        with self._lock:
            self.graphs.clear()
            self.pool = None
            self._text = self._text_shapes = self._text_src = None

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    def situation(x: torch.Tensor, t: torch.Tensor, cache, extra: tuple) -> tuple:
        # (the prompt's shapes are not part of it: a prompt of other shapes clears every graph, see
        # ``static_text``)
        plan = cache.plan
        return (tuple(x.shape), x.dtype, tuple(t.shape), plan.runs, plan.valid_frames,
                cache.k.data_ptr(), cache.v.data_ptr(), getattr(cache, "graph_key", None), extra)

    def static_text(self, text: TextContext) -> TextContext:
        """The graphs read the prompt's cross-attention K/V from one static copy, refreshed (a plain
        device copy, once per prompt) when a different ``TextContext`` comes in."""
        src = self._text_src() if self._text_src is not None else None
        shapes = [(k.shape, k.dtype, v.shape) for k, v in text.kv]
        if self._text is None or self._text_shapes != shapes:
            self.clear()  # recorded graphs read the old static buffers
            self._text = TextContext([(k.clone(), v.clone()) for k, v in text.kv])
            self._text_shapes = shapes
        elif src is not text:
            for (dk, dv), (k, v) in zip(self._text.kv, text.kv):
                dk.copy_(k)
                dv.copy_(v)
        self._text_src = weakref.ref(text)
        return self._text

    def run(self, key: tuple, forward: Callable[[torch.Tensor, torch.Tensor, Rope, TextContext], torch.Tensor],
            x: torch.Tensor, t: torch.Tensor, rope: Rope, text: TextContext) -> torch.Tensor:
        """``forward(x, t, rope, text)`` through a graph recorded for ``key`` (recorded now if new); safe to
        call from several threads at once."""
        with self._lock:
            if x.is_cuda and self._done is not None:
                torch.cuda.current_stream(x.device).wait_event(self._done)
            out = self._run(key, forward, x, t, rope, text)
            if x.is_cuda:
                self._done = torch.cuda.Event()
                self._done.record(torch.cuda.current_stream(x.device))
            return out

    def _run(self, key, forward, x, t, rope, text) -> torch.Tensor:
        text = self.static_text(text)
        forward = functools.partial(_with_text, forward, text)
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            g.x.copy_(x)
            g.t.copy_(t)
            g.cos.copy_(rope[0])
            g.sin.copy_(rope[1])
            g.replay()
            self.replayed += 1
            return g.out.clone()
        out = forward(x, t, rope)  # the real result, and the warm-up of everything the graph will run
        if self.failed is None:
            self.failed = unsupported_reason()
            if self.failed is not None:
                warnings.warn(f"CUDA graphs off, running eagerly: {self.failed}")
        if self.failed is not None:
            return out
        static = (x.clone(), t.clone(), rope[0].clone(), rope[1].clone())
        try:
            replay, graph_out = self._capture(forward, static)
        except Exception as exc:  # e.g. a kernel that cannot be captured: stay eager from now on
            self.failed = f"{type(exc).__name__}: {exc}"
            self.clear()
            warnings.warn(f"CUDA graph recording failed, running eagerly from now on ({self.failed})")
            return out
        self.graphs[key] = _Graph(replay, *static, graph_out)
        self.recorded += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return out

    def _capture(self, forward, static) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``forward`` on the static inputs; returns (replay, static output)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = forward(static[0], static[1], (static[2], static[3]))
        return graph.replay, out  # the bound method keeps the graph alive
