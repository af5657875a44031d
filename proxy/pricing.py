"""[pure] Usage x price table -> money.

Prices are USD per million tokens, held as `Decimal`; money leaves this module as an
integer number of nano-dollars (1 USD = 10**9 nanos), so $X per Mtok is X * 1000 nanos
per token. Every sum is exact and only the final total is rounded, always up: the
proxy never undercharges by a rounding step.

The caller reads and parses the YAML; `parse_price_table` validates the parsed data
and lists every problem with its YAML path (`models.claude-x.input`).

Model ids resolve exactly, never by prefix (docs/configuration.md `pricing`): `PriceTable.lookup` documents the rules.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Context, Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .usage import Usage

NANOS_PER_USD = 10**9
_NANOS_PER_TOKEN_PER_RATE = Decimal(1000)         # $1 per Mtok = 1000 nanos per token
_NANOS_PER_SEARCH_PER_RATE = Decimal(10**6)      # $1 per 1k searches = 10**6 nanos per search
CACHE_WRITE_5M_FACTOR = Decimal("1.25")
CACHE_WRITE_1H_FACTOR = Decimal(2)
CACHE_READ_FACTOR = Decimal("0.1")
INPUT_KINDS = ("input", "cache_write_5m", "cache_write_1h", "cache_read")
UNLIMITED = sys.maxsize                           # output_tokens_affordable when output is free

# Rates are bounded (<= 10**6, <= 12 decimal places), so with 120 digits every product
# and sum of realistic token counts is exact; the context never has to round.
_EXACT = Context(prec=120)
_LOOKUP_CACHE_SIZE = 4096


def _scaled(values: tuple[Decimal, ...]) -> tuple[int, tuple[int, ...]]:
    """(D, n) with n[i] / D == values[i] exactly, D a power of ten: integer arithmetic is much
    faster than Decimal on the hot path (cost_nanos runs at every settle and stream push)."""
    places = max([0, *(-int(v.as_tuple().exponent) for v in values if v.is_finite())])
    den = 10 ** places
    nums = tuple(int(v.scaleb(places, _EXACT)) for v in values)
    if any(Decimal(n) != v.scaleb(places, _EXACT) for n, v in zip(nums, values)):
        raise ValueError("a rate is not a finite decimal")
    return den, nums


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    # nanos per token x _den, as integers (input, output, cache_write_5m, cache_write_1h, cache_read)
    _den: int = field(init=False, repr=False, compare=False)
    _nanos: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        den, nums = _scaled(tuple(v * _NANOS_PER_TOKEN_PER_RATE for v in
                                  (self.input, self.output, self.cache_write_5m, self.cache_write_1h,
                                   self.cache_read)))
        object.__setattr__(self, "_den", den)
        object.__setattr__(self, "_nanos", nums)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    rates: Rates
    web_search_per_1k: Decimal = Decimal(0)
    long_context_above: int | None = None    # threshold on total input tokens
    long_context: Rates | None = None        # rates for the whole request above it
    model_id: str = field(default="", compare=False)  # the table's id: the only model a metric label names
    max_output_tokens: int | None = None     # the provider's output limit for one request
    long_context_beta: str | None = None     # the anthropic-beta a request needs to reach the long tier
    source: str | None = field(default=None, compare=False)   # where the figures come from
    checked: date | None = field(default=None, compare=False)  # when they were last checked
    _search_den: int = field(init=False, repr=False, compare=False)
    _search_nanos: int = field(init=False, repr=False, compare=False)  # nanos per search x _search_den

    def __post_init__(self) -> None:
        den, (nanos,) = _scaled((self.web_search_per_1k * _NANOS_PER_SEARCH_PER_RATE,))
        object.__setattr__(self, "_search_den", den)
        object.__setattr__(self, "_search_nanos", nanos)

    def rates_for(self, total_input_tokens: int) -> Rates:
        """Rates for a request whose input (incl. cache writes and reads) totals this many tokens;
        a request exactly at the threshold is not above it."""
        if self.long_context is not None and self.long_context_above is not None:
            if total_input_tokens > self.long_context_above:
                return self.long_context
        return self.rates


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Model id -> price. `lookup` tries, in order:

    1. the id itself, as a model or as an explicit alias (an alias names one exact id);
    2. the id without a trailing date, `-YYYYMMDD` or `-YYYY-MM-DD`
       (`claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5`), as a model or an alias.

    Never by prefix: `gpt-5-nano` is not `gpt-5`, `o3-mini` is not `o3`. A dated id that has a
    price of its own (`gpt-4o-2024-05-13`) has its own row, and the exact row wins."""

    checked: date | None
    models: Mapping[str, ModelPrice]
    aliases: Mapping[str, str] = field(default_factory=dict)   # alias id -> model id, validated
    _cache: dict[str, ModelPrice | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def lookup(self, model: str) -> ModelPrice | None:
        if not isinstance(model, str):
            return None
        exact = self.models.get(model)
        if exact is not None:
            return exact
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._resolve(model)
        if len(self._cache) >= _LOOKUP_CACHE_SIZE:   # client-chosen ids must not grow memory
            self._cache.clear()
        self._cache[model] = found
        return found

    def _resolve(self, model: str) -> ModelPrice | None:
        target = self.aliases.get(model)
        if target is not None:
            return self.models.get(target)
        undated = strip_date_suffix(model)
        if undated is None:
            return None
        found = self.models.get(undated)
        if found is None and (target := self.aliases.get(undated)) is not None:
            found = self.models.get(target)
        return found

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.lookup(model) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)


def strip_date_suffix(model: str) -> str | None:
    """`model` without a trailing `-YYYYMMDD` or `-YYYY-MM-DD` that is a calendar date, else None."""
    if len(model) > 9 and model[-9] == "-" and _digits(model[-8:]):
        y, m, d, cut = model[-8:-4], model[-4:-2], model[-2:], 9
    elif (len(model) > 11 and model[-11] == "-" and model[-6] == "-" and model[-3] == "-"
          and _digits(model[-10:-6]) and _digits(model[-5:-3]) and _digits(model[-2:])):
        y, m, d, cut = model[-10:-6], model[-5:-3], model[-2:], 11
    else:
        return None
    try:
        date(int(y), int(m), int(d))
    except ValueError:
        return None
    return model[:-cut]


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


class PricingError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path or '<root>'}: {msg}" for path, msg in problems))


# --- money -------------------------------------------------------------------------


def cost_nanos(price: ModelPrice, usage: Usage, long_context: bool = True) -> int:
    """Exact cost of one call, rounded up to a whole nano-dollar. Above the long-context
    threshold every token of the request, output included, is priced at the long rates;
    `long_context=False`: the usage is not one sampling call's, so the tier never applies."""
    r = price.rates_for(usage.total_input_tokens) if long_context else price.rates
    n_in, n_out, n_5m, n_1h, n_read = r._nanos
    tokens = (usage.input_tokens * n_in + usage.output_tokens * n_out + usage.cache_write_5m_tokens * n_5m
              + usage.cache_write_1h_tokens * n_1h + usage.cache_read_tokens * n_read)
    den = r._den
    if usage.web_search_requests:
        sden = price._search_den
        tokens = tokens * sden + usage.web_search_requests * price._search_nanos * den
        den *= sden
    return -(-tokens // den)


def input_cost_nanos(price: ModelPrice, input_tokens: int, kind: str = "input") -> int:
    """Cost of `input_tokens` of one kind, at the rates for a request of that total input
    size (admission prices its whole input estimate this way)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(INPUT_KINDS)}")
    r = price.rates_for(input_tokens)
    nanos = r._nanos[(0, 2, 3, 4)[INPUT_KINDS.index(kind)]]
    return -(-(input_tokens * nanos) // r._den)


def output_nanos_per_token(price: ModelPrice, total_input_tokens: int) -> Decimal:
    """Exact nano-dollars per output token for a request of this input size."""
    return _EXACT.multiply(price.rates_for(total_input_tokens).output, _NANOS_PER_TOKEN_PER_RATE)


def output_tokens_affordable(price: ModelPrice, budget_nanos: int, total_input_tokens: int) -> int:
    """Most output tokens n with ceil(n x rate) <= budget_nanos; 0 when the budget is not
    positive, UNLIMITED when output is free."""
    if budget_nanos <= 0:
        return 0
    per_token = output_nanos_per_token(price, total_input_tokens)
    if per_token == 0:
        return UNLIMITED
    # The budget is whole nanos, so ceil(n x rate) <= budget exactly when n x rate <= budget.
    return int(_EXACT.divide_int(budget_nanos, per_token))


def output_tokens_within(price: ModelPrice, spare_nanos: int, total_input_tokens: int) -> int | None:
    """spare_nanos / the output rate for a request of this input size, truncated toward zero (as
    Decimal's //); None when output is free. In integers: a stream's relay works this out at each
    decision, and Decimal division cost several times as much."""
    r = price.rates_for(total_input_tokens)
    per_token = r._nanos[1]  # output nanos per token x r._den
    if per_token <= 0:
        return None
    scaled = spare_nanos * r._den
    return scaled // per_token if scaled >= 0 else -(-scaled // per_token)


# --- parsing -----------------------------------------------------------------------

_Rate = Annotated[Decimal, Field(ge=0, le=1_000_000, decimal_places=12)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RatesIn(_Strict):
    input: _Rate
    output: _Rate
    cache_write_5m: _Rate | None = None
    cache_write_1h: _Rate | None = None
    cache_read: _Rate | None = None

    def rates(self) -> Rates:
        def default(value: Decimal | None, factor: Decimal) -> Decimal:
            return value if value is not None else self.input * factor

        return Rates(
            input=self.input,
            output=self.output,
            cache_write_5m=default(self.cache_write_5m, CACHE_WRITE_5M_FACTOR),
            cache_write_1h=default(self.cache_write_1h, CACHE_WRITE_1H_FACTOR),
            cache_read=default(self.cache_read, CACHE_READ_FACTOR),
        )


_Id = Annotated[str, Field(min_length=1)]


class _LongContextIn(_RatesIn):
    above_input_tokens: int = Field(ge=0, strict=True)
    requires_beta: _Id | None = None    # the anthropic-beta a request names to get this context


class _ModelIn(_RatesIn):
    web_search_per_1k: _Rate | None = None
    long_context: _LongContextIn | None = None
    # Optional in a user's file; every entry of the shipped table carries all three.
    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    source: _Id | None = None
    checked: date | None = None

    def price(self, model_id: str) -> ModelPrice:
        lc = self.long_context
        return ModelPrice(
            rates=self.rates(),
            web_search_per_1k=self.web_search_per_1k if self.web_search_per_1k is not None else Decimal(0),
            long_context_above=lc.above_input_tokens if lc else None,
            long_context=lc.rates() if lc else None,
            model_id=model_id,
            max_output_tokens=self.max_output_tokens,
            long_context_beta=lc.requires_beta if lc else None,
            source=self.source,
            checked=self.checked,
        )


class _TableIn(_Strict):
    checked: date | None = None
    models: dict[str, _ModelIn]
    aliases: dict[str, str] = {}

    @field_validator("models")
    @classmethod
    def _ids_not_blank(cls, v: dict[str, _ModelIn]) -> dict[str, _ModelIn]:
        if any(not k.strip() for k in v):
            raise ValueError("model ids must not be empty")
        return v


def _alias_problems(data: dict) -> list[tuple[str, str]]:
    """What pydantic cannot see: an alias must name a model of this table and must not be one."""
    models, aliases = data.get("models"), data.get("aliases")
    if not isinstance(models, dict) or not isinstance(aliases, dict):
        return []
    problems = []
    for alias, target in aliases.items():
        if not isinstance(alias, str) or not isinstance(target, str):
            continue                                 # a type problem pydantic reports
        if not alias.strip():
            problems.append(("aliases", "alias ids must not be empty"))
        elif alias in models:
            problems.append((f"aliases.{alias}", "shadows a model id: an alias may not replace a model's price"))
        elif target not in models:
            problems.append((f"aliases.{alias}", f"its target {target!r} is not a model in this table"))
    return problems


_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
}


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_input=False, include_url=False):
        loc = [str(p) for p in e["loc"]]
        ctx = e.get("ctx") or {}
        if e["type"] in ("greater_than_equal", "less_than_equal"):
            msg = f"must be >= {ctx['ge']}" if "ge" in ctx else f"must be <= {ctx['le']}"
        else:
            msg = _MESSAGES.get(e["type"], e["msg"].removeprefix("Value error, "))
        if loc and loc[-1] == "[key]":
            loc, msg = loc[:-1], ("alias" if loc[0] == "aliases" else "model id") + " must be a string"
        problems.append((".".join(loc), msg))
    return problems


def parse_price_table(data: Any) -> PriceTable:
    """Validate a parsed pricing YAML (docs/configuration.md `pricing`); raise PricingError listing every problem."""
    if not isinstance(data, dict):
        raise PricingError([("", "the pricing file must be a YAML mapping")])
    problems = _alias_problems(data)
    try:
        table = _TableIn.model_validate(data)
    except ValidationError as err:
        raise PricingError(_problems(err) + problems) from None
    if problems:
        raise PricingError(problems)
    return PriceTable(table.checked, {k: m.price(k) for k, m in table.models.items()}, dict(table.aliases))
