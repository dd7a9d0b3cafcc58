"""Public causal Wan checkpoint layouts (sf_model.layouts): each release's file layout, its trained attention
read into the metadata, separately shipped LoRAs merged at load, scaled fp8, and 14B recognised from shapes."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from self_forcing.sf_model.checkpoint import (CheckpointError, convert_lora, inspect_checkpoint, load_model,
                                              save_model, wan_to_diffusers)
from self_forcing.sf_model.config import TINY, WAN_1_3B, WAN_14B, size_name
from self_forcing.sf_model.layouts import release_for
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.window import checkpoint_frames_per_block, checkpoint_sink, checkpoint_window

Q = "blocks.0.self_attn.q.weight"
FFN = "blocks.1.ffn.0.weight"
# Wan's head_dim 128 (what config inference assumes for files without our metadata), tiny otherwise
SMALL = TINY.replace(dim=256, num_heads=2, ffn_dim=256)


def tiny_sd(seed=0):
    torch.manual_seed(seed)
    model = CausalWanModel(SMALL)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def assert_same(loaded, sd):
    got = loaded.model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=0, atol=0, msg=k)


def test_self_forcing_training_checkpoint_picks_ema_and_release(tmp_path):
    ema, gen = tiny_sd(1), tiny_sd(2)
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(gen, "model."), "critic": prefixed(tiny_sd(3), "model."),
                "generator_ema": prefixed(ema, "model._fsdp_wrapped_module.")}, path)
    loaded = load_model(str(path))
    assert_same(loaded, ema)
    assert "['generator_ema']" in loaded.layout and "Self Forcing" in loaded.layout
    assert loaded.meta["frames_per_block"] == 3 and loaded.meta["steps"] == [1000, 750, 500, 250]
    assert checkpoint_window(loaded.meta) is None  # one cache for the whole clip


def test_longlive_base_plus_lora_merged_and_window_read(tmp_path):
    base = tiny_sd(4)
    # LongLive's inference reads 'generator' (use_ema: false), also when the file holds an EMA
    torch.save({"generator": prefixed(base, "model."), "generator_ema": prefixed(tiny_sd(14), "model.")},
               tmp_path / "longlive_base.pt")
    rank = 2
    down = {k: torch.randn(rank, base[k].shape[1]) for k in (Q, FFN)}
    up = {k: torch.randn(base[k].shape[0], rank) for k in (Q, FFN)}
    lora = {}
    for k in (Q, FFN):
        module = k[: -len(".weight")]
        lora[f"base_model.model.{module}.lora_A.weight"] = down[k]
        lora[f"base_model.model.{module}.lora_B.weight"] = up[k]
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")

    with pytest.raises(CheckpointError, match="is a LoRA"):
        load_model(str(tmp_path / "lora.pt"))
    plain = load_model(str(tmp_path / "longlive_base.pt"))
    assert_same(plain, base)
    loaded = load_model(str(tmp_path / "longlive_base.pt"), lora=str(tmp_path / "lora.pt"), lora_strength=0.5)
    expect = dict(base)
    for k in (Q, FFN):  # peft stores no alpha: alpha = rank (LongLive's 256/256), scale 1
        expect[k] = base[k] + 0.5 * up[k] @ down[k]
    got = loaded.model.state_dict()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-6)
    assert "LongLive" in loaded.layout and "LoRA lora.pt merged" in loaded.layout and "peft" in loaded.layout
    # LongLive's local_attn_size 12 / sink_size 3 -> our window 9 after a sink of 3
    assert checkpoint_window(loaded.meta) == 9 and checkpoint_sink(loaded.meta) == 3
    assert checkpoint_frames_per_block(loaded.meta) == 3

    # for core LoraLoaderModelOnly: the same LoRA in ComfyUI's key format merges to the same weights
    comfy = convert_lora(str(tmp_path / "lora.pt"), str(tmp_path / "longlive_lora_comfy.safetensors"))
    from safetensors.torch import load_file
    keys = load_file(comfy)
    assert keys["diffusion_model.blocks.0.self_attn.q.alpha"].item() == rank
    torch.testing.assert_close(keys["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], up[Q])
    again = load_model(str(tmp_path / "longlive_base.pt"), lora=comfy, lora_strength=0.5)
    for k in expect:
        torch.testing.assert_close(again.model.state_dict()[k], got[k], rtol=0, atol=0)


def test_rolling_forcing_attention(tmp_path):
    sd = tiny_sd(5)
    path = tmp_path / "rolling_forcing_dmd.pt"
    torch.save({"generator": prefixed(sd, "model."), "generator_ema": prefixed(sd, "model._fsdp_wrapped_module.")},
               path)
    loaded = load_model(str(path))
    assert_same(loaded, sd)
    assert "Rolling Forcing" in loaded.layout
    assert (checkpoint_window(loaded.meta), checkpoint_sink(loaded.meta)) == (18, 3)
    assert loaded.meta["steps"] == [1000, 800, 600, 400, 200]


@pytest.mark.parametrize("name, fpb, steps, entry, window", [
    ("chunkwise/causal_forcing.pt", 3, [1000, 750, 500, 250], "generator", None),  # run without --use_ema
    ("framewise/causal_forcing.pt", 1, [1000, 750, 500, 250], "generator_ema", None),
    ("causal-forcing++/framewise-2step.pt", 1, [1000, 500], "generator_ema", None),
    ("causal-forcing++/framewise-1step.pt", 1, [1000], "generator_ema", None),
    ("chunkwise/longvideo.pt", 3, [1000, 750, 500, 250], "generator_ema", 18),
])
def test_causal_forcing_variants(tmp_path, name, fpb, steps, entry, window):
    sds = {"generator": tiny_sd(6), "generator_ema": tiny_sd(13)}
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    torch.save({k: prefixed(v, "model._fsdp_wrapped_module.") for k, v in sds.items()}, path)
    loaded = load_model(str(path))
    assert_same(loaded, sds[entry])  # the entry the project's own inference command reads
    assert f"['{entry}']" in loaded.layout and "Causal Forcing" in loaded.layout
    assert checkpoint_frames_per_block(loaded.meta) == fpb and loaded.meta["steps"] == steps
    assert checkpoint_window(loaded.meta) == window


def test_release_can_be_named_or_switched_off(tmp_path):
    sd = tiny_sd(7)
    path = tmp_path / "my_renamed_model.pt"
    torch.save({"generator": prefixed(sd, "model.")}, path)
    assert load_model(str(path)).meta == {}
    named = load_model(str(path), release="rolling_forcing")
    assert "as asked" in named.layout and checkpoint_window(named.meta) == 18
    off = load_model(str(tmp_path / "my_renamed_model.pt"), release=None)
    assert off.meta == {}
    with pytest.raises(CheckpointError, match="unknown release"):
        load_model(str(path), release="nope")


def test_own_metadata_wins_over_release_name(tmp_path):
    sd = tiny_sd(8)
    path = tmp_path / "longlive_finetune.safetensors"
    save_model(str(path), sd, SMALL, meta={"frames_per_block": 1})
    loaded = load_model(str(path))
    assert loaded.meta["frames_per_block"] == 1 and "release" not in loaded.meta
    assert checkpoint_window(loaded.meta) is None


def test_krea_flat_safetensors_and_peft_wrapped_model(tmp_path):
    sd = tiny_sd(9)
    path = tmp_path / "krea-realtime-video-14b.safetensors"
    save_file(prefixed(sd, "model."), str(path))
    loaded = load_model(str(path))
    assert_same(loaded, sd)
    assert "Krea" in loaded.layout and loaded.meta["frames_per_block"] == 3
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": prefixed(sd, "model.base_model.model.")}, wrapped)
    loaded = load_model(str(wrapped))
    assert_same(loaded, sd)
    assert "prefix 'model.', prefix 'base_model.model.'" in loaded.layout


def test_scaled_fp8_is_folded(tmp_path):
    sd = tiny_sd(10)
    file = {}
    scales = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:
            scales[k] = v.abs().max() / 448.0
            file[k] = (v / scales[k]).to(torch.float8_e4m3fn)
            file[k[: -len(".weight")] + ".scale_weight"] = scales[k].reshape(())
            file[k[: -len(".weight")] + ".scale_input"] = torch.ones(())
        else:
            file[k] = v.to(torch.bfloat16)
    file["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan_fp8_scaled.safetensors"
    save_file(prefixed(file, "model.diffusion_model."), str(path))
    loaded = load_model(str(path))
    assert "scaled fp8" in loaded.layout
    got = loaded.model.state_dict()
    assert got[Q].dtype == torch.bfloat16
    want = (file[Q].to(torch.bfloat16) * scales[Q].to(torch.bfloat16))
    torch.testing.assert_close(got[Q], want, rtol=0, atol=0)
    assert (got[Q].float() - sd[Q]).abs().max() < 0.1 * sd[Q].abs().max()  # fp8 is coarse, but the scale is right


def test_comfy_and_diffusers_lora_formats(tmp_path):
    sd = tiny_sd(11)
    base = tmp_path / "base.safetensors"
    save_file(sd, str(base))
    rank, alpha = 4, 2.0
    down, up = torch.randn(rank, sd[Q].shape[1]), torch.randn(sd[Q].shape[0], rank)
    comfy = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
             "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(alpha)}
    save_file(comfy, str(tmp_path / "comfy_lora.safetensors"))
    loaded = load_model(str(base), lora=str(tmp_path / "comfy_lora.safetensors"), lora_strength=2.0)
    torch.testing.assert_close(loaded.model.state_dict()[Q], sd[Q] + 2.0 * alpha / rank * up @ down)
    assert "ComfyUI keys" in loaded.layout

    dif = wan_to_diffusers(Q)[: -len(".weight")]
    assert dif == "blocks.0.attn1.to_q"
    save_file({f"transformer.{dif}.lora_A.weight": down, f"transformer.{dif}.lora_B.weight": up},
              str(tmp_path / "diffusers_lora.safetensors"))
    loaded = load_model(str(base), lora=str(tmp_path / "diffusers_lora.safetensors"), lora_alpha=8.0)
    torch.testing.assert_close(loaded.model.state_dict()[Q], sd[Q] + 8.0 / rank * up @ down)


def test_lora_that_does_not_fit_is_refused(tmp_path):
    sd = tiny_sd(12)
    base = tmp_path / "base.safetensors"
    save_file(sd, str(base))
    bad = {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.randn(2, 256),
           "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.randn(256, 2),
           "diffusion_model.blocks.0.self_attn.k.lora_down.weight": torch.randn(2, 10),
           "diffusion_model.blocks.0.self_attn.k.lora_up.weight": torch.randn(256, 2)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_model(str(base), lora=str(tmp_path / "bad.safetensors"))
    assert "blocks.7.self_attn.q.weight" in str(e.value) and "blocks.0.self_attn.k.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="is a LoRA"):
        load_model(str(tmp_path / "bad.safetensors"))


def header_only(path, shapes, prefix="", dtype="BF16", metadata=None):
    """A safetensors header declaring ``shapes`` (no tensor data: only the header is ever read)."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[prefix + k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


def meta_shapes(config):
    with torch.device("meta"):
        model = CausalWanModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_14b_and_13b_recognised_from_the_header(tmp_path):
    path = header_only(tmp_path / "krea-realtime-video-14b.safetensors", meta_shapes(WAN_14B), prefix="model.")
    config, layout, meta = inspect_checkpoint(str(path))
    assert config == WAN_14B and size_name(config) == "14B"
    assert "Krea" in layout and meta["frames_per_block"] == 3
    small = header_only(tmp_path / "self_forcing_dmd.safetensors", meta_shapes(WAN_1_3B))
    assert inspect_checkpoint(str(small))[0] == WAN_1_3B
    # a 14B in Wan/ComfyUI names, stored in fp8 (what core UNETLoader reads for the low-memory workflow)
    fp8 = header_only(tmp_path / "wan14b_fp8.safetensors", meta_shapes(WAN_14B), "model.diffusion_model.",
                      dtype="F8_E4M3")
    assert inspect_checkpoint(str(fp8))[0] == WAN_14B


def test_wan22_5b_is_refused(tmp_path):
    shapes = meta_shapes(SMALL.replace(in_dim=48, out_dim=48))
    path = header_only(tmp_path / "longlive2_model_bf16.safetensors", shapes)
    with pytest.raises(CheckpointError, match="Wan 2.2 TI2V-5B"):
        inspect_checkpoint(str(path), release=None)


def test_release_names():
    assert release_for("/m/self_forcing_dmd.pt").key == "self_forcing"
    assert release_for("checkpoints/chunkwise/longvideo.pt").key == "causal_forcing_longvideo"
    assert release_for("longlive_models/models/longlive_base.pt").key == "longlive"
    assert release_for("models/wan2.1_t2v_1.3B_bf16.safetensors") is None
