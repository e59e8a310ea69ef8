"""Event types (input, result, dead letter) and their codecs."""

from schemas.events import (
    DEFAULT_LIMITS,
    POINT_NAMESPACE,
    InputEvent,
    InvalidEvent,
    Limits,
    ResultEvent,
    SourcePosition,
    content_hash,
    decode_input,
    encode_dead_letter,
    encode_input,
    normalize_text,
    point_id,
)

__all__ = [
    "DEFAULT_LIMITS",
    "POINT_NAMESPACE",
    "InputEvent",
    "InvalidEvent",
    "Limits",
    "ResultEvent",
    "SourcePosition",
    "content_hash",
    "decode_input",
    "encode_dead_letter",
    "encode_input",
    "normalize_text",
    "point_id",
]
