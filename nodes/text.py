"""'Save/Load Text Embeddings': their specs, CONDITIONING <-> text-embedding tensors, text embeddings on
disk and their model folder (no ComfyUI import).

A core CONDITIONING is a list of ``[tensor [B, tokens, dim], {extra...}]`` entries. For Wan the tensor
holds umT5-XXL hidden states (dim 4096), zero-padded to at least 512 tokens by core's tokenizer.

The folder bookkeeping works on a ``folder_paths``-like module passed in (tests use a fake); only the
long-stable public surface of ComfyUI's ``folder_paths`` is used: ``folder_names_and_paths``, ``models_dir``,
``get_output_directory``, ``get_folder_paths``, ``get_filename_list``, ``get_full_path``.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile

import torch

from ..sf_model.text_embeds import EMBED_FORMAT, EMBED_KEY, load_text_embeds, save_text_embeds  # noqa: F401
from .schema import CAT_CONDITIONING, InputSpec, NodeSpec, OutputSpec

TEXT_EMBEDS = "text_embeds"
EMBED_EXTENSIONS = {".safetensors"}
EMBED_FOLDERS = (TEXT_EMBEDS, "output")

SAVE_EMBEDS = NodeSpec(
    node_id="SelfForcingSaveTextEmbeds",
    display_name="Save Text Embeddings",
    category=CAT_CONDITIONING,
    description="Saves a CONDITIONING (umT5 hidden states) to a safetensors file, so later runs can load it "
                "with 'Load Text Embeddings' without keeping the 11 GB text encoder loaded.",
    inputs=(
        InputSpec("conditioning", "CONDITIONING", "The encoded prompt (CLIPTextEncode with a 'wan' CLIP)."),
        InputSpec("filename_prefix", "STRING", "File name prefix; a counter and .safetensors are added. May "
                  "contain sub-folders (e.g. 'cats/walk').", default="prompt"),
        InputSpec("folder", "COMBO", "text_embeds: models/text_embeds (listed by 'Load Text Embeddings'); "
                  "output: ComfyUI's output folder, under text_embeds/ (also listed).",
                  default=TEXT_EMBEDS, options=EMBED_FOLDERS),
    ),
    outputs=(OutputSpec("STRING", "filename", "The saved file, as 'Load Text Embeddings' lists it."),),
    is_output_node=True,
)

LOAD_EMBEDS = NodeSpec(
    node_id="SelfForcingLoadTextEmbeds",
    display_name="Load Text Embeddings",
    category=CAT_CONDITIONING,
    description="Loads text embeddings saved by 'Save Text Embeddings' as a CONDITIONING.",
    inputs=(
        InputSpec("embeds_name", "COMBO", "A .safetensors file in models/text_embeds or output/text_embeds.",
                  options_source=TEXT_EMBEDS),
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning", "The saved prompt embedding [1, tokens, 4096]."),),
)


def tensor_of(conditioning, name: str = "conditioning") -> torch.Tensor:
    """The prompt tensor [B, tokens, dim] of a one-prompt CONDITIONING (``name``: the input, for the errors);
    refuses an empty one (batch 0 or no tokens)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("the conditioning is empty; connect a CONDITIONING from CLIPTextEncode (CLIPLoader type "
                         "'wan') or 'Load Text Embeddings'")
    if len(conditioning) > 1:
        raise ValueError(f"the conditioning holds {len(conditioning)} prompts (ConditioningCombine?); Self Forcing "
                         "takes one prompt: connect a single CLIPTextEncode")
    entry = conditioning[0]
    tensor = entry[0] if isinstance(entry, (list, tuple)) else entry
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"the conditioning is not a text-encoder output [batch, tokens, dim] (got {shape})")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} holds no prompt (batch 0, shape {tuple(tensor.shape)}); connect one encoded prompt "
                         "(CLIPTextEncode or 'Load Text Embeddings')")
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (shape {tuple(tensor.shape)}); connect an encoded prompt "
                         "(CLIPTextEncode or 'Load Text Embeddings')")
    return tensor


def context_from_conditioning(conditioning, text_dim: int, text_len: int) -> torch.Tensor:
    """The prompt tensor [B, <=text_len, text_dim] of a one-prompt CONDITIONING (float32, on its device).

    Tokens beyond ``text_len`` are dropped (Wan truncates prompts to 512 tokens).
    """
    tensor = tensor_of(conditioning, "positive")
    if tensor.shape[-1] != text_dim:
        raise ValueError(
            f"positive has width {tensor.shape[-1]} but the model expects {text_dim}: encode the prompt with the "
            "umT5-XXL text encoder (CLIPLoader type 'wan', umt5_xxl_fp8_e4m3fn_scaled.safetensors)")
    return tensor[:, :text_len].to(torch.float32)


def conditioning_from_context(context: torch.Tensor) -> list:
    """Wrap a prompt tensor [B, tokens, dim] as a core CONDITIONING."""
    if context.ndim != 3:
        raise ValueError(f"text embeddings must be [batch, tokens, dim], got shape {tuple(context.shape)}")
    return [[context, {"pooled_output": None}]]


_SAFE = re.compile(r"[^A-Za-z0-9._\-/ ]")
_CLAIM_TRIES = 10000  # file numbers tried past the highest existing one
_COUNTER_SUFFIX = "_00001.safetensors"  # what is added to the prefix's file name part
_TEMP_NAME_LEN = 32  # the longest temporary file name ``write_embeds`` uses (.sf_embeds_XXXXXXXX.partial.tmp)


def _path_limit(path: str, name: str, default: int) -> int:
    """A ``pathconf`` limit of the file system of ``path`` (or of its nearest existing parent)."""
    while path and not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return int(os.pathconf(path, name))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer: the common limit
        return default


def _check_lengths(root: str, sub: str, base: str) -> None:
    """Every folder name, the file name and the whole path of a prefix within the file system's limits (raises
    ValueError before anything is created)."""
    limit = _path_limit(root, "PC_NAME_MAX", 255)
    for part in (sub.split("/") if sub else []):
        if len(part.encode()) > limit:
            raise ValueError(f"filename_prefix: the folder name '{part[:24]}...' has {len(part.encode())} characters; "
                             f"the file system allows at most {limit} characters per name")
    longest = limit - len(_COUNTER_SUFFIX)
    if len(base.encode()) > longest:
        raise ValueError(f"filename_prefix is too long: its file name part '{base[:24]}...' has "
                         f"{len(base.encode())} characters, at most {longest} characters are allowed (the file system "
                         f"allows {limit} per name, and '{_COUNTER_SUFFIX}' is added)")
    path_max = _path_limit(root, "PC_PATH_MAX", 4096)
    folder = os.path.join(root, sub)
    longest_path = len(folder.encode()) + 1 + max(len(base.encode()) + len(_COUNTER_SUFFIX), _TEMP_NAME_LEN)
    if longest_path >= path_max:
        raise ValueError(f"filename_prefix is too long: the file would be {longest_path} characters from the root "
                         f"of the file system, at most {path_max - 1} are allowed; use a shorter prefix or fewer "
                         "sub-folders")


def _too_long(prefix: str, error: OSError) -> ValueError:
    return ValueError(f"filename_prefix '{prefix[:40]}...' makes a path the file system refuses as too long "
                      f"({error.strerror}: {len(error.filename or '')} characters); use a shorter prefix or fewer "
                      "sub-folders")


def _check_inside(root: str, target_dir: str, prefix: str) -> None:
    """Refuse a target folder outside ``root``, by name ('..') or through a symbolic link (real paths compared)."""
    real_root = os.path.realpath(root)
    if (os.path.commonpath([root, target_dir]) != root
            or os.path.commonpath([real_root, os.path.realpath(target_dir)]) != real_root):
        raise ValueError(f"filename_prefix '{prefix}' points outside {root} (through '..' or a linked folder); use a "
                         "relative name like 'cats/walk' whose folders lie inside it")


def next_embed_path(folder: str, prefix: str) -> tuple[str, str]:
    """Claim a new file ``folder/prefix_00001.safetensors`` (counter past existing files).

    The file is created empty and exclusively (``O_CREAT | O_EXCL``), so saves running at the same time with
    one prefix never get the same name: a number another save took moves on to the next. Fill it with
    ``write_embeds`` (or use ``save_embeds``, which does both). Returns (absolute path, path relative to
    ``folder``). Refuses prefixes that leave ``folder``, also through a symbolic link, and names longer than
    the file system allows (ValueError naming the limit).
    """
    prefix = (prefix or "prompt").strip().replace("\\", "/")
    prefix = _SAFE.sub("_", prefix).strip("/") or "prompt"
    root = os.path.abspath(folder)
    sub, base = os.path.split(prefix)
    target_dir = os.path.abspath(os.path.join(root, sub))
    _check_inside(root, target_dir, prefix)  # before creating anything
    _check_lengths(root, sub, base)
    try:
        os.makedirs(target_dir, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise _too_long(prefix, e) from None
        raise
    _check_inside(root, target_dir, prefix)  # a link made meanwhile
    pattern = re.compile(re.escape(base) + r"_(\d{5,})\.safetensors$")
    used = [int(m.group(1)) for name in os.listdir(target_dir) if (m := pattern.match(name))]
    number = max(used, default=0) + 1
    for _ in range(_CLAIM_TRIES):
        path = os.path.join(target_dir, f"{base}_{number:05d}.safetensors")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # taken meanwhile (another save) or not a file: try the next number
            number += 1
            continue
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise _too_long(prefix, e) from None
            raise
        return path, os.path.relpath(path, root).replace(os.sep, "/")
    raise ValueError(f"could not find a free file name for filename_prefix '{prefix}' in {target_dir} "
                     f"(tried {_CLAIM_TRIES} numbers); use another prefix")


def write_embeds(path: str, context: torch.Tensor, meta: dict | None = None) -> None:
    """Write text embeddings into ``path`` atomically: a temporary file in the same folder, then
    ``os.replace`` onto the name (readers see the empty claim or the whole file, never a part)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sf_embeds_", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        save_text_embeds(tmp, context, meta=meta)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)


def save_embeds(folder: str, prefix: str, context: torch.Tensor, meta: dict | None = None) -> tuple[str, str]:
    """'Save Text Embeddings': claim the next ``prefix_NNNNN.safetensors`` in ``folder`` and write ``context``
    into it atomically; safe to run from several threads at once. Returns (absolute path, relative path)."""
    path, rel = next_embed_path(folder, prefix)
    try:
        write_embeds(path, context, meta)
    except BaseException:
        if os.path.isfile(path) and os.path.getsize(path) == 0:  # our empty claim: give the number back
            os.remove(path)
        raise
    return path, rel


def read_embeds(path: str, name: str) -> torch.Tensor:
    """'Load Text Embeddings': the prompt tensor of ``path`` (listed as ``name``). A file that cannot be read as
    text embeddings (not safetensors, damaged, another kind of file) is a ValueError naming it."""
    try:
        tensor, _ = load_text_embeds(path)
    except ValueError as e:
        if os.path.basename(path) in str(e) or name in str(e):  # names the file already, with a fix
            raise
        error = e
    except Exception as e:  # noqa: BLE001 - the safetensors reader's own errors name no file
        error = e
    else:
        return tensor
    raise ValueError(f"text embeddings '{name}' ({path}) cannot be read: {error}. It is not a file written by "
                     "'Save Text Embeddings' (or it is damaged): pick another file or save the prompt again") from error


# -- the text_embeds model folder -----------------------------------------------------------------------
def register_text_embeds_folder(fp) -> list[str]:
    """Make ``text_embeds`` a model folder: models/text_embeds and <output>/text_embeds.

    Paths that extra_model_paths.yaml already registered stay in front (the first path is where
    'Save Text Embeddings' writes); an empty extension set (yaml-created: "all files") is kept as is.
    Idempotent. Returns the folder's paths.
    """
    ours = [os.path.join(fp.models_dir, TEXT_EMBEDS), os.path.join(fp.get_output_directory(), TEXT_EMBEDS)]
    table = fp.folder_names_and_paths
    if TEXT_EMBEDS in table:
        paths, exts = table[TEXT_EMBEDS]
        paths = list(paths)
        for p in ours:
            if p not in paths:
                paths.append(p)
        if exts:  # a non-empty set: make sure ours is accepted
            exts = set(exts) | EMBED_EXTENSIONS
        table[TEXT_EMBEDS] = (paths, exts)
    else:
        table[TEXT_EMBEDS] = (ours, set(EMBED_EXTENSIONS))
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(TEXT_EMBEDS, None)
    return list(table[TEXT_EMBEDS][0])


def save_folder(fp, choice: str) -> str:
    """Folder 'Save Text Embeddings' writes to: the first text_embeds path, or <output>/text_embeds."""
    if choice == "output":
        return os.path.join(fp.get_output_directory(), TEXT_EMBEDS)
    if choice != TEXT_EMBEDS:
        raise ValueError(f"folder '{choice}' is not one of: text_embeds, output")
    return fp.get_folder_paths(TEXT_EMBEDS)[0]
