"""The shared training machinery of every stage.

- ``Runtime``: device, precision, the parallel scheme (``run.parallel``: FSDP2 by default, or DDP) and the
  torch.distributed process group (``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; gloo on the CPU, nccl on
  CUDA; a single process asking for ``run.optimizer_offload`` gets a 1-process group).
- ``Wrapped`` (``training.distributed``): a model as the stages call it -- sharded in place by FSDP2 (every
  transformer block + the root, ``forward_chunk``/``encode_text`` registered as forward methods), routed
  through DDP, or plain; the sampler functions receive it and run their own loop.
- ``Trainable``: AdamW + warmup + gradient clipping + EMA of one model (of its parameters that require
  gradient); ``accumulate`` runs micro-steps without gradient reduction but in the last one.
- ``seeded_randn`` / ``key_seed``: every random draw is keyed by (seed, stage, step, global sample index),
  so one process with gradient accumulation draws exactly what several processes draw together, and a
  resumed run draws what an uninterrupted run would have.
- ``Checkpointer`` (``training.sharded_checkpoint``): ``torch.distributed.checkpoint`` step folders, each
  process writing its own shards, an atomic ``latest`` pointer, the previous checkpoint kept as a fallback;
  resumable on another number of processes. ``JsonlLog``: one JSON object per logged step, trimmed on resume
  so a killed run leaves no duplicate lines.
- ``full_state_dict``: the whole (EMA) weights on rank 0 for an export.
- ``run_loop``: the step loop with a tqdm bar, logging and periodic checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import (PARALLEL, Wrapped, clip_grad_norm, full_tensor, init_group, local, meta_skeleton,
                          mixed_precision, shard_like)
from .distributed import shard_frozen  # noqa: F401 -- re-exported for the stages
from .sharded_checkpoint import Checkpointer
from .sharded_checkpoint import atomic_torch_save, read_checkpoint, read_full_checkpoint  # noqa: F401 -- re-exported


# -- runtime --------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"          # fp32 | bf16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "fsdp"           # fsdp | ddp (with a process group)
    optimizer_offload: bool = False  # FSDP2 CPUOffloadPolicy for the trained blocks
    ema_on_cpu: bool = False         # EMA shadows in host memory
    group: bool = False              # a torch.distributed process group exists (init_runtime made it)
    activation_checkpointing: bool = False  # Trainable recomputes the trained model's blocks in backward

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def fsdp(self) -> bool:
        """Trained models are sharded with FSDP2 (a process group and run.parallel = "fsdp")."""
        return self.group and self.parallel == "fsdp"

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


def init_runtime(device: str = "auto", precision: str = "fp32", *, parallel: str = "fsdp",
                 optimizer_offload: bool = False, ema_on_cpu: bool = False,
                 activation_checkpointing: bool = False) -> Runtime:
    """Pick the device and join the process group when launched by torchrun (or create a 1-process group
    for a single process that offloads its optimiser: FSDP2 then applies as on many processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel not in PARALLEL:
        raise ValueError(f"run.parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if optimizer_offload and parallel != "fsdp":
        raise ValueError("run.optimizer_offload needs run.parallel = \"fsdp\" (FSDP2's CPUOffloadPolicy)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device asks for CUDA but torch sees no GPU; use device = \"cpu\"")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "bf16" and dev.type == "cpu":
        precision = "fp32"  # CPU bf16 autocast is slow and buys nothing at test sizes
    group = world > 1 or optimizer_offload
    if group:
        init_group(dev, world, rank)
    return Runtime(device=dev, precision=precision, rank=rank, world_size=world, local_rank=local_rank,
                   parallel=parallel, optimizer_offload=optimizer_offload, ema_on_cpu=ema_on_cpu, group=group,
                   activation_checkpointing=activation_checkpointing)


def runtime_for(run) -> Runtime:
    """``init_runtime`` with a config's ``[run]`` table."""
    return init_runtime(run.device, run.precision, parallel=getattr(run, "parallel", "fsdp"),
                        optimizer_offload=getattr(run, "optimizer_offload", False),
                        ema_on_cpu=getattr(run, "ema_on_cpu", False),
                        activation_checkpointing=getattr(run, "activation_checkpointing", False))


def shutdown(rt: Runtime) -> None:
    if rt.group and dist.is_initialized():
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


def mean_across_ranks(values: Mapping[str, float | torch.Tensor], rt: Runtime) -> dict[str, float | torch.Tensor]:
    """Each metric averaged over the processes. Values may be 0-dim tensors still being computed on the device:
    they stay tensors (no host sync; ``run_loop`` reads them when it writes a log line)."""
    if not rt.distributed or not values:
        return dict(values)
    keys = sorted(values)
    dev = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    t = torch.stack([torch.as_tensor(values[k]).detach().to(device=dev, dtype=torch.float64) for k in keys])
    dist.all_reduce(t)
    t = t / rt.world_size
    return {k: t[i] for i, k in enumerate(keys)}


def metric_value(value: float | torch.Tensor) -> float:
    """A logged metric as a Python float (reading a device tensor waits for it: done at log lines only)."""
    return float(value)


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


# -- EMA ---------------------------------------------------------------------------------------------
class EMA:
    """A float32 shadow of a model's trainable parameters: shadow = decay * shadow + (1 - decay) * param.

    Under FSDP2 each process keeps the shadow of its own shards only (a DTensor with the parameter's
    sharding: no memory beyond one float32 shard copy), on the shards' device or, with ``device="cpu"``,
    in host memory. Frozen parameters are not shadowed (their EMA is themselves).
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0, *, device: str | torch.device | None = None,
                 warmup: bool = False):
        self.decay, self.start, self.warmup = float(decay), int(start), bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    own = local(p.detach()).float().clone()
                    self.shadow[n] = shard_like(own.to(device) if device is not None else own, p)
        self._locals = [local(t) for t in self.shadow.values()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``step``: the number of optimiser steps taken so far (before ``start`` the shadow copies). With
        ``warmup`` the decay after ``start`` is min(decay, (1 + n) / (10 + n)), n = step - start: the shadow
        forgets the fast-moving early weights instead of keeping decay**n of the initial ones."""
        d = self.decay if step > self.start else 0.0
        if self.warmup and step > self.start:
            n = step - self.start
            d = min(d, (1.0 + n) / (10.0 + n))
        params = dict(model.named_parameters())
        groups: dict[torch.device, tuple[list, list]] = {}
        for name, dst in zip(self.shadow, self._locals):
            src = local(params[name].detach()).to(dst.device, torch.float32)
            g = groups.setdefault(dst.device, ([], []))
            g[0].append(dst)
            g[1].append(src)
        for dsts, srcs in groups.values():
            torch._foreach_mul_(dsts, d)
            torch._foreach_add_(dsts, srcs, alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, src in zip(self.shadow, self._locals):
            dst = local(params[name])
            dst.copy_(src.to(dst.device, dst.dtype))

    def model_copy(self, model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        self.copy_to(out)
        return out


# -- one trainable model -------------------------------------------------------------------------
class Trainable:
    """A model, its parallel wrapper (``training.distributed``), AdamW with linear warmup, gradient clipping
    and an optional EMA.

    The optimiser trains the parameters that require gradient -- the caller decides which (a whole model:
    ``load_dit(..., trainable=True)`` / ``requires_grad_(True)``; LoRA: only the adapters); Trainable never
    changes ``requires_grad``. Checkpoints go through ``training.sharded_checkpoint`` (``checkpoint_state`` /
    ``load_checkpoint``); ``full_state_dict`` gathers the weights for export.
    """

    def __init__(self, name: str, model: nn.Module, rt: Runtime, *, lr: float, betas=(0.9, 0.999),
                 weight_decay: float = 0.0, grad_clip: float = 1.0, warmup: int = 0,
                 ema_decay: float | None = None, ema_start: int = 0, ema_warmup: bool = False):
        self.name, self.model, self.rt = name, model, rt
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{name}: no parameter requires gradient; make the parts to train trainable first "
                             "(load_dit(..., trainable=True), model.requires_grad_(True) or LoRA adapters)")
        model.train()
        if rt.activation_checkpointing and hasattr(model, "set_activation_checkpointing"):
            # run.activation_checkpointing; "view" history: a trainer whose cache is rewritten between a
            # chunk's forward and its backward (rolling windows: Self-Forcing++) switches to "copy" itself
            model.set_activation_checkpointing(True)
        self._skeleton = meta_skeleton(model) if rt.fsdp else None  # for ema_model() of a sharded model
        self.wrapped = Wrapped(model, rt)
        self.sharded = self.wrapped.kind == "fsdp"
        self.mixed = self.sharded and mixed_precision(rt) is not None  # FSDP2 casts: no autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                           eps=1e-8)
        warm = max(int(warmup), 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.grad_clip = grad_clip
        self.ema = (EMA(model, ema_decay, ema_start, device="cpu" if rt.ema_on_cpu else None, warmup=ema_warmup)
                    if ema_decay is not None else None)
        self.updates = 0
        self._export: dict | None = None

    def autocast(self):
        """The forward context of this model's micro-steps: bf16 autocast, or none under FSDP2 mixed precision."""
        return contextlib.nullcontext() if self.mixed else self.rt.autocast()

    def step(self) -> float:
        """Clip, step, zero the gradients and update the EMA; returns the pre-clip gradient norm (a 0-dim tensor
        on the device: reading it waits for the step, so the loop reads it only when it logs)."""
        norm = clip_grad_norm(self.params, self.grad_clip if self.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            self.model.reshard()  # the root's gathered weights (kept between forwards) predate this step
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.model, self.updates)
        return norm.detach()

    # -- checkpoints (training.sharded_checkpoint) --------------------------------------------------
    def _state_dict_options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **kw)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, plain metadata) of this part: model weights that train (frozen ones come back from
        the model's own checkpoint), AdamW moments and the EMA, as this process's shards under FSDP2."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.sharded:
            self.model.reshard()
        msd, osd = get_state_dict(self.model, self.optimizer, options=self._state_dict_options())
        tensors = {f"model/{k}": v for k, v in msd.items()}
        other: dict[str, dict] = {}
        for fqn, state in osd["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{fqn}/{k}"] = v
                else:
                    other.setdefault(fqn, {})[k] = v
        if self.ema is not None:
            tensors.update({f"ema/{n}": t for n, t in self.ema.shadow.items()})
        meta = {"scheduler": self.scheduler.state_dict(), "updates": self.updates,
                "param_groups": osd["param_groups"], "optim_other": other,
                "ema": None if self.ema is None else {"decay": self.ema.decay, "start": self.ema.start,
                                                      "warmup": self.ema.warmup}}
        return tensors, meta

    def load_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Restore from what ``checkpoint_state`` gave, filled by the checkpoint reader."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        msd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        state: dict[str, dict] = {fqn: dict(d) for fqn, d in meta.get("optim_other", {}).items()}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                fqn, stat = k[len("optim/"):].rsplit("/", 1)
                state.setdefault(fqn, {})[stat] = v
        set_state_dict(self.model, self.optimizer, model_state_dict=msd,
                       optim_state_dict={"state": state, "param_groups": list(meta["param_groups"])},
                       options=self._state_dict_options(strict=False))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.updates = int(meta["updates"])
        if self.ema is not None:
            if meta.get("ema") is None:
                raise ValueError(f"{self.name}: the checkpoint has no EMA but this run keeps one")
            self.ema.decay, self.ema.start = float(meta["ema"]["decay"]), int(meta["ema"]["start"])
            self.ema.warmup = bool(meta["ema"].get("warmup", False))  # checkpoints before 2026-12-03: none
            with torch.no_grad():
                for n, t in self.ema.shadow.items():
                    if tensors[f"ema/{n}"] is not t:
                        local(t).copy_(local(tensors[f"ema/{n}"]))
        if self.sharded:
            self.model.reshard()

    # -- export ---------------------------------------------------------------------------------------
    def prepare_export(self) -> None:
        """Collective under FSDP2 over several processes: gather the EMA weights to rank 0 (host memory) so
        that ``ema_model()`` can then be called on rank 0 alone. ``run_loop`` calls it when a stage completes."""
        if self.sharded and self.rt.world_size > 1:
            self._export = full_state_dict(self, ema=True)

    def ema_model(self) -> nn.Module:
        """A detached eval copy carrying the EMA weights (or the live weights without EMA); on the CPU for a
        sharded model."""
        if not self.sharded:
            m = self.ema.model_copy(self.model) if self.ema is not None else copy.deepcopy(self.model)
            return m.eval().requires_grad_(False)
        state = self._export
        if state is None:
            if self.rt.world_size > 1:
                raise RuntimeError(f"{self.name}: ema_model() of a model sharded over {self.rt.world_size} "
                                   "processes needs prepare_export() on every process first")
            state = full_state_dict(self, ema=True)
        m = copy.deepcopy(self._skeleton)
        m.load_state_dict(state, strict=True, assign=True)
        return m.eval().requires_grad_(False)


def full_state_dict(trainable: Trainable, ema: bool = True) -> dict[str, torch.Tensor]:
    """The whole model's state dict as float CPU tensors on rank 0 (``{}`` on the other ranks), with the EMA
    weights in place of the live trained ones when ``ema`` and the part keeps an EMA.

    Collective under FSDP2 (every process must call it); what an export writes to one safetensors file."""
    rt, model = trainable.rt, trainable.model
    if trainable.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model.reshard()
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if rt.is_main else {}
    if ema and trainable.ema is not None:
        for name, t in trainable.ema.shadow.items():
            whole = full_tensor(t)
            if rt.is_main:
                sd[name] = whole.detach().to("cpu", torch.float32, copy=True)
    return sd if rt.is_main else {}


def accumulate(rt: Runtime, trainable: Trainable, accum: int,
               micro_loss: Callable[[int], tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """Run ``accum`` micro-steps (forward under the part's autocast, backward of loss/accum), reducing
    gradients across processes only in the last one.

    Returns the mean of each metric over micro-steps (local to this process; tensors stay tensors).
    """
    sums: dict[str, float | torch.Tensor] = {}
    for m in range(accum):
        sync = m == accum - 1
        with (contextlib.nullcontext() if sync else trainable.wrapped.no_sync()):
            with trainable.autocast():
                loss, metrics = micro_loss(m)
            (loss / accum).backward()
        for k, v in metrics.items():  # device tensors stay on the device: no host sync per step
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            sums[k] = sums.get(k, 0.0) + v / accum
    return sums


# -- logs --------------------------------------------------------------------------------------------
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
            for k, v in metrics.items():  # kept as they come (device tensors): read at the log line only
                window.setdefault(k, []).append(v)
            if (step + 1) % log_every == 0 or last or step == start:
                # each metric averaged over the steps since the last line (sparse ones, e.g. generator
                # updates every critic_ratio steps, over the steps that had them)
                means = {k: sum(metric_value(x) for x in v) / len(v) for k, v in window.items()}
                log.write({"stage": stage, "step": step + 1, "time": round(time.time() - t0, 3), **means})
                window = {}
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:3]}, refresh=False)
            if bar is not None:
                bar.update(1)
            if stop_after is not None and done >= stop_after and not last:
                return LoopResult(step + 1, False)
            # the budget is the same on every rank: without one, no collective (its .item() is a host sync per step)
            out_of_time = time_budget_s > 0 and bool(broadcast_int(int(time.time() - t0 > time_budget_s), rt))
            if (step + 1) % checkpoint_every == 0 or last or out_of_time:
                ckpt.save(step + 1, parts)
            if out_of_time and not last:
                log.write({"stage": stage, "step": step + 1, "time": round(time.time() - t0, 3),
                           "note": f"time budget of {time_budget_s:.0f} s reached"})
                _prepare_export(parts)
                return LoopResult(step + 1, True)
    finally:
        if bar is not None:
            bar.close()
    _prepare_export(parts)
    return LoopResult(max(total_steps, start), True)


def _prepare_export(parts: Mapping[str, object]) -> None:
    """A completed stage exports on rank 0: gather what sharded parts need for it (collective)."""
    for part in parts.values():
        prepare = getattr(part, "prepare_export", None)
        if prepare is not None:
            prepare()
