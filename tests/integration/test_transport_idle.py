"""Idle Kafka producers, RabbitMQ connections and RabbitMQ channels are closed on a
timer (``engine.transports.base.IdleSweep``), not only when a delivery comes: a
transport whose last hook was deleted gets no more deliveries, and kept them open for
good (and a Kafka producer kept asking for its topic, which a broker that creates
topics then made again after the operator deleted it).

Against the real RabbitMQ (queues ``hookray-test-idle-*``, deleted afterwards) and the
session's tansu broker (topics ``hookray-test-idle-*``, deleted afterwards). The idle
limits are shortened to fractions of a second; after one delivery, nothing but the
timer runs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient

import engine.transports.base as base
import engine.transports.kafka as kafka_module
import engine.transports.rabbitmq as rabbitmq_module
from engine.hooks import Kafka, RabbitQueue
from engine.transports.base import Delivery, Outcome
from engine.transports.kafka import KafkaTransport
from engine.transports.rabbitmq import RabbitQueueTransport
from tests.kafka_fixtures import Tansu, consume_async
from tests.rabbit_fixtures import Rabbit, listing

pytestmark = pytest.mark.integration

CHECK_SEC = 0.5  # IDLE_CHECK_SEC in these tests (the timer's floor, IDLE_TIMER_MIN_SEC)


def delivery(n: int = 3, tag: str = "d", kind: str = "kafka") -> Delivery:
    return Delivery(id=f"{tag}-{uuid.uuid4().hex[:6]}", hook_id=1, account_id=1, kind=kind,
                    parts=[json.dumps({"n": i, "tag": tag}).encode() for i in range(n)],
                    keys=[""] * n, message_ids=[f"{tag}-m{i}" for i in range(n)])


def quick(monkeypatch: pytest.MonkeyPatch, module: Any, close_sec: float,
          topic_sec: float | None = None) -> None:
    """Idle limits of fractions of a second: the sweep every CHECK_SEC."""
    monkeypatch.setattr(base, "IDLE_CHECK_SEC", CHECK_SEC)
    monkeypatch.setattr(module, "IDLE_CLOSE_SEC", close_sec)
    if topic_sec is not None:
        monkeypatch.setattr(module, "TOPIC_IDLE_SEC", topic_sec)


async def wait_until(predicate: Callable[[], Any], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def timer_running(transport: Any) -> bool:
    return bool(transport._idle.running)


# --- Kafka ------------------------------------------------------------------------------


def kafka_topic_name() -> str:
    return f"hookray-test-idle-{uuid.uuid4().hex[:10]}"


async def delete_topics(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    present = set(await admin.list_topics())
    gone = [t for t in topics if t in present]
    if gone:
        await admin.delete_topics(gone)


def test_kafka_producer_no_delivery_uses_is_stopped_and_its_deleted_topic_stays_deleted(
        kafka_broker: Tansu, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook's last delivery, then none: its producer is stopped after IDLE_CLOSE_SEC
    by the timer, and the topic, deleted by the operator afterwards, is not made again by
    the producer's metadata refreshes (tansu creates a topic a metadata request names)."""
    quick(monkeypatch, kafka_module, close_sec=0.5, topic_sec=0.5)
    options = kafka_module.producer_options
    # a metadata refresh every 0.3 s (aiokafka's default: 5 minutes)
    monkeypatch.setattr(kafka_module, "producer_options",
                        lambda t, s: {**options(t, s), "metadata_max_age_ms": 300})
    topic = kafka_topic_name()
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> dict[str, Any]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap,
                                    request_timeout_ms=5000)
        await admin.start()
        try:
            outcome = await transport.send(
                Kafka(bootstrap_servers=[kafka_broker.bootstrap], topic=topic), delivery())
            (slot,) = transport._slots.values()
            producer = slot.producer
            assert producer is not None and topic in await admin.list_topics()
            # no delivery from here on
            stopped = await wait_until(lambda: producer._closed and not transport._closing, 5)
            forgotten = not transport._slots
            timer_ended = await wait_until(lambda: not timer_running(transport), 2)
            await admin.delete_topics([topic])
            await asyncio.sleep(2.0)  # several refreshes, had the producer lived on
            topics = await admin.list_topics()
            return {"outcome": outcome, "stopped": stopped, "forgotten": forgotten,
                    "timer_ended": timer_ended, "topics": topics}
        finally:
            await transport.close()
            try:
                await delete_topics(admin, [topic])
            finally:
                await admin.close()

    got = asyncio.run(go())
    assert got["outcome"].ok, got["outcome"]
    # (the producer stopped, the deleted topic made again)
    assert (got["stopped"], topic in got["topics"]) == (True, False), \
        "the idle producer lived on without a delivery, or its deleted topic came back"
    assert got["forgotten"] and got["timer_ended"]


def test_kafka_topics_idle_are_let_go_by_the_timer_and_a_producer_left_with_none_stops(
        kafka_broker: Tansu, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no delivery, the producer's metadata stops asking for each topic once it is
    idle for TOPIC_IDLE_SEC (the other still asked for), and the producer is stopped
    when none is left, long before IDLE_CLOSE_SEC; its slot stays."""
    quick(monkeypatch, kafka_module, close_sec=60.0, topic_sec=2.0)
    first, second = kafka_topic_name(), kafka_topic_name()
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> dict[str, Any]:
        try:
            out = [await transport.send(Kafka(bootstrap_servers=[kafka_broker.bootstrap],
                                              topic=first), delivery(tag="a"))]
            await asyncio.sleep(1.0)
            out.append(await transport.send(Kafka(bootstrap_servers=[kafka_broker.bootstrap],
                                                  topic=second), delivery(tag="b")))
            (slot,) = transport._slots.values()
            producer = slot.producer
            assert producer is not None
            asked_both = set(producer.client._topics)
            # no delivery from here on
            only_second = await wait_until(
                lambda: set(producer.client._topics) == {second} and not producer._closed, 4)
            stopped = await wait_until(lambda: producer._closed, 4)
            return {"out": out, "asked_both": asked_both, "only_second": only_second,
                    "stopped": stopped, "slots": len(transport._slots),
                    "producer": slot.producer, "timer": timer_running(transport)}
        finally:
            await transport.close()
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap,
                                        request_timeout_ms=5000)
            await admin.start()
            try:
                await delete_topics(admin, [first, second])
            finally:
                await admin.close()

    got = asyncio.run(go())
    assert all(o.ok for o in got["out"]), got["out"]
    assert got["asked_both"] == {first, second}
    assert got["only_second"], "the idle topic was still asked for"
    assert got["stopped"], "a producer with no topic in use was not stopped"
    assert got["slots"] == 1 and got["producer"] is None and got["timer"]


def test_kafka_producer_a_delivery_holds_is_not_stopped_by_the_timer(
        kafka_broker: Tansu, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery waiting for its acknowledgements longer than IDLE_CLOSE_SEC and
    TOPIC_IDLE_SEC: the timer leaves its producer (and topic) alone, and stops the
    producer once the delivery is done and no other comes."""
    quick(monkeypatch, kafka_module, close_sec=0.3, topic_sec=0.3)
    release = asyncio.Event()
    held = asyncio.Event()
    settled = kafka_module._settled

    async def slow_settled(sent: Any, timeout: float) -> bool:
        held.set()
        await release.wait()
        return await settled(sent, timeout)

    monkeypatch.setattr(kafka_module, "_settled", slow_settled)
    topic = kafka_topic_name()
    transport = KafkaTransport(timeout_sec=20)

    async def go() -> dict[str, Any]:
        try:
            sending = asyncio.create_task(transport.send(
                Kafka(bootstrap_servers=[kafka_broker.bootstrap], topic=topic),
                delivery(5, tag="held")))
            await asyncio.wait_for(held.wait(), 10)
            (slot,) = transport._slots.values()
            producer = slot.producer
            assert producer is not None
            await asyncio.sleep(4 * CHECK_SEC)  # several sweeps, the delivery idle by time
            kept = (not producer._closed, slot.producer is producer,
                    list(transport._slots.values()) == [slot], set(producer.client._topics))
            release.set()
            outcome = await sending
            # no delivery from here on
            stopped = await wait_until(lambda: producer._closed, 5)
            records = await consume_async(kafka_broker.bootstrap, topic, 5, timeout=10)
            return {"kept": kept, "outcome": outcome, "stopped": stopped,
                    "records": records}
        finally:
            release.set()
            await transport.close()
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap,
                                        request_timeout_ms=5000)
            await admin.start()
            try:
                await delete_topics(admin, [topic])
            finally:
                await admin.close()

    got = asyncio.run(go())
    assert got["kept"] == (True, True, True, {topic}), "the timer closed a producer in use"
    assert got["outcome"].ok, got["outcome"]
    assert sorted(r.message_id for r in got["records"]) == [f"held-m{i}" for i in range(5)]
    assert got["stopped"], "the producer was not stopped once the delivery was done"


# --- RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture
def rabbit_idle(rabbit: Rabbit) -> Rabbit:
    """The ``rabbit`` admin, its queues named hookray-test-idle-* (deleted afterwards)."""
    rabbit.prefix = f"hookray-test-idle-{uuid.uuid4().hex[:8]}"
    return rabbit


def own_connections(rabbit: Rabbit) -> set[str]:
    """This process's connections to the broker, as RabbitMQ names them."""
    process = psutil.Process()
    connections = process.net_connections("tcp") if hasattr(process, "net_connections") \
        else process.connections("tcp")
    return {f"{c.laddr.ip}:{c.laddr.port} -> {c.raddr.ip}:{c.raddr.port}"
            for c in connections
            if c.raddr and c.raddr.port == rabbit.port and c.status == psutil.CONN_ESTABLISHED}


async def broker_channels(names: set[str]) -> dict[str, int]:
    """The broker's view: open channels of each of its connections ``names`` holds."""
    rows = await asyncio.to_thread(listing, "list_connections", "name", "channels")
    return {row[0]: int(row[1]) for row in rows if len(row) >= 2 and row[0] in names}


async def broker_sees(names: set[str], want: dict[str, int], seconds: float
                      ) -> dict[str, int]:
    """``broker_channels(names)``, polled until it is ``want`` or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while True:
        seen = await broker_channels(names)
        if seen == want or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.2)


def test_rabbitmq_connection_no_delivery_uses_is_closed(
        rabbit_idle: Rabbit, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook's last delivery, then none: its connection is closed after IDLE_CLOSE_SEC
    by the timer, for the transport and for the broker (8 s: the broker's view, read
    with rabbitmqctl, takes a second or two to show it open, more on a busy machine)."""
    quick(monkeypatch, rabbitmq_module, close_sec=8.0)
    queue = rabbit_idle.declare_queue("conn")
    transport = RabbitQueueTransport(timeout_sec=10)

    async def go() -> dict[str, Any]:
        before = own_connections(rabbit_idle)
        try:
            outcome = await transport.send(RabbitQueue(**rabbit_idle.broker(), queue=queue),
                                           delivery(kind="rabbitmq_queue"))
            (broker,) = transport._brokers.values()
            assert broker.current is not None
            connection = broker.current.connection
            ours = own_connections(rabbit_idle) - before
            seen_open = await broker_channels(ours)
            # no delivery from here on
            closed = await wait_until(lambda: connection.is_closed, 15)
            seen_after = await broker_sees(ours, {}, 5)
            timer_ended = await wait_until(lambda: not timer_running(transport), 2)
            return {"outcome": outcome, "ours": ours, "seen_open": seen_open,
                    "closed": closed, "seen_after": seen_after,
                    "forgotten": not transport._brokers, "timer_ended": timer_ended}
        finally:
            await transport.close()

    got = asyncio.run(go())
    assert got["outcome"].ok, got["outcome"]
    assert len(got["ours"]) == 1 and list(got["seen_open"].values()) == [1], got
    assert got["closed"], "the idle connection was not closed without a delivery"
    assert got["seen_after"] == {}, f"the broker still has it: {got['seen_after']}"
    assert got["forgotten"] and got["timer_ended"]


def test_rabbitmq_channel_of_a_destination_no_longer_used_is_closed_the_connection_kept(
        rabbit_idle: Rabbit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two queues on one connection; deliveries go on to one only: the other's channel
    is closed after IDLE_CLOSE_SEC, the connection and the used channel stay open (8 s:
    the broker's view, read with rabbitmqctl, takes a second or two to show both, more
    on a busy machine)."""
    quick(monkeypatch, rabbitmq_module, close_sec=8.0)
    gone, used = rabbit_idle.declare_queue("gone"), rabbit_idle.declare_queue("used")
    transport = RabbitQueueTransport(timeout_sec=10)

    def target(queue: str) -> RabbitQueue:
        return RabbitQueue(**rabbit_idle.broker(), queue=queue)

    async def go() -> dict[str, Any]:
        before = own_connections(rabbit_idle)
        try:
            out = [await transport.send(target(gone), delivery(kind="rabbitmq_queue",
                                                               tag="gone")),
                   await transport.send(target(used), delivery(kind="rabbitmq_queue",
                                                               tag="used0"))]
            (broker,) = transport._brokers.values()
            conn = broker.current
            assert conn is not None
            gone_dest = conn.dests[("queue", gone)]
            assert gone_dest.current is not None
            gone_channel = gone_dest.current.channel
            used_channel = conn.dests[("queue", used)].current.channel  # type: ignore[union-attr]
            # the hook of "gone" is deleted: deliveries go on to "used" only, every
            # 0.2 s, also while the broker is asked (rabbitmqctl takes seconds)
            stop = asyncio.Event()

            async def keep_using() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    out.append(await transport.send(target(used), delivery(
                        kind="rabbitmq_queue", tag=f"used{n}")))
                    await asyncio.sleep(0.2)

            using = asyncio.create_task(keep_using())
            try:
                ours = own_connections(rabbit_idle) - before
                seen_both = await broker_channels(ours)
                await wait_until(lambda: gone_channel.is_closed, 15)
                seen_after = await broker_sees(ours, dict.fromkeys(ours, 1), 5)
            finally:
                stop.set()
                await using
            return {"out": out, "ours": ours, "seen_both": seen_both,
                    "gone_closed": gone_channel.is_closed,
                    "dests": sorted(k[1] for k in conn.dests),
                    "same_connection": broker.current is conn
                    and not conn.connection.is_closed,
                    "used_open": not used_channel.is_closed
                    and getattr(conn.dests[("queue", used)].current, "channel", None)
                    is used_channel,
                    "seen_after": seen_after}
        finally:
            await transport.close()

    got = asyncio.run(go())
    assert all(o.ok for o in got["out"]), got["out"]
    assert len(got["ours"]) == 1 and list(got["seen_both"].values()) == [2], got
    assert got["gone_closed"], "the unused destination's channel was not closed"
    assert got["dests"] == [used]
    assert got["same_connection"] and got["used_open"]
    assert list(got["seen_after"].values()) == [1], f"the broker's view: {got['seen_after']}"


def test_rabbitmq_connection_and_channel_a_delivery_holds_are_not_closed_by_the_timer(
        rabbit_idle: Rabbit, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery waiting for its confirms longer than IDLE_CLOSE_SEC: the timer leaves
    its connection and channel alone, and closes them once it is done and no other
    delivery comes."""
    quick(monkeypatch, rabbitmq_module, close_sec=0.3)
    release = asyncio.Event()
    held = asyncio.Event()
    publish_all = rabbitmq_module.publish_all

    async def slow_publish_all(*args: Any, **kwargs: Any) -> Any:
        held.set()
        await release.wait()
        return await publish_all(*args, **kwargs)

    monkeypatch.setattr(rabbitmq_module, "publish_all", slow_publish_all)
    queue = rabbit_idle.declare_queue("held")
    transport = RabbitQueueTransport(timeout_sec=20)

    async def go() -> dict[str, Any]:
        try:
            sending = asyncio.create_task(transport.send(
                RabbitQueue(**rabbit_idle.broker(), queue=queue),
                delivery(4, kind="rabbitmq_queue", tag="held")))
            await asyncio.wait_for(held.wait(), 10)
            (broker,) = transport._brokers.values()
            conn = broker.current
            assert conn is not None
            dest = conn.dests[("queue", queue)]
            assert dest.current is not None
            channel = dest.current.channel
            await asyncio.sleep(4 * CHECK_SEC)  # several sweeps, the delivery idle by time
            kept = (not conn.connection.is_closed, not channel.is_closed,
                    list(transport._brokers.values()) == [broker], list(conn.dests))
            release.set()
            outcome: Outcome = await sending
            # no delivery from here on
            closed = await wait_until(lambda: conn.connection.is_closed, 5)
            return {"kept": kept, "outcome": outcome, "closed": closed}
        finally:
            release.set()
            await transport.close()

    got = asyncio.run(go())
    assert got["kept"] == (True, True, True, [("queue", queue)]), \
        "the timer closed a connection or channel in use"
    assert got["outcome"].ok, got["outcome"]
    assert sorted(m.message_id or "" for m in rabbit_idle.consume(queue, expect=4)) == \
        [f"held-m{i}" for i in range(4)]
    assert got["closed"], "the connection was not closed once the delivery was done"


# --- the timer itself -------------------------------------------------------------------


def test_idle_sweep_timer_logs_a_failure_goes_on_and_ends_with_stop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A sweep that raises is logged and tried again at the next tick; the timer ends
    when the sweep leaves nothing to watch, starts again on demand, and ``stop()`` ends
    it (the transport's ``close()``)."""
    monkeypatch.setattr(base, "IDLE_CHECK_SEC", 0.05)
    monkeypatch.setattr(base, "IDLE_TIMER_MIN_SEC", 0.05, raising=False)
    calls: list[float] = []
    left: dict[str, Any] = {"entries": True, "fail": 2}

    def sweep() -> bool:
        calls.append(time.monotonic())
        if left["fail"]:
            left["fail"] -= 1
            raise RuntimeError("sweep broke")
        return bool(left["entries"])

    async def go() -> dict[str, Any]:
        sweeper = base.IdleSweep(sweep, "test transport")
        sweeper.start()
        sweeper.start()  # one timer only
        ticked = await wait_until(lambda: len(calls) >= 4, 3)
        left["entries"] = False
        ended = await wait_until(lambda: not sweeper.running, 3)
        count = len(calls)
        await asyncio.sleep(0.3)
        still = len(calls) == count
        left["entries"] = True
        sweeper.start()
        restarted = await wait_until(lambda: len(calls) > count, 3) and sweeper.running
        await sweeper.stop()
        stopped = not sweeper.running
        count = len(calls)
        await asyncio.sleep(0.3)
        return {"ticked": ticked, "ended": ended, "still": still, "restarted": restarted,
                "stopped": stopped and len(calls) == count}

    with caplog.at_level(logging.ERROR, logger="hookray"):
        got = asyncio.run(go())
    assert got == {"ticked": True, "ended": True, "still": True, "restarted": True,
                   "stopped": True}
    failures = [r for r in caplog.records if "closing idle connections failed" in r.message]
    assert len(failures) == 2


def test_rabbitmq_entries_are_idle_from_their_last_deliverys_end_not_its_start(
        rabbit_idle: Rabbit, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery that took longer than IDLE_CLOSE_SEC (a slow broker, a loaded
    machine) leaves its connection and channel just used: a sweep right after it
    keeps them (counted from its start, they were closed between two deliveries)."""
    quick(monkeypatch, rabbitmq_module, close_sec=0.5)
    monkeypatch.setattr(base, "IDLE_CHECK_SEC", 3600.0)  # the sweep run here, by hand
    publish_all = rabbitmq_module.publish_all

    async def slow_publish_all(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)
        return await publish_all(*args, **kwargs)

    monkeypatch.setattr(rabbitmq_module, "publish_all", slow_publish_all)
    queue = rabbit_idle.declare_queue("slow")
    transport = RabbitQueueTransport(timeout_sec=20)

    async def go() -> dict[str, Any]:
        try:
            outcome = await transport.send(RabbitQueue(**rabbit_idle.broker(), queue=queue),
                                           delivery(kind="rabbitmq_queue", tag="slow"))
            (broker,) = transport._brokers.values()
            conn = broker.current
            assert conn is not None
            transport._sweep_idle()  # at once after the delivery
            kept = (list(transport._brokers.values()) == [broker], list(conn.dests))
            await asyncio.sleep(0.7)  # then idle for longer than IDLE_CLOSE_SEC
            transport._sweep_idle()
            closed = await wait_until(lambda: conn.connection.is_closed, 5)
            return {"outcome": outcome, "kept": kept, "closed": closed,
                    "forgotten": not transport._brokers}
        finally:
            await transport.close()

    got = asyncio.run(go())
    assert got["outcome"].ok, got["outcome"]
    assert got["kept"] == (True, [("queue", queue)])
    assert got["closed"] and got["forgotten"]
