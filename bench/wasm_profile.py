#!/usr/bin/env python3
"""Self time per function from a V8 .cpuprofile (node --cpu-prof), wasm functions demangled.

    python3 bench/wasm_profile.py PROFILE.cpuprofile [--top 40]

Companion of bench/wasm_host.mjs: ranks idemgate's own wasm functions (and the host's
JavaScript, V8's (garbage collector), (program), ...) by the time V8's sampler saw them on
top of the stack.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wasm_sizes import demangle_legacy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", type=Path, help="also write {total_ms, wasm_share, top: [[share, name], ...]}")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    prof = json.loads(a.profile.read_text())
    nodes = {n["id"]: n for n in prof["nodes"]}
    self_us: Counter[str] = Counter()
    for sid, dt in zip(prof["samples"], prof["timeDeltas"]):
        cf = nodes[sid]["callFrame"]
        name = cf.get("functionName") or "(anonymous)"
        url = cf.get("url", "")
        if url.startswith("wasm://"):
            name = "wasm " + demangle_legacy(name.split(" ")[0])
        elif url:
            name = f"js {name} ({Path(url).name}:{cf.get('lineNumber', 0) + 1})"
        self_us[name] += max(0, dt)
    # inclusive time of idemgate's own functions: each sample counts once for every distinct
    # idemgate function on its stack
    parent = {c: n["id"] for n in prof["nodes"] for c in n.get("children", [])}
    incl: Counter[str] = Counter()
    for sid, dt in zip(prof["samples"], prof["timeDeltas"]):
        seen: set[str] = set()
        node: int | None = sid
        while node is not None:
            cf = nodes[node]["callFrame"]
            if cf.get("url", "").startswith("wasm://"):
                fname = demangle_legacy((cf.get("functionName") or "?").split(" ")[0])
                if fname.lstrip("<").startswith("idemgate") and fname not in seen:
                    seen.add(fname)
                    incl[fname] += max(0, dt)
            node = parent.get(node)
    total = sum(self_us.values()) or 1
    wasm = sum(v for k, v in self_us.items() if k.startswith("wasm "))
    print(f"{a.profile.name}: {total / 1000:.0f} ms sampled, wasm {wasm / total * 100:.1f}%")
    for name, us in self_us.most_common(a.top):
        print(f"  {us / total * 100:5.1f}%  {name}")
    print("inclusive (idemgate's functions, with what they call):")
    for name, us in incl.most_common(min(a.top, 25)):
        print(f"  {us / total * 100:5.1f}%  {name}")
    if a.json:
        a.json.write_text(json.dumps({
            "label": a.label, "total_ms": total / 1000, "wasm_share": wasm / total,
            "top": [[us / total, name] for name, us in self_us.most_common(a.top)],
            "inclusive": [[us / total, name] for name, us in incl.most_common(a.top)],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
