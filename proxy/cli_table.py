"""The CLI's plain-text tables: columns padded to their widest cell."""
from __future__ import annotations

from typing import Sequence


def print_table(rows: Sequence[Sequence[object]], right_from: int | None = None) -> None:
    """Print `rows` (the first is the header); columns from `right_from` on are right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(c.rjust(w) if right_from is not None and i >= right_from else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
