#!/usr/bin/env python3
"""End-to-end check of the node pack in a REAL ComfyUI (not part of CI: CI has no ComfyUI).

With the team's harness (``comfy_harness.sh``: a real ComfyUI on the CPU): writes tiny stand-ins under the real
file names the workflows use (random Wan-shaped Self Forcing checkpoint with text_dim 4096, random full Wan 2.1
VAE, a saved prompt embedding [1, 512, 4096] instead of the 11 GB umT5, a placeholder umT5 file so workflows
naming it validate); starts ComfyUI with them and its own state folder; checks the pack imported and
/object_info of our nodes equals ``nodes.schema.object_info``; converts every example_workflows/*.json with the
harness's converter and compares it with its workflows/api twin; posts every API workflow unchanged (must
validate) and one with bad inputs (each problem reported once, naming its input); runs the graphs at tiny sizes
(text-to-video, long video, extend, image-to-video, text embeddings; decode as you go watched by the live client:
every chunk before the prompt ends); runs the shipped toy demo unchanged (frames equal to the plain functions);
interrupts a run mid-sampling and reruns it (same frames and LATENT as an uninterrupted run).

Environment (as comfy_harness.sh reads it; options override): COMFY_HARNESS_DIR (--harness), the folder of
comfy_harness.sh: default $COMFY_HARNESS_HOME when the scripts are there, else ../shared/comfy-harness next to
this repository; COMFY_HARNESS_HOME (default ~/comfy-harness); COMFY_DIR (--comfy-dir, default
$COMFY_HARNESS_HOME/ComfyUI); COMFY_HOST / COMFY_PORT (--host / --port, 127.0.0.1:8188); COMFY_NODE_NAME.
Nothing outside the work folder is written or deleted but the custom_nodes link that ``start`` makes and
``stop`` removes (refused when that name is taken by anything else). The work folder (--work, default a new
temporary folder) is created here, a non-empty one refused; the stand-in models (250 MB) are deleted at the
end unless --keep-models; summary.json, videos and the server log stay.

    COMFY_HARNESS_HOME=... python tests/comfy_harness_e2e.py [--work DIR] [--port N] [--only toy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from self_forcing.nodes.text import load_text_embeds, save_text_embeds
from self_forcing.nodes.catalogue import ALL_NODES
from self_forcing.nodes.schema import object_info
from self_forcing.nodes.core_model import as_in_comfy
from self_forcing.sf_model.checkpoint import save_model
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.vae import WAN21_VAE, WanVAE, save_vae
from self_forcing.sf_model.layouts import LoraFactors, comfy_lora_state_dict
from self_forcing.sf_model.weights import SELF_FORCING, UMT5, WAN_VAE
from self_forcing.workflows.build import CORE_LORA, KREA_14B
from self_forcing.workflows import run_headless

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HARNESS = REPO.parent / "shared" / "comfy-harness"  # the team's harness next to the repository
HARNESS = DEFAULT_HARNESS  # set by main() from --harness / the environment
SERVER = "http://127.0.0.1:8188"  # set by main() from --host/--port / COMFY_HOST/COMFY_PORT
EMBEDS = "fox_in_snow_00001.safetensors"
TINY_WAN = TINY.replace(text_dim=4096, text_len=512)


def log(*a):
    print(*a, flush=True)


# -- 1. tiny files ----------------------------------------------------------------------------------
def write_tiny_files(models: Path, yaml: Path) -> dict:
    """The stand-in model files under ``models``, and ``yaml``: ComfyUI's extra model paths pointing at them."""
    folders = ("diffusion_models", "vae", "text_encoders", "text_embeds", "loras")
    yaml.write_text(f"sf_e2e:\n    base_path: {models}\n" + "".join(f"    {f}: {f}\n" for f in folders))
    for sub in folders:
        (models / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CausalWanModel(TINY_WAN, attn_backend="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith(("norm_q.weight", "norm_k.weight")) else 0.0))
    save_model(models / "diffusion_models" / SELF_FORCING.name, model, TINY_WAN,
               meta={"frames_per_block": 3, "note": "tiny random test model"})
    shutil.copy(models / "diffusion_models" / SELF_FORCING.name, models / "diffusion_models" / KREA_14B)  # core-MODEL
    g = torch.Generator().manual_seed(1)
    ffn = {n: LoraFactors(torch.randn(4, p.shape[1], generator=g) / 100, torch.randn(p.shape[0], 4, generator=g) / 100)
           for n, p in model.state_dict().items() if p.ndim == 2 and ".ffn." in n}  # a random core-format LoRA
    save_file(comfy_lora_state_dict(ffn), str(models / "loras" / CORE_LORA))
    vae = WanVAE(WAN21_VAE).eval()
    save_vae(models / "vae" / WAN_VAE.name, vae.half())
    save_file({"placeholder": torch.zeros(1)}, str(models / "text_encoders" / UMT5.name))
    ctx = torch.zeros(1, 512, 4096)
    ctx[:, :24] = torch.randn(1, 24, 4096) * 0.1  # 24 "tokens", zero padding after, as core's umT5 output
    save_text_embeds(str(models / "text_embeds" / EMBEDS), ctx)
    return {"text_embeds": ctx}


# -- server helpers --------------------------------------------------------------------------------
def harness(cmd: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(HARNESS / "comfy_harness.sh"), cmd, *map(str, args)], env=env,
                          capture_output=True, text=True)


def get(path: str):
    with urllib.request.urlopen(SERVER + path, timeout=60) as r:
        return json.loads(r.read())


def post(path: str, data: dict):
    req = urllib.request.Request(SERVER + path, data=json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_done(prompt_id: str, timeout: float = 600) -> dict | None:
    """The history entry of a finished prompt; None if it left the queue without running."""
    end = time.time() + timeout
    while time.time() < end:
        entry = get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        queue = get("/queue")
        queued = {item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])}
        if not entry and prompt_id not in queued:
            time.sleep(0.5)  # the history entry is written just after the prompt leaves the queue
            if not get(f"/history/{prompt_id}").get(prompt_id):
                return None
        time.sleep(0.3)
    raise TimeoutError(prompt_id)


def video_info(path: str) -> dict:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        return {"frames": sum(1 for _ in c.decode(s)), "width": s.codec_context.width,
                "height": s.codec_context.height, "fps": float(s.average_rate)}


def api(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def use_saved_embeds(prompt: dict) -> dict:
    """Replace CLIPLoader + CLIPTextEncode by 'Load Text Embeddings' (the umT5 encoder is too large)."""
    enc, loader = node_of(prompt, "CLIPTextEncode"), node_of(prompt, "CLIPLoader")
    prompt[enc] = {"class_type": "SelfForcingLoadTextEmbeds", "inputs": {"embeds_name": EMBEDS}}
    del prompt[loader]
    return prompt


def small(prompt: dict) -> dict:
    for v in prompt.values():
        if v["class_type"] in ("SelfForcingSampler", "ImageScale"):
            v["inputs"].update(width=64, height=64)
        if v["class_type"] == "SelfForcingModelLoader":
            v["inputs"]["device"] = "cpu"
    return prompt


def run(prompt: dict, name: str, work: Path) -> dict:
    path = work / "prompts" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompt, indent=1))
    t0 = time.time()
    stats = run_headless.run(str(path), SERVER, str(work / "videos" / name), timeout=900,
                             previews=str(work / "previews" / name))
    stats["seconds"] = round(time.time() - t0, 2)
    stats["videos"] = [dict(file=f, **video_info(f)) for f in stats.get("files", []) if f.endswith(".mp4")]
    log(f"{name}: {json.dumps({k: v for k, v in stats.items() if k != 'files'})}")
    return stats


# -- the checks ------------------------------------------------------------------------------------
def check_object_info(result: dict) -> None:
    live = get("/object_info")
    mismatches = []
    for spec in ALL_NODES:
        if spec.node_id not in live:
            mismatches.append(f"{spec.node_id} missing")
            continue
        sections = live[spec.node_id]["input"]
        req = {**sections.get("required", {}), **sections.get("optional", {})}  # lora_name is optional
        dyn = {name: req[name][1].get("options") for name in ("model_name", "embeds_name", "lora_name") if name in req}
        mine = as_in_comfy(spec.node_id, object_info(spec, dyn))
        diff = [k for k in mine if mine[k] != live[spec.node_id].get(k)]
        if diff:
            mismatches.append(f"{spec.node_id}: {diff}")
    embeds = live["SelfForcingLoadTextEmbeds"]["input"]["required"]["embeds_name"][1]["options"]
    models = live["SelfForcingModelLoader"]["input"]["required"]["model_name"][1]["options"]
    result["object_info"] = {"nodes": len(live), "ours_match_specs": not mismatches, "mismatches": mismatches,
                             "text_embeds_listed": embeds, "model_files_listed": models}
    assert not mismatches and EMBEDS in embeds and SELF_FORCING.name in models, result["object_info"]


def check_ui_conversion(result: dict) -> None:
    out = {}
    for ui in sorted((REPO / "example_workflows").glob("*.json")):
        p = subprocess.run([sys.executable, str(HARNESS / "run_workflow.py"), str(ui), "--convert-only",
                            "--server", SERVER], capture_output=True, text=True)
        if p.returncode:
            out[ui.name] = f"conversion failed: {p.stderr.strip()[-500:]}"
            continue
        converted = json.loads(p.stdout)
        twin = api(ui.stem)
        # Dotted keys ("format.codec") are sub-inputs of newer cores' dynamic combos, sent next to the
        # 0.3.64 names in the API files; a 0.3.64 UI file cannot carry them and 0.3.64 ignores them.
        strip = lambda d: {k: {"class_type": v["class_type"],  # noqa: E731
                               "inputs": {n: x for n, x in v["inputs"].items() if "." not in n}}
                           for k, v in d.items()}
        out[ui.name] = "identical to API twin" if strip(converted) == strip(twin) else {
            "converted": strip(converted), "twin": strip(twin)}
    result["ui_conversion"] = out
    bad = {k: v for k, v in out.items() if v != "identical to API twin"}
    assert not bad, json.dumps(bad, indent=1)[:4000]


def check_validation(result: dict) -> None:
    """POST every shipped API workflow unchanged: it must validate; the run is then stopped."""
    out = {}
    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        code, body = post("/prompt", {"prompt": json.loads(path.read_text()), "client_id": "validation"})
        entry = {"http": code, "node_errors": (body or {}).get("node_errors")}
        if code == 200:
            pid = body["prompt_id"]
            post("/queue", {"delete": [pid]})
            post("/interrupt", {"prompt_id": pid})
            h = wait_done(pid, timeout=300) or {"status": {"status_str": "removed from the queue", "messages": []}}
            entry["run"] = h["status"]["status_str"]
            stops = [m for m in h["status"]["messages"] if m[0] in ("execution_error", "execution_interrupted")]
            if stops:
                kind, data = stops[0]
                entry["stopped"] = f"{kind} in {data.get('node_type')}: {data.get('exception_message', '')[:100]}"
        else:
            entry["error"] = body
        out[path.name] = entry
    result["validation"] = out
    bad = {k: v for k, v in out.items() if v["http"] != 200 or v["node_errors"]}
    assert not bad, bad
    # bad inputs (raised by validate_inputs): one error per node, each problem once, naming its input
    p = api("self_forcing_toy_demo")
    p[node_of(p, "SelfForcingSampler")]["inputs"].update(width=100, length=10, steps="1000, abc")
    p[node_of(p, "SelfForcingToyModelLoader")]["inputs"]["device"] = "bogus"
    code, body = post("/prompt", {"prompt": p, "client_id": "validation"})
    errors = {v["class_type"]: [e["details"] for e in v["errors"]] for v in body.get("node_errors", {}).values()}
    r = result["bad_inputs"] = {"http": code, "node_errors": errors}
    texts = errors.get("SelfForcingSampler", []) + errors.get("SelfForcingToyModelLoader", [])
    assert code == 400 and len(errors) == 2 and len(texts) == 2, r
    assert all(sum(t.count(w) for t in texts) == 1 for w in ("width 100", "length 10", "'abc'", "'bogus'")), r


def check_runs(work: Path, comfy_state: Path, comfy_dir: Path, tiny: dict, result: dict) -> None:
    runs = {}
    # a) text to video from saved embeddings (shipped graph, tiny sizes): 21 frames = 6 latents = 2 chunks
    p = small(api("self_forcing_t2v_from_saved_embeds"))
    p[node_of(p, "SelfForcingSampler")]["inputs"]["length"] = 21
    runs["t2v_from_saved_embeds"] = run(p, "t2v_from_saved_embeds", work)
    # b) the CLIP-based text-to-video graph with the prompt from the saved embedding
    p = small(use_saved_embeds(api("self_forcing_t2v_stream_81f")))
    p[node_of(p, "SelfForcingSampler")]["inputs"].update(length=21, seed=7)  # not a cached repeat of a)
    runs["t2v_stream"] = run(p, "t2v_stream", work)
    # c) long video, rolling cache: 45 frames = 12 latents = 4 chunks through a window of 3 + sink 1
    p = small(use_saved_embeds(api("self_forcing_long_video_rolling_30s")))
    p[node_of(p, "SelfForcingSampler")]["inputs"]["length"] = 45
    p[node_of(p, "SelfForcingLongVideoOptions")]["inputs"].update(window=3, sink=1)
    runs["long_video_rolling"] = run(p, "long_video_rolling", work)
    # d) extend the text-to-video output by 8 frames (VAEEncode of 21 frames = 6 latents, + 2)
    shutil.copy(runs["t2v_stream"]["videos"][0]["file"], comfy_state / "input" / "input_video.mp4")
    p = small(use_saved_embeds(api("self_forcing_extend_video")))
    p[node_of(p, "SelfForcingExtendVideo")]["inputs"]["extend_frames"] = 8
    runs["extend_video"] = run(p, "extend_video", work)
    # e) image to video: one image + 8 frames = 9 frames
    shutil.copy(comfy_dir / "input" / "example.png", comfy_state / "input" / "example.png")
    p = small(use_saved_embeds(api("self_forcing_image_to_video")))
    p[node_of(p, "SelfForcingExtendVideo")]["inputs"]["extend_frames"] = 8
    runs["image_to_video"] = run(p, "image_to_video", work)
    # f) save text embeddings (fed from the saved file instead of umT5) into the output folder
    p = use_saved_embeds(api("self_forcing_save_text_embeds"))
    p[node_of(p, "SelfForcingSaveTextEmbeds")]["inputs"].update(folder="output", filename_prefix="e2e/roundtrip")
    stats = run(p, "save_text_embeds", work)
    saved = sorted((comfy_state / "output" / "text_embeds" / "e2e").glob("roundtrip_*.safetensors"))
    stats["saved_file"] = str(saved[-1]) if saved else None
    stats["roundtrip_identical"] = bool(saved) and torch.equal(load_text_embeds(str(saved[-1]))[0], tiny["text_embeds"])
    runs["save_text_embeds"] = stats
    result["runs"] = runs
    for name, frames in dict(t2v_from_saved_embeds=21, t2v_stream=21, long_video_rolling=45, extend_video=29,
                             image_to_video=9).items():
        v = runs[name]["videos"]
        assert "error" not in runs[name] and v and v[0]["frames"] == frames and v[0]["width"] == 64, (name, runs[name])
    assert runs["t2v_stream"]["previews"] >= 2 and runs["long_video_rolling"]["previews"] >= 4
    assert stats["roundtrip_identical"], stats


def saved_videos(record: dict, comfy_state: Path) -> list[Path]:
    """The mp4 files a finished prompt saved; puts the first one's video_info into record['video']."""
    entry = wait_done(record["prompt_id"])
    videos = [comfy_state / v["type"] / v["subfolder"] / v["filename"] for o in entry["outputs"].values()
              for v in o.get("images", []) + o.get("videos", []) if v["filename"].endswith(".mp4")]
    record["video"] = video_info(str(videos[0])) if videos else None
    return videos


def output_images(prompt_id: str, comfy_state: Path, kinds=("images",)) -> dict[str, list[Path]]:
    """Saved image (or other ``kinds``) files of a finished prompt, per node id."""
    entry = wait_done(prompt_id)  # the history entry is written just after the last websocket message
    return {node: [comfy_state / i["type"] / i["subfolder"] / i["filename"] for k in kinds for i in out.get(k, [])]
            for node, out in entry["outputs"].items()}


def check_stream_decode(work: Path, comfy_state: Path, result: dict) -> None:
    """Decode as you go in the real server: the shipped workflow runs to a video, a websocket client gets every
    chunk's frames before the prompt finishes, the IMAGE equals core's VAEDecode of the LATENT, and an IMAGE
    output used without a VAE stops its user with a clear message."""
    sys.path.insert(0, str(REPO / "examples"))
    import live_frames_client as client

    out: dict = {}
    # a) the shipped graph (Live Frames -> sampler with vae -> IMAGE -> CreateVideo -> SaveVideo), watched live:
    #    45 frames = 12 latent frames = 4 chunks
    p = small(use_saved_embeds(api("self_forcing_t2v_stream_decode")))
    sampler = node_of(p, "SelfForcingSampler")
    p[sampler]["inputs"].update(length=45, seed=11)
    t0 = time.time()
    record = client.watch(SERVER, p, str(work / "live" / "t2v_stream_decode"), timeout=900)
    record["wall_s"] = round(time.time() - t0, 2)
    videos = saved_videos(record, comfy_state)
    record["frames_saved_live"] = len(list((work / "live" / "t2v_stream_decode").glob("frame_*.jpg")))
    out["t2v_stream_decode"] = record
    assert record["status"] == "success" and [c["chunk"] for c in record["chunks"]] == [0, 1, 2, 3], record
    assert all(c["t"] < record["done_t"] for c in record["chunks"]), record  # every chunk before the prompt ended
    assert record["frames_saved_live"] == 45 and record["video"]["frames"] == 45, record
    # b) one graph, both decoders: sampler IMAGE -> SaveImage and sampler LATENT -> VAEDecode -> SaveImage (PNG)
    p = small(use_saved_embeds(api("self_forcing_t2v_stream_decode")))
    sampler = node_of(p, "SelfForcingSampler")
    p[sampler]["inputs"].update(length=21, seed=12)
    for k in [node_of(p, "CreateVideo"), node_of(p, "SaveVideo")]:
        del p[k]
    p["90"] = {"class_type": "SaveImage", "inputs": {"images": [sampler, 1], "filename_prefix": "sd/stream"}}
    p["91"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": p[sampler]["inputs"]["vae"]}}
    p["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": "sd/core"}}
    record = client.watch(SERVER, p, str(work / "live" / "stream_vs_core"), timeout=900)
    files = output_images(record["prompt_id"], comfy_state)
    ours = np.stack([np.asarray(Image.open(f), dtype=np.int16) for f in files["90"]])
    core = np.stack([np.asarray(Image.open(f), dtype=np.int16) for f in files["92"]])
    diff = np.abs(ours - core)
    out["stream_vs_core_vaedecode"] = {
        "status": record["status"], "frames": [len(ours), len(core)], "shape": list(ours.shape[1:]),
        "max_abs_diff_8bit": int(diff.max()), "mean_abs_diff_8bit": round(float(diff.mean()), 4),
        "chunk_events": len(record["chunks"])}
    assert record["status"] == "success" and ours.shape == core.shape == (21, 64, 64, 3), out
    assert diff.max() <= 2, out["stream_vs_core_vaedecode"]
    # c) extend the video of a) with the VAE on the extend node (joined: 45 + 8 frames), its IMAGE to the video
    shutil.copy(videos[0], comfy_state / "input" / "input_video.mp4")
    p = small(use_saved_embeds(api("self_forcing_extend_video")))
    ext = node_of(p, "SelfForcingExtendVideo")
    p[ext]["inputs"].update(extend_frames=8, vae=[node_of(p, "VAELoader"), 0])
    p[node_of(p, "CreateVideo")]["inputs"]["images"] = [ext, 1]
    del p[node_of(p, "VAEDecode")]
    record = client.watch(SERVER, p, str(work / "live" / "extend_decode"), timeout=900)
    saved_videos(record, comfy_state)
    out["extend_decode"] = record
    assert record["status"] == "success" and record["video"]["frames"] == 53, record
    assert [(c["start_frame"], c["frame_count"]) for c in record["chunks"]] == [(45, 8)], record["chunks"]
    # d) IMAGE used without a VAE: the user of the output stops with our message (the LATENT path still runs)
    p = small(use_saved_embeds(api("self_forcing_t2v_stream_81f")))
    sampler = node_of(p, "SelfForcingSampler")
    p[sampler]["inputs"].update(length=9, seed=13)
    p[node_of(p, "CreateVideo")]["inputs"]["images"] = [sampler, 1]
    record = client.watch(SERVER, p, str(work / "live" / "no_vae"), timeout=900)
    history = wait_done(record["prompt_id"])
    out["image_without_vae"] = {"status": record["status"], "error": record.get("error"), "chunk_events":
                                len(record["chunks"]), "history_status": history and history["status"]["status_str"]}
    assert record["status"] == "error" and "filled only when a VAE is connected" in record["error"], record
    result["stream_decode"] = out


def frames_graph(length: int, seed: int, prefix: str) -> dict:
    """t2v at 64x64 saving frames as PNG (core VAEDecode -> SaveImage) and the LATENT (core SaveLatent)."""
    p = small(use_saved_embeds(api("self_forcing_t2v_stream_81f")))
    sampler = node_of(p, "SelfForcingSampler")
    p[sampler]["inputs"].update(length=length, seed=seed)
    p = {k: v for k, v in p.items() if v["class_type"] not in ("CreateVideo", "SaveVideo")}
    p["90"] = {"class_type": "SaveImage", "inputs": {"images": [node_of(p, "VAEDecode"), 0],
                                                     "filename_prefix": f"{prefix}/frame"}}
    p["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": f"{prefix}/latent"}}
    return p


def saved_outputs(prompt_id: str, comfy_state: Path) -> tuple:
    """(frames uint8 [F, H, W, 3], latent tensor) saved by a finished ``frames_graph`` prompt."""
    files = output_images(prompt_id, comfy_state, ("images", "latents"))
    return np.stack([np.asarray(Image.open(f)) for f in files["90"]]), load_file(str(files["91"][0]))["latent_tensor"]


def check_interrupt(work: Path, comfy_state: Path, result: dict) -> None:
    """Interrupt the sampler after its 8th denoising pass and rerun the same prompt: it runs again (not cached)
    and its frames (PNG) and LATENT equal an uninterrupted run's."""
    length, seed = 45, 5  # 12 latent frames: 4 chunks, 16 passes
    reference = run(frames_graph(length, seed, "interrupt/reference"), "interrupt_reference", work)
    # another prompt in between: ComfyUI keeps only the last prompt's outputs, so the sampler runs again below
    between = run(frames_graph(9, 6, "interrupt/between"), "interrupt_between", work)
    p = frames_graph(length, seed, "interrupt/rerun")
    sampler = node_of(p, "SelfForcingSampler")
    ws = run_headless.WebSocket(SERVER.replace("http", "ws") + "/ws?clientId=interrupt-check", timeout=60.0)
    seen, interrupted_at, outcome = [], None, None
    try:
        pid = run_headless.queue_prompt(SERVER, p, "interrupt-check")
        end = time.time() + 300
        while time.time() < end and outcome is None:
            opcode, data = ws.receive()
            msg = json.loads(data) if opcode == 1 else {}
            body = msg.get("data") or {}
            if body.get("prompt_id") != pid:
                continue
            if msg["type"] == "progress" and body.get("node") == sampler:
                seen.append((body["value"], body["max"]))
                if interrupted_at is None and body["value"] >= 8:
                    interrupted_at = body["value"]
                    post("/interrupt", {"prompt_id": pid})
            elif msg["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                outcome = msg["type"]
    finally:
        ws.close()
    rerun = run(p, "interrupt_rerun", work)
    assert not any("error" in x for x in (reference, between, rerun)), (reference, rerun)
    (ref_frames, ref_latent), (frames, latent) = (saved_outputs(x["prompt_id"], comfy_state)
                                                  for x in (reference, rerun))
    r = result["interrupt"] = {
        "outcome": outcome, "interrupt_sent_at_pass": interrupted_at, "last_pass_seen": seen[-1] if seen else None,
        "seconds": {"reference": reference["seconds"], "rerun": rerun["seconds"]},
        "progress_messages": {"reference": reference["progress"], "rerun": rerun["progress"]},
        "frames": [len(ref_frames), len(frames)], "frame_shape": list(frames.shape[1:]),
        "frames_identical": ref_frames.shape == frames.shape and bool(np.array_equal(ref_frames, frames)),
        "latent_shape": list(latent.shape), "latent_identical": torch.equal(ref_latent, latent)}
    assert outcome == "execution_interrupted" and seen[-1][0] < seen[-1][1], r
    assert rerun["progress"] == reference["progress"] > 0, r  # the sampler ran again (not cached), fully
    assert r["frames"] == [length, length] and r["frames_identical"] and r["latent_identical"], r


def toy_reference(prompt: dict) -> "torch.Tensor":
    """The toy graph's frames computed outside ComfyUI with the plain functions (float32 [F, H, W, 3] in 0-1)."""
    from self_forcing.nodes import long_video, model, sampling, toy as toy_nodes
    from self_forcing.toy.bundle import encode_prompt, latents_to_frames

    name = prompt[node_of(prompt, "SelfForcingToyModelLoader")]["inputs"]["model_name"]
    cpu = torch.device("cpu")
    handle = model.load_handle(toy_nodes.toy_model_path(name), name, dtype="fp32", attention="sdpa", load_device=cpu,
                               offload_device=cpu, keep_loaded=True, supports_bf16=False)
    text = prompt[node_of(prompt, "SelfForcingToyTextEncode")]["inputs"]["text"]
    cond = toy_nodes.encode_toy_prompt(handle, text)
    assert torch.equal(cond[0][0], encode_prompt(handle.loaded, text, device="cpu"))  # the bundle's own encoder
    s = prompt[node_of(prompt, "SelfForcingSampler")]["inputs"]
    keys = ("width", "height", "length", "seed", "frames_per_block", "steps", "shift", "context_noise")
    opts = long_video.LongVideoOptions(**prompt[node_of(prompt, "SelfForcingLongVideoOptions")]["inputs"])
    latents = sampling.sample_video(handle, cond, long_video=opts, **{k: s[k] for k in keys})
    return latents_to_frames(handle.loaded, latents)


def check_toy(work: Path, comfy_state: Path, result: dict) -> None:
    """The toy demo in the real server with the real bundled checkpoint: video, frames equal to the plain path."""
    out: dict = {}
    # a) the shipped workflow, unchanged: 45 frames of 64x64 at 8 fps
    p = api("self_forcing_toy_demo")
    stats = run(p, "toy_demo", work)
    out["toy_demo"] = {k: v for k, v in stats.items() if k != "files"}
    v = stats.get("videos") or []
    assert "error" not in stats and v and (v[0]["frames"], v[0]["width"], v[0]["height"]) == (45, 64, 64), stats
    assert round(v[0]["fps"]) == 8 and stats["previews"] >= 15, stats  # one preview per chunk (15 chunks)
    # b) the same graph with the decoded frames also saved as PNG (lossless): equal to the plain functions
    p = api("self_forcing_toy_demo")
    p["90"] = {"class_type": "SaveImage", "inputs": {"images": [node_of(p, "SelfForcingToyDecode"), 0],
                                                     "filename_prefix": "toy/frame"}}
    p[node_of(p, "SelfForcingSampler")]["inputs"]["seed"] = 3  # not a cached repeat of a)
    stats = run(p, "toy_demo_png", work)
    files = output_images(stats["prompt_id"], comfy_state)["90"]
    ours = np.stack([np.asarray(Image.open(f), dtype=np.int16) for f in files])
    ref8 = np.clip(toy_reference(p).numpy() * 255.0, 0, 255).astype(np.uint8).astype(np.int16)  # as SaveImage rounds
    diff = np.abs(ours - ref8)
    out["frames_vs_plain_functions"] = {
        "status": "error" if "error" in stats else "success", "frames": len(files), "shape": list(ours.shape[1:]),
        "max_abs_diff_8bit": int(diff.max()), "mean_abs_diff_8bit": round(float(diff.mean()), 4),
        "mean_pixel": round(float(ours.mean()), 2), "frame_files": [str(files[0]), str(files[-1])]}
    assert ours.shape == (45, 64, 64, 3) and diff.max() <= 1, out["frames_vs_plain_functions"]
    # c) the sampler's IMAGE output with a toy model (no VAE): its user stops with a message naming Toy Decode
    p = api("self_forcing_toy_demo")
    sampler = node_of(p, "SelfForcingSampler")
    p[sampler]["inputs"].update(length=9, seed=4)
    p[node_of(p, "CreateVideo")]["inputs"]["images"] = [sampler, 1]
    stats = run(p, "toy_image_output", work)
    msg = (stats.get("error") or {}).get("exception_message", "")
    out["sampler_image_output_with_toy"] = msg[:200]
    assert "Self Forcing Toy Decode" in msg, stats
    result["toy"] = out


def harness_location(arg: str | None) -> Path:
    """--harness, $COMFY_HARNESS_DIR, $COMFY_HARNESS_HOME if the scripts are there, else the team's harness."""
    home = os.environ.get("COMFY_HARNESS_HOME")
    for candidate in (arg, os.environ.get("COMFY_HARNESS_DIR"), home):
        if candidate and (Path(candidate) / "comfy_harness.sh").is_file():
            return Path(candidate).resolve()
        if candidate and candidate is not home:
            raise SystemExit(f"no comfy_harness.sh in {candidate}")
    return DEFAULT_HARNESS


def make_work_folder(arg: str | None) -> Path:
    """Created here (a new temporary one by default); an existing non-empty folder is refused."""
    work = Path(arg).resolve() if arg else Path(tempfile.mkdtemp(prefix="sf_e2e_"))
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise SystemExit(f"--work {work} exists and is not an empty folder; give a new one")
    work.mkdir(parents=True, exist_ok=True)
    return work


def check_free(comfy_dir: Path) -> Path | None:
    """`comfy_harness.sh start` replaces custom_nodes/$COMFY_NODE_NAME before it checks the port: refuse a name
    taken by anything but a link to this repository, and a port in use. Returns the link if this run makes it."""
    link = comfy_dir / "custom_nodes" / os.environ.get("COMFY_NODE_NAME", "harness_under_test")
    if (link.exists() or link.is_symlink()) and not (link.is_symlink() and link.resolve() == REPO):
        raise SystemExit(f"{link} exists and is not a link to {REPO}: remove it or set COMFY_NODE_NAME")
    try:
        urllib.request.urlopen(SERVER, timeout=5).close()
    except urllib.error.HTTPError:
        pass  # something answers, with an error status
    except OSError:
        return None if link.is_symlink() else link
    raise SystemExit(f"something already answers on {SERVER}; pick another port (--port / COMFY_PORT)")


def main() -> int:
    global HARNESS, SERVER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="new or empty folder for everything this run writes (default: a new temp folder)")
    ap.add_argument("--harness", help="folder of comfy_harness.sh (default: see above)")
    ap.add_argument("--comfy-dir", help="the ComfyUI checkout (default: see above)")
    ap.add_argument("--host", default=os.environ.get("COMFY_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("COMFY_PORT", "8188")))
    ap.add_argument("--keep-server", action="store_true", help="leave the server running (stop it with "
                    "COMFY_STATE_DIR=WORK/comfy_state comfy_harness.sh stop)")
    ap.add_argument("--keep-models", action="store_true", help="keep the stand-in model files (250 MB)")
    ap.add_argument("--only", choices=["stream_decode", "toy", "interrupt"], help="only this (after object_info)")
    args = ap.parse_args()
    HARNESS, SERVER = harness_location(args.harness), f"http://{args.host}:{args.port}"
    home = Path(os.environ.get("COMFY_HARNESS_HOME", Path.home() / "comfy-harness"))  # the harness's default
    comfy_dir = Path(args.comfy_dir or os.environ.get("COMFY_DIR") or home / "ComfyUI").resolve()
    if not (comfy_dir / "main.py").is_file():
        raise SystemExit(f"no ComfyUI checkout at {comfy_dir} (set COMFY_DIR or COMFY_HARNESS_HOME, or --comfy-dir)")
    new_link = check_free(comfy_dir)
    work = make_work_folder(args.work)
    log(f"work folder: {work}")  # in it: the server's own state folder (made by the harness), the stand-ins
    state, models, yaml = work / "comfy_state", work / "models", work / "extra_model_paths.yaml"
    tiny = write_tiny_files(models, yaml)
    env = dict(os.environ, COMFY_DIR=str(comfy_dir), COMFY_STATE_DIR=str(state), COMFY_HOST=args.host,
               COMFY_PORT=str(args.port),
               COMFY_EXTRA_ARGS=f"{os.environ.get('COMFY_EXTRA_ARGS', '')} --extra-model-paths-config {yaml}".strip())
    result: dict = {"work": str(work), "server": SERVER, "harness": str(HARNESS), "comfy_dir": str(comfy_dir)}
    try:
        started = harness("start", REPO, env=env)
        result["server_log"] = str(state / "server.log")
        assert started.returncode == 0 and "IMPORT FAILED" not in (state / "server.log").read_text(), \
            f"the server did not start or the pack failed to import:\n{started.stderr[-3000:]}"
        result["import"] = "ok"
        check_object_info(result)
        if args.only is None:
            check_ui_conversion(result)
            check_runs(work, state, comfy_dir, tiny, result)  # also places the input video and image the workflows name
            check_validation(result)
        if args.only in (None, "stream_decode"):
            check_stream_decode(work, state, result)
        if args.only in (None, "toy"):
            check_toy(work, state, result)
        if args.only in (None, "interrupt"):
            check_interrupt(work, state, result)
        result["vae_keys_missing_in_core"] = "Missing VAE keys" in (state / "server.log").read_text()
        result["ok"] = True
    finally:
        (work / "summary.json").write_text(json.dumps(result, indent=1, default=str))
        if not args.keep_server:
            harness("stop", env=env)  # only the pid in our state folder; removes the node link
            if new_link and new_link.is_symlink() and new_link.resolve() == REPO:
                new_link.unlink()  # made by a `start` that failed before the server ran
        if not args.keep_models:
            shutil.rmtree(models, ignore_errors=True)  # written by write_tiny_files above
    log(f"summary: {work / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
