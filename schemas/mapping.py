"""Events as they already are: field mapping, text templates and Debezium change events.

A decoder chosen by `input_format` turns a record into a row and an operation (`json`: the
value itself, an upsert; `debezium`: the change event's `after` or `before` and its `op`), then
the mapping reads the id, the text, the metadata and the version from it. The defaults keep the
native contract byte for byte: `decode_record` hands a default mapping straight to
`decode_input`. Another format (Avro with a schema registry) is another decoder behind the same
seam. Every failure is an `InvalidEvent` with a precise kind, never another exception.

Paths are dotted (`after.id`, `metadata.org`); `key` is the record key's UTF-8 text and
`key.<path>` a field of a JSON key. A text is a path, several paths (`title,body`: joined by a
blank line) or a template (`{title}\n\n{body}`); a missing or null field is an empty part.
Metadata is `metadata` (the object, as today) or paths and wildcards (`lang,tags,author.*`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import (
    DEFAULT_LIMITS, OP_DELETE, OP_UPSERT, InputEvent, InvalidEvent, Limits, _check_id, _check_string, _depth, _may_nest_deeper,
    decode_input,
)

FORMATS = ("json", "debezium")
_SEGMENT = re.compile(r"[A-Za-z0-9_\-$@]+|\*")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_DEBEZIUM_UPSERTS = {"c": "create", "r": "read (snapshot)", "u": "update"}
_MISSING = object()


@dataclass(frozen=True)
class Mapping:
    """Where an event's parts are read (see the module docstring); `parse_mapping` validates one."""

    input_format: str = "json"
    id_from: str = "id"
    text_from: str = "text"
    metadata_from: str = "metadata"
    version_from: str = ""

    @property
    def native(self) -> bool:
        """Today's contract: `decode_input` does all of it."""
        return self == Mapping()


def parse_mapping(
    *, input_format: str = "json", id_from: str = "", text_from: str = "", metadata_from: str = "", version_from: str = "",
) -> Mapping:
    """A validated mapping (empty settings take the format's defaults); ValueError names the bad part."""
    if input_format not in FORMATS:
        raise ValueError(f"input format must be one of {', '.join(FORMATS)}, not {input_format!r}")
    debezium = input_format == "debezium"
    mapping = Mapping(
        input_format=input_format,
        id_from=id_from or "id",
        text_from=text_from or "text",
        metadata_from=metadata_from or "metadata",
        version_from=version_from or ("source.lsn|source.ts_ms" if debezium else ""),
    )
    _check_path("id_from", mapping.id_from, keys=True)
    for part in _text_parts(mapping.text_from):
        _check_path("text_from", part, keys=False)
    if mapping.metadata_from != "metadata":
        for part in mapping.metadata_from.split(","):
            _check_path("metadata_from", part.strip(), keys=False, wildcard=True)
    for part in filter(None, mapping.version_from.split("|")):
        if not part.startswith("header:"):
            _check_path("version_from", part, keys=False)
    return mapping


def _text_parts(text_from: str) -> list[str]:
    if "{" in text_from or "}" in text_from:
        stripped = _PLACEHOLDER.sub("", text_from)
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"text_from: the template {text_from!r} has an unbalanced brace")
        return [name.strip() for name in _PLACEHOLDER.findall(text_from)]
    return [part.strip() for part in text_from.split(",")]


def _check_path(setting: str, path: str, *, keys: bool, wildcard: bool = False) -> None:
    if keys and (path == "key" or path.startswith("key.")):
        path = path[4:] or "x"
    segments = path.split(".")
    if not path or not all(_SEGMENT.fullmatch(s) for s in segments) or ("*" in segments and not (wildcard and segments[-1] == "*")):
        raise ValueError(f"{setting}: {path!r} is not a dotted path{' (a trailing .* is allowed)' if wildcard else ''}")


def lookup(value: Any, path: str) -> Any:
    """The value at a dotted path, or `_MISSING`."""
    for segment in path.split("."):
        if not isinstance(value, dict) or segment not in value:
            return _MISSING
        value = value[segment]
    return value


def _scalar_text(value: Any) -> str | None:
    """Ids and text parts: strings as they are, numbers as their decimal text, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value) if not isinstance(value, float) or not value.is_integer() else str(int(value))
    return None


def _json_object(raw: bytes | None, what: str, limits: Limits) -> Any:
    if raw is None:
        return None
    if len(raw) > limits.max_message_bytes:
        raise InvalidEvent("message_too_large", f"{what} is {len(raw)} bytes, limit is {limits.max_message_bytes}")
    if raw.count(b"[") + raw.count(b"{") > limits.max_containers:
        raise InvalidEvent("too_complex", f"{what} has more than {limits.max_containers} JSON arrays and objects")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("invalid_json", f"{what} is not valid JSON: {exc}") from None


def _unwrap(value: Any) -> Any:
    """The JSON converter's `{"schema": ..., "payload": ...}` envelope (schemas.enable=true), or the value."""
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        return value["payload"]
    return value


@dataclass(frozen=True, slots=True)
class Decoded:
    event: InputEvent
    version: int | None = None
    """The event's own version (`version_from`), or None: the input offset orders it."""


def decode_record(
    raw: bytes | None, key: bytes | None, headers: Any, mapping: Mapping, limits: Limits = DEFAULT_LIMITS,
) -> Decoded:
    """One Kafka record under `mapping`: an upsert or a delete, or `InvalidEvent`."""
    if mapping.native:
        return Decoded(decode_input(raw, limits, key=key))
    key_value: Any = _MISSING
    if mapping.id_from.startswith("key.") or mapping.input_format == "debezium":
        key_value = _unwrap(_json_object(key, "the key", limits)) if key else _MISSING
    if mapping.input_format == "debezium":
        return _decode_debezium(raw, key, key_value, headers, mapping, limits)
    if raw is None:
        return Decoded(InputEvent(id=_id(None, key, key_value, mapping, limits), text="", op=OP_DELETE))
    value = _json_object(raw, "message", limits)
    if not isinstance(value, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return _row_event(value, key, key_value, headers, mapping, limits, version_row=value)


def _decode_debezium(raw: bytes | None, key: bytes | None, key_value: Any, headers: Any, mapping: Mapping, limits: Limits) -> Decoded:
    if raw is None:
        # The tombstone Debezium sends after a delete: the delete already happened, this one is a no-op.
        return Decoded(InputEvent(id=_id(None, key, key_value, mapping, limits), text="", op=OP_DELETE))
    change = _unwrap(_json_object(raw, "message", limits))
    if not isinstance(change, dict):
        raise InvalidEvent("not_an_object", f"expected a Debezium change event, got {type(change).__name__}")
    op = change.get("op")
    if op == "t":
        raise InvalidEvent("unsupported_op", "a truncate event ('op': 't') is not applied: re-embed the table instead")
    if op == "d":
        row = change.get("before")
        row = row if isinstance(row, dict) else {}
        event = InputEvent(id=_id(row, key, key_value, mapping, limits), text="", op=OP_DELETE)
        return Decoded(event, _version(change, headers, mapping))
    if not isinstance(op, str) or op not in _DEBEZIUM_UPSERTS:
        raise InvalidEvent("invalid_op", f"Debezium 'op' must be one of c, r, u, d (t is refused), got {str(op)[:20]!r}")
    row = change.get("after")
    if not isinstance(row, dict):
        raise InvalidEvent("missing_after", f"a {_DEBEZIUM_UPSERTS[op]} event without an 'after' row")
    return _row_event(row, key, key_value, headers, mapping, limits, version_row=change)


def _row_event(
    row: dict[str, Any], key: bytes | None, key_value: Any, headers: Any, mapping: Mapping, limits: Limits, *, version_row: Any,
) -> Decoded:
    event_id = _id(row, key, key_value, mapping, limits)
    text = _text(row, mapping)
    text_bytes = len(text.encode("utf-8", "surrogatepass"))
    if text_bytes > limits.max_text_bytes:
        raise InvalidEvent("text_too_large", f"text is {text_bytes} bytes, limit is {limits.max_text_bytes}")
    metadata = _metadata(row, mapping, limits)
    return Decoded(InputEvent(id=event_id, text=text, metadata=metadata, op=OP_UPSERT), _version(version_row, headers, mapping))


def _id(row: Any, key: bytes | None, key_value: Any, mapping: Mapping, limits: Limits) -> str:
    path = mapping.id_from
    if path == "key":
        if not key:
            raise InvalidEvent("missing_id", "the record has no key to take the id from")
        try:
            return _check_id(key.decode("utf-8"), limits)
        except UnicodeDecodeError as bad:
            raise InvalidEvent("invalid_id", f"the key is not valid UTF-8 at byte {bad.start}") from None
    if path.startswith("key."):
        value = lookup(key_value, path[4:])
    else:
        value = lookup(row, path) if row else _MISSING
        if value is _MISSING and key_value is not _MISSING:
            value = lookup(key_value, path)  # a Debezium key struct holds the primary key (deletes, tombstones)
    if value is _MISSING or value is None:
        raise InvalidEvent("missing_id", f"no id at {path!r}")
    text = _scalar_text(value)
    if text is None:
        raise InvalidEvent("invalid_id", f"the id at {path!r} must be a string or a number, got {type(value).__name__}")
    return _check_id(text, limits)


def _text(row: dict[str, Any], mapping: Mapping) -> str:
    spec = mapping.text_from
    if "{" in spec:
        def part(match: re.Match[str]) -> str:
            return _part_text(lookup(row, match.group(1).strip()))

        fields = _text_parts(spec)
        # A template of fields that are all missing is no text, whatever its literal parts.
        text = _PLACEHOLDER.sub(part, spec.replace("\\n", "\n")) if any(_part_text(lookup(row, f)).strip() for f in fields) else ""
    else:
        fields = _text_parts(spec)
        text = "\n\n".join(filter(None, (_part_text(lookup(row, f)) for f in fields)))
    if not text.strip():
        kind = "missing_text" if all(lookup(row, f) in (_MISSING, None) for f in fields) else "empty_text"
        raise InvalidEvent(kind, f"no text in {', '.join(repr(f) for f in fields)}")
    return _check_string("text", text)


def _part_text(value: Any) -> str:
    if value is _MISSING or value is None:
        return ""
    text = _scalar_text(value)
    return text if text is not None else orjson.dumps(value).decode()


def _metadata(row: dict[str, Any], mapping: Mapping, limits: Limits) -> dict[str, Any]:
    if mapping.metadata_from == "metadata":
        metadata = row.get("metadata")
        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise InvalidEvent("invalid_metadata", f"metadata must be an object, got {type(metadata).__name__}")
    else:
        metadata = {}
        for path in (p.strip() for p in mapping.metadata_from.split(",")):
            if path.endswith(".*"):
                found = lookup(row, path[:-2])
                if isinstance(found, dict):
                    metadata.update(found)
            else:
                found = lookup(row, path)
                if found is not _MISSING:
                    metadata[path.rsplit(".", 1)[-1]] = found
    if metadata:
        encoded = orjson.dumps(metadata)
        size = len(encoded)
        if size > limits.max_metadata_bytes:
            raise InvalidEvent("metadata_too_large", f"metadata is {size} bytes, limit is {limits.max_metadata_bytes}")
        if _may_nest_deeper(encoded, limits.max_depth - 1) and _depth(metadata, limits.max_depth - 1) > limits.max_depth - 1:
            raise InvalidEvent("too_deep", f"metadata nesting deeper than {limits.max_depth}")
    return metadata


def _version(row: Any, headers: Any, mapping: Mapping) -> int | None:
    """The first of `version_from`'s alternatives (`a|b`) that is present: a non-negative integer."""
    for source in filter(None, mapping.version_from.split("|")):
        if source.startswith("header:"):
            name = source[7:]
            value: Any = next((v for k, v in (headers or ()) if k == name and v is not None), _MISSING)
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
        else:
            value = lookup(row, source)
        if value is _MISSING or value is None:
            continue
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidEvent("invalid_version", f"the version at {source!r} must be a non-negative integer")
        return value
    return None
