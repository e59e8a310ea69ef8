"""What the store engines share: every engine call on one dedicated thread, and views on other collections.

Owns: the thread hop (the embedded engines do their work inline and would block the event
loop; a server client blocks on HTTP) and `for_collection`. One thread also keeps writes in
submission order. Must not: know an engine's API.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T", bound="ThreadedStore")


class ThreadedStore:
    collection: str
    location: str
    pin_alias = False
    tenant: str | None = None
    """A `for_tenant` view: its searches see only this tenant's points."""
    """When `collection` is an alias, write the collection it names at `ensure_collection` from then on:
    a later flip of the alias (`embedworker migrate cutover`) must never redirect a running writer."""

    def _executor(self) -> ThreadPoolExecutor:
        raise NotImplementedError

    def _check_open(self) -> None:
        """Raise when the store is closed (engines that cannot tell leave it a no-op)."""

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), lambda: function(*args, **kwargs))

    def _check_collection(self, collection: str) -> None:
        """Raise `SinkConfigError` for a name the engine cannot hold."""

    def for_collection(self: T, collection: str) -> T:
        """The same engine (client, thread) on another collection; close only the original."""
        self._check_collection(collection)
        view = copy.copy(self)
        view.collection = collection
        view.pin_alias = False
        return view

    def for_tenant(self: T, tenant: str | None) -> T:
        """The same store whose searches see only `tenant`'s points (close only the original)."""
        view = copy.copy(self)
        view.tenant = tenant
        return view
