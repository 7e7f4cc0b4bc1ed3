#!/usr/bin/env python3
"""Checks how an Envoy configuration loads idemgate, before any traffic reaches it.

    make check-config ENVOY_CONFIG=path/to/envoy.yaml      (or: envoy/check-config.py FILE...)

Reads Envoy bootstraps (YAML or JSON; `@NAME@` placeholders of templates are allowed) or
fragments holding `http_filters` lists, finds every HTTP filter chain that loads idemgate
(Wasm filters whose root_id is `idemgate`/`idemgate_gate` or whose code is an
`idemgate*.wasm`) and reports, per chain:

errors (exit status 1), configurations that forward requests before idemgate decides, or
refuse them all:
  - the idemgate filter without `allow_on_headers_stop_iteration: true` and without an
    `idemgate_gate` filter after it (Envoy would never hand it a request body: requests with
    a body are held and refused with 500 misconfigured);
  - a gate before its reader, a gate without a reader, a gate whose vm_config differs from
    its reader's (they must share one VM), or a reader in single-filter form whose VM has a
    gate in another chain (with a gate in its VM the reader works in two-filter mode and
    would let the headers of this chain pass before deciding);
  - a failure policy that fails open (`failure_policy: FAIL_OPEN`, `fail_open: true`): a VM
    that fails would let requests through without idempotency;
warnings (exit status 0):
  - no failure_policy (Envoy's default fails closed but never reloads a failed VM: every
    later request gets 503; FAIL_RELOAD recovers);
  - both the flag and a gate (the gate is not needed);
  - an upstream cluster of such a chain with Envoy's default circuit breakers (1024
    connections, pending and active requests: beyond them requests get 503 overflow).

Envoy's own `envoy --mode validate` checks the rest (and runs idemgate's configuration
parser); this check needs neither Envoy nor the Wasm module.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
FLAG = "allow_on_headers_stop_iteration"
ENVOY_DEFAULT_BREAKER = 1024


@dataclass
class Report:
    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    oks: list[str] = field(default_factory=list)


@dataclass
class WasmFilter:
    index: int
    name: str
    root_id: str
    plugin: dict[str, Any]

    @property
    def is_gate(self) -> bool:
        return self.root_id.endswith("_gate")

    @property
    def vm(self) -> str:
        return json.dumps(self.plugin.get("vm_config", {}), sort_keys=True)

    def label(self) -> str:
        return f"http filter {self.index} ({self.name or self.root_id})"


def load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    # Templates (envoy/fleet/envoy.yaml) carry @NAME@ placeholders where values go.
    text = re.sub(r"@[A-Z][A-Z0-9_]*@", "0", text)
    return yaml.safe_load(text)


def chains(doc: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping with an `http_filters` list (an HTTP connection manager, or a
    fragment), with a name for it."""
    if isinstance(doc, dict):
        if isinstance(doc.get("http_filters"), list):
            yield (where or "http_filters", doc)
        for k, v in doc.items():
            name = where
            if isinstance(v, list) and k == "listeners":
                for i, item in enumerate(v):
                    label = f"listener {item.get('name', i)}" if isinstance(item, dict) else where
                    yield from chains(item, label)
                continue
            yield from chains(v, name)
    elif isinstance(doc, list):
        for item in doc:
            yield from chains(item, where)


def idemgate_filters(hcm: dict[str, Any]) -> list[WasmFilter]:
    out = []
    for i, f in enumerate(hcm.get("http_filters") or []):
        if not isinstance(f, dict):
            continue
        tc = f.get("typed_config") or {}
        if tc.get("@type") != WASM_TYPE:
            continue
        plugin = tc.get("config") or {}
        root_id = str(plugin.get("root_id", ""))
        code = json.dumps(plugin.get("vm_config", {}).get("code", {}))
        if root_id in ("idemgate", "idemgate_gate") or re.search(r"idemgate[^/\"]*\.wasm", code):
            out.append(WasmFilter(i, str(f.get("name", "")), root_id, plugin))
    return out


def flag(plugin: dict[str, Any]) -> bool:
    v = plugin.get(FLAG)
    if isinstance(v, dict):  # google.protobuf.BoolValue in JSON form
        v = v.get("value")
    return v is True or (isinstance(v, str) and v.lower() == "true")


def fails_open(plugin: dict[str, Any]) -> bool:
    return plugin.get("failure_policy") == "FAIL_OPEN" or plugin.get("fail_open") is True


def routed_clusters(hcm: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    rc = hcm.get("route_config") or {}
    for vh in rc.get("virtual_hosts") or []:
        for r in vh.get("routes") or []:
            c = (r.get("route") or {}).get("cluster")
            if isinstance(c, str):
                out.add(c)
            for wc in ((r.get("route") or {}).get("weighted_clusters") or {}).get("clusters") or []:
                if isinstance(wc.get("name"), str):
                    out.add(wc["name"])
    return out


def default_breakers(cluster: dict[str, Any]) -> bool:
    for t in (cluster.get("circuit_breakers") or {}).get("thresholds") or []:
        if t.get("priority", "DEFAULT") == "DEFAULT":
            return any(t.get(k) is None for k in ("max_connections", "max_pending_requests", "max_requests"))
    return True


def check(path: Path) -> Report:
    rep = Report(str(path))
    try:
        doc = load(path)
    except (OSError, yaml.YAMLError) as e:
        rep.errors.append(f"cannot read the configuration: {e}")
        return rep
    found = [(where, hcm, idemgate_filters(hcm)) for where, hcm in chains(doc)]
    found = [(w, h, fs) for w, h, fs in found if fs]
    if not found:
        rep.errors.append("no idemgate filter found (a Wasm http filter with root_id idemgate)")
        return rep
    gate_vms = {f.vm for _, _, fs in found for f in fs if f.is_gate}
    clusters = {
        c.get("name"): c
        for c in ((doc.get("static_resources") or {}).get("clusters") or [] if isinstance(doc, dict) else [])
        if isinstance(c, dict)
    }
    for where, hcm, filters in found:
        readers = [f for f in filters if not f.is_gate]
        gates = [f for f in filters if f.is_gate]
        for f in filters:
            if fails_open(f.plugin):
                rep.errors.append(f"{where}, {f.label()}: the failure policy fails open, so a Wasm VM that "
                                  "fails lets requests through without idempotency; use failure_policy: FAIL_RELOAD")
            elif "failure_policy" not in f.plugin:
                rep.warnings.append(f"{where}, {f.label()}: no failure_policy: Envoy's default fails closed but "
                                    "never reloads a failed VM (every later request gets 503); "
                                    "failure_policy: FAIL_RELOAD recovers")
        for g in gates:
            before = [r for r in readers if r.index < g.index]
            if not before:
                rep.errors.append(f"{where}, {g.label()}: a gate without an idemgate filter before it")
            elif before[-1].vm != g.vm:
                rep.errors.append(f"{where}, {g.label()}: its vm_config differs from that of "
                                  f"{before[-1].label()}: reader and gate must share one VM")
        for r in readers:
            after = [g for g in gates if g.index > r.index and g.vm == r.vm]
            if after:
                extra = f" ({FLAG} is then not needed)" if flag(r.plugin) else ""
                if flag(r.plugin):
                    rep.warnings.append(f"{where}, {r.label()}: both {FLAG} and a gate; the gate is not needed")
                rep.oks.append(f"{where}: idemgate in two-filter mode ({r.label()}, gate "
                               f"{after[0].label()}){extra}")
            elif not flag(r.plugin):
                rep.errors.append(
                    f"{where}, {r.label()}: no `{FLAG}: true` in its Wasm config and no idemgate_gate "
                    "filter after it: Envoy would never hand it a request body, so requests with a "
                    f"body are refused (500 misconfigured). Add `{FLAG}: true` next to root_id "
                    "(Envoy 1.35 or later), or the idemgate_gate filter right after it with the same vm_config")
            elif r.vm in gate_vms:
                rep.errors.append(
                    f"{where}, {r.label()}: its VM (vm_config) has an idemgate_gate filter in another "
                    "chain, which puts the filter in two-filter mode, but this chain has no gate: give "
                    "this chain its own vm_id, or a gate")
            else:
                rep.oks.append(f"{where}: idemgate in single-filter mode ({r.label()}, {FLAG})")
        for name in sorted(routed_clusters(hcm)):
            c = clusters.get(name)
            if c is not None and default_breakers(c):
                rep.warnings.append(
                    f"cluster {name}: Envoy's default circuit breakers ({ENVOY_DEFAULT_BREAKER} connections, "
                    "pending and active requests): beyond them requests get 503 overflow; set "
                    "circuit_breakers.thresholds (see envoy/envoy.yaml)")
    return rep


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    failed = False
    for arg in argv:
        rep = check(Path(arg))
        print(f"check-config: {rep.path}")
        for line in rep.oks:
            print(f"  ok: {line}")
        for line in dict.fromkeys(rep.warnings):
            print(f"  warning: {line}")
        for line in rep.errors:
            print(f"  error: {line}")
        failed |= bool(rep.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
