"""The first step: a fetched record becomes an event (an upsert or a delete) or a dead letter.

Owns: the call of `schemas.decode_input` (every rule lives there) and the token estimate a
batch is planned with. Must not: batch, publish or finish anything itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from schemas import InputEvent, InvalidEvent, Limits
from schemas.mapping import Mapping, decode_record
from schemas.tenancy import TenantSource, expected_key, with_tenant
from streams.steps import Fetched, Inline
from streams.steps.batch import Batch
from streams.steps.publish import DeadLetters


class Decode(Inline):
    def __init__(
        self, *, next_step: Batch, dead_letters: DeadLetters, limits: Limits, tokens: Callable[[InputEvent], int],
        mapping: Mapping = Mapping(),
        tenant: TenantSource | None = None,
        admit_tenant: Callable[[str], bool] | None = None,
        on_decoded: Callable[[Fetched], None] = lambda item: None,
        on_key_mismatch: Callable[[Fetched], None] = lambda item: None,
    ) -> None:
        self.next_step = next_step
        self.dead_letters = dead_letters
        self.limits = limits
        self.mapping = mapping
        self.tenant = tenant
        self.admit_tenant = admit_tenant
        self.tokens = tokens
        # Told here, in offset order, like the dead letters: the breaker counts both in one sequence.
        self.on_decoded = on_decoded
        self.on_key_mismatch = on_key_mismatch

    def submit(self, item: Fetched) -> None:
        try:
            decoded = decode_record(item.value, item.key, item.headers, self.mapping, self.limits)
            if self.tenant is not None:
                decoded = dataclasses.replace(decoded, event=with_tenant(decoded.event, self.tenant, item.value, item.headers))
                tenant = decoded.event.tenant
                if self.admit_tenant is not None and tenant is not None and not self.admit_tenant(tenant):
                    raise InvalidEvent("tenant_limit", f"tenant {tenant!r} would pass the limit of collections per worker "
                                       "(EMBEDWORKER_MAX_TENANT_COLLECTIONS)")
        except InvalidEvent as exc:
            self.dead_letters.submit([(item, exc.kind, exc.message)])
            return
        item.event, item.version = decoded.event, decoded.version
        self.on_decoded(item)
        key = item.key
        if key is not None and self.mapping.native and key != expected_key(item.event):
            # Per-id order needs key = id: a keyed upsert of another key may land on another
            # partition than the same id's tombstone, and the two can then swap.
            self.on_key_mismatch(item)
        self.next_step.submit(item, self.tokens(item.event))
