#!/usr/bin/env python3
"""'Load Self Forcing Model' with a LoRA in a REAL ComfyUI server (not part of CI: CI has no ComfyUI).

Needs a running server with this pack (e.g. the harness: ``comfy_harness.sh start REPO``) and its models folder.
Writes there: the bundled toy checkpoint as ``diffusion_models/sf_lora_e2e_toy.safetensors``, a random LoRA on
its linears in ComfyUI core's key format (``loras/sf_lora_e2e.safetensors``), the same factors in peft's format
(LongLive's ``{"generator_lora": ...}`` ``.pt``) converted by ``self-forcing convert-lora``
(``loras/sf_lora_e2e_converted.safetensors``). Then runs loader -> toy text encode -> Stream Sampler -> toy
decode -> SaveImage through /prompt and checks:

* /object_info of the loader == its spec's (``lora_name`` lists 'none' and the LoRA files);
* a prompt without the LoRA inputs (saved before they existed) runs, info 'LoRA: none';
* with the LoRA the frames differ from the plain ones, the info names the LoRA and strength;
* the same prompt again reuses the loader (cached), another strength does not (loader runs again, frames change);
* strength 0 gives the plain frames; the converted peft LoRA gives the core LoRA's frames;
* a strength above the range is refused at queue time naming lora_strength.

    python tests/comfy_loader_lora_e2e.py --server http://127.0.0.1:8188 --models-dir ComfyUI/models --work DIR

Removes only the files it wrote into the models folder (unless --keep). Prints a JSON report; exit 0 = pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from self_forcing.cli.generate import default_model_path
from self_forcing.nodes.catalogue import NODES_BY_ID
from self_forcing.nodes.core_model import as_in_comfy
from self_forcing.nodes.schema import object_info
from self_forcing.sf_model.checkpoint import load_model
from self_forcing.workflows import run_headless

MODEL, LORA, CONVERTED = "sf_lora_e2e_toy.safetensors", "sf_lora_e2e.safetensors", "sf_lora_e2e_converted.safetensors"


def write_files(models: Path, work: Path) -> list[Path]:
    from safetensors.torch import save_file

    sd = load_model(default_model_path(), dtype=torch.float32).model.state_dict()
    g = torch.Generator().manual_seed(5)
    core, peft = {}, {}
    for b in range(4):
        for m in ("self_attn.q", "self_attn.o", "ffn.2"):
            out_f, in_f = sd[f"blocks.{b}.{m}.weight"].shape
            down, up = torch.randn(4, in_f, generator=g) * 0.2, torch.randn(out_f, 4, generator=g) * 0.2
            core[f"diffusion_model.blocks.{b}.{m}.lora_down.weight"] = down
            core[f"diffusion_model.blocks.{b}.{m}.lora_up.weight"] = up
            core[f"diffusion_model.blocks.{b}.{m}.alpha"] = torch.tensor(4.0)
            peft[f"base_model.model.blocks.{b}.{m}.lora_A.default.weight"] = down
            peft[f"base_model.model.blocks.{b}.{m}.lora_B.default.weight"] = up
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    written = [models / "diffusion_models" / MODEL, models / "loras" / LORA, models / "loras" / CONVERTED]
    written[0].write_bytes(Path(default_model_path()).read_bytes())
    save_file(core, str(written[1]))
    torch.save({"generator_lora": peft}, work / "lora.pt")
    cmd = [sys.executable, "-m", "self_forcing.cli", "convert-lora", str(work / "lora.pt"), str(written[2])]
    print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), file=sys.stderr)
    return written


def prompt(**lora) -> dict:
    loader = {"model_name": MODEL, "dtype": "fp32", "attention": "sdpa", "device": "cpu", "keep_loaded": True,
              "download_if_missing": False, **lora}
    return {
        "1": {"class_type": "SelfForcingModelLoader", "inputs": loader},
        "2": {"class_type": "SelfForcingToyTextEncode",
              "inputs": {"model": ["1", 0], "text": "a red circle and a blue square bouncing on a black background"}},
        "3": {"class_type": "SelfForcingSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "width": 64, "height": 64, "length": 9, "seed": 0,
                         "frames_per_block": 3, "steps": "1000, 750, 500, 250", "shift": 5.0, "context_noise": 0.0}},
        "4": {"class_type": "SelfForcingToyDecode", "inputs": {"model": ["1", 0], "latent": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "sf_lora_e2e/frame"}},
    }


def run(server: str, work: Path, name: str, p: dict) -> dict:
    path = work / f"{name}.json"
    path.write_text(json.dumps(p))
    stats = run_headless.run(str(path), server, str(work / name), timeout=600)
    if "error" in stats:
        raise RuntimeError(f"{name}: {stats['error'].get('exception_message')}")
    entry = json.loads(run_headless.http(server, f"/history/{stats['prompt_id']}"))[stats["prompt_id"]]
    cached = [m[1].get("nodes", []) for m in entry["status"]["messages"] if m[0] == "execution_cached"]
    frames = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(stats["files"])])
    info = "".join(entry["outputs"].get("1", {}).get("text", []))
    return {"frames": frames, "cached": sorted(sum(cached, [])), "info": info}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--models-dir", type=Path, required=True, help="the server's ComfyUI models folder")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="leave the model and LoRA files in the models folder")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    written = write_files(args.models_dir, args.work)
    checks, report = {}, {}
    try:
        live = json.loads(run_headless.http(args.server, "/object_info/SelfForcingModelLoader"))["SelfForcingModelLoader"]
        sections = {**live["input"]["required"], **live["input"].get("optional", {})}
        dyn = {n: sections[n][1]["options"] for n in ("model_name", "lora_name")}
        mine = json.loads(json.dumps(as_in_comfy(live["name"], object_info(NODES_BY_ID[live["name"]], dyn))))
        checks["object_info == spec"] = all(mine[k] == live.get(k) for k in mine)
        checks["lora list: none first, our files"] = dyn["lora_name"][0] == "none" and {LORA, CONVERTED} <= set(
            dyn["lora_name"])
        old = run(args.server, args.work, "old_workflow", prompt())
        lora = run(args.server, args.work, "lora_1", prompt(lora_name=LORA, lora_strength=1.0))
        again = run(args.server, args.work, "lora_1_again", prompt(lora_name=LORA, lora_strength=1.0))
        half = run(args.server, args.work, "lora_half", prompt(lora_name=LORA, lora_strength=0.5))
        zero = run(args.server, args.work, "lora_0", prompt(lora_name=LORA, lora_strength=0.0))
        conv = run(args.server, args.work, "converted", prompt(lora_name=CONVERTED, lora_strength=1.0))
        diff = lambda a, b: float(np.abs(a["frames"].astype(float) - b["frames"]).mean())  # noqa: E731
        report = {"frames": list(old["frames"].shape), "mean_abs_diff_lora_vs_plain": diff(lora, old),
                  "mean_abs_diff_half_vs_full": diff(half, lora), "infos": {"old": old["info"], "lora": lora["info"]},
                  "cached": {"lora_1_again": again["cached"], "lora_half": half["cached"]}}
        checks["old workflow: no LoRA"] = "LoRA: none" in old["info"]
        checks["LoRA changes the frames"] = diff(lora, old) > 1.0
        checks["info names the LoRA"] = f"LoRA: {LORA} merged at strength 1" in lora["info"]
        checks["same prompt: loader cached, same frames"] = "1" in again["cached"] and diff(again, lora) == 0
        checks["other strength: loader runs again"] = "1" not in half["cached"] and diff(half, lora) > 0.1
        checks["strength 0 == plain"] = diff(zero, old) == 0 and "LoRA: none" in zero["info"]
        checks["converted peft == core"] = diff(conv, lora) == 0
        try:
            run_headless.http(args.server, "/prompt", {"prompt": prompt(lora_name=LORA, lora_strength=11.0)})
            checks["strength 11 refused at queue time"] = False
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            report["strength_11"] = json.loads(body).get("node_errors")
            checks["strength 11 refused at queue time"] = e.code == 400 and "lora_strength 11" in body
    finally:
        if not args.keep:
            for path in written:
                path.unlink(missing_ok=True)
    print(json.dumps({"checks": checks, **report}, indent=1, default=str))
    ok = bool(checks) and all(checks.values())
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
