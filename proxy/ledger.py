"""[pure] The one place that decides: admit or deny, how much to hold, whether a hold may grow.

Vocabulary, per scope (a key or a team) and period:
  used  = settled charges + what requests in flight have been charged so far
  held  = reserved by requests in flight but not yet charged
A request's footprint on a scope is max(hold, charged) per dimension; admission and
growth both require  used + held + new <= limit  in every limited dimension of every
scope, so two requests can never both take the last of a budget.

Money is integer nano-dollars. Nothing here does I/O or reads a clock: `now` is passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple, Sequence

from proxy.usage import Usage

METERED = ("tokens", "input_tokens", "output_tokens", "cost_usd", "steps")
DIMENSIONS = METERED + ("wall_clock",)
NANOS_PER_USD = 10**9


def usd(nanos: int | float) -> float:
    return round(nanos / NANOS_PER_USD, 9)


def in_unit(dim: str, v: int | float) -> int | float:
    """A dimension's amount as users see it: cost in USD, everything else as stored."""
    return usd(v) if dim == "cost_usd" else v


class Amounts(NamedTuple):
    """Per metered dimension, in tokens, nanos and steps. Immutable; a tuple underneath because a
    frozen dataclass costs ~1 µs to build and every request builds a dozen of these."""

    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    steps: int = 0

    def get(self, dim: str) -> int:
        return self[_DIM_INDEX[dim]]

    # Arithmetic builds the result with tuple.__new__ directly: no per-field keyword handling.
    def __add__(self, o: Amounts) -> Amounts:  # type: ignore[override]
        a, b, c, d, e = self
        f, g, h, i, j = o
        return _new(Amounts, (a + f, b + g, c + h, d + i, e + j))

    def __sub__(self, o: Amounts) -> Amounts:
        a, b, c, d, e = self
        f, g, h, i, j = o
        return _new(Amounts, (a - f, b - g, c - h, d - i, e - j))

    def max(self, o: Amounts) -> Amounts:
        a, b, c, d, e = self
        f, g, h, i, j = o
        return _new(Amounts, (a if a >= f else f, b if b >= g else g, c if c >= h else h, d if d >= i else i,
                              e if e >= j else j))

    def nonneg(self) -> Amounts:
        a, b, c, d, e = self
        if a >= 0 and b >= 0 and c >= 0 and d >= 0 and e >= 0:
            return self
        return _new(Amounts, (a if a > 0 else 0, b if b > 0 else 0, c if c > 0 else 0, d if d > 0 else 0,
                              e if e > 0 else 0))

    def within(self, o: Amounts) -> bool:
        """Every dimension <= o's (self.max(o) == o, without building it)."""
        a, b, c, d, e = self
        f, g, h, i, j = o
        return a <= f and b <= g and c <= h and d <= i and e <= j

    def is_zero(self) -> bool:
        return self == ZERO

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return tuple(self)  # type: ignore[return-value]

    @classmethod
    def of_usage(cls, usage: Usage, cost_nanos: int, steps: int) -> Amounts:
        return _new(cls, (usage.total_tokens, usage.total_input_tokens, usage.output_tokens, cost_nanos, steps))


_new = tuple.__new__
_DIM_INDEX = {"tokens": 0, "input_tokens": 1, "output_tokens": 2, "cost_usd": 3, "cost_nanos": 3, "steps": 4}
ZERO = Amounts()


@dataclass(frozen=True, slots=True)
class Limits:
    tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_nanos: int | None = None
    steps: int | None = None
    wall_clock: float | None = None  # seconds since the first request of the period
    # metered(), worked out once: every admission and settlement reads it for each scope
    _metered: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        pairs = (("tokens", self.tokens), ("input_tokens", self.input_tokens), ("output_tokens", self.output_tokens),
                 ("cost_usd", self.cost_nanos), ("steps", self.steps))
        object.__setattr__(self, "_metered", tuple((d, v) for d, v in pairs if v is not None))

    def get(self, dim: str) -> int | float | None:
        return self.cost_nanos if dim == "cost_usd" else getattr(self, dim)

    def metered(self) -> tuple[tuple[str, int], ...]:
        """(dimension, limit) for every limited metered dimension, in METERED order."""
        return self._metered

    def any(self) -> bool:
        return bool(self._metered) or self.wall_clock is not None


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str      # "key" | "team"
    name: str      # as in the config (a key's name, never its secret)
    id: str        # unique in the store: "team:research", "key:research/ci-bot"
    limits: Limits
    period: str    # none | hour | day | week | month


class ScopeState(NamedTuple):
    used: Amounts = ZERO
    held: Amounts = ZERO
    first_request_at: float | None = None

    def wall_clock_used(self, now: float) -> float:
        return 0.0 if self.first_request_at is None else max(0.0, now - self.first_request_at)


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request wants before it is forwarded."""

    input_tokens: int                  # estimated (or counted) input
    input_cost_nanos: int              # that input priced
    max_tokens: int                    # as the client sent it
    output_nanos_per_token: Decimal    # at the rate that applies to this request; 0 when unpriced
    min_output: int = 1                # fewer output tokens than this cannot be forwarded (extended thinking)


class Admitted(NamedTuple):
    hold: Amounts
    output_tokens: int   # output tokens the hold covers (<= max_tokens)
    clamped: bool        # the hold covers less than the client's max_tokens


@dataclass(frozen=True, slots=True)
class Denied:
    scope: Scope
    dimension: str
    limit: int | float
    used: int | float     # used (settled + charged in flight), in the dimension's unit
    held: int | float
    needed: int | float   # what the request needed in that dimension


def output_cost(tokens: int, nanos_per_token: Decimal) -> int:
    return math.ceil(tokens * nanos_per_token)


def _output_cap(dim: str, room: int, ask: Ask) -> int | None:
    """Most output tokens that fit in `room` of one dimension; None when output does not count there."""
    if dim == "tokens":
        return room - ask.input_tokens
    if dim == "output_tokens":
        return room
    if dim == "cost_usd":
        if ask.output_nanos_per_token <= 0:
            return None if room >= ask.input_cost_nanos else -1
        spare = room - ask.input_cost_nanos
        return -1 if spare < 0 else int(spare // ask.output_nanos_per_token)
    return None


def admit(ask: Ask, scopes: Sequence[tuple[Scope, ScopeState]], now: float) -> Admitted | Denied:
    """Admit with the largest output hold every scope can cover, or name the first scope and
    dimension (key before team; SPEC order within a scope) that cannot fit input + one output token."""
    need_out = min(ask.min_output, ask.max_tokens) if ask.max_tokens >= 1 else 0
    out = ask.max_tokens
    for scope, state in scopes:
        lim = scope.limits
        for dim, limit in lim.metered():
            used, held = state.used.get(dim), state.held.get(dim)
            room = limit - used - held
            if dim == "input_tokens":
                fits = room >= ask.input_tokens
            elif dim == "steps":
                fits = room >= 1
            else:
                cap = _output_cap(dim, room, ask)
                fits = cap is None or cap >= need_out
                if cap is not None and cap < out:
                    out = cap
            if not fits:
                return Denied(scope, dim, limit, used, held, needed_to_admit(dim, ask))
        if lim.wall_clock is not None and state.wall_clock_used(now) >= lim.wall_clock:
            return Denied(scope, "wall_clock", lim.wall_clock, state.wall_clock_used(now), 0, 0)
    out = max(out, 0)
    hold = Amounts(
        tokens=ask.input_tokens + out,
        input_tokens=ask.input_tokens,
        output_tokens=out,
        cost_nanos=ask.input_cost_nanos + output_cost(out, ask.output_nanos_per_token),
        steps=1,
    )
    return Admitted(hold, out, out < ask.max_tokens)


def needed_to_admit(dim: str, ask: Ask) -> int:
    """What a request needs in a dimension to be admitted at all (a denial reports it; wall_clock: 0)."""
    need_out = min(ask.min_output, ask.max_tokens) if ask.max_tokens >= 1 else 0
    if dim == "wall_clock":
        return 0
    if dim == "input_tokens":
        return ask.input_tokens
    if dim == "steps":
        return 1
    if dim == "tokens":
        return ask.input_tokens + need_out
    if dim == "output_tokens":
        return need_out
    return ask.input_cost_nanos + output_cost(need_out, ask.output_nanos_per_token)


def check_growth(growth: Amounts, scopes: Sequence[tuple[Scope, ScopeState]], now: float) -> Denied | None:
    """May a request in flight grow its footprint by `growth`? None when every scope has room."""
    for scope, state in scopes:
        for dim, limit in scope.limits.metered():
            g = growth.get(dim)
            if g <= 0:
                continue
            used, held = state.used.get(dim), state.held.get(dim)
            if used + held + g > limit:
                return Denied(scope, dim, limit, used, held, g)
        wc = scope.limits.wall_clock
        if wc is not None and state.wall_clock_used(now) >= wc:
            return Denied(scope, "wall_clock", wc, state.wall_clock_used(now), 0, 0)
    return None


def wall_clock_deadline(scopes: Sequence[tuple[Scope, ScopeState]], now: float) -> float | None:
    """The earliest moment a wall-clock budget of these scopes runs out (its clock starts now if unstarted)."""
    deadlines = [
        (state.first_request_at if state.first_request_at is not None else now) + scope.limits.wall_clock
        for scope, state in scopes
        if scope.limits.wall_clock is not None
    ]
    return min(deadlines) if deadlines else None


def remaining(scope: Scope, state: ScopeState, now: float) -> dict[str, int | float]:
    """limit - used - held, never below 0, for every limited dimension (wall_clock in seconds)."""
    out: dict[str, int | float] = {}
    for dim, limit in scope.limits.metered():
        out[dim] = max(0, limit - state.used.get(dim) - state.held.get(dim))
    if scope.limits.wall_clock is not None:
        out["wall_clock"] = max(0.0, scope.limits.wall_clock - state.wall_clock_used(now))
    return out
