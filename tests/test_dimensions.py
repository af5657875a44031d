"""The budget dimensions are declared once (proxy/dimensions.py) and everything else derives from the
declaration: Amounts and Limits, the config's Budget, the SQLite columns and statements, the Redis
packing and Lua loops, views, denials, headers, dashboard and metrics.

The proof: test_the_store_contract_holds_with_an_added_dimension runs the whole store contract
suite (tests/test_store_contract.py, on memory, SQLite and Redis) and this file in a fresh pytest
whose declaration has one more dimension, added by a fixture (a plugin loaded before anything
derives from the declaration). Every other test here reads the declaration as it is, so in that
run they check the added dimension: the last one declared is enforced by every store, a ledger
written before it was declared keeps working, and every reader lists it.
"""
from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy import dimensions
from proxy.auth import Caller
from proxy.budgets import limits_of
from proxy.config import Budget
from proxy.dashboard import DIMS as DASHBOARD_DIMS
from proxy.dashboard import fmt
from proxy.denials import budget_error
from proxy.ledger import (DIMENSIONS, DIMS, FIELDS, METERED, REMAINING_HEADERS, ZERO, Amounts, Ask, Denied, Limits,
                          Scope, ScopeState, tightest_remaining)
from proxy.metrics import Metrics
from proxy.store import open_store
from proxy.store.base import Reservation, UsageRow
from proxy.store.redis_scripts import LEGACY_DIMS, SCRIPTS
from proxy.store.sqlite import SCHEMA, SqliteStore
from proxy.views import scope_view
from tests.test_store_contract import REDIS_DB, require_redis

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_718_000_000.0
N = len(DIMS)
LAST = DIMS[-1]  # the dimension declared last: the added one, in the run with one more

# The fixture's plugin: one more dimension, appended to the declaration before any module reads it.
ADDED_DIMENSION_PLUGIN = '''
"""A throwaway budget dimension, "requests": a request holds 1 and counts 1 when it produced a
message (as steps do). Loaded with -p, before the tests and their imports are collected."""
import sys
from pathlib import Path

assert "proxy.ledger" not in sys.modules, "the declaration must grow before anything derives from it"
from proxy import dimensions

dimensions.METERED = dimensions.METERED + (
    dimensions.Dimension("requests", "requests", header="requests", base="one", counts="steps", noun="request"),)


def pytest_sessionfinish(session):
    from proxy.ledger import METERED
    (Path(__file__).parent / "declared.txt").write_text(" ".join(METERED))
'''


@pytest.fixture
def added_dimension(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a pytest run with one more dimension declared, and the file that run
    writes its declared dimensions to."""
    (tmp_path / "added_dimension.py").write_text(ADDED_DIMENSION_PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    return env, tmp_path / "declared.txt"


def test_the_store_contract_holds_with_an_added_dimension(added_dimension: tuple[dict[str, str], Path]) -> None:
    if "requests" in METERED:
        pytest.skip("this is the run with the added dimension")
    env, declared = added_dimension
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "added_dimension", "-p", "no:cacheprovider",
         "tests/test_store_contract.py", "tests/test_dimensions.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert declared.read_text().split() == [*METERED, "requests"]
    assert " passed" in run.stdout and " failed" not in run.stdout


# --- derivations -----------------------------------------------------------------------------------------

def test_the_ledger_config_and_readers_follow_the_declaration() -> None:
    assert METERED == tuple(d.name for d in dimensions.METERED)
    assert DIMENSIONS == (*METERED, "wall_clock")
    assert Amounts._fields == FIELDS and len(ZERO) == N
    assert [f for f in Limits.__dataclass_fields__ if not f.startswith("_")] == [*FIELDS, "wall_clock"]
    assert list(Budget.model_fields) == [*METERED, "wall_clock", "period"]
    assert DASHBOARD_DIMS == DIMENSIONS
    assert [h for h, *_ in REMAINING_HEADERS] == [d.name for d in DIMS if d.header]


def test_the_store_layouts_follow_the_declaration() -> None:
    for table in ("totals", "inflight"):
        create = SCHEMA[SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {table}"):]
        create = create[:create.index(";")]
        assert all(f" {c} INTEGER NOT NULL DEFAULT 0" in create for c in FIELDS), table
    for name, src in SCRIPTS.items():
        assert "$" not in src, name  # every placeholder filled
        loops = [line.split("for d = 1, ")[1].split()[0] for line in src.splitlines() if "for d = 1, " in line]
        assert loops and set(loops) <= {str(N), str(N + 1)}, (name, loops)  # N dimensions, + the wall clock
        assert f"local TF = '<{'d' * (3 * N + 1)}'" in src


def test_a_budget_limits_every_dimension_in_its_stored_unit() -> None:
    budget = Budget(**{d.name: (Decimal("1.5") if d.scale != 1 else 7) for d in DIMS}, wall_clock="2m")
    limits = limits_of(budget)
    assert [limits.get(d.name) for d in DIMS] == [int(Decimal("1.5") * d.scale) if d.scale != 1 else 7 for d in DIMS]
    assert limits.wall_clock == 120.0
    with pytest.raises(ValueError):
        Budget(**{LAST.name: -1})


def test_views_denials_headers_dashboard_and_metrics_name_every_dimension() -> None:
    limits = Limits(**{f: 10 for f in FIELDS})
    s = Scope("key", "k", "key:t/k", limits, "none")
    state = ScopeState(Amounts(*range(1, N + 1)), Amounts(*([1] * N)), T0)
    view = scope_view(s, state, T0 + 5)
    assert list(view["used"]) == list(DIMENSIONS) and list(view["held"]) == list(METERED)
    assert list(view["limit"]) == list(METERED) and list(view["remaining"]) == list(METERED)
    assert tightest_remaining([s], [state]).keys() == {d.name for d in DIMS if d.header}
    denied = Denied(s, LAST.name, 10, 10, 0, 1)
    err = budget_error(denied, Caller("t", "k", None), T0)
    assert err.headers["x-budget-exceeded"] == LAST.name and LAST.name in str(err.budget)
    if LAST.noun:
        assert f"{LAST.noun} budget of key 'k' of team 't' is spent: 10 of 10 {LAST.noun}s used" in str(err)
    assert fmt(LAST.name, 1234) == "1,234"
    metrics = Metrics()
    metrics.set_remaining([s], [state], T0)
    assert f'dimension="{LAST.name}"' in metrics.exposition().decode()


# --- the last dimension declared, in every store ---------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "redis":
        require_redis()
        url = f"redis://127.0.0.1:6379/{REDIS_DB}?prefix=bp-test-{uuid.uuid4().hex[:12]}:"
    else:
        url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    s: Any = open_store(url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def only(dim: Any, v: int) -> Amounts:
    return Amounts(**{dim.field: v})


async def test_the_last_dimension_is_enforced_by_every_store(store: Any) -> None:
    """Admission, remaining, growth and settlement in the dimension declared last (a count that
    needs 1 a request: steps, or the added dimension)."""
    assert (LAST.base, LAST.per_output) == ("one", "zero")
    k = Scope("key", "k", "key:t/k", Limits(**{LAST.field: 3}), "none")
    a = Ask(10, 0, 10, Decimal(0))
    first = await store.reserve([k], a, T0, "d-1")
    assert isinstance(first, Reservation) and first.hold.get(LAST.name) == 1
    assert first.remaining == ({LAST.name: 2} if LAST.header else {})
    second = await store.reserve([k], a, T0, "d-2")
    assert isinstance(second, Reservation)
    grown = await store.charge(second, second.hold + only(LAST, 1), T0)  # 2: the last of the budget
    assert isinstance(grown, Reservation) and grown.hold.get(LAST.name) == 2
    denied = await store.reserve([k], a, T0, "d-3")
    assert isinstance(denied, Denied) and (denied.dimension, denied.limit, denied.used, denied.held) == (
        LAST.name, 3, 2, 1)
    refused = await store.charge(first, first.hold + only(LAST, 1), T0)
    assert isinstance(refused, Denied) and (refused.dimension, refused.needed) == (LAST.name, 1)
    await store.settle(first, only(LAST, 1), None)
    await store.settle(grown, only(LAST, 2), None)
    assert (await store.states([k], T0))[0] == ScopeState(only(LAST, 3), ZERO, T0)


# --- a ledger written before the last dimension was declared ---------------------------------------------

async def test_a_sqlite_ledger_gains_the_column_of_a_dimension_declared_since(tmp_path: Path) -> None:
    path, old = tmp_path / "ledger.db", FIELDS[:-1]
    db = sqlite3.connect(path)
    db.executescript(f"""
        CREATE TABLE totals (scope_id TEXT NOT NULL, period_start REAL NOT NULL,
          {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in old)}, first_request_at REAL,
          PRIMARY KEY (scope_id, period_start));
        CREATE TABLE inflight (id TEXT PRIMARY KEY, owner TEXT NOT NULL, team TEXT NOT NULL, key TEXT NOT NULL,
          model TEXT NOT NULL, route TEXT NOT NULL, scopes TEXT NOT NULL, started REAL NOT NULL,
          updated REAL NOT NULL, {", ".join(f"{c} INTEGER NOT NULL" for c in old)});
        INSERT INTO totals VALUES ('key:t/k', 0, {", ".join(str(i + 1) for i in range(len(old)))}, {T0});""")
    db.commit()
    db.close()
    k = Scope("key", "k", "key:t/k", Limits(), "none")
    s = SqliteStore(str(path))
    await s.open()
    try:
        assert await s.states([k], T0) == [ScopeState(Amounts(*range(1, N), 0), ZERO, T0)]
        res = await s.reserve([k], Ask(10, 0, 10, Decimal(0)), T0, "r")
        assert isinstance(res, Reservation)
        res = await s.charge(res, res.hold, T0)  # a running charge: a row of inflight, in every column
        await s.settle(res, only(LAST, 5), None)
    finally:
        await s.close()
    again = SqliteStore(str(path))
    await again.open()
    try:
        assert await again.states([k], T0) == [ScopeState(Amounts(*range(1, N), 0) + only(LAST, 5), ZERO, T0)]
    finally:
        await again.close()


def _record(code: int, k: int, hold: list[float], charged: list[float], totals: list[tuple[str, float]]) -> bytes:
    """A reservation record as the Redis scripts pack it (redis_scripts.py: RF, then '<Ic0d' per scope,
    then team and key '<Ic0Ic0'), for k dimensions."""
    out = struct.pack("<BB" + "d" * (2 * k + 2), code, len(totals), *hold, *charged, 3.0, T0 * 1000)
    for name, keep in totals:
        out += struct.pack("<I", len(name)) + name.encode() + struct.pack("<d", keep)
    return out + struct.pack("<I", 1) + b"t" + struct.pack("<I", 1) + b"k"


async def test_redis_reads_totals_and_reservations_of_one_dimension_fewer() -> None:
    """Totals and a live reservation written with the dimensions before the last: read by position,
    0 in the last; the reservation settles into them exactly."""
    client = require_redis()
    prefix = f"bp-test-{uuid.uuid4().hex[:12]}:"
    k = Scope("key", "k", "key:t/k", Limits(), "none")
    m = N - 1  # the dimensions before the last
    settled, charged, held = list(range(1, m + 1)), [10] * m, [20] * m  # held: the live reservation's free hold
    client.set(prefix + "T:key:t/k@0", struct.pack(f"<{3 * m + 1}d", *settled, *charged, *held, T0))
    code = 1 if m == LEGACY_DIMS else 1 + 4 * m  # LIVE, and its dimension count
    client.set(prefix + "q:old", _record(code, m, [30] * m, charged, [("key:t/k@0", 0.0)]))
    s: Any = open_store(f"redis://127.0.0.1:6379/{REDIS_DB}?prefix={prefix}")
    await s.open()
    try:
        old_used = Amounts(*(a + b for a, b in zip(settled, charged)), 0)
        assert await s.states([k], T0) == [ScopeState(old_used, Amounts(*held, 0), T0)]
        old = Reservation("old", (k,), (0.0,), None, ZERO)  # (its caller's copy: the store reads its record)
        await s.settle(old, Amounts(*([15] * m), 4), None)
        assert await s.states([k], T0) == [ScopeState(Amounts(*(a + 15 for a in settled), 4), ZERO, T0)]
    finally:
        await s.close()
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)


def test_usage_rows_of_interrupted_requests_take_the_dimensions_they_name() -> None:
    from proxy.store.base import ROW_AMOUNTS

    named = {f: i for f, i in ROW_AMOUNTS if i is not None}
    assert {f: FIELDS[i] for f, i in named.items()} == {f: f for f in named}
    assert set(named) <= set(UsageRow._fields) and "input_tokens" in named
