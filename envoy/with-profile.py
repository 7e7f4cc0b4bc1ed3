#!/usr/bin/env python3
"""Prints envoy/envoy.yaml with the idemgate configuration of a profile in place of its own.

    envoy/with-profile.py stripe > /tmp/envoy-stripe.yaml      (make run PROFILE=stripe uses it)

The profile is envoy/profiles/<name>.json (or a path to any configuration file); the result
is the shipped Envoy configuration, single-filter form, failure policy and circuit breakers
included, with only the `value:` of the idemgate filter's configuration replaced. Standard
library only: it edits the YAML as text, so the shipped file's comments stay.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def profile_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    candidate = HERE / "profiles" / f"{name}.json"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(q.stem for q in (HERE / "profiles").glob("*.json")))
    raise SystemExit(f"with-profile: no profile {name!r} (one of: {known}, or a path to a .json file)")


def render(envoy_yaml: str, config: dict) -> str:
    """`envoy_yaml` with the block scalar after the idemgate filter's `value: |` replaced by
    `config` (one JSON document, indented as the block was)."""
    lines = envoy_yaml.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*value: \|\s*$", line)]
    if len(starts) != 1:
        raise SystemExit(f"with-profile: expected one `value: |` block in the Envoy configuration, found {len(starts)}")
    start = starts[0]
    indent = len(lines[start]) - len(lines[start].lstrip()) + 2
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) >= indent):
        end += 1
    body = json.dumps(config, indent=2, ensure_ascii=False).splitlines()
    block = [" " * indent + line + "\n" for line in body]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    config = json.loads(profile_path(argv[0]).read_text(encoding="utf-8"))
    envoy_yaml = Path(argv[1]) if len(argv) == 2 else HERE / "envoy.yaml"
    sys.stdout.write(render(envoy_yaml.read_text(encoding="utf-8"), config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
