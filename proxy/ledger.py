"""[pure] The one place that decides: admit or deny, how much to hold, whether a hold may grow.

Vocabulary, per scope (a key or a team) and period:
  used  = settled charges + what requests in flight have been charged so far
  held  = reserved by requests in flight but not yet charged
A request's footprint on a scope is max(hold, charged) per dimension; admission and
growth both require  used + held + new <= limit  in every limited dimension of every
scope, so two requests can never both take the last of a budget.

The dimensions are proxy/dimensions.py's: Amounts, Limits and the admission rules below are
derived from that declaration when this module is imported (docs/budgets.md).

Money is integer nano-dollars. Nothing here does I/O or reads a clock: `now` is passed in.
"""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field, make_dataclass
from decimal import Decimal
from typing import Any, NamedTuple, Sequence

from proxy import dimensions as declared
from proxy.dimensions import Dimension, spelled

DIMS: tuple[Dimension, ...] = declared.METERED   # the metered dimensions, in denial order
METERED = tuple(d.name for d in DIMS)
DIMENSIONS = METERED + (declared.WALL_CLOCK.name,)
FIELDS = tuple(d.field for d in DIMS)            # Amounts' and Limits' attributes, SQLite's columns
BY_NAME = {d.name: d for d in (*DIMS, declared.WALL_CLOCK)}
INDEX = {**{d.field: i for i, d in enumerate(DIMS)}, **{d.name: i for i, d in enumerate(DIMS)}}
NANOS_PER_USD = 10**9
# (dimension, header, scale) of each dimension sent as x-budget-remaining-* after admission, in METERED order
REMAINING_HEADERS = tuple((d.name, b"x-budget-remaining-" + d.header.encode(), d.scale) for d in DIMS if d.header)
_DIGITS = {d.name: len(str(d.scale)) - 1 for d in DIMS if d.scale != 1}  # (a power of ten)


def in_unit(dim: str, v: int | float) -> int | float:
    """A dimension's amount as users see it (cost in USD), from its stored unit (nanos)."""
    digits = _DIGITS.get(dim)
    return v if digits is None else round(v / BY_NAME[dim].scale, digits)


def output_cost(tokens: int, nanos_per_token: Decimal) -> int:
    return math.ceil(tokens * nanos_per_token)


# --- Amounts: generated from the declaration -------------------------------------------------------
# Python spellings of what a request needs (Dimension.base, per_output) and counts (counts).
_BASE = {"input_tokens": "ask.input_tokens", "input_cost_nanos": "ask.input_cost_nanos", "one": "1", "zero": "0"}
_PER = {"token": "out", "rate": "output_cost(out, ask.output_nanos_per_token)", "zero": "0"}
_COUNTS = {"cost": "cost_nanos", "steps": "steps"}


def _amount_functions(dims: tuple[Dimension, ...]) -> str:
    """The source of Amounts' arithmetic and of the ledger's per-request amounts, unrolled over the
    dimensions: every request builds a dozen Amounts, and a loop over the fields costs up to twice
    as much. Each function is one tuple build."""
    n = len(dims)
    a, b = spelled("a{i}", n) + ",", spelled("b{i}", n) + ","
    both = f"    {a} = self\n    {b} = o\n"
    need = ", ".join(_BASE[d.base] for d in dims)
    hold = ", ".join(" + ".join(x for x in (_BASE[d.base], _PER[d.per_output]) if x != "0") or "0" for d in dims)
    counts = ", ".join(_COUNTS.get(d.counts, "usage." + d.counts) for d in dims)
    return (f"def add(self, o):\n{both}    return _new(Amounts, ({spelled('a{i} + b{i}', n)},))\n"
            f"def sub(self, o):\n{both}    return _new(Amounts, ({spelled('a{i} - b{i}', n)},))\n"
            f"def max_(self, o):\n{both}    return _new(Amounts, ({spelled('a{i} if a{i} >= b{i} else b{i}', n)},))\n"
            f"def within(self, o):\n{both}    return {spelled('a{i} <= b{i}', n, ' and ')}\n"
            f"def nonneg(self):\n    {a} = self\n    if {spelled('a{i} >= 0', n, ' and ')}:\n        return self\n"
            f"    return _new(Amounts, ({spelled('a{i} if a{i} > 0 else 0', n)},))\n"
            f"def of_usage(cls, usage, cost_nanos, steps):\n    return _new(cls, ({counts},))\n"
            f"def bases(ask):\n    return ({need},)\n"
            f"def hold_of(ask, out):\n    return _new(Amounts, ({hold},))\n")


_generated: dict[str, Any] = {"_new": tuple.__new__, "output_cost": output_cost}
exec(_amount_functions(DIMS), _generated)


class Amounts(namedtuple("Amounts", FIELDS, defaults=(0,) * len(FIELDS))):  # type: ignore[misc]
    """Per metered dimension (FIELDS: tokens, nanos, steps...). Immutable; a tuple underneath because a
    frozen dataclass is dearer to build and every request builds a dozen of these. Arithmetic builds
    the result with tuple.__new__ directly: no per-field keyword handling."""

    __slots__ = ()
    __add__ = _generated["add"]
    __sub__ = _generated["sub"]
    max = _generated["max_"]
    nonneg = _generated["nonneg"]           # every dimension at least 0
    within = _generated["within"]           # every dimension <= o's (self.max(o) == o, without building it)
    of_usage = classmethod(_generated["of_usage"])  # (usage, cost_nanos, steps): what a request counts

    def get(self, dim: str) -> int:
        return self[INDEX[dim]]

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(self)


_generated["Amounts"] = Amounts
_bases = _generated["bases"]       # (ask) -> per dimension, what a request needs before any output
_hold_of = _generated["hold_of"]   # (ask, out) -> the hold of a request admitted with `out` output tokens
_new = tuple.__new__
ZERO = Amounts()
# per dimension: 0 when output does not count, 1 when each token does, 2 when its price does
_PER_KIND = tuple(("zero", "token", "rate").index(d.per_output) for d in DIMS)


# --- Limits: generated from the declaration ---------------------------------------------------------
class _LimitsBase:
    __slots__ = ()

    def __post_init__(self) -> None:
        """Work out once what every admission and settlement reads for each scope."""
        given = [(i, d.name, getattr(self, d.field)) for i, d in enumerate(DIMS)]
        given = [(i, name, v) for i, name, v in given if v is not None]
        object.__setattr__(self, "_metered", tuple((name, v) for _, name, v in given))
        object.__setattr__(self, "_indexed", tuple(given))
        object.__setattr__(self, "_reported", tuple(g for g in given if DIMS[g[0]].header))

    def get(self: Any, dim: str) -> int | float | None:
        d = BY_NAME.get(dim)
        return getattr(self, dim if d is None else d.field)

    def metered(self: Any) -> tuple[tuple[str, int], ...]:
        """(dimension, limit) for every limited metered dimension, in METERED order."""
        return self._metered  # type: ignore[no-any-return]


def _private() -> Any:
    return field(init=False, repr=False, compare=False, default=())


Limits: Any = make_dataclass(
    "Limits",
    [(f, "int | None", field(default=None)) for f in FIELDS]
    + [("wall_clock", "float | None", field(default=None)),
       ("_metered", "tuple", _private()),   # (name, limit) of every limited metered dimension
       ("_indexed", "tuple", _private()),   # (index, name, limit), the same
       ("_reported", "tuple", _private())],  # (index, name, limit) of those sent as x-budget-remaining-*
    bases=(_LimitsBase,), frozen=True, slots=True)
Limits.__module__ = __name__
Limits.__doc__ = """A scope's limits, per metered dimension in its stored unit (FIELDS: tokens=, cost_nanos=, ...) and
wall_clock= seconds since the first request of the period; None: no limit. Frozen."""


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str      # "key" | "team" | "run"
    name: str      # as in the config (a key's name, never its secret); a run's: its run id
    id: str        # unique in the store: "team:research", "key:research/ci-bot", "run:research/ci-bot/RUN"
    limits: Limits
    period: str    # none | hour | day | week | month
    # A run's (proxy/runs.py): the store forgets the scope this many seconds after its last request
    # (admission.run_ttl). None, every other scope: kept (a period's totals for RETENTION on Redis).
    ttl: float | None = None


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


def admit(ask: Ask, scopes: Sequence[tuple[Scope, ScopeState]], now: float) -> Admitted | Denied:
    """Admit with the largest output hold every scope can cover, or name the first scope and
    dimension (key before team; METERED order within a scope) that cannot fit input + one output token.
    Per dimension: `room` must cover what the request needs before output (Dimension.base), and
    where output counts, the most output tokens the rest covers caps the hold."""
    need_out = min(ask.min_output, ask.max_tokens) if ask.max_tokens >= 1 else 0
    out = ask.max_tokens
    rate = ask.output_nanos_per_token
    base = _bases(ask)
    for scope, state in scopes:
        used, held = state.used, state.held
        for i, dim, limit in scope.limits._indexed:
            room = limit - used[i] - held[i] - base[i]
            kind = _PER_KIND[i]
            if kind == 0:
                fits = room >= 0
            else:
                if kind == 1:
                    cap: int | None = room
                elif rate <= 0:
                    cap = None if room >= 0 else -1
                else:
                    cap = -1 if room < 0 else int(room // rate)
                fits = cap is None or cap >= need_out
                if cap is not None and cap < out:
                    out = cap
            if not fits:
                return Denied(scope, dim, limit, used[i], held[i], needed_to_admit(dim, ask))
        wc = scope.limits.wall_clock
        if wc is not None and state.wall_clock_used(now) >= wc:
            return Denied(scope, "wall_clock", wc, state.wall_clock_used(now), 0, 0)
    out = max(out, 0)
    return Admitted(_hold_of(ask, out), out, out < ask.max_tokens)


def needed_to_admit(dim: str, ask: Ask) -> int:
    """What a request needs in a dimension to be admitted at all (a denial reports it; wall_clock: 0)."""
    i = INDEX.get(dim)
    if i is None:
        return 0
    need_out = min(ask.min_output, ask.max_tokens) if ask.max_tokens >= 1 else 0
    return _hold_of(ask, need_out)[i]


def check_growth(growth: Amounts, scopes: Sequence[tuple[Scope, ScopeState]], now: float) -> Denied | None:
    """May a request in flight grow its footprint by `growth`? None when every scope has room."""
    for scope, state in scopes:
        used, held = state.used, state.held
        for i, dim, limit in scope.limits._indexed:
            g = growth[i]
            if g > 0 and used[i] + held[i] + g > limit:
                return Denied(scope, dim, limit, used[i], held[i], g)
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
    used, held = state.used, state.held
    for i, dim, limit in scope.limits._indexed:
        out[dim] = max(0, limit - used[i] - held[i])
    if scope.limits.wall_clock is not None:
        out["wall_clock"] = max(0.0, scope.limits.wall_clock - state.wall_clock_used(now))
    return out


def tightest_remaining(scopes: Sequence[Scope], states: Sequence[ScopeState]) -> dict[str, int]:
    """Per dimension sent as x-budget-remaining-*, the least limit - used - held across scopes, never below 0."""
    out: dict[str, int] = {}
    for scope, state in zip(scopes, states):
        used, held = state.used, state.held
        for i, dim, limit in scope.limits._reported:
            room = limit - used[i] - held[i]
            if room < 0:
                room = 0
            if dim not in out or room < out[dim]:
                out[dim] = room
    return out
