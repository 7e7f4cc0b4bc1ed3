"""idemgate loaded the way Istio and Envoy Gateway load it, from the manifests in deploy/,
and the Envoy scenarios of tests/test_filter.py run through each delivery:

- `istio-envoyfilter` (deploy/istio/envoyfilter.yaml): ONE filter with
  allow_on_headers_stop_iteration, delivered by ECDS (`extension_config_discovery` from a
  file-based config source, in place of istiod's ADS), before the router;
- `istio-wasmplugin` (deploy/istio/wasmplugin.yaml): the reader and the gate as two ECDS
  extensions ordered by priority, without vm_ids, sharing one VM because their vm_config is
  identical (the module is the same file for both, as the istio-agent makes it);
- `envoy-gateway` (deploy/envoy-gateway/envoyextensionpolicy.yaml): the filter in the HCM,
  disabled there and enabled per route, its own vm_id, patched by the EnvoyPatchPolicy.

In every case Envoy fetches the module as remote code over HTTP with its sha256, from a
local server that serves the plugin.wasm taken out of the module image after a round trip
through a local registry (dist/ tarball -> skopeo -> registry -> pulled as Istio's agent and
Envoy Gateway pull it). See tests/controlplanes.py for the translation.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import test_filter
from controlplanes import (
    Delivery,
    apply_json_patches,
    envoy_gateway,
    istio_envoyfilter,
    istio_wasmplugins,
    load,
    of_kind,
    remote_code,
)
from deploy_harness import DEPLOY, DIST, FileServer, Registry, require_tool, sha256, version
from harness import Envoy, Origin, build_envoy_config, free_port, listener
from httpclient import send
from test_filter import CONCURRENCY, LISTENERS, fresh, is_problem

FORMS = ["istio-envoyfilter", "istio-wasmplugin", "envoy-gateway"]
ISTIO_EF = DEPLOY / "istio" / "envoyfilter.yaml"
ISTIO_WP = DEPLOY / "istio" / "wasmplugin.yaml"
EG = DEPLOY / "envoy-gateway" / "envoyextensionpolicy.yaml"
ECDS_DIR = "/etc/envoy/ecds"
MODULE_CLUSTER = "idemgate_module"

# Scenarios 1-8 of test_filter.py: every test there that runs against its `envoy` fixture
# runs here against each delivery (the fixture below); the ones that start Envoys of their
# own (key churn, config validation) have equivalents at the end of this file.
SCENARIOS = {
    name: fn
    for name, fn in vars(test_filter).items()
    if name.startswith("test_") and callable(fn) and "envoy" in inspect.signature(fn).parameters
}
globals().update(SCENARIOS)
# ... with the fixtures they use that test_filter.py defines, except the Envoy and origin this
# module provides.
globals().update({
    name: obj for name, obj in vars(test_filter).items()
    if name not in ("envoy", "origin", "wire")
    and (hasattr(obj, "_pytestfixturefunction") or type(obj).__name__ == "FixtureFunctionDefinition")
})
if hasattr(test_filter, "Wire"):

    @pytest.fixture
    def wire() -> Any:
        """h2c only here: test_filter.py runs every scenario over HTTP/1.1 and h2c already,
        and what differs between deliveries (how the filter is loaded) does not depend on
        the protocol; h2c is the harder path for a filter that holds a request (a body in
        one DATA frame with END_STREAM)."""
        return test_filter.Wire("h2c")

# The listeners of test_filter.py, plus the configuration exactly as each manifest ships it.
SHIPPED = "shipped"


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin(verbose=False) as o:
        yield o


@pytest.fixture(scope="module")
def module() -> Iterator[tuple[bytes, FileServer]]:
    """plugin.wasm out of the dist image after a registry round trip, served over HTTP at
    /idemgate.wasm (the istio-agent's fetch) and /<sha256>.wasm (Envoy Gateway's server)."""
    require_tool("skopeo", "make deploy-deps installs Debian's skopeo")
    tarball = DIST / f"idemgate-wasm-{version()}.docker.tar"
    if not tarball.is_file():
        pytest.fail(f"{tarball} missing: run `make dist`")
    with Registry() as reg:
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"docker-archive:{tarball}",
                        f"docker://{reg.host}/idemgate/idemgate-wasm:{version()}"], check=True, timeout=120)
        wasm, _, _ = reg.pull_module("idemgate/idemgate-wasm", version())
    assert wasm == (DIST / "idemgate.wasm").read_bytes()
    with FileServer({"/idemgate.wasm": wasm, f"/{sha256(wasm)}.wasm": wasm}) as server:
        yield wasm, server


def shipped_config(form: str) -> str:
    """The idemgate configuration text as the manifest of `form` hands it to Envoy."""
    if form == "istio-envoyfilter":
        (ef,) = of_kind(load(ISTIO_EF), "EnvoyFilter")
        (ext,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"]
        return ext["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
    if form == "istio-wasmplugin":
        (reader,) = [w for w in of_kind(load(ISTIO_WP), "WasmPlugin") if "pluginConfig" in w["spec"]]
        return json.dumps(reader["spec"]["pluginConfig"], separators=(",", ":"))
    (eep,) = of_kind(load(EG), "EnvoyExtensionPolicy")
    return json.dumps(eep["spec"]["wasm"][0]["config"], separators=(",", ":"))


def delivery(form: str, suffix: str, config: str | None, wasm: bytes, server: FileServer) -> Delivery:
    digest = sha256(wasm)
    code = remote_code(f"http://127.0.0.1:{server.port}/idemgate.wasm", digest, MODULE_CLUSTER)
    if form == "istio-envoyfilter":
        (ef,) = of_kind(load(ISTIO_EF), "EnvoyFilter")
        return istio_envoyfilter(ef, config=config, suffix=suffix, code=code)
    if form == "istio-wasmplugin":
        return istio_wasmplugins(of_kind(load(ISTIO_WP), "WasmPlugin"), config=config, suffix=suffix, code=code)
    docs = load(EG)
    (eep,) = of_kind(docs, "EnvoyExtensionPolicy")
    return envoy_gateway(eep, of_kind(docs, "EnvoyPatchPolicy"), config=config, suffix=suffix,
                         serving_url=f"http://127.0.0.1:{server.port}/{digest}.wasm", sha256=digest,
                         cluster=MODULE_CLUSTER)


def ecds_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json"


def bootstrap(form: str, specs: list[dict[str, Any]], origin_port: int, admin_port: int,
              wasm: bytes, server: FileServer) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(Envoy bootstrap, ECDS resources by name) for listener specs whose idemgate
    configuration is delivered as `form` delivers it."""
    cfg = build_envoy_config(specs, origin_port, admin_port)
    ecds: dict[str, dict[str, Any]] = {}
    by_name = {lst["name"]: lst for lst in cfg["static_resources"]["listeners"]}
    for spec in specs:
        lst = by_name[spec["name"]]
        text = spec["idemgate_config"]
        d = delivery(form, f"-{spec['name']}", None if text is None else json.dumps(text, separators=(",", ":")), wasm, server)
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        router = hcm["http_filters"][-1]
        filters = copy.deepcopy(d.http_filters)
        for f in filters:
            if "config_discovery" in f:
                f["config_discovery"]["config_source"] = {
                    "path_config_source": {"path": f"{ECDS_DIR}/{ecds_file(f['name'])}"},
                    "initial_fetch_timeout": "0s",
                    "resource_api_version": "V3",
                }
        hcm["http_filters"] = [*filters, router]
        if d.per_route:
            for vh in hcm["route_config"]["virtual_hosts"]:
                for route in vh["routes"]:
                    route["typed_per_filter_config"] = copy.deepcopy(d.per_route)
        if d.listener_patches:
            lst.update(apply_json_patches(copy.deepcopy(lst), d.listener_patches))
        ecds.update(d.ecds)
    cfg["static_resources"]["clusters"].append({
        "name": MODULE_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": MODULE_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": server.port}}}}]}]},
    })
    return cfg, ecds


def write_ecds(envoy: Envoy, name: str, resource: dict[str, Any], version_info: str) -> None:
    """Write (atomically: rename into place, which Envoy watches for) one ECDS file."""
    d = Path(envoy._dir) / "ecds"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    tmp = d / (ecds_file(name) + ".tmp")
    tmp.write_text(json.dumps({"version_info": version_info, "resources": [resource]}, indent=1))
    tmp.chmod(0o644)
    tmp.rename(d / ecds_file(name))


class DeliveredEnvoy(Envoy):
    """An Envoy whose idemgate filters come as `form` delivers them."""

    def __init__(self, form: str, specs: list[dict[str, Any]], origin_port: int, wasm: bytes, server: FileServer) -> None:
        admin_port = free_port()
        config, self.ecds = bootstrap(form, specs, origin_port, admin_port, wasm, server)
        super().__init__(specs, origin_port=origin_port, admin_port=admin_port, concurrency=CONCURRENCY, config=config)
        self.form = form
        for name, resource in self.ecds.items():
            write_ecds(self, name, resource, "1")

    def wait_filters_active(self, timeout: float = 30) -> None:
        """Until every listener's idemgate answers (an empty key is refused with 400 by
        idemgate itself): the module is fetched asynchronously after Envoy is ready."""
        deadline = time.monotonic() + timeout
        for spec in self.listeners:
            while True:
                r = send(int(spec["port"]), "POST", "/ready-probe", b"x", {"Idempotency-Key": ""}, timeout=5)
                if r.status == 400 and r.header("content-type") == "application/problem+json":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.form}: listener {spec['name']} answers {r}\n{self.logs()[-4000:]}")
                time.sleep(0.2)


@pytest.fixture(scope="module", params=FORMS)
def envoy(request, origin, module) -> Iterator[DeliveredEnvoy]:
    wasm, server = module
    # test_filter's listeners, with their upstream options (an HTTP/2 origin); how idemgate
    # is loaded (one filter, two) is the delivery's to decide, so their "mode" is dropped.
    options = getattr(test_filter, "LISTENER_OPTIONS", {})
    specs = [
        listener(name, free_port(), cfg, route_timeout_s=0 if name == "short" else 15,
                 **{k: v for k, v in options.get(name, {}).items() if k != "mode"})
        for name, cfg in LISTENERS.items()
    ]
    specs.append(listener("churn", free_port(), {"store": {"namespace": "churn", "capacity": 64, "probes": 8}}))
    specs.append(listener(SHIPPED, free_port(), None))
    specs[-1]["idemgate_config"] = None  # the manifest's own configuration, untouched
    e = DeliveredEnvoy(request.param, specs, origin.port, wasm, server)
    with e:
        e.wait_filters_active()
        yield e


# --------------------------------------------------------------------------- the delivery


def test_the_module_came_over_http_with_its_sha256(envoy, module):
    wasm, server = module
    wanted = "/idemgate.wasm" if envoy.form.startswith("istio") else f"/{sha256(wasm)}.wasm"
    assert wanted in server.hits
    logs = envoy.logs()
    assert "idemgate: configured" in logs and "invalid configuration" not in logs


def test_filters_order_and_vm_sharing(envoy):
    """The listeners' filter chains and VMs as delivered."""
    status, text = envoy.admin("/config_dump?include_eds=false")
    assert status == 200
    dump = json.loads(text)
    names = []
    for c in dump["configs"]:
        for dl in c.get("static_listeners", []):
            if dl["listener"]["name"] == "main":
                hcm = dl["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
                names = [f["name"] for f in hcm["http_filters"]]
    assert names[-1] == "envoy.filters.http.router", names
    if envoy.form == "istio-wasmplugin":
        assert names[:2] == ["istio-system.idemgate-main", "istio-system.idemgate-gate-main"], names
    elif envoy.form == "istio-envoyfilter":
        assert names[:1] == ["istio-system.idemgate-main"], names
    else:
        assert names[:1] == ["envoy.filters.http.wasm/envoyextensionpolicy/default/idemgate-main/wasm/0"], names
    ecds = [c for c in dump["configs"] if c["@type"].endswith("EcdsConfigDump")]
    if envoy.form.startswith("istio"):
        (dump_ecds,) = ecds
        delivered = {e["ecds_filter"]["name"] for e in dump_ecds["ecds_filters"]}
        assert delivered == set(envoy.ecds), delivered
    else:
        assert not ecds or not ecds[0].get("ecds_filters")
    # Envoy keeps one VM per distinct VM key (vm_id, VM configuration, code) per worker, plus
    # the base VM and the main thread's: Istio's filters all share one key (one VM per
    # thread, the reader and gate of two-filter mode together), Envoy Gateway's each have
    # their own vm_id.
    vm_keys = 1 if envoy.form.startswith("istio") else len(envoy.listeners)
    vms = envoy.stats(r"^wasm\.wasm_vm_count$")["wasm.wasm_vm_count"]
    assert vms == vm_keys * (CONCURRENCY + 2), (envoy.form, vms)


def test_shipped_configuration_replays(envoy, origin):
    """The configuration exactly as the manifest ships it: first request forwarded, the
    retry replayed, a changed body refused."""
    path = fresh("/shipped")
    h = {"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"}
    first = send(envoy.port(SHIPPED), "POST", path, b'{"amount":1}', h)
    assert first.status == 200 and first.header("idempotent-replayed") is None, first
    again = send(envoy.port(SHIPPED), "POST", path, b'{"amount":1}', h)
    assert again.header("idempotent-replayed") == "true" and again.body == first.body
    is_problem(send(envoy.port(SHIPPED), "POST", path, b'{"amount":2}', h), 422)
    assert test_filter.executions(origin, path) == 1
    cfg = json.loads(shipped_config(envoy.form))
    envoy.settle_metrics()
    ns = cfg["store"]["namespace"]
    stats = envoy.stats(rf"idemgate\.{ns}\.(forwarded|replayed|mismatches)$")
    assert all(stats.get(f"wasmcustom.idemgate.{ns}.{m}", 0) >= 1 for m in ("forwarded", "replayed", "mismatches")), stats


# --------------------------------------------------------------------------- equivalents


def test_key_churn_keeps_the_store_bounded(envoy):
    """Scenario 6's equivalent: ten times more distinct keys than the `churn` listener's
    64 slots; the shared-data keys stay within the table's bounds and old records are
    evicted."""
    import concurrent.futures

    port = envoy.port("churn")
    prefix = uuid.uuid4().hex[:8]

    def one(i: int) -> int:
        return send(port, "POST", f"/churn/{prefix}/{i}", b"x", {"Idempotency-Key": f"{prefix}-{i}"}).status

    # At most 8 in flight: a bucket (8 ways) can never be all in flight, which would answer
    # 503 store-unavailable by design (the churn tests of test_filter cover that bound).
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        statuses = list(ex.map(one, range(640)))
    assert set(statuses) == {200}, sorted(set(statuses))
    envoy.settle_metrics()
    stats = {k.rsplit(".", 1)[1]: v for k, v in envoy.stats(r"idemgate\.churn\.").items()}
    assert stats["forwarded"] == stats["stored"] == 640, stats
    assert 0 < stats["store_index_keys"] <= 64 // 8 and 0 < stats["store_body_keys"] <= 64, stats
    assert stats["evictions"] >= 640 - 64, stats


def test_bad_configuration_update_is_rejected_and_the_old_one_keeps_serving(envoy, origin, request):
    """Scenario 7's equivalent for a control plane: a configuration the filter refuses,
    pushed as an update, is rejected by Envoy (the filter names the field) and the listener
    keeps the configuration it had; a good update after it is applied."""
    if envoy.form == "envoy-gateway":
        # Envoy Gateway sends the filter inside the listener (LDS), not by ECDS. Shown on a
        # fresh Envoy given a refused configuration: the plugin fails to load, the filter
        # fails closed (503, nothing reaches the origin) and the log names the field.
        wasm, server = request.getfixturevalue("module")
        spec = listener("bad", free_port(), {"store": {"namespace": "bad"}, "ttlSeconds": 0})
        with DeliveredEnvoy("envoy-gateway", [spec], origin.port, wasm, server) as bad:
            bad.wait_for_log(r"idemgate: invalid configuration: ttlSeconds: must be 1\.\.=31536000, got 0", 20)
            path = fresh("/refused-config")
            r = send(bad.port("bad"), "POST", path, b"x", {"Idempotency-Key": uuid.uuid4().hex})
            assert r.status == 503, r
            assert test_filter.seen(origin, path) == []
        return
    (name,) = [n for n in envoy.ecds if n.endswith("idemgate-main") or n.endswith(".idemgate-main")]
    good = envoy.ecds[name]
    bad = copy.deepcopy(good)
    bad["typed_config"]["config"]["configuration"]["value"] = json.dumps({"store": {"namespace": "main"}, "ttlSeconds": 0})

    def rejected() -> int:
        return sum(int(v) for k, v in envoy.stats(r"extension_config_discovery\..*update_rejected$").items())

    before = rejected()
    write_ecds(envoy, name, bad, "2")
    deadline = time.monotonic() + 20
    while rejected() == before:
        assert time.monotonic() < deadline, "the bad update was not rejected"
        time.sleep(0.1)
    # the log line comes from the main thread's configure; `docker logs` may show it a little later
    envoy.wait_for_log(r"idemgate: invalid configuration: ttlSeconds: must be 1\.\.=31536000, got 0", 20)
    # still the old configuration: a retry is replayed as before
    path = fresh("/after-bad-update")
    h = {"Idempotency-Key": uuid.uuid4().hex}
    assert send(envoy.port("main"), "POST", path, b"x", h).status == 200
    assert send(envoy.port("main"), "POST", path, b"x", h).header("idempotent-replayed") == "true"
    # a good update (key now required) is applied
    newer = copy.deepcopy(good)
    newer["typed_config"]["config"]["configuration"]["value"] = json.dumps({"store": {"namespace": "main"}, "key": {"required": True}})
    write_ecds(envoy, name, newer, "3")
    deadline = time.monotonic() + 20
    while True:
        r = send(envoy.port("main"), "POST", fresh("/after-good-update"), b"x")
        if r.status == 400:
            assert is_problem(r, 400)["type"].endswith("missing-key")
            break
        assert time.monotonic() < deadline, f"the good update was not applied: {r}"
        time.sleep(0.2)
    write_ecds(envoy, name, good, "4")  # back to what the other scenarios expect
    deadline = time.monotonic() + 20
    while send(envoy.port("main"), "POST", fresh("/restored"), b"x").status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_every_configuration_in_deploy_is_accepted_by_the_filter():
    """The idemgate configuration of every manifest in deploy/ (fleet examples included,
    which no Envoy above runs: they need an etcd cluster by the name they give it) passes
    `envoy --mode validate`, which runs the filter's own configuration check."""
    from harness import validate_config
    from test_deploy_manifests import idemgate_configs

    configs = idemgate_configs()
    assert len(configs) >= 5
    for where, cfg in configs:
        rc, out = validate_config([listener("deploy", 10999, cfg)])
        assert rc == 0, f"{where}: {out[-2000:]}"
        assert "invalid configuration" not in out, where
