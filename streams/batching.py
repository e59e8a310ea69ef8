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
    """Accumulates items with their token estimates; `take` returns one batch."""

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
        self._items: list[tuple[Item, int]] = []
        self._tokens = 0
        self._opened_at: float | None = None
        self._closed_early = False
        self.max_messages, self.max_tokens, self.max_wait = policy.targets(0)

    def close_now(self) -> None:
        """Make what is open ready without waiting (the source has nothing more right now)."""
        self._closed_early = bool(self._items)

    def adapt(self, lag: int) -> None:
        self.max_messages, self.max_tokens, self.max_wait = self.policy.targets(lag)

    def add(self, item: Item, tokens: int, now: float) -> None:
        if self._opened_at is None:
            self._opened_at = now
        self._items.append((item, tokens))
        self._tokens += tokens

    def __len__(self) -> int:
        return len(self._items)

    def ready(self, now: float) -> bool:
        if not self._items:
            return False
        if self._closed_early or len(self._items) >= self.max_messages or self._tokens >= self.max_tokens:
            return True
        return self._opened_at is not None and now - self._opened_at >= self.max_wait

    def seconds_until_due(self, now: float) -> float | None:
        if not self._items or self._opened_at is None:
            return None
        if self._closed_early:
            return 0.0
        due = max(0.0, self.max_wait - (now - self._opened_at))
        return due if self.quotas is None else min(due, QUOTA_RETRY_SECONDS)  # a bucket refills meanwhile

    def take(self, now: float) -> list[Item]:
        """The oldest items up to the message limit and token budget (at least one); fairly across tenants
        (see the module's notes) when `tenant_of` is given and more than one tenant waits."""
        if self.tenant_of is not None:
            fair = self._take_fair(now)
            if fair is not None:
                return fair
        count, tokens = 0, 0
        for _, item_tokens in self._items:
            if count and (count >= self.max_messages or tokens + item_tokens > self.max_tokens):
                break
            count += 1
            tokens += item_tokens
        batch, self._items = self._items[:count], self._items[count:]
        self._tokens -= tokens
        self._opened_at = now if self._items else None
        self._closed_early = self._closed_early and bool(self._items)  # the rest came with it
        return [item for item, _ in batch]

    def _take_fair(self, now: float) -> list[Item] | None:
        assert self.tenant_of is not None
        queues: dict[Hashable, list[int]] = {}
        for index, (item, _) in enumerate(self._items):
            queues.setdefault(self.tenant_of(item), []).append(index)
        if self.quotas is not None:
            self.quotas.forget_idle(set(queues), now)
        if len(queues) < 2 and self.quotas is None:
            self._deficit = {t: d for t, d in self._deficit.items() if t in queues}
            return None  # one tenant: the plain oldest-first batch
        self._takes += 1
        order = sorted(queues, key=lambda t: self._served.get(t, -1))
        heads = {t: 0 for t in order}
        chosen: list[int] = []
        count = tokens = 0
        full = False

        def waiting() -> bool:
            return any(heads[t] < len(queues[t]) and (self.quotas is None or self.quotas.allows(t, now)) for t in order)

        while not full and waiting():
            for tenant in order:
                queue, head = queues[tenant], heads[tenant]
                if head >= len(queue) or (self.quotas is not None and not self.quotas.allows(tenant, now)):
                    continue
                before = self._deficit.get(tenant, 0)
                credit = before + self.quantum_tokens
                while head < len(queue):
                    item_tokens = self._items[queue[head]][1]
                    if item_tokens > credit and not (not chosen and head == heads[tenant]):
                        break
                    if count and (count >= self.max_messages or tokens + item_tokens > self.max_tokens):
                        full = True
                        break
                    chosen.append(queue[head])
                    count, tokens, credit = count + 1, tokens + item_tokens, max(0, credit - item_tokens)
                    head += 1
                    self._served[tenant] = self._takes
                    if self.quotas is not None:
                        self.quotas.spend(tenant, item_tokens, now)
                        if not self.quotas.allows(tenant, now):
                            break  # over its quota: the rest of its events wait for the bucket
                served = head > heads[tenant]
                heads[tenant] = head
                if not served and full:
                    credit = before  # the batch filled before its turn: the round's quantum is not its to keep
                self._deficit[tenant] = credit if head < len(queue) else 0  # an emptied queue keeps no credit
                if full:
                    break
        taken = set(chosen)
        batch = [self._items[i] for i in sorted(taken)]  # the buffer's order: one document's events stay in theirs
        self._items = [entry for i, entry in enumerate(self._items) if i not in taken]
        self._tokens -= tokens
        self._opened_at = now if self._items else None
        self._closed_early = self._closed_early and bool(self._items)
        self._deficit = {t: d for t, d in self._deficit.items() if t in queues and heads[t] < len(queues[t])}
        return [item for item, _ in batch]

    def drain(self) -> list[Item]:
        items = [item for item, _ in self._items]
        self._items, self._tokens, self._opened_at = [], 0, None
        self._closed_early = False
        return items

    def remove(self, predicate) -> list[Item]:
        """Remove and return the items matching `predicate` (for revoked partitions)."""
        kept = [(i, t) for i, t in self._items if not predicate(i)]
        removed = [i for i, _ in self._items if predicate(i)]
        self._items = kept
        self._tokens = sum(t for _, t in kept)
        if not kept:
            self._opened_at = None
            self._closed_early = False
        return removed
