"""[pure] Incremental Server-Sent-Events decoder, sans-IO (the h11 / httpx-decoder shape).

    decoder = SSEDecoder()
    for chunk in upstream:          # any chunking, down to single bytes
        for event in decoder.feed(chunk):
            ...                     # event.event, event.data, event.raw
    tail_events = decoder.flush()   # at EOF

Contract (the WHATWG HTML standard, "event stream interpretation"):

* Lines end at CR, LF or CRLF, and nowhere else: a JSON string may hold a raw U+2028,
  U+0085, VT or FF, so nothing like ``str.splitlines`` is ever applied to decoded text.
* An empty line ends an event. An event is emitted only if it had a ``data`` or an
  ``event`` field; other blocks (comments, ``id:``/``retry:`` only) are not events and
  their bytes are carried into the ``raw`` of the next emitted event, so that
  ``b"".join(e.raw for e in events) + decoder.pending`` is every byte fed, always.
* Decoding is a pure function of the byte stream: any chunking yields the same events,
  ``raw`` included, and the same SSEError outcome. The price: a CR that is the last byte
  buffered may be the first half of a CRLF, so the line it ends (if it is the blank line
  of an event, the event) is completed by the next byte fed, or by ``flush()``.
* Values are decoded as UTF-8 per completed line with ``errors="replace"``: a character
  split across feeds is fine and garbage never raises.
* Memory is bounded: an event (with the bytes carried into it) larger than
  ``max_event_bytes`` raises SSEError, whether it is still unterminated or arrived whole;
  the buffer holds at most the cap plus the chunk being fed. When a feed completes events
  before the overrun, they are returned and the error is raised by the next call. After
  SSEError the decoder is dead: every later call raises again at once, without buffering.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

_LF = 0x0A
_SPACE = 0x20


class SSEEvent(NamedTuple):
    """An immutable value (a tuple: cheaper to build than a frozen dataclass, and a
    stream builds one per event)."""

    event: str | None  # value of the last `event:` line, None if none
    data: str          # `data:` values joined with "\n"
    raw: bytes         # exact upstream bytes, from the end of the previous event through this one's blank line


_TWO_LINE_BLOCK = re.compile(rb"event: ([^\n]*+)\ndata: ([^\n]*+)\n\n")
# Event names the providers send, decoded once.
_NAMES = {n.encode(): n for n in (
    "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
    "message_stop", "ping", "error")}


class SSERun(NamedTuple):
    """Consecutive events a consumer asked to take in bulk (SSEDecoder(runs=...)): LF-only blocks
    `event: NAME\ndata: VALUE\n\n` that the run reader found as a whole, in a few C scans. A
    stream relay meters a run of text deltas in one step instead of building and reading an
    event per delta; `expand` gives the events."""

    event: str
    raw: bytes    # exact bytes of all the run's events
    count: int    # how many events
    key: bytes    # what the run reader keyed it by (all its events share it)


# Finds a run at an event's start: (data, pos, end) -> (where the run ends, its key, how many
# events it spans) or None.
RunReader = Callable[[bytes, int, int], "tuple[int, bytes, int] | None"]


def run_reader(pattern: re.Pattern[bytes]) -> RunReader:
    """A RunReader from a possessive pattern whose first group is the key."""
    match = pattern.match

    def read(data: bytes, pos: int, end: int) -> tuple[int, bytes, int] | None:
        m = match(data, pos, end)
        # each block of a run is "event: NAME\ndata: VALUE\n\n": three LFs (a one-byte count is faster)
        return None if m is None else (m.end(), m[1], data.count(10, pos, m.end()) // 3)

    return read


def expand(run: SSERun) -> list[SSEEvent]:
    """The run's events, exactly as a decoder without runs emits them (a run is whole LF-only blocks)."""
    return SSEDecoder()._feed_lf(run.raw)


def run_sizes(run: SSERun) -> list[int]:
    """The length in raw of each of the run's events (no value holds a LF: blocks end at LF LF)."""
    return [len(b) + 2 for b in run.raw.split(b"\n\n")[:-1]]


def split(run: SSERun, k: int) -> list[SSEEvent | SSERun]:
    """The run with its k-th event on its own: [run of the events before it,] event[, run of the rest]."""
    sizes = run_sizes(run)
    start = sum(sizes[:k])
    end = start + sizes[k]
    out: list[SSEEvent | SSERun] = []
    if k:
        out.append(SSERun(run.event, run.raw[:start], k, run.key))
    out += SSEDecoder()._feed_lf(run.raw[start:end])
    if k + 1 < run.count:
        out.append(SSERun(run.event, run.raw[end:], run.count - k - 1, run.key))
    return out


class SSEError(Exception):
    """The upstream sent an event larger than the decoder's cap (or a line that never ends)."""


def read_field(buf: bytes | bytearray, line: int, eol: int, event: str | None,
               data: list[str] | None) -> tuple[str | None, list[str] | None]:
    """The event name and data lines so far after the non-blank line buf[line:eol]: `data:` adds a
    data line, `event:` sets the name (one space after the colon dropped), `data` or `event` alone
    is that field with an empty value; a comment (":..."), id, retry or unknown field changes
    nothing (its bytes stay in the event's raw)."""
    if buf.startswith(b"data:", line):
        v = line + 5
    elif buf.startswith(b"event:", line):
        v = line + 6
        if v < eol and buf[v] == _SPACE:
            v += 1
        return buf[v:eol].decode("utf-8", "replace"), data
    elif eol - line == 4 and buf.startswith(b"data", line):
        v = eol
    elif eol - line == 5 and buf.startswith(b"event", line):
        return "", data
    else:
        return event, data
    if v < eol and buf[v] == _SPACE:
        v += 1
    value = buf[v:eol].decode("utf-8", "replace")
    if data is None:
        return event, [value]
    data.append(value)
    return event, data


class SSEDecoder:
    """Feed bytes, get complete SSEEvents. See the module docstring for the contract."""

    __slots__ = ("_max", "_buf", "_line", "_search", "_event", "_data", "_failed", "_run_event", "_run_read")

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024,
                 runs: tuple[str, RunReader] | None = None) -> None:
        """`runs`: (event name, run reader): where the reader finds a run at an event's start, the
        events it spans come out as one SSERun. It must span only whole LF-only blocks
        `event: NAME\ndata: VALUE\n\n` of that name, one or more (run_reader makes one of a
        possessive pattern). Optional: any event may come out on its own instead (the general
        paths never group)."""
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self._run_event, self._run_read = runs if runs is not None else ("", None)
        self._max = max_event_bytes
        self._buf = bytearray()  # pending bytes: the start of the next event
        self._line = 0           # offset in _buf of the first line not yet parsed
        self._search = 0         # offset in _buf where the line-end search resumes (>= _line)
        self._event: str | None = None
        self._data: list[str] | None = None  # None until a data line is seen
        self._failed: str | None = None

    @property
    def pending(self) -> bytes:
        """Bytes buffered that are not yet part of an emitted event."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Take the next bytes of the stream; return the events they complete (with `runs`,
        some of them grouped in SSERuns)."""
        if self._failed is not None:
            raise SSEError(self._failed)
        if not data:
            return []
        if (not self._buf and self._event is None and self._data is None and len(data) <= self._max
                and b"\r" not in data):
            return self._feed_lf(data if type(data) is bytes else bytes(data))
        buf = self._buf
        if buf:
            buf += data
            src = buf
        else:  # common case: nothing pending, parse the chunk itself without copying it
            src = data if type(data) is bytes else bytes(data)
        events, end = self._parse(src, final=False)
        if src is buf:
            del buf[:end]
        elif end < len(src):
            buf += src[end:]
        if self._failed is not None and not events:
            raise SSEError(self._failed)
        return events  # a cap overrun behind these events raises on the next call

    def _feed_lf(self, data: bytes) -> list[SSEEvent]:
        """The common case, same result as _parse: nothing pending and no CR in the chunk, so
        lines end at LF and events at LF LF. A chunk no larger than the cap cannot overrun it.
        The unfinished tail is left for _parse."""
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            return self._feed_lf_blocks(data)
        # Providers send every event as exactly "event: NAME\ndata: VALUE\n\n": a C match per run
        # or block reads them. If they do not tile the chunk (another block shape somewhere), the
        # general split below decides.
        events: list[SSEEvent | SSERun] = []
        pos = 0
        names = _NAMES
        new = tuple.__new__  # (SSEEvent(...) goes through a Python-level __new__)
        run_event, run_read, block_match = self._run_event, self._run_read, _TWO_LINE_BLOCK.match
        while pos < end:
            if run_read is not None and (r := run_read(data, pos, end)) is not None:
                raw = data[pos:r[0]]
                events.append(new(SSERun, (run_event, raw, r[2], r[1])))
                pos += len(raw)
                continue
            m = block_match(data, pos, end)
            if m is None:
                return self._feed_lf_blocks(data)
            name = m[1]
            nxt = m.end()
            events.append(new(SSEEvent, (names.get(name) or name.decode("utf-8", "replace"),
                                         m[2].decode("utf-8", "replace"), data[pos:nxt])))
            pos = nxt
        if end < len(data):
            self._buf += data[end:]
        self._line = self._search = 0
        return events

    def _feed_lf_blocks(self, data: bytes) -> list[SSEEvent]:
        """_feed_lf for any block shape: split at LF LF in C, then read each block's few lines."""
        events: list[SSEEvent] = []
        start = pos = 0
        parts = data.split(b"\n\n")
        for i in range(len(parts) - 1):
            part = parts[i]
            pos += len(part) + 2
            # The usual block is exactly "event: NAME\ndata: VALUE" (or one data line alone).
            if part.startswith(b"event: "):
                nl = part.find(b"\n")
                if nl != -1 and part.startswith(b"data: ", nl + 1) and part.find(b"\n", nl + 1) == -1:
                    name = part[7:nl]
                    events.append(SSEEvent(_NAMES.get(name) or name.decode("utf-8", "replace"),
                                           part[nl + 7:].decode("utf-8", "replace"), data[start:pos]))
                    start = pos
                    continue
            elif part.startswith(b"data: ") and part.find(b"\n") == -1:
                events.append(SSEEvent(None, part[6:].decode("utf-8", "replace"), data[start:pos]))
                start = pos
                continue
            event: str | None = None
            values: list[str] | None = None
            for line in part.split(b"\n"):
                event, values = read_field(line, 0, len(line), event, values)
            if values is not None or event is not None:
                events.append(SSEEvent(event, "" if values is None else "\n".join(values), data[start:pos]))
                start = pos
        if start < len(data):
            self._buf += data[start:]
        self._line = self._search = 0
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: a trailing CR ends its line, an unterminated last line counts as a
        line, and an event whose blank line never came is emitted if it has data or event
        fields. Bytes of anything else (comments, a lone id) stay in ``pending``."""
        if self._failed is not None:
            raise SSEError(self._failed)
        buf = self._buf
        if not buf:
            return []
        events, end = self._parse(buf, final=True)
        if self._failed is not None:  # unreachable while feed() keeps pending within the cap
            raise SSEError(self._failed)
        if self._data is not None or self._event is not None:
            data = self._data
            events.append(SSEEvent(self._event, "" if data is None else "\n".join(data), bytes(buf[end:])))
            self._event = self._data = None
            end = len(buf)
        del buf[:end]
        self._line = self._search = len(buf)
        return events

    def _parse(self, buf: bytes | bytearray, final: bool) -> tuple[list[SSEEvent], int]:
        """Parse every complete line from self._line on; return the events completed and the
        offset where the unemitted rest of buf starts. Line offsets are stored relative to it.

        Line ends are found with two cached searches (next CR, next LF), so every byte is
        scanned once however the stream is chunked."""
        events: list[SSEEvent] = []
        n = len(buf)
        line = self._line
        pos = self._search
        start = 0  # where the raw of the current (unemitted) event begins
        cap = self._max
        event = self._event
        data = self._data
        cr = buf.find(b"\r", pos)
        lf = buf.find(b"\n", pos)
        while True:
            if lf != -1 and (cr == -1 or lf < cr):
                eol = lf
                nxt = lf + 1
                lf = buf.find(b"\n", nxt)
            elif cr != -1:
                eol = cr
                if cr + 1 < n:
                    if buf[cr + 1] == _LF:
                        nxt = cr + 2
                        lf = buf.find(b"\n", nxt)
                    else:
                        nxt = cr + 1
                elif final:
                    nxt = n
                else:  # a CR as the last byte may be half of a CRLF split across feeds
                    pos = cr
                    break
                cr = buf.find(b"\r", nxt)
            elif final and line < n:  # at EOF an unterminated last line still counts
                eol = nxt = n
            else:
                pos = n
                break
            if eol == line:  # blank line: the end of an event, if it had any fields
                if data is not None or event is not None:
                    if nxt - start > cap:
                        self._failed = f"an SSE event of {nxt - start} bytes exceeds max_event_bytes={cap}"
                        pos = line
                        break
                    events.append(SSEEvent(event, "" if data is None else "\n".join(data), bytes(buf[start:nxt])))
                    event = data = None
                    start = nxt
            else:
                event, data = read_field(buf, line, eol, event, data)
            line = nxt
        self._event, self._data = event, data
        if self._failed is None and n - start > cap:
            self._failed = (f"{n - start} bytes buffered without the end of an SSE event;"
                            f" exceeds max_event_bytes={cap}")
        self._line = line - start
        self._search = pos - start
        return events, start
