#!/usr/bin/env python3
"""Watch a Self Forcing run live: queue a workflow on ComfyUI and save each chunk's frames as they arrive.

Python standard library only (copy this file anywhere). The Self Forcing sampler, when its 'vae' input is
connected, sends one websocket message per decoded chunk to the client that queued the prompt:

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
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

EVENT = "self_forcing.frames"
EXTENSIONS = {"jpeg": "jpg", "png": "png"}


class WebSocket:
    """The smallest RFC 6455 client that reads ComfyUI's /ws (unmasked server frames, ping/pong, close)."""

    def __init__(self, url: str, timeout: float = 5.0):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: {u.hostname}:{u.port or 80}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            byte = self.sock.recv(1)
            if not byte:
                raise ConnectionError("websocket handshake: connection closed")
            head += byte
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head.splitlines()[0]!r}")

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = self.sock.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("websocket closed")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def receive(self) -> tuple[int, bytes]:
        """Next message: (1, text) or (2, binary); answers pings; raises ConnectionError on close."""
        parts, opcode = [], None
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            op = b0 & 0x0F
            if op == 9:
                self._send(10, data)
                continue
            if op == 8:
                raise ConnectionError("websocket closed by the server")
            if op in (1, 2):
                opcode = op
            parts.append(data)
            if b0 & 0x80:
                return opcode, b"".join(parts)

    def close(self) -> None:
        try:
            self._send(8)
        finally:
            self.sock.close()


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
    ws_url = server.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    ws = WebSocket(f"{ws_url}/ws?clientId={client_id}")
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
