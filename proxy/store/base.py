"""The store protocol and the value types that cross it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

from proxy.ledger import ZERO, Admitted, Amounts, Ask, Denied, Scope, ScopeState


@dataclass(slots=True)
class Reservation:
    """A request in flight: what it holds and what it has been charged so far, per its scopes."""

    id: str
    scopes: tuple[Scope, ...]
    period_starts: tuple[float, ...]
    admitted: Admitted
    hold: Amounts
    charged: Amounts = ZERO
    deadline: float | None = None      # wall-clock budget deadline (epoch seconds)
    settled: bool = False
    # tightest limit - used - held across scopes right after admission, for x-budget-remaining-*
    remaining: dict[str, int] = field(default_factory=dict)


class UsageRow(NamedTuple):
    """One settled request, as the usage log keeps it. A tuple: built once a request, and a frozen
    dataclass of 16 fields costs ~2 µs to build."""

    time: float
    team: str
    key: str
    model: str
    route: str
    input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    output_tokens: int
    web_search_requests: int
    cost_nanos: int
    steps: int
    duration_s: float
    outcome: str
    request_id: str

    def as_tuple(self) -> tuple[Any, ...]:
        return tuple(self)


class LedgerStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot serve."""

    async def reserve(self, scopes: Sequence[Scope], ask: Ask, now: float, request_id: str) -> Reservation | Denied: ...

    async def charge(self, res: Reservation, charged: Amounts, now: float) -> Denied | None:
        """Set what a request in flight has been charged so far; grow its hold if needed, or deny."""

    async def settle(self, res: Reservation, actual: Amounts, row: UsageRow | None) -> None:
        """Charge the actual usage, release the rest of the hold, log the row. Exactly once per reservation.
        It takes effect when called: a caller cancelled while it awaits the store loses nothing (the
        book is updated before the first await; the write is finished by the store, not the caller)."""

    async def states(self, scopes: Sequence[Scope], now: float) -> list[ScopeState]: ...
    async def reset(self, scope: Scope, now: float) -> None: ...
    async def usage_log(self, limit: int = 100) -> list[UsageRow]: ...


def open_store(url: str, *, base_dir: str | None = None) -> LedgerStore:
    if url == "memory://":
        from proxy.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from proxy.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    if url.startswith("redis://"):
        from proxy.store.redis import RedisStore

        return RedisStore.from_url(url)
    raise ValueError(f"unknown store URL scheme: {url.split(':', 1)[0]}")
