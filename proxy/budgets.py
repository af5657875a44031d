"""Config budgets -> ledger scopes."""
from __future__ import annotations

from decimal import Decimal

from proxy.auth import Caller
from proxy.config import Budget, ProxyConfig
from proxy.ledger import NANOS_PER_USD, Limits, Scope


def limits_of(budget: Budget) -> Limits:
    cost = None if budget.cost_usd is None else int(Decimal(budget.cost_usd) * NANOS_PER_USD)
    return Limits(budget.tokens, budget.input_tokens, budget.output_tokens, cost, budget.steps, budget.wall_clock)


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
        """Key first, then team: the order a 429 names them in."""
        return self.keys[(caller.team, caller.key)], self.teams[caller.team]

    @staticmethod
    def has_cost_limit(scopes: tuple[Scope, ...]) -> bool:
        return any(s.limits.cost_nanos is not None for s in scopes)
