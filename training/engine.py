"""The shared training machinery of every stage.

- ``Runtime``: device, autocast precision and the torch.distributed process group (``torchrun`` sets
  RANK/WORLD_SIZE/LOCAL_RANK; gloo on the CPU, nccl on CUDA).
- ``Wrapped``: a model as the stages call it. Under torchrun every call (full-sequence ``forward`` and the
  sampler's ``forward_chunk``) goes through PyTorch ``DistributedDataParallel``, so gradients are
  all-reduced by DDP itself (the sampler functions receive the wrapper, not a copy of their loop).
- ``Trainable``: AdamW + warmup + gradient clipping + EMA of one model; ``accumulate`` runs micro-steps
  under ``no_sync`` with bf16 autocast.
- ``seeded_randn`` / ``key_seed``: every random draw is keyed by (seed, stage, step, global sample index),
  so one process with gradient accumulation draws exactly what several processes draw together, and a
  resumed run draws what an uninterrupted run would have.
- ``Checkpointer``: atomic ``torch.save`` (temporary file, fsync, rename) keeping the previous checkpoint, and
  resume read with ``weights_only=True`` (falling back to the previous file when the newest is damaged);
  ``JsonlLog``: one JSON object per logged step, trimmed on resume so a killed run leaves no duplicate lines.
- ``run_loop``: the step loop with a tqdm bar, logging and periodic checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping


import torch
import torch.distributed as dist
import torch.nn as nn


# -- runtime --------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"          # fp32 | bf16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        """bf16 autocast for forwards (weights and optimiser state stay float32)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_runtime(device: str = "auto", precision: str = "fp32") -> Runtime:
    """Pick the device and join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device asks for CUDA but torch sees no GPU; use device = \"cpu\"")
        if dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "bf16" and dev.type == "cpu":
        precision = "fp32"  # CPU bf16 autocast is slow and buys nothing at test sizes
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(device=dev, precision=precision, rank=rank, world_size=world, local_rank=local)


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_int(value: int, rt: Runtime) -> int:
    """Rank 0's value on every rank (e.g. the random exit step of a rollout)."""
    if not rt.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long,
                     device=rt.device if rt.device.type == "cuda" else torch.device("cpu"))
    dist.broadcast(t, src=0)
    return int(t.item())


def mean_across_ranks(values: Mapping[str, float], rt: Runtime) -> dict[str, float]:
    if not rt.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=rt.device if rt.device.type == "cuda" else torch.device("cpu"))
    dist.all_reduce(t)
    return {k: float(v) / rt.world_size for k, v in zip(keys, t.tolist())}


# -- deterministic randomness --------------------------------------------------------------------
def key_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and runs)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(key_seed(*parts))


def seeded_randn(shape, *parts, device=None) -> torch.Tensor:
    """Standard normal noise keyed by ``parts``: drawn on the CPU (then moved), or on the GPU itself when
    ``device`` is CUDA (the same key gives the same noise on every process of a run)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        g = torch.Generator(dev).manual_seed(key_seed(*parts))
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=dev)
    out = torch.randn(tuple(shape), generator=generator(*parts), dtype=torch.float32)
    return out.to(dev) if device is not None else out


def sample_indices(step: int, micro: int, rt: Runtime, batch: int, accum: int) -> list[int]:
    """Global indices of this process's samples at (step, micro-step).

    The global batch of a step is ``world * accum * batch`` samples ordered (micro, rank, b): one process
    with ``accum = 2`` sees exactly the samples two processes with ``accum = 1`` see.
    """
    per_step = rt.world_size * accum * batch
    base = step * per_step + (micro * rt.world_size + rt.rank) * batch
    return list(range(base, base + batch))


# -- models under DDP ------------------------------------------------------------------------------
class _Dispatch(nn.Module):
    """Lets DDP's forward run any method of the model (``forward`` or ``forward_chunk``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        fn = self.model if method == "forward" else getattr(self.model, method)
        return fn(*args, **kwargs)


class Wrapped:
    """A CausalWanModel as the trainer calls it; routed through DDP when distributed.

    It exposes what the sampler functions use (``forward_chunk``, ``config``, ``device``, ``dtype``,
    ``rope``, ``encode_text``), so ``sf_model.sampler.denoise_chunk(wrapped, ...)`` runs the real sampler
    code while DDP sees every forward.
    """

    def __init__(self, model: nn.Module, rt: Runtime):
        self.module = model
        self.ddp = None
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(_Dispatch(model), device_ids=ids,
                                                           broadcast_buffers=False)

    def _call(self, method: str, *args, **kwargs):
        if self.ddp is None:
            fn = self.module if method == "forward" else getattr(self.module, method)
            return fn(*args, **kwargs)
        return self.ddp(method, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)

    def forward_chunk(self, *args, **kwargs):
        return self._call("forward_chunk", *args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def __getattr__(self, name):  # config, device, dtype, rope, encode_text, latent_grid ...
        return getattr(self.__dict__["module"], name)


# -- EMA ---------------------------------------------------------------------------------------------
class EMA:
    """A float32 shadow of a model's parameters: shadow = decay * shadow + (1 - decay) * param."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.decay, self.start = float(decay), int(start)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``step``: the number of optimiser steps taken so far (before ``start`` the shadow copies)."""
        d = self.decay if step > self.start else 0.0
        for n, p in model.named_parameters():
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def model_copy(self, model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        self.copy_to(out)
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start": self.start, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.decay, self.start = float(state["decay"]), int(state["start"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


# -- one trainable model -------------------------------------------------------------------------
class Trainable:
    """A model, its DDP wrapper, AdamW with linear warmup, gradient clipping and an optional EMA."""

    def __init__(self, name: str, model: nn.Module, rt: Runtime, *, lr: float, betas=(0.9, 0.999),
                 weight_decay: float = 0.0, grad_clip: float = 1.0, warmup: int = 0,
                 ema_decay: float | None = None, ema_start: int = 0):
        self.name, self.model, self.rt = name, model, rt
        model.train().requires_grad_(True)
        self.wrapped = Wrapped(model, rt)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas),
                                           weight_decay=weight_decay, eps=1e-8)
        warm = max(int(warmup), 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.grad_clip = grad_clip
        self.ema = EMA(model, ema_decay, ema_start) if ema_decay is not None else None
        self.updates = 0

    def step(self) -> float:
        """Clip, step, zero the gradients and update the EMA; returns the pre-clip gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.model, self.updates)
        return float(norm)

    def state_dict(self) -> dict:
        out = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "updates": self.updates}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        return out

    def load_state_dict(self, state: Mapping) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = int(state["updates"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def ema_model(self) -> nn.Module:
        """A detached eval copy carrying the EMA weights (or the live weights without EMA)."""
        m = self.ema.model_copy(self.model) if self.ema is not None else copy.deepcopy(self.model)
        return m.eval().requires_grad_(False)


def accumulate(rt: Runtime, trainable: Trainable, accum: int,
               micro_loss: Callable[[int], tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """Run ``accum`` micro-steps (forward under autocast, backward of loss/accum), syncing only the last.

    Returns the mean of each metric over micro-steps (local to this process).
    """
    sums: dict[str, float] = {}
    for m in range(accum):
        sync = m == accum - 1
        with (contextlib.nullcontext() if sync else trainable.wrapped.no_sync()):
            with rt.autocast():
                loss, metrics = micro_loss(m)
            (loss / accum).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
    return sums


# -- checkpoints and logs --------------------------------------------------------------------------
def atomic_torch_save(obj, path: str, previous: str | None = None) -> None:
    """Write ``obj`` to ``path`` so that a kill at any moment leaves the old file or the new one.

    With ``previous``, the file being replaced is kept under that name (renamed after the new file is fully
    written and synced, just before the new one takes its place).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if previous is not None and os.path.isfile(path):
        os.replace(path, previous)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (best effort: not every platform opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(e: BaseException) -> str:
    """The informative part of a torch.load error: the restricted unpickler's own line, or the first sentence."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or [type(e).__name__])[0].split(". ")[0].rstrip(".")


def read_checkpoint(path: str) -> dict:
    """A trainer checkpoint ({step, parts, extra}) read with ``torch.load(weights_only=True)``.

    Checkpoints hold only tensors and plain containers (dict/list/tuple/int/float/str/bool/None), so the
    restricted unpickler reads them; a pickle that would build any other object -- and could run code while
    doing so -- is refused, never executed. Any file that cannot be read (refused, truncated, not a
    checkpoint) raises a ValueError naming it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(f"{path} is damaged or not a plain trainer checkpoint: torch.load(weights_only=True) "
                             f"refused it ({_reason(e)}); it is not unpickled any further, since that could run "
                             "code") from None
        raise ValueError(f"{path} is unreadable ({_reason(e)})") from None
    except Exception as e:  # truncated zip, random bytes, I/O error: torch raises RuntimeError/EOFError/...
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {_reason(e)})") from None
    if not isinstance(state, dict) or "step" not in state or not isinstance(state.get("parts"), dict):
        raise ValueError(f"{path} is not a trainer checkpoint (no step/parts)")
    return state


class Checkpointer:
    """``<dir>/checkpoint.pt`` holding {step, state of every named part, extra}; atomic and resumable.

    Each save keeps the checkpoint it replaces as ``checkpoint.prev.pt``; ``load`` falls back to that one,
    with a warning, when the newest file is unreadable. ``extra`` must hold plain values (what
    ``torch.load(weights_only=True)`` reads back: tensors, numbers, strings, lists, dicts).
    """

    def __init__(self, directory: str, rt: Runtime):
        self.dir, self.rt = directory, rt
        self.path = os.path.join(directory, "checkpoint.pt")
        self.prev_path = os.path.join(directory, "checkpoint.prev.pt")
        self._newest_bad = False  # checkpoint.pt is damaged: the next save must not rotate it into prev

    def exists(self) -> bool:
        # checkpoint.pt alone is missing when a kill fell between the two renames of a save
        return os.path.isfile(self.path) or os.path.isfile(self.prev_path)

    def save(self, step: int, parts: Mapping[str, object], extra: Mapping | None = None) -> None:
        if self.rt.is_main:
            state = {"step": int(step), "parts": {k: v.state_dict() for k, v in parts.items()},
                     "extra": dict(extra or {})}
            atomic_torch_save(state, self.path, previous=None if self._newest_bad else self.prev_path)
        self._newest_bad = False
        self.rt.barrier()

    def _read_newest(self) -> tuple[str, dict]:
        """(path, state) of the newest readable checkpoint (warns when it is the previous one); ValueError when
        none is."""
        problems = []
        for path in (self.path, self.prev_path):
            if not os.path.isfile(path):
                continue
            try:
                state = read_checkpoint(path)
            except ValueError as e:
                problems.append((path, str(e)))
                continue
            if problems:
                warnings.warn(f"{problems[0][1]}; resuming from the previous checkpoint {path} (step "
                              f"{int(state['step'])}) instead", stacklevel=3)
                self._newest_bad = True
            return path, state
        names = " and ".join(p for p, _ in problems)
        raise ValueError("cannot resume: " + "; ".join(m for _, m in problems)
                         + f". Delete {names} to restart this stage from step 0")

    def load(self, parts: Mapping[str, object]) -> tuple[int, dict]:
        """Restore every part; returns (step, extra). Stray temporary files of a killed write are removed."""
        if self.rt.is_main and os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if name.startswith("checkpoint.pt.tmp"):
                    os.remove(os.path.join(self.dir, name))
        self.rt.barrier()
        path, state = self._read_newest()
        missing = set(parts) - set(state["parts"])
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; it was written by another stage or config")
        for k, v in parts.items():
            v.load_state_dict(state["parts"][k])
        return int(state["step"]), dict(state.get("extra", {}))


class JsonlLog:
    """Append-only JSON-lines log (rank 0). ``trim(step)`` drops entries past a resumed step."""

    def __init__(self, path: str, rt: Runtime):
        self.path, self.rt = path, rt
        if rt.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)

    def write(self, record: Mapping) -> None:
        if not self.rt.is_main:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(dict(record), sort_keys=True) + "\n")

    def trim(self, step: int) -> None:
        """Keep the entries up to ``step`` (``trim(0)``: an empty log for a run starting from scratch)."""
        if not self.rt.is_main or not os.path.isfile(self.path):
            return
        keep = [line for line in read_jsonl(self.path) if line.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            for rec in keep:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is unreliable
    return out


# -- the loop ----------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    steps: int          # steps done in total (resumed ones included)
    completed: bool     # reached the configured steps or the time budget (the stage may write its output)


def run_loop(stage: str, total_steps: int, step_fn: Callable[[int], Mapping[str, float]],
             parts: Mapping[str, object], directory: str, rt: Runtime, *, log_every: int = 10,
             checkpoint_every: int = 100, progress: bool = True, stop_after: int | None = None,
             time_budget_s: float = 0.0) -> LoopResult:
    """Run ``step_fn(step)`` for step = resumed..total-1, logging and checkpointing.

    ``stop_after`` ends the loop after that many steps of *this* call without a final checkpoint (what a
    kill does; used by tests). ``time_budget_s`` > 0 ends it cleanly (checkpoint, completed) once this call
    has run that long -- for time-boxed runs; the decision is taken on rank 0 and broadcast.
    """
    ckpt = Checkpointer(directory, rt)
    log = JsonlLog(os.path.join(directory, "log.jsonl"), rt)
    start = 0
    if ckpt.exists():
        start, _ = ckpt.load(parts)
    log.trim(start)  # lines past the checkpoint (all of them without one) were written by a killed run
    from ..sf_model.progress import progress_bar

    bar = progress_bar(total_steps, stage, "step", start, enabled=rt.is_main and progress and total_steps > start)
    t0 = time.time()
    done = 0
    step = start
    window: dict[str, list[float]] = {}
    try:
        for step in range(start, total_steps):
            metrics = mean_across_ranks(step_fn(step), rt)
            done += 1
            last = step + 1 == total_steps
            for k, v in metrics.items():
                window.setdefault(k, []).append(float(v))
            if (step + 1) % log_every == 0 or last or step == start:
                # each metric averaged over the steps since the last line (sparse ones, e.g. generator
                # updates every critic_ratio steps, over the steps that had them)
                means = {k: sum(v) / len(v) for k, v in window.items()}
                log.write({"stage": stage, "step": step + 1, "time": round(time.time() - t0, 3), **means})
                window = {}
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
            if stop_after is not None and done >= stop_after and not last:
                return LoopResult(step + 1, False)
            out_of_time = bool(broadcast_int(int(time_budget_s > 0 and time.time() - t0 > time_budget_s), rt))
            if (step + 1) % checkpoint_every == 0 or last or out_of_time:
                ckpt.save(step + 1, parts)
            if out_of_time and not last:
                log.write({"stage": stage, "step": step + 1, "time": round(time.time() - t0, 3),
                           "note": f"time budget of {time_budget_s:.0f} s reached"})
                return LoopResult(step + 1, True)
    finally:
        if bar is not None:
            bar.close()
    return LoopResult(max(total_steps, start), True)
