"""Text from elsewhere made safe to show on a terminal.

Ids, texts and metadata from producers and the store, dead-letter fields, error messages
from a broker or a metrics endpoint: any of them may carry ESC, BEL or C1 controls (an OSC
window title or clipboard write, a CSI screen clear, hidden text) or Unicode format
characters (a bidi override that makes a line read other than it is). Every human-readable
output passes such values through `printable`; `PrintableFormatter` does it for log lines.

The rule: a character that is not printable by Python's definition (`str.isprintable`:
categories Cc, Cf, Cs, Co, Cn, Zl, Zp, and Zs but for the ASCII space) becomes the escape
`repr()` writes for it: `\\x1b`, `\\x9b`, `\\t`, `\\r`, `\\u202e`, `\\U000e0001`. A newline too,
unless the caller keeps them. A backslash stays as it is: the output is for reading, and
doubling the backslashes of every Windows path or regex would cost more than the one
ambiguity it leaves (a literal `\\x1b` in the data reads like an escaped ESC); the exact
values are in the `--json` outputs. It also makes `printable` idempotent, so escaping twice
(a formatter over a line already escaped) changes nothing.

Owns: the escaping, and the log formatter that applies it. Must not: touch machine outputs
(`--json`, JSON log lines, what goes to Kafka or the store), which keep values exactly
(orjson escapes the C0 controls there).
"""

from __future__ import annotations

import logging

ELLIPSIS = "..."


def _escape(char: str) -> str:
    return repr(char)[1:-1]


def printable(text: str, *, limit: int | None = None, keep_newlines: bool = False) -> str:
    """`text` with every non-printable character escaped (see the module's rule).

    `keep_newlines`: "\\n" passes as is (a traceback); a "\\r" is escaped all the same, since
    it would let the rest of a line overwrite its start. `limit`: at most that many characters,
    the last three "..." when cut; the cut never splits an escape, so it cannot leave a
    half escape that reads as another one.
    """
    if limit is not None and limit < len(ELLIPSIS):
        raise ValueError(f"limit must be at least {len(ELLIPSIS)}, got {limit}")
    if text.isprintable():  # the common case: nothing to escape, no per-character work
        if limit is None or len(text) <= limit:
            return text
        return text[: limit - len(ELLIPSIS)] + ELLIPSIS
    pieces = [c if c.isprintable() or (keep_newlines and c == "\n") else _escape(c) for c in text]
    if limit is not None and sum(map(len, pieces)) > limit:
        room = limit - len(ELLIPSIS)
        kept = []
        for piece in pieces:
            room -= len(piece)
            if room < 0:
                break
            kept.append(piece)
        pieces = kept + [ELLIPSIS]
    return "".join(pieces)


class PrintableFormatter(logging.Formatter):
    """A `logging.Formatter` whose output carries no control characters.

    The line itself (prefix and `record.getMessage()`) is escaped whole, newlines included:
    an id with a newline must not start a forged log line. The traceback and stack after it
    keep their newlines and lose everything else, including an `exc_text` another formatter
    cached on the record unescaped.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)
