"""Event types and their codecs: every validation rule for data from the wire lives here.

Nothing in this module does I/O. Decoding never raises anything but `InvalidEvent`, so
the runtime can turn any bad input into exactly one dead letter.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

# Point ids are UUID5(POINT_NAMESPACE, event id): a replayed event overwrites its own point.
# Changing this namespace orphans every stored point, so it is part of the public contract.
POINT_NAMESPACE = uuid.UUID("6f1c2a8e-3b7d-5e4f-9a10-e1b0d7c5a4f2")
_NAMESPACE_BYTES = POINT_NAMESPACE.bytes

RESULT_STATUS_OK = "ok"
RESULT_STATUS_DELETED = "deleted"

OP_UPSERT = "upsert"
OP_DELETE = "delete"
OPS = (OP_UPSERT, OP_DELETE)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Size limits enforced before and after parsing (bytes are UTF-8 encoded sizes)."""

    max_message_bytes: int = 1_000_000
    """Raw Kafka value size; checked before the JSON parser sees the bytes."""
    max_text_bytes: int = 100_000
    max_id_chars: int = 256
    max_metadata_bytes: int = 16_384
    max_depth: int = 32
    """Nesting depth of the metadata kept in the payload (orjson itself stops the whole value at 1024)."""
    max_containers: int = 50_000
    """JSON arrays and objects in one message, counted on the raw bytes before parsing: building Python
    objects for ~1 MB of tiny nested arrays holds the event loop for ~0.1 s, heartbeats included."""


DEFAULT_LIMITS = Limits()


class InvalidEvent(Exception):
    """Input that can never be processed; `kind` is a stable, machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class InputEvent:
    """One write to a document: `op` "upsert" (text, metadata) or "delete" (text empty)."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    op: str = OP_UPSERT
    tenant: str | None = None
    """Whose document it is (`EMBEDWORKER_TENANT_FROM`); None: one tenant, as before."""

    @property
    def is_delete(self) -> bool:
        return self.op == OP_DELETE

    @property
    def key(self) -> str:
        """What names the document in the store and in per-id order: the id, scoped by the tenant if any."""
        return self.id if self.tenant is None else tenant_key(self.tenant, self.id)


def tenant_key(tenant: str, doc_id: str) -> str:
    """A tenant's document as one string: `tenant NUL "t" NUL id`. Ids never hold NUL, so a scoped key is never
    a plain id nor a chunk's point name (`id NUL index`), and two tenants' `doc-1` are two keys."""
    return f"{tenant}\x00t\x00{doc_id}"


@dataclass(frozen=True, slots=True)
class Version:
    """An event's place in the order its document's writes must follow (the store's version guard).

    `source` names the order: `topic/partition` when the version is the input's offset (an id's
    events share a partition when key = id), `user` for a version the event carries. Versions of
    different sources are never compared: a keyless producer spreads an id over partitions, and
    there the last write wins, as without the guard.
    """

    source: str
    value: int


def _may_nest_deeper(encoded: bytes, limit: int) -> bool:
    """Whether JSON `encoded` could nest deeper than `limit` (as `_depth` counts: a scalar is a
    level below its container): its opening brackets, plus one, are an upper bound (brackets
    inside strings count too). Two C scans spare the Python walk for the usual flat metadata."""
    return encoded.count(b"{") + encoded.count(b"[") + 1 > limit


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, stopping early once `limit` is exceeded."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _check_string(name: str, value: Any) -> str:
    if value is None:
        raise InvalidEvent(f"missing_{name}", f"field '{name}' is missing")
    if not isinstance(value, str):
        raise InvalidEvent(f"invalid_{name}", f"field '{name}' must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidEvent(f"invalid_{name}", f"field '{name}' contains a NUL character")
    if not value.strip():
        raise InvalidEvent(f"empty_{name}", f"field '{name}' is empty")
    return value


def _check_id(event_id: Any, limits: Limits) -> str:
    event_id = _check_string("id", event_id)
    if len(event_id) > limits.max_id_chars:
        raise InvalidEvent("id_too_long", f"id is {len(event_id)} characters, limit is {limits.max_id_chars}")
    return event_id


def decode_tombstone(key: bytes | None, limits: Limits = DEFAULT_LIMITS) -> InputEvent:
    """A Kafka tombstone (null value) deletes the document named by its key (UTF-8)."""
    if not key:
        raise InvalidEvent("missing_id", "tombstone (null value) without a key: no document id to delete")
    try:
        event_id = key.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise InvalidEvent("invalid_id", f"tombstone key is not valid UTF-8 at byte {bad.start}") from None
    return InputEvent(id=_check_id(event_id, limits), text="", op=OP_DELETE)


def decode_input(raw: bytes | None, limits: Limits = DEFAULT_LIMITS, *, key: bytes | None = None) -> InputEvent:
    """Decode one Kafka record (value, and key for tombstones) into an `InputEvent` or raise `InvalidEvent`."""
    if raw is None:
        return decode_tombstone(key, limits)
    if len(raw) > limits.max_message_bytes:
        raise InvalidEvent(
            "message_too_large", f"message is {len(raw)} bytes, limit is {limits.max_message_bytes}"
        )
    # An upper bound (brackets inside strings count too): two C-speed scans instead of a parse.
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > limits.max_containers:
        raise InvalidEvent(
            "too_complex", f"message has up to {containers} JSON arrays and objects, limit is {limits.max_containers}"
        )
    try:
        # orjson rejects invalid UTF-8 and lone surrogates, and refuses integers beyond 64 bits.
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidEvent("invalid_utf8", f"not valid UTF-8 at byte {bad.start}") from None
        raise InvalidEvent("invalid_json", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(value).__name__}")

    # One rule for optional fields: null is the same as absent (as for "metadata").
    op = value.get("op")
    if op is None:
        op = OP_UPSERT
    if op not in OPS:
        raise InvalidEvent("invalid_op", f"field 'op' must be one of {', '.join(OPS)}, got {str(op)[:40]!r}")
    event_id = _check_id(value.get("id"), limits)
    if op == OP_DELETE:
        return InputEvent(id=event_id, text="", op=OP_DELETE)
    text = _check_string("text", value.get("text"))
    text_bytes = len(text.encode("utf-8"))
    if text_bytes > limits.max_text_bytes:
        raise InvalidEvent("text_too_large", f"text is {text_bytes} bytes, limit is {limits.max_text_bytes}")

    metadata = value.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise InvalidEvent("invalid_metadata", f"metadata must be an object, got {type(metadata).__name__}")
    elif metadata:
        encoded = orjson.dumps(metadata)
        size = len(encoded)
        if size > limits.max_metadata_bytes:
            raise InvalidEvent(
                "metadata_too_large", f"metadata is {size} bytes, limit is {limits.max_metadata_bytes}"
            )
        # Walked only once its size is bounded; fields the worker ignores are never walked.
        if _may_nest_deeper(encoded, limits.max_depth - 1) and _depth(metadata, limits.max_depth - 1) > limits.max_depth - 1:
            raise InvalidEvent("too_deep", f"metadata nesting deeper than {limits.max_depth}")
    return InputEvent(id=event_id, text=text, metadata=metadata)


def encode_input(event: InputEvent) -> bytes:
    if event.is_delete:
        return orjson.dumps({"id": event.id, "op": OP_DELETE})
    body: dict[str, Any] = {"id": event.id, "text": event.text}
    if event.metadata:
        body["metadata"] = event.metadata
    return orjson.dumps(body)


def point_id(event_id: str, chunk_index: int = 0) -> str:
    """The Qdrant point id of a document's chunk: stable across replays and workers, unique per (id, chunk).

    Chunk 0 (a one-chunk text) is `uuid5(ns, id)`; chunk i > 0 is `uuid5(ns, id + "\\0" + str(i))`.
    Ids never hold NUL (`_check_string` refuses it), so no id names another document's chunk.
    """
    return _uuid5(event_id if chunk_index == 0 else f"{event_id}\x00{chunk_index}")


def _uuid5(name: str) -> str:
    """`str(uuid.uuid5(POINT_NAMESPACE, name))` without the `UUID` object (a third of the time, per message)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def legacy_point_id(event_id: str, chunk_index: int) -> str:
    """The id chunk i > 0 had before 2026-12 (`uuid5(ns, id + "#" + i)`): document `a#1` collided with chunk 1 of `a`.

    Only to recognise collections written under that scheme (start-up refuses them, naming `reembed`).
    """
    return str(uuid.uuid5(POINT_NAMESPACE, f"{event_id}#{chunk_index}"))


def normalize_text(text: str) -> str:
    """The form under which two texts count as the same content (NFC, outer whitespace)."""
    return unicodedata.normalize("NFC", text).strip()


def content_hash(model: str, text: str) -> str:
    """Hex SHA-256 of (model, normalized text); the cache key and the payload's `content_hash`."""
    digest = hashlib.sha256()
    digest.update(model.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(normalize_text(text).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultEvent:
    id: str
    point_id: str
    collection: str
    model: str
    dim: int
    cached: bool
    truncated: bool
    content_hash: str
    status: str = RESULT_STATUS_OK
    chunks: int = 1
    """Points the document is stored as (0 for a delete)."""
    tenant: str | None = None

    def encode(self) -> bytes:
        body = {
            "id": self.id,
            "point_id": self.point_id,
            "collection": self.collection,
            "model": self.model,
            "dim": self.dim,
            "cached": self.cached,
            "truncated": self.truncated,
            "content_hash": self.content_hash,
            "status": self.status,
            "chunks": self.chunks,
        }
        if self.tenant is not None:
            body["tenant"] = self.tenant
        return orjson.dumps(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteResult:
    """The result event of a delete (a tombstone or `"op": "delete"`)."""

    id: str
    collection: str
    status: str = RESULT_STATUS_DELETED
    tenant: str | None = None

    @property
    def cached(self) -> bool:
        return False

    @property
    def truncated(self) -> bool:
        return False

    def encode(self) -> bytes:
        body: dict[str, Any] = {"id": self.id, "status": self.status, "collection": self.collection, "chunks": 0}
        if self.tenant is not None:
            body["tenant"] = self.tenant
        return orjson.dumps(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourcePosition:
    topic: str
    partition: int
    offset: int


DEFAULT_DLQ_MAX_PAYLOAD_BYTES = 64 * 1024


def encode_dead_letter(
    *,
    kind: str,
    message: str,
    source: SourcePosition,
    payload: bytes | None,
    max_payload_bytes: int | None = DEFAULT_DLQ_MAX_PAYLOAD_BYTES,
) -> bytes:
    """A dead letter carries the original bytes: as text when UTF-8, else base64.

    At most `max_payload_bytes` of them (None: all; 0: none), so a dead letter always fits
    under the broker's message size: a longer payload keeps its head, with its full size,
    its sha256 and `payload_truncated: true`.
    """
    body: dict[str, Any] = {
        "error": {"type": kind, "message": message},
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
    }
    if payload is None:
        body["payload"] = None
        body["payload_encoding"] = "none"
        return orjson.dumps(body)
    kept = payload
    if max_payload_bytes is not None and len(payload) > max_payload_bytes:
        kept = payload[:max_payload_bytes]
        body["payload_truncated"] = True
        body["payload_size"] = len(payload)
        body["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        if not kept:
            body["payload"] = None
            body["payload_encoding"] = "none"
            return orjson.dumps(body)
    try:
        # A cut may split a UTF-8 sequence: drop the partial character rather than go base64.
        if kept is payload:
            text = kept.decode("utf-8")
        elif _utf8_head(kept):
            text = kept.decode("utf-8", "ignore")
        else:
            raise UnicodeDecodeError("utf-8", kept, 0, 1, "not UTF-8")
        encoded = orjson.dumps(text)  # lone surrogates cannot be re-encoded as JSON text
        if max_payload_bytes is not None and len(encoded) > 2 * max_payload_bytes + 2:
            raise UnicodeDecodeError("utf-8", kept, 0, 1, "escapes too large")  # control bytes escape 6x
        body["payload"] = text
        body["payload_encoding"] = "utf-8"
    except (UnicodeDecodeError, orjson.JSONEncodeError):
        body["payload"] = base64.b64encode(kept).decode("ascii")
        body["payload_encoding"] = "base64"
    return orjson.dumps(body)


def _utf8_head(head: bytes) -> bool:
    """Whether `head` is valid UTF-8 but for a character cut at its end."""
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as bad:
        return bad.start >= len(head) - 3 and bad.reason == "unexpected end of data"


REPLAY_COUNT_HEADER = "embedworker-replay-count"
"""Kafka header: how often `embedworker dlq replay` re-published this event (absent: never).

The worker always copies it from an input onto the input's result and dead letter, so a
replayed event that fails again carries its count into its next dead letter."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A decoded dead-letter envelope (see `encode_dead_letter`)."""

    error_type: str
    source: SourcePosition | None
    payload: bytes | None
    """The original bytes, exactly; None when the dead letter does not carry all of them."""
    missing: str | None = None
    """Why `payload` is None: `truncated` (cut or dropped to fit) or `absent` (no payload)."""


def decode_dead_letter(raw: bytes | None) -> DeadLetter:
    """A dead letter's error type, source and original payload; `InvalidEvent` if it is not one."""
    if raw is None:
        raise InvalidEvent("not_a_dead_letter", "empty record")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent("not_a_dead_letter", "not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        raise InvalidEvent("not_a_dead_letter", "no 'error' object")
    error_type = body["error"].get("type")
    if not isinstance(error_type, str):
        raise InvalidEvent("not_a_dead_letter", "no error type")
    src = body.get("source")
    source = None
    if isinstance(src, dict) and isinstance(src.get("topic"), str) and isinstance(src.get("partition"), int) \
            and isinstance(src.get("offset"), int):
        source = SourcePosition(topic=src["topic"], partition=src["partition"], offset=src["offset"])
    if body.get("payload_truncated"):
        # Its head only (or nothing): re-publishing it would send a different, cut event.
        return DeadLetter(error_type=error_type, source=source, payload=None, missing="truncated")
    payload, encoding = body.get("payload"), body.get("payload_encoding")
    if payload is None or encoding == "none":
        return DeadLetter(error_type=error_type, source=source, payload=None, missing="absent")
    if encoding == "utf-8" and isinstance(payload, str):
        # The encoder kept the text only when it round-trips (no lone surrogates).
        return DeadLetter(error_type=error_type, source=source, payload=payload.encode("utf-8"))
    if encoding == "base64" and isinstance(payload, str):
        try:
            return DeadLetter(error_type=error_type, source=source, payload=base64.b64decode(payload, validate=True))
        except ValueError:
            raise InvalidEvent("not_a_dead_letter", "payload is not valid base64") from None
    raise InvalidEvent("not_a_dead_letter", f"unknown payload encoding {str(encoding)[:20]!r}")


def replay_count(headers: Any) -> int | None:
    """The `REPLAY_COUNT_HEADER` of a record's headers: 0 when absent, None when malformed."""
    count = 0
    for name, value in headers or ():
        if name != REPLAY_COUNT_HEADER:
            continue
        text = bytes(value or b"").decode("ascii", "replace").strip()
        if not text.isdigit() or len(text) > 9:
            return None  # a garbled count must not read as "never replayed"
        count = int(text)
    return count
