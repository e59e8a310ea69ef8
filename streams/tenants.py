"""Per-tenant metrics with bounded labels: the largest tenants by messages get their own `tenant` label.

Prometheus keeps a series per label value, and tenants can be many: at most `top` tenants ever
get a label (`EMBEDWORKER_TENANT_METRICS_TOP`), handed out to those among the `top` largest by
messages when the ranking is taken (every `every` messages); everyone else is `other`. A label
once given is kept (a series that disappeared would read as a tenant gone quiet), so the
cardinality is at most `top + 1` per metric.
"""

from __future__ import annotations

import heapq

OTHER = "other"
MAX_TRACKED = 10_000
"""Tenants counted for the ranking; past that, new tenants are `other` until restart."""


class TenantLabels:
    def __init__(self, top: int, *, every: int = 500) -> None:
        self.top = top
        self.every = every
        self._counts: dict[str, int] = {}
        self._labelled: set[str] = set()
        self._since = 0

    def label(self, tenant: str | None, messages: int = 1) -> str:
        """Count `messages` of `tenant` and return its label (`other` when it has none)."""
        if tenant is None or self.top <= 0:
            return OTHER
        if tenant in self._counts or len(self._counts) < MAX_TRACKED:
            self._counts[tenant] = self._counts.get(tenant, 0) + messages
        self._since += messages
        if tenant not in self._labelled and len(self._labelled) < self.top and len(self._counts) <= self.top:
            self._labelled.add(tenant)  # while every tenant fits, every tenant has its own label
        elif len(self._labelled) < self.top and self._since >= self.every:
            self._since = 0
            for name in heapq.nlargest(self.top, self._counts, key=self._counts.__getitem__):
                if len(self._labelled) >= self.top:
                    break
                self._labelled.add(name)
        return tenant if tenant in self._labelled else OTHER

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)
