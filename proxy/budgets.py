"""Config budgets -> ledger scopes."""
from __future__ import annotations

from decimal import Decimal

from proxy.auth import Caller
from proxy.config import Budget, ProxyConfig
from proxy.ledger import DIMS, Limits, Scope

_PRICED = tuple(d.field for d in DIMS if d.counts == "cost")  # the dimensions the pricing table counts in


def limits_of(budget: Budget) -> Limits:
    """Each dimension's limit in its stored unit (a cost in USD as whole nanos, rounded down)."""
    limits: dict[str, int | None] = {}
    for d in DIMS:
        v = getattr(budget, d.name)
        limits[d.field] = None if v is None else int(Decimal(v) * d.scale) if d.scale != 1 else v
    return Limits(**limits, wall_clock=budget.wall_clock)


class Budgets:
    def __init__(self, config: ProxyConfig) -> None:
        self.teams: dict[str, Scope] = {}
        self.keys: dict[tuple[str, str], Scope] = {}
        for team_name, team in config.teams.items():
            self.teams[team_name] = Scope("team", team_name, f"team:{team_name}", limits_of(team.budget),
                                          team.budget.period)
            for key_name, key in team.keys.items():
                self.keys[(team_name, key_name)] = Scope(
                    "key", key_name, f"key:{team_name}/{key_name}", limits_of(key.budget), key.budget.period)

    def scopes_for(self, caller: Caller) -> tuple[Scope, Scope]:
        """Key first, then team: the order a 429 names them in. A runtime key carries its own scope."""
        return caller.scope or self.keys[(caller.team, caller.key)], self.teams[caller.team]

    @staticmethod
    def has_cost_limit(scopes: tuple[Scope, ...]) -> bool:
        """A limit in a dimension the pricing table counts in (an unpriced model cannot be held against it)."""
        return any(getattr(s.limits, f) is not None for s in scopes for f in _PRICED)
