"""The Envoy configuration that Istio and Envoy Gateway make out of the manifests in deploy/,
for tests/test_ecds.py: the same translation their control planes do (istiod + istio-agent:
pilot/pkg/model/extensions.go, pilot/pkg/networking/core/extension, pkg/wasm/convert.go;
Envoy Gateway: internal/gatewayapi/envoyextensionpolicy.go, internal/xds/translator/wasm.go
and jsonpatch.go, at the versions deploy/crds/SOURCES.md names), reduced to what decides how
idemgate runs: the HTTP filters and their order, the extension configs delivered by ECDS,
VM ids, root ids, configuration, failure policy and code source, per-route enabling and
JSON patches.

Each renderer takes the manifest as shipped and, for the test's listeners, the idemgate
configuration to put in it (`config`, JSON text) and a name suffix; `code` replaces the
module source with the one the test serves (what the istio-agent or Envoy Gateway's Wasm
HTTP server hand to Envoy after pulling the image).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import jsonpath
import yaml

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
EXT_CONFIG_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
ROUTER = "envoy.filters.http.router"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


@dataclass
class Delivery:
    """How one listener gets idemgate: HTTP filters to put before the router (in order),
    extension configs served by ECDS (name -> TypedExtensionConfig), per-route filter
    configs, and JSON patches to apply to the finished listener (Envoy Gateway)."""

    http_filters: list[dict[str, Any]] = field(default_factory=list)
    ecds: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_route: dict[str, Any] = field(default_factory=dict)
    listener_patches: list[dict[str, Any]] = field(default_factory=list)
    listener_name: str | None = None


def remote_code(url: str, sha256: str, cluster: str, timeout: str = "30s") -> dict[str, Any]:
    return {"remote": {"http_uri": {"uri": url, "cluster": cluster, "timeout": timeout}, "sha256": sha256}}


# --------------------------------------------------------------------------- Istio


def istio_envoyfilter(ef: Mapping[str, Any], *, config: str | None, suffix: str, code: Mapping[str, Any]) -> Delivery:
    """An EnvoyFilter's EXTENSION_CONFIG ADD patches become ECDS resources (after the
    istio-agent swapped the oci:// source for the module it pulled: `code`); its
    HTTP_FILTER patches insert filters before the router (INSERT_BEFORE router) or first."""
    out = Delivery()
    renames: dict[str, str] = {}
    for p in ef["spec"]["configPatches"]:
        if p["applyTo"] == "EXTENSION_CONFIG":
            assert p["patch"]["operation"] == "ADD", "Istio applies only ADD to EXTENSION_CONFIG"
            ext = copy.deepcopy(p["patch"]["value"])
            new_name = ext["name"] + suffix
            renames[ext["name"]] = new_name
            ext["name"] = new_name
            cfg = ext["typed_config"]["config"]
            assert ext["typed_config"]["@type"] == WASM_TYPE
            if config is not None:
                cfg["configuration"] = {"@type": STRING_VALUE_TYPE, "value": config}
            cfg["vm_config"]["code"] = copy.deepcopy(dict(code))
            out.ecds[new_name] = {"@type": EXT_CONFIG_TYPE, **ext}
    for p in ef["spec"]["configPatches"]:
        if p["applyTo"] != "HTTP_FILTER":
            continue
        flt = copy.deepcopy(p["patch"]["value"])
        flt["name"] = renames.get(flt["name"], flt["name"])
        op = p["patch"]["operation"]
        sub = p.get("match", {}).get("listener", {}).get("filterChain", {}).get("filter", {}).get("subFilter", {})
        if op == "INSERT_BEFORE" and sub.get("name") == ROUTER:
            out.http_filters.append(flt)
        elif op == "INSERT_FIRST":
            out.http_filters.insert(0, flt)
        else:
            raise AssertionError(f"unexpected HTTP_FILTER patch {op} {sub}")
    return out


ISTIO_PHASES = ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"]
ISTIO_FAIL = {"FAIL_OPEN": "FAIL_OPEN", "FAIL_CLOSE": "FAIL_CLOSED", "FAIL_RELOAD": "FAIL_RELOAD"}


def istio_wasmplugins(wps: list[Mapping[str, Any]], *, config: str | None, suffix: str, code: Mapping[str, Any]) -> Delivery:
    """WasmPlugins as istiod delivers them: each an ECDS extension `<ns>.<name>` referenced
    from the HCM (ADS, initial_fetch_timeout 0, Wasm or the agent's RBAC fallback); order by
    phase, then descending priority; PluginConfig without a vm_id, root_id = pluginName,
    configuration = pluginConfig as JSON (absent: an empty Any), failure policy from
    failStrategy. The agent strips its own env variables and swaps the source for `code`.
    `config`, when given, replaces the pluginConfig of the plugin that has one."""
    out = Delivery()

    def key(wp: Mapping[str, Any]) -> tuple[int, int]:
        spec = wp["spec"]
        return ISTIO_PHASES.index(spec.get("phase", "UNSPECIFIED_PHASE")), -int(spec.get("priority") or 0)

    for wp in sorted(wps, key=key):
        spec = wp["spec"]
        name = f"{wp['metadata']['namespace']}.{wp['metadata']['name']}{suffix}"
        plugin_cfg: dict[str, Any] = {"name": name, "root_id": spec.get("pluginName", "")}
        if "pluginConfig" in spec:
            text = config if config is not None else json.dumps(spec["pluginConfig"], separators=(",", ":"))
            plugin_cfg["configuration"] = {"@type": STRING_VALUE_TYPE, "value": text}
        plugin_cfg["vm_config"] = {"runtime": "envoy.wasm.runtime.v8", "code": copy.deepcopy(dict(code))}
        if spec.get("failStrategy") in ISTIO_FAIL:
            plugin_cfg["failure_policy"] = ISTIO_FAIL[spec["failStrategy"]]
        out.ecds[name] = {"@type": EXT_CONFIG_TYPE, "name": name, "typed_config": {"@type": WASM_TYPE, "config": plugin_cfg}}
        out.http_filters.append({
            "name": name,
            "config_discovery": {
                "config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
                "type_urls": [WASM_TYPE, RBAC_TYPE],
            },
        })
    return out


# --------------------------------------------------------------------------- Envoy Gateway


def envoy_gateway(
    eep: Mapping[str, Any],
    epps: list[Mapping[str, Any]],
    *,
    config: str | None,
    suffix: str,
    serving_url: str,
    sha256: str,
    cluster: str = "wasm_cluster",
) -> Delivery:
    """An EnvoyExtensionPolicy's wasm entries as Envoy Gateway puts them in the HCM: one
    filter per entry, named envoy.filters.http.wasm/envoyextensionpolicy/<ns>/<name>/wasm/<i>,
    disabled there and enabled per route, with a VM of its own (vm_id = that name), the
    module fetched from Envoy Gateway's HTTP server with the sha256 of the wasm it took out
    of the image, fail_open from failOpen. The EnvoyPatchPolicies' JSON patches for the
    listener come along, their names and JSONPaths moved to the suffixed policy."""
    out = Delivery()
    ns, policy = eep["metadata"]["namespace"], eep["metadata"]["name"]
    new_policy = policy + suffix
    gateway_listener = None
    for i, w in enumerate(eep["spec"]["wasm"]):
        ir_name = f"envoyextensionpolicy/{ns}/{new_policy}/wasm/{i}"
        filter_name = f"envoy.filters.http.wasm/{ir_name}"
        text = config if config is not None else json.dumps(w.get("config", {}), separators=(",", ":"))
        plugin = {
            "name": w.get("name", ir_name),
            "vm_config": {
                "vm_id": ir_name,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"remote": {
                    "http_uri": {"uri": serving_url, "cluster": cluster, "timeout": "10s"},
                    "sha256": sha256,
                    "retry_policy": {"num_retries": 10, "retry_back_off": {"base_interval": "1s", "max_interval": "30s"}},
                }},
            },
            "configuration": {"@type": STRING_VALUE_TYPE, "value": text},
            "fail_open": bool(w.get("failOpen", False)),
        }
        if "rootID" in w:
            plugin["root_id"] = w["rootID"]
        out.http_filters.append({"name": filter_name, "disabled": True, "typed_config": {"@type": WASM_TYPE, "config": plugin}})
        out.per_route[filter_name] = {"@type": FILTER_CONFIG_TYPE, "config": {}}
    old_filter = f"envoyextensionpolicy/{ns}/{policy}/"
    new_filter = f"envoyextensionpolicy/{ns}/{new_policy}/"
    for epp in epps:
        for p in epp["spec"]["jsonPatches"]:
            if p["type"] != "type.googleapis.com/envoy.config.listener.v3.Listener":
                continue
            if gateway_listener not in (None, p["name"]):
                raise AssertionError("one listener per test")
            gateway_listener = p["name"]
            op = copy.deepcopy(p["operation"])
            if "jsonPath" in op:
                op["jsonPath"] = op["jsonPath"].replace(old_filter, new_filter)
            out.listener_patches.append(op)
    out.listener_name = gateway_listener
    return out


def apply_json_patches(doc: dict[str, Any], ops: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Envoy Gateway's JSONPatch: a jsonPath yields JSON pointers (none is an error), `path`
    is appended to each, and the RFC 6902 op is applied at every one."""
    for op in ops:
        pointers = [""]
        if op.get("jsonPath"):
            pointers = [str(m.pointer()) for m in jsonpath.finditer(op["jsonPath"], doc)]
            if not pointers:
                raise AssertionError(f"jsonPath {op['jsonPath']!r} matches nothing")
        patch = []
        for ptr in pointers:
            item = {"op": op["op"], "path": ptr + op.get("path", "")}
            if "value" in op:
                item["value"] = op["value"]
            if "from" in op:
                item["from"] = op["from"]
            patch.append(item)
        doc = jsonpath.patch.apply(patch, doc)
    return doc
