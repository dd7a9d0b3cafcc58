#!/usr/bin/env python3
"""The core-MODEL workflows in a REAL ComfyUI server (not part of CI: CI has no ComfyUI).

Runs the shipped UI files ``example_workflows/self_forcing_core_lora.json`` (core UNETLoader -> core
LoraLoaderModelOnly -> our sampler) and ``self_forcing_14b_low_memory.json`` (core UNETLoader, weight_dtype
fp8_e4m3fn, on a file in Krea Realtime 14B's published layout) through the shared harness
(``comfy_harness.sh start/run/stop``), plus the LoRA workflow with a LongLive-style peft LoRA converted by
``sf_model.checkpoint.convert_lora`` (passes only when ComfyUI loads every LoRA key). The low-memory run passes
only when the server log says its float8 linear layers were bound as float8 (``core MODEL bound: N linear layers
kept in float8``, N > 0: no upcast copy of the model). The sampler's size is set to
64x64x33 with ``--set`` (a CPU run); everything else is the shipped file.

Model files are tiny and random, written into a fresh temporary folder that ComfyUI reads through
``--extra-model-paths-config`` (nothing is written into ComfyUI's folders; the folder is removed at the end unless
--keep): a dim-256 Wan model (2 heads of 128, what ComfyUI's Wan detection assumes) as
``self_forcing_dmd.safetensors`` and, flat with the ``model.`` prefix in bf16, as
``krea-realtime-video-14b.safetensors``; a rank-8 LoRA in core's key format; random prompt embeddings; a random
Wan 2.1 VAE made with ComfyUI's own class (in the harness's Python). The server's outputs go where the harness
puts them (its state folder).

    python tests/comfy_workflows_e2e.py [--harness ../shared/comfy-harness/comfy_harness.sh] [--keep]

The harness reads its locations from the environment (COMFY_HARNESS_HOME, COMFY_DIR, COMFY_VENV, COMFY_STATE_DIR,
COMFY_PORT, ...; see its README); --harness defaults to $COMFY_HARNESS_SCRIPT, else ../shared/comfy-harness next
to the repository. Exit 0 when every run succeeds and saves a video.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE = {"width": 64, "height": 64, "length": 33}

MAKE_VAE = r'''
import sys, torch
from safetensors.torch import save_file
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.ldm.wan.vae import WanVAE
# the Wan 2.1 VAE as comfy.sd.VAE builds it for Wan 2.1 weights (ComfyUI 0.3.64)
vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0)
g = torch.Generator().manual_seed(1)
sd = {}
for k, v in vae.state_dict().items():
    if k.endswith("gamma"):
        sd[k] = torch.ones_like(v)
    elif v.dim() <= 1:
        sd[k] = torch.zeros_like(v)
    else:
        sd[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
save_file(sd, sys.argv[1])
'''


def write_models(root: Path, comfy_python: str, comfy_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    from self_forcing.sf_model.checkpoint import convert_lora, save_model
    from self_forcing.sf_model.config import WanConfig
    from self_forcing.sf_model.model import CausalWanModel
    from self_forcing.sf_model.text_embeds import save_text_embeds
    from self_forcing.workflows import build

    for d in ("diffusion_models", "loras", "text_embeds", "vae"):
        (root / d).mkdir(parents=True)
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096, text_len=512, freq_dim=256)
    g = torch.Generator().manual_seed(11)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalWanModel(cfg).state_dict().items()}
    sd = {k: torch.randn(s, generator=g) * (0.5 / max(1, s[-1]) ** 0.5) for k, s in shapes.items()}
    save_model(str(root / "diffusion_models" / "self_forcing_dmd.safetensors"), sd, cfg, dtype=torch.float32)
    save_file({"model." + k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
              str(root / "diffusion_models" / build.KREA_14B))
    lora, peft = {}, {}
    for i in range(cfg.num_layers):
        for lin in ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0", "ffn.2"):
            out_f, in_f = sd[f"blocks.{i}.{lin}.weight"].shape
            key = f"diffusion_model.blocks.{i}.{lin}"
            lora[key + ".lora_down.weight"] = torch.randn(8, in_f, generator=g) * 0.1
            lora[key + ".lora_up.weight"] = torch.randn(out_f, 8, generator=g) * 0.1
            lora[key + ".alpha"] = torch.tensor(4.0)
            peft[f"base_model.model.blocks.{i}.{lin}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.1
            peft[f"base_model.model.blocks.{i}.{lin}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    save_file(lora, str(root / "loras" / build.CORE_LORA))
    torch.save({"generator_lora": peft}, root / "longlive_lora.pt")  # LongLive's lora.pt layout
    convert_lora(str(root / "longlive_lora.pt"), str(root / "loras" / "longlive_lora_comfy.safetensors"))
    save_text_embeds(str(root / "text_embeds" / build.EMBEDS), torch.randn(1, 24, 4096, generator=g))
    subprocess.run([comfy_python, "-c", MAKE_VAE, str(root / "vae" / "wan_2.1_vae.safetensors")], cwd=comfy_dir,
                   check=True)


def sampler_id(ui_file: Path) -> int:
    ui = json.loads(ui_file.read_text())
    return next(n["id"] for n in ui["nodes"] if n["type"] == "SelfForcingSampler")


def run(harness: str, ui_file: Path, env: dict, extra=()) -> dict:
    sid = sampler_id(ui_file)
    sets = [a for k, v in SIZE.items() for a in ("--set", f"{sid}.{k}={v}")]
    p = subprocess.run(["bash", harness, "run", str(ui_file), *sets, *extra, "--timeout", "900"], env=env,
                       capture_output=True, text=True)
    text = p.stdout + p.stderr
    outputs = re.findall(r"^output: .*file=(\S+)", text, re.M)
    ok = p.returncode == 0 and "status: success" in text and any(o.endswith((".mp4", ".webm")) for o in outputs)
    return {"workflow": ui_file.name, "extra": list(extra), "rc": p.returncode, "ok": ok, "outputs": outputs,
            "tail": "" if ok else text[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", default=os.environ.get("COMFY_HARNESS_SCRIPT",
                                                        str(REPO.parent / "shared" / "comfy-harness" /
                                                            "comfy_harness.sh")))
    ap.add_argument("--keep", action="store_true", help="keep the temporary model folder")
    args = ap.parse_args()
    home = Path(os.environ.get("COMFY_HARNESS_HOME", Path.home() / "comfy-harness"))
    comfy_dir = os.environ.get("COMFY_DIR", str(home / "ComfyUI"))
    comfy_python = str(Path(os.environ.get("COMFY_VENV", str(home / "venv"))) / "bin" / "python")
    root = Path(tempfile.mkdtemp(prefix="sf_workflows_e2e_"))
    results, started = [], False
    try:
        write_models(root, comfy_python, comfy_dir)
        yaml = root / "extra_model_paths.yaml"
        yaml.write_text("sf_workflows_e2e:\n" f"  base_path: {root}\n" + "".join(
            f"  {d}: {d}\n" for d in ("diffusion_models", "loras", "text_embeds", "vae")))
        env = dict(os.environ)
        env["COMFY_EXTRA_ARGS"] = (env.get("COMFY_EXTRA_ARGS", "") + f" --extra-model-paths-config {yaml}").strip()
        start = subprocess.run(["bash", args.harness, "start", str(REPO)], env=env, capture_output=True, text=True)
        if start.returncode != 0:
            print(start.stdout + start.stderr)
            return 1
        started = True
        log = next((line.strip() for line in (start.stdout + start.stderr).splitlines()
                    if line.strip().endswith(".log")), None)
        results.append(run(args.harness, REPO / "example_workflows" / "self_forcing_core_lora.json", env))
        before = Path(log).read_text(errors="replace") if log else ""
        low = run(args.harness, REPO / "example_workflows" / "self_forcing_14b_low_memory.json", env)
        added = (Path(log).read_text(errors="replace") if log else "")[len(before):]
        # nodes.core_model logs what a run bound: core's fp8 linear weights must stay float8 (cast per layer)
        bound = re.findall(r"core MODEL bound: (\d+) linear layers kept in float8.*", added)
        low["bound"] = re.findall(r"core MODEL bound: .*", added)
        low["ok"] = low["ok"] and bool(bound) and all(int(n) > 0 for n in bound)
        results.append(low)
        lora_node = next(n["id"] for n in json.loads((REPO / "example_workflows" / "self_forcing_core_lora.json")
                                                     .read_text())["nodes"] if n["type"] == "LoraLoaderModelOnly")
        before = Path(log).read_text(errors="replace") if log else ""
        converted = run(args.harness, REPO / "example_workflows" / "self_forcing_core_lora.json", env,
                        ("--set", f'{lora_node}.lora_name="longlive_lora_comfy.safetensors"'))
        added = (Path(log).read_text(errors="replace") if log else "")[len(before):]
        converted["lora_keys_not_loaded"] = len(re.findall(r"lora key not loaded", added))
        converted["ok"] = converted["ok"] and converted["lora_keys_not_loaded"] == 0 and log is not None
        results.append(converted)
    finally:
        if started:
            subprocess.run(["bash", args.harness, "stop"], env=env, capture_output=True, text=True)
        if args.keep:
            print(f"model files kept in {root}")
        else:
            shutil.rmtree(root)
    print(json.dumps(results, indent=1))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
