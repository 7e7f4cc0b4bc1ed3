#!/usr/bin/env python3
"""idemgate demo and test origin (Python 3.11, stdlib only).

Serves any method on any path on --port (default 8080) and a control API on
--control-port (default 8081). Every request is recorded the moment its request
line and headers are parsed, *before* its body is read, so a request whose body
never arrives is still in the log.

Behaviour by query parameters (combinable, any path):
  delay=<seconds>   sleep before answering (float)
  status=<code>     answer with that status
  hang=1            never answer: hold the socket (up to 120 s, or until the
                    client goes away), then close
  reset=1           read the request, then close abruptly with a TCP RST
  size=<n>          response body of n bytes (deterministic pattern,
                    application/octet-stream) instead of the JSON body
Default response: 200 (201 for a POST under a --created prefix, e.g. the demo's /orders)
with JSON
  {"execution": n, "method": ..., "path": ..., "body_sha256": ..., "nonce": ...}
and headers content-type: application/json, x-origin-execution: n,
set-cookie: session=abc; Path=/, x-request-nonce: <nonce>.
"execution" is a global counter incremented for every request whose body was
read completely.

Control API:
  GET  /requests   JSON list of recorded requests, in arrival order
  POST /reset      clear the log and the execution counter
  GET  /healthz    "ok"

With --port 0 / --control-port 0 the OS picks free ports; a line
"READY port=<p> control_port=<c>" is always printed (and flushed) once both
servers listen.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
from typing import Any

HANG_MAX_SECONDS = 120.0
BODY_READ_TIMEOUT = 120.0
PATTERN = bytes(range(256))


def pattern_body(n: int) -> bytes:
    """Deterministic body of n bytes: 0x00, 0x01, ... 0xff, 0x00, ..."""
    reps, rest = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:rest]


class State:
    """Request log and execution counter shared by all handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.executions = 0
        self.seq = 0
        self.verbose = False
        # POST under these path prefixes answers 201 Created (unless status= says otherwise).
        self.created: tuple[str, ...] = ()

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.seq += 1
            entry["seq"] = self.seq
            self.log.append(entry)
        return entry

    def finish_body(self, entry: dict[str, Any], length: int, sha: str, complete: bool) -> int | None:
        with self.lock:
            entry["body_length"] = length
            entry["body_sha256"] = sha
            entry["body_complete"] = complete
            entry["t_body_done"] = time.time()
            if complete:
                self.executions += 1
                entry["execution"] = self.executions
                return self.executions
            return None

    def update(self, entry: dict[str, Any], **kw: Any) -> None:
        with self.lock:
            entry.update(kw)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return json.loads(json.dumps(self.log))

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.executions = 0
            self.seq = 0


STATE = State()


class BodyError(Exception):
    pass


class OriginHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "idemgate-origin/1"

    def version_string(self) -> str:
        return self.server_version

    # Any method (do_GET, do_POST, do_FOO, ...) goes to _handle.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    # -- body reading ---------------------------------------------------------

    def _read_exact(self, n: int, h: "hashlib._Hash", counter: list[int]) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                raise BodyError("eof")
            h.update(chunk)
            counter[0] += len(chunk)
            n -= len(chunk)

    def _read_line(self) -> bytes:
        line = self.rfile.readline(65537)
        if not line:
            raise BodyError("eof")
        return line

    def _read_body(self, h: "hashlib._Hash", counter: list[int]) -> None:
        te = (self.headers.get("transfer-encoding") or "").lower()
        if "chunked" in te:
            while True:
                size_line = self._read_line().split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError as e:
                    raise BodyError(f"bad chunk size {size_line!r}") from e
                if size == 0:
                    # trailers until the empty line
                    while self._read_line() not in (b"\r\n", b"\n"):
                        pass
                    return
                self._read_exact(size, h, counter)
                self._read_line()  # CRLF after the chunk
        else:
            length = int(self.headers.get("content-length") or 0)
            self._read_exact(length, h, counter)

    # -- main -------------------------------------------------------------------

    def _handle(self) -> None:
        t0 = time.time()
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        entry = STATE.record(
            {
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "t_start": t0,
                "body_length": 0,
                "body_sha256": None,
                "body_complete": False,
                "execution": None,
                "status": None,
                "outcome": "reading",
            }
        )

        h = hashlib.sha256()
        counter = [0]
        complete = True
        try:
            self.connection.settimeout(BODY_READ_TIMEOUT)
            self._read_body(h, counter)
        except (BodyError, OSError, ValueError):
            complete = False
        execution = STATE.finish_body(entry, counter[0], h.hexdigest(), complete)
        if not complete:
            STATE.update(entry, outcome="body-incomplete")
            self._vlog(entry)
            self.close_connection = True
            return

        try:
            delay = float(q.get("delay", 0) or 0)
        except ValueError:
            delay = 0.0
        if delay > 0:
            time.sleep(delay)

        if q.get("reset") == "1":
            STATE.update(entry, outcome="reset")
            self._vlog(entry)
            self._abort()
            return
        if q.get("hang") == "1":
            STATE.update(entry, outcome="hang")
            self._vlog(entry)
            self._hang()
            return

        created = self.command == "POST" and any(url.path.startswith(p) for p in STATE.created)
        default = 201 if created else 200
        try:
            status = int(q.get("status", default))
        except ValueError:
            status = default
        nonce = secrets.token_hex(8)
        if "size" in q:
            try:
                body = pattern_body(max(0, int(q["size"])))
            except ValueError:
                body = b""
            ctype = "application/octet-stream"
        else:
            body = json.dumps(
                {
                    "execution": execution,
                    "method": self.command,
                    "path": self.path,
                    "body_sha256": entry["body_sha256"],
                    "nonce": nonce,
                }
            ).encode()
            ctype = "application/json"
        STATE.update(entry, status=status, nonce=nonce, outcome="answered")
        try:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.send_header("x-origin-execution", str(execution))
            self.send_header("set-cookie", "session=abc; Path=/")
            self.send_header("x-request-nonce", nonce)
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304) and not 100 <= status < 200:
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            STATE.update(entry, outcome="write-failed")
            self.close_connection = True
        self._vlog(entry)

    def _abort(self) -> None:
        """Close with RST (SO_LINGER on, timeout 0) and no response."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _hang(self) -> None:
        """Never answer: wait until the peer closes or HANG_MAX_SECONDS pass."""
        deadline = time.monotonic() + HANG_MAX_SECONDS
        sock = self.connection
        try:
            while (left := deadline - time.monotonic()) > 0:
                r, _, _ = select.select([sock], [], [], min(left, 1.0))
                if r and not sock.recv(65536, socket.MSG_PEEK):
                    break  # peer closed
                if r:
                    sock.recv(65536)  # discard pipelined data
        except OSError:
            pass
        self.close_connection = True

    def _vlog(self, e: dict[str, Any]) -> None:
        if STATE.verbose:
            print(
                f"[origin] #{e['seq']} {e['method']} {e['path']} body={e['body_length']}B"
                f"{'' if e['body_complete'] else ' (incomplete)'} exec={e['execution']}"
                f" -> {e['outcome']}{' ' + str(e['status']) if e['status'] else ''}"
                f" key={e['headers'].get('idempotency-key', '-')}",
                flush=True,
            )


class ControlHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "idemgate-origin-control/1"

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _send(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drain(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/requests":
            self._send(200, STATE.snapshot())
        elif path == "/healthz":
            self._send(200, "ok")
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        self._drain()
        if urllib.parse.urlsplit(self.path).path == "/reset":
            STATE.reset()
            self._send(200, {"reset": True})
        else:
            self._send(404, {"error": "not found"})


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Deep enough for thousands of concurrent connections (tests of Envoy's circuit breakers).
    request_queue_size = 4096


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--control-port", type=int, default=8081)
    ap.add_argument("--verbose", action="store_true", help="one log line per request on stdout")
    ap.add_argument("--created", action="append", default=[], metavar="PREFIX",
                    help="answer 201 to POST requests whose path starts with PREFIX (repeatable)")
    args = ap.parse_args(argv)
    STATE.verbose = args.verbose
    STATE.created = tuple(args.created)

    origin = Server((args.host, args.port), OriginHandler)
    control = Server((args.host, args.control_port), ControlHandler)
    for srv in (origin, control):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(
        f"READY port={origin.server_address[1]} control_port={control.server_address[1]} pid={os.getpid()}",
        flush=True,
    )
    stop = threading.Event()
    try:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    origin.shutdown()
    control.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
