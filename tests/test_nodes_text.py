"""CONDITIONING handling, text embeddings on disk, and the text_embeds model folder registration."""

import os
import types

import pytest
import torch

from self_forcing.nodes.model import model_choices
from self_forcing.nodes.text import (conditioning_from_context, context_from_conditioning, load_text_embeds,
                                     next_embed_path, register_text_embeds_folder, save_folder, save_text_embeds,
                                     tensor_of)


def cond(tokens=512, dim=32, batch=1):
    t = torch.zeros(batch, tokens, dim)
    t[:, :7] = torch.randn(batch, 7, dim)  # like core's umT5 output: real tokens, then zero padding
    return [[t, {"pooled_output": None}]]


def test_context_from_core_conditioning_truncates_to_text_len():
    c = cond(tokens=600)
    ctx = context_from_conditioning(c, text_dim=32, text_len=512)
    assert ctx.shape == (1, 512, 32) and ctx.dtype == torch.float32
    assert torch.equal(ctx, c[0][0][:, :512])


def test_context_errors_say_how_to_fix():
    with pytest.raises(ValueError, match="CLIPLoader type 'wan'"):
        context_from_conditioning(cond(dim=768), text_dim=32, text_len=512)
    with pytest.raises(ValueError, match="ConditioningCombine"):
        context_from_conditioning(cond() + cond(), text_dim=32, text_len=512)
    with pytest.raises(ValueError, match="empty"):
        tensor_of([])
    with pytest.raises(ValueError, match="text-encoder output"):
        tensor_of([[torch.zeros(4, 4), {}]])


def test_embeddings_round_trip_bit_identical(tmp_path):
    c = cond(dim=4096)
    path, rel = next_embed_path(str(tmp_path), "cats/walk")
    save_text_embeds(path, tensor_of(c), meta={"note": "x"})
    assert rel == "cats/walk_00001.safetensors"
    tensor, meta = load_text_embeds(path)
    assert torch.equal(tensor, c[0][0]) and meta["note"] == "x" and meta["shape"] == [1, 512, 4096]
    back = conditioning_from_context(tensor)
    assert torch.equal(context_from_conditioning(back, 4096, 512), c[0][0])
    assert next_embed_path(str(tmp_path), "cats/walk")[1] == "cats/walk_00002.safetensors"


def test_embed_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="Save Text Embeddings"):
        load_text_embeds(str(other))
    with pytest.raises(ValueError, match="not found"):
        load_text_embeds(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="outside"):
        next_embed_path(str(tmp_path / "root"), "../../etc/x")


def fake_folder_paths(tmp_path, existing=None):
    table = {"diffusion_models": ([str(tmp_path / "models/unet"), str(tmp_path / "models/diffusion_models")], {".pt"})}
    if existing is not None:
        table["text_embeds"] = existing
    fp = types.SimpleNamespace(folder_names_and_paths=table, models_dir=str(tmp_path / "models"),
                               filename_list_cache={"text_embeds": "stale"})
    fp.get_output_directory = lambda: str(tmp_path / "output")
    fp.get_folder_paths = lambda name: list(table[name][0])
    return fp


def test_text_embeds_folder_is_registered(tmp_path):
    fp = fake_folder_paths(tmp_path)
    paths = register_text_embeds_folder(fp)
    assert paths == [str(tmp_path / "models/text_embeds"), str(tmp_path / "output/text_embeds")]
    assert fp.folder_names_and_paths["text_embeds"][1] == {".safetensors"}
    assert "text_embeds" not in fp.filename_list_cache  # the stale file list is dropped
    assert register_text_embeds_folder(fp) == paths  # idempotent
    assert save_folder(fp, "text_embeds") == paths[0]
    assert save_folder(fp, "output") == os.path.join(str(tmp_path / "output"), "text_embeds")
    with pytest.raises(ValueError):
        save_folder(fp, "elsewhere")


def test_paths_from_extra_model_paths_yaml_are_kept_first(tmp_path):
    # extra_model_paths.yaml ran first and created the key with an empty extension set ("all files")
    fp = fake_folder_paths(tmp_path, existing=(["/nas/embeds"], set()))
    paths = register_text_embeds_folder(fp)
    assert paths[0] == "/nas/embeds" and len(paths) == 3
    assert fp.folder_names_and_paths["text_embeds"][1] == set()
    assert save_folder(fp, "text_embeds") == "/nas/embeds"
    fp = fake_folder_paths(tmp_path, existing=(["/nas/embeds"], {".bin"}))
    register_text_embeds_folder(fp)
    assert fp.folder_names_and_paths["text_embeds"][1] == {".bin", ".safetensors"}


def test_loader_lists_missing_official_files_after_present_ones():
    assert model_choices(["a.safetensors", "self_forcing_dmd.safetensors"], ["self_forcing_dmd.safetensors"]) == [
        "a.safetensors", "self_forcing_dmd.safetensors"]
    assert model_choices(["a.safetensors"], ["self_forcing_dmd.safetensors"]) == [
        "a.safetensors", "self_forcing_dmd.safetensors"]
    assert model_choices([], ["x"]) == ["x"]
