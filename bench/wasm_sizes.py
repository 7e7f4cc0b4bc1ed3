#!/usr/bin/env python3
"""Where the bytes of a wasm module go: code size per crate/module, plus data and the rest.

    python3 bench/wasm_sizes.py target/bench/unstripped/idemgate_filter.wasm [--top 25] [--json out.json]

Needs a module with a `name` section (build without `strip`, e.g.
`cargo build --release --config profile.release.strip=false`). Function names are grouped
by their Rust path: two segments for `core`, `alloc`, `std` and the idemgate crates
(`idemgate_core::config`), one for everything else (`serde_json`, `sha2`). Sizes are the
unstripped module's: the stripped build has the same code, without the names.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path


def leb(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def demangle_v0(sym: str) -> str:
    """Rough v0 (`_R...`) demangling, enough for grouping: the first crate root and the
    length-prefixed identifiers after it (`_RNvNtCs..._4core3fmt5write` -> `core::fmt::write`)."""
    m = re.search(r"C(?:s[0-9A-Za-z]*_)?(\d+)", sym)
    if not m:
        return sym
    parts, i = [], m.start(1)
    while i < len(sym) and len(parts) < 4:
        d = re.match(r"(\d+)_?", sym[i:])
        if not d:
            i += 1
            continue
        n = int(d.group(1))
        start = i + d.end()
        ident = sym[start:start + n]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", ident or "-"):
            break
        parts.append(ident)
        i = start + n
        # skip namespace tags and disambiguators up to the next length-prefixed identifier
        t = re.match(r"[A-Za-z]*(?:s[0-9A-Za-z]*_)?", sym[i:])
        i += t.end() if t else 0
    return "::".join(parts) or sym


def demangle_legacy(sym: str) -> str:
    """`_ZN4core3fmt5write17h...E` -> `core::fmt::write` (enough for grouping)."""
    if sym.startswith("_R"):
        return demangle_v0(sym)
    if not sym.startswith("_ZN"):
        return sym
    i, parts = 3, []
    while i < len(sym) and sym[i].isdigit():
        j = i
        while sym[j].isdigit():
            j += 1
        n = int(sym[i:j])
        parts.append(sym[j:j + n])
        i = j + n
    if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
        parts.pop()
    return "::".join(
        p.replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("..", "::").lstrip("_")
        for p in parts
    )


DEEP = {"core", "alloc", "std", "idemgate_core", "idemgate_filter", "proxy_wasm"}


def group(name: str) -> str:
    name = demangle_legacy(name)
    # `<T as Trait>::f` and `<impl ...>`: group by the first path inside.
    m = re.search(r"[A-Za-z][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*", name)
    path = m.group(0) if m else name
    segs = path.split("::")
    if segs[0] in DEEP and len(segs) > 2:
        return "::".join(segs[:2])
    if segs[0] in DEEP or len(segs) > 1:
        return segs[0]
    return "(other: " + ("runtime/libc" if not segs[0].startswith("_") else "compiler") + ")"


def analyse(path: Path) -> dict[str, object]:
    buf = path.read_bytes()
    if buf[:4] != b"\0asm":
        raise SystemExit(f"{path}: not a wasm module")
    i = 8
    imported_funcs = 0
    bodies: list[int] = []
    names: dict[int, str] = {}
    sections: Counter[str] = Counter()
    while i < len(buf):
        sid = buf[i]
        size, j = leb(buf, i + 1)
        end = j + size
        if sid == 2:  # imports: count functions
            n, k = leb(buf, j)
            for _ in range(n):
                for _ in range(2):
                    ln, k = leb(buf, k)
                    k += ln
                kind = buf[k]
                k += 1
                if kind == 0:
                    imported_funcs += 1
                    _, k = leb(buf, k)
                elif kind == 1:  # table
                    k += 1
                    flags, k = leb(buf, k)
                    _, k = leb(buf, k)
                    if flags & 1:
                        _, k = leb(buf, k)
                elif kind == 2:  # memory
                    flags, k = leb(buf, k)
                    _, k = leb(buf, k)
                    if flags & 1:
                        _, k = leb(buf, k)
                elif kind == 3:  # global
                    k += 2
            sections["imports"] += end - i
        elif sid == 10:
            n, k = leb(buf, j)
            for _ in range(n):
                sz, k2 = leb(buf, k)
                bodies.append(sz + (k2 - k))
                k = k2 + sz
        elif sid == 11:
            sections["data (strings, tables, statics)"] += end - i
        elif sid == 0:
            ln, k = leb(buf, j)
            cname = buf[k:k + ln].decode(errors="replace")
            k += ln
            if cname == "name":
                while k < end:
                    sub = buf[k]
                    ssz, k2 = leb(buf, k + 1)
                    if sub == 1:
                        n, q = leb(buf, k2)
                        for _ in range(n):
                            idx, q = leb(buf, q)
                            nl, q = leb(buf, q)
                            names[idx] = buf[q:q + nl].decode(errors="replace")
                            q += nl
                    k = k2 + ssz
            sections[f"custom: {cname} (absent when stripped)"] += end - i
        else:
            sections[f"section {sid}"] += end - i
        i = end
    by_group: Counter[str] = Counter()
    for n, sz in enumerate(bodies):
        by_group[group(names.get(imported_funcs + n, "?"))] += sz
    biggest = sorted(((sz, names.get(imported_funcs + n, "?")) for n, sz in enumerate(bodies)),
                     reverse=True)
    return {"file": str(path), "total": len(buf), "code": sum(bodies), "functions": len(bodies),
            "by_group": dict(by_group.most_common()), "sections": dict(sections),
            "biggest": [[sz, name] for sz, name in biggest]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("wasm", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--functions", type=int, default=0,
                    help="also list the N biggest functions (demangled)")
    a = ap.parse_args()
    r = analyse(a.wasm)
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    print(f"{r['file']}: {r['total']:,} bytes, code {r['code']:,} bytes in {r['functions']} functions")
    for g, sz in list(r["by_group"].items())[: a.top]:
        print(f"  {sz:>8,}  {sz / r['code'] * 100:5.1f}%  {g}")
    for s, sz in r["sections"].items():
        print(f"  {sz:>8,}  (section) {s}")
    for sz, name in r["biggest"][: a.functions]:
        print(f"  {sz:>8,}  {demangle_legacy(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
