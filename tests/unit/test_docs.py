"""The configuration table in docs/configuration.md is the options table: a new setting cannot go undocumented."""

from __future__ import annotations

from pathlib import Path

from streams.config import markdown_table

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_table_matches_the_options():
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert markdown_table() in text, (
        "docs/configuration.md's configuration table is stale: paste streams.config.markdown_table()"
    )
