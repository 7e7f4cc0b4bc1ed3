"""schema/idemgate.schema.json: a valid draft 2020-12 schema that accepts every shipped
configuration (envoy/profiles/*.json and the one embedded in envoy/envoy.yaml) and the
examples tests/config-examples.json calls good, and refuses the bad ones (core/tests/
profiles.rs runs the same examples through the Rust parser). That the schema has exactly
the fields, bounds and defaults of the configuration's serde types is checked against the
types themselves, in Rust (core/src/config/schema_check.rs). No Docker needed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

try:
    from jsonschema import Draft202012Validator
except ImportError:  # pragma: no cover - a clear message instead of a collection error
    pytest.fail(
        "jsonschema is missing from the venv: "
        "~/.cache/idemgate/venv/bin/python -m pip install 'jsonschema>=4.18,<5'",
        pytrace=False,
    )

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "idemgate.schema.json"
PROFILES_DIR = ROOT / "envoy" / "profiles"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
EXAMPLES_PATH = ROOT / "tests" / "config-examples.json"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


SCHEMA = load_json(SCHEMA_PATH)
EXAMPLES = load_json(EXAMPLES_PATH)
VALIDATOR = Draft202012Validator(SCHEMA)


def schema_errors(instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '$'}: {e.message}"
        for e in sorted(VALIDATOR.iter_errors(instance), key=lambda e: repr(list(e.absolute_path)))
    ]


# ------------------------------------------------------------------ the schema itself


def test_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(SCHEMA)


def walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}/{i}")


def test_every_property_has_a_description() -> None:
    missing = []
    for path, node in walk(SCHEMA):
        if isinstance(node, dict) and isinstance(node.get("properties"), dict):
            for name, sub in node["properties"].items():
                # `properties` inside if/then/not only constrain values of documented fields
                if {"if", "then", "else", "not", "allOf", "contains"} & set(path.split("/")):
                    continue
                if not (isinstance(sub, dict) and str(sub.get("description", "")).strip()):
                    missing.append(f"{path}/properties/{name}")
    assert not missing, "properties without a description:\n" + "\n".join(missing)


# ------------------------------------------------------------ shipped configurations


def profile_paths() -> list[Path]:
    return sorted(PROFILES_DIR.glob("*.json"))


def test_profiles_exist() -> None:
    assert profile_paths(), f"no profiles found in {PROFILES_DIR}"


@pytest.mark.parametrize("path", profile_paths(), ids=lambda p: p.name)
def test_profile_matches_schema(path: Path) -> None:
    config = load_json(path)
    assert schema_errors(config) == [], f"{path.name} does not match the schema"
    assert isinstance(config.get("description"), str) and config["description"].strip(), (
        f"{path.name}: needs a description naming the document it follows"
    )


def envoy_yaml_configs(text: str) -> list[str]:
    """The configuration strings of the Wasm filters in envoy.yaml: the `value:` that
    follows each `google.protobuf.StringValue` type line, either a `|` block scalar or a
    quoted scalar. PyYAML is not a dependency, so this reads just that shape."""
    lines = text.splitlines()
    out: list[str] = []
    armed = False
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if "google.protobuf.StringValue" in line:
            armed = True
        m = re.match(r"^(\s*)value:\s*(.*?)(?:\s+#.*)?\s*$", line)
        if not (armed and m):
            continue
        armed = False
        indent, rest = len(m.group(1)), m.group(2)
        if rest in ("|", "|-", "|+"):
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i])
                i += 1
            cut = min((len(ln) - len(ln.lstrip()) for ln in block if ln.strip()), default=0)
            out.append("\n".join(ln[cut:] for ln in block).strip())
        elif q := re.fullmatch(r'"((?:[^"\\]|\\.)*)"', rest):
            out.append(json.loads(f'"{q.group(1)}"'))
        elif q := re.fullmatch(r"'((?:[^']|'')*)'", rest):
            out.append(q.group(1).replace("''", "'"))
        else:
            raise AssertionError(f"envoy.yaml line {i}: unsupported scalar {rest!r}")
    return out


def test_envoy_yaml_configuration_matches_schema() -> None:
    configs = envoy_yaml_configs(ENVOY_YAML.read_text(encoding="utf-8"))
    # the reader's JSON document (and the gate's "{}")
    assert any(c.strip() not in ("", "{}") for c in configs), (
        f"no idemgate configuration found in {ENVOY_YAML}"
    )
    for text in configs:
        config = json.loads(text) if text.strip() else {}
        assert schema_errors(config) == [], f"envoy.yaml configuration does not match:\n{text}"


def test_envoy_yaml_reader_is_extracted() -> None:
    sample = (
        "        configuration:\n"
        '          "@type": type.googleapis.com/google.protobuf.StringValue\n'
        "          value: |\n"
        "            {\n"
        '              "ttlSeconds": 60\n'
        "            }\n"
        "        vm_config: x\n"
        '          "@type": type.googleapis.com/google.protobuf.StringValue\n'
        '          value: "{}"\n'
        "          other:\n"
        "          value: not-a-config\n"
    )
    assert [json.loads(c) for c in envoy_yaml_configs(sample)] == [{"ttlSeconds": 60}, {}]


# ----------------------------------------------------- shared examples (Rust parses them too)

GOOD = EXAMPLES["good"]
BAD = EXAMPLES["bad"]


def test_examples_are_plenty() -> None:
    assert len(GOOD) >= 8 and len(BAD) >= 20
    assert all(set(b) <= {"config", "error", "schema"} and "error" in b for b in BAD)


@pytest.mark.parametrize("config", GOOD, ids=[f"good{i}" for i in range(len(GOOD))])
def test_good_example_is_accepted(config: Any) -> None:
    assert schema_errors(config) == []


@pytest.mark.parametrize(
    "entry",
    [b for b in BAD if b.get("schema", True)],
    ids=[b["error"][:70] for b in BAD if b.get("schema", True)],
)
def test_bad_example_is_refused(entry: dict[str, Any]) -> None:
    errors = list(VALIDATOR.iter_errors(entry["config"]))
    assert errors, (
        f"the schema accepts {json.dumps(entry['config'])} (the filter says: {entry['error']})"
    )
    # the schema objects at the field the filter names, or at a block that contains it
    rust_path = rust_error_path(entry["error"])
    paths = [list(e.absolute_path) for e in errors]
    assert any(rust_path[: len(p)] == p for p in paths), (
        f"the filter refuses {rust_path}, the schema only {paths}"
    )


def rust_error_path(message: str) -> list[str | int]:
    """`routes[0].match.prefix: must ...` -> ["routes", 0, "match", "prefix"]; `$` -> []."""
    path = message.split(": ", 1)[0]
    if path == "$":
        return []
    out: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        out.append(int(index) if index else name)
    return out


def test_rust_error_path() -> None:
    assert rust_error_path("routes[0].match.prefix: x") == ["routes", 0, "match", "prefix"]
    assert rust_error_path("key.sources[0].composite[1]: x") == ["key", "sources", 0, "composite", 1]
    assert rust_error_path("$: x") == []


@pytest.mark.parametrize(
    "entry",
    [b for b in BAD if not b.get("schema", True)],
    ids=[b["error"][:70] for b in BAD if not b.get("schema", True)],
)
def test_checks_the_schema_cannot_express_are_still_schema_valid(entry: dict[str, Any]) -> None:
    """Marked `"schema": false`: only the filter refuses them. If the schema starts
    refusing one, drop the mark so the example counts as a schema check."""
    assert schema_errors(entry["config"]) == []
