"""Which records of a Kafka delivery are sent again when some of its batches fail."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import NotLeaderForPartitionError

from engine.errors import Timeout
from engine.transports.base import Delivery, Outcome, undelivered
from engine.transports.kafka import KafkaTransport, unacknowledged


def futures(*states: str) -> list[asyncio.Future[Any]]:
    """Futures of record batches: "ok" acknowledged, "error" failed, "pending",
    "cancelled"."""
    loop = asyncio.get_running_loop()
    out: list[asyncio.Future[Any]] = []
    for state in states:
        future = loop.create_future()
        if state == "ok":
            future.set_result(None)
        elif state == "error":
            future.set_exception(NotLeaderForPartitionError())
            future.exception()  # retrieved
        elif state == "cancelled":
            future.cancel()
        out.append(future)
    return out


async def test_only_the_records_of_unacknowledged_batches_are_failed() -> None:
    # 7 records: partition A's batch holds 0, 2, 4 (gathered), B's 1, 3 and 5, 6
    positions: list[range | list[int]] = [[0, 2, 4], [1, 3], [5, 6]]
    assert unacknowledged(futures("ok", "error", "ok"), positions, 7) == [1, 3]
    assert unacknowledged(futures("ok", "pending", "cancelled"), positions, 7) == [1, 3, 5, 6]
    assert unacknowledged(futures("error", "ok", "pending"), positions, 7) == [0, 2, 4, 5, 6]


async def test_nothing_acknowledged_is_a_whole_failure() -> None:
    positions: list[range | list[int]] = [range(0, 3), range(3, 5)]
    assert unacknowledged(futures("error", "pending"), positions, 5) is None
    assert unacknowledged([], [], 5) is None  # failed before any batch was handed over


async def test_records_never_handed_over_are_failed() -> None:
    """Handing over the third batch failed: the first two were acknowledged."""
    assert unacknowledged(futures("ok", "ok"), [range(0, 2), range(2, 4)], 6) == [4, 5]


async def test_a_partly_acknowledged_delivery_resends_only_its_failed_records() -> None:
    delivery = Delivery(id="d", hook_id=1, account_id=1, kind="kafka",
                        parts=[b"a", b"b", b"c", b"d"], keys=["k0", "k1", "k2", "k3"],
                        message_ids=["m0", "m1", "m2", "m3"])
    failed = unacknowledged(futures("ok", "pending"), [[0, 2], [1, 3]], delivery.count)
    rest, done = undelivered(delivery, Outcome(ok=False, error="Timeout", failed=failed))
    assert done == 2
    assert (rest.parts, rest.keys, rest.message_ids) == ([b"b", b"d"], ["k1", "k3"],
                                                         ["m1", "m3"])


async def test_a_partly_acknowledged_delivery_says_how_many_records_were_not() -> None:
    """Its error, kept as the re-send's or dead letter's last error, said every record
    was not acknowledged when some batches were."""
    transport = KafkaTransport(timeout_sec=1)
    delivery = Delivery(id="d", hook_id=1, account_id=1, kind="kafka",
                        parts=[b"a", b"b", b"c", b"d"])
    where = "Kafka 127.0.0.1:9 topic 't'"

    async def batches(slot: Any, topic: str, d: Delivery, at: str, sent: Any) -> None:
        sent.waiters.extend(futures("ok", "pending"))
        sent.positions.extend([[0, 2], [1, 3]])
        raise Timeout(f"{at}: {d.count} record(s) not acknowledged within 1 s "
                      "(acknowledgement)")

    transport._attempt_batches = batches  # type: ignore[method-assign]
    with pytest.raises(Timeout) as failed:
        await transport._attempt(None, "t", delivery, where)  # type: ignore[arg-type]
    assert str(failed.value) == (f"{where}: 2 of 4 record(s) not acknowledged within 1 s "
                                 "(acknowledgement)")
    assert failed.value.failed == [1, 3]
