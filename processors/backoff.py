"""Retry delays: exponential backoff with full jitter, capped (shared by store writes and publishing)."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, *, base_seconds: float = 0.1, cap_seconds: float = 10.0) -> None:
        self.base = base_seconds
        self.cap = cap_seconds

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))
