"""scripts/lib.sh, the boilerplate of the foreground run scripts (scripts/run-demo.sh,
scripts/run-edge.sh, envoy/fleet/run.sh): the port check, stopping what was started by PID
(also after Ctrl-C, and with SIGKILL for a process that ignores SIGTERM), naming the process
that exited, and giving up early on a service that died before it answered. No Docker
needed: `make run` stops at its port check before it touches Docker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "scripts" / "lib.sh"


def _listening(host: str, port: int = 0) -> socket.socket:
    s = socket.socket()
    # As the scripts' check does: a port in TIME_WAIT (a run that just ended) is free.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen()
    return s


@pytest.fixture
def held_ports() -> Iterator[list[int]]:
    """Two ports with a listener on 127.0.0.1."""
    socks = [_listening("127.0.0.1") for _ in range(2)]
    yield [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()


def _lib_script(body: str) -> list[str]:
    prelude = f"set -euo pipefail\nRUN_TAG=t\nROOT={ROOT}\ncd \"$ROOT\"\nsource {LIB}\n"
    return ["bash", "-c", prelude + body]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] != "Z"
    except OSError:
        return False


def test_port_check_names_every_taken_port(held_ports: list[int]) -> None:
    free = _listening("127.0.0.1")
    free_port = free.getsockname()[1]
    free.close()
    a, b = held_ports
    r = subprocess.run(
        _lib_script(f'require_ports_free 127.0.0.1 "a hint" {a} {free_port} {b}; echo passed'),
        env=_env(), capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1, r
    assert f"[t] ports {a} {b} are already in use (a hint); stop that first" in r.stderr
    assert "passed" not in r.stdout

    r = subprocess.run(
        _lib_script(f'require_ports_free 127.0.0.1 hint {free_port}; echo passed'),
        env=_env(), capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 0 and r.stdout.strip() == "passed", r


def test_make_run_port_taken_fails_before_docker() -> None:
    if not (ROOT / "dist" / "idemgate.wasm").is_file():
        pytest.fail("dist/idemgate.wasm missing: run `make build`")
    try:
        held: socket.socket | None = _listening("0.0.0.0", 9901)
    except OSError:
        held = None  # someone else listens there already: just as taken
    try:
        p = subprocess.Popen(
            [str(ROOT / "scripts" / "run-demo.sh")],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.terminate()  # past the check after all: its traps stop what it started
            _, err = p.communicate(timeout=120)
            pytest.fail(f"scripts/run-demo.sh did not stop at its port check:\n{err}")
    finally:
        if held:
            held.close()
    assert p.returncode == 1, err
    m = re.search(r"^\[run\] ports? ([0-9 ]+) (is|are) already in use \(another make run\?\); stop that first$",
                  err, re.M)
    assert m and "9901" in m.group(1).split(), err
    # It stopped at the check: no Docker engine, no origin, no cleanup to do.
    assert "[docker]" not in err and "starting" not in err and "stopping" not in err


def test_sigint_stops_every_started_process_by_pid(tmp_path: Path) -> None:
    hook = tmp_path / "hook-ran"
    stubborn = (
        "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'print("stubborn", flush=True); time.sleep(120)'
    )
    body = f"""
RUN_STOP_GRACE=2
run_traps
on_exit touch {hook}
start_bg sleeper sleep 120
echo "pid $LAST_PID"
start_bg stubborn "$PYTHON" -c '{stubborn}'
echo "pid $LAST_PID"
echo ready
wait_first_exit
exit 1
"""
    # SIGINT at its default, as under a terminal: bash cannot trap a signal ignored on entry
    # (as it is when pytest itself runs as a background job of a non-interactive shell).
    p = subprocess.Popen(_lib_script(body), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout is not None
    pids, lines = [], set()
    for line in p.stdout:
        if line.startswith("pid "):
            pids.append(int(line.split()[1]))
        lines.add(line.strip())
        if {"ready", "stubborn"} <= lines:  # the stubborn one ignores SIGTERM by now
            break
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert not any(_alive(pid) for pid in pids), err
    assert hook.exists(), err
    assert "[t] stopping" in err
    assert f"[t] stubborn (pid {pids[1]}) still runs 2 s after SIGTERM; SIGKILL" in err
    assert time.monotonic() - t0 >= 2


def test_first_exit_is_named_and_the_rest_stopped() -> None:
    body = """
run_traps
start_bg long sleep 120
echo "pid $LAST_PID"
start_bg short sleep 0.2
wait_first_exit
exit 1
"""
    r = subprocess.run(_lib_script(body), env=_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r
    assert re.search(r"^\[t\] short \(pid \d+\) exited$", r.stderr, re.M), r.stderr
    long_pid = int(r.stdout.split()[1])
    assert not _alive(long_pid)


def test_wait_http_ready_gives_up_when_the_service_dies() -> None:
    # Port 9 (discard) on loopback: nothing answers HTTP there.
    body = """
run_traps
start_bg svc sh -c 'sleep 0.5; exit 3'
wait_http_ready svc http://127.0.0.1:9/ready "" "$LAST_PID" || { echo not-ready; exit 1; }
echo ready
"""
    t0 = time.monotonic()
    r = subprocess.run(_lib_script(body), env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout.strip() == "not-ready", r
    assert "[t] svc exited before it answered on http://127.0.0.1:9/ready" in r.stderr
    assert time.monotonic() - t0 < 10  # not the 30 s readiness timeout
