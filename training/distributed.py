"""How a model is spread over the processes of a run: FSDP2 (default), DDP, or one plain process.

``run.parallel = "fsdp"`` (default): ``torch.distributed.fsdp.fully_shard`` on every transformer block
(``model.blocks[i]``) and on the root. Each process holds 1/world of every float32 master weight, gradient
and AdamW moment; a block's weights are all-gathered just before it runs and freed after it (again in
backward). With ``run.precision = "bf16"`` on CUDA the gathered weights are bf16
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: bf16 compute, float32 gradient reduction,
float32 master weights and optimiser state; no autocast). ``run.optimizer_offload = true`` adds
``CPUOffloadPolicy``: the float32 shards, their gradients and the AdamW state live in host memory, the
optimiser step runs on the CPU, and only the gathered compute-dtype weights of the running block occupy
the GPU. A single process that asks for offload joins a 1-process group (in-memory store, no network)
so that the same FSDP2 code applies; a single process without offload runs the plain model (autocast
for bf16), which is what FSDP2 would compute on one process, without its hooks.

``run.parallel = "ddp"``: the previous scheme (one replica per process, DDP all-reduce); no offload.

The trainer calls a model through methods other than ``forward``: the sampler's ``forward_chunk`` and
``encode_text``. They are registered with ``register_fsdp_forward_method`` on the root, so its weights are
gathered for them. The text K/V of every layer are computed once per prompt by ``encode_text`` outside the
blocks' ``forward``; ``_route_text_kv`` runs each block's ``cross_attn.context_kv`` under that block's FSDP
hooks (a registered method of the block), so the block's weights are gathered for it and gathered again in
backward for the gradient that flows back into the text path.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("fsdp", "ddp")
ROOT_METHODS = ("forward_chunk", "encode_text")


def _fsdp():
    from torch.distributed import fsdp

    return fsdp


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise); shares storage."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective: every process of its mesh must call it)."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor

    loc = t.to_local()
    mesh = t.device_mesh
    if loc.device.type != mesh.device_type:  # a CPU shard (offload, EMA on the CPU) of a CUDA mesh
        t = DTensor.from_local(loc.to(mesh.device_type), mesh, t.placements, shape=t.shape, stride=t.stride())
    return t.full_tensor()


def shard_like(local_tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this process's part of a tensor shaped like ``param``) as a DTensor with ``param``'s
    sharding, kept on its own device (e.g. a CPU EMA shard of a CUDA model); plain tensors pass through."""
    if not is_dtensor(param):
        return local_tensor
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import _from_local_no_grad

        return _from_local_no_grad(local_tensor, param._spec)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other torch versions
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local_tensor.to(param.device), param.device_mesh, param.placements,
                                  shape=param.shape, stride=param.stride())


def mixed_precision(rt):
    """FSDP2's policy for ``run.precision`` (None: float32 throughout). Forward inputs keep their dtype
    (timesteps must not be rounded to bf16); the model casts activations to its weights' dtype itself."""
    if rt.precision != "bf16":
        return None
    return _fsdp().MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)


def _owned_kv(context_kv, c: torch.Tensor):
    """``context_kv(c)`` with outputs that are not views when they carry gradient: FSDP2 hooks a module's
    outputs for backward, and a hook on a view is lost if the view is ever modified in place."""
    return tuple(t.clone() if t.requires_grad and t._base is not None else t for t in context_kv(c))


def _route_text_kv(model: nn.Module) -> None:
    """Run every block's ``cross_attn.context_kv`` under the block's FSDP hooks (see the module doc)."""
    fsdp = _fsdp()
    for blk in getattr(model, "blocks", ()):
        attn = getattr(blk, "cross_attn", None)
        if attn is None or not hasattr(attn, "context_kv") or not isinstance(blk, fsdp.FSDPModule):
            continue
        blk.text_kv = functools.partial(_owned_kv, attn.context_kv)
        fsdp.register_fsdp_forward_method(blk, "text_kv")
        attn.context_kv = blk.text_kv                 # the instance now calls it through the block's hooks


def shard_model(model: nn.Module, rt, *, offload: bool = False) -> nn.Module:
    """FSDP2 on every ``model.blocks[i]`` and the root (in place; returns ``model``). ``offload``: keep the
    blocks' float32 shards, gradients and optimiser state in host memory (``CPUOffloadPolicy``); the root's
    own weights (patch/text/time embeddings and head, ~2 % of Wan) stay on the device, so ``model.device``
    is still the GPU that runs it."""
    fsdp = _fsdp()
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks to shard over; FSDP2 shards transformer blocks")
    kw = {}
    mp = mixed_precision(rt)
    if mp is not None:
        kw["mp_policy"] = mp
    block_kw = dict(kw)
    if offload:
        block_kw["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=rt.device.type == "cuda")
    for blk in blocks:
        fsdp.fully_shard(blk, reshard_after_forward=True, **block_kw)
    _shard_root(model, **kw)
    return model


def _shard_root(model: nn.Module, **kw) -> None:
    # The root stays gathered after its forward (until backward): a root method called inside another one
    # (encode_text inside forward) must not free the weights the outer call is still using. It is small.
    fsdp = _fsdp()
    fsdp.fully_shard(model, reshard_after_forward=False, **kw)
    for name in ROOT_METHODS:
        if hasattr(model, name):
            fsdp.register_fsdp_forward_method(model, name)
    _route_text_kv(model)


def shard_frozen(model: nn.Module, rt) -> nn.Module:
    """A frozen model (the real score) sharded block by block in its own dtype when the run uses FSDP over
    several processes (each then holds 1/world of it); otherwise, or when it is sharded already, returned
    as it is."""
    if not (rt.fsdp and rt.world_size > 1) or isinstance(model, _fsdp().FSDPModule):
        return model
    model.requires_grad_(False)
    for blk in model.blocks:
        _fsdp().fully_shard(blk, reshard_after_forward=True)
    _shard_root(model)
    return model


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` to a total 2-norm of at most ``max_norm`` (inf: measure only);
    returns the norm before clipping (a 0-dim float32 tensor, no host sync).

    Works on plain tensors and on FSDP2 DTensor gradients alike, also when the shards sit on several devices
    (CPU-offloaded blocks, root on the GPU): every process sums the squares of its own shards, one
    all-reduce adds them up (sharded gradients are disjoint; DDP/plain gradients are whole on every process).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = is_dtensor(grads[0])
    locals_ = [local(g) for g in grads]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in locals_:
        by_device.setdefault(g.device, []).append(g)
    home = next((d for d in by_device if d.type != "cpu"), next(iter(by_device)))
    total_sq = torch.zeros((), dtype=torch.float32, device=home)
    for dev, gs in by_device.items():
        norms = torch._foreach_norm(gs, 2.0)
        total_sq += torch.stack([n.float() for n in norms]).square().sum().to(home)
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_sq)
    total = total_sq.sqrt()
    if max_norm < float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for dev, gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(dev))
    return total


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory): what ``load_state_dict(...,
    assign=True)`` turns into a plain model again. Buffers and other attributes are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


# -- DDP ---------------------------------------------------------------------------------------------
class _Dispatch(nn.Module):
    """Lets DDP's forward run any method of the model (``forward`` or ``forward_chunk``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        fn = self.model if method == "forward" else getattr(self.model, method)
        return fn(*args, **kwargs)


class Wrapped:
    """A CausalWanModel as the trainer calls it: plain, under DDP, or sharded by FSDP2 (in place).

    It exposes what the sampler functions use (``forward_chunk``, ``config``, ``device``, ``dtype``,
    ``rope``, ``encode_text``), so ``sf_model.sampler.denoise_chunk(wrapped, ...)`` runs the real sampler
    code. Under FSDP2 the model itself carries the hooks (calling ``model.forward_chunk`` directly is the same);
    under DDP every call is routed through the DDP module. ``no_sync()``: no gradient reduction in the
    micro-steps before the last one of an accumulation.
    """

    def __init__(self, model: nn.Module, rt):
        self.module = model
        self.ddp = None
        self.kind = "plain"
        if rt.fsdp:
            shard_model(model, rt, offload=rt.optimizer_offload)
            self.kind = "fsdp"
        elif rt.distributed:
            if rt.parallel != "ddp":
                raise ValueError(f"run.parallel = {rt.parallel!r} over {rt.world_size} processes needs a process "
                                 "group (init_runtime)")
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(_Dispatch(model), device_ids=ids,
                                                           broadcast_buffers=False)
            self.kind = "ddp"
        self._sync_pointless = rt.world_size == 1  # one FSDP process: nothing to reduce, keep grads sharded

    def _call(self, method: str, *args, **kwargs):
        if self.ddp is None:
            fn = self.module if method == "forward" else getattr(self.module, method)
            return fn(*args, **kwargs)
        return self.ddp(method, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._call("forward", *args, **kwargs)

    def forward_chunk(self, *args, **kwargs):
        return self._call("forward_chunk", *args, **kwargs)

    @contextlib.contextmanager
    def _fsdp_no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def no_sync(self):
        if self.ddp is not None:
            return self.ddp.no_sync()
        if self.kind == "fsdp" and not self._sync_pointless:
            return self._fsdp_no_sync()
        return contextlib.nullcontext()

    def __getattr__(self, name):  # config, device, dtype, rope, encode_text, latent_grid ...
        return getattr(self.__dict__["module"], name)


def init_group(device: torch.device, world: int, rank: int) -> None:
    """Join (or, for one process, create in memory) the default process group: gloo for CPU tensors and
    nccl for CUDA ones on GPUs (CPU-offloaded shards and EMA reduce through gloo)."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
