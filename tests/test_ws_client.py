"""The one websocket client (workflows/ws_client.py) and the two scripts built on it, against a fake ComfyUI."""

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from self_forcing.workflows import run_headless
from self_forcing.workflows.ws_client import (BINARY, CLOSE, CONTINUATION, PING, PONG, TEXT, Frame, ProtocolError,
                                              WebSocket, accept_key, comfy_ws_url, decode_frame, encode_frame)

REPO = Path(__file__).resolve().parent.parent


# -- framing ------------------------------------------------------------------------------------------
def test_rfc6455_examples():
    """The sample frames of RFC 6455 section 5.7 and the handshake example of section 1.3."""
    assert encode_frame(TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    masked = bytes.fromhex("818537fa213d7f9f4d5158")
    assert encode_frame(TEXT, b"Hello", mask=bytes.fromhex("37fa213d")) == masked
    assert decode_frame(masked) == (Frame(True, TEXT, b"Hello"), len(masked))
    assert decode_frame(bytes.fromhex("010348656c")) == (Frame(False, TEXT, b"Hel"), 5)
    assert decode_frame(bytes.fromhex("80026c6f")) == (Frame(True, CONTINUATION, b"lo"), 4)
    assert encode_frame(BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert encode_frame(BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size,length_field", [(0, 0), (125, 125), (126, 126), (65535, 126), (65536, 127),
                                               (70000, 127)])
@pytest.mark.parametrize("mask", [None, b"\x01\x80\xff\x7e"])
def test_frames_round_trip_in_every_length_form(size, length_field, mask):
    payload = os.urandom(size)
    data = encode_frame(BINARY, payload, mask=mask)
    assert data[1] & 0x7F == length_field and bool(data[1] & 0x80) == (mask is not None)
    if mask is not None and size:
        assert payload not in data  # the payload travels masked
    assert decode_frame(data) == (Frame(True, BINARY, payload), len(data))
    assert decode_frame(data + b"next") == (Frame(True, BINARY, payload), len(data))
    for cut in {c for c in (0, 1, 2, 3, 9, len(data) // 2, len(data) - 1) if c < len(data)}:
        assert decode_frame(data[:cut]) is None  # incomplete: wait for more bytes


def test_invalid_frames_are_refused():
    with pytest.raises(ProtocolError, match="reserved"):
        decode_frame(bytes([0xC1, 0x00]))  # RSV1 without a negotiated extension
    with pytest.raises(ProtocolError, match="most significant"):
        decode_frame(bytes([0x82, 0x7F]) + (1 << 63).to_bytes(8, "big"))
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(TEXT, b"x", mask=b"abc")


def test_comfy_ws_url():
    assert comfy_ws_url("http://127.0.0.1:8188/", "ab") == "ws://127.0.0.1:8188/ws?clientId=ab"
    assert comfy_ws_url("https://host", "ab") == "wss://host/ws?clientId=ab"


# -- a fake ComfyUI ---------------------------------------------------------------------------------------
class FakeComfy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.frames: list[bytes] = []       # raw frames /ws sends once a prompt is queued
        self.chunked = False                # send them in pieces with pauses (client timeouts in between)
        self.reject = False
        self.prompts: list[dict] = []
        self.client_frames: list[Frame] = []
        self.queued = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, code: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.reject:
            return self._json(400, {"error": {"type": "prompt_outputs_failed_validation"}})
        self.server.prompts.append(body)
        self._json(200, {"prompt_id": "p1", "number": 0})
        self.server.queued.set()

    def do_GET(self):
        if self.path.startswith("/ws"):
            return self._websocket()
        if self.path.startswith("/history/p1"):
            return self._json(200, {"p1": {"outputs": {"9": {"videos": [
                {"filename": "clip.mp4", "subfolder": "", "type": "output"}]}}}})
        if self.path.startswith("/view"):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            return self.wfile.write(b"VIDEO")
        self._json(404, {})

    def _websocket(self):
        self.close_connection = True
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept_key(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.wfile.flush()
        sock = self.connection
        sock.sendall(encode_frame(TEXT, b'{"type": "status", "data": {"status": {}}}'))
        if not self.server.queued.wait(10):
            return
        for frame in self.server.frames:
            if self.server.chunked:  # a frame in three pieces, the client times out between them
                for piece in (frame[:1], frame[1:len(frame) // 2], frame[len(frame) // 2:]):
                    sock.sendall(piece)
                    time.sleep(0.15)
            else:
                sock.sendall(frame)
        buf = bytearray()  # what the client sends back (pongs, its close frame)
        sock.settimeout(10)
        while True:
            parsed = decode_frame(buf)
            if parsed:
                frame, size = parsed
                del buf[:size]
                self.server.client_frames.append(frame)
                if frame.opcode == CLOSE:
                    return
                continue
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk


def text(obj, **kw) -> bytes:
    return encode_frame(TEXT, json.dumps(obj).encode(), **kw)


@pytest.fixture
def comfy():
    server = FakeComfy()
    yield server
    server.shutdown()
    server.server_close()


# -- the client ---------------------------------------------------------------------------------------------
def test_client_joins_fragments_answers_pings_and_survives_timeouts(comfy):
    big = os.urandom(70000)
    comfy.frames = [encode_frame(PING, b"hi"),
                    encode_frame(TEXT, b'{"a": ', fin=False), encode_frame(PING, b"mid"),
                    encode_frame(CONTINUATION, b"1}"),
                    encode_frame(BINARY, big),
                    encode_frame(CLOSE, b"\x03\xe8")]
    comfy.chunked = True
    comfy.queued.set()
    ws = WebSocket(comfy_ws_url(comfy.url, "c1"), timeout=0.05)
    got, timeouts = [], 0
    try:
        while True:
            try:
                got.append(ws.receive())
            except socket.timeout:
                timeouts += 1
    except ConnectionError as e:
        assert "closed by the server" in str(e)
    ws.close()  # a second close is a no-op
    assert got == [(TEXT, b'{"type": "status", "data": {"status": {}}}'), (TEXT, b'{"a": 1}'), (BINARY, big)]
    assert timeouts >= 5  # timeouts fell inside frames, and no byte was lost
    deadline = time.time() + 5
    while len(comfy.client_frames) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert [(f.opcode, f.payload) for f in comfy.client_frames] == [(PONG, b"hi"), (PONG, b"mid"), (CLOSE, b"")]


def test_handshake_is_checked(comfy):
    with pytest.raises(ProtocolError, match="refused"):
        WebSocket(comfy.url.replace("http", "ws") + "/nothing")
    with pytest.raises(ValueError, match="ws://"):
        WebSocket(comfy.url)


# -- the two scripts -------------------------------------------------------------------------------------------
def workflow(tmp_path) -> str:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"5": {"class_type": "Sampler", "inputs": {"seed": 1}}}))
    return str(path)


def test_run_headless_follows_and_downloads(comfy, tmp_path, capsys):
    preview = b"\x00\x00\x00\x01\x00\x00\x00\x01" + os.urandom(70000)  # event type, format, image
    comfy.frames = [text({"type": "progress", "data": {"prompt_id": "p1", "node": "5", "value": 1, "max": 2}},
                         mask=None),
                    encode_frame(BINARY, preview),
                    encode_frame(PING, b""),
                    text({"type": "executing", "data": {"node": None, "prompt_id": "p1"}})]
    code = run_headless.main([workflow(tmp_path), "--server", comfy.url, "--set", "5.seed=7",
                              "--out", str(tmp_path / "out"), "--previews", str(tmp_path / "prev")])
    assert code == 0
    assert comfy.prompts[0]["prompt"]["5"]["inputs"]["seed"] == 7
    assert (tmp_path / "out" / "clip.mp4").read_bytes() == b"VIDEO"
    assert (tmp_path / "prev" / "preview_0001.jpg").read_bytes() == preview[8:]
    assert "node 5: 1/2" in capsys.readouterr().out


def test_run_headless_exit_codes(comfy, tmp_path):
    comfy.frames = [text({"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "5",
                                                              "exception_message": "boom"}})]
    assert run_headless.main([workflow(tmp_path), "--server", comfy.url, "--out", str(tmp_path)]) == 1
    comfy.reject = True
    assert run_headless.main([workflow(tmp_path), "--server", comfy.url, "--out", str(tmp_path)]) == 2


def load_live_client():
    spec = importlib.util.spec_from_file_location("live_frames_client", REPO / "examples" / "live_frames_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_frames_client_saves_each_chunk(comfy, tmp_path):
    client = load_live_client()
    images = [os.urandom(200), os.urandom(90000)]
    event = {"prompt_id": "p1", "node": "6", "chunk": 0, "chunks": 1, "start_frame": 0, "frame_count": 2,
             "total_frames": 2, "frame_indices": [0, 1], "format": "png", "width": 8, "height": 8,
             "images": [base64.b64encode(i).decode() for i in images]}
    comfy.frames = [text({"type": client.EVENT, "data": event}),
                    text({"type": "execution_success", "data": {"prompt_id": "p1"}})]
    log = tmp_path / "arrivals.json"
    code = client.main([workflow(tmp_path), "--server", comfy.url, "--out", str(tmp_path / "live"),
                        "--set", "5.seed=3", "--log", str(log)])
    assert code == 0
    assert [(tmp_path / "live" / f"frame_0000{i}.png").read_bytes() for i in (0, 1)] == images
    assert (tmp_path / "live" / "latest.png").read_bytes() == images[1]
    record = json.loads(log.read_text())
    assert record["status"] == "success" and [c["saved"] for c in record["chunks"]] == [2]
    comfy.reject = True
    assert client.main([workflow(tmp_path), "--server", comfy.url, "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("script", ["workflows/run_headless.py", "examples/live_frames_client.py"])
def test_scripts_run_without_the_installed_package(script):
    """``python -S``: no site-packages, so no installed self_forcing; each script still finds ws_client.py."""
    out = subprocess.run([sys.executable, "-S", str(REPO / script), "--help"], capture_output=True, text=True,
                         cwd=str(REPO.parent), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--server" in out.stdout
