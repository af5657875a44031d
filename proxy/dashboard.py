"""GET /admin/dashboard: a server-rendered page for people (to be written)."""
from __future__ import annotations

from typing import Any

from starlette.routing import Route


def build_dashboard_routes(state: Any, error_response: Any) -> list[Route]:
    return []
