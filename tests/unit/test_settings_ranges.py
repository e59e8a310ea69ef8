"""Every number setting has a finite, documented range; the consumers read committed data only by default.

`float()` takes `inf`, `nan` and `1e-12`: unchecked, `COMMIT_INTERVAL_MS=inf` stopped periodic
commits and lag reporting and `1e-12` made a busy loop, so each is refused at start-up in one
line naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import OPTIONS, ConfigError, Option, Range, load_settings

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

NUMERIC = [option for option in OPTIONS if isinstance(option.default, (int, float)) and not isinstance(option.default, bool)]


def _ids(options: list[Option]) -> list[str]:
    return [option.name for option in options]


def _below(bounds: Range) -> str:
    if bounds.integer:
        return str(int(bounds.lo) - 1)
    return repr(bounds.lo / 2 if bounds.lo > 0 else -0.001)


def _above(bounds: Range) -> str:
    return str(int(bounds.hi) + 1) if bounds.integer else repr(bounds.hi * 1.01)


def _refused(environ: dict[str, str], setting: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert caught.value.setting == setting
    assert setting in str(caught.value) and "\n" not in str(caught.value)
    return caught.value


def test_the_numeric_options_are_the_ones_expected():
    # A new number option must come with a range: a loose parser here would accept inf again.
    assert len(NUMERIC) >= 30
    loose = [option.name for option in NUMERIC if not isinstance(option.parse, Range)]
    assert not loose, f"number options without a range: {loose}"


@pytest.mark.parametrize("option", NUMERIC, ids=_ids(NUMERIC))
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "1e400", "below", "above", "ten"])
def test_a_number_outside_its_range_is_refused_in_one_line(option, text):
    bounds = option.parse
    value = {"below": _below(bounds), "above": _above(bounds)}.get(text, text)
    error = _refused({option.env: value}, option.env)
    if text in ("below", "above"):
        assert bounds.between() in str(error)


@pytest.mark.parametrize("option", NUMERIC, ids=_ids(NUMERIC))
def test_the_bounds_themselves_are_accepted(option):
    bounds = option.parse
    assert bounds(_text(bounds.lo, bounds)) == bounds.lo
    assert bounds(_text(bounds.hi, bounds)) == bounds.hi
    if bounds.off:
        assert bounds("0") == 0


def _text(value: float, bounds: Range) -> str:
    return str(int(value)) if bounds.integer else repr(float(value))


@pytest.mark.parametrize("option", NUMERIC, ids=_ids(NUMERIC))
def test_the_default_is_inside_its_range_and_documented(option):
    assert option.parse.check(option.default) == option.default
    row = next(line for line in CONFIGURATION.read_text(encoding="utf-8").splitlines() if f"| `{option.env}` |" in line)
    assert option.parse.span() in row, f"docs/configuration.md does not state the range of {option.env}"


def test_the_defaults_load():
    load_settings(environ={})


@pytest.mark.parametrize(
    "setting, value",
    [
        ("EMBEDWORKER_COMMIT_INTERVAL_MS", "inf"),  # stopped periodic commits and lag reporting
        ("EMBEDWORKER_COMMIT_INTERVAL_MS", "1e-12"),  # a busy loop
        ("EMBEDWORKER_SHUTDOWN_TIMEOUT_SECONDS", "1e-300"),
        ("EMBEDWORKER_BATCH_MAX_WAIT_MS", "inf"),
        ("EMBEDWORKER_EMBED_RETRY_SECONDS", "inf"),
        ("EMBEDWORKER_EMBEDDINGS_RETRY_SECONDS", "inf"),
    ],
)
def test_the_cases_of_the_issue_are_refused(setting, value):
    error = _refused({setting: value}, setting)
    assert repr(value) in str(error) and "must be between" in str(error)


def test_flags_and_typed_overrides_get_the_same_bounds():
    # Flags arrive as text; code (demo, bench, tests) passes typed values.
    for raw in ("inf", float("inf"), float("nan"), 1e-12):
        with pytest.raises(ConfigError) as caught:
            load_settings({"commit_interval_ms": raw}, environ={})
        assert caught.value.setting == "EMBEDWORKER_COMMIT_INTERVAL_MS"
    assert load_settings({"commit_interval_ms": 20}, environ={}).commit_interval_ms == 20


def test_zero_is_off_where_the_setting_says_so():
    settings = load_settings(environ={"EMBEDWORKER_MEMORY_BUDGET_BYTES": "0", "EMBEDWORKER_METRICS_PORT": "0",
                                      "EMBEDWORKER_DLQ_MAX_RATIO": "0", "EMBEDWORKER_DLQ_MAX_CONSECUTIVE": "0"})
    assert (settings.memory_budget_bytes, settings.metrics_port, settings.dlq_max_ratio, settings.dlq_max_consecutive) == (0, 0, 0, 0)
    # A budget of a few bytes is a mistake (MB for bytes), not "off": it would pause forever.
    error = _refused({"EMBEDWORKER_MEMORY_BUDGET_BYTES": "2048"}, "EMBEDWORKER_MEMORY_BUDGET_BYTES")
    assert "0 (off) or between 67108864 (64 MiB) and 4398046511104 (4 TiB) bytes" in str(error)


# ---- isolation level ------------------------------------------------------------------------


def test_isolation_level_defaults_to_read_committed():
    assert load_settings(environ={}).isolation_level == "read_committed"
    assert load_settings(environ={"EMBEDWORKER_ISOLATION_LEVEL": "read_uncommitted"}).isolation_level == "read_uncommitted"
    _refused({"EMBEDWORKER_ISOLATION_LEVEL": "committed"}, "EMBEDWORKER_ISOLATION_LEVEL")


@pytest.mark.parametrize("level", [None, "read_committed", "read_uncommitted"])
async def test_the_consumers_get_the_isolation_level(level):
    # Built, never started: no broker is contacted.
    from streams.backends.kafka import KafkaBackend, make_consumer
    from streams.commands.common import _reader

    environ = {} if level is None else {"EMBEDWORKER_ISOLATION_LEVEL": level}
    settings = load_settings(environ=environ)
    expected = level or "read_committed"
    consumers = [KafkaBackend().consumer(settings).consumer, make_consumer(settings, group_id=None), _reader(settings, 5.0)]
    try:
        assert [consumer._isolation_level for consumer in consumers] == [expected] * 3
    finally:
        for consumer in consumers:
            await consumer.stop()
