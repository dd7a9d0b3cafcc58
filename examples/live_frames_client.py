#!/usr/bin/env python3
"""Watch a Self Forcing run live: queue a workflow on ComfyUI and save each chunk's frames as they arrive.

Python standard library only. The websocket client is the repository's ``workflows/ws_client.py``:
imported from the installed ``self_forcing`` package, else loaded from the checkout this script sits in
(to use this script elsewhere, take that file along as ``../workflows/ws_client.py``).

The Self Forcing sampler, when its 'vae' input is connected, sends one websocket message per decoded
chunk to the client that queued the prompt:

    {"type": "self_forcing.frames",
     "data": {"prompt_id", "node", "chunk", "chunks", "start_frame", "frame_count", "total_frames",
              "frame_indices": [...], "format": "jpeg"|"png", "images": ["<base64 file>", ...], ...}}

This script posts an API-format workflow with its own client id, writes every received frame to
``OUT/frame_NNNNN.jpg`` (or .png) plus ``OUT/latest.jpg`` (the newest frame, for an image viewer that
reloads), prints when each chunk arrived, and exits when the prompt is done:

    python examples/live_frames_client.py workflows/api/self_forcing_t2v_stream_decode.json --out live \\
        [--server http://127.0.0.1:8188] [--set 6.seed=7] [--log live/arrivals.json]

Exit code 0 when the prompt succeeded, 1 on an execution error or interrupt, 2 when the server rejected
the workflow, 3 on timeout.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid

try:
    from self_forcing.workflows.ws_client import WebSocket, comfy_ws_url
except ImportError:  # package not installed: load workflows/ws_client.py of this checkout by its path
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location(
        "_sf_ws_client", os.path.join(_here, os.pardir, "workflows", "ws_client.py"))
    _ws_client = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_ws_client)
    WebSocket, comfy_ws_url = _ws_client.WebSocket, _ws_client.comfy_ws_url

EVENT = "self_forcing.frames"
EXTENSIONS = {"jpeg": "jpg", "png": "png"}


def save_frames(data: dict, out_dir: str) -> list[str]:
    """Write the images of one 'self_forcing.frames' event; returns the paths (plus latest.<ext>)."""
    ext = EXTENSIONS[data["format"]]
    if len(data["frame_indices"]) != len(data["images"]):
        raise ValueError("event has a different number of frame indices and images")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index, encoded in zip(data["frame_indices"], data["images"]):
        path = os.path.join(out_dir, f"frame_{index:05d}.{ext}")
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(encoded))
        paths.append(path)
    if paths:  # replace atomically, so a viewer never reads half a file
        tmp = os.path.join(out_dir, f".latest.{ext}")
        with open(paths[-1], "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, os.path.join(out_dir, f"latest.{ext}"))
    return paths


def queue_prompt(server: str, prompt: dict, client_id: str) -> str:
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode()
    req = urllib.request.Request(server.rstrip("/") + "/prompt", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["prompt_id"]


def watch(server: str, prompt: dict, out_dir: str, timeout: float = 3600.0) -> dict:
    """Queue ``prompt`` and save live frames until it finishes. Returns what arrived when (seconds after
    the prompt was queued): {"prompt_id", "chunks": [{"chunk", "t", ...}], "executing": [{"node", "t"}],
    "done_t", "status"}."""
    client_id = uuid.uuid4().hex
    ws = WebSocket(comfy_ws_url(server, client_id))
    record: dict = {"chunks": [], "executing": [], "status": None}
    try:
        t0 = time.monotonic()
        prompt_id = record["prompt_id"] = queue_prompt(server, prompt, client_id)
        deadline = t0 + timeout
        while record["status"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError(prompt_id)
            try:
                opcode, raw = ws.receive()
            except socket.timeout:
                continue
            if opcode != 1:
                continue  # binary messages: ComfyUI's own progress previews
            msg = json.loads(raw)
            kind, data, t = msg.get("type"), msg.get("data") or {}, round(time.monotonic() - t0, 3)
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == EVENT:
                paths = save_frames(data, out_dir)
                record["chunks"].append({"chunk": data["chunk"], "chunks": data["chunks"], "t": t,
                                         "node": data["node"], "start_frame": data["start_frame"],
                                         "frame_count": data["frame_count"], "saved": len(paths)})
                print(f"{t:8.3f}s  chunk {data['chunk'] + 1}/{data['chunks']}: frames {data['start_frame']}-"
                      f"{data['start_frame'] + data['frame_count'] - 1} of {data['total_frames']}, saved "
                      f"{len(paths)} ({data['width']}x{data['height']} {data['format']})", flush=True)
            elif kind == "execution_success":
                record["status"], record["done_t"] = "success", t
            elif kind == "execution_error":
                record["status"], record["done_t"] = "error", t
                record["error"] = f"{data.get('node_type')}: {data.get('exception_message')}"
            elif kind == "execution_interrupted":
                record["status"], record["done_t"] = "interrupted", t
            elif kind == "executing" and data.get("node") is not None:
                record["executing"].append({"node": data["node"], "t": t})  # a node starts
            elif kind == "executing" and data.get("prompt_id") == prompt_id:
                record["status"], record["done_t"] = "success", t  # cores without execution_success
    finally:
        ws.close()
    print(f"{record['done_t']:8.3f}s  prompt {record['status']}"
          + (f": {record['error']}" if "error" in record else ""), flush=True)
    return record


def apply_sets(prompt: dict, sets: list[str]) -> None:
    for item in sets:
        target, _, raw = item.partition("=")
        node, _, name = target.partition(".")
        if node not in prompt or not name:
            raise SystemExit(f"--set {item}: no node '{node}' (nodes: {', '.join(prompt)})")
        try:
            prompt[node]["inputs"][name] = json.loads(raw)
        except ValueError:
            prompt[node]["inputs"][name] = raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/self_forcing_t2v_stream_decode.json)")
    ap.add_argument("--server", default=os.environ.get("COMFY_URL", "http://127.0.0.1:8188"))
    ap.add_argument("--out", default="live_frames", help="folder for the received frames")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="override an input by node id (VALUE is JSON when it parses)")
    ap.add_argument("--log", help="also write the arrival times as JSON to this file")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as fh:
        prompt = json.load(fh)
    if "nodes" in prompt:
        print("this is a UI workflow; use its API twin in workflows/api/ (or the editor's 'Export (API)')",
              file=sys.stderr)
        return 2
    apply_sets(prompt, args.set)
    try:
        record = watch(args.server, prompt, args.out, args.timeout)
    except urllib.error.HTTPError as e:
        print(f"rejected by the server (HTTP {e.code}): {e.read().decode(errors='replace')}", file=sys.stderr)
        return 2
    except TimeoutError:
        print("timed out", file=sys.stderr)
        return 3
    if args.log:
        with open(args.log, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
    return 0 if record["status"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
