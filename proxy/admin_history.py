"""GET /admin/history and GET /admin/usage.csv (docs/http-api.md, "History"): the usage log summed
by hour or day, and the log itself as CSV, streamed page by page from the store (never loaded whole).
Admin key only, through the admin API's guard."""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.errors import InvalidRequest, NotFound, StoreUnavailable
from proxy.history import (CSV_HEADER, BadParam, CsvQuery, HistoryQuery, csv_chunk, csv_query, history_body,
                           history_query)

log = logging.getLogger("budget_proxy")
CSV_PAGE = 1000  # rows a store call answers: what the export holds in memory at a time


async def history_document(store: Any, q: HistoryQuery) -> dict[str, Any]:
    """The /admin/history answer for `q`, read from the store (StoreUnavailable when it cannot)."""
    try:
        hours = await store.usage_hours(q.team, q.key, q.start, q.end)
    except StoreUnavailable:
        raise
    except Exception as exc:
        log.error("history: store read failed: %s", exc.__class__.__name__)
        raise StoreUnavailable("The usage log is unavailable.") from None
    return history_body(q, hours)


async def _page(store: Any, q: CsvQuery, after: Any) -> tuple[list[Any], Any]:
    try:
        return await store.usage_page(q.start, q.end, q.team, q.key, after, CSV_PAGE)
    except StoreUnavailable:
        raise
    except Exception as exc:
        log.error("usage.csv: store read failed: %s", exc.__class__.__name__)
        raise StoreUnavailable("The usage log is unavailable.") from None


async def csv_body(store: Any, q: CsvQuery, rows: list[Any], after: Any) -> AsyncIterator[bytes]:
    """The header, then the rows page by page. A store that fails midway ends the response without
    its last chunk (the client sees a broken transfer, never a short file that looks whole)."""
    yield CSV_HEADER.encode()
    while True:
        if rows:
            yield csv_chunk(rows)
        if after is None:
            return
        try:
            rows, after = await _page(store, q, after)
        except StoreUnavailable:
            log.error("usage.csv: the store failed midway; the export is cut off")
            raise


class HistoryRoutes:
    """The two routes' handlers, mixed into the admin API's routes: each under its `guarded` (admin
    key; a ProxyError raised before the answer starts is its error response)."""

    ROUTES = (("/admin/history", "GET", "history"), ("/admin/usage.csv", "GET", "usage_csv"))
    state: Any
    guarded: Any

    async def history(self, request: Request) -> Response:
        async def action() -> dict[str, Any]:
            try:
                q = history_query(request.query_params.multi_items(), self.state.clock())
            except BadParam as err:
                raise InvalidRequest(f"Invalid history request: {err}") from None
            if q.team not in self.state.runtime.budgets.teams:
                raise NotFound(f"No team named '{q.team}'.")
            return await history_document(self.state.store, q)
        return await self.guarded(request, action)

    async def usage_csv(self, request: Request) -> Response:
        async def action() -> Response:
            try:
                q = csv_query(request.query_params.multi_items(), self.state.clock())
            except BadParam as err:
                raise InvalidRequest(f"Invalid usage.csv request: {err}") from None
            store = self.state.store
            rows, after = await _page(store, q, None)  # (before the answer starts: a failure is a 503)
            return StreamingResponse(csv_body(store, q, rows, after), media_type="text/csv; charset=utf-8",
                                     headers={"content-disposition": 'attachment; filename="usage.csv"',
                                              "cache-control": "no-store"})
        return await self.guarded(request, action)
