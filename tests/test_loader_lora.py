"""A LoRA merged at load by 'Load Self Forcing Model' (``lora_name``/``lora_strength``) and by the CLI
(``generate --lora``, ``convert-lora``), all through the one loader (``sf_model.checkpoint.load_model(lora=...)``).

The node runs against the stand-ins of ``test_reliability_nodes`` for the few ComfyUI modules it imports (CPU,
no ComfyUI); the models and LoRAs are tiny and random, in ComfyUI core's key format and in peft's (LongLive's
``{"generator_lora": ...}`` ``.pt``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from self_forcing.cli import main
from self_forcing.cli.generate import default_model_path
from self_forcing.nodes import model as node_model
from self_forcing.nodes import schema
from self_forcing.sf_model.checkpoint import load_model, save_model
from self_forcing.sf_model.config import TINY

HERE = Path(__file__).resolve().parent
ADAPTED = ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.v.weight", "blocks.1.ffn.0.weight")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_sf_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_stand_ins = _sibling("test_reliability_nodes")


# -- tiny LoRA files ------------------------------------------------------------------------------------
def random_factors(sd: dict, names=ADAPTED, rank: int = 4, seed: int = 1, scale: float = 0.3) -> dict:
    """{Wan weight name: (down [rank, in], up [out, rank])} for the named linears of ``sd``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        o, i = sd[n].shape
        out[n] = (torch.randn(rank, i, generator=g) * scale, torch.randn(o, rank, generator=g) * scale)
    return out


def write_core(path, factors: dict, alpha: float | None = None) -> str:
    """ComfyUI core's format: diffusion_model.<linear>.lora_down/lora_up.weight and alpha (safetensors)."""
    sd = {}
    for n, (down, up) in factors.items():
        key = "diffusion_model." + n[: -len(".weight")]
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(sd, str(path))
    return str(path)


def write_peft(path, factors: dict) -> str:
    """LongLive's lora.pt: {"generator_lora": {base_model.model.<linear>.lora_A/B.default.weight}} (no alpha)."""
    sd = {}
    for n, (down, up) in factors.items():
        key = "base_model.model." + n[: -len(".weight")]
        sd[f"{key}.lora_A.default.weight"], sd[f"{key}.lora_B.default.weight"] = down, up
    torch.save({"generator_lora": sd}, str(path))
    return str(path)


def hand_merged(sd: dict, factors: dict, strength: float) -> dict:
    """W + strength * up @ down (alpha = rank), written here independently of the loader."""
    out = dict(sd)
    for n, (down, up) in factors.items():
        out[n] = sd[n] + strength * (up @ down)
    return out


def weights_of(handle_or_loaded) -> dict:
    return {k: v.detach().clone() for k, v in handle_or_loaded.model.state_dict().items()}


# -- the node, against the ComfyUI stand-ins --------------------------------------------------------------
@pytest.fixture
def comfy(tmp_path, monkeypatch, make_tiny):
    fp = _stand_ins.fake_folder_paths(str(tmp_path))
    fp.folder_names_and_paths["loras"] = ([os.path.join(fp.models_dir, "loras")], {".safetensors", ".pt"})
    for name, module in _stand_ins._fake_comfyui(fp).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "self_forcing.nodes.comfy", raising=False)
    module = importlib.import_module("self_forcing.nodes.comfy")
    module.ensure_folders()
    module.fp = fp
    for folder in ("diffusion_models", "loras"):
        os.makedirs(fp.get_folder_paths(folder)[0], exist_ok=True)
    model = make_tiny(TINY, seed=3)
    module.base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    module.model_path = os.path.join(fp.get_folder_paths("diffusion_models")[0], "tiny.safetensors")
    save_model(module.model_path, model, TINY, meta={"frames_per_block": 1})
    module.factors = random_factors(module.base_sd)
    module.lora_dir = fp.get_folder_paths("loras")[0]
    write_core(os.path.join(module.lora_dir, "style.safetensors"), module.factors)
    os.makedirs(os.path.join(module.lora_dir, "sub"))
    write_peft(os.path.join(module.lora_dir, "sub", "peft_lora.pt"), module.factors)
    yield module
    sys.modules.pop("self_forcing.nodes.comfy", None)


def load_node(comfy, **inputs):
    """The loader node as ComfyUI runs it (CPU, fp32): (handle, info)."""
    out = comfy.SelfForcingModelLoader.execute(model_name="tiny.safetensors", dtype="fp32", attention="sdpa",
                                               device="cpu", **inputs)
    return out.values


@pytest.mark.parametrize("lora_name", ["style.safetensors", "sub/peft_lora.pt"])
def test_the_node_merges_the_lora_as_load_model_does(comfy, lora_name):
    handle, info = load_node(comfy, lora_name=lora_name, lora_strength=0.7)
    want = load_model(comfy.model_path, dtype=torch.float32, lora=os.path.join(comfy.lora_dir, lora_name),
                      lora_strength=0.7)
    got = weights_of(handle)
    assert got.keys() == weights_of(want).keys()
    assert all(torch.equal(got[k], v) for k, v in weights_of(want).items())
    # the LoRA is really there: exactly the adapted weights moved, by strength * up @ down
    changed = sorted(k for k in got if not torch.equal(got[k], comfy.base_sd[k]))
    assert changed == sorted(ADAPTED)
    expected = hand_merged(comfy.base_sd, comfy.factors, 0.7)
    for k in ADAPTED:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)
    assert f"LoRA: {lora_name} merged at strength 0.7" in info
    assert handle.lora == lora_name and handle.lora_strength == 0.7


def test_without_lora_inputs_a_saved_workflow_loads_the_plain_model(comfy):
    handle, info = load_node(comfy)  # today's saved workflows: no lora_name / lora_strength
    got = weights_of(handle)
    assert all(torch.equal(got[k], v) for k, v in comfy.base_sd.items())
    assert "LoRA: none" in info and handle.lora is None
    handle, info = load_node(comfy, lora_name="none", lora_strength=1.0)
    assert all(torch.equal(weights_of(handle)[k], v) for k, v in comfy.base_sd.items()) and "LoRA: none" in info


def test_strength_zero_is_the_model_without_lora(comfy):
    handle, info = load_node(comfy, lora_name="style.safetensors", lora_strength=0.0)
    got = weights_of(handle)
    assert all(torch.equal(got[k], v) for k, v in comfy.base_sd.items())
    assert "LoRA: none" in info
    # the loader itself agrees: a merge at strength 0 leaves every weight as it was
    zero = weights_of(load_model(comfy.model_path, dtype=torch.float32,
                                 lora=os.path.join(comfy.lora_dir, "style.safetensors"), lora_strength=0.0))
    assert all(torch.equal(zero[k], v) for k, v in comfy.base_sd.items())


def run_cached(comfy, cache: dict, **inputs):
    """ComfyUI's output cache for the loader: the key is the input values plus ``fingerprint_inputs``."""
    node = comfy.SelfForcingModelLoader
    inputs = dict(model_name="tiny.safetensors", dtype="fp32", attention="sdpa", device="cpu", keep_loaded=True,
                  **inputs)
    key = (tuple(sorted(inputs.items())), node.fingerprint_inputs(**inputs))
    if key not in cache:
        cache[key] = node.execute(**inputs).values[0]
    return cache[key]


def test_a_kept_handle_is_not_reused_for_another_lora_or_strength_or_a_rewritten_file(comfy):
    cache: dict = {}
    one = run_cached(comfy, cache, lora_name="style.safetensors", lora_strength=1.0)
    assert run_cached(comfy, cache, lora_name="style.safetensors", lora_strength=1.0) is one  # same: reused
    half = run_cached(comfy, cache, lora_name="style.safetensors", lora_strength=0.5)
    peft = run_cached(comfy, cache, lora_name="sub/peft_lora.pt", lora_strength=1.0)
    plain = run_cached(comfy, cache)
    assert len({id(h) for h in (one, half, peft, plain)}) == 4
    q = ADAPTED[0]
    assert not torch.equal(weights_of(one)[q], weights_of(half)[q])
    assert torch.equal(weights_of(plain)[q], comfy.base_sd[q])
    # the same file name with other contents (a retrained LoRA): another key, the new weights
    write_core(os.path.join(comfy.lora_dir, "style.safetensors"), random_factors(comfy.base_sd, seed=9))
    os.utime(os.path.join(comfy.lora_dir, "style.safetensors"), ns=(1, 1))  # the stamp differs even on coarse clocks
    again = run_cached(comfy, cache, lora_name="style.safetensors", lora_strength=1.0)
    assert again is not one and not torch.equal(weights_of(again)[q], weights_of(one)[q])
    # the fingerprint alone (what ComfyUI adds to the input values)
    fingerprint = comfy.SelfForcingModelLoader.fingerprint_inputs
    base = fingerprint(model_name="tiny.safetensors")
    assert fingerprint(model_name="tiny.safetensors", lora_name="style.safetensors", lora_strength=0.0) == base
    assert len({base, fingerprint(model_name="tiny.safetensors", lora_name="style.safetensors"),
                fingerprint(model_name="tiny.safetensors", lora_name="style.safetensors", lora_strength=2.0),
                fingerprint(model_name="tiny.safetensors", lora_name="sub/peft_lora.pt")}) == 4


def test_lora_strength_range_and_bad_files_are_clear_errors(comfy):
    spec = node_model.LOADER.input("lora_strength")
    assert (spec.min, spec.max, spec.default, spec.optional) == (-10.0, 10.0, 1.0, True)
    assert "Range -10 to 10." in spec.tooltip  # the range is written once, in the spec
    node = comfy.SelfForcingModelLoader
    assert node.validate_inputs(device="cpu", lora_strength=-10.0) is True
    with pytest.raises(ValueError, match="lora_strength 11 is above the maximum 10"):
        node.validate_inputs(lora_strength=11)
    with pytest.raises(ValueError, match="lora_strength 11 is above the maximum 10"):  # linked value, run time
        load_node(comfy, lora_name="style.safetensors", lora_strength=11)
    with pytest.raises(ValueError, match=r"LoRA 'gone.safetensors' was not found in .*loras"):
        load_node(comfy, lora_name="gone.safetensors")
    with open(os.path.join(comfy.lora_dir, "garbage.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_node(comfy, lora_name="garbage.safetensors")
    wrong = random_factors({"blocks.0.self_attn.q.weight": torch.zeros(64, 32)}, names=("blocks.0.self_attn.q.weight",))
    write_core(os.path.join(comfy.lora_dir, "other_model.safetensors"), wrong)
    with pytest.raises(ValueError, match=r"other_model.safetensors.*does not fit the model"):
        load_node(comfy, lora_name="other_model.safetensors")


def test_the_object_info_lists_none_then_the_lora_files():
    info = schema.object_info(node_model.LOADER, {"model_name": ["a.safetensors"],
                                                  "lora_name": node_model.lora_choices(["x.safetensors", "d/y.pt"])})
    assert info["input_order"]["optional"] == ["lora_name", "lora_strength"]
    lora = info["input"]["optional"]["lora_name"][1]
    assert lora["options"] == ["none", "x.safetensors", "d/y.pt"] and lora["default"] == "none"
    strength = info["input"]["optional"]["lora_strength"]
    assert strength[0] == "FLOAT" and (strength[1]["min"], strength[1]["max"], strength[1]["default"]) == (-10, 10, 1)
    assert info["input_order"]["required"] == ["model_name", "dtype", "attention", "device", "keep_loaded",
                                               "download_if_missing"]


def test_saved_ui_workflows_without_the_lora_widgets_convert_to_the_plain_loader():
    """A workflow saved before the LoRA inputs existed (six loader widgets) still converts and validates: the
    inputs it lacks take their defaults (no LoRA). No loader in a shipped editor file has a null widget value
    (the frontend would send null for the LoRA combo, which ComfyUI refuses)."""
    import json

    from self_forcing.workflows.check import check_api, ui_to_api
    from self_forcing.workflows.schemas import all_schemas

    schemas = all_schemas()
    loaders = 0
    for path in sorted((HERE.parent / "example_workflows").glob("*.json")):
        ui = json.loads(path.read_text())
        for n in ui["nodes"]:
            if n["type"] == "SelfForcingModelLoader":
                loaders += 1
                assert None not in n["widgets_values"], path.name
                n["widgets_values"] = n["widgets_values"][:6]  # as saved with today's node
        prompt = ui_to_api(ui, schemas)
        assert check_api(prompt, schemas) == [], path.name
        for node in prompt.values():
            if node["class_type"] == "SelfForcingModelLoader":
                assert node["inputs"].get("lora_name", "none") == "none", path.name
    assert loaders >= 5


# -- the CLI ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """A random LoRA (core format) on the bundled toy model's linears, strong enough to change its frames."""
    root = tmp_path_factory.mktemp("toy_lora")
    sd = load_model(default_model_path(), dtype=torch.float32).model.state_dict()
    names = [f"blocks.{b}.{m}.weight" for b in range(4) for m in ("self_attn.q", "self_attn.o", "ffn.2")]
    factors = random_factors(sd, names=names, rank=4, seed=5, scale=0.2)
    return write_core(root / "toy_lora.safetensors", factors), write_peft(root / "toy_lora.pt", factors)


def raw_run(tmp_path, name: str, *extra) -> bytes:
    out = tmp_path / name
    assert main(["generate", "--frames", "3", "--seed", "1", "--raw", str(out), "--no-progress", *map(str, extra)]) == 0
    return out.read_bytes()


def test_generate_lora_changes_the_frames_as_load_model_lora_does(toy_lora, tmp_path, capsys, cli_frames):
    core, peft = toy_lora
    plain = raw_run(tmp_path, "plain.rgb")
    merged = raw_run(tmp_path, "lora.rgb", "--lora", core, "--lora-strength", "0.8")
    assert merged != plain
    want = cli_frames(load_model(default_model_path(), dtype=torch.float32, lora=core, lora_strength=0.8), 3, 1)
    assert merged == want.tobytes()
    assert "toy_lora.safetensors merged" in capsys.readouterr().err  # the run says what it merged
    assert raw_run(tmp_path, "peft.rgb", "--lora", peft, "--lora-strength", "0.8") == merged  # same factors
    assert raw_run(tmp_path, "zero.rgb", "--lora", core, "--lora-strength", "0") == plain


@pytest.mark.parametrize("argv, message", [
    (["--lora", "{tmp}/missing.safetensors"], "--lora: LoRA file not found: {tmp}/missing.safetensors"),
    (["--lora", "{tmp}/garbage.safetensors"], "{tmp}/garbage.safetensors"),
    (["--lora-strength", "0.5"], "--lora-strength needs --lora FILE"),
    (["--lora", "{tmp}/other.safetensors"], "does not fit the model"),
])
def test_generate_lora_errors_name_the_file(argv, message, tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    write_core(tmp_path / "other.safetensors", random_factors({"blocks.0.ffn.0.weight": torch.zeros(8, 8)},
                                                              names=("blocks.0.ffn.0.weight",)))
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc = main(["generate", "--frames", "3", "--raw", str(tmp_path / "x.rgb"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "x.rgb").exists()


def test_convert_lora_round_trips_peft_to_core(comfy, tmp_path, capsys):
    peft = os.path.join(comfy.lora_dir, "sub", "peft_lora.pt")
    dst = tmp_path / "converted.safetensors"
    assert main(["convert-lora", peft, str(dst)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"wrote {dst}: 9 keys (3 linears), rank 4, alpha 4"
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"diffusion_model.{n[:-7]}.{p}" for n in ADAPTED
                                          for p in ("lora_down.weight", "lora_up.weight", "alpha"))
    from_peft = weights_of(load_model(comfy.model_path, dtype=torch.float32, lora=peft, lora_strength=0.6))
    from_core = weights_of(load_model(comfy.model_path, dtype=torch.float32, lora=str(dst), lora_strength=0.6))
    assert all(torch.equal(from_core[k], v) for k, v in from_peft.items())
    assert any(not torch.equal(from_core[k], comfy.base_sd[k]) for k in ADAPTED)
    # --alpha: peft stores none; alpha 2 with rank 4 halves the delta
    assert main(["convert-lora", peft, str(tmp_path / "half.safetensors"), "--alpha", "2"]) == 0
    assert "alpha 2" in capsys.readouterr().out
    half = weights_of(load_model(comfy.model_path, dtype=torch.float32, lora=str(tmp_path / "half.safetensors")))
    expected = hand_merged(comfy.base_sd, comfy.factors, 0.5)
    torch.testing.assert_close(half[ADAPTED[0]], expected[ADAPTED[0]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src, dst, message", [
    ("{tmp}/missing.pt", "{tmp}/out.safetensors", "LoRA file not found: {tmp}/missing.pt"),
    ("{tmp}/garbage.pt", "{tmp}/out.safetensors", "{tmp}/garbage.pt"),
    ("{tmp}/model.safetensors", "{tmp}/out.safetensors", "{tmp}/model.safetensors: LoRA: key"),
    ("{tmp}/garbage.pt", "{tmp}/out.pt", "must end in .safetensors"),
    ("{tmp}/garbage.pt", "{tmp}/no/such/folder/out.safetensors", "does not exist"),
])
def test_convert_lora_errors_name_the_file(src, dst, message, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 truncated zip")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    rc = main(["convert-lora", src.format(tmp=tmp_path), dst.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out.safetensors").exists()
