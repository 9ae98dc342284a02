"""The Kafka transport against a real Kafka-compatible broker (tansu), alone and through
the engine: records, keys, headers, partitioning, a broker restart, an unreachable one."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka.partitioner import murmur2

from engine.hooks import Kafka
from engine.messages import message_id
from engine.transports.base import Delivery
from engine.transports.kafka import HEADER, KafkaTransport, producer_options
from tests.kafka_fixtures import Tansu, consume, new_topic
from tests.services import free_port, wait_for

pytestmark = pytest.mark.integration


def delivery(n: int, keys: list[str] | None = None, tag: str = "d") -> Delivery:
    parts = [json.dumps({"n": i, "tag": tag}).encode() for i in range(n)]
    return Delivery(id=f"{tag}-{uuid.uuid4().hex[:6]}", hook_id=1, account_id=1, kind="kafka",
                    parts=parts, keys=keys if keys is not None else [""] * n,
                    message_ids=[f"{tag}-m{i}" for i in range(n)])


def target(bootstrap: str, topic: str, **kwargs: Any) -> Kafka:
    return Kafka(bootstrap_servers=[bootstrap], topic=topic, **kwargs)


def assert_once(records: list[Any], n: int) -> None:
    """``n`` records, each message once: a delivery sent twice (its producer stopped
    under it, say) would pass a count of distinct ids."""
    ids = Counter(r.message_id for r in records)
    assert len(ids) == n and max(ids.values()) == 1, ids.most_common(3)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def send_all(transport: KafkaTransport, tgt: Kafka, *deliveries: Delivery) -> list[Any]:
    try:
        return [await transport.send(tgt, d) for d in deliveries]
    finally:
        await transport.close()


# --- the transport alone --------------------------------------------------------------


def test_one_record_per_part_with_value_key_and_message_id_header(
        kafka_broker: Tansu, kafka_topic: str) -> None:
    keys = ["3.click", "abcdefgh12345678", ""] * 4  # list_event, profile_id, none
    d = delivery(12, keys)
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=5), target(kafka_broker.bootstrap,
                                                                      kafka_topic), d))
    assert outcome.ok, outcome
    assert "12 record(s) acknowledged" in outcome.detail
    records = consume(kafka_broker.bootstrap, kafka_topic, 12)
    assert len(records) == 12
    by_id = {r.message_id: r for r in records}
    assert sorted(by_id) == sorted(d.message_ids)
    for i, mid in enumerate(d.message_ids):
        record = by_id[mid]
        assert record.value == d.parts[i]
        assert record.key == (keys[i].encode() if keys[i] else None)
        assert list(record.headers) == [HEADER]


def test_deliveries_waiting_too_long_for_a_slow_producer_fail_as_timeouts(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledged, slowly: deliveries that wait DESTINATION_QUEUE_SEC for the
    producer fail as Queued timeouts, unsent (retried later); the others land."""
    transport = KafkaTransport(concurrency=1, timeout_sec=5, queue_sec=0.25)
    attempt = transport._attempt

    async def slow_attempt(*args: Any) -> Any:
        await asyncio.sleep(0.6)
        return await attempt(*args)

    monkeypatch.setattr(transport, "_attempt", slow_attempt)
    tgt = target(kafka_broker.bootstrap, kafka_topic)

    async def go() -> list[Any]:
        try:
            return list(await asyncio.gather(*(transport.send(tgt, delivery(3, tag=t))
                                               for t in "abc")))
        finally:
            await transport.close()

    outcomes = run(go())
    assert [o.error for o in outcomes] == [None, "Queued", "Queued"], outcomes
    assert all("waited 0.25 s (DESTINATION_QUEUE_SEC) for one of its 1 sending slot(s)"
               in o.detail for o in outcomes[1:])
    assert sorted(r.message_id for r in consume(kafka_broker.bootstrap, kafka_topic, 3)) == \
        ["a-m0", "a-m1", "a-m2"]


def test_partitions_follow_the_key_like_kafkas_default_partitioner(
        kafka_broker: Tansu, kafka_topic: str) -> None:
    keys = [f"{n % 7}.click" for n in range(200)]
    keyed = delivery(200, keys, tag="k")
    keyless = [delivery(30, tag=f"u{i}") for i in range(4)]
    outcomes = run(send_all(KafkaTransport(timeout_sec=5),
                            target(kafka_broker.bootstrap, kafka_topic), keyed, *keyless))
    assert all(o.ok for o in outcomes), outcomes
    records = consume(kafka_broker.bootstrap, kafka_topic, 200 + 4 * 30)
    assert len(records) == 320
    for r in records:
        if r.key is not None:  # murmur2(key) mod partitions, as a Java producer does
            assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4
    # keyless: each delivery sticks to one partition, deliveries rotate over all four
    sticky: dict[str, set[int]] = {json.loads(r.value)["tag"]: set() for r in records
                                   if r.key is None}
    for r in records:
        if r.key is None:
            sticky[json.loads(r.value)["tag"]].add(r.partition)
    assert all(len(p) == 1 for p in sticky.values()), sticky
    assert {p for ps in sticky.values() for p in ps} == {0, 1, 2, 3}
    # order within a partition is the delivery's order
    seq: dict[int, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        if r.key is not None:
            seq.setdefault(r.partition, []).append(json.loads(r.value)["n"])
    assert all(s == sorted(s) for s in seq.values())


def test_keyless_records_go_only_to_partitions_with_a_leader(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions 0 and 3 without a leader (as the producer's metadata says while a
    broker is away): keyless deliveries rotate over 1 and 2 only; keyed records keep
    their key's partition, as Kafka's own partitioner does."""
    from aiokafka.cluster import ClusterMetadata

    available = ClusterMetadata.available_partitions_for_topic

    def without_0_and_3(self: ClusterMetadata, topic: str) -> Any:
        found = available(self, topic)
        return None if found is None else {p for p in found if p not in (0, 3)}

    monkeypatch.setattr(ClusterMetadata, "available_partitions_for_topic", without_0_and_3)
    keyless = [delivery(10, tag=f"u{i}") for i in range(6)]
    outcomes = run(send_all(KafkaTransport(timeout_sec=5),
                            target(kafka_broker.bootstrap, kafka_topic), *keyless))
    assert all(o.ok for o in outcomes), outcomes
    records = consume(kafka_broker.bootstrap, kafka_topic, 60)
    assert len(records) == 60 and {r.partition for r in records} == {1, 2}


def test_a_full_key_cache_is_dropped_before_a_delivery_not_during_it(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.transports.kafka.KEY_CACHE_MAX", 10)
    first = delivery(8, [f"p{i}" for i in range(8)], tag="a")
    second = delivery(6, [f"q{i}" for i in range(6)], tag="b")  # 8 + 6 > 10
    outcomes = run(send_all(KafkaTransport(timeout_sec=5),
                            target(kafka_broker.bootstrap, kafka_topic), first, second))
    assert all(o.ok for o in outcomes), outcomes
    records = consume(kafka_broker.bootstrap, kafka_topic, 14)
    assert sorted(r.key for r in records) == sorted(
        k.encode() for k in [*first.keys, *second.keys])


def test_a_producer_in_use_is_not_stopped_to_make_room(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_PRODUCERS only a producer no delivery holds is stopped: deliveries
    through two producers at once both arrive, and neither producer is left behind
    unkept (one stopped under a delivery was started again outside the cache)."""
    monkeypatch.setattr("engine.transports.kafka.MAX_PRODUCERS", 1)
    by_ip = target(kafka_broker.bootstrap, kafka_topic)
    by_name = target(kafka_broker.bootstrap.replace("127.0.0.1", "localhost"), kafka_topic)
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> tuple[list[Any], int]:
        try:
            both = await asyncio.gather(transport.send(by_ip, delivery(500, tag="a")),
                                        transport.send(by_name, delivery(500, tag="b")))
            return list(both), len(transport._slots)
        finally:
            await transport.close()

    outcomes, kept = run(go())
    assert all(o.ok for o in outcomes), outcomes
    assert kept == 2
    assert_once(consume(kafka_broker.bootstrap, kafka_topic, 1000), 1000)


def test_a_producer_unused_for_idle_close_sec_is_stopped_when_another_starts(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook whose servers changed leaves its producer behind: unused for
    IDLE_CLOSE_SEC, it is stopped once another is made, however few there are."""
    monkeypatch.setattr("engine.transports.kafka.IDLE_CLOSE_SEC", 0.0)
    by_ip = target(kafka_broker.bootstrap, kafka_topic)
    by_name = target(kafka_broker.bootstrap.replace("127.0.0.1", "localhost"), kafka_topic)
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> tuple[list[Any], list[str]]:
        try:
            first = await transport.send(by_ip, delivery(3, tag="a"))
            second = await transport.send(by_name, delivery(3, tag="b"))
            return [first, second], [s.servers for s in transport._slots.values()]
        finally:
            await transport.close()

    outcomes, kept = run(go())
    assert all(o.ok for o in outcomes), outcomes
    assert kept == [kafka_broker.bootstrap.replace("127.0.0.1", "localhost")]
    assert_once(consume(kafka_broker.bootstrap, kafka_topic, 6), 6)


def test_a_producer_stops_asking_for_topics_it_no_longer_sends_to(
        kafka_broker: Tansu, monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka refreshes the metadata of every topic a producer ever sent to: one idle
    for TOPIC_IDLE_SEC is dropped from those (a topic deleted by an operator is then not
    asked for, nor made again by a broker that creates topics); sent to again, it is
    asked for anew."""
    monkeypatch.setattr("engine.transports.kafka.TOPIC_IDLE_SEC", 0.3)
    first, second = (new_topic(kafka_broker.bootstrap) for _ in range(2))
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> tuple[list[Any], set[str], set[str]]:
        try:
            out = [await transport.send(target(kafka_broker.bootstrap, t), delivery(3, tag=t))
                   for t in (first, second)]
            await asyncio.sleep(0.35)
            # a topic already known: the first one is let go without a metadata request,
            # so the producer's metadata still holds it
            out.append(await transport.send(target(kafka_broker.bootstrap, second),
                                            delivery(3, tag="b")))
            (slot,) = transport._slots.values()
            assert slot.producer is not None
            asked = set(slot.producer.client._topics)
            out.append(await transport.send(target(kafka_broker.bootstrap, first),
                                            delivery(3, tag="again")))
            return out, asked, set(slot.producer.client._topics)
        finally:
            await transport.close()

    outcomes, asked, asked_after = run(go())
    assert all(o.ok for o in outcomes), outcomes
    assert asked == {second}
    assert asked_after == {first, second}  # asked for again, though its metadata was kept
    assert_once(consume(kafka_broker.bootstrap, first, 6), 6)


def test_a_new_producer_asks_for_every_topic_it_sends_to(kafka_broker: Tansu) -> None:
    """A producer made anew (its broker restarted, say) asks for the topics it sends to
    as it sends: those its slot used before are asked for too, so a new topic's metadata
    request does not leave them out while their records are in flight."""
    first, second = (new_topic(kafka_broker.bootstrap) for _ in range(2))
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> tuple[list[Any], set[str]]:
        try:
            out = [await transport.send(target(kafka_broker.bootstrap, first),
                                        delivery(3, tag="a"))]
            (slot,) = transport._slots.values()
            transport._retire(slot, slot.producer)  # as a broker's restart retires it
            out.append(await transport.send(target(kafka_broker.bootstrap, first),
                                            delivery(3, tag="b")))
            out.append(await transport.send(target(kafka_broker.bootstrap, second),
                                            delivery(3, tag="c")))
            assert slot.producer is not None
            return out, set(slot.producer.client._topics)
        finally:
            await transport.close()

    outcomes, asked = run(go())
    assert all(o.ok for o in outcomes), outcomes
    assert asked == {first, second}


def test_an_idle_producer_is_stopped_while_deliveries_go_on_elsewhere(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook whose credentials changed leaves its producer behind: unused for
    IDLE_CLOSE_SEC, it is stopped by a later delivery on a producer already started,
    not only when another one starts (the idle timer may stop it first:
    tests/integration/test_transport_idle.py)."""
    monkeypatch.setattr("engine.transports.kafka.IDLE_CLOSE_SEC", 0.3)
    monkeypatch.setattr("engine.transports.base.IDLE_CHECK_SEC", 0.0)
    old = target(kafka_broker.bootstrap, kafka_topic)
    current = target(kafka_broker.bootstrap.replace("127.0.0.1", "localhost"), kafka_topic)
    transport = KafkaTransport(timeout_sec=10)

    async def go() -> tuple[list[Any], bool, list[str]]:
        try:
            out = [await transport.send(old, delivery(3, tag="a")),
                   await transport.send(current, delivery(3, tag="b"))]
            first = next(iter(transport._slots.values()))
            producer = first.producer
            assert producer is not None
            await asyncio.sleep(0.35)
            out.append(await transport.send(current, delivery(3, tag="c")))
            stopped = await wait_until_async(lambda: producer._closed, 10)
            return out, stopped, [s.servers for s in transport._slots.values()]
        finally:
            await transport.close()

    outcomes, stopped, kept = run(go())
    assert all(o.ok for o in outcomes), outcomes
    assert stopped and kept == [kafka_broker.bootstrap.replace("127.0.0.1", "localhost")]
    assert_once(consume(kafka_broker.bootstrap, kafka_topic, 9), 9)


async def wait_until_async(predicate: Any, seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_large_delivery_spans_several_batches(kafka_broker: Tansu, kafka_topic: str) -> None:
    d = delivery(3000, ["1.open"] * 3000)  # one key: one partition, ~0.5 MiB
    d.parts = [p + b" " * 150 for p in d.parts]
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=10),
                              target(kafka_broker.bootstrap, kafka_topic), d))
    assert outcome.ok, outcome
    records = consume(kafka_broker.bootstrap, kafka_topic, 3000)
    assert [r.value for r in sorted(records, key=lambda r: r.offset)] == d.parts


def refuse_batches_over(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[int]:
    """The produce path acts as a broker whose topic ``max.message.bytes`` is ``limit``
    (tansu does not enforce it): a record batch larger than that is left out of the
    produce request and answered MESSAGE_TOO_LARGE, as Kafka answers it; the others go
    to the broker. Returns the sizes of the batches refused."""
    from aiokafka.errors import MessageSizeTooLargeError
    from aiokafka.producer.sender import SendProduceReqHandler

    refused: list[int] = []
    create, handle = SendProduceReqHandler.create_request, SendProduceReqHandler.handle_response

    def create_request(self: Any) -> Any:
        everything = self._batches
        self._too_large = {tp: b for tp, b in everything.items()
                           if len(b.get_data_buffer()) > limit}
        self._batches = {tp: b for tp, b in everything.items() if tp not in self._too_large}
        try:
            return create(self)
        finally:
            self._batches = everything

    def handle_response(self: Any, response: Any) -> None:
        handle(self, response)
        for batch in self._too_large.values():
            refused.append(len(batch.get_data_buffer()))
            batch.failure(exception=MessageSizeTooLargeError())

    monkeypatch.setattr(SendProduceReqHandler, "create_request", create_request)
    monkeypatch.setattr(SendProduceReqHandler, "handle_response", handle_response)
    return refused


def test_batches_refused_as_too_large_are_split_and_the_topic_keeps_smaller_ones(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A topic that takes at most 40 KB a batch: the 256 KiB batches of a delivery
    are refused, their records go again in halves until they fit, each once; the
    next delivery to the topic is sent in batches that fit from the start."""
    refused = refuse_batches_over(monkeypatch, 40_000)
    first = delivery(3000, ["1.open"] * 3000, tag="a")  # one key: one partition, ~0.5 MiB
    first.parts = [p + b" " * 150 for p in first.parts]
    second = delivery(1000, ["1.open"] * 1000, tag="b")
    second.parts = [p + b" " * 150 for p in second.parts]
    transport = KafkaTransport(timeout_sec=10)

    async def both() -> tuple[Any, int, Any, dict[str, int]]:
        try:
            one = await transport.send(target(kafka_broker.bootstrap, kafka_topic), first)
            after_first = len(refused)
            two = await transport.send(target(kafka_broker.bootstrap, kafka_topic), second)
            (slot,) = transport._slots.values()
            return one, after_first, two, dict(slot.caps)
        finally:
            await transport.close()

    one, after_first, two, caps = run(both())
    assert one.ok and two.ok, (one, two)
    assert after_first >= 2, refused
    assert len(refused) == after_first  # the second delivery: no batch refused
    assert 20_000 <= caps[kafka_topic] <= 40_000, caps  # halves of refused batches
    records = consume(kafka_broker.bootstrap, kafka_topic, 4000)
    got = Counter(r.message_id for r in records)
    assert got == Counter(first.message_ids + second.message_ids)  # each exactly once
    value = {mid: part for d in (first, second)
             for mid, part in zip(d.message_ids, d.parts, strict=True)}
    assert all(r.value == value[r.message_id] for r in records)


def test_a_record_too_large_on_its_own_is_rejected_and_only_it_fails(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_batches_over(monkeypatch, 20_000)
    d = delivery(200, ["1.click"] * 200)
    d.parts[57] = json.dumps({"n": 57, "content": "x" * 30_000}).encode()
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=10),
                              target(kafka_broker.bootstrap, kafka_topic), d))
    assert not outcome.ok and outcome.error == "Rejected", outcome
    assert "refused a record as too large (MessageSizeTooLargeError)" in outcome.detail
    assert "max.message.bytes" in outcome.detail
    assert outcome.failed == [57]
    records = consume(kafka_broker.bootstrap, kafka_topic, 199)
    assert sorted(r.message_id for r in records) == sorted(
        mid for i, mid in enumerate(d.message_ids) if i != 57)


def test_a_keyed_delivery_over_every_partition_is_split_where_refused_and_keeps_its_keys(
        kafka_broker: Tansu, kafka_topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of many keys (every partition) with one too large alone: each
    partition's refused batches are split by the records' own positions, every other
    record arrives once in its key's partition, and only the large one fails."""
    refuse_batches_over(monkeypatch, 20_000)
    keys = [f"{n % 13}.open" for n in range(2000)]
    d = delivery(2000, keys, tag="s")
    d.parts = [p + b" " * 150 for p in d.parts]
    d.parts[777] = json.dumps({"n": 777, "content": "x" * 30_000}).encode()
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=10),
                              target(kafka_broker.bootstrap, kafka_topic), d))
    assert not outcome.ok and outcome.error == "Rejected", outcome
    assert outcome.failed == [777]
    records = consume(kafka_broker.bootstrap, kafka_topic, 1999)
    assert Counter(r.message_id for r in records) == Counter(
        mid for i, mid in enumerate(d.message_ids) if i != 777)
    at = {mid: i for i, mid in enumerate(d.message_ids)}
    for r in records:
        i = at[r.message_id]
        assert r.value == d.parts[i] and r.key == keys[i].encode()
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4
    assert {r.partition for r in records} == {0, 1, 2, 3}


def test_a_backlog_of_concurrent_deliveries_is_not_mistaken_for_a_dead_broker(
        kafka_broker: Tansu, kafka_topic: str) -> None:
    # 200 deliveries handed over at once (as a transport actor gets them from the
    # partition workers), all keyed onto the same 4 partitions
    deliveries = [delivery(500, [f"{i % 4}.click" for i in range(500)], tag=f"b{n}")
                  for n in range(200)]

    async def go() -> list[Any]:
        transport = KafkaTransport(concurrency=8, timeout_sec=3.0)
        try:
            return await asyncio.gather(*(transport.send(target(
                kafka_broker.bootstrap, kafka_topic), d) for d in deliveries))
        finally:
            await transport.close()

    outcomes = run(go())
    failed = [o for o in outcomes if not o.ok]
    assert not failed, f"{len(failed)} failed, e.g. {failed[0]}"


def test_producer_is_cached_per_servers_and_security(kafka_broker: Tansu,
                                                     kafka_topic: str) -> None:
    async def go() -> None:
        transport = KafkaTransport(timeout_sec=5)
        plain = target(kafka_broker.bootstrap, kafka_topic)
        other_topic = target(kafka_broker.bootstrap, kafka_topic, key="none")
        try:
            assert (await transport.send(plain, delivery(2))).ok
            assert (await transport.send(other_topic, delivery(2))).ok
            assert len(transport._slots) == 1  # same servers and security: one producer
        finally:
            await transport.close()
        assert transport._slots == {} and not transport._closing

    run(go())


def test_security_settings_reach_the_producer() -> None:
    t = Kafka.model_validate({"bootstrap_servers": ["k1:9093", "k2:9093"], "topic": "t",
                              "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
                              "sasl_password": "p", "tls": True})
    options = producer_options(t, 2.0)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"],
            options["sasl_plain_password"]) == ("SCRAM-SHA-512", "u", "p")
    assert options["acks"] == "all" and options["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert producer_options(Kafka(bootstrap_servers=["k:1"], topic="t", tls=True), 2.0
                            )["security_protocol"] == "SSL"
    assert producer_options(Kafka(bootstrap_servers=["k:1"], topic="t"), 2.0
                            )["security_protocol"] == "PLAINTEXT"


def test_unreachable_bootstrap_server_is_a_connect_error_naming_it() -> None:
    port = free_port()
    started = time.monotonic()
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=5),
                              target(f"127.0.0.1:{port}", "t"), delivery(3)))
    assert not outcome.ok and outcome.error == "ConnectError"
    assert f"127.0.0.1:{port}" in outcome.detail
    assert time.monotonic() - started < 5  # refused at once: before the 5 s timeout


def test_one_silent_bootstrap_server_listed_with_a_good_one_fails_no_start(
        kafka_broker: Tansu, kafka_topic: str) -> None:
    """aiokafka tries the servers in a random order, each with the whole request
    timeout: one that takes connections and never answers, tried first, used up the
    delivery's time in about every other producer start. Each gets its share now."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)
    servers = [f"127.0.0.1:{silent.getsockname()[1]}", kafka_broker.bootstrap]
    outcomes = []
    try:
        for n in range(6):  # a new transport each time: a producer started anew
            outcomes += run(send_all(KafkaTransport(timeout_sec=2), Kafka(
                bootstrap_servers=servers, topic=kafka_topic), delivery(2, tag=f"s{n}")))
    finally:
        silent.close()
    assert all(o.ok for o in outcomes), outcomes
    assert_once(consume(kafka_broker.bootstrap, kafka_topic, 12), 12)


def test_a_bootstrap_servers_reason_is_said_when_it_closes_or_is_written_ipv6(
        own_broker: Any) -> None:
    """aiokafka logs why a bootstrap server failed; the outcome said only "Unable to
    bootstrap" when it closed the connection at the metadata request (a broker that
    wants a login), or when the server was an IPv6 address in brackets."""
    broker = own_broker(extra=("--authentication",))
    port = free_port()
    for server in (broker.bootstrap, f"[::1]:{port}"):
        (outcome,) = run(send_all(KafkaTransport(timeout_sec=5), target(server, "t"),
                                  delivery(1)))
        assert not outcome.ok and outcome.error == "ConnectError"
        assert f"bootstrap server(s) {server}: {server}: " in outcome.detail, outcome.detail
        assert "Unable to bootstrap" not in outcome.detail


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_authentication_failure_is_a_connect_error(own_broker: Any,
                                                        mechanism: str) -> None:
    broker = own_broker(extra=("--authentication",))  # no users: every login fails
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=5), target(
        broker.bootstrap, "t", sasl_mechanism=mechanism, sasl_username="alice",
        sasl_password="s3cret-pw"), delivery(1)))
    assert not outcome.ok and outcome.error == "ConnectError"
    assert broker.bootstrap in outcome.detail
    assert f"SASL {mechanism} as user 'alice'" in outcome.detail
    assert "s3cret-pw" not in outcome.detail


def test_tls_cafile_that_cannot_be_read_is_a_connect_error(kafka_broker: Tansu) -> None:
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=5), target(
        kafka_broker.bootstrap, "t", tls=True, tls_cafile="/nonexistent/ca.pem"), delivery(1)))
    assert not outcome.ok and outcome.error == "ConnectError"
    assert "/nonexistent/ca.pem" in outcome.detail


def test_an_empty_tls_cafile_of_a_stored_hook_trusts_the_system_cas(
        kafka_broker: Tansu) -> None:
    """Hooks stored before an empty tls_cafile was refused keep aiokafka's meaning of
    it: the system's CAs (here the plain broker then fails the TLS handshake)."""
    tgt = Kafka.model_validate({"bootstrap_servers": [kafka_broker.bootstrap], "topic": "t",
                                "tls": True, "tls_cafile": ""}, context={"stored": True})
    (outcome,) = run(send_all(KafkaTransport(timeout_sec=3), tgt, delivery(1)))
    assert not outcome.ok and outcome.error in ("ConnectError", "Timeout"), outcome
    assert "cannot be used" not in outcome.detail, outcome.detail


def test_frozen_broker_times_out_and_a_new_producer_is_used_afterwards(
        own_broker: Any) -> None:
    broker = own_broker()
    topic = new_topic(broker.bootstrap)
    tgt = target(broker.bootstrap, topic)

    async def go() -> None:
        transport = KafkaTransport(timeout_sec=1.0)
        try:
            assert (await transport.send(tgt, delivery(5, tag="a"))).ok
            (slot,) = transport._slots.values()
            first = slot.producer
            broker.pause()
            started = time.monotonic()
            outcome = await transport.send(tgt, delivery(5, tag="b"))
            assert not outcome.ok and outcome.error == "Timeout", outcome
            assert 0.9 < time.monotonic() - started < 4  # the 1 s timeout, with headroom
            assert slot.producer is None  # retired
            broker.resume()
            # for breaker_sec, deliveries fail fast with the last error
            outcome = await transport.send(tgt, delivery(5, tag="b"))
            assert not outcome.ok and outcome.error == "ConnectError", outcome
            assert "not reconnecting" in outcome.detail and "not acknowledged" in outcome.detail
            await asyncio.sleep(transport.breaker_sec)
            outcome = await transport.send(tgt, delivery(5, tag="c"))
            assert outcome.ok, outcome
            assert slot.producer is not None and slot.producer is not first
        finally:
            await transport.close()

    run(go())
    tags = Counter(json.loads(r.value)["tag"] for r in consume(broker.bootstrap, topic, 10))
    assert tags["a"] == 5 and tags["c"] == 5  # "b" may or may not have landed late


def test_restarted_broker_is_picked_up(own_broker: Any) -> None:
    broker = own_broker()
    topic = new_topic(broker.bootstrap)
    tgt = target(broker.bootstrap, topic)

    async def go() -> None:
        transport = KafkaTransport(timeout_sec=1.0)
        try:
            assert (await transport.send(tgt, delivery(5))).ok
            broker.stop()
            outcome = await transport.send(tgt, delivery(5))
            assert not outcome.ok and outcome.error in ("ConnectError", "Timeout"), outcome
            broker.start()  # same port; memory storage: the broker creates the topic again
            await asyncio.sleep(transport.breaker_sec)
            outcome = await transport.send(tgt, delivery(5, tag="after"))
            assert outcome.ok, outcome
        finally:
            await transport.close()

    run(go())
    records = consume(broker.bootstrap, topic, 5)
    assert Counter(json.loads(r.value)["tag"] for r in records)["after"] == 5


# --- through the engine ----------------------------------------------------------------


def kafka_hook(bootstrap: str, topic: str, **kwargs: Any) -> dict[str, Any]:
    settings = {"bootstrap_servers": [bootstrap], "topic": topic}
    settings.update(kwargs.pop("target", {}))
    return {"name": f"kafka {topic}", "active": True, "account_id": 1,
            "actions": kwargs.pop("actions", ["click", "open", "deliv"]),
            "target": {"kafka": settings}, **kwargs}


def events(n: int, start: int = 0, types: tuple[str, ...] = ("click", "open", "deliv", "send"),
           ) -> list[dict[str, Any]]:
    return [{"id": f"ev-{i}", "event_type": types[i % len(types)], "account_id": 1,
             "list_id": 1 + (i // len(types)) % 4, "event_date": "2026-11-29T10:00:00.123456789Z",
             **({"profile_id": f"p{i % 50}"} if i % 3 else {}),
             "event_data": {"campaign_id": 1 + i % 3, "message_id": 5}}
            for i in range(start, start + n)]


def matched(published: list[dict[str, Any]], actions: tuple[str, ...] = ("click", "open", "deliv")
            ) -> list[dict[str, Any]]:
    return [e for e in published if e["event_type"] in actions]




def test_engine_delivers_every_matched_event_exactly_once_with_each_key_choice(
        engine_factory: Any, kafka_broker: Tansu) -> None:
    engine = engine_factory()
    topics = {choice: new_topic(kafka_broker.bootstrap)
              for choice in ("list_event", "profile_id", "none")}
    hooks = {choice: engine.create_hook(kafka_hook(kafka_broker.bootstrap, topic,
                                                   target={"key": choice}))
             for choice, topic in topics.items()}
    published = events(4000)
    assert engine.publish(published).accepted == 4000
    expected = matched(published)
    assert engine.wait_idle(60)
    # one consumer group reads the three topics
    records = consume(kafka_broker.bootstrap, list(topics.values()), 3 * len(expected),
                      timeout=30, group=True)
    for choice, topic in topics.items():
        ids = Counter(r.message_id for r in records if r.topic == topic)
        assert set(ids) == {message_id(hooks[choice].id, e["id"]) for e in expected}, choice
        assert max(ids.values()) == 1, f"{choice}: duplicates in a fault-free run"
        for r in [r for r in records if r.topic == topic]:
            msg = json.loads(r.value)
            assert msg["hook_message_id"] == r.message_id
            key = {"list_event": f"{msg['list_id']}.{msg['event_type']}".encode(),
                   "profile_id": msg.get("profile_id", "").encode() or None,
                   "none": None}[choice]
            assert r.key == key, (choice, msg)
        stats = engine.stats(hooks[choice].id)
        assert stats["delivered"] == len(expected) and stats["retried"] == 0


def diagnose(records: list[Any], hook_id: int, expected: set[str], stats: dict[str, int]
             ) -> str:
    by_partition: dict[int, list[int]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(r.offset)
    got = {r.message_id for r in records}
    lost = sorted(e for e in expected if message_id(hook_id, e) not in got)
    spans = {p: (min(o), max(o), len(o), len(set(o))) for p, o in by_partition.items()}
    return f"{len(lost)} event(s) lost, e.g. {lost[:10]}; offsets {spans}; stats {stats}"


def test_broker_restart_mid_run_loses_nothing(engine_factory: Any,
                                              persistent_broker: Tansu) -> None:
    broker = persistent_broker
    engine = engine_factory(HOOK_RETRY_PERIOD_SEC=0.2, HOOK_RETRY_TIMES=1000,
                            BROKER_TIMEOUT_SEC=1.0)
    topic = new_topic(broker.bootstrap)
    hook = engine.create_hook(kafka_hook(broker.bootstrap, topic))
    published: list[dict[str, Any]] = []
    done = threading.Event()

    def publish() -> None:  # 100 events every 50 ms: before, during and after the stop
        while not done.is_set():
            chunk = events(100, start=len(published))
            engine.publish(chunk)
            published.extend(chunk)
            time.sleep(0.05)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        assert wait_for(lambda: engine.stats(hook.id)["delivered"] > 0, 20)
        broker.stop()
        time.sleep(1.5)
        broker.start()  # same port, same storage
        time.sleep(0.5)
    finally:
        done.set()
        publisher.join()
    expected = {e["id"] for e in matched(published)}
    assert wait_for(lambda: engine.stats(hook.id)["delivered"] >= len(expected), 60)
    assert engine.wait_idle(30, include_retries=True)
    records = consume(broker.bootstrap, topic, len(expected), timeout=30)
    ids = Counter(r.message_id for r in records)
    stats = engine.stats(hook.id)
    assert set(ids) == {message_id(hook.id, e) for e in expected}, \
        diagnose(records, hook.id, expected, stats)
    assert stats["retried"] > 0, "the broker stop caused no retry"
    assert stats["dead_lettered"] == 0 and engine.dead_letters(hook_id=hook.id) == []
    # each message counted once (the topic may hold a record twice: at-least-once)
    assert stats["accepted"] == stats["delivered"] == len(expected), stats


def test_unreachable_broker_fails_the_test_event_and_dead_letters_after_n_resends(
        engine_factory: Any) -> None:
    engine = engine_factory(HOOK_RETRY_PERIOD_SEC=0.2, HOOK_RETRY_TIMES=3)
    server = f"127.0.0.1:{free_port()}"  # nothing listens there
    hook = engine.create_hook(kafka_hook(server, "nowhere"))
    outcome = engine.test_event(hook.id, "click")
    assert not outcome.ok and outcome.error == "ConnectError"
    assert server in outcome.detail
    published = events(12)
    engine.publish(published)
    n = len(matched(published))
    assert wait_for(lambda: sum(d.messages for d in engine.dead_letters(hook_id=hook.id)) == n,
                    20)
    letters = engine.dead_letters(hook_id=hook.id)
    assert all(d.resends == 3 for d in letters), [d.resends for d in letters]
    assert all("ConnectError" in d.last_error and server in d.last_error for d in letters)
    stats = engine.stats(hook.id)
    assert stats["dead_lettered"] == n and stats["delivered"] == 0
    assert stats["retried"] == 3 * n  # scheduled after the first attempt and 2 re-sends
