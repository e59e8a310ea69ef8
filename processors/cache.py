"""Content-hash cache of vectors in Redis.

Key: `{prefix}{sha256(model, normalized text)}`. Value: the raw little-endian float32
(or float16) bytes of the normalized vector; nothing is ever pickled. A Redis fault
degrades to "no cache" for that call and is counted; it never fails a batch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from redis.exceptions import NoPermissionError, ResponseError

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


_SET_MANY_SCRIPT = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1]) end return #KEYS"
"""SET with a TTL for every key of a batch, in one round trip and one command to pack and parse."""


def _scripting_refused(exc: ResponseError) -> bool:
    """The server refuses scripts as such: an ACL without @scripting, EVAL renamed or disabled."""
    message = str(exc).lower()
    return isinstance(exc, NoPermissionError) or "unknown command" in message or "disabled" in message


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
        self._set_script: Any = self._redis.register_script(_SET_MANY_SCRIPT)

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
        """One script call for the batch (a pipeline costs ~15 us of client CPU per key, the
        script ~3); where the server refuses scripts (an ACL without @scripting, a managed Redis
        with EVAL off) the batch goes as a pipeline of SETs from then on."""
        if not items:
            return
        keys = [self._prefix + content_hash for content_hash, _ in items]
        values = [encode_vector(vector, self._dtype) for _, vector in items]
        try:
            if self._set_script is not None:
                try:
                    await self._set_script(keys=keys, args=[self._ttl, *values])
                    self._recovered()
                    return
                except ResponseError as exc:
                    refused = exc
                # This batch goes as SETs whatever the refusal; only a refusal of scripting itself
                # (not BUSY, a killed script, OOM) makes it the way for good, once the SETs worked.
                await self._set_pipelined(keys, values)
                if _scripting_refused(refused) and self._set_script is not None:
                    self._set_script = None
                    # The server's first words only: its message may quote the script.
                    log.warning("redis refused the cache's write script (%s); writing entries one SET each",
                                " ".join(str(refused).split()[:6])[:80])
            else:
                await self._set_pipelined(keys, values)
        except Exception as exc:
            self._failed("set", exc)
            return
        self._recovered()

    async def _set_pipelined(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, value in zip(keys, values):
                pipe.set(key, value, ex=self._ttl)
            await pipe.execute()

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
