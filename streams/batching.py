"""Micro-batching: a batch closes on a message count, a token budget or a maximum wait.

The policy is adaptive. With the backlog (consumer lag) at or below `low_lag`, batches
close after `min_wait_seconds` with the base limits: latency first. At or above
`high_lag` they wait up to `max_wait_seconds` and may grow to the high limits:
throughput first (fewer round trips to Redis and Qdrant per message). In between, the
limits are interpolated linearly. On a full buffer a batch never waits: it is ready.

A batch also closes at once when the consumer has caught up (`close_now`): the broker
had nothing more when it answered, so waiting could only add latency.

With tenants (`tenant_of`), a batch is filled by deficit round robin over the tenants of the
buffered items: each round gives every tenant with items `quantum_tokens` more credit and takes
its oldest items while their tokens fit it, the tenant served longest ago first; a tenant whose
queue empties loses its credit (DRR's rule, so an idle tenant cannot save up). Each tenant's
items leave in their own order, and a batch keeps the buffer's order, so events of one
document (one tenant's) are never reordered; only different tenants' events overtake each
other, and no further than the buffer reaches.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

Item = TypeVar("Item")
QUOTA_RETRY_SECONDS = 0.05
"""With quotas, how soon a batcher holding only over-quota tenants' events is asked again."""


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    min_messages: int = 64
    max_messages: int = 256
    min_tokens: int = 4096
    max_tokens: int = 16384
    min_wait_seconds: float = 0.005
    max_wait_seconds: float = 0.25
    low_lag: int = 100
    high_lag: int = 5000

    def targets(self, lag: int) -> tuple[int, int, float]:
        """(message limit, token budget, max wait) for the current lag."""
        if lag <= self.low_lag:
            share = 0.0
        elif lag >= self.high_lag:
            share = 1.0
        else:
            share = (lag - self.low_lag) / (self.high_lag - self.low_lag)
        messages = round(self.min_messages + share * (self.max_messages - self.min_messages))
        tokens = round(self.min_tokens + share * (self.max_tokens - self.min_tokens))
        wait = self.min_wait_seconds + share * (self.max_wait_seconds - self.min_wait_seconds)
        return messages, tokens, wait


class Batcher(Generic[Item]):
    """Accumulates items with their token estimates; `take` returns one batch.

    With `tenant_of`, items wait in one queue per tenant (kept as they arrive, so a take costs
    the batch it returns, not the whole buffer) and leave by deficit round robin."""

    def __init__(
        self, policy: BatchPolicy, *, tenant_of: Callable[[Item], Hashable] | None = None, quantum_tokens: int = 256,
        quotas: Any = None,
    ) -> None:
        self.policy = policy
        self.tenant_of = tenant_of
        self.quotas = quotas if quotas is not None and quotas.active else None  # `streams.quotas.TenantQuotas`
        self.quantum_tokens = quantum_tokens
        self._deficit: dict[Hashable, int] = {}
        self._served: dict[Hashable, int] = {}  # tenant -> the take that last served it
        self._takes = 0
        self._items: list[tuple[Item, int]] = []  # without tenants
        self._queues: dict[Hashable, deque[tuple[int, Item, int]]] = {}  # with tenants: (arrival, item, tokens)
        self._arrivals = 0
        self._count = 0
        self._tokens = 0
        self._opened_at: float | None = None
        self._closed_early = False
        self.max_messages, self.max_tokens, self.max_wait = policy.targets(0)

    def close_now(self) -> None:
        """Make what is open ready without waiting (the source has nothing more right now)."""
        self._closed_early = bool(self._count)

    def adapt(self, lag: int) -> None:
        self.max_messages, self.max_tokens, self.max_wait = self.policy.targets(lag)

    def add(self, item: Item, tokens: int, now: float) -> None:
        if self._opened_at is None:
            self._opened_at = now
        if self.tenant_of is None:
            self._items.append((item, tokens))
        else:
            self._queues.setdefault(self.tenant_of(item), deque()).append((self._arrivals, item, tokens))
            self._arrivals += 1
        self._count += 1
        self._tokens += tokens

    def __len__(self) -> int:
        return self._count

    def ready(self, now: float) -> bool:
        if not self._count:
            return False
        if self._closed_early or self._count >= self.max_messages or self._tokens >= self.max_tokens:
            return True
        return self._opened_at is not None and now - self._opened_at >= self.max_wait

    def seconds_until_due(self, now: float) -> float | None:
        if not self._count or self._opened_at is None:
            return None
        if self._closed_early:
            return 0.0
        due = max(0.0, self.max_wait - (now - self._opened_at))
        return due if self.quotas is None else min(due, QUOTA_RETRY_SECONDS)  # a bucket refills meanwhile

    def take(self, now: float) -> list[Item]:
        """The oldest items up to the message limit and token budget (at least one, unless every waiting
        tenant is over its quota); by deficit round robin across tenants when `tenant_of` is given."""
        if self.tenant_of is not None:
            return self._take_fair(now)
        count, tokens = 0, 0
        for _, item_tokens in self._items:
            if count and (count >= self.max_messages or tokens + item_tokens > self.max_tokens):
                break
            count += 1
            tokens += item_tokens
        batch, self._items = self._items[:count], self._items[count:]
        self._settle(count, tokens, now)
        return [item for item, _ in batch]

    def _settle(self, count: int, tokens: int, now: float) -> None:
        self._count -= count
        self._tokens -= tokens
        self._opened_at = now if self._count else None
        self._closed_early = self._closed_early and bool(self._count)  # the rest came with it

    def _allows(self, tenant: Hashable, now: float) -> bool:
        return self.quotas is None or self.quotas.allows(tenant, now)

    def _take_fair(self, now: float) -> list[Item]:
        queues = self._queues
        if self.quotas is not None:
            self.quotas.forget_idle(set(queues), now)
        self._takes += 1
        order = sorted(queues, key=lambda t: self._served.get(t, -1))  # served longest ago first
        chosen: list[tuple[int, Item]] = []
        count = tokens = 0
        full = False
        while not full and any(queues[t] and self._allows(t, now) for t in order):
            for tenant in order:
                queue = queues[tenant]
                if not queue or not self._allows(tenant, now):
                    continue
                before = self._deficit.get(tenant, 0)
                credit, served = before + self.quantum_tokens, False
                while queue:
                    arrival, item, item_tokens = queue[0]
                    if item_tokens > credit and (chosen or served):
                        break  # only a batch's very first item may exceed the credit (progress)
                    if count and (count >= self.max_messages or tokens + item_tokens > self.max_tokens):
                        full = True
                        break
                    queue.popleft()
                    chosen.append((arrival, item))
                    count, tokens, credit, served = count + 1, tokens + item_tokens, max(0, credit - item_tokens), True
                    self._served[tenant] = self._takes
                    if self.quotas is not None:
                        self.quotas.spend(tenant, item_tokens, now)
                        if not self.quotas.allows(tenant, now):
                            break  # over its quota: the rest of its events wait for the bucket
                if not served and full:
                    credit = before  # the batch filled before its turn: the round's quantum is not its to keep
                self._deficit[tenant] = credit if queue else 0  # an emptied queue keeps no credit (DRR)
                if full:
                    break
        for tenant in [t for t, q in queues.items() if not q]:
            del queues[tenant]
            self._deficit.pop(tenant, None)
            self._served.pop(tenant, None)  # bounded by the tenants waiting; one back later queues as new
        chosen.sort(key=lambda entry: entry[0])  # arrival order: one document's events stay in theirs
        self._settle(count, tokens, now)
        return [item for _, item in chosen]

    def drain(self) -> list[Item]:
        if self.tenant_of is None:
            items = [item for item, _ in self._items]
        else:
            items = [item for _, item, _ in sorted((e for q in self._queues.values() for e in q), key=lambda e: e[0])]
        self._items, self._queues, self._deficit = [], {}, {}
        self._count, self._tokens, self._opened_at = 0, 0, None
        self._closed_early = False
        return items

    def remove(self, predicate) -> list[Item]:
        """Remove and return the items matching `predicate` (for revoked partitions)."""
        if self.tenant_of is None:
            removed = [i for i, _ in self._items if predicate(i)]
            self._items = [(i, t) for i, t in self._items if not predicate(i)]
            entries = [(0, t) for _, t in self._items]
        else:
            gone: list[tuple[int, Item]] = []
            for tenant in list(self._queues):
                kept = deque(e for e in self._queues[tenant] if not predicate(e[1]))
                gone.extend((a, i) for a, i, _ in self._queues[tenant] if predicate(i))
                if kept:
                    self._queues[tenant] = kept
                else:
                    del self._queues[tenant]
                    self._deficit.pop(tenant, None)
            removed = [i for _, i in sorted(gone, key=lambda e: e[0])]
            entries = [(0, t) for q in self._queues.values() for _, _, t in q]
        self._count, self._tokens = len(entries), sum(t for _, t in entries)
        if not self._count:
            self._opened_at = None
            self._closed_early = False
        return removed
