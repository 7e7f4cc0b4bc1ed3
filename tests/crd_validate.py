"""Validate Kubernetes custom resources against CustomResourceDefinitions, offline, the way
the API server does on create with strict field validation (`kubectl apply`'s default):

- the apiVersion/kind must be a served version of a known CRD, metadata.name (and, for a
  namespaced kind, metadata.namespace) must be valid names;
- the structural schema: types, required, enum, pattern, lengths, bounds, list and map
  sizes, list-type set/map uniqueness, oneOf/anyOf/allOf/not, nullable, int-or-string,
  and unknown fields refused except under x-kubernetes-preserve-unknown-fields;
- `default`s applied first, as the API server does;
- every x-kubernetes-validations rule (CEL, via cel-python, with the Kubernetes URL
  functions the vendored schemas use) evaluated where its node has a value; transition
  rules (those reading oldSelf) apply to updates only and are not evaluated on create.

A rule that cannot be evaluated (a Kubernetes CEL function not provided here) is an error,
never a silent pass.

    crds = CRDs.load(Path("deploy/crds"))
    errors = crds.validate(yaml.safe_load(text))   # [] when valid
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import celpy
import yaml
from celpy import celtypes

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


# --------------------------------------------------------------------------- CEL


class _URL:
    """The value of Kubernetes CEL's url(): Go's net/url, as far as the getters go."""

    def __init__(self, text: str) -> None:
        self.parts = urlsplit(text)


def _is_url(s: Any) -> celtypes.BoolType:
    # Kubernetes: a valid absolute URI or absolute path (Go's url.ParseRequestURI).
    text = str(s)
    try:
        p = urlsplit(text)
        _ = p.port
    except ValueError:
        return celtypes.BoolType(False)
    if any(c.isspace() for c in text):
        return celtypes.BoolType(False)
    return celtypes.BoolType(bool(p.scheme) or text.startswith("/"))


def _url(s: Any) -> _URL:
    if not _is_url(s):
        raise ValueError(f"url: not a URL: {s!r}")
    return _URL(str(s))


K8S_CEL_FUNCTIONS = {
    "isURL": _is_url,
    "url": _url,
    "getScheme": lambda u: celtypes.StringType(u.parts.scheme),
    "getHost": lambda u: celtypes.StringType(u.parts.netloc.rsplit("@", 1)[-1]),
    "getHostname": lambda u: celtypes.StringType(u.parts.hostname or ""),
    "getPort": lambda u: celtypes.StringType(str(u.parts.port) if u.parts.port is not None else ""),
    "getEscapedPath": lambda u: celtypes.StringType(u.parts.path),
    "getQuery": lambda u: celtypes.MapType(
        {celtypes.StringType(k): celtypes.ListType([celtypes.StringType(v)])
         for k, v in (kv.split("=", 1) if "=" in kv else (kv, "") for kv in u.parts.query.split("&") if kv)}
    ),
    "lowerAscii": lambda s: celtypes.StringType(str(s).lower()),
    "upperAscii": lambda s: celtypes.StringType(str(s).upper()),
}

_CEL_ENV = celpy.Environment()
_CEL_CACHE: dict[str, Any] = {}


def _cel(rule: str) -> Any:
    prog = _CEL_CACHE.get(rule)
    if prog is None:
        prog = _CEL_ENV.program(_CEL_ENV.compile(rule), functions=K8S_CEL_FUNCTIONS)
        _CEL_CACHE[rule] = prog
    return prog


# --------------------------------------------------------------------------- CRDs


@dataclass
class Kind:
    group: str
    version: str
    kind: str
    namespaced: bool
    schema: dict[str, Any]
    source: Path


class CRDs:
    def __init__(self, kinds: Iterable[Kind]) -> None:
        self.kinds = {(k.group, k.version, k.kind): k for k in kinds}

    @classmethod
    def load(cls, root: Path) -> "CRDs":
        """Every served version of every CustomResourceDefinition in root/**/*.yaml."""
        kinds = []
        for path in sorted(root.rglob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    if v.get("served", True):
                        kinds.append(Kind(spec["group"], v["name"], spec["names"]["kind"],
                                          spec.get("scope") == "Namespaced", v["schema"]["openAPIV3Schema"], path))
        if not kinds:
            raise ValueError(f"no CustomResourceDefinition under {root}")
        return cls(kinds)

    def kind_of(self, obj: dict[str, Any]) -> Kind | None:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        return self.kinds.get((group, version, str(obj.get("kind", ""))))

    def validate(self, obj: Any) -> list[str]:
        """Errors as "<path>: <message>" (path like spec.wasm[0].code); [] when valid."""
        if not isinstance(obj, dict):
            return [f"$: a resource must be an object, got {type(obj).__name__}"]
        kind = self.kind_of(obj)
        if kind is None:
            known = sorted(f"{g}/{v} {k}" for g, v, k in self.kinds)
            return [f"$: no served CRD for apiVersion {obj.get('apiVersion')!r} kind {obj.get('kind')!r} (known: {known})"]
        obj = copy.deepcopy(obj)
        errors = _metadata_errors(obj.get("metadata"), kind.namespaced)
        schema = copy.deepcopy(kind.schema)
        # apiVersion, kind and metadata are the API server's own; the rest is the CRD's.
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
        props = {k: v for k, v in schema.get("properties", {}).items() if k not in ("apiVersion", "kind", "metadata")}
        schema = {**schema, "properties": props}
        _apply_defaults(schema, body)
        errors += _structural(schema, body, "")
        if not errors:  # as the API server: CEL rules run on a structurally valid object
            errors += _cel_rules(schema, body, "")
        return errors


def _metadata_errors(meta: Any, namespaced: bool) -> list[str]:
    if not isinstance(meta, dict):
        return ["metadata: required"]
    errors = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: required")
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} is not a valid name (lower-case RFC 1123 subdomain)")
    ns = meta.get("namespace")
    if namespaced and ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS1123_LABEL.match(ns)):
        errors.append(f"metadata.namespace: {ns!r} is not a valid namespace (RFC 1123 label)")
    if not namespaced and ns is not None:
        errors.append("metadata.namespace: set on a cluster-scoped kind")
    for field in ("labels", "annotations"):
        v = meta.get(field)
        if v is not None and (not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())):
            errors.append(f"metadata.{field}: must map strings to strings")
    return errors


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_ok(t: str | None, v: Any) -> bool:
    if t is None:
        return True
    return {
        "object": lambda: isinstance(v, dict),
        "array": lambda: isinstance(v, list),
        "string": lambda: isinstance(v, str),
        "integer": lambda: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda: isinstance(v, bool),
    }.get(t, lambda: False)()


def _apply_defaults(s: dict[str, Any], v: Any) -> None:
    if isinstance(v, dict):
        for k, sub in s.get("properties", {}).items():
            if k not in v and "default" in sub:
                v[k] = copy.deepcopy(sub["default"])
            if k in v:
                _apply_defaults(sub, v[k])
        ap = s.get("additionalProperties")
        if isinstance(ap, dict):
            for k, item in v.items():
                if k not in s.get("properties", {}):
                    _apply_defaults(ap, item)
    elif isinstance(v, list) and isinstance(s.get("items"), dict):
        for item in v:
            _apply_defaults(s["items"], item)


def _structural(s: dict[str, Any], v: Any, path: str, strict: bool = True) -> list[str]:
    """strict=False inside oneOf/anyOf/allOf/not, which only constrain values (structural
    schemas keep field definitions out of them)."""
    at = path or "$"
    if v is None:
        return [] if s.get("nullable") else [f"{at}: must not be null"]
    if s.get("x-kubernetes-int-or-string"):
        if not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
            return [f"{at}: must be an integer or a string, got {type(v).__name__}"]
    elif not _type_ok(s.get("type"), v):
        return [f"{at}: must be {s.get('type')}, got {type(v).__name__} {v!r:.60}"]
    errors: list[str] = []
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{at}: {v!r} is not one of {s['enum']}")
    if isinstance(v, str):
        if "minLength" in s and len(v) < s["minLength"]:
            errors.append(f"{at}: shorter than {s['minLength']}")
        if "maxLength" in s and len(v) > s["maxLength"]:
            errors.append(f"{at}: longer than {s['maxLength']}")
        if "pattern" in s and not re.search(s["pattern"], v):
            errors.append(f"{at}: {v!r} does not match {s['pattern']!r}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in s and (v < s["minimum"] or (s.get("exclusiveMinimum") is True and v == s["minimum"])):
            errors.append(f"{at}: {v} below the minimum {s['minimum']}")
        if "maximum" in s and (v > s["maximum"] or (s.get("exclusiveMaximum") is True and v == s["maximum"])):
            errors.append(f"{at}: {v} above the maximum {s['maximum']}")
        bounds = {"int32": INT32, "int64": INT64}.get(s.get("format", ""))
        if bounds and not bounds[0] <= v <= bounds[1]:
            errors.append(f"{at}: {v} out of {s['format']} range")
    if isinstance(v, list):
        if "minItems" in s and len(v) < s["minItems"]:
            errors.append(f"{at}: fewer than {s['minItems']} items")
        if "maxItems" in s and len(v) > s["maxItems"]:
            errors.append(f"{at}: more than {s['maxItems']} items")
        lt = s.get("x-kubernetes-list-type")
        if lt == "set" and len({repr(x) for x in v}) != len(v):
            errors.append(f"{at}: duplicate items in a set")
        if lt == "map":
            keys = [tuple(repr(item.get(k)) for k in s.get("x-kubernetes-list-map-keys", [])) for item in v if isinstance(item, dict)]
            if len(set(keys)) != len(keys):
                errors.append(f"{at}: duplicate map keys {s.get('x-kubernetes-list-map-keys')}")
        if isinstance(s.get("items"), dict):
            for i, item in enumerate(v):
                errors += _structural(s["items"], item, f"{path}[{i}]", strict)
    if isinstance(v, dict):
        props = s.get("properties", {})
        for req in s.get("required", []):
            if req not in v:
                errors.append(f"{_join(path, req)}: required")
        if "minProperties" in s and len(v) < s["minProperties"]:
            errors.append(f"{at}: fewer than {s['minProperties']} properties")
        if "maxProperties" in s and len(v) > s["maxProperties"]:
            errors.append(f"{at}: more than {s['maxProperties']} properties")
        ap = s.get("additionalProperties")
        preserve = s.get("x-kubernetes-preserve-unknown-fields") is True
        for k, item in v.items():
            if k in props:
                errors += _structural(props[k], item, _join(path, k), strict)
            elif isinstance(ap, dict):
                errors += _structural(ap, item, _join(path, k), strict)
            elif ap is True or preserve or not strict:
                pass
            else:
                errors.append(f"{_join(path, k)}: unknown field (known: {sorted(props)})")
    for comb in ("allOf", "anyOf", "oneOf"):
        if comb in s:
            ok = [not _structural({"type": None, **sub}, v, path, strict=False) for sub in s[comb]]
            if comb == "allOf" and not all(ok):
                errors.append(f"{at}: does not satisfy allOf")
            if comb == "anyOf" and not any(ok):
                errors.append(f"{at}: matches none of anyOf")
            if comb == "oneOf" and sum(ok) != 1:
                errors.append(f"{at}: matches {sum(ok)} of oneOf, must match exactly one (fields that exclude each other set together?)")
    if "not" in s and not _structural({"type": None, **s["not"]}, v, path, strict=False):
        errors.append(f"{at}: matches a forbidden schema (not)")
    return errors


def _cel_rules(s: dict[str, Any], v: Any, path: str) -> list[str]:
    if v is None:
        return []
    at = path or "$"
    errors: list[str] = []
    for rule in s.get("x-kubernetes-validations", []):
        expr = rule["rule"]
        if re.search(r"\boldSelf\b", expr):
            continue  # a transition rule: checked on update only
        try:
            ok = _cel(expr).evaluate({"self": celpy.json_to_cel(v)})
        except Exception as e:  # noqa: BLE001 - any failure to evaluate is reported
            errors.append(f"{at}: rule {expr!r} could not be evaluated: {e!s:.300}")
            continue
        if not isinstance(ok, celtypes.BoolType):
            errors.append(f"{at}: rule {expr!r} gave {ok!r}, not a bool")
        elif not ok:
            errors.append(f"{at}: {rule.get('message') or 'failed rule ' + repr(expr)}")
    if isinstance(v, dict):
        props = s.get("properties", {})
        ap = s.get("additionalProperties")
        for k, item in v.items():
            sub = props.get(k, ap if isinstance(ap, dict) else None)
            if sub is not None:
                errors += _cel_rules(sub, item, _join(path, k))
    elif isinstance(v, list) and isinstance(s.get("items"), dict):
        for i, item in enumerate(v):
            errors += _cel_rules(s["items"], item, f"{path}[{i}]")
    return errors
