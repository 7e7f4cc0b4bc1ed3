#!/usr/bin/env python3
"""Correctness probe beside the load runs (`make bench`): what idemgate and the alternative
(idempotent-proxy-server + Redis, bench/hostprocs.py) answer in three situations a client
meets, with the origin's own log (tests/origin.py records every request) as the witness:

1. duplicates: --duplicates requests with one key and one body, sent at once, while the
   origin takes --delay-ms to answer; how many reached the origin, what each client got,
   and what a retry after they all finished gets;
2. changed body: a second request with the first one's key and another body;
3. refused connection: a request while nothing listens on the origin's port (Envoy answers
   503, the alternative 502), then, with the origin up, the same request again.

idemgate runs in Envoy (tests/harness.py, --concurrency 2) with its default configuration
(onConcurrent reject: 409) and with onConcurrent wait; the alternative with the settings of
the load runs. Not a load test: nothing is pinned, every request has a client timeout.

    bench/correctness.py --out target/bench/correctness.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402
import hostprocs  # noqa: E402

CLIENT_TIMEOUT_S = 10.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Answer:
    def __init__(self, status: int | None, headers: dict[str, str], body: bytes, took_ms: float, error: str = ""):
        self.status, self.headers, self.body, self.took_ms, self.error = status, headers, body, took_ms, error

    def execution(self) -> int | None:
        """The origin's execution number in the answer (tests/origin.py's JSON), if any."""
        try:
            v = json.loads(self.body).get("execution")
            return int(v) if v is not None else None
        except (ValueError, AttributeError, TypeError):
            return None

    def label(self) -> str:
        if self.status is None:
            return f"no answer within {CLIENT_TIMEOUT_S:.0f} s" if "timed out" in self.error else f"error ({self.error})"
        if self.headers.get("retry-after"):
            return f"{self.status} (retry-after {self.headers['retry-after']})"
        return str(self.status)

    def why(self) -> str:
        """The start of an error answer's body (what the system says went wrong)."""
        return self.body[:160].decode(errors="replace").strip() if self.status not in (None, 200) else ""


def send(port: int, path: str, key: str, body: bytes, conn: http.client.HTTPConnection | None = None) -> Answer:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    t = time.monotonic()
    try:
        c.request("POST", path, body=body, headers={"Idempotency-Key": key, "Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data, (time.monotonic() - t) * 1000)
    except (OSError, http.client.HTTPException) as e:
        return Answer(None, {}, b"", (time.monotonic() - t) * 1000, str(e) or type(e).__name__)
    finally:
        c.close()


def origin_hits(origin: harness.Origin, key: str) -> list[dict[str, Any]]:
    return [r for r in origin.requests() if (r.get("headers") or {}).get("idempotency-key") == key]


def summarize(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[a.label()] = out.get(a.label(), 0) + 1
    return dict(sorted(out.items()))


def reasons(answers: list[Answer]) -> dict[str, int]:
    """Error answers by the start of their body (JSON problem titles, proxy messages)."""
    out: dict[str, int] = {}
    for a in answers:
        w = a.why()
        if w:
            try:
                w = json.loads(a.body).get("title") or w
            except (ValueError, AttributeError):
                pass
            out[w] = out.get(w, 0) + 1
    return out


def duplicates(system: dict[str, Any], origin: harness.Origin, n: int, delay_ms: int, tag: str) -> dict[str, Any]:
    key = f"dup-{tag}-{system['id']}"
    body = b'{"order":"dup","amount":1}'
    path = system["slow_path"]
    conns = [http.client.HTTPConnection("127.0.0.1", system["port"], timeout=CLIENT_TIMEOUT_S + delay_ms / 1000)
             for _ in range(n)]
    for c in conns:
        c.connect()
    answers: list[Answer | None] = [None] * n
    sent: list[float] = [0.0] * n
    gate = threading.Barrier(n)

    def go(i: int) -> None:
        gate.wait()
        sent[i] = time.monotonic()
        answers[i] = send(system["port"], path, key, body, conns[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(CLIENT_TIMEOUT_S + 30)
    got = [a if a is not None else Answer(None, {}, b"", 0, "thread did not finish") for a in answers]
    hits = origin_hits(origin, key)
    executions = {a.execution() for a in got if a.status == 200 and a.execution() is not None}
    time.sleep(0.2)
    retry = send(system["port"], path, key, body)
    return {
        "key": key,
        "sent_within_ms": (max(sent) - min(sent)) * 1000 if all(sent) else None,
        "answers": summarize(got),
        "error_reasons": reasons(got),
        "replayed_header": sum(a.headers.get("idempotent-replayed") == "true" for a in got),
        "distinct_executions_in_200s": len(executions),
        "slowest_ms": max(a.took_ms for a in got),
        "origin_requests": len(hits),
        "retry": {"status": retry.label(), "same_execution": retry.execution() in executions if executions else None,
                  "took_ms": retry.took_ms, "why": retry.why()},
        "origin_requests_after_retry": len(origin_hits(origin, key)),
    }


def changed_body(system: dict[str, Any], origin: harness.Origin, tag: str) -> dict[str, Any]:
    key = f"body-{tag}-{system['id']}"
    first = send(system["port"], system["path"], key, b'{"order":"a","amount":1}')
    second = send(system["port"], system["path"], key, b'{"order":"a","amount":1000}')
    hits = origin_hits(origin, key)
    return {
        "key": key,
        "first": first.label(),
        "second": second.label(),
        "second_is_first_answer": second.status == 200 and second.execution() is not None
        and second.execution() == first.execution(),
        "second_body": second.body[:300].decode(errors="replace"),
        "origin_requests": len(hits),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--duplicates", type=int, default=200)
    ap.add_argument("--delay-ms", type=int, default=200)
    ap.add_argument("--idemgate-wasm", type=Path, default=harness.wasm_path())
    args = ap.parse_args()
    harness.ensure_docker()
    tag = hex(int(time.time() * 1000))[2:]
    origin_port = harness.free_port()
    delay = f"delay={args.delay_ms / 1000}"
    # Both systems point at the origin's port before anything listens there (check 3).
    listeners = [
        harness.listener("reject", harness.free_port(), {}, vm_id="probe-reject"),
        harness.listener("wait", harness.free_port(), {"onConcurrent": {"action": "wait", "waitMillis": 5000}},
                         vm_id="probe-wait"),
    ]
    envoy = harness.Envoy(listeners, origin_port=origin_port, concurrency=2, wasm=args.idemgate_wasm,
                          log_level="warn", component_log_level=None)
    alt = hostprocs.AltProxy({"SLOW": f"http://127.0.0.1:{origin_port}/orders?{delay}",
                              "FAST": f"http://127.0.0.1:{origin_port}/orders"}, None)
    origin = harness.Origin(port=origin_port, verbose=False)
    systems = [
        {"id": "idemgate", "title": "idemgate (default: onConcurrent reject)", "port": listeners[0]["port"],
         "path": "/orders", "slow_path": f"/orders?{delay}"},
        {"id": "idemgate_wait", "title": "idemgate, onConcurrent wait (5 s)", "port": listeners[1]["port"],
         "path": "/orders", "slow_path": f"/orders?{delay}"},
        {"id": "alt", "title": "idempotent-proxy-server + Redis", "port": alt.port, "path": "/URL_FAST",
         "slow_path": "/URL_SLOW"},
    ]
    out: dict[str, Any] = {"duplicates": args.duplicates, "delay_ms": args.delay_ms,
                           "client_timeout_s": CLIENT_TIMEOUT_S, "systems": {s["id"]: s["title"] for s in systems},
                           "alt": {}, "checks": {}}
    try:
        envoy.start()
        alt.start()
        out["alt"] = {"versions": alt.versions(), "config": alt.config()}
        log("correctness probe: a request while the origin refuses connections, then its retry")
        refused: dict[str, Any] = {}
        for s in systems:
            key = f"refused-{tag}-{s['id']}"
            first = send(s["port"], s["path"], key, b'{"order":"r"}')
            refused[s["id"]] = {"key": key, "first": first.label(), "first_why": first.why()}
        origin.start()
        for s in systems:
            r = refused[s["id"]]
            again = send(s["port"], s["path"], r["key"], b'{"order":"r"}')
            r.update({"retry": again.label(), "retry_took_ms": again.took_ms, "retry_why": again.why(),
                      "origin_requests": len(origin_hits(origin, r["key"]))})
        out["checks"]["refused"] = refused
        log("correctness probe: the same key with a changed body")
        out["checks"]["changed_body"] = {s["id"]: changed_body(s, origin, tag) for s in systems}
        # last: duplicates may leave the alternative's Redis pool exhausted for a while
        log(f"correctness probe: {args.duplicates} concurrent duplicates, origin answering after {args.delay_ms} ms")
        out["checks"]["duplicates"] = {s["id"]: duplicates(s, origin, args.duplicates, args.delay_ms, tag)
                                       for s in systems}
    finally:
        alt.stop()
        origin.stop()
        envoy.stop()
    for check, per in out["checks"].items():
        for sid, r in per.items():
            log(f"  {check} {sid}: {json.dumps(r)[:400]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
