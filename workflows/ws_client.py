"""A minimal RFC 6455 websocket client (Python standard library only) for ComfyUI's ``/ws``.

Shared by ``workflows/run_headless.py`` and ``examples/live_frames_client.py``. It has no imports from
this package, so a script can load it by file path when the package is not installed.

- ``encode_frame`` / ``decode_frame``: one frame to and from bytes (7-bit, 16-bit and 64-bit lengths,
  masked or not; clients mask what they send, servers do not).
- ``WebSocket``: handshake (``ws://`` and ``wss://``, the server's ``Sec-WebSocket-Accept`` checked),
  ``receive`` of whole messages (fragments joined, pings answered, close raised as ``ConnectionError``),
  ``send_text`` and ``close``. A socket timeout during ``receive`` loses nothing: bytes already read stay
  buffered, so the caller may simply call ``receive`` again.
- ``comfy_ws_url``: the ``/ws?clientId=...`` address that belongs to an ``http(s)://`` server address.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import urllib.parse
from typing import NamedTuple

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid websocket frame (or refused the handshake)."""


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (masking and unmasking are the same operation)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes = b"", *, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame: FIN/opcode byte, length (7 bits, or 126 + 16 bits, or 127 + 64 bits), mask key, payload."""
    if mask is not None and len(mask) != 4:
        raise ValueError("a websocket mask key is 4 bytes")
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    head = bytes([(0x80 if fin else 0) | (opcode & 0x0F)])
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + bytes(payload)
    return head + mask + apply_mask(bytes(payload), mask)


def decode_frame(data: bytes | bytearray) -> tuple[Frame, int] | None:
    """The frame at the start of ``data`` and its size in bytes, or None while ``data`` holds only part of it.

    A masked payload is unmasked. Raises ProtocolError for reserved bits (no extension is negotiated) and
    for a 64-bit length with its top bit set.
    """
    if len(data) < 2:
        return None
    b0, b1 = data[0], data[1]
    if b0 & 0x70:
        raise ProtocolError(f"websocket frame with reserved bits set (0x{b0:02x})")
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if len(data) < 4:
            return None
        n, pos = struct.unpack_from("!H", data, 2)[0], 4
    elif n == 127:
        if len(data) < 10:
            return None
        n, pos = struct.unpack_from("!Q", data, 2)[0], 10
        if n >> 63:
            raise ProtocolError("websocket frame length has its most significant bit set")
    mask = None
    if b1 & 0x80:
        if len(data) < pos + 4:
            return None
        mask, pos = bytes(data[pos:pos + 4]), pos + 4
    if len(data) < pos + n:
        return None
    payload = bytes(data[pos:pos + n])
    if mask is not None:
        payload = apply_mask(payload, mask)
    return Frame(bool(b0 & 0x80), b0 & 0x0F, payload), pos + n


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``Sec-WebSocket-Key: key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def comfy_ws_url(server: str, client_id: str) -> str:
    """``http://host:port`` -> ``ws://host:port/ws?clientId=...`` (``https`` -> ``wss``)."""
    base = server.rstrip("/")
    for http_scheme, ws_scheme in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http_scheme):
            base = ws_scheme + base[len(http_scheme):]
    return f"{base}/ws?clientId={urllib.parse.quote(client_id)}"


class WebSocket:
    """A websocket client connection: ``receive()`` whole messages, ``send_text``, ``close``."""

    def __init__(self, url: str, timeout: float = 5.0):
        u = urllib.parse.urlparse(url)
        if u.scheme not in ("ws", "wss"):
            raise ValueError(f"not a websocket address: {url!r} (ws:// or wss://)")
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock = sock
        self._buffer = bytearray()   # bytes received but not yet parsed (kept across timeouts)
        self._parts: list[bytes] = []
        self._message_opcode: int | None = None
        self._closed = False
        try:
            self._handshake(u)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, u: urllib.parse.ParseResult) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:  # byte by byte: nothing of the first frame is read with the headers
            byte = self.sock.recv(1)
            if not byte:
                raise ConnectionError("websocket handshake: connection closed")
            head += byte
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split()
        if len(status) < 2 or status[1] != "101":
            raise ProtocolError(f"websocket handshake refused: {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != accept_key(key):
            raise ProtocolError("websocket handshake: the server's Sec-WebSocket-Accept does not match the key")

    def _next_frame(self) -> Frame:
        while True:
            parsed = decode_frame(self._buffer)
            if parsed is not None:
                frame, size = parsed
                del self._buffer[:size]
                return frame
            chunk = self.sock.recv(1 << 20)  # socket.timeout propagates; the buffer keeps what arrived
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buffer += chunk

    def receive(self) -> tuple[int, bytes]:
        """Next message: (TEXT, utf-8 bytes) or (BINARY, bytes). Answers pings; raises ConnectionError when the
        server closes the connection."""
        while True:
            frame = self._next_frame()
            if frame.opcode == PING:
                self.send(PONG, frame.payload)
                continue
            if frame.opcode == PONG:
                continue
            if frame.opcode == CLOSE:
                self.close()
                raise ConnectionError("websocket closed by the server")
            if frame.opcode in (TEXT, BINARY):
                self._message_opcode, self._parts = frame.opcode, [frame.payload]
            elif frame.opcode == CONTINUATION and self._message_opcode is not None:
                self._parts.append(frame.payload)
            else:
                raise ProtocolError(f"unexpected websocket frame (opcode {frame.opcode})")
            if frame.fin:
                opcode, data = self._message_opcode, b"".join(self._parts)
                self._message_opcode, self._parts = None, []
                return opcode, data

    def send(self, opcode: int, payload: bytes = b"") -> None:
        """One masked frame (what RFC 6455 requires of a client)."""
        self.sock.sendall(encode_frame(opcode, payload, mask=os.urandom(4)))

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode("utf-8"))

    def close(self) -> None:
        """Send a close frame (once) and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(CLOSE)
        except OSError:
            pass
        finally:
            self.sock.close()
