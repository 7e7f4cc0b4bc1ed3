"""The tests' HTTP clients, with raw control over headers and how a body is framed.

    send(port, "POST", "/x", b"body", {"idempotency-key": "k"})                # HTTP/1.1
    send(port, "POST", "/x", b"body", h, proto="h2c", frames="split")          # HTTP/2

HTTP/1.1 (http.client): `frames="one"` sends the body with content-length, `"split"` in
several chunks (transfer-encoding: chunked), `"trailers"` chunked with a trailer field.
h2c (HTTP/2 with prior knowledge, the `h2` package from PyPI): `"one"` is one DATA frame
carrying END_STREAM (with content-length), `"split"` three DATA frames (no content-length),
`"empty-end"` the body in one DATA frame then an empty DATA frame with END_STREAM,
`"trailers"` the body then a trailers HEADERS frame with END_STREAM.

`Wire` is one of the two protocols, with each request's body in the next framing of a
cycle, so that a test's first request and its retries arrive framed differently.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

Headers = dict[str, str] | list[tuple[str, str | bytes]]

FRAMINGS = {"h1": ("one", "split", "trailers"), "h2c": ("one", "split", "empty-end", "trailers")}
TRAILER = ("x-test-trailer", "t")


class Resp:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Resp({self.status}, {self.headers}, {self.body[:200]!r})"


def _items(headers: Headers | None) -> list[tuple[str, str | bytes]]:
    return list(headers.items()) if isinstance(headers, dict) else list(headers or [])


def _pieces(data: bytes, n: int = 3) -> list[bytes]:
    """`data` in `n` pieces (fewer when shorter), none empty unless `data` is."""
    if len(data) < 2:
        return [data]
    step = max(1, -(-len(data) // n))
    return [data[i : i + step] for i in range(0, len(data), step)]


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Headers | None = None,
    timeout: float = 30,
    chunked: bool = False,
    *,
    proto: str = "h1",
    frames: str | None = None,
) -> Resp:
    """One request to 127.0.0.1:`port`. `chunked=True` is `frames="split"` (a body of no
    declared length)."""
    frames = frames or ("split" if chunked else "one")
    if proto == "h2c":
        return _send_h2c(port, method, path, body, _items(headers), timeout, frames)
    if proto != "h1":
        raise ValueError(f"unknown protocol {proto!r}")
    return _send_h1(port, method, path, body, _items(headers), timeout, frames)


def _send_h1(
    port: int, method: str, path: str, body: bytes | None, items: list[tuple[str, str | bytes]],
    timeout: float, frames: str,
) -> Resp:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in items:
            conn.putheader(k, v)
        if frames in ("split", "trailers", "empty-end"):
            conn.putheader("Transfer-Encoding", "chunked")
            if frames == "trailers":
                conn.putheader("Trailer", TRAILER[0])
            conn.endheaders()
            data = body or b""
            try:
                for piece in _pieces(data):
                    if piece:
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                if frames == "trailers":
                    conn.send(b"0\r\n%s: %s\r\n\r\n" % (TRAILER[0].encode(), TRAILER[1].encode()))
                else:
                    conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered (e.g. 413) before the whole body was sent
        else:
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            try:
                conn.endheaders(body)
            except (BrokenPipeError, ConnectionResetError):
                # The proxy may answer (e.g. 413) and close before the whole body is sent;
                # its answer is still there to read.
                pass
        r = conn.getresponse()
        return Resp(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def _send_h2c(
    port: int, method: str, path: str, body: bytes | None, items: list[tuple[str, str | bytes]],
    timeout: float, frames: str,
) -> Resp:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out as sent
    deadline = time.monotonic() + timeout
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        data = body or b""
        hdrs: list[tuple[bytes, bytes]] = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", path.encode()),
        ]
        if body is not None and frames in ("one", "empty-end"):
            hdrs.append((b"content-length", str(len(data)).encode()))
        for k, v in items:
            hdrs.append((k.lower().encode(), v if isinstance(v, bytes) else v.encode("latin-1")))
        state = _H2Stream(sid)
        conn.send_headers(sid, hdrs, end_stream=body is None)
        sock.sendall(conn.data_to_send())
        if body is not None:
            pieces = {"one": [data], "split": _pieces(data), "empty-end": [data, b""], "trailers": [data]}[frames]
            if frames == "split" and len(pieces) == 1:
                pieces = [data, b""]  # a body too short to split still takes two frames
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1 and frames != "trailers"
                if not _h2_send_data(sock, conn, state, piece, last, deadline):
                    break  # answered before the whole body was sent
            else:
                if frames == "trailers" and not state.ended:
                    try:
                        conn.send_headers(sid, [(TRAILER[0].encode(), TRAILER[1].encode())], end_stream=True)
                        sock.sendall(conn.data_to_send())
                    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
                        pass
        while not state.ended:
            _h2_read(sock, conn, state, deadline)
        if state.status is None:
            raise ConnectionResetError(f"h2 stream reset without a response (error {state.reset})")
        return Resp(state.status, state.headers, bytes(state.body))
    finally:
        sock.close()


class _H2Stream:
    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.ended = False
        self.reset: int | None = None


def _h2_read(sock: socket.socket, conn: h2.connection.H2Connection, st: _H2Stream, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("h2 response timed out")
    sock.settimeout(left)
    chunk = sock.recv(65536)
    if not chunk:
        if st.status is not None:
            st.ended = True
            return
        raise ConnectionResetError("connection closed before the h2 response")
    for ev in conn.receive_data(chunk):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == st.sid:
            for k, v in ev.headers:
                name, value = k.decode("latin-1"), v.decode("latin-1")
                if name == ":status":
                    st.status = int(value)
                elif not name.startswith(":"):
                    st.headers.append((name, value))
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == st.sid:
            st.body += ev.data
            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == st.sid:
            st.ended = True
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == st.sid:
            st.reset = ev.error_code
            st.ended = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            st.ended = True
    out = conn.data_to_send()
    if out:
        sock.sendall(out)


def _h2_send_data(
    sock: socket.socket, conn: h2.connection.H2Connection, st: _H2Stream, data: bytes, end: bool,
    deadline: float,
) -> bool:
    """Sends `data` as one logical DATA frame (several when flow control or the frame size
    demand it), END_STREAM on the last when `end`. False when the stream ended meanwhile."""
    view = memoryview(data)
    while True:
        if st.ended:
            return False
        try:
            window = min(conn.local_flow_control_window(st.sid), conn.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        if window <= 0 and len(view) > 0:
            _h2_read(sock, conn, st, deadline)
            continue
        piece, view = view[:window], view[window:]
        try:
            conn.send_data(st.sid, piece.tobytes(), end_stream=end and len(view) == 0)
            sock.sendall(conn.data_to_send())
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return False
        except (BrokenPipeError, ConnectionResetError):
            return False
        if len(view) == 0:
            return True


class Wire:
    """HTTP/1.1 (`"h1"`) or h2c (`"h2c"`); `send` frames each request's body in the next
    framing of the protocol's cycle (`FRAMINGS`) unless told otherwise."""

    def __init__(self, proto: str) -> None:
        if proto not in FRAMINGS:
            raise ValueError(f"unknown protocol {proto!r}")
        self.proto = proto
        self._cycle = itertools.cycle(FRAMINGS[proto])
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Wire({self.proto})"

    def next_frames(self) -> str:
        with self._lock:
            return next(self._cycle)

    def send(
        self,
        port: int,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Headers | None = None,
        timeout: float = 30,
        chunked: bool = False,
        frames: str | None = None,
    ) -> Resp:
        if frames is None:
            frames = self.next_frames()
            if chunked and frames == "one":
                frames = "split"
        return send(port, method, path, body, headers, timeout, proto=self.proto, frames=frames)
