"""The README's configuration table is the options table: a new setting cannot go undocumented."""

from __future__ import annotations

from pathlib import Path

from streams.config import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_configuration_table_matches_the_options():
    text = README.read_text(encoding="utf-8")
    assert markdown_table() in text, "README's configuration table is stale: paste streams.config.markdown_table()"
