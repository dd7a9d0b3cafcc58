"""The official weight files and how to get them (no ComfyUI import).

Three files make a working ComfyUI setup:

- the Self Forcing checkpoint (``gdhe17/Self-Forcing``, ``checkpoints/self_forcing_dmd.pt``), converted once
  to ``self_forcing_dmd.safetensors`` (bf16) in ``models/diffusion_models``;
- the Wan 2.1 VAE repackaged for ComfyUI (``wan_2.1_vae.safetensors``) in ``models/vae``;
- the umT5-XXL text encoder (``umt5_xxl_fp8_e4m3fn_scaled.safetensors``) in ``models/text_encoders``.

Downloads go through ``huggingface_hub`` (resumable, with progress bars) into a staging folder next to
the model folder, are checked against pinned SHA-256 sums (or the Hub's LFS checksum), then moved into
place. Without a connection (or with ``HF_HUB_OFFLINE=1``) ``ensure_files`` fails at once, before any
download, with a message naming every missing file, where to get it and which folder to put it in.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

HUB = "https://huggingface.co"
STAGING = ".self_forcing_download"
PREFLIGHT_TIMEOUT_S = 10.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class OfficialFile:
    key: str  # short name for the CLI
    name: str  # file name in the ComfyUI model folder
    folder: str  # ComfyUI model folder (folder_paths key)
    repo_id: str
    repo_path: str
    sha256: str | None  # of the file on the Hub (for a converted file: of the source)
    size: int | None
    description: str
    convert: bool = False  # .pt -> safetensors through sf_model.checkpoint

    @property
    def url(self) -> str:
        return f"{HUB}/{self.repo_id}/resolve/main/{self.repo_path}"


SELF_FORCING = OfficialFile(
    key="self-forcing", name="self_forcing_dmd.safetensors", folder="diffusion_models",
    repo_id="gdhe17/Self-Forcing", repo_path="checkpoints/self_forcing_dmd.pt",
    sha256="a0413986d9734e02c09504e1520f5697ba6df731bb2f0f35577485e9cc8f56a3", size=5_676_252_553,
    description="Self Forcing DMD checkpoint (Wan2.1-T2V-1.3B, chunk-wise, 4 steps); "
                "the .pt is converted to bf16 safetensors after download", convert=True)
WAN_VAE = OfficialFile(
    key="vae", name="wan_2.1_vae.safetensors", folder="vae",
    repo_id="Comfy-Org/Wan_2.1_ComfyUI_repackaged", repo_path="split_files/vae/wan_2.1_vae.safetensors",
    sha256="2fc39d31359a4b0a64f55876d8ff7fa8d780956ae2cb13463b0223e15148976b", size=253_815_318,
    description="Wan 2.1 VAE (ComfyUI repackaged)")
UMT5 = OfficialFile(
    key="text-encoder", name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", folder="text_encoders",
    repo_id="Comfy-Org/Wan_2.1_ComfyUI_repackaged",
    repo_path="split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    sha256="c3355d30191f1f066b26d93fba017ae9809dce6c627dda5f6a66eaa651204f68", size=6_735_906_897,
    description="umT5-XXL text encoder, fp8 (ComfyUI repackaged)")

OFFICIAL_FILES: tuple[OfficialFile, ...] = (SELF_FORCING, WAN_VAE, UMT5)


class WeightsError(RuntimeError):
    """A download, checksum or conversion failed."""


class WeightsUnavailable(WeightsError):
    """The Hub cannot be reached (offline); the message says how to place the files by hand."""


def official_file(name_or_key: str) -> OfficialFile | None:
    for f in OFFICIAL_FILES:
        if name_or_key in (f.name, f.key):
            return f
    return None


def official_names(folder: str | None = None) -> list[str]:
    return [f.name for f in OFFICIAL_FILES if folder is None or f.folder == folder]


def _size(n: int | None) -> str:
    return f"{n / 1e9:.1f} GB" if n and n >= 1e9 else (f"{n / 1e6:.0f} MB" if n else "size unknown")


def manual_instructions(files: Sequence[OfficialFile], folder_of: Callable[[OfficialFile], str],
                        reason: str = "") -> str:
    """Text naming each file, where to download it and the folder to put it in."""
    lines = [f"Cannot download the model files{': ' + reason if reason else ''}.",
             "Download them by hand and put each one in the folder shown:"]
    for f in files:
        lines.append(f"  - {f.name} ({f.description}, {_size(f.size)})")
        lines.append(f"      from: {f.url}")
        lines.append(f"      into: {folder_of(f)}")
        if f.convert:
            pt = Path(f.repo_path).name
            lines.append(f"      (keep it as {pt}: the loader reads .pt files too; or convert it once to {f.name} "
                         f"with 'self-forcing download --models-dir <ComfyUI>/models --from-file {pt}')")
        if f.sha256:
            lines.append(f"      sha256 of the download: {f.sha256}")
    return "\n".join(lines)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def offline_mode() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise WeightsError("downloading needs the huggingface-hub package: pip install huggingface-hub") from e
    return huggingface_hub


def remote_checksum(f: OfficialFile, *, endpoint: str | None = None, token=None, revision: str = "main",
                    timeout: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """One HEAD request, no retries: the Hub's SHA-256 of the file (LFS etag), or None if it has none.

    Raises WeightsUnavailable when the Hub cannot be reached, WeightsError for any other refusal.
    """
    hub = _hub()
    url = hub.hf_hub_url(f.repo_id, f.repo_path, revision=revision, endpoint=endpoint)
    try:
        meta = hub.get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=endpoint, retry_on_errors=False)
    except Exception as e:  # noqa: BLE001 - classified below
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None:
            raise WeightsUnavailable(f"{type(e).__name__}: {e}") from None
        raise WeightsError(f"the Hub refused {f.repo_id}/{f.repo_path} (HTTP {status}): {e}") from None
    etag = (meta.etag or "").strip('"').lower()
    return etag if _SHA256.match(etag) else None


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bf16",
                       source: dict | None = None) -> None:
    """Convert any checkpoint layout sf_model knows (e.g. the official .pt) to our safetensors format."""
    import torch

    from .checkpoint import load_state_dict_file, save_model

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(dtypes)}")
    sd, config, layout, meta = load_state_dict_file(os.fspath(src))[:4]
    meta = {**meta, "converted_from": {"layout": layout, **(source or {})}}
    meta.setdefault("frames_per_block", 3)
    save_model(os.fspath(dst), sd, config, meta=meta, dtype=dtypes[dtype])


def safe_file_name(name: str) -> str:
    """``name`` when it is a plain file name (no folder part, not '.'/'..'), else a WeightsError."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name or "\0" in name:
        raise WeightsError(f"refusing to write a file named {name!r}: a download target must be a plain file name")
    return name


def fetch(f: OfficialFile, dest_dir: str | os.PathLike, *, endpoint: str | None = None, token=None,
          revision: str = "main", staging_dir: str | os.PathLike | None = None, dtype: str = "bf16",
          keep_source: bool = False, expected_sha256: str | None = None) -> Path:
    """Download one file into ``dest_dir`` (resumable), check its SHA-256, convert if needed.

    ``expected_sha256`` defaults to the pinned sum, else the Hub's. Returns the final path.
    """
    name = safe_file_name(f.name)
    hub = _hub()
    dest_dir = Path(dest_dir)
    staging = Path(staging_dir) if staging_dir is not None else dest_dir.parent / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    dest_dir.mkdir(parents=True, exist_ok=True)
    want = expected_sha256 or f.sha256
    if want is None:
        want = remote_checksum(f, endpoint=endpoint, token=token, revision=revision)
    if want is None:
        raise WeightsError(f"no checksum known for {f.repo_id}/{f.repo_path}; refusing an unverified download")
    try:
        staged = Path(hub.hf_hub_download(f.repo_id, f.repo_path, revision=revision, local_dir=staging,
                                          endpoint=endpoint, token=token))
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"downloading {f.repo_id}/{f.repo_path} failed ({type(e).__name__}: {e}); run the "
                           "same command again to resume") from None
    got = sha256_file(staged)
    if got != want:
        staged.unlink(missing_ok=True)
        raise WeightsError(f"checksum mismatch for {f.repo_path}: expected {want}, got {got}; the file was "
                           "deleted, run again to download it afresh")
    if not staged.resolve().is_relative_to(staging.resolve()):
        raise WeightsError(f"the download of {f.repo_path} landed outside the staging folder {staging}; refused")
    final = dest_dir / name
    if f.convert:
        convert_checkpoint(staged, final, dtype=dtype,
                           source={"repo_id": f.repo_id, "path": f.repo_path, "sha256": got})
        if not keep_source:
            staged.unlink(missing_ok=True)
    else:
        os.replace(staged, final)
    _prune_empty(staging)
    return final


def _prune_empty(root: Path) -> None:
    """Remove the staging folder if only huggingface_hub's bookkeeping is left in it."""
    leftovers = [p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts]
    if not leftovers and not any(p.name.endswith(".incomplete") for p in root.rglob("*")):
        shutil.rmtree(root, ignore_errors=True)


def ensure_files(files: Iterable[OfficialFile], folder_of: Callable[[OfficialFile], str], *,
                 endpoint: str | None = None, token=None, revision: str = "main", dtype: str = "bf16",
                 keep_source: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """Make sure every file exists in its folder, downloading the missing ones.

    Fails immediately (no download started, no retry) when offline or when the Hub is unreachable,
    naming every missing file and its folder.
    """
    files = list(files)
    missing = [f for f in files if not (Path(folder_of(f)) / f.name).is_file()]
    for f in files:
        if f not in missing:
            log(f"present: {Path(folder_of(f)) / f.name}")
    if not missing:
        return [Path(folder_of(f)) / f.name for f in files]
    if offline_mode():
        raise WeightsUnavailable(manual_instructions(missing, folder_of, "offline mode (HF_HUB_OFFLINE) is set"))
    try:
        remote_checksum(missing[0], endpoint=endpoint, token=token, revision=revision)
    except WeightsUnavailable as e:
        raise WeightsUnavailable(manual_instructions(missing, folder_of, f"the Hub is unreachable ({e})")) from None
    for f in missing:
        log(f"downloading {f.repo_id}/{f.repo_path} ({_size(f.size)}) -> {folder_of(f)}")
        path = fetch(f, folder_of(f), endpoint=endpoint, token=token, revision=revision, dtype=dtype,
                     keep_source=keep_source)
        log(f"ok: {path}")
    return [Path(folder_of(f)) / f.name for f in files]


def preferred_dir(paths: Sequence[str], folder: str) -> str:
    """Of a ComfyUI folder's paths, the one named like the folder (models/diffusion_models, not models/unet)."""
    if not paths:
        raise WeightsError(f"ComfyUI has no path for the '{folder}' model folder")
    for p in paths:
        if os.path.basename(os.path.normpath(p)) == folder:
            return p
    return paths[0]
