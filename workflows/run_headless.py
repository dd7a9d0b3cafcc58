#!/usr/bin/env python3
"""Run an API-format workflow on a ComfyUI server without the browser (Python standard library only).

Posts the workflow to /prompt, follows progress on the /ws websocket (denoising passes and the chunk
previews the Self Forcing sampler sends), then downloads every output file through /view.

    python run_headless.py workflows/api/self_forcing_t2v_stream_81f.json \\
        --set 5.seed=7 --set 5.length=161 --out ./videos [--server http://127.0.0.1:8188] [--previews DIR]

``--set NODE.INPUT=VALUE`` overrides an input (VALUE is JSON if it parses, else a string). Exit codes:
0 success, 1 execution error or interrupt, 2 rejected by the server (validation), 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

if __package__:
    from .ws_client import WebSocket, comfy_ws_url
else:  # run as a script (python workflows/run_headless.py): ws_client.py sits next to this file
    from ws_client import WebSocket, comfy_ws_url


# -- HTTP -------------------------------------------------------------------------------------------
def http(server: str, path: str, data: dict | None = None, timeout: float = 60.0):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(server.rstrip("/") + path, data=body,
                                 headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def queue_prompt(server: str, prompt: dict, client_id: str) -> str:
    try:
        reply = json.loads(http(server, "/prompt", {"prompt": prompt, "client_id": client_id}))
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.dumps(json.loads(detail), indent=2)
        except ValueError:
            pass
        raise SystemExit(f"rejected by the server (HTTP {e.code}):\n{detail}") from None
    return reply["prompt_id"]


# -- the run ----------------------------------------------------------------------------------------
def apply_sets(prompt: dict, sets: list[str]) -> None:
    for item in sets or []:
        target, _, raw = item.partition("=")
        node, _, name = target.partition(".")
        if node not in prompt or not name:
            raise SystemExit(f"--set {item}: no node '{node}' (nodes: {', '.join(prompt)})")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        prompt[node]["inputs"][name] = value


def follow(ws: WebSocket, prompt_id: str, deadline: float, previews: str | None) -> dict:
    """Print progress until the prompt finishes; returns counters (progress messages, previews)."""
    stats = {"progress": 0, "previews": 0}
    while True:
        if time.time() > deadline:
            raise TimeoutError
        try:
            opcode, data = ws.receive()
        except socket.timeout:
            continue
        if opcode == 2:  # binary: 4-byte event type, 4-byte image format, then the image
            stats["previews"] += 1
            if previews:
                os.makedirs(previews, exist_ok=True)
                with open(os.path.join(previews, f"preview_{stats['previews']:04d}.jpg"), "wb") as fh:
                    fh.write(data[8:])
            continue
        msg = json.loads(data)
        kind, body = msg.get("type"), msg.get("data") or {}
        if body.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "progress":
            stats["progress"] += 1
            print(f"  node {body.get('node')}: {body.get('value')}/{body.get('max')}", flush=True)
        elif kind == "executing" and body.get("node") is None and body.get("prompt_id") == prompt_id:
            return stats
        elif kind == "execution_error":
            print(f"error in node {body.get('node_id')} ({body.get('node_type')}): "
                  f"{body.get('exception_type')}: {body.get('exception_message')}", file=sys.stderr)
            stats["error"] = body
            return stats
        elif kind == "execution_interrupted":
            stats["error"] = {"exception_message": "interrupted"}
            return stats
        elif kind == "execution_cached" and body.get("nodes"):
            print(f"  cached: {', '.join(body['nodes'])}")


def download_outputs(server: str, prompt_id: str, out_dir: str, deadline: float) -> list[str]:
    entry = None
    while time.time() < deadline:  # the history entry is written just after the last ws message
        entry = json.loads(http(server, f"/history/{prompt_id}")).get(prompt_id)
        if entry:
            break
        time.sleep(0.2)
    if not entry:
        raise TimeoutError
    saved = []
    os.makedirs(out_dir, exist_ok=True)
    for node_out in entry.get("outputs", {}).values():
        for key in ("images", "gifs", "videos", "audio"):
            for f in node_out.get(key) or []:
                if not isinstance(f, dict) or "filename" not in f:
                    continue
                query = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                                "type": f.get("type", "output")})
                path = os.path.join(out_dir, os.path.basename(f["filename"]))
                with open(path, "wb") as fh:
                    fh.write(http(server, f"/view?{query}", timeout=300))
                saved.append(path)
    return saved


def run(workflow: str, server: str, out_dir: str, sets=(), timeout: float = 3600.0, previews: str | None = None) -> dict:
    with open(workflow, encoding="utf-8") as fh:
        prompt = json.load(fh)
    prompt = prompt.get("prompt", prompt)
    if "nodes" in prompt:
        raise SystemExit(f"{workflow} is a UI (editor) workflow; use its API twin in workflows/api/ "
                         "(or the editor's 'Export (API)')")
    apply_sets(prompt, list(sets))
    client_id = uuid.uuid4().hex
    deadline = time.time() + timeout
    ws = WebSocket(comfy_ws_url(server, client_id), timeout=5.0)
    try:
        prompt_id = queue_prompt(server, prompt, client_id)
        print(f"queued {prompt_id}")
        stats = follow(ws, prompt_id, deadline, previews)
    finally:
        ws.close()
    stats["prompt_id"] = prompt_id
    if "error" in stats:
        return stats
    stats["files"] = download_outputs(server, prompt_id, out_dir, deadline)
    for path in stats["files"]:
        print(f"saved {path}")
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--server", default=os.environ.get("COMFY_URL", "http://127.0.0.1:8188"))
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    ap.add_argument("--out", default="outputs", help="folder for the downloaded files")
    ap.add_argument("--previews", help="also save the live preview images into this folder")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    try:
        stats = run(args.workflow, args.server, args.out, args.set, args.timeout, args.previews)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    except TimeoutError:
        print("timed out", file=sys.stderr)
        return 3
    return 1 if "error" in stats else 0


if __name__ == "__main__":
    sys.exit(main())
