"""Trainer checkpoints: ``torch.distributed.checkpoint`` (DCP) step folders with an atomic ``latest`` pointer.

Layout of a stage folder::

    <stage>/checkpoint/latest                      the committed checkpoint's folder name (atomic replace)
    <stage>/checkpoint/step_000000120/.metadata     DCP: which shard of which tensor is where
    <stage>/checkpoint/step_000000120/__<r>_0.distcp  the tensors process r wrote (its own shards)
    <stage>/checkpoint/step_000000120/meta.pt       step, plain per-part state (scheduler, optimiser groups,
                                                    EMA decay), ``extra``; written last
    <stage>/checkpoint/step_000000100/              the previous checkpoint, kept as the fallback

Every process writes its own shards of the trained weights, AdamW moments and EMA (``get_state_dict``:
FSDP2 DTensors, or whole tensors for plain/DDP models); DCP records the global shape of each, so a run
resumes on any number of processes (``set_state_dict`` reshards). Frozen parameters are not saved (they
come back from the model's own checkpoint).

A save: stale folder of the same step removed -> DCP save (files fsynced) -> ``meta.pt`` (atomic) ->
``latest`` replaced atomically -> every folder but this one and the previous removed. A kill at any moment
leaves ``latest`` naming a complete checkpoint. Loading reads ``latest``'s folder and falls back, with a
warning, to the older complete ones when it is damaged (truncated, random bytes, missing files).

Nothing is unpickled that could run code: ``meta.pt`` is read with ``torch.load(weights_only=True)``;
DCP's ``.metadata`` (a pickle) is read with an unpickler that builds only DCP's metadata dataclasses,
torch sizes/dtypes/layouts and paths; tensors are read by DCP with ``weights_only=True``; and pickled
non-tensor entries (which DCP would load with ``weights_only=False``) are refused.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import re
import shutil
import sys
import warnings
from typing import Mapping

import torch
import torch.distributed as dist

FORMAT = "self_forcing.trainer/2"
POINTER = "latest"
META = "meta.pt"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


# -- single files ----------------------------------------------------------------------------------------
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


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
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
    """The informative part of a load error: the restricted unpickler's own line, or the first sentence."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or [type(e).__name__])[0].split(". ")[0].rstrip(".")


def read_checkpoint(path: str) -> dict:
    """A file of plain trainer state ({step, parts, extra}) read with ``torch.load(weights_only=True)``.

    Such files hold only tensors and plain containers (dict/list/tuple/int/float/str/bool/None), so the
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


# -- DCP, read safely -----------------------------------------------------------------------------------
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: DCP's own dataclasses and enums, torch.Size, dtypes, layouts,
    paths. Any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module.split(".")[0] == "pathlib" and name in _PATHS and module in sys.modules:
            return getattr(sys.modules[module], name)
        if module.startswith("torch.distributed.checkpoint") and module in sys.modules:
            obj = getattr(sys.modules[module], name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def read_dcp_metadata(path: str):
    """The ``Metadata`` of a DCP folder, unpickled with ``_MetadataUnpickler``; ValueError when refused or
    unreadable."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise ValueError(f"{path} is incomplete (no .metadata)") from None
    except Exception as e:  # noqa: BLE001 - refused globals, truncated or random bytes
        raise ValueError(f"{file} is damaged or not DCP metadata ({type(e).__name__}: {_reason(e)}); it is not "
                         "unpickled any further, since that could run code") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise ValueError(f"{file} is not DCP metadata")
    return md


def _planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's loader, refusing pickled entries (DCP reads them with ``weights_only=False``)."""

        def load_bytes(self, read_item, value):
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn} is a pickled object; trainer "
                             "checkpoints hold tensors only, and pickles are not loaded (they could run code)")

    return TensorsOnlyLoadPlanner()


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
    return ctx


def dcp_save(state: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    ctx = _quiet()
    try:
        dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    finally:
        ctx.__exit__(None, None, None)


def _load_reason(e: BaseException) -> str:
    """The first rank's own error inside a ``CheckpointException`` (or the error itself), in one line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, err = sorted(failures.items())[0]
        if isinstance(err, tuple) and err and isinstance(err[0], BaseException):  # (exception, traceback)
            err = err[0]
        inner = getattr(err, "__cause__", None) or err
        return f"rank {rank}: {type(inner).__name__}: {_reason(inner)}"
    return f"{type(e).__name__}: {_reason(e)}"


def _LOAD_ERRORS() -> tuple:
    """What a failed DCP load raises: ``CheckpointException`` (a BaseException, not an Exception) gathering
    every rank's error, or the error itself."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def dcp_load(state: dict, path: str, *, local_only: bool = False) -> None:
    """Fill the tensors of ``state`` (DTensors: this process's shards) in place from the folder ``path``."""
    import torch.distributed.checkpoint as dcp

    ctx = _quiet()
    try:
        dcp.load(state, checkpoint_id=path, planner=_planner(), no_dist=local_only or not dist.is_initialized())
    finally:
        ctx.__exit__(None, None, None)


# -- the folder ------------------------------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"step_{int(step):09d}"


def _step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


class _Damaged(ValueError):
    """This checkpoint folder cannot be read (the next older one may be)."""


def candidates(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(step folders to try, newest committed first; problems met on the way). The pointer names the
    committed checkpoint; complete folders newer than it were never committed and are skipped."""
    if not os.path.isdir(root):
        return [], []
    complete = sorted((n for n in os.listdir(root) if _step_of(n) is not None
                       and os.path.isfile(os.path.join(root, n, META))), key=_step_of, reverse=True)
    pointer = os.path.join(root, POINTER)
    problems: list[tuple[str, str]] = []
    if os.path.isfile(pointer):
        try:
            with open(pointer) as fh:
                name = fh.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            name = f"<{type(e).__name__}>"
        if _step_of(name) is not None:
            older = [n for n in complete if _step_of(n) < _step_of(name)]
            return [os.path.join(root, n) for n in [name, *older]], problems
        problems.append((pointer, f"{pointer} does not name a checkpoint folder"))
    return [os.path.join(root, n) for n in complete], problems


def _read_meta(path: str) -> dict:
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        raise _Damaged(f"{path} is incomplete or missing (no {META})")
    try:
        meta = read_checkpoint(file)
    except ValueError as e:
        raise _Damaged(str(e)) from None
    if meta.get("format") != FORMAT:
        raise _Damaged(f"{file} is not a {FORMAT} checkpoint")
    return meta


def _metadata(path: str):
    try:
        return read_dcp_metadata(path)
    except ValueError as e:
        raise _Damaged(str(e)) from None


def _tensor_keys(md) -> dict:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


class Checkpointer:
    """Sharded, atomic, resumable checkpoints of a stage's named parts in ``<directory>/checkpoint``.

    A part is a ``Trainable`` (``checkpoint_state()`` -> (tensors, plain meta); ``load_checkpoint``) or any
    object with plain ``state_dict``/``load_state_dict`` (kept in ``meta.pt``). ``extra`` must hold plain
    values (what ``torch.load(weights_only=True)`` reads back).
    """

    def __init__(self, directory: str, rt):
        self.dir, self.rt = directory, rt
        self.root = os.path.join(directory, "checkpoint")
        self.pointer = os.path.join(self.root, POINTER)
        self._keep: str | None = None  # the last good checkpoint: kept as the fallback at the next save

    def exists(self) -> bool:
        folders, problems = candidates(self.root)
        return bool(folders or problems)

    def save(self, step: int, parts: Mapping[str, object], extra: Mapping | None = None) -> None:
        name = step_name(step)
        path = os.path.join(self.root, name)
        if self.rt.is_main:
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(path):  # a killed save of this step, or the damaged checkpoint we fell back from
                shutil.rmtree(path)
        self.rt.barrier()
        tensors, metas = {}, {}
        for pname, part in parts.items():
            if hasattr(part, "checkpoint_state"):
                t, m = part.checkpoint_state()
                tensors.update({f"{pname}/{k}": v for k, v in t.items()})
                metas[pname] = m
            else:
                metas[pname] = {"state_dict": part.state_dict()}
        dcp_save(tensors, path)
        if self.rt.is_main:
            atomic_torch_save({"format": FORMAT, "step": int(step), "world_size": self.rt.world_size,
                               "parts": metas, "extra": dict(extra or {})}, os.path.join(path, META))
            write_text_atomic(self.pointer, name + "\n")
            for other in os.listdir(self.root):
                if _step_of(other) is not None and other not in (name, self._keep):
                    shutil.rmtree(os.path.join(self.root, other), ignore_errors=True)
        self._keep = name
        self.rt.barrier()

    def load(self, parts: Mapping[str, object]) -> tuple[int, dict]:
        """Restore every part from the newest readable checkpoint; returns (step, extra). Incomplete folders
        (a killed save) that are not the committed one are removed."""
        folders, problems = candidates(self.root)
        if self.rt.is_main and os.path.isdir(self.root):
            keep = {os.path.basename(f) for f in folders}
            for n in os.listdir(self.root):
                if (_step_of(n) is not None and n not in keep) or n.startswith(POINTER + ".tmp"):
                    target = os.path.join(self.root, n)
                    shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
        self.rt.barrier()
        problems = list(problems)
        for path in folders:
            try:
                step, extra = self._load_from(path, parts)
            except _Damaged as e:
                problems.append((path, str(e)))
                continue
            if problems:
                warnings.warn(f"{problems[0][1]}; resuming from the previous checkpoint {path} (step {step}) "
                              "instead", stacklevel=3)
            self._keep = os.path.basename(path)
            return step, extra
        raise ValueError("cannot resume: " + "; ".join(m for _, m in problems)
                         + f". Delete {self.root} to restart this stage from step 0")

    def _load_from(self, path: str, parts: Mapping[str, object]) -> tuple[int, dict]:
        meta = _read_meta(path)
        missing = set(parts) - set(meta["parts"])
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; it was written by another stage or config")
        stored = _tensor_keys(_metadata(path))
        request, plain = {}, {}
        for pname, part in parts.items():
            if not hasattr(part, "checkpoint_state"):
                plain[pname] = part
                continue
            tensors, _ = part.checkpoint_state()
            for k, v in tensors.items():
                key = f"{pname}/{k}"
                if key in stored:
                    request[key] = v
                elif not k.startswith("optim/"):  # moments of parameters that never had a gradient are absent
                    raise ValueError(f"{path} has no {key}; it was written by another stage, model or config")
        if request:
            try:
                dcp_load(request, path)
            except _LOAD_ERRORS() as e:  # DCP raises CheckpointException wrapping each rank's error
                raise _Damaged(f"{path} is damaged ({_load_reason(e)})") from None
        for pname, part in parts.items():
            if pname in plain:
                part.load_state_dict(meta["parts"][pname]["state_dict"])
                continue
            prefix = pname + "/"
            part.load_checkpoint({k[len(prefix):]: v for k, v in request.items() if k.startswith(prefix)},
                                 meta["parts"][pname])
        return int(meta["step"]), dict(meta.get("extra", {}))


def read_full_checkpoint(directory: str) -> dict:
    """A stage's newest readable checkpoint as whole CPU tensors, in one process (tools, tests, continuing
    from another stage's critic): ``{"step", "extra", "path", "parts": {name: {"model": {fqn: t},
    "optimizer": {"state": {fqn: {stat: t}}, "param_groups"}, "ema": {"decay", "start", "shadow"} | None,
    "scheduler", "updates"}}}``. ``directory``: the stage folder (or its ``checkpoint`` folder).

    Collective-free: every caller reads the whole checkpoint itself. ValueError when none is readable."""
    root = directory if os.path.basename(os.path.normpath(directory)) == "checkpoint" else \
        os.path.join(directory, "checkpoint")
    folders, problems = candidates(root)
    for path in folders:
        try:
            meta = _read_meta(path)
            stored = _tensor_keys(_metadata(path))
            state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()}
            try:
                dcp_load(state, path, local_only=True)
            except _LOAD_ERRORS() as e:
                raise _Damaged(f"{path} is damaged ({_load_reason(e)})") from None
        except _Damaged as e:
            problems.append((path, str(e)))
            continue
        parts = {}
        for pname, pm in meta["parts"].items():
            if "state_dict" in pm:
                parts[pname] = pm["state_dict"]
                continue
            part = {"model": {}, "optimizer": {"state": {}, "param_groups": pm["param_groups"]},
                    "scheduler": pm["scheduler"], "updates": pm["updates"],
                    "ema": None if pm["ema"] is None else {**pm["ema"], "shadow": {}}}
            for fqn, d in pm.get("optim_other", {}).items():
                part["optimizer"]["state"].setdefault(fqn, {}).update(d)
            parts[pname] = part
        for key, t in state.items():
            pname, kind, rest = key.split("/", 2)
            part = parts[pname]
            if kind == "model":
                part["model"][rest] = t
            elif kind == "ema":
                part["ema"]["shadow"][rest] = t
            elif kind == "optim":
                fqn, stat = rest.rsplit("/", 1)
                part["optimizer"]["state"].setdefault(fqn, {})[stat] = t
        return {"step": int(meta["step"]), "extra": dict(meta.get("extra", {})), "path": path, "parts": parts}
    raise ValueError(f"no readable trainer checkpoint in {root}"
                     + ("".join(f"; {m}" for _, m in problems)))
