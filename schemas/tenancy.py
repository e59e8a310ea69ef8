"""Whose event it is: the tenant of a record (`EMBEDWORKER_TENANT_FROM`), read and checked.

Rules (documented in the README's tenancy section):
- `header:<name>`: the tenant is that Kafka header of every record, tombstones included;
- a dotted path (`tenant`, `metadata.org`): that field of the JSON value; a tombstone has no
  value, so its key names both: `<tenant>/<id>` (producers key every record of a tenant's
  document so, which also keeps its events on one partition);
- a tenant is 1-64 characters of `A-Z a-z 0-9 _ . -`, starting with a letter or digit: it
  becomes part of point ids, cache keys and metric labels. Missing is a dead letter
  (`missing_tenant`), anything else `invalid_tenant`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import InputEvent, InvalidEvent

TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PATH = re.compile(r"[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+)*")
_HEADER = re.compile(r"[\x21-\x7e]{1,255}")
KEY_SEPARATOR = "/"


@dataclass(frozen=True)
class TenantSource:
    """A parsed `EMBEDWORKER_TENANT_FROM`: a header name or a dotted path."""

    header: str | None = None
    path: str | None = None


def parse_tenant_from(text: str) -> TenantSource:
    """ValueError names what is wrong."""
    if text.startswith("header:"):
        name = text[len("header:"):]
        if not _HEADER.fullmatch(name):
            raise ValueError(f"{text!r}: a header name is 1-255 printable characters")
        return TenantSource(header=name)
    if not _PATH.fullmatch(text):
        raise ValueError(f"{text!r} is not a dotted path or header:<name>")
    return TenantSource(path=text)


def check_tenant(value: Any, where: str) -> str:
    if value is None or value == "":
        raise InvalidEvent("missing_tenant", f"no tenant at {where}")
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidEvent("invalid_tenant", f"the tenant at {where} is not ASCII") from None
    if not isinstance(value, str) or not TENANT_PATTERN.fullmatch(value):
        shown = repr(value)[:80]
        raise InvalidEvent("invalid_tenant", f"the tenant at {where} must be 1-64 of A-Z a-z 0-9 _ . - (got {shown})")
    return value


def with_tenant(event: InputEvent, source: TenantSource, raw: bytes | None, headers: Any) -> InputEvent:
    """`event` with its tenant (`InvalidEvent` when it has none or a bad one)."""
    if source.header is not None:
        value = next((v for k, v in (headers or ()) if k == source.header), None)
        return dataclasses.replace(event, tenant=check_tenant(value, f"header {source.header!r}"))
    if event.is_delete and raw is None:
        tenant, separator, doc_id = event.id.partition(KEY_SEPARATOR)
        if not separator or not doc_id:
            raise InvalidEvent("missing_tenant", f"a tombstone's key must be <tenant>{KEY_SEPARATOR}<id> (got {event.id[:80]!r})")
        return dataclasses.replace(event, id=doc_id, tenant=check_tenant(tenant, "the key"))
    value: Any = orjson.loads(raw) if raw is not None else None  # decoded once before: valid, bounded JSON
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        value = value["payload"]
    for segment in (source.path or "").split("."):
        value = value.get(segment) if isinstance(value, dict) else None
    return dataclasses.replace(event, tenant=check_tenant(value, f"field {source.path!r}"))


def expected_key(event: InputEvent) -> bytes:
    """The record key that keeps a document's events on one partition: the id, or `<tenant>/<id>`."""
    key = event.id if event.tenant is None else f"{event.tenant}{KEY_SEPARATOR}{event.id}"
    return key.encode("utf-8", "surrogatepass")
