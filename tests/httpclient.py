"""A small HTTP/1.1 client for the tests: raw control over headers and chunked bodies."""

from __future__ import annotations

import http.client
import json
from typing import Any


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


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    timeout: float = 30,
    chunked: bool = False,
) -> Resp:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if chunked:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in items:
                conn.putheader(k, v)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            data = body or b""
            for i in range(0, len(data), 65536):
                piece = data[i : i + 65536]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in items:
                conn.putheader(k, v)
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
