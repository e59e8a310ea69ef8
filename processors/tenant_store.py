"""`EMBEDWORKER_TENANCY=collection`: each tenant's documents in a collection of its own.

Qdrant's layout for few, large tenants: a collection per tenant, named from a template
(`EMBEDWORKER_COLLECTION_TEMPLATE`, default `{collection}_{tenant}`; a tenant is 1-64 of
`A-Z a-z 0-9 _ . -`, so the name is always one a collection can have), created on first use
with the settings and indexes of the worker's own collection. At most `max_collections`
tenants are admitted per process (`EMBEDWORKER_MAX_TENANT_COLLECTIONS`): a new tenant past
that is refused at decode, a dead letter `tenant_limit`, never a collection without end.
"""

from __future__ import annotations

from typing import Any, Sequence

from processors.sink import DocumentWrite, WriteReport


def collection_of(template: str, collection: str, tenant: str) -> str:
    return template.replace("{collection}", collection).replace("{tenant}", tenant)


class TenantCollections:
    """A `StoreWriter` that routes each document to its tenant's collection (see the module's notes)."""

    routes_tenants = True

    def __init__(self, store: Any, *, template: str, max_collections: int) -> None:
        self.store = store
        self.template = template
        self.max_collections = max_collections
        self.collection = collection_of(template, store.collection, "<tenant>")
        self.location = store.location
        self._views: dict[str, Any] = {}
        self._admitted: set[str] = set()
        self._dim: int | None = None
        self._model: tuple[str | None, str | None] = (None, None)

    def collection_for(self, tenant: str) -> str:
        return collection_of(self.template, self.store.collection, tenant)

    def admit(self, tenant: str) -> bool:
        """Whether `tenant` may have a collection here (the first `max_collections` tenants seen may)."""
        if tenant in self._admitted:
            return True
        if len(self._admitted) >= self.max_collections:
            return False
        self._admitted.add(tenant)
        return True

    def for_collection(self, collection: str) -> Any:
        return self.store.for_collection(collection)

    async def vector_size(self) -> int | None:
        return self._dim

    async def ensure_collection(self, dim: int, *, model: str | None = None, model_version: str | None = None) -> None:
        self._dim, self._model = dim, (model, model_version)  # each tenant's collection is made on its first write

    async def _view(self, tenant: str) -> Any:
        view = self._views.get(tenant)
        if view is None:
            view = self.store.for_collection(self.collection_for(tenant))
            assert self._dim is not None, "ensure_collection first"
            await view.ensure_collection(self._dim, model=self._model[0], model_version=self._model[1])
            self._views[tenant] = view
        return view

    async def write(self, writes: Sequence[DocumentWrite]) -> WriteReport:
        by_tenant: dict[str, list[DocumentWrite]] = {}
        for write in writes:
            if write.tenant is None:
                raise ValueError(f"document {write.doc_id!r} has no tenant; EMBEDWORKER_TENANCY=collection needs one")
            by_tenant.setdefault(write.tenant, []).append(write)
        stale = payload_only = 0
        for tenant, group in by_tenant.items():
            report = await (await self._view(tenant)).write(group)
            stale, payload_only = stale + report.stale, payload_only + report.payload_only
        return WriteReport(stale=stale, payload_only=payload_only)

    async def healthy(self) -> bool:
        return bool(await self.store.healthy())

    async def close(self) -> None:
        await self.store.close()
