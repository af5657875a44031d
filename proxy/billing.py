"""[pure] What a response bills: the model that served it and, when the provider itemised the
call (Anthropic's `usage.iterations`: compaction, advisor, server-tool loops, fallback), each
sampling call with its own model (docs/budgets.md, "What is charged").

Priced here rather than at the request's model: a fallback served by another model, and an
advisor iteration of a dearer one, are billed at the rates of the model that did the work. A
long-context tier is a property of one sampling call: it applies to each itemised call on its
own, and to a whole request only when it can have been one call (`whole_is_one_call`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from proxy.pricing import ModelPrice, PriceTable, cost_nanos
from proxy.usage import Usage


class Bill(NamedTuple):
    model: str | None = None                          # the model the response names
    parts: tuple[tuple[str | None, Usage], ...] = ()  # billed iterations: (their model or None, usage)
    tool_loop: bool = False  # server tools ran: the usage sums several sampling calls


NO_BILL = Bill()


def total_of(parts: tuple[tuple[str | None, Usage], ...], web_search_requests: int) -> Usage:
    """The usage a budget counts for itemised calls: the sum of the parts (top-level figures are
    not added again) plus the request's server-tool searches, which the parts do not itemise."""
    total = Usage()
    for _, usage in parts:
        total = total + usage
    return total if total.web_search_requests else total._replace(web_search_requests=web_search_requests)


def one_call_may_be_long(price: ModelPrice, betas: bytes) -> bool:
    """Whether a request's whole usage may be one sampling call past the price's long-context
    threshold: always, unless the tier needs a beta (a 1M context window) the request did not name."""
    beta = getattr(price, "long_context_beta", None)
    return beta is None or beta.encode() in (b.strip() for b in betas.split(b","))


def price_for(table: PriceTable, model: str | None, fallback: ModelPrice | None) -> ModelPrice | None:
    """The served model's price, else (unpriced or unnamed) the price admission used."""
    found = table.lookup(model) if model else None
    return found if found is not None else fallback


def bill_cost_nanos(table: PriceTable, requested: ModelPrice | None, bill: Bill, usage: Usage,
                    whole_is_one_call: bool) -> int:
    """The cost of a settled response. `usage` is its total (total_of the parts when itemised);
    `requested` prices whatever the response does not name a priced model for."""
    served = price_for(table, bill.model, requested)
    if not bill.parts:
        one_call = whole_is_one_call and not bill.tool_loop
        return 0 if served is None else cost_nanos(served, usage, long_context=one_call)
    cost = 0
    searches = usage.web_search_requests
    for model, part in bill.parts:
        price = price_for(table, model, served)
        if price is not None:
            cost += cost_nanos(price, part, long_context=True)
        searches -= part.web_search_requests
    if searches > 0 and served is not None:
        cost += cost_nanos(served, Usage(web_search_requests=searches), long_context=False)
    return cost


def _fallback_model_ids(node: Any, inside: bool = False, depth: int = 0) -> list[str]:
    """Every string under a member whose name (or an object whose `type`) speaks of a fallback."""
    if depth > 8:
        return []
    if isinstance(node, str):
        return [node] if inside else []
    if isinstance(node, list):
        return [m for item in node for m in _fallback_model_ids(item, inside, depth + 1)]
    if not isinstance(node, dict):
        return []
    here = inside or "fallback" in str(node.get("type", ""))
    return [m for k, v in node.items() for m in _fallback_model_ids(v, here or "fallback" in k, depth + 1)]


def dearest_price(table: PriceTable, requested: ModelPrice | None, body: dict[str, Any]) -> ModelPrice | None:
    """The price admission reserves at: the requested model's, or the dearest priced model a
    requested fallback chain names (its output rate, then its input rate), since any of them
    may serve (docs/budgets.md, "What is charged")."""
    if not any("fallback" in k for k in body) and "fallback" not in str(body.get("tools", "")):
        return requested
    best = requested
    for model_id in _fallback_model_ids(body):
        price = table.lookup(model_id) if len(model_id) <= 256 else None
        if price is not None and (best is None or (price.rates.output, price.rates.input)
                                  > (best.rates.output, best.rates.input)):
            best = price
    return best

