"""The GPU kit for the real ComfyUI server (benchmarks/comfy_server_gpu.py), run here on the CPU.

The workflow rewriting is checked always (no ComfyUI needed). The end-to-end run boots the real ComfyUI server
with the pack at tiny sizes, with the packages the kit does not carry to the GPU machine blocked
(``--simulate-kit``), and checks every step's JSON. It needs ComfyUI's source and a python with ComfyUI's
requirements; where they are (first found wins):

- ComfyUI: ``$COMFY_DIR``, the kit's ``.comfy/`` (``scripts/comfy_gpu_kit.sh``), ``$COMFY_HARNESS_HOME/ComfyUI``;
- python: ``$COMFY_PYTHON``, ``$COMFY_VENV/bin/python``, ``$COMFY_HARNESS_HOME/venv/bin/python`` (the team
  harness's venv; ``COMFY_HARNESS_HOME`` defaults to ``~/comfy-harness``), this interpreter;

and it is skipped, saying which, when none has them (CI). About 4-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "comfy_server_gpu.py"
COMFY_DEPS = ("torch", "aiohttp", "yaml", "safetensors", "einops", "psutil", "scipy", "PIL", "tqdm", "requests",
              "transformers", "torchsde", "av", "numpy")


def _kit():
    spec = importlib.util.spec_from_file_location("comfy_server_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kit = _kit()


def _home() -> Path:
    return Path(os.environ.get("COMFY_HARNESS_HOME", Path.home() / "comfy-harness"))


def find_comfy() -> Path | None:
    for c in (os.environ.get("COMFY_DIR"), REPO / ".comfy", _home() / "ComfyUI"):
        if c and (Path(c) / "main.py").exists():
            return Path(c)
    return None


def find_python() -> tuple[str | None, list[str]]:
    """The first python that imports ComfyUI's requirements; what was tried and why not."""
    tried = []
    venv = os.environ.get("COMFY_VENV")
    for py in (os.environ.get("COMFY_PYTHON"), venv and str(Path(venv) / "bin" / "python"),
               str(_home() / "venv" / "bin" / "python"), sys.executable):
        if not py or not Path(py).exists():
            continue
        p = subprocess.run([py, "-c", "import " + ", ".join(COMFY_DEPS)], capture_output=True, text=True)
        if p.returncode == 0:
            return py, tried
        tried.append(f"{py}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return None, tried


# -- the workflows as the GPU run posts them ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(kit.WORKFLOWS))
def test_rewrite_points_the_workflows_at_the_random_files(name):
    src = json.loads((REPO / "workflows" / "api" / kit.WORKFLOWS[name]).read_text())
    prompt = kit.rewrite(src, kit.GPU_SIZES, long=name == "long")
    kinds = {n["class_type"] for n in prompt.values()}
    assert not kinds & {"CLIPLoader", "CLIPTextEncode"}  # no text encoder: saved embeddings
    assert "SelfForcingLoadTextEmbeds" in kinds and "SelfForcingSampler" in kinds and "SaveVideo" in kinds
    for nid, node in prompt.items():  # every link points at a node that is still there
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in prompt, (nid, value)
        inputs = node["inputs"]
        if node["class_type"] == "SelfForcingLoadTextEmbeds":
            assert inputs == {"embeds_name": kit.EMBEDS}
        if node["class_type"] in ("SelfForcingModelLoader", "UNETLoader"):
            assert kit.MODEL in inputs.values()
        if node["class_type"] == "UNETLoader":
            assert inputs["weight_dtype"] == "default"
        if node["class_type"] == "VAELoader":
            assert inputs["vae_name"] == kit.VAE
        if node["class_type"] == "SelfForcingSampler":
            length = kit.GPU_SIZES["long_length" if name == "long" else "length"]
            assert (inputs["width"], inputs["height"], inputs["length"]) == (832, 480, length)
    assert src == json.loads((REPO / "workflows" / "api" / kit.WORKFLOWS[name]).read_text())  # not edited in place


def test_rewrite_sets_the_long_video_window_and_seeds():
    src = json.loads((REPO / "workflows" / "api" / kit.WORKFLOWS["long"]).read_text())
    prompt = kit.rewrite(src, kit.TINY_SIZES, long=True)
    opts = [n["inputs"] for n in prompt.values() if n["class_type"] == "SelfForcingLongVideoOptions"]
    assert opts and opts[0]["window"] == kit.TINY_SIZES["window"] and opts[0]["sink"] == kit.TINY_SIZES["sink"]
    kit.set_seed(prompt, 1234)
    assert [n["inputs"]["seed"] for n in prompt.values() if n["class_type"] == "SelfForcingSampler"] == [1234]
    assert kit.latent_frames(81) == 21 and kit.latent_frames(477) == 120


# -- the whole run, tiny, in the real ComfyUI ---------------------------------------------------------------
def test_tiny_run_in_the_real_comfyui_server(tmp_path):
    comfy = find_comfy()
    if comfy is None:
        pytest.skip("no ComfyUI source: set COMFY_DIR or run scripts/comfy_gpu_kit.sh (builds .comfy/)")
    python, tried = find_python()
    if python is None:
        pytest.skip("no python with ComfyUI's requirements (" + "; ".join(tried) + "): set COMFY_PYTHON/COMFY_VENV")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "self_forcing").symlink_to(REPO, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(pkg), "PYTHONDONTWRITEBYTECODE": "1"}
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([python, str(SCRIPT), "--tiny", "--simulate-kit", "--comfy-dir", str(comfy), "--out",
                        str(out), "--work", str(work), "--budget-s", "1500"], env=env, capture_output=True, text=True,
                       timeout=1800)
    res = json.loads((out / "comfy_server_gpu.json").read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {k: v["status"] for k, v in res["steps"].items()} == {
        "files": "done", "server": "done", "cli": "done", "core": "done", "caps": "done", "caps14b": "skipped"}
    srv = res["server"]
    assert {"SelfForcingSampler", "SelfForcingLoadTextEmbeds", "SelfForcingLiveFrames"} <= set(srv["pack_nodes"])
    blocked = (work / "server.log").read_text()
    assert "not carried by the kit" in blocked  # the simulation was in effect, and the server served anyway
    for name, wf in srv["workflows"].items():
        assert wf["runs"] and all(r["status"] == "success" for r in wf["runs"]), (name, wf)
        for r in wf["runs"]:  # each run sampled again (a new seed: not a cached result)
            assert r["node_s"].get("SelfForcingSampler", 0) > 0 and 0 < r["queue_to_done_s"], (name, r)
            assert sum(r["node_s"].values()) <= r["queue_to_done_s"] + 1e-6
        assert wf["warm_queue_to_done_s"] == wf["runs"][-1]["queue_to_done_s"]
    assert len(srv["workflows"]["t2v"]["runs"]) == 2 and len(srv["workflows"]["long"]["runs"]) == 1
    assert "UNETLoader" in srv["workflows"]["core_t2v"]["runs"][0]["node_s"]  # the core-MODEL path ran
    for r in srv["workflows"]["stream_decode"]["runs"]:  # live frames reached the client before the end
        assert r["live_chunks"] >= 1 and r["first_live_chunk_s"] <= r["queue_to_done_s"]
    videos = sorted(p.name for p in (work / "base" / "output" / "video").iterdir())
    assert len(videos) == 7 and all((work / "base" / "output" / "video" / v).stat().st_size > 0 for v in videos)
    for name in ("t2v", "long"):
        r = res["cli"][name][-1]
        assert r["status"] == "success" and r["mp4_bytes"] > 0, r
        assert 0 < r["load_s"] < r["wall_s"] and r["generate_s"] > 0 and r["first_raw_after_load_s"] > 0
    for wf in ("t2v", "core_t2v", "stream_decode", "long"):
        o = res["overhead"][wf]
        assert o["server_over_cli"] == pytest.approx(o["server_s"] / o["cli_s"])
    assert res["overhead"]["first_pixels"]["server_ws_s"] > 0
    cms = res["core_model_speed"]
    assert cms["video"] == [32, 32, 9] and cms["core_over_ours"] > 0 and cms["max_abs_diff"] < 0.1
    caps = res["caps"]["None"]
    assert caps["worker"] == "done" and caps["core"]["status"] == "ok" and caps["ours"]["status"] == "ok", caps
    assert caps["core"]["loaded_partially"] is False and caps["core"]["warm_s"] > 0
    assert caps["core_fp8"]["status"] == "ok" and caps["core_fp8"]["weight_dtype"] == "torch.float8_e4m3fn"
    assert caps["core_fp8"]["model_gib"] < caps["core"]["model_gib"] / 2  # fp8 weights: a quarter of fp32
