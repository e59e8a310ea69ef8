"""Content-hash cache of vectors in Redis.

Key: `{prefix}{sha256(model, normalized text)}`. Value: the raw little-endian float32
(or float16) bytes of the normalized vector; nothing is ever pickled. A Redis fault
degrades to "no cache" for that call and is counted; it never fails a batch.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class VectorCache(Protocol):
    async def get_many(self, hashes: Sequence[str], dim: int) -> list[np.ndarray | None]: ...

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class NullCache:
    """No cache: every lookup misses."""

    async def get_many(self, hashes: Sequence[str], dim: int) -> list[np.ndarray | None]:
        return [None] * len(hashes)

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def encode_vector(vector: np.ndarray, dtype: str = "float32") -> bytes:
    return np.asarray(vector, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def decode_vector(raw: bytes, dim: int, dtype: str = "float32") -> np.ndarray | None:
    """None for a value of the wrong size (another model, another dtype, corruption)."""
    item = np.dtype(dtype).newbyteorder("<")
    if len(raw) != dim * item.itemsize:
        return None
    return np.frombuffer(raw, dtype=item).astype(np.float32)


class RedisCache:
    """Redis-backed `VectorCache`.

    Keyword-only settings:
    - `url`: `redis://` or `rediss://` (TLS); a password in the URL is never logged.
    - `ttl_seconds`: lifetime of an entry (default 7 days).
    - `dtype`: `float32` (default, exact) or `float16` (half the memory).
    - `prefix`: key namespace (default `embedworker:v1:`).
    - `on_error`: called with the operation name when Redis fails (metrics hook).
    """

    def __init__(
        self,
        *,
        url: str,
        ttl_seconds: int = 7 * 24 * 3600,
        dtype: str = "float32",
        prefix: str = "embedworker:v1:",
        timeout_seconds: float = 2.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        import redis.asyncio as redis

        if dtype not in ("float32", "float16"):
            raise ValueError(f"cache dtype must be float32 or float16, not {dtype!r}")
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=10,
        )
        self._ttl = ttl_seconds
        self._dtype = dtype
        self._prefix = prefix
        self._on_error = on_error or (lambda operation: None)
        self._failing = False

    def _failed(self, operation: str, exc: Exception) -> None:
        self._on_error(operation)
        if not self._failing:
            # Type only: a redis exception may embed the connection URL and its password.
            log.warning("redis %s failed (%s); continuing without the cache", operation, type(exc).__name__)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("redis is back; cache enabled again")
        self._failing = False

    async def get_many(self, hashes: Sequence[str], dim: int) -> list[np.ndarray | None]:
        if not hashes:
            return []
        try:
            raw = await self._redis.mget([self._prefix + h for h in hashes])
        except Exception as exc:  # any Redis fault means "miss", by contract
            self._failed("get", exc)
            return [None] * len(hashes)
        self._recovered()
        return [None if value is None else decode_vector(value, dim, self._dtype) for value in raw]

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        if not items:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for content_hash, vector in items:
                    pipe.set(self._prefix + content_hash, encode_vector(vector, self._dtype), ex=self._ttl)
                await pipe.execute()
        except Exception as exc:
            self._failed("set", exc)
            return
        self._recovered()

    async def healthy(self) -> bool:
        try:
            await self._redis.ping()
        except Exception:
            return False
        return True

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:
            pass
