"""aiokafka's errors become the project's `BrokerError` kinds at the backend, acknowledgements included."""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiokafka import errors

from streams.backends import BrokerError, BrokerUnavailable, CommitFailed, NotAssigned, RecordTooLarge
from streams.backends.errors import from_client
from streams.backends.kafka import _acknowledged


@pytest.mark.parametrize("raised, kind, retriable", [
    (errors.CommitFailedError("rebalanced"), CommitFailed, False),
    (errors.IllegalStateError("not assigned"), NotAssigned, False),
    (AssertionError("no such partition"), NotAssigned, False),
    (errors.MessageSizeTooLargeError("big"), RecordTooLarge, False),
    (errors.KafkaConnectionError("down"), BrokerUnavailable, True),
    (errors.KafkaTimeoutError("slow"), BrokerUnavailable, True),
    (errors.NotLeaderForPartitionError("moved"), BrokerError, True),
])
def test_client_errors_map_to_kinds_keeping_the_clients_name(raised, kind, retriable):
    mapped = from_client(raised)
    assert type(mapped) is kind and mapped.retriable is retriable
    assert mapped.kind == (type(raised).__name__ if not isinstance(raised, AssertionError) else "IllegalStateError")


async def test_an_acknowledgement_fails_with_the_projects_error_and_cancels_through():
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(str(context.get("message"))))
    try:
        failing = loop.create_future()
        acknowledged = _acknowledged(failing)
        failing.set_exception(errors.KafkaConnectionError("broker gone"))
        with pytest.raises(BrokerUnavailable) as refused:
            await acknowledged
        assert refused.value.kind == "KafkaConnectionError" and isinstance(refused.value.__cause__, errors.KafkaConnectionError)

        pending = loop.create_future()
        _acknowledged(pending).cancel()
        await asyncio.sleep(0)
        assert pending.cancelled(), "cancelling the acknowledgement cancels the client's future"

        abandoned = loop.create_future()
        waiter = _acknowledged(abandoned)
        waiter.cancel()
        await asyncio.sleep(0)
        del failing, acknowledged, pending, abandoned, waiter
        gc.collect()
        await asyncio.sleep(0)
        assert unretrieved == []
    finally:
        loop.set_exception_handler(previous)
