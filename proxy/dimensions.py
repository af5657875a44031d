"""[pure] The budget dimensions, declared once. Everything that lists dimensions derives from
METERED and WALL_CLOCK here: the ledger's Amounts and Limits and its admission rules, the config's
Budget, every store's layout (SQLite columns, Redis packing and Lua loops), the /budget and
/admin views, denials, the x-budget-remaining-* headers, the dashboard and the metrics.

Adding a dimension is one Dimension appended to METERED, and a line in docs/budgets.md and
docs/configuration.md. Append it: the order is the order a denial names dimensions in within a
scope, and the Redis store packs amounts by position (it reads totals and reservations written
before the dimension existed as 0 in it). An existing SQLite ledger gains its column when it opens.
"""
from __future__ import annotations

from dataclasses import dataclass

# What a request needs before any output (Dimension.base): an Ask attribute, or a constant.
BASES = ("input_tokens", "input_cost_nanos", "one", "zero")
# What each output token adds (Dimension.per_output): one, the Ask's output rate in nanos, nothing.
PER_OUTPUT = ("token", "rate", "zero")
# What a settled request counts (Dimension.counts): a Usage attribute, its cost, its steps.
COUNTS = ("total_tokens", "total_input_tokens", "output_tokens", "cost", "steps")


@dataclass(frozen=True, slots=True)
class Dimension:
    """One budget dimension (docs/budgets.md says what each counts)."""

    name: str                 # the config key; /budget, 429 and metrics label
    field: str                # the Amounts / Limits attribute and SQLite column, in stored units
    unit: str = ""            # as users read it: "" (a count), "USD", "s"
    scale: int = 1            # stored units per user unit (nanos per USD): the config gives a decimal
    header: str | None = None  # x-budget-remaining-<header> after admission; None: not sent
    base: str = "zero"        # BASES: needed before any output
    per_output: str = "zero"  # PER_OUTPUT: added by each output token
    counts: str = "steps"     # COUNTS: what a settled request adds
    noun: str | None = None   # a count spent whole: its 429 says "3 of 3 <noun>s used"

    def __post_init__(self) -> None:
        # (field names become SQL columns and Python attributes: identifiers only, never input)
        if not (self.name.isidentifier() and self.field.isidentifier()):
            raise ValueError(f"dimension {self.name!r}: name and field must be identifiers")
        if self.base not in BASES or self.per_output not in PER_OUTPUT or self.counts not in COUNTS:
            raise ValueError(f"dimension {self.name!r}: unknown base, per_output or counts")


METERED: tuple[Dimension, ...] = (
    Dimension("tokens", "tokens", header="tokens", base="input_tokens", per_output="token",
              counts="total_tokens"),
    Dimension("input_tokens", "input_tokens", base="input_tokens", counts="total_input_tokens"),
    Dimension("output_tokens", "output_tokens", per_output="token", counts="output_tokens"),
    Dimension("cost_usd", "cost_nanos", unit="USD", scale=10**9, header="cost-usd", base="input_cost_nanos",
              per_output="rate", counts="cost"),
    Dimension("steps", "steps", header="steps", base="one", counts="steps", noun="step"),
)
# Not metered: seconds since the first request of the period, a limit with no amounts to keep.
WALL_CLOCK = Dimension("wall_clock", "wall_clock", unit="s")


def spelled(template: str, n: int, sep: str = ", ") -> str:
    """`template` once per dimension index i (0-based; j = i + 1 for Lua), joined: the generated,
    loop-free code of Amounts' arithmetic and of the Redis layouts (a loop over the fields costs
    up to twice as much, on the hot path)."""
    return sep.join(template.format(i=i, j=i + 1) for i in range(n))
