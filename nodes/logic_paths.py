"""Model-folder bookkeeping over a ``folder_paths``-like module (passed in, so tests can use a fake).

Only the long-stable public surface of ComfyUI's ``folder_paths`` is used: ``folder_names_and_paths``,
``models_dir``, ``get_output_directory``, ``get_folder_paths``, ``get_filename_list``, ``get_full_path``.
"""

from __future__ import annotations

import os

TEXT_EMBEDS = "text_embeds"
EMBED_EXTENSIONS = {".safetensors"}


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


def model_choices(files: list[str], official_names: list[str]) -> list[str]:
    """Dropdown of the loader: files present, then official names that are not (downloadable)."""
    present = set(files)
    return list(files) + sorted(n for n in official_names if n not in present)
