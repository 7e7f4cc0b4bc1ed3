"""Smoke tests for the harness itself: origin + real Envoy + filter wasm."""

from __future__ import annotations

import hashlib
import json

import requests

import harness

DEMO_CONFIG = {
    "key": {"header": "idempotency-key", "required": False, "maxLength": 255},
    "methods": ["POST", "PATCH"],
    "ttlSeconds": 86400,
    "leaseSeconds": 30,
}


def test_post_through_envoy_reaches_origin(envoy_factory, fresh_origin):
    envoy = envoy_factory([harness.listener("smoke", harness.free_port(), DEMO_CONFIG)])
    body = b'{"amount": 42}'
    r = requests.post(
        envoy.url + "/orders?x=1",
        data=body,
        headers={"Idempotency-Key": "smoke-1", "content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    payload = r.json()
    assert payload["method"] == "POST"
    assert payload["path"] == "/orders?x=1"
    assert payload["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert r.headers["x-request-nonce"] == payload["nonce"]
    assert r.headers["x-origin-execution"] == str(payload["execution"])

    reqs = fresh_origin.wait_for_requests(1, complete=True)
    assert len(reqs) == 1
    seen = reqs[0]
    assert seen["method"] == "POST"
    assert seen["path"] == "/orders?x=1"
    assert seen["headers"]["idempotency-key"] == "smoke-1"
    assert seen["body_complete"] is True
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == payload["body_sha256"]
    assert seen["execution"] == 1

    # The filter's VM runs and Envoy's admin/stats/inspect work.
    assert "idemgate" in envoy.logs()
    stats = envoy.stats(r"^wasm\.")
    assert stats.get("wasm.envoy.wasm.runtime.v8.active", 0) >= 1, stats
    assert envoy.stats(r"^http\.smoke\.downstream_rq_2xx$") == {"http.smoke.downstream_rq_2xx": 1}
    assert envoy.rss_bytes() > 10 * 1024 * 1024


def test_large_body_is_proxied(envoy_factory, fresh_origin):
    """A 3 MiB request and a 2 MB response pass through Envoy and the filter
    (PUT is not an idempotent-checked method in DEMO_CONFIG)."""
    envoy = envoy_factory([harness.listener("big", harness.free_port(), DEMO_CONFIG)])
    body = bytes(range(256)) * (3 * 4096)  # 3 MiB
    r = requests.put(envoy.url + "/upload?size=2000000", data=body, timeout=30)
    assert r.status_code == 200
    assert len(r.content) == 2_000_000
    seen = fresh_origin.wait_for_requests(1, complete=True)[0]
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_broken_envoy_config_is_refused(docker_engine):
    rc, out = harness.validate_config(raw_config='{"static_resources": {"listeners": [ {"name": }')
    assert rc != 0
    assert "Unable to parse JSON" in out or "error initializing configuration" in out, out


def test_generated_config_validates(docker_engine):
    spec = [
        harness.listener("a", 10001, DEMO_CONFIG),
        harness.listener("b", 10002, json.dumps(DEMO_CONFIG), route_timeout_s=0, vm_id="shared"),
    ]
    rc, out = harness.validate_config(spec, origin_port=8080, admin_port=9901)
    assert rc == 0, out
    assert "OK" in out
