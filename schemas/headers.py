"""Which input headers travel onto a result or a dead letter, and at what size.

A producer controls its headers, so every copied header is validated and capped: a W3C
`traceparent` must be well formed (55 characters), `tracestate` at most 512 bytes of
printable ASCII, the replay count a short decimal, a header named in `EMBEDWORKER_PASS_HEADERS`
at most `MAX_NAMED_HEADER_BYTES`, all of them together at most `MAX_COPIED_HEADER_BYTES`.
What does not fit is dropped (counted by the caller), never copied: an input near the size
limit with a megabyte header must still get a result the broker accepts.
"""

from __future__ import annotations

import re
from typing import Iterable

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE_BYTES = 512
MAX_NAMED_HEADER_BYTES = 4096
MAX_COPIED_HEADER_BYTES = 16_384
MAX_HEADER_NAME_CHARS = 256
_TRACEPARENT = re.compile(rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]*")
_DIGITS = re.compile(rb"[0-9]{1,9}")

Headers = tuple[tuple[str, bytes], ...]


def passed_header_names(pass_headers: str, replay_header: str) -> frozenset[str]:
    """W3C trace context and the replay count always travel (a replayed event that fails again
    must carry its count to its next dead letter); other headers only when named (comma-separated)."""
    return frozenset({TRACEPARENT, TRACESTATE, replay_header, *(n.strip() for n in pass_headers.split(","))} - {""})


def copied_headers(headers: Iterable[tuple[str, bytes | None]], names: frozenset[str], *, replay_header: str = "") -> tuple[Headers, int]:
    """(the headers to copy, how many named ones were dropped): first of each name, validated, within the caps."""
    kept: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = dropped = 0
    for name, value in headers:
        if name not in names or name in seen:
            continue
        seen.add(name)
        if value is None or not _valid(name, value, replay_header):
            dropped += 1
            continue
        size = len(name) + len(value)
        if total + size > MAX_COPIED_HEADER_BYTES:
            dropped += 1
            continue
        total += size
        kept.append((name, value))
    return tuple(kept), dropped


def _valid(name: str, value: bytes, replay_header: str) -> bool:
    if len(name) > MAX_HEADER_NAME_CHARS:
        return False
    if name == TRACEPARENT:
        return len(value) == 55 and _TRACEPARENT.fullmatch(value) is not None
    if name == TRACESTATE:
        return len(value) <= MAX_TRACESTATE_BYTES and _PRINTABLE_ASCII.fullmatch(value) is not None
    if replay_header and name == replay_header:
        return _DIGITS.fullmatch(value) is not None
    return len(value) <= MAX_NAMED_HEADER_BYTES


def headers_size(headers: Iterable[tuple[str, bytes | None]]) -> int:
    """Bytes a record's headers add to it (names and values, as the broker counts them)."""
    return sum(len(name) + len(value or b"") for name, value in headers)
