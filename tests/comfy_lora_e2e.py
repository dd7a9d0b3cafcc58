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
python of $COMFY_VENV (default $COMFY_HARNESS_HOME/venv). Nothing is written into ComfyUI (no bytecode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

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
    import copy

    import torch

    from self_forcing.sf_model.config import WanConfig
    from self_forcing.training.config import LoraConfig
    from self_forcing.training.lora import apply_lora, lora_weights, merge_lora, save_lora
    from self_forcing.training.models import build_model, save_dit

    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096, text_len=512, freq_dim=256)
    base = build_model(cfg, 0, torch.device("cpu"))
    save_dit(str(work / "base.safetensors"), base, cfg, "causal_init", dtype=torch.float32)
    model = apply_lora(copy.deepcopy(base), LoraConfig(rank=8, alpha=4.0), seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    names = sorted(lora_weights(model))
    save_lora(str(work / "lora.safetensors"), model, {"base": "base.safetensors"}, dtype=torch.float32)
    save_dit(str(work / "merged.safetensors"), merge_lora(model), cfg, "self_forcing", dtype=torch.float32)
    return [f"diffusion_model.{n}.weight" for n in names]


def main() -> int:
    home = Path(os.environ.get("COMFY_HARNESS_HOME", Path.home() / "comfy-harness"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFY_DIR", str(home / "ComfyUI")))
    ap.add_argument("--comfy-python", default=str(Path(os.environ.get("COMFY_VENV", home / "venv")) / "bin" / "python"))
    ap.add_argument("--work", default=None, help="folder for the three files (default: a new temporary folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="comfy_lora_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    expected = write_files(work)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": args.comfy_dir}
    proc = subprocess.run([args.comfy_python, "-c", COMFY_SIDE, str(work)], cwd=args.comfy_dir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, sep="\n")
        return 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = {
        "detected as Wan 2.1": result["is_wan21"],
        "every LoRA key loaded": not result["warnings"],
        "patched = the adapted weights": result["patched"] == expected,
        "changed = the adapted weights": result["changed"] == expected,
        "same keys as the merged file": result["same_keys"],
        "patched == merged (<= 1e-5)": result["max_abs_diff"] <= 1e-5,
    }
    print(json.dumps({"work": str(work), "model_class": result["model_class"], "patched": len(result["patched"]),
                      "max_abs_diff": result["max_abs_diff"], "warnings": result["warnings"][:3]}, indent=1))
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
