"""Publishing results and dead letters, in offset order, and only for partitions still owned.

Owns: `Publisher` (send and await every acknowledgement; retry what is retriable with
backoff, send a smaller form of what the broker can never take, stop with one line when
there is none), the dead-letter envelope of a message, and the `Publish` step (a batch's
results and dead letters in its publishing turn). The Faust runtime uses `Publisher` and
`dead_letter_record` too. Must not: commit, or publish for a fenced message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Awaitable, Callable, Sequence


from processors.backoff import Backoff
from processors.errors import PublishError
from processors.ordering import Sequencer, Turn
from schemas.tenancy import expected_key
from processors.pipeline import Outcome
from schemas import SourcePosition, encode_dead_letter, headers_size
from streams.backends import BrokerError
from streams.steps import Fetched, TaskSet
from streams.steps.finish import Finish

log = logging.getLogger(__name__)

_MAX_KEY_BYTES = 4096
MAX_RECORD_BYTES = 1_000_000
"""Records are kept under Kafka's default `message.max.bytes` (1,048,588) with room for the batch overhead."""
_RECORD_OVERHEAD_BYTES = 64


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    fallback: bytes | None = None
    """What to send instead if the broker refuses `value` for good (a dead letter without its payload)."""
    kind: str = "result"
    """`result` or `dead_letter`: a bounded metric label."""
    live: Callable[[], bool] | None = None
    """False once the record's input is fenced (its partition revoked): then it is not sent (again)."""
    headers: tuple[tuple[str, bytes], ...] = ()


def dead_letter_record(
    *, topic: str, source: SourcePosition, key: bytes | None, payload: bytes | None, kind: str, message: str,
    max_payload_bytes: int, live: Callable[[], bool] | None = None, headers: tuple[tuple[str, bytes], ...] = (),
) -> OutRecord:
    """A message's dead letter, keyed like the input, with its payload capped (and a bare fallback)."""
    value = encode_dead_letter(kind=kind, message=message, source=source, payload=payload, max_payload_bytes=max_payload_bytes)
    bare = encode_dead_letter(kind=kind, message=message[:1000], source=source, payload=payload, max_payload_bytes=0)
    return OutRecord(topic, key if key is None or len(key) <= _MAX_KEY_BYTES else None, value, bare, "dead_letter", live, headers)


def record_size(record: OutRecord) -> int:
    """What the broker counts against its limit: key, value, headers and a record's own overhead."""
    return len(record.key or b"") + len(record.value) + headers_size(record.headers) + _RECORD_OVERHEAD_BYTES


def error_label(exc: BaseException) -> str:
    """A bounded label value: a broker error's kind (the transport's fixed set of names); anything else is `other`."""
    if isinstance(exc, BrokerError):
        return exc.kind
    name = type(exc).__name__
    return name if name in ("TimeoutError", "CancelledError") else "other"


class Publisher:
    """Sends records and waits for every acknowledgement.

    Keyword-only: `send(topic, key, value)` returns an awaitable acknowledgement (aiokafka's
    `send`, or a Faust topic's); `on_error(kind, error_label)` counts failures; `backoff`
    (0.2 s doubling to 5 s). Retriable errors are retried without end: a message whose
    result cannot be published must not be committed, and the growing backlog pauses the
    consumer meanwhile. A record the broker can never take (too large, invalid) is sent in
    its fallback form; one without a fallback raises `PublishError`.
    """

    def __init__(
        self,
        *,
        send: Callable[[str, bytes | None, bytes, tuple[tuple[str, bytes], ...]], Awaitable[Any]],
        send_many: Callable[[str, list[tuple[bytes | None, bytes, tuple[tuple[str, bytes], ...]]]], Awaitable[list[tuple[list[int], Any]]]] | None = None,
        on_error: Callable[[str, str], None] = lambda kind, error: None,
        backoff: Backoff | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self._send = send
        self.max_record_bytes = max_record_bytes
        self._send_many = send_many
        self._on_error = on_error
        self.backoff = backoff or Backoff(base_seconds=0.2, cap_seconds=5.0)

    async def publish(self, records: Sequence[OutRecord], *, batch_id: str | None = None) -> None:
        remaining, attempt = [self._fit(r) for r in records], 0
        while remaining:
            remaining = [r for r in remaining if r.live is None or r.live()]  # fenced meanwhile: not ours to send
            if not remaining:
                return
            outcomes, by_client = await self._send_all(remaining)
            retry: list[OutRecord] = []
            retriable: BaseException | None = None
            failed_keys: set[bytes | None] = set()
            for index, (record, outcome) in enumerate(zip(remaining, outcomes)):
                if not isinstance(outcome, BaseException):
                    if record.key in failed_keys and record.kind == "result":
                        # A later record of a key whose earlier one failed: send it again after
                        # that one, or the retry would land the older result last.
                        retry.append(record)
                    continue
                failed_keys.add(record.key)
                self._on_error(record.kind, error_label(outcome))
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                who = "the client" if index in by_client else "the broker"
                if _retriable(outcome):
                    retriable = outcome
                    retry.append(record)
                elif record.headers:
                    log.error(
                        "%s refused a %d-byte %s for %s (%s); sending it without its copied headers",
                        who, record_size(record), record.kind.replace("_", " "), record.topic, _name(outcome),
                    )
                    retry.append(replace(record, headers=()))
                elif record.fallback is not None:
                    log.error(
                        "%s refused a %d-byte dead letter for %s (%s); sending it without its payload",
                        who, record_size(record), record.topic, _name(outcome),
                    )
                    retry.append(replace(record, value=record.fallback, fallback=None))
                else:
                    raise PublishError(
                        f"{who} refused a {record_size(record)}-byte {record.kind.replace('_', ' ')} for {record.topic} "
                        f"({_name(outcome)}: {outcome}); it cannot be retried, stopping"
                    )
            if retriable is not None:
                delay = self.backoff.delay(attempt)
                log.warning(
                    "publishing %d events failed (%s); retry in %.2fs", len(retry), _name(retriable), delay,
                    extra={"batch_id": batch_id} if batch_id is not None else None,
                )
                attempt += 1
                await asyncio.sleep(delay)
            remaining = retry


    def _fit(self, record: OutRecord) -> OutRecord:
        """The record in a form within `max_record_bytes`, checked here: aiokafka's `send_many` path
        skips the client's own size check, and the broker's limit may be lower than the client's."""
        if record_size(record) <= self.max_record_bytes:
            return record
        if record.headers:
            log.warning("a %d-byte %s for %s goes without its copied headers (limit %d bytes)",
                        record_size(record), record.kind.replace("_", " "), record.topic, self.max_record_bytes)
            record = replace(record, headers=())
        if record_size(record) > self.max_record_bytes and record.fallback is not None:
            log.warning("a %d-byte %s for %s goes without its payload (limit %d bytes)",
                        record_size(record), record.kind.replace("_", " "), record.topic, self.max_record_bytes)
            record = replace(record, value=record.fallback, fallback=None)
        return record

    async def _send_all(self, records: list[OutRecord]) -> tuple[list[Any], set[int]]:
        """One outcome (an acknowledgement or an exception) per record, and which ones the client refused itself."""
        outcomes: list[Any] = [None] * len(records)
        by_client: set[int] = set()
        acks: list[tuple[list[int], Any]] = []
        singles = list(range(len(records)))
        topics = {r.topic for r in records}
        if self._send_many is not None and len(records) > 1 and len(topics) == 1:
            # Results and bare dead letters are small: whole accumulator batches, one future each.
            try:
                acks = await self._send_many(records[0].topic, [(r.key, r.value, r.headers) for r in records])
                singles = []
            except Exception:  # e.g. one record too large for a batch: send them one by one
                acks, singles = [], list(range(len(records)))
        for index in singles:
            try:
                record = records[index]
                acks.append(([index], await self._send(record.topic, record.key, record.value, record.headers)))
            except Exception as exc:  # the client refused it before sending
                by_client.add(index)
                acks.append(([index], _failed(exc)))
        results = await asyncio.gather(*(ack for _, ack in acks), return_exceptions=True)
        for (indices, _), result in zip(acks, results):
            for index in indices:
                outcomes[index] = result
        return outcomes, by_client


def _name(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, BrokerError) else type(exc).__name__


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, BrokerError):
        return exc.retriable
    return not isinstance(exc, (ValueError, TypeError, AssertionError))


async def _failed(exc: BaseException) -> None:
    raise exc


def split_outcomes(pairs: Sequence[tuple[Any, Outcome]]) -> tuple[list[tuple[Any, Outcome]], list[tuple[Any, str, str]]]:
    """(message, outcome) pairs into results and (message, error kind, error text) failures."""
    results = [(m, o) for m, o in pairs if o.result is not None]
    failures = [(m, o.error_kind or "error", o.error_message or "") for m, o in pairs if o.result is None]
    return results, failures


class Publish:
    """A batch's results and dead letters, in its publishing turn (taken at launch), then `Finish`."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        finish: Finish,
        live: Callable[[Fetched], bool],
        output_topic: str,
        dlq_topic: str,
        dlq_max_payload_bytes: int,
        on_results: Callable[[list[tuple[Fetched, Outcome]], float], None] = lambda results, at: None,
        on_dead_letters: Callable[[list[Fetched], str], None] = lambda items, stage: None,
        admit_dead_letter: Callable[[Fetched], bool] = lambda item: True,
    ) -> None:
        self.publisher = publisher
        self.finish = finish
        self.live = live
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self.dlq_max_payload_bytes = dlq_max_payload_bytes
        self._on_results = on_results
        self._on_dead_letters = on_dead_letters
        self.admit_dead_letter = admit_dead_letter
        """False: the message is held by the one who answered (the dead-letter breaker), not dead-lettered."""
        self._order = Sequencer()

    def take_turn(self) -> Turn:
        return self._order.take()

    async def submit_batch(self, batch: list[Fetched], outcomes: list[Outcome], turn: Turn, *, batch_id: str) -> None:
        async with turn:
            fenced = [item for item in batch if not self.live(item)]
            for item in fenced:
                self.finish.release(item)  # the partition's new owner replays it
            results, failures = split_outcomes([(item, o) for item, o in zip(batch, outcomes) if self.live(item)])
            if results:
                await self.publisher.publish(
                    [OutRecord(self.output_topic, expected_key(o.event), o.result.encode(), live=partial(self.live, item),  # type: ignore[union-attr]
                               headers=item.headers)
                     for item, o in results],
                    batch_id=batch_id,
                )
                # Fenced while publishing: a new assignment may track these offsets again; not ours to finish.
                done = [(item, o) for item, o in results if self._settle(item)]
                self.finish.submit(item for item, _ in done)
                self._on_results(done, time.time())
            # A text the model fails on was counted valid when it decoded: the breaker turns
            # that count into a dead letter in its place (by offset).
            failures = [failure for failure in failures if self.admit_dead_letter(failure[0])]
            if failures:
                await self.dead_letter(failures, stage="embed", batch_id=batch_id)
            log.debug("batch done: %d results, %d dead letters, %d fenced", len(results), len(failures), len(fenced),
                      extra={"batch_id": batch_id})

    async def dead_letter(self, failures: list[tuple[Fetched, str, str]], *, stage: str, batch_id: str | None = None) -> None:
        records = []
        for item, kind, message in failures:
            extra: dict[str, str] = {"message_id": item.message_id}
            if batch_id is not None:
                extra["batch_id"] = batch_id
            event_id = f" (event id {item.event.id!r})" if item.event is not None else ""
            log.warning("dead letter at %s%s: %s: %s", stage, event_id, kind, message[:200], extra=extra)
            source = SourcePosition(topic=item.tp.topic, partition=item.tp.partition, offset=item.offset)
            records.append(dead_letter_record(
                topic=self.dlq_topic, source=source, key=item.key, payload=item.value, kind=kind, message=message,
                max_payload_bytes=self.dlq_max_payload_bytes, live=partial(self.live, item), headers=item.headers,
            ))
        await self.publisher.publish(records, batch_id=batch_id)
        done = [item for item, _, _ in failures if self._settle(item)]
        self.finish.submit(done)
        self._on_dead_letters(done, stage)

    def _settle(self, item: Fetched) -> bool:
        """True when `item` may be finished; a fenced one is released instead (the new owner replays it)."""
        if self.live(item):
            return True
        self.finish.release(item)
        return False


class DeadLetters:
    """Bad input, straight from `Decode` to the dead-letter topic, each in a task of its own."""

    def __init__(self, *, publish: Publish, on_error: Callable[[BaseException], None]) -> None:
        self.publish = publish
        self.running = TaskSet(on_error=on_error)
        self.tasks = self.running.tasks

    def submit(self, failures: list[tuple[Fetched, str, str]]) -> None:
        # Judged here, synchronously in fetch order, not in the task: the breaker's count
        # must see each dead letter between the valid messages around it.
        failures = [failure for failure in failures if self.publish.admit_dead_letter(failure[0])]
        if failures:
            self.running.start(self.publish.dead_letter(failures, stage="decode"))

    def poll(self) -> None:
        return None

    async def join(self, deadline: float | None = None) -> None:
        await self.running.join(deadline)

    def close(self) -> None:
        self.running.close()
