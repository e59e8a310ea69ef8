"""Control characters from stored data never reach the operator's terminal.

- `printable`: what it escapes, what it leaves, its cut;
- the human outputs built on it: search hits, the status table, the lines of `dlq replay`
  (the formatting functions fed crafted values, and `dlq replay` on the real broker over
  crafted dead letters), and the log formatter `setup_logging` installs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import unicodedata

import pytest
from qdrant_client.models import ScoredPoint

from support import run_cli
from schemas import SourcePosition, encode_dead_letter, point_id
from streams import cli
from streams.commands.dlq import ReplayReport, _refuse
from streams.commands.search import format_hits
from streams.commands.status import format_status
from streams.config import load_settings
from streams.backends.kafka import make_producer
from streams.terminal import PrintableFormatter, printable
from support import make_settings

OSC_TITLE = "\x1b]0;pwned\x07"
OSC_CLIPBOARD = "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07"
CLEAR = "\x1b[2J\x1b[H"
HIDDEN = "\x1b[8m"
C1_CSI = "\x9b31m"
BIDI = "\u202eexe.txt\u202c"
NASTY = [OSC_TITLE, OSC_CLIPBOARD, CLEAR, HIDDEN, C1_CSI, BIDI, "\x07", "\x7f", "a\rb", "\u2066x\u2069",
         "\u200b", "\u200f", "\u2028", "\u2029", "\x00", "\ud800", "\U000e0001"]


def controls(text: str, *, newlines: bool = True) -> list[str]:
    """The characters of `text` a terminal could act on (a newline allowed when `newlines`)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs") and not (newlines and c == "\n")]


# ---- printable -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b", "\\x1b"),
        ("\x07", "\\x07"),
        (OSC_TITLE, "\\x1b]0;pwned\\x07"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\u202e", "\\u202e"),
        ("\x9b", "\\x9b"),
        ("a\rb", "a\\rb"),
        ("\x7f", "\\x7f"),
        ("\t", "\\t"),
        ("line\nnext", "line\\nnext"),
        ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),
        ("\u200b\u200c\u200d\u200e\u200f", "\\u200b\\u200c\\u200d\\u200e\\u200f"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\ud800", "\\ud800"),
        ("\U000e0041", "\\U000e0041"),
    ],
)
def test_each_control_becomes_a_visible_escape(raw, shown):
    assert printable(raw) == shown


@pytest.mark.parametrize("text", ["", "plain ascii, punctuation: !@#$%^&*()[]{}", "héllo 日本", "naïve café Ωμέγα 🙂",
                                  r"C:\temp\x1b is a path", "tab-free 'quotes' \"too\""])
def test_printable_text_is_unchanged(text):
    assert printable(text) == text
    assert printable(text, keep_newlines=True) == text


def test_nothing_a_terminal_acts_on_survives():
    for raw in NASTY:
        assert not controls(printable(raw), newlines=False), raw
        assert "\x1b" not in printable(raw)


def test_newlines_only_where_the_caller_keeps_them():
    assert printable("a\nb\r\nc", keep_newlines=True) == "a\nb\\r\nc"
    assert printable("a\nb", keep_newlines=False) == "a\\nb"


def test_escaping_twice_changes_nothing():
    for raw in NASTY + ["back\\slash", "héllo"]:
        once = printable(raw)
        assert printable(once) == once


def test_the_cut_keeps_the_limit_and_never_splits_an_escape():
    assert printable("abcdefghij", limit=8) == "abcde..."
    assert printable("abcdefgh", limit=8) == "abcdefgh"
    # "ab" + "\\x1b" is 6 characters; one more than 5 of room: the escape goes whole.
    assert printable("ab\x1bcdefgh", limit=8) == "ab..."
    assert printable("ab\x1bcdefgh", limit=9) == "ab\\x1b..."
    for limit in range(3, 30):
        for raw in NASTY:
            shown = printable(raw * 3, limit=limit)
            assert len(shown) <= limit
            assert shown == printable(raw * 3) or shown.endswith("...")
    with pytest.raises(ValueError):
        printable("abc", limit=2)


# ---- search ------------------------------------------------------------------------------------


def _hit(doc_id: str, text: str, score: float = 0.5, **payload: object) -> ScoredPoint:
    return ScoredPoint(id=point_id(doc_id), version=0, score=score, payload={"id": doc_id, "text": text, **payload})


def test_search_hits_show_ids_and_texts_escaped():
    hits = [
        _hit(f"doc{OSC_TITLE}", f"before {CLEAR}after {HIDDEN}secret"),
        _hit(f"{BIDI}", f"{OSC_CLIPBOARD} {C1_CSI}red \x7f\x07", chunk_index=1, chunk_count=3),
        _hit("plain", "nothing\u2028special\u2066here\u2069"),
    ]
    lines = format_hits(hits)
    assert len(lines) == 3
    for line in lines:
        assert not controls(line, newlines=False), line
    assert "doc\\x1b]0;pwned\\x07" in lines[0] and "\\x1b[2J" in lines[0]
    assert "\\u202eexe.txt\\u202c [chunk 2/3]" in lines[1]


def test_search_hits_cut_long_escaped_texts_to_the_width():
    lines = format_hits([_hit("d", "\x1b" * 200)], width=40)
    text = lines[0].split("  ", 2)[2]
    assert len(text) <= 40 and text.endswith("...") and "\\x1b" in text and not controls(text)


def test_search_hits_keep_a_plain_text_as_before():
    lines = format_hits([_hit("bill", "Hello,   I was\ncharged twice.", score=0.91234)])
    assert lines == ["0.9123  bill  Hello, I was charged twice."]


# ---- status ------------------------------------------------------------------------------------


def _worker(url: str, **values: object) -> dict[str, object]:
    worker: dict[str, object] = dict(url=url, reachable=True, error=None, paused=False, pause_reasons=[], processed_total=10.0,
                                     rate_per_second=1.5, buffered_messages=2.0, in_flight_batches=0.0, lag_records=0.0,
                                     assigned=[])
    worker.update(values)
    return worker


def test_status_shows_names_urls_reasons_and_errors_escaped():
    good = f"http://worker-a:9000/metrics{OSC_TITLE}"
    report = {
        "topic": f"events{CLEAR}",
        "group": f"embedworker{BIDI}",
        "partitions": [
            {"partition": 0, "committed": 5, "log_start": 0, "high_watermark": 7, "lag": 2, "owner": good},
            {"partition": 1, "committed": None, "log_start": 0, "high_watermark": 3, "lag": 3, "owner": None},
        ],
        "total_lag": 5,
        "workers": [
            _worker(good, paused=True, pause_reasons=[f"memory{HIDDEN}", f"dlq_limit{C1_CSI}"]),
            _worker("http://worker-b:9000/metrics", reachable=False, error=f"URLError: refused {OSC_CLIPBOARD}\r\x07"),
        ],
    }
    lines = format_status(report)
    assert lines[0] == "topic events\\x1b[2J\\x1b[H  group embedworker\\u202eexe.txt\\u202c"
    for line in lines:
        assert not controls(line, newlines=False), line
    joined = "\n".join(lines)
    assert "memory\\x1b[8m" in joined and "dlq_limit\\x9b31m" in joined and "refused \\x1b]52;" in joined
    # The columns are measured on what is shown: the header row is as wide as the rows.
    table = lines[lines.index("") + 1:]
    assert table[0].index("paused") == table[1].index("yes")


# ---- dlq replay ----------------------------------------------------------------------------------


def test_dlq_refusals_and_summary_are_escaped():
    report = ReplayReport(dlq_topic=f"in.dlq{OSC_TITLE}", input_topic=f"in{BIDI}", dry_run=False, replayed=1)
    _refuse(report, f"in.dlq[0]@3 (source events{CLEAR}[1]@7, invalid_json{OSC_CLIPBOARD})", "no payload, not replayable")
    _refuse(report, "in.dlq[0]@4", f"not a dead letter (bad {C1_CSI}\x07)")
    lines = [f"embedworker: {line}" for line in report.refused] + [report.summary()]
    for line in lines:
        assert not controls(line, newlines=False), line
    assert "source events\\x1b[2J\\x1b[H[1]@7, invalid_json\\x1b]52;" in lines[0]
    assert lines[2].startswith("replayed 1 dead letters from in.dlq\\x1b]0;pwned\\x07 to in\\u202eexe.txt\\u202c;")


@pytest.mark.integration
async def test_dlq_replay_writes_crafted_dead_letters_escaped(services, capsys, clean_cli_state):
    settings = await make_settings(services, partitions=1)
    letters = [
        # Past the limit: named with its source topic and error type, both from the dead letter itself.
        (encode_dead_letter(kind=f"invalid_json{OSC_TITLE}", message=f"bad {CLEAR}",
                            source=SourcePosition(topic=f"events{HIDDEN}{BIDI}", partition=0, offset=1), payload=b"{x"),
         [("embedworker-replay-count", b"9")]),
        (encode_dead_letter(kind=f"x{C1_CSI}", message="m", source=SourcePosition(topic=f"t{OSC_CLIPBOARD}", partition=2, offset=3),
                            payload=None), []),
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        for value, headers in letters:
            await producer.send_and_wait(settings.dlq_topic, value=value, headers=headers)
    finally:
        await producer.stop()
    code, out, err = await asyncio.to_thread(
        run_cli, capsys, "dlq", "replay", "--dry-run", "--bootstrap-servers", settings.bootstrap_servers,
        "--input-topic", settings.input_topic, "--dlq-topic", settings.dlq_topic)
    assert code == 0, err
    assert not controls(out) and not controls(err), (out, err)
    assert "(source events\\x1b[8m\\u202eexe.txt\\u202c[0]@1, invalid_json\\x1b]0;pwned\\x07)" in err
    assert "x\\x9b31m" in err and "t\\x1b]52;c;" in err
    assert "skipped past limit 1, not replayable 1" in out


# ---- logs ------------------------------------------------------------------------------------------


def _record(msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("embedworker", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_log_lines_quoting_an_id_are_escaped():
    formatter = PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(_record("dead letter for %s: %s", f"id{OSC_TITLE}", f"forged\n2024 ERROR ok{CLEAR}"))
    assert line == "WARNING embedworker: dead letter for id\\x1b]0;pwned\\x07: forged\\n2024 ERROR ok\\x1b[2J\\x1b[H"


def test_a_logged_traceback_keeps_its_lines_and_loses_its_controls():
    try:
        raise ValueError(f"bad id {OSC_CLIPBOARD}\r")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("failed on %s", f"id{HIDDEN}", exc_info=exc_info)
    record.exc_text = logging.Formatter().formatException(exc_info)  # cached unescaped by another handler
    text = PrintableFormatter("%(message)s").format(record)
    assert text.splitlines()[0] == "failed on id\\x1b[8m"
    assert "Traceback (most recent call last):" in text.splitlines()
    assert "ValueError: bad id \\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\\x07\\r" in text
    assert not controls(text)


@pytest.mark.parametrize("log_format, escaping", [("text", True), ("json", False)])
def test_the_cli_logs_through_it_in_text_only(clean_cli_state, log_format, escaping):
    cli.setup_logging(load_settings({"log_format": log_format}, environ={}))
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler.formatter, PrintableFormatter) is escaping
    line = handler.format(_record("for %s", f"id{OSC_TITLE}"))
    if escaping:
        assert line.endswith("WARNING embedworker: for id\\x1b]0;pwned\\x07") and not controls(line)
    else:  # JSON stays JSON: orjson escapes the C0 controls itself
        assert "\\u001b]0;pwned\\u0007" in line and "\x1b" not in line
