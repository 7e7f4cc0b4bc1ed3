"""Fleet mode: exactly-once across two Envoys (Docker, --network host, --concurrency 2)
sharing a three-member etcd 3.4 cluster (Debian etcd-server, processes on loopback, data
in a temp dir, stopped by PID at the end).

Each Envoy has five listeners over the same etcd cluster: `closed` (failPolicy closed),
`open` (failPolicy open), `short` (ttl 2 s, lease buckets of 2 s), `keep` (leaseSeconds 2:
in-flight leases of 2 s kept alive from the root context) and `wait` (onConcurrent wait,
2.5 s). Skipped when no `etcd` binary is installed (`make fleet-setup` installs Debian's
etcd-server).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
import uuid
from typing import Any, Iterator

import pytest

from etcd_cluster import ETCD, Cluster, Member, b64
from harness import Envoy, Origin, build_envoy_config, free_port, listener
from httpclient import Resp, send

pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd not installed (make fleet-setup)")

CONCURRENCY = 2
WAIT_MS = 2500


def etcd_listener(name: str, port: int, fail: str, **rule: Any) -> dict[str, Any]:
    cfg = {
        "store": {"namespace": name, "etcd": {
            "cluster": "etcd", "prefix": "/idemgate/", "timeoutMillis": 1000, "retries": 2,
            "failPolicy": fail, "leaseBucketSeconds": rule.pop("bucket", 60), "authority": "etcd"}},
        **rule,
    }
    return listener(name, port, cfg)


def bootstrap(listeners: list[dict[str, Any]], origin_port: int, admin_port: int, cluster: Cluster) -> dict[str, Any]:
    cfg = build_envoy_config(listeners, origin_port, admin_port)
    cfg["static_resources"]["clusters"].append({
        "name": "etcd",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": "etcd", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": m.client}}}}
            for m in cluster.members]}]},
        "health_checks": [{
            "timeout": "0.5s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 2, "healthy_threshold": 1,
            "http_health_check": {"path": "/version"}}],
        "outlier_detection": {
            "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
            "base_ejection_time": "2s", "max_ejection_percent": 67},
    })
    return cfg


class Fleet:
    def __init__(self, cluster: Cluster, origin: Origin, envoys: list[Envoy]) -> None:
        self.cluster, self.origin, self.envoys = cluster, origin, envoys

    def port(self, i: int, name: str) -> int:
        return self.envoys[i % len(self.envoys)].port(name)


@pytest.fixture(scope="module")
def fleet(docker_engine: None) -> Iterator[Fleet]:
    cluster = Cluster()
    origin = Origin(verbose=False)
    envoys: list[Envoy] = []
    try:
        cluster.start()
        origin.start()
        for _ in range(2):
            ls = [
                etcd_listener("closed", free_port(), "closed"),
                etcd_listener("open", free_port(), "open"),
                etcd_listener("short", free_port(), "closed", ttlSeconds=2, leaseSeconds=2, bucket=2),
                etcd_listener("keep", free_port(), "closed", leaseSeconds=2),
                etcd_listener("wait", free_port(), "closed",
                              onConcurrent={"action": "wait", "waitMillis": WAIT_MS}),
                # wait policy under a rate limit (per Envoy; 1/hour, burst 4: no refill in a test)
                etcd_listener("waitrl", free_port(), "closed",
                              onConcurrent={"action": "wait", "waitMillis": WAIT_MS},
                              rateLimit={"rate": 1, "periodSeconds": 3600, "burst": 4}),
            ]
            admin = free_port()
            e = Envoy(ls, origin_port=origin.port, admin_port=admin, concurrency=CONCURRENCY,
                      config=bootstrap(ls, origin.port, admin, cluster), component_log_level="wasm:info")
            envoys.append(e.start())
        yield Fleet(cluster, origin, envoys)
    finally:
        for e in envoys:
            e.stop()
        origin.stop()
        cluster.stop()


def post(port: int, path: str, key: str, body: bytes = b'{"a":1}', timeout: float = 20) -> Resp:
    return send(port, "POST", path, body, {"idempotency-key": key, "content-type": "application/json"},
                timeout=timeout)


def executions(origin: Origin, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in origin.requests():
        path = r["path"].split("?")[0]
        if path.startswith(prefix) and r.get("body_complete"):
            out[path] = out.get(path, 0) + 1
    return out


def storm(f: Fleet, jobs: list[tuple[int, str, str]], workers: int = 64) -> list[tuple[str, Resp]]:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futs = [(path, pool.submit(post, f.port(i, "closed"), path, key)) for i, path, key in jobs]
        return [(path, fut.result()) for path, fut in futs]


def check_answers(results: list[tuple[str, Resp]], allow_503: bool = False) -> None:
    """Every answer is the first execution's (origin or identical replay), a 409, or (when
    allowed) a 503, the last two with Retry-After."""
    first: dict[str, Resp] = {}
    for path, r in results:
        if r.status == 200:
            first.setdefault(path, r)
            assert r.body == first[path].body, (r, first[path])
        else:
            assert r.status in ((409, 503) if allow_503 else (409,)), r
            assert r.header("retry-after"), r


def test_same_key_storm_over_both_envoys_executes_once(fleet: Fleet) -> None:
    path = f"/fleet/one/{uuid.uuid4().hex}?delay=0.3"
    key = uuid.uuid4().hex
    t0 = time.monotonic()
    results = storm(fleet, [(i, path, key) for i in range(200)], workers=100)
    check_answers(results)
    assert executions(fleet.origin, path.split("?")[0]) == {path.split("?")[0]: 1}
    # retries after completion replay it on both Envoys, identically
    time.sleep(0.2)
    again = [post(fleet.port(i, "closed"), path, key) for i in range(4)]
    assert all(r.status == 200 and r.header("idempotent-replayed") == "true" for r in again), again
    assert len({r.body for r in again} | {r.body for _, r in results if r.status == 200}) == 1
    print(f"200 same-key requests in {time.monotonic() - t0:.2f}s: "
          f"{sum(1 for _, r in results if r.status == 200)} 200, {sum(1 for _, r in results if r.status == 409)} 409")


def test_fifty_keys_twenty_each(fleet: Fleet) -> None:
    base = f"/fleet/many/{uuid.uuid4().hex}"
    jobs = [(i * 20 + j, f"{base}/{i}?delay=0.1", f"k{i}-{base}") for i in range(50) for j in range(20)]
    t0 = time.monotonic()
    results = storm(fleet, jobs, workers=100)
    check_answers(results)
    counts = executions(fleet.origin, base)
    assert len(counts) == 50 and set(counts.values()) == {1}, counts
    print(f"50 keys x 20 in {time.monotonic() - t0:.2f}s")


def test_leader_killed_mid_storm_never_executes_twice(fleet: Fleet) -> None:
    base = f"/fleet/election/{uuid.uuid4().hex}"
    leader = fleet.cluster.leader()
    jobs = [(i * 10 + j, f"{base}/{i}?delay=0.05", f"e{i}-{base}") for i in range(60) for j in range(10)]

    def kill_soon() -> None:
        time.sleep(0.3)
        leader.stop(signal.SIGKILL)

    with concurrent.futures.ThreadPoolExecutor(1) as k:
        killer = k.submit(kill_soon)
        results = storm(fleet, jobs, workers=40)
        killer.result()
    try:
        check_answers(results, allow_503=True)
        counts = executions(fleet.origin, base)
        assert counts and max(counts.values()) == 1, counts
        # after the election, every key settles: a retry replays or (if never executed) runs once
        fleet.cluster.wait_leader()
        time.sleep(1.5)
        for i in range(60):
            path = f"{base}/{i}?delay=0.05"
            r = post(fleet.port(i, "closed"), path, f"e{i}-{base}")
            assert r.status in (200, 409, 503), r
        counts = executions(fleet.origin, base)
        assert max(counts.values()) == 1, counts
        statuses = sorted({r.status for _, r in results})
        print(f"election storm: statuses {statuses}, {len(counts)} keys executed")
    finally:
        leader.start(fleet.cluster.spec)
        fleet.cluster.wait_leader()


def test_all_members_down_follows_fail_policy_then_resumes(fleet: Fleet) -> None:
    base = f"/fleet/down/{uuid.uuid4().hex}"
    for m in fleet.cluster.members:
        m.stop()
    try:
        r = post(fleet.port(0, "closed"), f"{base}/closed", "c1")
        assert r.status == 503 and r.header("retry-after"), r
        assert r.json()["type"].endswith("/store-unavailable")
        assert executions(fleet.origin, f"{base}/closed") == {}
        r = post(fleet.port(1, "open"), f"{base}/open", "o1")
        assert r.status == 200 and r.header("idempotent-replayed") is None, r
        assert executions(fleet.origin, f"{base}/open") == {f"{base}/open": 1}
    finally:
        fleet.cluster.start()
    deadline = time.monotonic() + 20
    while True:
        r = post(fleet.port(0, "closed"), f"{base}/closed", "c1")
        if r.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status == 200, r
    time.sleep(0.3)  # the completion reaches etcd right after the response
    again = post(fleet.port(1, "closed"), f"{base}/closed", "c1")
    assert again.status == 200 and again.header("idempotent-replayed") == "true", again
    assert again.body == r.body
    assert executions(fleet.origin, f"{base}/closed") == {f"{base}/closed": 1}


def test_keys_expire_within_ttl_plus_bucket_width(fleet: Fleet) -> None:
    base = f"/fleet/expiry/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    r = post(fleet.port(0, "short"), base, key)
    assert r.status == 200, r
    done = time.monotonic()
    time.sleep(0.3)
    assert post(fleet.port(1, "short"), base, key).header("idempotent-replayed") == "true"
    member = fleet.cluster.any_live()
    prefix = b64("/idemgate/short/")
    end = b64("/idemgate/short0")

    def live_keys() -> int:
        return int(member.call("/v3/kv/range", {"key": prefix, "range_end": end, "count_only": True})
                   .get("count", 0))

    assert live_keys() >= 1
    # ttl 2 s + bucket 2 s (+ 1 s: etcd's whole-second TTLs and its lease expiry sweep)
    while live_keys() > 0:
        assert time.monotonic() - done < 2 + 2 + 1.5, "key outlived ttl + bucket width"
        time.sleep(0.1)
    gone = time.monotonic() - done
    assert gone >= 1.5, f"key deleted {gone:.2f}s after completion, before its ttl"
    # expired: the key is executed again
    r2 = post(fleet.port(1, "short"), base, key)
    assert r2.status == 200 and r2.header("idempotent-replayed") is None, r2
    assert executions(fleet.origin, base) == {base: 2}
    print(f"etcd key gone {gone:.2f}s after completion (ttl 2s, bucket 2s)")


def namespace_kvs(member: Member, namespace: str) -> list[dict[str, Any]]:
    prefix = f"/idemgate/{namespace}/"
    end = prefix[:-1] + chr(ord("/") + 1)
    return member.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)}).get("kvs", [])


def lease_ttl(member: Member, lease: str) -> tuple[int, int]:
    """(remaining TTL, granted TTL) of a lease; remaining -1 when it is gone."""
    r = member.call("/v3/lease/timetolive", {"ID": lease})
    return int(r.get("TTL", -1)), int(r.get("grantedTTL", 0))


def test_in_flight_claim_outlives_its_lease_only_because_it_is_refreshed(fleet: Fleet) -> None:
    """leaseSeconds 2, origin latency 5 s: the in-flight record rides a 2 s etcd lease that
    the claiming Envoy keeps alive from its root context; a duplicate on the other Envoy
    3.5 s in (past the record's lease and past the etcd lease's TTL) still finds it in
    flight. Without the keep-alives etcd would have deleted it (or the record's lapsed
    lease would let the duplicate take over): a second execution."""
    path = f"/fleet/keep/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    member = fleet.cluster.any_live()
    before = {kv["key"] for kv in namespace_kvs(member, "keep")}
    keepalives0 = sum(e.stats(r"fleet_keepalives").get("wasmcustom.idemgate.keep.fleet_keepalives", 0)
                      for e in fleet.envoys)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        first = pool.submit(post, fleet.port(0, "keep"), path + "?delay=5", key)
        time.sleep(3.5)
        new = [kv for kv in namespace_kvs(member, "keep") if kv["key"] not in before]
        assert len(new) == 1, new
        ttl, granted = lease_ttl(member, new[0]["lease"])
        assert granted == 2 and ttl > 0, (ttl, granted)  # the short in-flight lease, alive
        dup = post(fleet.port(1, "keep"), path + "?delay=5", key)
        assert dup.status == 409 and dup.header("retry-after"), dup
        r = first.result()
    assert r.status == 200 and time.monotonic() - t0 >= 5, r
    time.sleep(0.3)  # the completion reaches etcd right after the response
    again = post(fleet.port(1, "keep"), path + "?delay=5", key)
    assert again.status == 200 and again.header("idempotent-replayed") == "true", again
    assert again.body == r.body
    assert executions(fleet.origin, path) == {path: 1}
    # completed: the record moved to its expiry bucket's lease (ttl 1 day, never refreshed)
    (kv,) = [kv for kv in namespace_kvs(member, "keep") if kv["key"] not in before]
    assert kv["lease"] != new[0]["lease"]
    assert lease_ttl(member, kv["lease"])[1] > 86_000
    keepalives1 = sum(e.stats(r"fleet_keepalives").get("wasmcustom.idemgate.keep.fleet_keepalives", 0)
                      for e in fleet.envoys)
    assert keepalives1 - keepalives0 >= 3, (keepalives0, keepalives1)  # ~ every 2/3 s for 5 s
    # nothing holds the in-flight lease any more: it lapses within its TTL
    deadline = time.monotonic() + 4
    while lease_ttl(member, new[0]["lease"])[0] > 0:
        assert time.monotonic() < deadline, "in-flight lease still refreshed after completion"
        time.sleep(0.2)


def test_unknown_outcome_stops_the_refresh_and_the_key_lapses_within_its_lease(fleet: Fleet) -> None:
    """The origin resets the connection: Envoy answers itself, the outcome is unknown and the
    claim stays, but its in-flight lease is no longer kept alive for it: the key is free again
    within leaseSeconds (2 s) plus etcd's expiry sweep, and a retry executes."""
    path = f"/fleet/unknown/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    r = post(fleet.port(0, "keep"), path + "?reset=1", key)
    assert r.status == 503 and r.header("idempotent-replayed") is None, r
    t0 = time.monotonic()
    held = post(fleet.port(1, "keep"), path, key)
    assert held.status == 409, held
    while True:
        again = post(fleet.port(1, "keep"), path, key)
        if again.status == 200:
            break
        assert again.status == 409 and time.monotonic() - t0 < 2 + 2.5, (again, time.monotonic() - t0)
        time.sleep(0.2)
    assert again.header("idempotent-replayed") is None
    assert executions(fleet.origin, path) == {path: 2}  # the reset one read the body too
    print(f"unknown outcome: key free again {time.monotonic() - t0:.2f}s later (leaseSeconds 2)")


def test_wait_policy_duplicate_on_the_other_envoy_gets_the_replay(fleet: Fleet) -> None:
    path = f"/fleet/wait/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: (post(fleet.port(0, "wait"), path + "?delay=1", key), time.monotonic()))
        time.sleep(0.3)
        dup = pool.submit(lambda: (post(fleet.port(1, "wait"), path + "?delay=1", key), time.monotonic()))
        (r1, t1), (r2, t2) = first.result(), dup.result()
    assert r1.status == 200 and r1.header("idempotent-replayed") is None, r1
    assert r2.status == 200 and r2.header("idempotent-replayed") == "true", r2
    assert r2.body == r1.body
    assert t2 >= t1 - 0.05, "the duplicate was answered before the first completed"
    assert t2 - t1 < 0.5, f"the duplicate waited {t2 - t1:.2f}s after the first completed"
    assert executions(fleet.origin, path) == {path: 1}
    fleet.envoys[1].settle_metrics()
    waited = fleet.envoys[1].stats(r"\.wait\.waited$")
    assert waited.get("wasmcustom.idemgate.wait.waited", 0) >= 1, waited


def test_wait_policy_released_key_is_claimed_and_bound_answers_409(fleet: Fleet) -> None:
    # the first answer is not stored (500): the key is released and the waiter claims it
    path = f"/fleet/wait-release/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, fleet.port(0, "wait"), path + "?delay=1&status=500", key)
        time.sleep(0.3)
        dup = pool.submit(post, fleet.port(1, "wait"), path + "?delay=0.1&status=500", key)
        r1, r2 = first.result(), dup.result()
    assert r1.status == 500 and r2.status == 500, (r1, r2)
    assert r2.header("idempotent-replayed") is None
    assert r1.header("x-origin-execution") != r2.header("x-origin-execution")
    assert executions(fleet.origin, path) == {path: 2}
    # still in flight when the wait runs out: 409 with Retry-After after ~waitMillis
    path = f"/fleet/wait-bound/{uuid.uuid4().hex}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, fleet.port(0, "wait"), path + "?delay=4", key)
        time.sleep(0.3)
        t0 = time.monotonic()
        dup = post(fleet.port(1, "wait"), path + "?delay=4", key)
        waited = time.monotonic() - t0
        assert dup.status == 409 and dup.header("retry-after"), dup
        assert WAIT_MS / 1000 - 0.2 <= waited < WAIT_MS / 1000 + 1, waited
        assert first.result().status == 200
    assert executions(fleet.origin, path) == {path: 1}


def test_wait_policy_charges_the_rate_limit_when_the_wait_ends(fleet: Fleet) -> None:
    """A parked request pays its rate-limit charge when its wait ends, as in local mode: a
    wait that ends in a replay is free, one that ends in a 409 at the bound costs 1, and
    both answers carry X-RateLimit-* (the limit is per Envoy: Envoy 1 sees only the
    duplicates)."""
    # replayed after waiting: free
    path = f"/fleet/wait-rl/{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, fleet.port(0, "waitrl"), path + "?delay=1", key)
        time.sleep(0.3)
        dup = post(fleet.port(1, "waitrl"), path + "?delay=1", key)
        r1 = first.result()
    assert r1.status == 200 and dup.status == 200, (r1, dup)
    assert dup.header("idempotent-replayed") == "true", dup
    assert dup.header("x-ratelimit-limit") == "4", dup
    assert dup.header("x-ratelimit-remaining") == "4", dup  # the replay cost nothing
    # still in flight at the bound: 409, charged
    path, key = f"/fleet/wait-rl-bound/{uuid.uuid4().hex}", uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, fleet.port(0, "waitrl"), path + "?delay=4", key)
        time.sleep(0.3)
        dup = post(fleet.port(1, "waitrl"), path + "?delay=4", key)
        assert dup.status == 409 and dup.header("retry-after"), dup
        assert dup.header("x-ratelimit-remaining") == "3", dup
        assert first.result().status == 200
    assert executions(fleet.origin, path) == {path: 1}
