"""The toy bundle format: one text encoder and one codec class; bundles of the older format load with the same
numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from self_forcing.sf_model.checkpoint import load_model, save_model
from self_forcing.sf_model.config import WanConfig
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.toy.bundle import (CODEC_PART, FORMAT, TEXT_PART, build_toy_parts, bundle_extras, bundle_meta,
                                     encode_prompt, is_toy_bundle, latents_to_video, toy_parts)

LEGACY_VOCAB = ("a", "and", "bouncing", "on", "background", "circle", "square", "triangle", "red", "green", "blue",
                "yellow", "magenta", "cyan", "white", "black", "gray", "navy", "brown", "<unk>")
PROMPTS = ["a red circle and a blue square bouncing on a black background",
           "a white triangle bouncing on a navy background"]
CFG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=24, text_len=16, freq_dim=32)


def legacy_parts(text_dim=24, text_len=16):
    """Tensors of the first bundled demo model's minimal parts, and those parts' own math."""
    g = torch.Generator().manual_seed(3)
    words, positions = torch.randn(len(LEGACY_VOCAB), text_dim, generator=g), torch.randn(text_len, text_dim, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(16, 12, generator=g))
    shift, scale = torch.tensor(-0.5), torch.tensor(3.0)

    def encode(prompts):
        out = torch.zeros(len(prompts), text_len, text_dim)
        for b, p in enumerate(prompts):
            ids = [LEGACY_VOCAB.index(w) for w in p.split()]
            out[b, :len(ids)] = words[ids] + positions[:len(ids)]
        return out

    def decode(z):
        b, k, t, h, w = z.shape
        x = torch.einsum("kn,bkhw->bnhw", basis, z.permute(0, 2, 1, 3, 4).reshape(b * t, k, h, w)) / scale + shift
        return F.pixel_shuffle(x, 2).reshape(b, t, 3, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)

    meta = {"text_encoder": {"module": "toy_parts_local", "class": "LocalToyText",
                             "args": {"text_dim": text_dim, "text_len": text_len, "seed": 0}},
            "codec": {"module": "toy_parts_local", "class": "LocalToyCodec", "args": {"channels": 16}},
            "size": 16, "latent_size": [8, 8], "train_frames": 6, "fps": 8}
    extras = {TEXT_PART: {"words": words, "positions": positions},
              CODEC_PART: {"basis": basis, "shift": shift, "scale": scale}}
    return meta, extras, encode, decode


def save_bundle(path, meta, extras):
    model = CausalWanModel(CFG)
    save_model(str(path), model, CFG, meta={"frames_per_block": 3, "toy": meta}, extras=extras)
    return load_model(str(path))


def test_a_legacy_bundle_loads_with_the_same_numbers(tmp_path):
    meta, extras, encode, decode = legacy_parts()
    loaded = save_bundle(tmp_path / "legacy.safetensors", meta, extras)
    assert is_toy_bundle(loaded)
    assert torch.allclose(encode_prompt(loaded, PROMPTS), encode(PROMPTS), atol=1e-6)
    z = torch.randn(2, 16, 3, 8, 8)
    assert torch.allclose(latents_to_video(loaded, z), decode(z).clamp(-1, 1), atol=1e-5)


def test_format_2_round_trip_names_no_module(tmp_path):
    enc, codec = build_toy_parts(text_dim=24, text_len=16, seed=5)
    meta = bundle_meta(enc, size=16, latent_size=(8, 8), train_frames=6)
    assert meta["format"] == FORMAT and "module" not in str(meta)
    loaded = save_bundle(tmp_path / "new.safetensors", meta, bundle_extras(enc, codec))
    assert torch.equal(encode_prompt(loaded, PROMPTS), enc.encode(PROMPTS))
    z = torch.randn(1, 16, 2, 8, 8)
    assert torch.equal(latents_to_video(loaded, z), codec.decode(z).clamp(-1, 1))


def test_unknown_legacy_parts_are_refused_with_a_hint(tmp_path):
    meta, extras, _, _ = legacy_parts()
    meta["text_encoder"] = {"module": "os", "class": "system", "args": {}}
    loaded = SimpleNamespace(meta={"toy": meta}, extras=extras)
    with pytest.raises(ValueError, match="unknown toy text encoder os.system"):
        toy_parts(loaded)


def test_the_shipped_demo_model_is_format_2():
    from pathlib import Path

    loaded = load_model(str(Path(__file__).resolve().parents[1] / "assets" / "self_forcing_toy.safetensors"))
    assert loaded.meta["toy"]["format"] == FORMAT
    enc, _ = toy_parts(loaded)
    assert enc.config()["final_norm"] is False and enc.config()["num_layers"] == 0


def test_umt5_wide_toy_parts_stay_small_and_round_trip(tmp_path):
    # A 4096-wide context (the Wan-shaped toy models) comes from a narrow layer + a fixed projection: a full
    # 4096-wide layer made 549 MB bundles.
    enc, codec = build_toy_parts(text_dim=4096, text_len=16, seed=2)
    assert enc.config()["width"] < 4096
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params < 1_000_000, n_params
    ctx = enc.encode(PROMPTS)
    assert ctx.shape == (len(PROMPTS), 16, 4096)
    meta = bundle_meta(enc, size=16, latent_size=(8, 8), train_frames=6)
    path = tmp_path / "wide.safetensors"
    loaded = save_bundle(path, meta, bundle_extras(enc, codec))
    assert torch.equal(encode_prompt(loaded, PROMPTS), ctx)
    assert path.stat().st_size < 8 * 2**20
