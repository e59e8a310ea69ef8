"""The project's error types, in one module every layer may import.

Owns: what can go wrong in the embedder, the cache, the store and the worker, named so the
runtime can tell a deployment error (stop, one line), an outage (hold and retry) and a bad
document (its dead letter) apart. Must not: import anything of the project (it is the bottom).
(`schemas.InvalidEvent` stays with the codecs that raise it; `streams.config.ConfigError` with
the settings table.)
"""

from __future__ import annotations


class SinkConfigError(Exception):
    """The store cannot be used as configured (e.g. a dimension mismatch); fatal at start-up."""


class StoreRejected(Exception):
    """The store refused a write for a reason retrying cannot fix (a 4xx, a client-side validation error).

    For one document it is that document's dead letter (`store_rejected`); for every document
    (a deleted collection, a wrong key) the pipeline treats it as an outage.
    """


class EmbeddingServerError(Exception):
    """The server did not embed a request (after retries, or for a reason retrying cannot fix)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ModelRefusesEverything(Exception):
    """The model (an embedding server) refuses the probe text too: a deployment error, held like an outage."""


class WorkerError(Exception):
    """A fault the worker cannot go on from; it stops and the next start replays."""


class PublishError(WorkerError):
    """A record neither the client nor the broker will ever accept (not retriable) and that has no smaller form."""
