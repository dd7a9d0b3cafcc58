#!/usr/bin/env python3
"""End-to-end check of the LoRA export in a REAL ComfyUI's core code (not part of CI: CI has no ComfyUI).

Writes, with this package: a small random Wan-shaped generator (dim 256 = 2 heads of 128, which ComfyUI's
Wan detection assumes), the same with random LoRA adapters (``training.lora``), the adapters as a ComfyUI LoRA
file and the merged model. Then, in ComfyUI's own Python (the harness venv, in-process, no server), does what
the graph UNETLoader -> LoraLoaderModelOnly does: ``comfy.sd.load_diffusion_model`` on the base and
``comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)``, patches the weights, and compares them with
``load_diffusion_model`` of the merged file. Passes when the model is detected as Wan, every LoRA key is
loaded (no "lora key not loaded" warning), exactly the adapted weights are patched, and the patched weights
equal the merged ones (float32, max |diff| <= 1e-5).

    python tests/comfy_lora_e2e.py [--comfy-dir DIR] [--comfy-python PY] [--work DIR]

Defaults: $COMFY_DIR, else $COMFY_HARNESS_HOME/ComfyUI (COMFY_HARNESS_HOME default ~/comfy-harness); the
python of $COMFY_VENV (default $COMFY_HARNESS_HOME/venv). Nothing is written into ComfyUI (no bytecode). The
command line, the model, the LoRA and the run in ComfyUI are tests/comfy_inprocess.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from comfy_inprocess import parse_args, report, run_in_comfy, wan_shaped_model, with_random_lora

COMFY_SIDE = r'''
import json, logging, sys
import torch
work, = sys.argv[1:]
import comfy.cli_args
comfy.cli_args.args.cpu = True  # as main.py --cpu
import comfy.sd, comfy.utils, comfy.model_base
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            warnings.append(record.getMessage())
logging.getLogger().addHandler(Catch())
opts = {"dtype": torch.float32}
base = comfy.sd.load_diffusion_model(f"{work}/base.safetensors", model_options=opts)
merged = comfy.sd.load_diffusion_model(f"{work}/merged.safetensors", model_options=opts)
lora = comfy.utils.load_torch_file(f"{work}/lora.safetensors", safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
patch_keys = sorted(patched.patches)
patched.patch_model()
got = patched.model.diffusion_model.state_dict()
want = merged.model.diffusion_model.state_dict()
orig = comfy.sd.load_diffusion_model(f"{work}/base.safetensors", model_options=opts).model.diffusion_model.state_dict()
diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
changed = sorted("diffusion_model." + k for k in orig if not torch.equal(orig[k], got[k]))
print(json.dumps({"model_class": type(base.model).__name__, "is_wan21": isinstance(base.model, comfy.model_base.WAN21),
                  "warnings": warnings, "patched": patch_keys, "changed": changed, "max_abs_diff": diff,
                  "same_keys": sorted(got) == sorted(want)}))
'''


def write_files(work: Path) -> list[str]:
    """Base, LoRA and merged files; returns the ComfyUI weight keys the LoRA must patch."""
    import torch

    from self_forcing.training.lora import lora_weights, merge_lora, save_lora
    from self_forcing.training.models import save_dit

    cfg, base = wan_shaped_model()
    save_dit(str(work / "base.safetensors"), base, cfg, "causal_init", dtype=torch.float32)
    model = with_random_lora(base, 0.05)
    names = sorted(lora_weights(model))
    save_lora(str(work / "lora.safetensors"), model, {"base": "base.safetensors"}, dtype=torch.float32)
    save_dit(str(work / "merged.safetensors"), merge_lora(model), cfg, "self_forcing", dtype=torch.float32)
    return [f"diffusion_model.{n}.weight" for n in names]


def main() -> int:
    args, work = parse_args(__doc__, "comfy_lora_e2e_")
    expected = write_files(work)
    result = run_in_comfy(args, COMFY_SIDE, work)
    if result is None:
        return 1
    checks = {
        "detected as Wan 2.1": result["is_wan21"],
        "every LoRA key loaded": not result["warnings"],
        "patched = the adapted weights": result["patched"] == expected,
        "changed = the adapted weights": result["changed"] == expected,
        "same keys as the merged file": result["same_keys"],
        "patched == merged (<= 1e-5)": result["max_abs_diff"] <= 1e-5,
    }
    return report({"work": str(work), "model_class": result["model_class"], "patched": len(result["patched"]),
                   "max_abs_diff": result["max_abs_diff"], "warnings": result["warnings"][:3]}, checks)


if __name__ == "__main__":
    sys.exit(main())
