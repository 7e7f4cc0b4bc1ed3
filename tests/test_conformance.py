"""Profile conformance: every vector in tests/conformance/*.json against its profile from
envoy/profiles/ in a real Envoy (Docker, --concurrency 4).

Each profile is loaded as it is, and once more as the "short" variant (ttlSeconds and
leaseSeconds set to 4) for the scenarios that need a key to expire within the test, both
as shipped (single-filter mode). Every vector runs over HTTP/1.1 and over h2c, each
request's body framed the next way of its protocol's cycle (see httpclient.FRAMINGS).
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness import REPO_ROOT, Envoy, Origin, free_port, listener
from httpclient import Resp, Wire, send

PROFILES_DIR = REPO_ROOT / "envoy" / "profiles"
VECTORS_DIR = REPO_ROOT / "tests" / "conformance"


def load_profiles() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(PROFILES_DIR.glob("*.json"))}


def load_vectors() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in sorted(VECTORS_DIR.glob("*.json")):
        doc = json.loads(p.read_text())
        for sc in doc["scenarios"]:
            out.append((doc["profile"], sc))
    return out


PROFILES = load_profiles()
VECTORS = load_vectors()


def variant_config(name: str, short: bool) -> dict[str, Any]:
    cfg = copy.deepcopy(PROFILES[name])
    cfg.setdefault("store", {})["namespace"] = f"{name}-short" if short else name
    if short:
        cfg["ttlSeconds"] = 4
        cfg["leaseSeconds"] = 4
        for route in cfg.get("routes", []):
            route.pop("ttlSeconds", None)
            route.pop("leaseSeconds", None)
    return cfg


@pytest.fixture(scope="module")
def origin():
    with Origin(verbose=False) as o:
        yield o


@pytest.fixture(scope="module")
def envoy(origin):
    specs = []
    for name in PROFILES:
        for short in (False, True):
            specs.append(listener(f"{name}-short" if short else name, free_port(), variant_config(name, short)))
    with Envoy(specs, origin_port=origin.port, concurrency=4) as e:
        yield e


@pytest.fixture(params=["h1", "h2c"])
def wire(request: pytest.FixtureRequest) -> Wire:
    return Wire(request.param)


def test_every_profile_has_vectors_and_every_vector_a_profile():
    covered = {p for p, _ in VECTORS}
    assert set(PROFILES) == {"default", "stripe", "resultfly", "experiture", "slab5", "selwise", "fyno"}
    assert covered == set(PROFILES), f"profiles without vectors: {set(PROFILES) - covered}"
    for name, cfg in PROFILES.items():
        assert cfg.get("description"), f"{name}: a profile names the document it follows"


class Run:
    def __init__(self, scenario: dict[str, Any]) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.keys = {k: f"{k}-{uuid.uuid4().hex[:16]}" for k in ("key", "key2", "key3")}
        self.scenario = scenario

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            value = re.sub(r"\{\{a\*(\d+)\}\}", lambda m: "a" * int(m.group(1)), value)
            for k, v in self.keys.items():
                value = value.replace("{{%s}}" % k, v)
            return value
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        return value


def build_request(run: Run, spec: dict[str, Any]) -> tuple[str, str, dict[str, str], bytes | None]:
    method = spec.get("method", "POST")
    path = run.fill(spec["path"])
    params = [f"run={run.id}"]
    for k, v in spec.get("origin", {}).items():
        params.append(f"{k}={v}")
    path += ("&" if "?" in path else "?") + "&".join(params)
    headers = run.fill(spec.get("headers", {}))
    body: bytes | None = None
    if "json" in spec:
        body = json.dumps(run.fill(spec["json"]), separators=(",", ":")).encode()
        headers.setdefault("Content-Type", "application/json")
    elif "text" in spec:
        body = run.fill(spec["text"]).encode()
    elif "bodySize" in spec:
        body = b"x" * int(spec["bodySize"])
    if body is None and method in ("POST", "PUT", "PATCH"):
        body = b""
    return method, path, headers, body


def executed(origin: Origin, run: Run) -> int:
    return sum(1 for r in origin.requests() if f"run={run.id}" in r["path"] and r.get("body_complete"))


def pointer(doc: Any, ptr: str) -> tuple[bool, Any]:
    cur = doc
    for raw in ptr.lstrip("/").split("/") if ptr else []:
        tok = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(cur, dict) and tok in cur:
            cur = cur[tok]
        elif isinstance(cur, list) and tok.isdigit() and int(tok) < len(cur):
            cur = cur[int(tok)]
        else:
            return False, None
    return True, cur


def check(run: Run, step_no: int, r: Resp, expect: dict[str, Any], results: list[Resp | None]) -> None:
    where = f"{run.scenario['name']} step {step_no}: {r}"
    if "status" in expect:
        assert r.status == expect["status"], where
    if "statusIn" in expect:
        assert r.status in expect["statusIn"], where
    for name, want in expect.get("headers", {}).items():
        got = r.header(name)
        if want is None:
            assert got is None, f"header {name} should be absent; {where}"
        elif isinstance(want, dict) and want.get("$present"):
            assert got is not None, f"header {name} should be present; {where}"
        else:
            assert got == run.fill(want), f"header {name}: {got!r} != {want!r}; {where}"
    if "json" in expect:
        doc = json.loads(r.body)
        for ptr, want in expect["json"].items():
            found, got = pointer(doc, ptr)
            if isinstance(want, dict) and want.get("$absent"):
                assert not found, f"{ptr} should be absent; {where}"
                continue
            assert found, f"{ptr} missing; {where}"
            if isinstance(want, dict) and want.get("$present"):
                continue
            if isinstance(want, dict) and "$header" in want:
                assert got is not None and got == r.header(want["$header"]), f"{ptr}: {got!r} != header {want['$header']}; {where}"
                continue
            if isinstance(want, dict) and "$key" in want:
                assert got == run.keys[want["$key"]], f"{ptr}: {got!r}; {where}"
                continue
            assert got == run.fill(want), f"{ptr}: {got!r} != {want!r}; {where}"
    if "sameBodyAs" in expect:
        ref = results[expect["sameBodyAs"]]
        assert ref is not None and r.body == ref.body, f"body differs from step {expect['sameBodyAs']}; {where}"


@pytest.mark.parametrize(
    "profile,scenario",
    VECTORS,
    ids=[f"{p}:{s['name']}" for p, s in VECTORS],
)
def test_conformance(envoy, origin, profile, scenario, wire):
    run = Run(scenario)
    listener_name = f"{profile}-short" if scenario.get("variant") == "short" else profile
    port = envoy.port(listener_name)
    results: list[Resp | None] = []
    for i, step in enumerate(scenario["steps"]):
        if "sleep" in step:
            time.sleep(step["sleep"])
            results.append(None)
            continue
        method, path, headers, body = build_request(run, step["send"])
        n = int(step.get("concurrent", 1))
        if n == 1:
            resps = [wire.send(port, method, path, body, headers)]
        else:
            with concurrent.futures.ThreadPoolExecutor(n) as ex:
                resps = list(ex.map(lambda _: wire.send(port, method, path, body, headers), range(n)))
        expect = step.get("expect", {})
        for r in resps:
            check(run, i, r, expect, results)
        if "anyWith" in expect:
            want = expect["anyWith"]
            matching = [r for r in resps if r.status == want["status"]]
            assert matching, f"{scenario['name']} step {i}: no response with status {want['status']}"
            for r in matching:
                check(run, i, r, want, results)
        if "origin" in expect:
            # the origin may still be finishing a request whose answer we already have
            deadline = time.monotonic() + 2
            while executed(origin, run) < expect["origin"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert executed(origin, run) == expect["origin"], f"{scenario['name']} step {i}: origin executions"
        results.append(resps[0])


def test_selwise_counts_duplicates_apart_from_rejections(envoy, origin):
    """Selwise: monitor duplicate counters separately from rejected events."""
    port = envoy.port("selwise")
    run = uuid.uuid4().hex[:12]
    before = envoy.stats(r"idemgate\.selwise\.")
    body = json.dumps({"providerEventId": f"evt-{run}", "type": "delivered"}).encode()
    for _ in range(3):
        assert send(port, "POST", f"/webhooks/email?run={run}", body, {"Content-Type": "application/json"}).status == 200
    assert send(port, "POST", f"/orders?run={run}", b"{}", {"Content-Type": "application/json"}).status == 400
    envoy.settle_metrics()
    after = envoy.stats(r"idemgate\.selwise\.")

    def delta(name: str) -> int:
        key = f"wasmcustom.idemgate.selwise.{name}"
        return int(after.get(key, 0)) - int(before.get(key, 0))

    assert delta("duplicates") == 2
    assert delta("missing_keys") == 1
    assert delta("forwarded") == 1
