"""RouteSet: the base of the route classes, handlers over one app's state listed in a table."""
from __future__ import annotations

from typing import Any

from starlette.routing import Route


class RouteSet:
    """Handlers over `state`, with `error_response` answering a ProxyError; ROUTES lists each
    route as (path, HTTP method, name of the handler method)."""

    ROUTES: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, state: Any, error_response: Any) -> None:
        self.state = state
        self.error_response = error_response

    def routes(self) -> list[Route]:
        return [Route(path, getattr(self, name), methods=[method]) for path, method, name in self.ROUTES]
