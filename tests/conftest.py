from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from tests.harness import ProxyServer, ended_after, make_config, start_proxy
from tests.simulator.anthropic import AnthropicSimulator

ALPHA_KEY = "bp-test-alpha-key-0001"
BETA_KEY = "bp-test-beta-key-0002"
GAMMA_KEY = "bp-test-gamma-key-0003"


@pytest.fixture
def sim() -> Iterator[AnthropicSimulator]:
    s = AnthropicSimulator()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def default_teams() -> dict[str, Any]:
    return {
        "research": {"keys": {"alpha": {"key": ALPHA_KEY}, "beta": {"key": BETA_KEY}}},
        "support": {"keys": {"gamma": {"key": GAMMA_KEY, "models": ["claude-haiku-*"]}}},
    }


@pytest.fixture
def start(sim: AnthropicSimulator) -> Iterator[Callable[..., ProxyServer]]:
    """start(teams=..., **config) -> a running proxy in front of the simulator."""
    def _start(teams: dict[str, Any] | None = None, upstream_url: str | None = None, **top: Any) -> ProxyServer:
        kwargs = {k: top.pop(k) for k in ("store_obj", "transport", "clock") if k in top}
        if "store_obj" in kwargs:
            kwargs["store"] = kwargs.pop("store_obj")
        loaded = make_config(upstream_url or sim.url, teams or default_teams(), **top)
        return start_proxy(loaded, **kwargs)

    yield from ended_after(_start, ProxyServer.stop)


@pytest.fixture
def proxy(start: Callable[..., ProxyServer]) -> ProxyServer:
    return start()
