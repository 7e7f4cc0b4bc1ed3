"""deploy/prometheus/: `promtool check` and `promtool test rules` on the shipped files, the
copies for the Prometheus Operator kept equal to them, and the rules against a real
Prometheus (Debian's) scraping two real Envoys' /stats/prometheus: one with the
idemgate_namespace stats tag (plain Envoy, envoy/envoy.yaml) and one without (as in Istio and
Envoy Gateway, made uniform by the shipped metric_relabel_configs). Traffic that fills the
store and that loses a claim makes the IdemgateStoreFull and IdemgateLostClaims alerts fire,
and only then; every dashboard query evaluates."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from deploy_harness import DEPLOY, Prometheus, require_tool
from harness import Envoy, Origin, build_envoy_config, free_port, listener
from httpclient import send
from test_filter import is_problem

PROM = DEPLOY / "prometheus"
RULES = PROM / "idemgate.rules.yaml"
METRICS_RS = Path(__file__).resolve().parent.parent / "filter" / "src" / "metrics.rs"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool", "make deploy-deps installs Debian's prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=str(PROM))


def test_promtool_check_rules_and_config():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = promtool("check", "config", "prometheus.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    r = promtool("test", "rules", "idemgate.rules.test.yaml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # every alert has a unit test that expects it to fire
    tested = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", (PROM / "idemgate.rules.test.yaml").read_text()))
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert tested == alerts, alerts - tested


def filter_metric_names() -> set[str]:
    src = METRICS_RS.read_text()
    counters = src.split("pub const COUNTERS")[1].split("];")[0]
    gauges = src.split("pub const GAUGES")[1].split("];")[0]
    return set(re.findall(r'"([a-z_]+)"', counters + gauges))


def relabel_configs() -> list[dict[str, Any]]:
    (job,) = yaml.safe_load((PROM / "prometheus.yaml").read_text())["scrape_configs"]
    return job["metric_relabel_configs"]


def test_relabeling_knows_every_metric_of_the_filter():
    names = filter_metric_names()
    regexes = {r["regex"] for r in relabel_configs() if "__name__" in r.get("source_labels", [])}
    assert len(regexes) == 1
    (regex,) = regexes
    alternation = re.fullmatch(r"idemgate_\(\.\+\?\)_\(([a-z_|]+)\);", regex)
    assert alternation, regex
    assert set(alternation.group(1).split("|")) == names
    # longer names first, so that no name is cut to a shorter one
    listed = alternation.group(1).split("|")
    assert listed == sorted(listed, key=lambda n: (-len(n), n))
    # and every metric the rules and the dashboard use is one of them (or a recorded one)
    used = set(re.findall(r"\bidemgate_([a-z_]+)\b", RULES.read_text() + (PROM / "grafana-dashboard.json").read_text()))
    assert used - {"namespace"} <= names, used - names


def test_operator_copies_match_the_prometheus_files():
    rules = yaml.safe_load(RULES.read_text())
    (pr,) = [d for d in yaml.safe_load_all((PROM / "prometheusrule.yaml").read_text()) if d]
    assert pr["spec"]["groups"] == rules["groups"], "prometheusrule.yaml differs from idemgate.rules.yaml"
    want = [{{"source_labels": "sourceLabels", "target_label": "targetLabel"}.get(k, k): v for k, v in r.items()}
            for r in relabel_configs()]
    for pm in yaml.safe_load_all((PROM / "podmonitors.yaml").read_text()):
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert ep["metricRelabelings"] == want, pm["metadata"]["name"]


# --------------------------------------------------------------------------- a real Prometheus

STORE_FULL = {"store": {"namespace": "full", "capacity": 1, "probes": 1}}
LOST = {"store": {"namespace": "lost"}, "ttlSeconds": 60, "leaseSeconds": 1}


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin(verbose=False) as o:
        yield o


def start_envoy(origin: Origin, tagged: bool) -> Envoy:
    specs = [listener("full", free_port(), STORE_FULL), listener("lost", free_port(), LOST)]
    admin = free_port()
    cfg = build_envoy_config(specs, origin.port, admin)
    if not tagged:
        del cfg["stats_config"]  # as Istio's and Envoy Gateway's bootstraps: no idemgate tag
    return Envoy(specs, origin_port=origin.port, admin_port=admin, concurrency=2, config=cfg).start()


@pytest.fixture(scope="module")
def envoys(origin) -> Iterator[dict[str, Envoy]]:
    started: list[Envoy] = []
    try:
        for tagged in (True, False):
            started.append(start_envoy(origin, tagged))
        yield {"tagged": started[0], "untagged": started[1]}
    finally:
        for e in started:
            e.stop()


@pytest.fixture(scope="module")
def prometheus(envoys) -> Iterator[Prometheus]:
    """The shipped prometheus.yaml, its job pointed at the two Envoys' admin listeners,
    scraping and evaluating every second."""
    cfg = yaml.safe_load((PROM / "prometheus.yaml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(RULES)]
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{e.admin_port}" for e in envoys.values()]}]
    with Prometheus(cfg) as p:
        yield p


def wait_for(what: str, check: Any, timeout: float = 60, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(every)


def our_alerts(prom: Prometheus) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] in ("IdemgateStoreFull", "IdemgateLostClaims")]


def fill_the_store(envoy: Envoy, origin: Origin) -> None:
    """One request in flight holds the only slot; a second key gets 503 store-unavailable."""
    path = f"/full/{uuid.uuid4().hex}"
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(send, envoy.port("full"), "POST", path + "?delay=3", b"a", {"Idempotency-Key": "holder-" + path})
        wait_for("the slow request at the origin", lambda: [r for r in origin.requests() if r["path"].startswith(path)], 10, 0.05)
        r = send(envoy.port("full"), "POST", path, b"b", {"Idempotency-Key": "other-" + path})
        doc = is_problem(r, 503)
        assert doc["type"].endswith("store-unavailable") and r.header("retry-after")
        assert slow.result().status == 200


def lose_a_claim(envoy: Envoy, origin: Origin) -> None:
    """A request slower than its 1 s lease; a retry takes the lapsed key over, and the first
    request's completion then finds its claim lost."""
    path = f"/lost/{uuid.uuid4().hex}?delay=2.5"
    h = {"Idempotency-Key": "slow-" + uuid.uuid4().hex}
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        first = ex.submit(send, envoy.port("lost"), "POST", path, b"x", h)
        time.sleep(1.4)  # past the 1 s lease
        second = ex.submit(send, envoy.port("lost"), "POST", path, b"x", h)
        assert first.result().status == 200 and second.result().status == 200
    assert len([r for r in origin.requests() if r["path"].startswith(path.split("?")[0])]) == 2  # executed twice


def test_alerts_fire_against_a_real_prometheus_scraping_envoy(envoys, prometheus, origin):
    instances = {name: f"127.0.0.1:{e.admin_port}" for name, e in envoys.items()}
    # Both Envoys' series arrive in one shape, with the namespace label.
    def series_ready() -> bool:
        got = {(s["metric"]["instance"], s["metric"].get("idemgate_namespace")) for s in prometheus.query("idemgate_lost_claims")}
        return got >= {(i, ns) for i in instances.values() for ns in ("full", "lost")}

    wait_for("idemgate series from both Envoys", series_ready)
    unlabeled = prometheus.query('{__name__=~"idemgate_.+", idemgate_namespace=""}')
    assert unlabeled == [], f"untagged names left unrelabeled: {unlabeled[:3]}"
    shapes = {s["metric"]["__name__"] for s in prometheus.query('{__name__=~"idemgate_.+"}')}
    assert shapes == {f"idemgate_{n}" for n in filter_metric_names()}, shapes
    # A rule evaluation after the series exist: nothing fires on a quiet store.
    t0 = time.time()
    wait_for("a rule evaluation", lambda: all(
        g.get("lastEvaluation", "0001")[:4] != "0001" and _ts(g["lastEvaluation"]) > t0 + 1
        for g in prometheus.api("rules")["groups"]), 30)
    assert our_alerts(prometheus) == []

    for e in envoys.values():
        fill_the_store(e, origin)
        lose_a_claim(e, origin)

    want = {(alert, ns, inst) for inst in instances.values()
            for alert, ns in (("IdemgateStoreFull", "full"), ("IdemgateLostClaims", "lost"))}

    def firing() -> bool:
        got = {(a["labels"]["alertname"], a["labels"]["idemgate_namespace"], a["labels"]["instance"])
               for a in our_alerts(prometheus) if a["state"] == "firing"}
        return got >= want

    wait_for("IdemgateStoreFull and IdemgateLostClaims firing for both Envoys", firing, 60)
    for a in our_alerts(prometheus):
        assert a["labels"]["severity"] == "critical"
        assert float(a["value"]) >= 1, a
        assert a["annotations"]["summary"] and a["annotations"]["description"]
    # the expressions themselves, as an operator would query them
    assert {s["metric"]["instance"] for s in prometheus.query("increase(idemgate_store_unavailable[5m]) > 0")} == set(instances.values())
    assert {s["metric"]["instance"] for s in prometheus.query("increase(idemgate_lost_claims[15m]) > 0")} == set(instances.values())
    # recording rules see the traffic
    ns = {s["metric"]["idemgate_namespace"] for s in prometheus.query("idemgate:requests:rate5m > 0")}
    assert ns == {"full", "lost"}, ns


def _ts(rfc3339: str) -> float:
    """Seconds since the epoch of a Prometheus timestamp (UTC, up to nanoseconds)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", rfc3339)
    assert m, rfc3339
    return datetime.fromisoformat(m.group(1) + "+00:00").timestamp() + float(m.group(2) or 0)


def test_every_dashboard_query_evaluates(prometheus, envoys):
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
    for expr in exprs:
        q = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
        prometheus.query(q)  # raises on a parse or evaluation error
    var = next(v for v in dash["templating"]["list"] if v["name"] == "namespace")
    label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"])
    assert label and prometheus.query(label.group(1)), var["definition"]
