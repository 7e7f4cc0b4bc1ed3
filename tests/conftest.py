"""pytest fixtures: one origin per session, and a factory for Envoy instances
(all stopped at session end). See harness.py for the API."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

import harness


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine answers and the Envoy image exists (`make integration`
    prepares both; this only starts an engine when none answers)."""
    harness.ensure_docker()
    if not harness.wasm_path().is_file():
        pytest.fail(f"{harness.wasm_path()} missing: run `make build`")


@pytest.fixture(scope="session")
def origin() -> Iterator[harness.Origin]:
    with harness.Origin() as o:
        yield o


@pytest.fixture
def fresh_origin(origin: harness.Origin) -> harness.Origin:
    """The session origin with its request log and execution counter cleared."""
    origin.reset()
    return origin


EnvoyFactory = Callable[..., harness.Envoy]


@pytest.fixture(scope="session")
def envoy_factory(docker_engine: None, origin: harness.Origin) -> Iterator[EnvoyFactory]:
    """start(listeners, **Envoy kwargs) -> a started harness.Envoy pointing at the
    session origin. Listener specs: harness.listener(name, port, idemgate_config, ...)."""
    started: list[harness.Envoy] = []

    def start(listeners: Sequence[Mapping[str, Any]], **kw: Any) -> harness.Envoy:
        kw.setdefault("origin_port", origin.port)
        envoy = harness.Envoy(listeners, **kw)
        started.append(envoy)
        return envoy.start()

    yield start
    for envoy in started:
        envoy.stop()
