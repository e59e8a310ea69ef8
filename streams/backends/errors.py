"""The Kafka side's failures, in the project's own types: the runtime never imports a client's errors.

Owns: `BrokerError` and its kinds, and `from_client`, which maps aiokafka's errors onto them (as
httpx maps httpcore's). Must not: know the runtime. `kind` keeps the transport's own name for the
failure (a fixed set of class names: a bounded metric label and a useful log word);
`retriable` says whether trying again may succeed.
"""

from __future__ import annotations


class BrokerError(Exception):
    """A failure of the Kafka side; the client's own error is its `__cause__`."""

    def __init__(self, message: str = "", *, kind: str | None = None, retriable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind or type(self).__name__
        self.retriable = retriable


class BrokerUnavailable(BrokerError):
    """No connection to the broker, or it did not answer in time: transient."""

    def __init__(self, message: str = "", *, kind: str | None = None, retriable: bool = True) -> None:
        super().__init__(message, kind=kind, retriable=retriable)


class CommitFailed(BrokerError):
    """The group rebalanced: this member no longer owns a partition it commits; nothing was committed."""


class NotAssigned(BrokerError):
    """The partition is not (or no longer) assigned to this consumer."""


class RecordTooLarge(BrokerError):
    """A record over the client's or the broker's size limit."""


def from_client(exc: BaseException) -> BrokerError:
    """The project's error for one of aiokafka's (or the exception itself, when it already is one)."""
    if isinstance(exc, BrokerError):
        return exc
    from aiokafka import errors

    kind = type(exc).__name__
    message = str(exc) or kind
    retriable = bool(getattr(exc, "retriable", False))
    if isinstance(exc, (errors.CommitFailedError, errors.RebalanceInProgressError, errors.IllegalGenerationError,
                        errors.UnknownMemberIdError)):
        return CommitFailed(message, kind=kind, retriable=retriable)
    if isinstance(exc, (errors.IllegalStateError, AssertionError, KeyError)):
        # aiokafka asserts, or finds no state for, a partition it no longer has during a rebalance.
        return NotAssigned(message, kind="IllegalStateError" if not isinstance(exc, errors.KafkaError) else kind)
    if isinstance(exc, (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError)):
        return RecordTooLarge(message, kind=kind)
    if isinstance(exc, (errors.KafkaConnectionError, errors.KafkaTimeoutError, errors.NodeNotReadyError,
                        errors.RequestTimedOutError, TimeoutError)):
        return BrokerUnavailable(message, kind=kind)
    if isinstance(exc, errors.KafkaError):
        return BrokerError(message, kind=kind, retriable=retriable)
    raise TypeError(f"not a broker error: {type(exc).__name__}")


def client_errors() -> tuple[type[BaseException], ...]:
    """What aiokafka raises that `from_client` maps (its own errors, and the asserts of a rebalance)."""
    from aiokafka.errors import KafkaError

    return (KafkaError, AssertionError, KeyError)
