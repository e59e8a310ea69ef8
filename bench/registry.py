"""Every scenario by name: one module each under `bench/scenarios/`, imported only when run.

Scenarios import `bench.common` and `bench.harness`, never each other or this registry, so
adding one is a file and a line here.
"""

from __future__ import annotations

import importlib
from typing import Any, Awaitable, Callable

SCENARIOS: dict[str, str] = {
    "ceiling": "bench.scenarios.ceiling",
    "pipeline": "bench.scenarios.pipeline",
    "naive": "bench.scenarios.naive",
    "duplicates": "bench.scenarios.duplicates",
    "mixed_lengths": "bench.scenarios.mixed_lengths",
    "profile": "bench.scenarios.profile",
    "latency": "bench.scenarios.latency",
    "overhead": "bench.scenarios.overhead",
    "chunking": "bench.scenarios.chunking",
    "recall": "bench.scenarios.recall",
    "http": "bench.scenarios.http",
    "processes": "bench.scenarios.processes",
    "mapping": "bench.scenarios.mapping",
    "backfill": "bench.scenarios.backfill",
    "fairness": "bench.scenarios.fairness",
    "tenancy": "bench.scenarios.tenancy",
}
"""Scenario name -> its module, whose function of the same name runs it."""


def scenario(name: str) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    """The coroutine function of scenario `name` (`KeyError` for an unknown name)."""
    module = importlib.import_module(SCENARIOS[name])
    return getattr(module, name)
