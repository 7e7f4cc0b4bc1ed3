"""`make bench`'s plumbing without running a benchmark: every scenario of bench/envoy_bench.py
builds a listener routed to a cluster that exists, and bench/report.py writes the summary and the
details into BENCHMARKS.md from results (synthetic here) while keeping the text around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import envoy_bench  # noqa: E402


def test_every_scenario_builds_a_listener_routed_to_a_known_cluster() -> None:
    ids = [s for s in envoy_bench.SCENARIOS if not envoy_bench.is_alt(s)]
    ports = {sid: 20000 + i for i, sid in enumerate(ids)}
    cfg = envoy_bench.bootstrap(ports, 19000, origin_port=18000, slow_port=18001, etcd_ports=[2379])
    clusters = {c["name"] for c in cfg["static_resources"]["clusters"]}
    listeners = {lst["name"]: lst for lst in cfg["static_resources"]["listeners"]}
    assert set(listeners) == set(ids)
    for sid, lst in listeners.items():
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        if sid == "upstream":
            assert "direct_response" in route
            continue
        assert route["route"]["cluster"] in clusters, sid
        assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    # the origin outside Envoy is what the scenarios use, unless they say otherwise
    assert listeners["first"]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"][0]["route"]["cluster"] == "origin"
    # idemgate scenarios get distinct store namespaces (their counters are told apart by them)
    namespaces = [envoy_bench.ns_of(s) for s in envoy_bench.SCENARIOS if envoy_bench.ns_of(s)]
    assert len(namespaces) == len(set(namespaces))
    idem = [f for f in listeners["first_p1"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            if f["name"] == "idemgate"]
    conf = json.loads(idem[0]["typed_config"]["config"]["configuration"]["value"])
    assert conf["store"] == {"probes": 1, "namespace": "firstp1"}


def _run(rps: float, cpu: float, errors: int = 0) -> dict[str, Any]:
    return {"rps": rps, "cpu_us_per_req": cpu, "p50_us": 1000, "p99_us": 2000, "errors": errors}


def _entry(size: str, sid: str, runs: list[tuple[float, float]], errors: int = 0) -> dict[str, Any]:
    rr = [_run(r, c) for r, c in runs]
    med = {
        "rps": sorted(r for r, _ in runs)[len(runs) // 2],
        "cpu_us_per_req": sorted(c for _, c in runs)[len(runs) // 2],
        "p50_us": 1000, "p99_us": 2000, "cpu_util": 1.0, "other_load": 0.0, "wrk_cpu_util": 0.2,
        "origin_per_req": 0.0 if "replay" in sid else 1.0, "origin_cpu_us_per_req": 10.0,
    }
    return {"size": size, "scenario": sid, "runs": rr, "median": med, "rps_min": min(r for r, _ in runs),
            "rps_max": max(r for r, _ in runs), "errors": errors, "requests": 1000, "redone": 0, "upstream_cx": 1}


def _envoy_json() -> dict[str, Any]:
    results = {}
    for size in ("1KiB", "64KiB"):
        results[f"{size}/pass"] = _entry(size, "pass", [(10000, 40), (9000, 44), (11000, 38)])
        results[f"{size}/first"] = _entry(size, "first", [(5000, 80), (4000, 90), (6000, 70)])
        results[f"{size}/alt_first"] = _entry(size, "alt_first", [(4000, 120), (5000, 100), (3000, 130)])
        results[f"{size}/replay"] = _entry(size, "replay", [(12000, 30), (11000, 33), (13000, 28)])
        results[f"{size}/alt_replay"] = _entry(size, "alt_replay", [(6000, 90), (7000, 80), (5000, 95)],
                                               errors=7 if size == "64KiB" else 0)
    return {
        "rounds": 3, "seconds": 3, "connections": 16, "envoy_cpu": "1", "wrk_cpu": "0",
        "cpu_source": "/proc/1/stat utime+stime", "envoy_image": "img", "envoy_version": "envoy 1.40.0",
        "wrk_version": "wrk 4", "notes": [], "wait": {}, "profiles": {}, "etcd": {},
        "scenarios": {"pass": "1 passthrough", "first": "3 idemgate first requests",
                      "alt_first": "idempotent-proxy-server + Redis, first requests",
                      "replay": "4 idemgate replays", "alt_replay": "idempotent-proxy-server + Redis, replays"},
        "results": results,
        "origin": {"version": "nginx/1.22.1", "cpu": "0", "what": "nginx"},
        "alt": {"versions": {"proxy": "idempotent-proxy-server 1.2.2", "redis": "Redis server v=7"},
                "config": {"REQUEST_TIMEOUT": 86400000, "POLL_INTERVAL": 100, "LOG_LEVEL": "warn",
                           "redis": "--save ''", "cpu": "1"}},
    }


def _correctness_json() -> dict[str, Any]:
    dup = {"answers": {"200": 1, "409 (retry-after 1)": 199}, "error_reasons": {"Request in progress": 199},
           "origin_requests": 1, "retry": {"status": "200", "same_execution": True}}
    return {
        "duplicates": 200, "delay_ms": 200, "client_timeout_s": 10.0,
        "systems": {"idemgate": "idemgate", "alt": "idempotent-proxy-server + Redis"},
        "checks": {
            "duplicates": {"idemgate": dup, "alt": {**dup, "answers": {"502": 200}, "error_reasons": {"Timed out": 200},
                                                     "retry": {"status": "no answer within 10 s"}}},
            "changed_body": {"idemgate": {"second": "422", "origin_requests": 1},
                             "alt": {"second": "200", "second_is_first_answer": True, "origin_requests": 1}},
            "refused": {"idemgate": {"first": "503", "retry": "409", "origin_requests": 0},
                        "alt": {"first": "502", "retry": "no answer within 10 s", "retry_took_ms": 10000,
                                "origin_requests": 0}},
        },
    }


@pytest.fixture
def report_files(tmp_path: Path) -> dict[str, Path]:
    env = tmp_path / "envoy.json"
    env.write_text(json.dumps(_envoy_json()))
    corr = tmp_path / "correctness.json"
    corr.write_text(json.dumps(_correctness_json()))
    floor = tmp_path / "floor.wasm"
    floor.write_bytes(b"\0asm\1\0\0\0")
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nIntro by hand.\n\n<!-- bench:begin -->\nold tables\n<!-- bench:end -->\n\n"
                  "## Reading\n\nKept as written.\n")
    return {"envoy": env, "correctness": corr, "floor": floor, "md": md}


def _report(f: dict[str, Path], *extra: str, check: bool = True) -> str:
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "report.py"), "--envoy", str(f["envoy"]), "--correctness",
         str(f["correctness"]), "--floor-wasm", str(f["floor"]), "--idemgate-wasm", str(f["floor"]),
         "--edge-wasm", str(f["floor"].parent / "absent.wasm"), "--criterion-dir", str(f["floor"].parent),
         "--benchmarks", str(f["md"]), *extra],
        check=check, capture_output=True, text=True, timeout=60,
    )
    return f["md"].read_text() if r.returncode == 0 else r.stderr


def test_report_leads_with_the_user_table_and_keeps_the_text_around_it(report_files: dict[str, Path]) -> None:
    text = _report(report_files)
    summary = text.split("<!-- bench:summary:begin -->", 1)[1].split("<!-- bench:summary:end -->", 1)[0]
    # the summary comes right after the title, before everything written by hand
    assert text.index("<!-- bench:summary:begin -->") < text.index("Intro by hand.")
    assert "Intro by hand." in text and "## Reading\n\nKept as written." in text and "old tables" not in text
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| CPU per request (µs) and requests/s | 1KiB CPU µs/req | 1KiB req/s | 64KiB")
    first = next(r for r in rows if r.startswith("| idemgate in Envoy, first requests"))
    assert "| 80 (2.00× pass) | 5,000 (0.50×) |" in first
    alt_replay = next(r for r in rows if r.startswith("| idempotent-proxy-server + Redis, replays"))
    assert alt_replay.endswith("| 6,000 (0.60×), 7 wrk errors |")
    # idemgate / alternative per round: CPU 80/120, 90/100, 70/130 -> median 0.67, range 0.54-0.90
    assert "first requests 1KiB: CPU 0.67× (0.54–0.90×)" in summary
    # the correctness answers of both systems
    assert "| the same key again with a changed body | 422; origin ran the key 1× " \
           "| 200, the first request's stored answer; origin ran the key 1× |" in summary
    assert "502, then with the origin up: no answer within 10 s after 10.0 s" in summary
    # the details: the alternative's rows and its settings
    assert "#### The alternative: idempotent-proxy-server + Redis" in text
    assert "`REQUEST_TIMEOUT=86400000` ms" in text
    # a second run replaces both blocks in place
    again = _report(report_files)
    assert again.count("<!-- bench:summary:begin -->") == 1 and again.count("<!-- bench:begin -->") == 1
    assert again.split("- when:")[0] == text.split("- when:")[0]


def test_report_fills_the_readme_cost_block_and_nothing_else(report_files: dict[str, Path], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## What it costs\n\nBy hand.\n\n<!-- bench:readme:begin -->\nold\n"
                      "<!-- bench:readme:end -->\n\nAfter.\n")
    _report(report_files, "--readme", str(readme))
    text = readme.read_text()
    assert text.startswith("# x\n\n## What it costs\n\nBy hand.\n\n<!-- bench:readme:begin -->")
    assert text.endswith("<!-- bench:readme:end -->\n\nAfter.\n") and "\nold\n" not in text
    assert "| idempotent-proxy-server + Redis, first requests | 120 (3.00× pass) |" in text
    assert "| replays ≥ 1.6× passthrough req/s | 1KiB 1.20× (1.20×, 1.18–1.22×, 0/3)" in text
    # a README without the block is an error, not a silent skip
    bare = tmp_path / "README2.md"
    bare.write_text("# x\n")
    err = _report(report_files, "--readme", str(bare), check=False)
    assert "no <!-- bench:readme:begin --> ... <!-- bench:readme:end --> block to fill" in err
