"""[pure] Run scopes: one agent run's own budget under a key (docs/budgets.md, "Runs").

A request naming `x-budget-run: RUN_ID` is charged to the run scope RUN_ID of its key as well as
to the key and the team, in the same reservation. The scope exists from its first request (its
wall clock starts there) and is forgotten `admission.run_ttl` after its last one."""
from __future__ import annotations

import re
from typing import Any

from proxy.budgets import limits_of
from proxy.errors import InvalidRequest
from proxy.ledger import Limits, Scope

RUN_HEADER = b"x-budget-run"
_RUN_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def run_id_of(headers: dict[bytes, bytes], required: bool) -> str | None:
    """The request's run id, validated on every key; None when it names none (400 when the key
    requires one)."""
    raw = headers.get(RUN_HEADER)
    if raw is None:
        if required:
            raise InvalidRequest("This key requires an x-budget-run header naming the agent run "
                                 "(1-128 characters of A-Z a-z 0-9 . _ : -).")
        return None
    if _RUN_ID.fullmatch(raw) is None:
        raise InvalidRequest("x-budget-run must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return raw.decode("ascii")


def run_scope_id(team: str, key: str, run_id: str) -> str:
    return f"run:{team}/{key}/{run_id}"


class RunBudgets:
    """Per config key: its run budget's limits and whether a run id is required."""

    def __init__(self, config: Any) -> None:
        self.ttl: float = config.admission.run_ttl  # every run scope carries it to the store (Scope.ttl)
        self._keys: dict[tuple[str, str], tuple[Limits | None, bool]] = {}
        for team_name, team in config.teams.items():
            for key_name, key in team.keys.items():
                limits = None if key.run_budget is None else limits_of(key.run_budget)
                self._keys[(team_name, key_name)] = (limits, key.runs == "required")

    def with_run(self, caller: Any, headers: dict[bytes, bytes], scopes: tuple[Scope, ...]) -> tuple[Scope, ...]:
        """`scopes` with the request's run scope first when its key has a run budget (the order a
        429 and /budget name them in); the header is validated on every key."""
        if caller.scope is not None:  # a runtime key carries its run limits (proxy/runtime_keys.py)
            limits, required = caller.run_limits, caller.runs_required
        else:
            limits, required = self._keys.get((caller.team, caller.key), (None, False))
        run_id = run_id_of(headers, required)
        if run_id is None or limits is None:
            return scopes
        return (Scope("run", run_id, run_scope_id(caller.team, caller.key, run_id), limits, "none", self.ttl),
                *scopes)

    def limits_for(self, team: str, key: str) -> Limits | None:
        """A config key's run limits (None: no run budget, or not a config key)."""
        return self._keys.get((team, key), (None, False))[0]
