"""The prompt store: a prompt list encoded once by the text encoder, read lazily while training.

A store is a folder::

    manifest.json            written last: the store is complete (format, encoder, dim, count, shards + sha256)
    plan.json                written first: what is being encoded (lets an interrupted encode resume)
    prompts.jsonl            the prompts' text, one JSON string a line, in store order
    negative.safetensors     the negative prompt (the default unconditional context of the real score's CFG)
    shard_00000.safetensors  ``shard_size`` prompts: ``embeds`` [their tokens together, dim] (bf16, no
                             padding) and ``offsets`` [count + 1] (prompt j is rows offsets[j]:offsets[j+1])

Every file is written to ``NAME.tmp`` and renamed when complete, so an interrupted ``encode_store`` leaves
finished shards only; running it again with the same prompts and encoder encodes the missing ones.

``PromptStore`` opens shards on demand (``safe_open``, memory-mapped) and reads only the rows of the prompts a
batch asks for; padding to the model's ``text_len`` happens per batch. Host memory is proportional to the
batch, not to the store (46k Wan prompts padded to 512 x 4096 in float32 would be ~370 GiB).

``EmbeddingFiles`` gives the same lazy interface over a folder of the nodes' 'Save Text Embeddings' files.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import math
import os
import struct
from collections import OrderedDict
from typing import Callable, Sequence

import torch

STORE_FORMAT = "self_forcing.prompt_store"
STORE_VERSION = 1
MANIFEST, PLAN, TEXTS, NEGATIVE_FILE = "manifest.json", "plan.json", "prompts.jsonl", "negative.safetensors"
DEFAULT_SHARD_SIZE = 512

# Wan2.1's default negative prompt, the unconditional text of Self Forcing's DMD real score
# (configs/self_forcing_dmd.yaml `negative_prompt`) and of its ODE-pair generation.
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                   "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

Encoder = Callable[[list], Sequence[torch.Tensor]]


class StoreError(ValueError):
    pass


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _text_lines(texts: Sequence[str]) -> bytes:
    return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: str, data: bytes) -> None:
    from ..sf_model.checkpoint import publish

    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    publish(tmp, path)


def _pack(rows: Sequence[torch.Tensor], meta: dict) -> bytes:
    """Rows [n_i, dim] -> the bytes of a shard file (embeds bf16 concatenated, offsets, JSON metadata)."""
    from safetensors.torch import save

    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r.shape[0])
    embeds = torch.cat([r.to(torch.bfloat16) for r in rows]).contiguous()
    return save({"embeds": embeds, "offsets": torch.tensor(offsets, dtype=torch.int64)},
                metadata={STORE_FORMAT: json.dumps(meta, ensure_ascii=False)})


def _shard_meta(path: str) -> dict | None:
    """The metadata of a finished shard, or None when the file is unreadable (then it is encoded again)."""
    try:
        f = TensorFile(path)
        try:
            meta = json.loads(f.metadata[STORE_FORMAT])
            meta["dim"] = f.shape("embeds")[1]
            meta["tokens"] = int(f.rows("offsets", f.shape("offsets")[0] - 1, f.shape("offsets")[0]).item())
        finally:
            f.close()
        return meta
    except Exception:  # noqa: BLE001 - any damage means "encode this shard again"
        return None


def _check_rows(rows, texts, dim: int | None, max_tokens: int | None) -> list[torch.Tensor]:
    if len(rows) != len(texts):
        raise StoreError(f"the encoder returned {len(rows)} embeddings for {len(texts)} prompts")
    out = []
    for text, r in zip(texts, rows):
        if not isinstance(r, torch.Tensor) or r.ndim != 2 or r.shape[0] < 1:
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise StoreError(f"the encoder must return one [tokens >= 1, dim] tensor per prompt, got {shape} "
                             f"for {text[:60]!r}")
        if dim is not None and r.shape[1] != dim:
            raise StoreError(f"the encoder returned width {r.shape[1]} for {text[:60]!r}; this store is {dim} wide")
        dim = r.shape[1]
        out.append(r[:max_tokens].detach().to("cpu", torch.bfloat16) if max_tokens else
                   r.detach().to("cpu", torch.bfloat16))
    return out


def encode_store(prompts: Sequence[str], out_dir: str, encoder: Encoder, *, encoder_id: str | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 16, negative: str | None = NEGATIVE_PROMPT,
                 max_tokens: int | None = None, overwrite: bool = False, progress: bool = True) -> "PromptStore":
    """Encode ``prompts`` with ``encoder`` (list[str] -> one [tokens, dim] tensor per prompt, unpadded) into a
    store at ``out_dir``; resumes an interrupted encode of the same prompts and encoder. ``negative``: the text
    stored as the unconditional context (None: none). Returns the opened store."""
    from ..sf_model.progress import progress_bar

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise StoreError("no prompts to encode")
    if shard_size < 1 or batch_size < 1:
        raise StoreError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    encoder_id = encoder_id or getattr(encoder, "name", None) or type(encoder).__name__
    texts_bytes = _text_lines(prompts)
    plan = {"format": STORE_FORMAT, "version": STORE_VERSION, "encoder": encoder_id, "count": len(prompts),
            "shard_size": shard_size, "prompts_sha256": _sha256(texts_bytes), "negative": negative,
            "max_tokens": max_tokens}
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, PLAN)
    if os.path.exists(plan_path) or os.path.exists(os.path.join(out_dir, MANIFEST)):
        old = _read_json(plan_path) if os.path.exists(plan_path) else None
        if old != plan:
            if not overwrite:
                diff = sorted(k for k in plan if old is None or old.get(k) != plan[k])
                raise StoreError(f"{out_dir} already holds a prompt store of other input (differs in {diff}); "
                                 "choose another folder, or overwrite it")
            _remove_store_files(out_dir)
    if os.path.exists(os.path.join(out_dir, MANIFEST)) and os.path.exists(plan_path):
        return PromptStore(out_dir)  # already complete
    for tmp in glob.glob(os.path.join(out_dir, "*.tmp")):
        os.remove(tmp)  # an interrupted write
    if not os.path.exists(plan_path):
        _write_atomic(plan_path, json.dumps(plan, ensure_ascii=False, indent=1).encode("utf-8"))
    texts_path = os.path.join(out_dir, TEXTS)
    if not os.path.exists(texts_path) or file_sha256(texts_path) != plan["prompts_sha256"]:
        _write_atomic(texts_path, texts_bytes)

    n_shards = -(-len(prompts) // shard_size)
    dim = None
    done: dict[int, dict] = {}
    for k in range(n_shards):
        path = os.path.join(out_dir, shard_name(k))
        if not os.path.exists(path):
            continue
        start = k * shard_size
        texts = prompts[start:start + shard_size]
        meta = _shard_meta(path)
        if (meta is not None and meta.get("start") == start and meta.get("count") == len(texts)
                and meta.get("texts_sha256") == _sha256(_text_lines(texts)) and dim in (None, meta["dim"])):
            dim = meta["dim"]
            done[k] = meta
    neg_path = os.path.join(out_dir, NEGATIVE_FILE)
    if negative is not None:
        meta = _shard_meta(neg_path) if os.path.exists(neg_path) else None
        if meta is None or meta.get("text") != negative or dim not in (None, meta["dim"]):
            (row,) = _check_rows(encoder([negative]), [negative], dim, max_tokens)
            _write_atomic(neg_path, _pack([row], {"text": negative, "encoder": encoder_id}))
            dim = row.shape[1]
        else:
            dim = meta["dim"]

    todo = [k for k in range(n_shards) if k not in done]
    bar = progress_bar(len(prompts), "encode prompts", "prompt",
                       initial=len(prompts) - sum(len(prompts[k * shard_size:(k + 1) * shard_size]) for k in todo),
                       enabled=progress)
    try:
        for k in todo:
            start = k * shard_size
            texts = prompts[start:start + shard_size]
            rows: list[torch.Tensor] = []
            for b in range(0, len(texts), batch_size):
                chunk = texts[b:b + batch_size]
                with torch.inference_mode():
                    rows += _check_rows(encoder(list(chunk)), chunk, dim, max_tokens)
                dim = rows[0].shape[1]
                if bar is not None:
                    bar.update(len(chunk))
            meta = {"start": start, "count": len(texts), "texts_sha256": _sha256(_text_lines(texts)),
                    "encoder": encoder_id}
            _write_atomic(os.path.join(out_dir, shard_name(k)), _pack(rows, meta))
    finally:
        if bar is not None:
            bar.close()

    shards = []
    for k in range(n_shards):
        path = os.path.join(out_dir, shard_name(k))
        meta = _shard_meta(path)
        shards.append({"file": shard_name(k), "start": meta["start"], "count": meta["count"],
                       "tokens": meta["tokens"], "bytes": os.path.getsize(path), "sha256": file_sha256(path),
                       "texts_sha256": meta["texts_sha256"]})
    manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "encoder": encoder_id, "dim": dim,
                "dtype": "bfloat16", "count": len(prompts), "shard_size": shard_size, "max_tokens": max_tokens,
                "tokens": sum(s["tokens"] for s in shards),
                "texts": {"file": TEXTS, "sha256": plan["prompts_sha256"]}, "shards": shards, "negative": None}
    if negative is not None:
        manifest["negative"] = {"file": NEGATIVE_FILE, "text": negative, "tokens": _shard_meta(neg_path)["tokens"],
                                "bytes": os.path.getsize(neg_path), "sha256": file_sha256(neg_path)}
    _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, ensure_ascii=False, indent=1).encode())
    return PromptStore(out_dir)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: cannot be read as JSON ({e})") from e


def _remove_store_files(out_dir: str) -> None:
    """Delete the files a store consists of (and nothing else)."""
    names = [MANIFEST, PLAN, TEXTS, NEGATIVE_FILE]
    paths = [os.path.join(out_dir, n) for n in names] + glob.glob(os.path.join(out_dir, "shard_*.safetensors"))
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


class TensorFile:
    """A safetensors file read with ``os.preadv``: the header once, then exactly the bytes of the rows asked
    for (no memory map, so no read-ahead of neighbouring prompts lands in the process's memory)."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32}

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", self._read(0, 8))
            if n > 100_000_000 or n + 8 > os.fstat(self.fd).st_size:
                raise StoreError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(bytes(self._read(8, n)))
        except BaseException:
            os.close(self.fd)
            raise
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors, self.base = header, 8 + n

    def _read(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise StoreError(f"{self.path}: file ends early (wanted {size} bytes at {offset})")
            done += got
        return buf

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor ``name`` (along its first dimension)."""
        info = self.tensors[name]
        if info["dtype"] not in self.DTYPES:
            raise StoreError(f"{self.path}: tensor {name!r} of unsupported dtype {info['dtype']}")
        dtype, shape = self.DTYPES[info["dtype"]], info["shape"]
        if not 0 <= start <= stop <= shape[0]:
            raise StoreError(f"{self.path}: rows {start}:{stop} of {name!r} of shape {shape}")
        per_row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        if stop == start:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        buf = self._read(self.base + info["data_offsets"][0] + start * per_row, (stop - start) * per_row)
        return torch.frombuffer(buf, dtype=dtype).view(stop - start, *shape[1:])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Shards:
    """Open shard files (at most ``max_open``, least recently used closed) with their offsets."""

    def __init__(self, max_open: int):
        self.max_open, self.open = max_open, OrderedDict()

    def get(self, path: str):
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        f = TensorFile(path)
        entry = (f, f.rows("offsets", 0, f.shape("offsets")[0]).tolist())
        self.open[path] = entry
        while len(self.open) > self.max_open:
            self.open.popitem(last=False)[1][0].close()
        return entry


class _Rows:
    """What the stores share: padded float batches of a few rows, and the count of embedding bytes read."""

    dim: int
    bytes_read: int = 0

    def embedding(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def negative(self) -> torch.Tensor | None:
        return None

    def batch(self, indices, text_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """[B, text_len, dim] of the prompts ``indices``: their tokens, then zero rows (truncated past
        ``text_len``). Built on the host in the stored dtype, converted to ``dtype`` on ``device``."""
        rows = [self.embedding(int(i)) for i in indices]
        out = torch.zeros(len(rows), text_len, self.dim, dtype=rows[0].dtype if rows else torch.bfloat16)
        for b, r in enumerate(rows):
            n = min(r.shape[0], text_len)
            out[b, :n] = r[:n]
        return out.to(device=device if device is not None else "cpu").to(dtype)

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t


class PromptStore(_Rows):
    """A finished store, read lazily. ``len(store)`` prompts; ``embedding(i)`` -> [tokens_i, dim] bf16."""

    def __init__(self, path: str, *, verify: bool = False, max_open: int = 8):
        self.path = path
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            if os.path.isfile(os.path.join(path, PLAN)):
                raise StoreError(f"{path} is an unfinished prompt store (interrupted encode); run "
                                 "`python -m self_forcing.training.encode_prompts` again with the same prompts "
                                 "and encoder to finish it")
            raise StoreError(f"{path} is not a prompt store (no {MANIFEST}); make one with "
                             "`python -m self_forcing.training.encode_prompts PROMPTS --encoder ... --out DIR`")
        m = self.manifest = _read_json(mpath)
        if m.get("format") != STORE_FORMAT or m.get("version") != STORE_VERSION:
            raise StoreError(f"{mpath} is not a version-{STORE_VERSION} prompt store manifest "
                             f"(format {m.get('format')!r}, version {m.get('version')!r})")
        self.count, self.dim, self.encoder_id = int(m["count"]), int(m["dim"]), m["encoder"]
        self.shards = m["shards"]
        self._starts = [s["start"] for s in self.shards]
        if sum(s["count"] for s in self.shards) != self.count:
            raise StoreError(f"{mpath}: the shards hold {sum(s['count'] for s in self.shards)} prompts, "
                             f"the manifest says {self.count}")
        entries = self.shards + ([m["negative"]] if m.get("negative") else [])
        for s in entries:
            p = os.path.join(path, s["file"])
            if not os.path.isfile(p) or os.path.getsize(p) != s["bytes"]:
                raise StoreError(f"{p}: missing or of the wrong size (the manifest says {s['bytes']} bytes); "
                                 "the store is damaged: encode it again")
        if verify:
            self.verify()
        self._files = _Shards(max_open)
        self.bytes_read = 0

    def __len__(self) -> int:
        return self.count

    def verify(self) -> None:
        """Check every file against the manifest's sha256 (reads the whole store once)."""
        m = self.manifest
        entries = self.shards + ([m["negative"]] if m.get("negative") else []) + [m["texts"]]
        for s in entries:
            p = os.path.join(self.path, s["file"])
            if file_sha256(p) != s["sha256"]:
                raise StoreError(f"{p}: checksum mismatch; the store is damaged: encode it again")

    def _locate(self, index: int) -> tuple[str, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"prompt {index} of a store of {self.count}")
        k = bisect.bisect_right(self._starts, index) - 1
        return os.path.join(self.path, self.shards[k]["file"]), index - self._starts[k]

    def _read(self, path: str, j: int) -> torch.Tensor:
        f, offsets = self._files.get(path)
        return self._count(f.rows("embeds", offsets[j], offsets[j + 1]))

    def embedding(self, index: int) -> torch.Tensor:
        return self._read(*self._locate(int(index)))

    def tokens(self, index: int) -> int:
        path, j = self._locate(int(index))
        offsets = self._files.get(path)[1]
        return offsets[j + 1] - offsets[j]

    def negative(self) -> torch.Tensor | None:
        neg = self.manifest.get("negative")
        return self._read(os.path.join(self.path, neg["file"]), 0) if neg else None

    @property
    def negative_text(self) -> str | None:
        neg = self.manifest.get("negative")
        return neg["text"] if neg else None

    def texts(self) -> list[str]:
        """All prompts' text, in store order (read from prompts.jsonl)."""
        with open(os.path.join(self.path, self.manifest["texts"]["file"]), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]


class EmbeddingFiles(_Rows):
    """The prompts of a folder of 'Save Text Embeddings' files (``*.safetensors``, recursively, sorted; each
    file's batch rows in order), read lazily one row at a time. Rows keep the saved padding."""

    def __init__(self, folder: str, max_open: int = 8):
        from ..sf_model.text_embeds import EMBED_KEY

        if not folder or not os.path.isdir(folder):
            raise StoreError(f"{folder!r} is not a folder; save prompt embeddings there with the 'Save Text "
                             "Embeddings' node (one prompt or a batch per file)")
        files = sorted(glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True))
        self.items: list[tuple[str, int]] = []
        self.dim = None
        for path in files:
            f = TensorFile(path)
            f.close()
            if EMBED_KEY not in f.tensors:
                raise StoreError(f"{path} is not a text-embeddings file (no {EMBED_KEY!r} tensor)")
            shape = f.shape(EMBED_KEY)
            if len(shape) != 3 or (self.dim is not None and shape[2] != self.dim):
                raise StoreError(f"{path}: embeddings of shape {shape}; expected [batch, tokens, {self.dim or 'dim'}]")
            self.dim = shape[2]
            self.items += [(path, b) for b in range(shape[0])]
        if not self.items:
            raise StoreError(f"no text embeddings (*.safetensors) found in {folder}")
        self.key, self._files, self.bytes_read = EMBED_KEY, OrderedDict(), 0
        self.max_open = max_open

    def __len__(self) -> int:
        return len(self.items)

    def embedding(self, index: int) -> torch.Tensor:
        path, b = self.items[int(index)]
        if path not in self._files:
            self._files[path] = TensorFile(path)
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(path)
        return self._count(self._files[path].rows(self.key, b, b + 1)[0])


def toy_prompt_encoder(text_encoder) -> Encoder:
    """The bundled toy text encoder as a store encoder: each prompt's real tokens only."""
    def encode(texts: list) -> list[torch.Tensor]:
        with torch.no_grad():
            ctx = text_encoder.encode(list(texts))
            _, mask = text_encoder.tokenize(list(texts))
        return [c[:int(n)] for c, n in zip(ctx, mask.sum(1).tolist())]

    encode.name = f"toy-text-encoder(seed={text_encoder.seed}, dim={text_encoder.text_dim})"
    return encode
