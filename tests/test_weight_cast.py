"""Float8 weights cast per linear layer at run time (sf_model.weight_cast) on a tiny causal Wan model (CPU).

Reference for every check: the same float8 values upcast to the compute dtype by hand, in a plain model.
Exact equality is expected (the cast layer computes ``weight.to(dtype) [* scale.to(dtype)]`` at run time, the
reference holds that very tensor).
"""

import copy

import pytest
import torch
import torch.nn as nn

from self_forcing.sf_model.layouts import dequantize_scaled_fp8
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.speed import use_fused_kernels
from self_forcing.sf_model.weight_cast import (CastLinear, cast_linears, held_bytes, linear_dtype, linear_weight,
                                               split_scales, uncast_linears)

F8 = torch.float8_e4m3fn
OPTS = StreamOptions(frames_per_block=1, steps=(1000, 500))


def context(dim: int) -> torch.Tensor:
    return torch.randn(1, 6, dim, generator=torch.Generator().manual_seed(1))


def run(model) -> torch.Tensor:
    return generate(model, context(model.config.text_dim), num_frames=3, height=4, width=8, seed=2, options=OPTS)


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def split_fp8(model, dtype):
    """(fp8 model, reference): linear weights/biases in float8 (the rest in ``dtype``), and a plain model
    holding those float8 values upcast to ``dtype``."""
    fp8 = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for name in linear_names(fp8):
            layer = fp8.get_submodule(name)
            layer.weight = nn.Parameter(layer.weight.to(F8), requires_grad=False)
            layer.bias = nn.Parameter(layer.bias.to(F8), requires_grad=False)
    ref = copy.deepcopy(fp8)
    for p in ref.parameters():
        p.data = p.data.to(dtype)
    return fp8, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linears_generate_what_the_upcast_model_generates_and_stay_float8(tiny_model, dtype):
    fp8, ref = split_fp8(tiny_model, dtype)
    assert cast_linears(fp8, dtype) == len(linear_names(fp8))
    fp8.check_dtypes()  # float8 layers count in their compute dtype
    held = held_bytes(fp8)
    got = run(fp8)
    assert torch.equal(got, run(ref))
    # nothing was upcast for good: the linear parameters are float8 after the run, the bytes held unchanged
    for name in linear_names(fp8):
        layer = fp8.get_submodule(name)
        assert type(layer) is CastLinear and layer.weight.dtype == F8 and layer.bias.dtype == F8
    assert held_bytes(fp8) == held < held_bytes(ref)
    linear_params = sum(p.numel() for n in linear_names(fp8) for p in fp8.get_submodule(n).parameters())
    assert held_bytes(ref) - held == linear_params * (torch.empty((), dtype=dtype).element_size() - 1)


def test_scaled_fp8_applies_each_layers_scale_when_it_runs(tiny_model):
    """ComfyUI's scaled fp8: weight / scale stored in float8, ``<layer>.scale_weight`` gives real units."""
    dtype = torch.bfloat16
    base = tiny_model.to(dtype)
    sd = {}
    for name, tensor in base.state_dict().items():
        sd[name] = tensor
    for i, name in enumerate(linear_names(base)):
        scale = torch.tensor(0.02 * (i + 1), dtype=torch.float32)
        sd[f"{name}.weight"] = (base.get_submodule(name).weight.float() / scale).to(F8)
        sd[f"{name}.scale_weight"] = scale
        sd[f"{name}.scale_input"] = torch.ones(())
    sd["scaled_fp8"] = torch.empty(0, dtype=F8)
    plain, was_scaled = dequantize_scaled_fp8(sd, dtype)  # the loader's fold: the reference values
    assert was_scaled
    ref = copy.deepcopy(base)
    ref.load_state_dict(plain)
    weights, scales = split_scales({k: v for k, v in sd.items() if k != "scaled_fp8"})
    assert set(scales) == set(linear_names(base)) and not any("scale" in k for k in weights)
    fp8 = copy.deepcopy(base)
    fp8.load_state_dict(weights, assign=True)
    cast_linears(fp8, dtype, scales)
    q = fp8.blocks[0].self_attn.q
    assert q.weight.dtype == F8 and torch.equal(linear_weight(q), ref.blocks[0].self_attn.q.weight)
    got = run(fp8)
    assert torch.equal(got, run(ref))
    # without its scales the same float8 values give another video: the scale is really applied
    uncast_linears(fp8)
    cast_linears(fp8, dtype)
    assert not torch.allclose(run(fp8), got)


def test_the_default_path_reads_the_plain_weights_and_cast_layers_are_undone(tiny_model):
    model = copy.deepcopy(tiny_model)
    before = run(model)
    assert cast_linears(model, torch.float32) == 0  # nothing float8: nothing changes
    for name in linear_names(model):
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and linear_weight(layer) is layer.weight
        assert linear_dtype(layer) is layer.weight.dtype
    assert torch.equal(run(model), before)
    fp8, _ = split_fp8(tiny_model, torch.float32)
    cast_linears(fp8, torch.float32)
    uncast_linears(fp8)
    assert all(type(fp8.get_submodule(n)) is nn.Linear for n in linear_names(fp8))
    assert not hasattr(fp8.head.head, "weight_scale")
    with pytest.raises(ValueError, match="several devices/dtypes"):  # float8 layers not cast: refused
        fp8.check_dtypes()


def test_fused_qkv_and_the_fused_trunk_are_refused_for_float8_layers(tiny_model):
    fp8, _ = split_fp8(tiny_model, torch.float32)
    cast_linears(fp8, torch.float32)
    with pytest.raises(ValueError, match="float8"):
        fp8.fuse_qkv()
    with pytest.raises(ValueError, match="float8"):
        use_fused_kernels(fp8)
    with pytest.raises(ValueError, match="not float8 linear weights"):
        cast_linears(copy.deepcopy(tiny_model), torch.float32, {"patch_embedding": torch.ones(())})


def test_our_loader_stores_the_linear_layers_in_float8_on_request(tiny_model, tmp_path):
    from self_forcing.sf_model.checkpoint import CheckpointError, load_model, save_model

    path = str(tmp_path / "tiny.safetensors")
    save_model(path, tiny_model, tiny_model.config)
    model = load_model(path, dtype=F8).model
    names = linear_names(model)
    assert all(type(model.get_submodule(n)) is CastLinear for n in names)
    assert {p.dtype for n in names for p in model.get_submodule(n).parameters()} == {F8}
    assert model.dtype == torch.bfloat16
    # reference: the file's float32 values rounded to float8 once, then upcast to bf16 by hand
    ref = load_model(path, dtype=torch.float32).model
    linear = {f"{n}.{k}" for n in names for k in ("weight", "bias")}
    for name, p in ref.named_parameters():
        p.data = (p.data.to(F8) if name in linear else p.data).to(torch.bfloat16)
    assert torch.equal(run(model), run(ref))
    assert held_bytes(model) < held_bytes(ref)
    with torch.no_grad():
        tiny_model.blocks[1].ffn[2].weight[0, 0] = 1000.0  # beyond e4m3's 448: the cast would saturate
    save_model(path, tiny_model, tiny_model.config)
    with pytest.raises(CheckpointError, match="blocks.1.ffn.2.weight"):
        load_model(path, dtype=F8)
    assert load_model(path, dtype=torch.bfloat16).model.dtype == torch.bfloat16  # other dtypes as before
