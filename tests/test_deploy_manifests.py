"""The manifests in deploy/ against the vendored CRD schemas (deploy/crds/, see SOURCES.md),
validated offline as the API server would on create (tests/crd_validate.py): structure,
strict unknown fields, defaults and every CEL rule. Mutations a user could make show the
validator refuses what the API server would. The idemgate configuration inside each
manifest is checked against schema/idemgate.schema.json; tests/test_ecds.py loads the same
manifests into Envoy. No Docker needed."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from jsonschema import Draft202012Validator

from crd_validate import CRDs
from deploy_harness import DEPLOY, version
from harness import REPO_ROOT

CRD_DIR = DEPLOY / "crds"
CRDS = CRDs.load(CRD_DIR)
MANIFEST_DIRS = [DEPLOY / "istio", DEPLOY / "envoy-gateway", DEPLOY / "prometheus"]
MANIFESTS = sorted(p for d in MANIFEST_DIRS for p in d.rglob("*.yaml"))
SCHEMA = Draft202012Validator(json.loads((REPO_ROOT / "schema" / "idemgate.schema.json").read_text()))
# Kinds deploy/ may hold that no vendored CRD describes (plain Kubernetes objects).
CORE_KINDS = {("v1", "Service"), ("apps/v1", "StatefulSet"), ("v1", "ConfigMap"), ("v1", "Secret")}


def docs() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and "kind" in doc:  # Kubernetes resources, not Prometheus' own files
                out.append((str(path.relative_to(DEPLOY)), i, doc))
    return out


DOCS = docs()
CUSTOM = [(f, i, d) for f, i, d in DOCS if (d.get("apiVersion"), d.get("kind")) not in CORE_KINDS]


def test_vendored_crds_are_the_recorded_copies():
    text = (CRD_DIR / "SOURCES.md").read_text()
    sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M))
    files = {str(p.relative_to(CRD_DIR)) for p in CRD_DIR.rglob("*.yaml")}
    assert set(sums) == files, (sorted(sums), sorted(files))
    for name, digest in sums.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, f"{name} differs from its recorded copy"


def test_every_kind_in_deploy_has_a_vendored_schema():
    assert {(d["apiVersion"], d["kind"]) for _, _, d in CUSTOM} == {
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
    for f, i, d in CUSTOM:
        assert CRDS.kind_of(d) is not None, f"{f}#{i}"


@pytest.mark.parametrize("where,doc", [(f"{f}#{i} {d['kind']} {d['metadata']['name']}", d) for f, i, d in CUSTOM])
def test_manifest_validates_against_its_crd(where, doc):
    assert CRDS.validate(doc) == [], where


# --------------------------------------------------------------------------- the validator refuses


def first(kind: str, pred: Callable[[dict[str, Any]], bool] = lambda d: True) -> dict[str, Any]:
    return copy.deepcopy(next(d for _, _, d in CUSTOM if d["kind"] == kind and pred(d)))


def mutate(kind: str, change: Callable[[dict[str, Any]], None], pred: Callable[[dict[str, Any]], bool] = lambda d: True) -> dict[str, Any]:
    doc = first(kind, pred)
    change(doc)
    return doc


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = doc
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = doc
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
    return change


READER = lambda d: "pluginConfig" in d["spec"]  # noqa: E731


@pytest.mark.parametrize(
    "kind,change,pred,expected",
    [
        ("WasmPlugin", _set("spec.failStrategy", "FAIL_CLOSED"), READER, "spec.failStrategy: 'FAIL_CLOSED' is not one of"),
        ("WasmPlugin", _set("spec.pluginConfg", {}), READER, "spec.pluginConfg: unknown field"),
        ("WasmPlugin", _set("spec.url", "ftp://registry.example.com/idemgate:1"), READER, "url must have schema one of [http, https, file, oci]"),
        ("WasmPlugin", _set("spec.targetRefs", [{"kind": "Gateway", "name": "gw"}]), READER, "only one of targetRefs or selector can be set"),
        ("WasmPlugin", _set("spec.sha256", "abc"), READER, "spec.sha256: 'abc' does not match"),
        ("WasmPlugin", _set("spec.priority", 2**31), READER, "out of int32 range"),
        ("WasmPlugin", _delete("spec.url"), READER, "spec.url: required"),
        ("WasmPlugin", _set("metadata.name", "Idemgate"), READER, "metadata.name: 'Idemgate' is not a valid name"),
        ("EnvoyFilter", _set("spec.configPatches.0.applyTo", "EXTENSION_CONFIGS"), None, "spec.configPatches[0].applyTo: 'EXTENSION_CONFIGS' is not one of"),
        ("EnvoyFilter", _set("spec.configPatches.1.match.routeConfiguration", {"vhost": {"name": "x"}}), None, "spec.configPatches[1].match: matches 2 of oneOf"),
        ("EnvoyFilter", _set("spec.targetRefs", [{"kind": "Gateway", "name": "gw"}]), None, "only one of targetRefs or workloadSelector can be set"),
        ("EnvoyExtensionPolicy", _set("spec.wasm.0.code.type", "HTTP"), None, "If type is HTTP, http field needs to be set."),
        ("EnvoyExtensionPolicy", _delete("spec.wasm.0.code"), None, "spec.wasm[0].code: required"),
        ("EnvoyExtensionPolicy", _set("spec.wasm.0.failOpen", "no"), None, "spec.wasm[0].failOpen: must be boolean"),
        ("EnvoyExtensionPolicy", _set("spec.targetRefs.0.kind", "Service"), None, "this policy can only have a targetRefs[*].kind of Gateway/ListenerSet/HTTPRoute/GRPCRoute/TCPRoute/UDPRoute/TLSRoute"),
        ("EnvoyPatchPolicy", _set("spec.jsonPatches.0.operation.op", "insert"), None, "spec.jsonPatches[0].operation.op: 'insert' is not one of"),
        ("EnvoyPatchPolicy", _set("spec.jsonPatches.0.type", "type.googleapis.com/envoy.config.listener.v3.Listenr"), None, "spec.jsonPatches[0].type:"),
        ("EnvoyPatchPolicy", _delete("spec.targetRef"), None, "spec.targetRef: required"),
    ],
)
def test_the_validator_refuses_what_the_api_server_would(kind, change, pred, expected):
    doc = mutate(kind, change, pred or (lambda d: True))
    errors = CRDS.validate(doc)
    assert any(expected in e for e in errors), errors


def test_cel_rules_run_on_the_manifests():
    """The CEL rules are evaluated, not skipped: the WasmPlugin url rule and the
    EnvoyExtensionPolicy code rule see these manifests' values."""
    wp = first("WasmPlugin", READER)
    assert CRDS.validate(wp) == []
    wp["spec"]["url"] = "registry.example.com/idemgate/idemgate-wasm:0.1.0"  # no scheme: oci:// by default
    assert CRDS.validate(wp) == []
    eep = first("EnvoyExtensionPolicy")
    eep["spec"]["wasm"][0]["code"]["http"] = {"url": "https://example.com/idemgate.wasm"}
    # an Image source with an http block too: the rule `type == 'HTTP' ? has(http) : !has(http)`
    assert CRDS.validate(eep) == ["spec.wasm[0].code: If type is HTTP, http field needs to be set."]


# --------------------------------------------------------------------------- what the manifests carry


def idemgate_configs() -> list[tuple[str, dict[str, Any]]]:
    """(where, configuration) of every idemgate configuration in deploy/."""
    out = []
    for f, i, d in CUSTOM:
        where = f"{f}#{i}"
        if d["kind"] == "WasmPlugin" and "pluginConfig" in d["spec"]:
            out.append((where, d["spec"]["pluginConfig"]))
        elif d["kind"] == "EnvoyFilter":
            for p in d["spec"]["configPatches"]:
                if p["applyTo"] == "EXTENSION_CONFIG":
                    value = p["patch"]["value"]["typed_config"]["config"]["configuration"]["value"]
                    out.append((where, json.loads(value)))
        elif d["kind"] == "EnvoyExtensionPolicy":
            for w in d["spec"]["wasm"]:
                out.append((where, w.get("config", {})))
    return out


@pytest.mark.parametrize("where,config", idemgate_configs())
def test_idemgate_configuration_follows_the_schema(where, config):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in SCHEMA.iter_errors(config)]
    assert errors == [], where


def test_manifests_reference_this_version_of_the_image():
    refs = re.findall(r"registry\.example\.com/idemgate/idemgate-wasm(?::([0-9A-Za-z._+-]+))?", "\n".join(p.read_text() for p in MANIFESTS))
    assert refs and set(refs) == {version()}, refs
    text = (DEPLOY / "istio" / "envoyfilter.yaml").read_text() + (DEPLOY / "envoy-gateway" / "envoyextensionpolicy.yaml").read_text()
    assert f"dist/idemgate-wasm-{version()}.docker.tar" in text


def test_two_filter_mode_pairs_share_a_vm_and_run_in_order():
    """Istio's WasmPlugins: the reader and the gate must end up in one VM (same url, sha256
    and vmConfig) and in one phase, the reader first (higher priority)."""
    wps = [d for _, _, d in CUSTOM if d["kind"] == "WasmPlugin"]
    reader = [w for w in wps if w["spec"].get("pluginName") == "idemgate"]
    gate = [w for w in wps if w["spec"].get("pluginName") == "idemgate_gate"]
    assert len(reader) == len(gate) == 1
    r, g = reader[0]["spec"], gate[0]["spec"]
    for k in ("url", "sha256", "vmConfig", "phase", "selector", "targetRefs", "match", "imagePullSecret", "type"):
        assert r.get(k) == g.get(k), k
    assert int(r["priority"]) > int(g["priority"])
    assert "pluginConfig" not in g
    assert r.get("failStrategy") == g.get("failStrategy") == "FAIL_CLOSE"


def by_file(kind: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f, _, d in CUSTOM:
        if d["kind"] == kind:
            out.setdefault(f, []).append(d)
    return out


def test_single_filter_manifests_set_the_stop_iteration_flag():
    efs = by_file("EnvoyFilter")
    assert set(efs) == {"istio/envoyfilter.yaml", "istio/fleet/envoyfilter.yaml"}
    for f, (ef,) in efs.items():
        (ext,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "EXTENSION_CONFIG"]
        (flt,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
        cfg = ext["patch"]["value"]["typed_config"]["config"]
        assert cfg["allow_on_headers_stop_iteration"] is True and cfg["failure_policy"] == "FAIL_RELOAD", f
        assert flt["patch"]["value"]["name"] == ext["patch"]["value"]["name"], f
    # the EnvoyPatchPolicy names the filter its EnvoyExtensionPolicy generates, on the listener
    # of the Gateway both target
    eeps, epps = by_file("EnvoyExtensionPolicy"), by_file("EnvoyPatchPolicy")
    assert set(eeps) == set(epps) == {"envoy-gateway/envoyextensionpolicy.yaml", "envoy-gateway/fleet/envoyextensionpolicy.yaml"}
    for f in eeps:
        (eep,), (epp,) = eeps[f], epps[f]
        (target,) = eep["spec"]["targetRefs"]
        assert epp["spec"]["targetRef"]["name"] == target["name"] and target["kind"] == "Gateway"
        patch = epp["spec"]["jsonPatches"][0]
        ns, name = eep["metadata"]["namespace"], eep["metadata"]["name"]
        assert f"envoy.filters.http.wasm/envoyextensionpolicy/{ns}/{name}/wasm/0" in patch["operation"]["jsonPath"]
        assert patch["name"].startswith(f"{epp['metadata']['namespace']}/{target['name']}/")
        assert patch["operation"] == {**patch["operation"], "op": "add", "path": "/typed_config/config/allow_on_headers_stop_iteration", "value": True}
        assert eep["spec"]["wasm"][0]["failOpen"] is False


def test_fleet_examples_name_the_etcd_clusters_they_define():
    """Istio: store.etcd.cluster is the cluster Istio makes of etcd.yaml's client Service
    (outbound|<port>||<service>.<namespace>.svc.cluster.local), a gRPC port; Envoy Gateway:
    the cluster the EnvoyPatchPolicy adds, with HTTP/2."""
    etcd = list(yaml.safe_load_all((DEPLOY / "istio" / "fleet" / "etcd.yaml").read_text()))
    svc = next(d for d in etcd if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    (port,) = svc["spec"]["ports"]
    assert port["appProtocol"] == "grpc"
    want = f"outbound|{port['port']}||{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    ((_, cfg),) = [(w, c) for w, c in idemgate_configs() if w.startswith("istio/fleet/")]
    assert cfg["store"]["etcd"]["cluster"] == want
    sts = next(d for d in etcd if d["kind"] == "StatefulSet")
    flags = [a for a in sts["spec"]["template"]["spec"]["containers"][0]["command"] if a.startswith("--")]
    shipped = [line.strip() for line in (REPO_ROOT / "envoy" / "fleet" / "etcd.flags").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert set(shipped) <= set(flags), set(shipped) - set(flags)
    ((_, eg_cfg),) = [(w, c) for w, c in idemgate_configs() if w.startswith("envoy-gateway/fleet/")]
    (epp,) = by_file("EnvoyPatchPolicy")["envoy-gateway/fleet/envoyextensionpolicy.yaml"]
    clusters = [p["operation"]["value"] for p in epp["spec"]["jsonPatches"] if p["type"].endswith("Cluster")]
    assert [c["name"] for c in clusters] == [eg_cfg["store"]["etcd"]["cluster"]]
    assert "http2_protocol_options" in json.dumps(clusters[0])
