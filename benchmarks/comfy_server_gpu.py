"""The REAL ComfyUI server with this pack, timed against our CLI on the same machine (issues 16 and 18), random
weights at Wan sizes. One process drives everything; each step has a time cap and the JSON is rewritten after
each step, so a run cut short still reports what it measured.

Steps (``--steps``, in this order):
  files   random Wan-1.3B DiT (bf16, Wan names, ``frames_per_block`` 3), random Wan 2.1 VAE at its real shapes
          (fp16) and saved text embeddings [1, 512, 4096] (instead of the umT5 text encoder), in a temporary
          ComfyUI base folder (models/diffusion_models, models/vae, models/text_embeds); --tiny: a 2-layer
          Wan-shaped DiT (ComfyUI's detection accepts it), the same real-shaped VAE.
  server  ``main.py --base-directory <tmp> --front-end-root <empty> --disable-api-nodes`` (the pack linked into
          the base's custom_nodes; no frontend package needed: the web UI is not served, the API is), then the
          API workflows of workflows/api/ rewritten to the random files and sizes, CLIPLoader + CLIPTextEncode
          replaced by 'Load Text Embeddings': t2v (saved embeds), core_t2v (core UNETLoader -> our sampler),
          stream_decode (live frames) and long (rolling cache, 30 s). Each run: a new seed (no cached result),
          queue-to-done seconds at a websocket client connected before the POST, time per node (from the
          'executing' messages), first 'self_forcing.frames' event and first binary preview.
  cli     ``python -m self_forcing.cli generate`` with the same files and sizes (mp4 written, as SaveVideo does;
          ``--fused-kernels`` as the nodes run, and plain as the core path runs): seconds from the model loaded
          to the process ended, and to the first raw frame (a FIFO); server_over_cli per workflow.
  core    benchmarks/core_model_speed.py (the Stream Sampler on a core MODEL vs on our loader, in-process).
  caps    the same node on a core MODEL (weights as loaded, and fp8_e4m3fn) and on our loader with
          ``torch.cuda.set_per_process_memory_fraction`` at 24 and 16 GB and ComfyUI's planner told the same
          (``--reserve-vram`` = total - cap), ``--lowvram``; one process per cap; what ComfyUI loaded
          (partially or not), seconds, peak memory, or the error.
  caps14b the same for a random 14B, core UNETLoader with fp8_e4m3fn weights, capped and not (only with 200 s
          left: in practice a call of its own, ``--steps caps14b --budget-s 520``).

    # H200 (after scripts/comfy_gpu_kit.sh here; see docs/benchmarks.md for the device call):
    python benchmarks/comfy_server_gpu.py --comfy-dir .comfy --out $OUT/comfy_server
    # CPU smoke run (tiny sizes, ~2 min on 2 cores):
    python benchmarks/comfy_server_gpu.py --tiny --comfy-dir PATH/ComfyUI --out /tmp/kit_out
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL, VAE, EMBEDS = "self_forcing_dmd.safetensors", "wan_2.1_vae.safetensors", "fox_in_snow_00001.safetensors"
# workflows/api files, by the name used in the JSON
WORKFLOWS = {"t2v": "self_forcing_t2v_from_saved_embeds.json", "core_t2v": "self_forcing_14b_low_memory.json",
             "stream_decode": "self_forcing_t2v_stream_decode.json",
             "long": "self_forcing_long_video_rolling_30s.json"}
# modules the GPU machine lacks and the kit does not carry (--simulate-kit blocks them here)
NOT_CARRIED = ("comfyui_frontend_package", "comfyui_workflow_templates", "comfyui_embedded_docs", "pydantic",
               "pydantic_settings", "sqlalchemy", "alembic", "kornia", "spandrel")
GPU_SIZES = dict(width=832, height=480, length=81, long_length=477, window=21, sink=3)
TINY_SIZES = dict(width=32, height=32, length=9, long_length=33, window=3, sink=3)
# seconds each step may take on the GPU (--tiny: x4, CPU); the run also stops at --budget-s
STEP_CAPS = {"files": 60, "server": 220, "cli": 120, "core": 110, "caps": 130, "caps14b": 420}
TINY_DIT = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096, text_len=512, freq_dim=256)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def latent_frames(length: int) -> int:
    return (length - 1) // 4 + 1


# -- files ------------------------------------------------------------------------------------------------
def write_files(base: Path, tiny: bool, device: str) -> dict:
    """The random DiT, VAE and embeddings under ``base/models``; what was written."""
    import torch

    from self_forcing.sf_model.checkpoint import save_model
    from self_forcing.sf_model.config import WAN_1_3B, WanConfig
    from self_forcing.sf_model.model import CausalWanModel
    from self_forcing.sf_model.text_embeds import save_text_embeds
    from self_forcing.sf_model.vae import WAN21_VAE, WanVAE, save_vae

    models = base / "models"
    for sub in ("diffusion_models", "vae", "text_embeds"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    cfg = WanConfig(**TINY_DIT) if tiny else WAN_1_3B
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(cfg, attn_backend="sdpa")
    save_model(str(models / "diffusion_models" / MODEL), model, cfg, meta={"frames_per_block": 3},
               dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    del model
    vae = WanVAE(WAN21_VAE).eval()
    save_vae(models / "vae" / VAE, vae.half())
    del vae
    ctx = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1)) * 0.1
    save_text_embeds(str(models / "text_embeds" / EMBEDS), ctx)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"dit_params": params, "dit_gib": os.path.getsize(models / "diffusion_models" / MODEL) / 2**30,
            "vae_gib": os.path.getsize(models / "vae" / VAE) / 2**30}


# -- workflows --------------------------------------------------------------------------------------------
def rewrite(prompt: dict, sizes: dict, *, long: bool = False) -> dict:
    """An API workflow on the random files at ``sizes``: text encoder nodes replaced by saved embeddings."""
    prompt = json.loads(json.dumps(prompt))
    for nid, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPTextEncode":
            prompt[nid] = {"class_type": "SelfForcingLoadTextEmbeds", "inputs": {"embeds_name": EMBEDS}}
        elif kind == "CLIPLoader":
            del prompt[nid]
        elif kind == "SelfForcingModelLoader":
            inputs["model_name"] = MODEL
        elif kind == "UNETLoader":
            inputs.update(unet_name=MODEL, weight_dtype="default")
        elif kind == "VAELoader":
            inputs["vae_name"] = VAE
        elif kind == "SelfForcingLoadTextEmbeds":
            inputs["embeds_name"] = EMBEDS
        elif kind == "SelfForcingSampler":
            inputs.update(width=sizes["width"], height=sizes["height"],
                          length=sizes["long_length"] if long else sizes["length"])
        elif kind == "SelfForcingLongVideoOptions":
            inputs.update(window=sizes["window"], sink=sizes["sink"])
    return prompt


def set_seed(prompt: dict, seed: int) -> None:
    for node in prompt.values():
        if node["class_type"] == "SelfForcingSampler":
            node["inputs"]["seed"] = seed


# -- the server -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(server: str, path: str, data: dict | None = None, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(server + path, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def child_env(work: Path, simulate_kit: bool) -> dict:
    """PYTHONPATH: (the import blocker,) ``work/pkg`` holding ``self_forcing`` -> this repository, then what the
    caller had (on the GPU machine /tmp/site with the carried wheels)."""
    pkg = work / "pkg"
    pkg.mkdir(exist_ok=True)
    if not (pkg / "self_forcing").exists():
        (pkg / "self_forcing").symlink_to(REPO, target_is_directory=True)
    paths = [str(pkg)]
    if simulate_kit:
        sim = work / "simulate_kit"
        sim.mkdir(exist_ok=True)
        (sim / "sitecustomize.py").write_text(
            "import sys\nBLOCKED = %r\n" % (NOT_CARRIED,) +
            "class _Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (not carried by the kit)', name=name)\n"
            "        return None\n"
            "sys.meta_path.insert(0, _Block())\n")
        paths.insert(0, str(sim))
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


class Server:
    def __init__(self, args, work: Path, env: dict):
        self.base = work / "base"
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "self_forcing"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        (work / "no_frontend").mkdir(exist_ok=True)
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [args.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory",
               str(self.base), "--front-end-root", str(work / "no_frontend"), "--disable-api-nodes",
               "--disable-auto-launch", "--preview-method", "auto"] + (["--cpu"] if args.tiny else [])
        self.log_path = work / "server.log"
        self.log_file = open(self.log_path, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=args.comfy_dir, env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                http(self.url, "/system_stats", timeout=2)
                return time.perf_counter() - self.t0
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def run_prompt(url: str, prompt: dict, timeout: float) -> dict:
    """Queue ``prompt`` and follow it on /ws: queue-to-done, seconds per node, first live chunk, first preview."""
    from self_forcing.workflows.ws_client import BINARY, WebSocket, comfy_ws_url

    cid = uuid.uuid4().hex
    ws = WebSocket(comfy_ws_url(url, cid), timeout=5.0)
    types = {nid: n["class_type"] for nid, n in prompt.items()}
    res = {"status": "timeout", "live_chunks": 0, "previews": 0, "first_live_chunk_s": None,
           "first_preview_s": None, "node_s": {}, "cached": []}
    t0 = time.perf_counter()
    try:
        pid = http(url, "/prompt", {"prompt": prompt, "client_id": cid})["prompt_id"]
    except urllib.error.HTTPError as e:
        ws.close()
        return {"status": "rejected", "error": e.read().decode(errors="replace")[:2000]}
    current, started = None, None
    deadline = t0 + timeout
    try:
        while time.perf_counter() < deadline:
            try:
                opcode, payload = ws.receive()
            except (TimeoutError, socket.timeout):
                continue
            now = time.perf_counter() - t0
            if opcode == BINARY:
                res["previews"] += 1
                res["first_preview_s"] = res["first_preview_s"] or now
                continue
            msg = json.loads(payload)
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") not in (None, pid):
                continue
            if kind == "self_forcing.frames":
                res["live_chunks"] += 1
                res["first_live_chunk_s"] = res["first_live_chunk_s"] or now
            elif kind == "execution_cached":
                res["cached"] = [types.get(n, n) for n in data.get("nodes", [])]
            elif kind == "executing":
                if current is not None:
                    key = types.get(current, current)
                    res["node_s"][key] = res["node_s"].get(key, 0.0) + now - started
                current, started = data.get("node"), now
                if current is None:
                    res.update(status="success", queue_to_done_s=now)
                    break
            elif kind == "execution_success":
                res.update(status="success", queue_to_done_s=now)
                if current is not None:
                    key = types.get(current, current)
                    res["node_s"][key] = res["node_s"].get(key, 0.0) + now - started
                break
            elif kind == "execution_error":
                res.update(status="error", queue_to_done_s=now,
                           error=f"{data.get('node_type')}: {data.get('exception_message', '')[:1500]}")
                break
    finally:
        ws.close()
    return res


def step_server(args, work: Path, env: dict, sizes: dict, result: dict, save, deadline: float) -> None:
    srv = Server(args, work, env)
    try:
        result["server"] = {"boot_s": srv.wait_ready(min(180.0, deadline - time.perf_counter()))}
        info = http(srv.url, "/object_info")
        result["server"]["pack_nodes"] = sorted(k for k in info if k.startswith("SelfForcing"))
        stats = http(srv.url, "/system_stats")
        result["server"]["system"] = {"comfyui": stats["system"].get("comfyui_version"),
                                      "torch": stats["system"].get("pytorch_version"),
                                      "device": [d.get("name") for d in stats.get("devices", [])]}
        log("server ready in %.1f s, %d pack nodes" % (result["server"]["boot_s"], len(result["server"]["pack_nodes"])))
        if not result["server"]["pack_nodes"]:
            raise RuntimeError("the pack did not import:\n" + srv.tail())
        save()
        seed = 100
        for name in args.workflows:
            runs = 1 if name == "long" and args.tiny else args.runs  # tiny: the long one once (CPU time)
            src = json.loads((REPO / "workflows" / "api" / WORKFLOWS[name]).read_text())
            prompt = rewrite(src, sizes, long=name == "long")
            out = result["server"].setdefault("workflows", {}).setdefault(name, {"runs": []})
            for i in range(runs):
                left = deadline - time.perf_counter()
                last = out["runs"][-1].get("queue_to_done_s", 0) if out["runs"] else 0
                if left < max(10.0, 1.2 * last):  # a second long run only when it fits
                    out["skipped"] = f"run {i}: time budget spent"
                    break
                seed += 1
                set_seed(prompt, seed)
                r = run_prompt(srv.url, prompt, timeout=min(args.run_timeout * (3 if name == "long" else 1), left))
                out["runs"].append(r)
                log(f"server {name} run {i}: {r.get('status')} {r.get('queue_to_done_s', 0):.2f} s "
                    f"first live chunk {r.get('first_live_chunk_s')} nodes {r.get('node_s')}")
                if r["status"] != "success":
                    out["log_tail"] = srv.tail(30)
                    break
                save()
            done = [r["queue_to_done_s"] for r in out["runs"] if r.get("status") == "success"]
            if done:  # the last successful run; counted_run 0 = only a cold run (model load, graph capture)
                out["warm_queue_to_done_s"], out["counted_run"] = done[-1], len(done) - 1
            save()
    finally:
        srv.stop()
        text = srv.log_path.read_text(errors="replace")
        (Path(args.out) / "server.log").write_text(text[-400_000:])  # the work folder may be temporary
        result.setdefault("server", {})["log"] = str(Path(args.out) / "server.log")


# -- the CLI ----------------------------------------------------------------------------------------------
def run_cli(args, env: dict, base: Path, work: Path, sizes: dict, name: str, extra: list[str], timeout: float) -> dict:
    """One ``self_forcing.cli generate`` process: wall seconds, its own 'in X s' and the first raw bytes."""
    models = base / "models"
    long = name.startswith("long")
    fifo = work / f"cli_{name}.rgb"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    cmd = [args.python, "-m", "self_forcing.cli", "generate", "--model", str(models / "diffusion_models" / MODEL),
           "--vae", str(models / "vae" / VAE), "--embeds", str(models / "text_embeds" / EMBEDS),
           "--width", str(sizes["width"]), "--height", str(sizes["height"]),
           "--frames", str(latent_frames(sizes["long_length"] if long else sizes["length"])), "--seed", "1",
           "--device", "cpu" if args.tiny else "cuda", "--dtype", "fp32" if args.tiny else "bf16",
           "--out", str(work / f"cli_{name}.mp4"), "--raw", str(fifo), "--no-progress", *extra]
    if long:
        cmd += ["--window", str(sizes["window"]), "--sink", str(sizes["sink"])]
    marks = {}
    lines = []

    def reader():  # the first raw frame bytes
        with open(fifo, "rb") as f:
            if f.read(1):
                marks["first_raw"] = time.perf_counter()
            while f.read(1 << 20):
                pass

    def stderr_reader(stream):  # the line the CLI prints once the model and VAE are loaded
        for line in stream:
            lines.append(line)
            if "prepared" not in marks and re.search(r", on (cuda|cpu)", line):
                marks["prepared"] = time.perf_counter()

    t0 = time.perf_counter()
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    te = threading.Thread(target=stderr_reader, args=(p.stderr,), daemon=True)
    te.start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = None
    finally:
        if th.is_alive():  # the CLI never opened the FIFO: unblock the reader
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    end = time.perf_counter()
    th.join(5)
    te.join(5)
    err = "".join(lines)
    if rc is None:
        return {"status": "timeout", "stderr": err[-1500:]}
    m = re.search(r"frames at \d+ fps in ([\d.]+) s", err)
    since = lambda k, base: marks[k] - base if k in marks else None  # noqa: E731
    prepared = marks.get("prepared")
    return {"status": "success" if rc == 0 else f"rc {rc}", "wall_s": end - t0,
            "cli_reported_s": float(m.group(1)) if m else None,
            "load_s": since("prepared", t0),
            "generate_s": end - prepared if prepared else None,  # model loaded -> process ended (mp4 written)
            "first_raw_after_load_s": since("first_raw", prepared) if prepared else None,
            "first_raw_bytes_s": since("first_raw", t0), "args": " ".join(extra),
            "mp4_bytes": (work / f"cli_{name}.mp4").stat().st_size if (work / f"cli_{name}.mp4").exists() else 0,
            **({} if rc == 0 else {"stderr": err[-1500:]})}


def step_cli(args, work: Path, env: dict, sizes: dict, result: dict, save, deadline: float) -> None:
    base = work / "base"
    # the nodes run our loader's CUDA trunk (fused kernels + CUDA graphs), as --fused-kernels does; the core-MODEL
    # path does not (plain trunk): t2v_plain is its CLI counterpart. Each run is a new process (the model file
    # is in the page cache after the server step); the long one last (the costliest).
    fused = [] if args.tiny else ["--fused-kernels"]
    plan = [("t2v", fused)] + ([] if args.tiny else [("t2v_plain", [])]) + [("long", fused)]
    out = result.setdefault("cli", {})
    for name, extra in plan:
        left = deadline - time.perf_counter()
        if left < 10:
            out.setdefault("skipped", []).append(name)
            continue
        r = run_cli(args, env, base, work, sizes, name, extra, timeout=min(args.run_timeout * (3 if name == "long" else 2), left))
        out.setdefault(name, []).append(r)
        log(f"cli {name}: {r}")
        save()
    ratios = {}
    srv = result.get("server", {}).get("workflows", {})
    for wf, cli_name in (("t2v", "t2v"), ("core_t2v", "t2v"), ("core_t2v_vs_plain", "t2v_plain"), ("long", "long"),
                         ("stream_decode", "t2v")):
        s = srv.get(wf.replace("_vs_plain", ""), {}).get("warm_queue_to_done_s")
        c = [r["generate_s"] for r in out.get(cli_name, []) if r.get("generate_s")]
        if s and c:  # server: warm queue-to-done; CLI: model loaded -> mp4 written (its last run)
            ratios[wf] = {"server_s": s, "cli_s": c[-1], "server_over_cli": s / c[-1]}
    fl = [r["first_raw_after_load_s"] for r in out.get("t2v", []) if r.get("first_raw_after_load_s")]
    live = [r.get("first_live_chunk_s") for r in srv.get("stream_decode", {}).get("runs", []) if r.get("first_live_chunk_s")]
    if fl and live:  # server: POST -> first live chunk at the ws client (warm); CLI: model loaded -> first raw frame
        ratios["first_pixels"] = {"server_ws_s": live[-1], "cli_after_load_s": fl[-1]}
    result["overhead"] = ratios
    save()


# -- core_model_speed.py and the capped runs ---------------------------------------------------------------
def step_core(args, env: dict, work: Path, result: dict, save, deadline: float) -> None:
    target = Path(args.out) / "core_model_speed.json"
    cmd = [args.python, str(REPO / "benchmarks" / "core_model_speed.py"), "--comfy-dir", str(args.comfy_dir),
           "--size", "tiny" if args.tiny else "1.3B", "--work", str(work / "cms"), "--out", str(target)]
    tiny = ["--width", str(TINY_SIZES["width"]), "--height", str(TINY_SIZES["height"]), "--length", "9"]
    cmd += ["--cpu", "--runs", "1", *tiny] if args.tiny else ["--runs", "3"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(5.0, deadline - time.perf_counter()))
        result["core_model_speed"] = (json.loads(target.read_text()) if p.returncode == 0 and target.exists()
                                      else {"status": f"rc {p.returncode}", "stderr": p.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        result["core_model_speed"] = {"status": "timeout"}
    log("core_model_speed:", json.dumps(result["core_model_speed"])[:600])
    save()


def step_caps(args, env: dict, work: Path, result: dict, save, deadline: float, size: str) -> None:
    key = "caps" if size != "14B" else "caps14b"
    out = result.setdefault(key, {})
    # 14B: uncapped too (does it run at all, how fast, its peak); --tiny: no cap (CPU)
    caps = [None] if args.tiny else args.caps + ([None] if size == "14B" else [])
    for i, cap in enumerate(caps):
        rest = deadline - time.perf_counter()
        left = max(rest - 90 * (len(caps) - i - 1), rest / (len(caps) - i))  # the first may write the 14B file
        if left < 20:
            out[str(cap)] = {"status": "skipped: time budget spent"}
            continue
        target = work / f"caps_{size}_{cap}.json"
        cmd = [args.python, str(Path(__file__).resolve().parent / "comfy_caps_worker.py"), "--comfy-dir",
               str(args.comfy_dir), "--size", size, "--work", str(work), "--worker-out", str(target)]
        cmd += (["--tiny"] if args.tiny else []) + ([] if cap is None else ["--cap-gb", str(cap)])
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            status, tail = ("done" if p.returncode == 0 else f"rc {p.returncode}"), p.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            status, tail = f"timeout after {left:.0f} s", (e.stderr or b"")[-2000:].decode(errors="replace")
        # what the worker wrote (after each path), and how it ended
        out[str(cap)] = {**(json.loads(target.read_text()) if target.exists() else {}), "worker": status,
                         **({} if status == "done" else {"stderr": tail})}
        log(f"caps {size} {cap} GB:", json.dumps(out[str(cap)])[:800])
        save()


# -- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFY_DIR", str(REPO / ".comfy")))
    ap.add_argument("--python", default=sys.executable, help="python for ComfyUI, the CLI and the workers")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out") + "/comfy_server")
    ap.add_argument("--work", default=None, help="models, server state (default: a new temporary folder)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny DiT, 64x64, a few frames")
    ap.add_argument("--steps", default="files,server,cli,core,caps,caps14b")
    ap.add_argument("--workflows", default="t2v,core_t2v,stream_decode,long")
    ap.add_argument("--runs", type=int, default=2, help="runs per workflow (the long one: 1)")
    ap.add_argument("--run-timeout", type=float, default=90.0, help="seconds per run (the long one: 3x)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total seconds; steps that do not fit are skipped")
    ap.add_argument("--caps", default="24,16", help="GB caps for the capped runs")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--simulate-kit", action="store_true",
                    help="block the packages the kit does not carry (a test here of what the GPU machine has)")
    args = ap.parse_args(argv)
    args.comfy_dir = Path(args.comfy_dir).resolve()
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    args.workflows = [w for w in args.workflows.split(",") if w]
    args.caps = [float(c) for c in args.caps.split(",") if c]
    steps = [s for s in args.steps.split(",") if s]
    if not (args.comfy_dir / "main.py").exists():
        raise SystemExit(f"no ComfyUI at {args.comfy_dir} (scripts/comfy_gpu_kit.sh builds .comfy/)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="comfy_server_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    result = {"tiny": args.tiny, "sizes": sizes, "comfy_dir": str(args.comfy_dir), "work": str(work),
              "steps": {}}
    commit = args.comfy_dir / "KIT_COMMIT"
    if commit.exists():
        result["comfy_commit"] = commit.read_text().strip()
    path = out / "comfy_server_gpu.json"

    def save():
        path.write_text(json.dumps(result, indent=1, default=str))

    env = child_env(work, args.simulate_kit)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    result["torch"] = torch.__version__
    for step in steps:
        left = deadline - time.perf_counter()
        t = time.perf_counter()
        if left < 15 or (step == "caps14b" and (args.tiny or left < 200)):
            result["steps"][step] = {"status": "skipped", "left_s": left}
            save()
            continue
        step_deadline = min(deadline, t + STEP_CAPS.get(step, 60) * (4 if args.tiny else 1))
        log(f"step {step} ({left:.0f} s left, cap {step_deadline - t:.0f} s)")
        try:
            if step == "files":
                result["files"] = write_files(work / "base", args.tiny, device)
            elif step == "server":
                step_server(args, work, env, sizes, result, save, step_deadline)
            elif step == "cli":
                step_cli(args, work, env, sizes, result, save, step_deadline)
            elif step == "core":
                step_core(args, env, work, result, save, step_deadline)
            elif step == "caps":
                step_caps(args, env, work, result, save, step_deadline, "1.3B")
            elif step == "caps14b":
                step_caps(args, env, work, result, save, step_deadline, "14B")
            else:
                raise ValueError(f"unknown step {step}")
            result["steps"][step] = {"status": "done", "s": time.perf_counter() - t}
        except Exception as e:
            result["steps"][step] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:3000]}",
                                     "s": time.perf_counter() - t}
            log(f"step {step} failed: {e}")
        save()
    result["total_s"] = time.perf_counter() - t_start
    save()
    if args.work is None and not args.tiny:
        shutil.rmtree(work / "big", ignore_errors=True)  # the 28 GB 14B file
    log(f"wrote {path} ({result['total_s']:.0f} s)")
    return 0 if all(s["status"] != "error" for s in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
