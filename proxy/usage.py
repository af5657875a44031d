"""[pure] Token usage of one model call, provider-neutral.

Anthropic reports uncached input, cache writes (by TTL) and cache reads separately;
OpenAI reports a prompt total that includes cached tokens. Both map onto this record:
`input_tokens` is always the *uncached* input billed at the base rate.
"""
from __future__ import annotations

from typing import NamedTuple


class Usage(NamedTuple):
    """Immutable; a tuple underneath because a frozen dataclass is dearer to build and a
    stream builds several (as Amounts in ledger.py)."""

    input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    web_search_requests: int = 0

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def total_input_tokens(self) -> int:
        """What the `input_tokens` budget dimension counts: prompt incl. cache writes and reads."""
        return self.input_tokens + self.cache_write_5m_tokens + self.cache_write_1h_tokens + self.cache_read_tokens

    @property
    def total_tokens(self) -> int:
        return self.total_input_tokens + self.output_tokens

    def with_output(self, output_tokens: int) -> Usage:
        a, b, c, d, _, f = self
        return _new(Usage, (a, b, c, d, output_tokens, f))

    def __add__(self, other: Usage) -> Usage:  # type: ignore[override]
        return _new(Usage, tuple(a + b for a, b in zip(self, other)))

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


_new = tuple.__new__
