"""Per-tenant token quotas (`EMBEDWORKER_TENANT_TOKENS_PER_SECOND`, overrides in `EMBEDWORKER_TENANT_QUOTAS_FILE`).

A tenant over its quota is delayed, never dropped: the batcher leaves its events buffered
while its bucket is empty, so the others' events go ahead. Its partitions' commits then wait
for it (a committed offset is a finished prefix), so lag grows for the partitions it shares
with others too: a quota is a brake on one tenant's share of the model, not isolation.

Each tenant has a token bucket of one second's quota that refills continuously. An event may
start while the bucket is above zero and spends its (estimated) tokens, going into debt if it
is larger: progress is guaranteed and the long-run rate is the quota.
"""

from __future__ import annotations

import math
from typing import Any, Hashable

import orjson

MAX_FILE_BYTES = 1024 * 1024


def load_quotas(path: str) -> dict[str, float]:
    """{tenant: tokens per second} from a JSON object file; ValueError names what is wrong."""
    from schemas import InvalidEvent
    from schemas.tenancy import check_tenant

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is over {MAX_FILE_BYTES} bytes")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError(f"{path} is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected an object of tenant: tokens per second")
    quotas = {}
    for tenant, rate in value.items():
        try:
            check_tenant(tenant, path)
        except InvalidEvent as exc:
            raise ValueError(exc.message) from None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{path}: the quota of {tenant!r} must be a number of tokens per second, 0 or more (0: none)")
        quotas[tenant] = float(rate)
    return quotas


class TenantQuotas:
    """Token buckets by tenant; a rate of 0 means no quota."""

    def __init__(self, default_rate: float, overrides: dict[str, float] | None = None) -> None:
        self.default_rate = default_rate
        self.overrides = dict(overrides or {})
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # tenant -> (tokens, at)

    @property
    def active(self) -> bool:
        return self.default_rate > 0 or any(rate > 0 for rate in self.overrides.values())

    def rate(self, tenant: Any) -> float:
        return self.overrides.get(tenant, self.default_rate) if tenant is not None else 0.0

    def _level(self, tenant: Any, now: float) -> float:
        rate = self.rate(tenant)
        tokens, at = self._buckets.get(tenant, (rate, now))
        return min(rate, tokens + (now - at) * rate)

    def allows(self, tenant: Any, now: float) -> bool:
        """Whether an event of `tenant` may start now."""
        return self.rate(tenant) <= 0 or self._level(tenant, now) > 0

    def spend(self, tenant: Any, tokens: int, now: float) -> None:
        if self.rate(tenant) > 0:
            self._buckets[tenant] = (self._level(tenant, now) - tokens, now)

    def forget_idle(self, waiting: set[Any], now: float) -> None:
        """Drop full buckets of tenants with nothing buffered (bounded memory over many tenants)."""
        for tenant in [t for t in self._buckets if t not in waiting and self._level(t, now) >= self.rate(t)]:
            del self._buckets[tenant]
