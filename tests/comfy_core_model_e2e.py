#!/usr/bin/env python3
"""End-to-end check of the core MODEL input in a REAL ComfyUI (not part of CI: CI has no ComfyUI).

Writes, with this package: a small random Wan-shaped causal model (dim 256 = 2 heads of 128, which ComfyUI's Wan
detection assumes; saved with ``save_model``: bare Wan/ComfyUI key names and the ``causal_ar`` metadata), a random
LoRA in core's key format (``training.lora.save_lora``), the LoRA merged into the weights BY HAND
(W + alpha/rank * up @ down, float64, written as float32) and a random prompt. Then, in ComfyUI's own Python
(the harness venv, in-process, no server), runs the graph nodes' code: core ``UNETLoader`` -> core
``LoraLoaderModelOnly`` -> our 'Self Forcing Stream Sampler' (and 'Extend Video'), and our 'Load Self Forcing
Model' on the base and on the hand-merged file -> the same sampler. Passes when:

- core MODEL without LoRA -> our sampler == our loader -> our sampler (bit-identical: the same weights);
- core MODEL + LoRA -> our sampler == our loader of the hand-merged file (max |diff| <= 1e-4 on latents of
  magnitude ~1; float32 on the CPU: the only difference is the order of the LoRA sum);
- the LoRA changes the latents (so the comparison above is not vacuous), a second run gives the same latents,
  after a run none of our parameters holds memory (weights borrowed, then released);
- the other way: our reader (an official-layout .pt) -> ``core_model_from_file`` (and the node 'Load Self Forcing
  Model (core MODEL)') (core's public
  ``comfy.sd.load_diffusion_model_state_dict``) -> core ``LoraLoaderModelOnly`` -> our sampler == the hand-merged
  file through our loader (<= 1e-4), and without the LoRA == our loader (<= 1e-6);
- extend from the sampler's latent: core MODEL + LoRA == our loader of the merged file (<= 1e-4);
- the sampler's model input has type 'SELF_FORCING_MODEL,MODEL' and core accepts a saved 'SELF_FORCING_MODEL'
  link and a 'MODEL' link to it (comfy_execution.validation.validate_node_input).

    python tests/comfy_core_model_e2e.py [--comfy-dir DIR] [--comfy-python PY] [--work DIR]

Defaults as tests/comfy_lora_e2e.py: $COMFY_DIR, else $COMFY_HARNESS_HOME/ComfyUI (COMFY_HARNESS_HOME default
~/comfy-harness); the python of $COMFY_VENV (default $COMFY_HARNESS_HOME/venv). Nothing is written into ComfyUI.
The command line, the model, the LoRA and the run in ComfyUI are tests/comfy_inprocess.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comfy_inprocess import parse_args, report, run_in_comfy, wan_shaped_model, with_random_lora

COMFY_SIDE = r'''
import json, sys
import torch
work, = sys.argv[1:]
import comfy.cli_args
comfy.cli_args.args.cpu = True  # as main.py --cpu
import folder_paths
folder_paths.add_model_folder_path("diffusion_models", work)
folder_paths.add_model_folder_path("loras", work)
import nodes as core_nodes
from comfy_execution.validation import validate_node_input
from self_forcing.nodes import comfy as sf
from self_forcing.nodes.core_model import is_core_model

prompt = torch.load(f"{work}/prompt.pt")
positive = [[prompt, {}]]
KW = dict(width=64, height=64, length=17, seed=7, frames_per_block=1, steps="1000,750,500,250", shift=5.0,
          context_noise=0.0)

def sample(model):
    return sf.SelfForcingSampler.execute(model=model, positive=positive, **KW).args[0]["samples"]

def extend(model, latent):
    out = sf.SelfForcingExtendVideo.execute(model=model, positive=positive, latent={"samples": latent},
                                           extend_frames=8, history_frames=2, resample_strength=0.3, seed=3,
                                           frames_per_block=1, steps="1000,500", shift=5.0, context_noise=0.0,
                                           output="joined")
    return out.args[0]["samples"]

def ours(name):
    return sf.SelfForcingModelLoader.execute(model_name=name, dtype="fp32", attention="sdpa", device="cpu").args[0]

core = core_nodes.UNETLoader().load_unet("base.safetensors", "default")[0]
core_lora = core_nodes.LoraLoaderModelOnly().load_lora_model_only(core, "lora.safetensors", 1.0)[0]
res = {"core_class": type(core.model).__name__, "core_dtype": str(core.model_dtype()),
       "is_core": [is_core_model(core), is_core_model(core_lora)], "lora_patches": len(core_lora.patches)}
a_core = sample(core)
a_ours = sample(ours("base.safetensors"))
b_core = sample(core_lora)
b_core2 = sample(core_lora)
b_merged = sample(ours("merged.safetensors"))
from self_forcing.nodes.core_model import _SKELETONS
res["skeletons"] = len(_SKELETONS)
res["params_left_on_a_device"] = sum(p.device.type != "meta" for s in _SKELETONS.values() for p in s.model.parameters())
# the other way: our reader (here an official-layout training checkpoint) -> a core MODEL -> core LoRA node
import comfy.sd
from self_forcing.nodes.core_model import core_model_from_file
try:
    core_nodes.UNETLoader().load_unet("official.pt", "default")
    res["unetloader_reads_official"] = True
except Exception as e:  # noqa: BLE001 - recorded
    res["unetloader_reads_official"] = repr(e)[:200]
ours_core = core_model_from_file(f"{work}/official.pt", build=comfy.sd.load_diffusion_model_state_dict,
                                 dtype=torch.float32)
node_core, node_info = sf.SelfForcingCoreModelLoader.execute(model_name="official.pt", weight_dtype="fp32").args
res["node_info"] = node_info
res["node_diff"] = float((sample(node_core) - a_ours).abs().max())
ours_lora = core_nodes.LoraLoaderModelOnly().load_lora_model_only(ours_core, "lora.safetensors", 1.0)[0]
res["from_ours_meta"] = ours_lora.model_options.get("self_forcing", {}).get("meta", {}).get("frames_per_block")
res["from_ours_diff"] = float((sample(ours_core) - a_ours).abs().max())
res["from_ours_lora_diff"] = float((sample(ours_lora) - b_merged).abs().max())
e_core = extend(core_lora, b_core)
e_merged = extend(ours("merged.safetensors"), b_merged)
d = lambda x, y: float((x.float() - y.float()).abs().max())
res.update(shape=list(a_core.shape), no_lora_diff=d(a_core, a_ours), lora_diff=d(b_core, b_merged),
           lora_effect=d(b_core, a_core), rerun_diff=d(b_core, b_core2), extend_diff=d(e_core, e_merged),
           extend_shape=list(e_core.shape), latent_scale=float(a_core.abs().max()))
schema = sf.SelfForcingSampler.define_schema()
itype = next(i for i in schema.inputs if i.id == "model").get_io_type()
res.update(input_type=itype, link_ours=bool(validate_node_input("SELF_FORCING_MODEL", itype)),
           link_core=bool(validate_node_input("MODEL", itype)), link_vae=bool(validate_node_input("VAE", itype)))
# fp8 weights (UNETLoader weight_dtype fp8_e4m3fn): cast to core's compute dtype for the run; the reference is our
# loader on the same values (each tensor as core stores it, widened to float32)
from self_forcing.sf_model.checkpoint import save_model
from self_forcing.nodes.core_model import compute_dtype
core_fp8 = core_nodes.UNETLoader().load_unet("base.safetensors", "fp8_e4m3fn")[0]
res["fp8_stored"] = sorted({str(v.dtype) for v in core_fp8.model.diffusion_model.state_dict().values()})
res["fp8_compute"] = str(compute_dtype(core_fp8))
f8 = sample(core_fp8)
save_model(f"{work}/fp8_values.safetensors", {k: v.float() for k, v in core_fp8.model.diffusion_model.state_dict().items()},
           ours("base.safetensors").config, dtype=torch.float32)
res["fp8_diff"] = d(f8, sample(ours("fp8_values.safetensors")))
res["fp8_vs_full"] = d(f8, a_ours)
# every node's live object_info == its spec's (core_model.as_in_comfy: the union type on the samplers)
from self_forcing.nodes.catalogue import NODES_BY_ID
from self_forcing.nodes.core_model import as_in_comfy
from self_forcing.nodes.schema import object_info
res["object_info_mismatches"] = []
for cls in sf.NODES:
    live = json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
    req = {**live["input"].get("required", {}), **live["input"].get("optional", {})}
    dyn = {n: req[n][1].get("options") for n in ("model_name", "embeds_name", "lora_name") if n in req}
    mine = json.loads(json.dumps(as_in_comfy(live["name"], object_info(NODES_BY_ID[live["name"]], dyn))))
    res["object_info_mismatches"] += [f"{live['name']}.{k}" for k in mine if mine[k] != live.get(k)]
print(json.dumps(res))
'''


def write_files(work: Path) -> None:
    """base.safetensors, lora.safetensors (core's key format), merged.safetensors (merged by hand), prompt.pt."""
    import torch
    from safetensors.torch import load_file

    from self_forcing.sf_model.checkpoint import load_state_dict_file, save_model
    from self_forcing.training.lora import save_lora

    cfg, base = wan_shaped_model()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # every weight random (the init zeroes the head: the output would not depend on the rest)
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5))
    save_model(str(work / "base.safetensors"), base, cfg, dtype=torch.float32)
    model = with_random_lora(base, 0.5)
    save_lora(str(work / "lora.safetensors"), model, {"base": "base.safetensors"}, dtype=torch.float32)
    # The merge by hand, from the LoRA file itself.
    sd, config, _, _, _ = load_state_dict_file(str(work / "base.safetensors"))
    lora = load_file(str(work / "lora.safetensors"))
    merged = 0
    for key in [k[:-len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")]:
        up, down = lora[f"{key}.lora_up.weight"].double(), lora[f"{key}.lora_down.weight"].double()
        scale = float(lora[f"{key}.alpha"]) / down.shape[0]
        name = key.removeprefix("diffusion_model.") + ".weight"
        sd[name] = (sd[name].double() + scale * (up @ down)).float()
        merged += 1
    assert merged > 0
    save_model(str(work / "merged.safetensors"), sd, config, dtype=torch.float32)
    official = {"generator_ema": {f"model.{k}": v for k, v in load_state_dict_file(str(work / "base.safetensors"))[0].items()}}
    torch.save(official, work / "official.pt")  # the official Self Forcing layout ({'generator_ema': {'model.*'}})
    torch.save(torch.randn(1, 24, 4096, generator=torch.Generator().manual_seed(5)), work / "prompt.pt")


def main() -> int:
    args, work = parse_args(__doc__, "comfy_core_model_e2e_")
    write_files(work)
    r = run_in_comfy(args, COMFY_SIDE, work, with_package=True)
    if r is None:
        return 1
    checks = {
        "core UNETLoader gives a core MODEL (Wan)": r["is_core"] == [True, True] and r["core_class"].startswith("WAN"),
        "the LoRA patches weights": r["lora_patches"] > 0,
        "core MODEL == our loader (no LoRA, bit-identical)": r["no_lora_diff"] == 0.0,
        "core MODEL + LoRA == our loader of the hand-merged file (<= 1e-4)": r["lora_diff"] <= 1e-4,
        "the LoRA changes the latents (> 1e-2)": r["lora_effect"] > 1e-2,
        "a second run gives the same latents": r["rerun_diff"] == 0.0,
        "no borrowed weight kept after the runs": r["params_left_on_a_device"] == 0 and r["skeletons"] >= 1,
        "our reader -> core MODEL == our loader (no LoRA, <= 1e-6)": r["from_ours_diff"] <= 1e-6,
        "'Load Self Forcing Model (core MODEL)' node: same, reports the layout":
            r["node_diff"] <= 1e-6 and "generator_ema" in r["node_info"],
        "our reader -> core MODEL -> core LoRA == hand-merged (<= 1e-4)": r["from_ours_lora_diff"] <= 1e-4,
        "extend: core MODEL + LoRA == hand-merged (<= 1e-4)": r["extend_diff"] <= 1e-4,
        "fp8 weights: == our loader on the same values (<= 1e-4), and they differ from full precision":
            "torch.float8_e4m3fn" in r["fp8_stored"] and r["fp8_diff"] <= 1e-4 and r["fp8_vs_full"] > 1e-3,
        "live object_info == specs (as_in_comfy)": r["object_info_mismatches"] == [],
        "model input 'SELF_FORCING_MODEL,MODEL' takes both links, not others":
            r["input_type"] == "SELF_FORCING_MODEL,MODEL" and r["link_ours"] and r["link_core"] and not r["link_vae"],
    }
    return report({"work": str(work), **r}, checks)


if __name__ == "__main__":
    sys.exit(main())
