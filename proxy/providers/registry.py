"""[pure] The providers the proxy knows, by the name the config gives their upstream.

This is the one place a provider is looked up by name: the config checks `upstreams` against
it, and the app builds a relay and routes for each provider in it. Everything a provider does
is asked of its adapter, so adding one is `register(adapter)` before the config is parsed and
the app created; the relay and the app name none."""
from __future__ import annotations

from proxy.providers import Provider
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.openai import OpenAIAdapter

# Always configured (with its defaults when the config names no upstream), and the shape of
# the routes no provider owns (/budget, /admin, a path under no provider's prefix).
DEFAULT = "anthropic"
PROVIDERS: dict[str, Provider] = {p.name: p for p in (AnthropicAdapter(), OpenAIAdapter())}


def register(provider: Provider) -> None:
    """Add a provider, or replace the one of its name."""
    PROVIDERS[provider.name] = provider


def unregister(name: str) -> None:
    if name == DEFAULT:
        raise ValueError(f"the default provider '{DEFAULT}' cannot be removed")
    PROVIDERS.pop(name, None)


def provider_named(name: str | None) -> Provider:
    return PROVIDERS[name or DEFAULT]


def provider_for_path(path: str) -> Provider:
    """The provider whose route prefix is the longest one `path` starts with, else the default:
    a client that mistyped a route still gets an error its SDK can read."""
    best = PROVIDERS[DEFAULT]
    longest = -1
    for provider in PROVIDERS.values():
        prefix = provider.route_prefix
        if len(prefix) > longest and path.startswith(prefix):
            best, longest = provider, len(prefix)
    return best
