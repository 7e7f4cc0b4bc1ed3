"""The shipped Envoy configuration (envoy/envoy.yaml) as a user runs it, only its ports
changed: the request from the issue that found the HTTP/2 hole, the failure policy with a
Wasm VM that dies, Envoy's circuit breakers under 2 000 concurrent connections, and the
configuration check (`make check-config`) on every shipped configuration and on the ones
that cannot work."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import harness
from harness import REPO_ROOT, Envoy, Origin, free_port, listener
from httpclient import send

ENVOY_YAML = REPO_ROOT / "envoy" / "envoy.yaml"
FLEET_YAML = REPO_ROOT / "envoy" / "fleet" / "envoy.yaml"
README = REPO_ROOT / "README.md"
CHECK = REPO_ROOT / "envoy" / "check-config.py"
FLAG = "allow_on_headers_stop_iteration"


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    # The demo's origin: a POST under /orders creates an order (201).
    with Origin(verbose=False, extra_args=["--created", "/orders"]) as o:
        yield o


def shipped(origin_port: int) -> dict[str, Any]:
    """envoy/envoy.yaml on free ports, its origin cluster at 127.0.0.1:`origin_port`."""
    return harness.shipped_config(ENVOY_YAML, free_port(), free_port(), origin_port)


def run(config: dict[str, Any], wasm: Path | None = None) -> Envoy:
    """An Envoy (--concurrency 2) on a configuration from shipped()."""
    (lst,) = config["static_resources"]["listeners"]
    envoy = Envoy(config=config, admin_port=config["admin"]["address"]["socket_address"]["port_value"],
                  concurrency=2, wasm=wasm)
    envoy.listeners = [{"name": lst["name"], "port": lst["address"]["socket_address"]["port_value"]}]
    return envoy.start()


def curl(*args: str) -> tuple[int, dict[str, str], bytes, str]:
    """curl with the response headers in a file: (status, headers, body, HTTP version)."""
    r = subprocess.run(
        ["curl", "-s", "-m", "20", "-D", "/dev/stderr", "-w", "\n%{http_version}", *args],
        capture_output=True, timeout=30,
    )
    assert r.returncode == 0, r
    body, _, version = r.stdout.rpartition(b"\n")
    head = r.stderr.decode("latin-1").strip().split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    return status, headers, body, version.decode()


def test_the_issues_http2_request_executes_once_and_replays(origin: Origin) -> None:
    """The request that answered 504 after 15 s (HTTP/2, body in one DATA frame with
    END_STREAM, as curl sends it): 201 from the origin once, then the replay; the origin
    never sees a request it did not get whole. The same over HTTP/1.1."""
    envoy = run(shipped(origin.port))
    try:
        url = f"http://127.0.0.1:{envoy.port()}/orders"
        for proto, key in ((["--http2-prior-knowledge"], "h2-demo-1"), ([], "h1-demo-1")):
            line = [*proto, "-H", f"Idempotency-Key: {key}", "-H", "content-type: application/json",
                    "--data-binary", '{"amount":42}', url]
            t0 = time.monotonic()
            status, headers, first, version = curl(*line)
            assert version == ("2" if proto else "1.1")
            assert status == 201 and "idempotent-replayed" not in headers, (status, headers, first)
            assert time.monotonic() - t0 < 5
            status, headers, again, _ = curl(*line)
            assert status == 201 and headers.get("idempotent-replayed") == "true", (status, headers)
            assert again == first
        reqs = origin.requests()
        assert [r["headers"]["idempotency-key"] for r in reqs] == ["h2-demo-1", "h1-demo-1"]
        for r in reqs:
            assert r["body_complete"] and r["body_sha256"] == hashlib.sha256(b'{"amount":42}').hexdigest(), r
    finally:
        envoy.stop()


def test_single_filter_without_the_flag_never_forwards_and_says_why(origin: Origin) -> None:
    """One idemgate filter without allow_on_headers_stop_iteration (and no gate): Envoy
    never hands it a body. Nothing reaches the origin; the filter answers 500 misconfigured
    naming the setting and logs it; the configuration check reports it before traffic."""
    spec = listener("noflag", free_port(), {"store": {"namespace": "noflag"}}, mode="single-noflag")
    envoy = Envoy([spec], origin_port=origin.port, concurrency=2).start()
    try:
        path = f"/noflag/{uuid.uuid4().hex}"
        for proto, frames in (("h1", "one"), ("h2c", "one"), ("h2c", "split"), ("h1", "split")):
            key = uuid.uuid4().hex
            r = send(envoy.port(), "POST", path, b'{"a":1}', {"idempotency-key": key}, timeout=20,
                     proto=proto, frames=frames)
            assert r.status == 500, r
            doc = r.json()
            assert doc["type"].endswith("/misconfigured") and f"`{FLAG}: true`" in doc["detail"], doc
        envoy.wait_for_log(rf"idemgate: a request body was received by Envoy but never delivered .*`{FLAG}: true`")
        # a request without a body is decided from its headers: it works
        r = send(envoy.port(), "POST", path + "/empty", None, {"idempotency-key": uuid.uuid4().hex})
        assert r.status == 200, r
        assert [q["path"] for q in origin.requests() if q["path"].startswith(path)] == [path + "/empty"]
    finally:
        envoy.stop()
    out = check_config_of(harness.build_envoy_config([spec], origin.port, 9901))
    assert out.returncode == 1 and f"no `{FLAG}: true` in its Wasm config and no idemgate_gate" in out.stdout, out


def wasm_as() -> Path:
    version = json.loads((REPO_ROOT / "edge" / "package.json").read_text())["devDependencies"]["binaryen"]
    return harness.cache_dir() / f"binaryen-{version}" / "node_modules" / ".bin" / "wasm-as"


def test_a_dead_vm_answers_503_and_is_reloaded(origin: Origin, tmp_path: Path) -> None:
    """The shipped failure policy (FAIL_RELOAD) with a module whose VM dies on a request
    carrying `x-crash` (a trap, as a panic would be): that request gets 503 and never
    reaches the origin; the VM is reloaded and later requests pass again."""
    crash = tmp_path / "crash.wasm"
    r = subprocess.run([str(wasm_as()), str(REPO_ROOT / "tests" / "fixtures" / "crash.wat"), "-o", str(crash)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    envoy = run(shipped(origin.port), wasm=crash)
    try:
        path = f"/crash/{uuid.uuid4().hex}"
        assert send(envoy.port(), "POST", path + "/before", b"x").status == 200
        for proto in ("h1", "h2c"):
            dead = send(envoy.port(), "POST", path + "/dies", b"x", {"x-crash": "1"}, proto=proto)
            assert dead.status == 503, dead
        envoy.wait_for_log(r"proxy_on_request_headers failed: Uncaught RuntimeError: unreachable")
        deadline = time.monotonic() + 15
        while (after := send(envoy.port(), "POST", path + "/after", b"x")).status != 200:
            assert after.status == 503 and time.monotonic() < deadline, after
            time.sleep(0.2)
        seen = [q["path"] for q in origin.requests() if q["path"].startswith(path)]
        assert path + "/dies" not in seen and seen[0] == path + "/before" and seen[-1] == path + "/after", seen
    finally:
        envoy.stop()


def slow_origin_config(listen_port: int, admin_port: int, delay_ms: int) -> dict[str, Any]:
    """An Envoy answering 201 to everything after `delay_ms` (fault filter): an origin that
    holds thousands of requests at once."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 201, "body": {"inline_string": "{}"}}}
    hcm = {
        "@type": harness.HCM_TYPE,
        "stat_prefix": "slow",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.fault", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "delay": {"fixed_delay": f"{delay_ms / 1000}s", "percentage": {"numerator": 100}}}},
            harness.ROUTER_FILTER,
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "slow",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


def test_circuit_breakers_take_two_thousand_concurrent_connections(tmp_path: Path) -> None:
    """2 000 connections at once, each request held 0.5 s by the origin: the shipped
    thresholds are never reached (no request queued for a connection, none refused with 503
    overflow); Envoy's defaults (the same configuration without circuit_breakers) are: its
    1024 connections run out, requests queue, and once more than 1024 wait, the rest are
    refused 503 overflow (in some runs here, in many under real load). The only refusals left with the
    shipped thresholds are idemgate's own, counted 503 store-unavailable answers (a bucket
    whose 8 ways are all in flight: a few in ten thousand with 2 000 keys in flight in the
    default 10 000 slots; see the README on sizing store.capacity)."""
    slow_port, slow_admin = free_port(), free_port()
    results = {}
    with Envoy(config=slow_origin_config(slow_port, slow_admin, 500), admin_port=slow_admin, concurrency=2):
        as_shipped = shipped(slow_port)
        defaults = shipped(slow_port)
        for c in defaults["static_resources"]["clusters"]:
            c.pop("circuit_breakers", None)
        for name, cfg in (("shipped", as_shipped), ("defaults", defaults)):
            envoy = run(cfg)
            try:
                total, _, out = harness.wrk_unique_keys(envoy.port(), f"{name}-{uuid.uuid4().hex[:8]}",
                                                        "/orders", 4, 2000, 2, tmp_path)
                envoy.settle_metrics()
                stats = envoy.stats(r"^(cluster\.origin\.upstream_(rq_pending_overflow|cx_overflow|cx_total)"
                                    r"|http\.main\.downstream_rq_5xx"
                                    r"|wasmcustom\.idemgate\.idemgate\.store_unavailable)$")
                results[name] = (total, stats, out)
            finally:
                envoy.stop()
    total, stats, out = results["shipped"]
    # more connections to the origin than Envoy's default limit, all without overflow
    assert stats["cluster.origin.upstream_cx_total"] > 1024, (stats, out)
    assert stats["cluster.origin.upstream_cx_overflow"] == 0, (stats, out)
    assert stats["cluster.origin.upstream_rq_pending_overflow"] == 0, (stats, out)
    refused = stats["wasmcustom.idemgate.idemgate.store_unavailable"]
    assert stats["http.main.downstream_rq_5xx"] == refused and refused * 100 <= total, (stats, out)
    total, stats, out = results["defaults"]
    assert stats["cluster.origin.upstream_cx_overflow"] > 0, (stats, out)


# ------------------------------------------------------------------------ make check-config


def check_config(*paths: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), *map(str, paths)], capture_output=True, text=True,
                          timeout=60)


def check_config_of(config: dict[str, Any] | str, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    d = Path(tmp or tempfile.mkdtemp(prefix="idemgate-check-"))
    p = d / f"envoy-{uuid.uuid4().hex[:8]}.json"
    p.write_text(config if isinstance(config, str) else json.dumps(config))
    return check_config(p)


def readme_snippets() -> list[str]:
    """The YAML blocks of the README that load idemgate."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if "root_id: idemgate" in b]


def test_shipped_configurations_pass_the_check(tmp_path: Path) -> None:
    r = check_config(ENVOY_YAML, FLEET_YAML)
    assert r.returncode == 0 and "error" not in r.stdout, r
    assert r.stdout.count("idemgate in single-filter mode") == 2, r.stdout
    assert "warning" not in r.stdout, r.stdout
    snippets = readme_snippets()
    assert len(snippets) >= 2, "the README shows the single-filter and the two-filter form"
    modes = []
    for i, text in enumerate(snippets):
        p = tmp_path / f"readme-{i}.yaml"
        p.write_text(text)
        r = check_config(p)
        assert r.returncode == 0 and "error" not in r.stdout, (text, r.stdout)
        modes += re.findall(r"idemgate in (\S+) mode", r.stdout)
    assert {"single-filter", "two-filter"} <= set(modes), modes


def test_the_shipped_configuration_validates_in_envoy() -> None:
    rc, out = harness.validate_config(raw_config=ENVOY_YAML.read_text(encoding="utf-8"), filename="envoy.yaml")
    assert rc == 0, out[-3000:]
    assert "idemgate: configured" in out, out[-3000:]


@pytest.mark.parametrize(
    "mode,mutate,needle",
    [
        ("single-noflag", None, f"no `{FLAG}: true` in its Wasm config and no idemgate_gate filter after it"),
        ("single", lambda f: f[0]["typed_config"]["config"].update(failure_policy="FAIL_OPEN"),
         "the failure policy fails open"),
        ("single", lambda f: f[0]["typed_config"]["config"].pop("failure_policy") and
         f[0]["typed_config"]["config"].update(fail_open=True), "the failure policy fails open"),
        ("two", lambda f: f.reverse(), "a gate without an idemgate filter before it"),
        ("two", lambda f: f[1]["typed_config"]["config"]["vm_config"].update(vm_id="other"),
         "its vm_config differs from that of"),
        ("two-buffer", lambda f: f.pop(), f"no `{FLAG}: true` in its Wasm config and no idemgate_gate"),
    ],
    ids=["no-flag-no-gate", "FAIL_OPEN", "fail_open", "gate-first", "gate-other-vm", "gate-missing"],
)
def test_check_config_refuses_what_cannot_work(mode: str, mutate: Any, needle: str, tmp_path: Path) -> None:
    cfg = harness.build_envoy_config([listener("l", 10000, {}, mode=mode)], 8080, 9901)
    filters = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    wasm = [f for f in filters if f["name"].startswith("idemgate")]
    if mutate:
        mutate(wasm)
        others = [f for f in filters if not f["name"].startswith("idemgate")]
        filters[:] = [*wasm, *others[:-1], others[-1]] if mode == "two-buffer" else [*wasm, *others]
    r = check_config_of(cfg, tmp_path)
    assert r.returncode == 1 and needle in r.stdout, r.stdout


def test_check_config_two_filter_mode_and_a_shared_vm(tmp_path: Path) -> None:
    """Two-filter mode passes (with a pausing filter between reader and gate too); a reader
    in single-filter form whose VM has a gate in another chain does not."""
    ok = harness.build_envoy_config([listener("a", 10000, {}, mode="two"), listener("b", 10001, {}, mode="two-buffer")],
                                    8080, 9901)
    r = check_config_of(ok, tmp_path)
    assert r.returncode == 0 and r.stdout.count("idemgate in two-filter mode") == 2, r.stdout
    shared = harness.build_envoy_config([listener("a", 10000, {}, mode="two", vm_id="one"),
                                         listener("b", 10001, {}, vm_id="one")], 8080, 9901)
    r = check_config_of(shared, tmp_path)
    assert r.returncode == 1 and "has an idemgate_gate filter in another chain" in r.stdout, r.stdout


def test_every_profile_renders_into_the_shipped_configuration(tmp_path: Path) -> None:
    """envoy/with-profile.py (make run PROFILE=...): the shipped configuration with each
    profile in place of its own passes the check; Envoy loads one of them (selwise, routes and
    all), and its idemgate configuration is the profile's."""
    import yaml

    profiles = sorted((REPO_ROOT / "envoy" / "profiles").glob("*.json"))
    assert len(profiles) == 7
    rendered = []
    for p in profiles:
        r = subprocess.run([sys.executable, str(REPO_ROOT / "envoy" / "with-profile.py"), p.stem],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r
        out = tmp_path / f"envoy-{p.stem}.yaml"
        out.write_text(r.stdout)
        doc = yaml.safe_load(r.stdout)
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        value = hcm["http_filters"][0]["typed_config"]["config"]["configuration"]["value"]
        assert json.loads(value) == json.loads(p.read_text()), p.stem
        rendered.append(out)
    r = check_config(*rendered)
    assert r.returncode == 0 and r.stdout.count("idemgate in single-filter mode") == 7, r.stdout
    rc, out = harness.validate_config(raw_config=(tmp_path / "envoy-selwise.yaml").read_text(), filename="envoy.yaml")
    assert rc == 0 and "idemgate: configured" in out and "Selwise" in out, out[-3000:]
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "envoy" / "with-profile.py"), "nosuch"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "no profile 'nosuch'" in bad.stderr and "stripe" in bad.stderr, bad
