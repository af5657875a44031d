"""[pure] Budget periods on UTC calendar boundaries (weeks start on Monday)."""
from __future__ import annotations

import math
from functools import lru_cache
from datetime import datetime, timedelta, timezone

UTC = timezone.utc


def period_bounds(period: str, now: float) -> tuple[float, float | None]:
    """(start, end) of the period containing `now`, as epoch seconds; `none` is (0, None)."""
    if period == "none":
        return 0.0, None
    # Every request asks this for each of its scopes: the period last answered is reused while `now`
    # is inside it. Boundaries are whole seconds, so start <= now < end is exactly floor(now) in it.
    current = _current.get(period)
    if current is not None and current[0] <= now < current[1]:  # type: ignore[operator]
        return current
    # Flooring first keeps an instant just before a boundary in its period (fromtimestamp would
    # round to the nearest microsecond).
    current = _current[period] = _bounds(period, math.floor(now))
    return current


_current: dict[str, tuple[float, float | None]] = {}


@lru_cache(maxsize=256)
def _bounds(period: str, second: int) -> tuple[float, float | None]:
    t = datetime.fromtimestamp(second, UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "week":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=t.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return start.timestamp(), end.timestamp()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
