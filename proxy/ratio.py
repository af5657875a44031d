"""[pure] Bytes per output token, learned from completed streams, for the output estimate of a
stream that ends without a usage report (cut, client gone, upstream dropped or errored) and for
live metering (docs/budgets.md, "Estimates").

Learned per (key, model) from streams whose provider reported its output: a client can only
move its own estimates, never another tenant's. The figure used is the lower quartile of the
last WINDOW samples (fewer bytes per token: more tokens, an estimate that errs high), clipped to
[MIN_MILLI, MAX_MILLI], and DEFAULT_MILLI until MIN_SAMPLES are in. Kept in memory only: a
restart starts conservative again. Bytes per token are held in thousandths, so estimates stay
integer arithmetic."""
from __future__ import annotations

from collections import OrderedDict, deque

DEFAULT_MILLI = 3000      # bytes / 3: high for English (~4 bytes a token), about right for code
MIN_MILLI = 1000          # a token is at least a byte of text
MAX_MILLI = 6000          # no text tokenises sparser than this: the most a learned figure may lower an estimate
WINDOW = 32
MIN_SAMPLES = 8
MIN_SAMPLE_BYTES = 256    # shorter outputs say little about the ratio
MAX_ENTRIES = 4096        # (key, model) pairs remembered, least recently learned dropped first


class OutputRatios:
    def __init__(self) -> None:
        self._samples: OrderedDict[tuple[str, str], deque[int]] = OrderedDict()
        self._figure: dict[tuple[str, str], int] = {}

    def bytes_per_token_milli(self, key: str, model: str) -> int:
        return self._figure.get((key, model), DEFAULT_MILLI)

    def learn(self, key: str, model: str, output_tokens: int, output_bytes: int) -> None:
        """One completed stream: `output_bytes` of generated text billed as `output_tokens`."""
        if output_tokens <= 0 or output_bytes < MIN_SAMPLE_BYTES:
            return
        milli = min(MAX_MILLI, max(MIN_MILLI, output_bytes * 1000 // output_tokens))
        pair = (key, model)
        samples = self._samples.get(pair)
        if samples is None:
            if len(self._samples) >= MAX_ENTRIES:
                old, _ = self._samples.popitem(last=False)
                self._figure.pop(old, None)
            samples = self._samples[pair] = deque(maxlen=WINDOW)
        else:
            self._samples.move_to_end(pair)
        samples.append(milli)
        if len(samples) >= MIN_SAMPLES:
            self._figure[pair] = sorted(samples)[len(samples) // 4]
