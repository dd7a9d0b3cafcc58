"""Checkpoint I/O: every layout round-trips; unsafe, truncated and mismatched files give clear errors."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from self_forcing.sf_model.checkpoint import CheckpointError, load_model, save_model, wan_to_diffusers
from self_forcing.sf_model.config import TINY, infer_config


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def fsdp_name(k):
    # what FSDP + activation checkpointing + torch.compile wrappers do to names inside SF's wrapper
    if k.startswith("blocks."):
        i, rest = k.split(".", 2)[1:]
        return f"model._fsdp_wrapped_module.blocks.{i}._checkpoint_wrapped_module._orig_mod.{rest}"
    return "model._fsdp_wrapped_module." + k


LAYOUTS = {
    "sf_generator_ema": lambda sd: ({"generator_ema": {"model." + k: v for k, v in sd.items()},
                                     "generator": {"model." + k: v * 0 for k, v in sd.items()},
                                     "critic": {"model.x": torch.zeros(1)}}, ".pt"),
    "sf_generator": lambda sd: ({"generator": {"model." + k: v for k, v in sd.items()}}, ".pt"),
    "sf_bare_model_prefix": lambda sd: ({"model." + k: v for k, v in sd.items()}, ".pth"),
    "fsdp_compile": lambda sd: ({"generator": {fsdp_name(k): v for k, v in sd.items()}}, ".pt"),
    "comfy_bare": lambda sd: (dict(sd), ".safetensors"),
    "comfy_full_prefix": lambda sd: ({"model.diffusion_model." + k: v for k, v in sd.items()}, ".safetensors"),
    "diffusers": lambda sd: ({wan_to_diffusers(k): v for k, v in sd.items()}, ".safetensors"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_round_trips(tmp_path, make_tiny, layout):
    cfg = TINY.replace(dim=128, num_heads=1, num_layers=2)  # head_dim 128 so the config is inferable
    model = make_tiny(cfg, seed=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    obj, ext = LAYOUTS[layout](sd)
    path = tmp_path / f"ckpt{ext}"
    if ext == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config == infer_config(sd).replace(text_len=loaded.config.text_len)
    assert_same_weights(loaded.model, sd)
    if layout == "sf_generator_ema":
        assert "generator_ema" in loaded.layout
    if layout == "diffusers":
        assert "diffusers" in loaded.layout


def test_save_model_writes_causal_ar_and_config_metadata(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    save_model(path, tiny_model, TINY, meta={"frames_per_block": 3, "steps": [1000, 750, 500, 250], "shift": 5.0})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert json.loads(meta["config"]) == {"transformer": {"causal_ar": True}}
    assert "blocks.0.self_attn.q.weight" in keys and not any(k.startswith("model.") for k in keys)
    loaded = load_model(path)
    assert loaded.config == TINY  # head count and text_len come from the metadata, not a guess
    assert loaded.meta["frames_per_block"] == 3 and loaded.meta["steps"] == [1000, 750, 500, 250]
    assert_same_weights(loaded.model, tiny_model.state_dict())
    assert not os.path.exists(str(path) + ".tmp")


def test_dtype_conversion_on_load(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model, TINY)
    loaded = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    Evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"generator": {"model.x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path)
    assert not os.path.exists(Evil.marker)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_truncated_file_gives_clear_error(tmp_path, tiny_model, ext):
    path = tmp_path / f"m{ext}"
    if ext == ".safetensors":
        save_model(path, tiny_model, TINY)
    else:
        torch.save({"generator": tiny_model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_wrong_shape_missing_and_unknown_keys_named_in_one_error(tmp_path, tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["blocks.0.ffn.0.weight"] = torch.zeros(7, TINY.dim)
    del sd["blocks.1.self_attn.o.bias"]
    sd["blocks.0.lora_A.weight"] = torch.zeros(2, 2)
    path = tmp_path / "bad.safetensors"
    save_model(path, sd, TINY)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "1 missing keys: blocks.1.self_attn.o.bias" in msg
    assert "1 unexpected keys: blocks.0.lora_A.weight" in msg
    assert "shape conflicts: blocks.0.ffn.0.weight: file (7, 64) vs model (128, 64)" in msg


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(path)


def test_loaded_model_computes_the_same_function(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny_model, TINY)
    loaded = load_model(path).model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x, 500.0, ctx), tiny_model(x, 500.0, ctx))


def test_bundled_parts_round_trip_and_stay_out_of_the_dit(tmp_path, tiny_model):
    path = tmp_path / "toy.safetensors"
    text = {"embed.weight": torch.randn(5, 32)}
    codec = {"matrix": torch.randn(12, 16), "scale": torch.tensor(0.5)}
    save_model(path, tiny_model, TINY, meta={"frames_per_block": 3}, extras={"toy_text": text, "toy_codec": codec})
    loaded = load_model(path)
    assert "bundled: toy_codec, toy_text" in loaded.layout
    assert torch.equal(loaded.extras["toy_text"]["embed.weight"], text["embed.weight"])
    assert torch.equal(loaded.extras["toy_codec"]["scale"], codec["scale"])
    assert_same_weights(loaded.model, tiny_model.state_dict())
    with pytest.raises(ValueError, match="plain word"):
        save_model(tmp_path / "x.safetensors", tiny_model, TINY, extras={"blocks": text})
