"""Partition and retry workers without Ray: real Redis, in-process senders."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.errors import EventError, NotFound
from engine.hooks import Hook
from engine.intake import Intake, decode_entry
from engine.keys import CONSUMER_GROUP, INTAKE_FIELD, Keys
from engine.partitioning import partition_of
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore
from engine.transports.base import Delivery, Outcome
from engine.transports.stub import StubTransport

pytestmark = pytest.mark.integration


class InProcessSender:
    """Sends through a StubTransport at once; outcomes come back on the next poll."""

    def __init__(self, transport: StubTransport | None = None, hold: bool = False) -> None:
        self.transport = transport or StubTransport()
        self.hold = hold  # never return outcomes (a sender that died)
        self.done: list[tuple[Delivery, Outcome]] = []
        self.held: list[Delivery] = []
        self.hooks: list[Hook] = []

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        self.hooks.append(hook)
        if self.hold:
            self.held.append(delivery)
            return
        self.done.append((delivery, asyncio.run(
            self.transport.send(hook.target.settings, delivery))))

    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]:
        out, self.done = self.done, []
        return out

    def inflight(self) -> int:
        return len(self.done) + len(self.held)


def hook(**kw: Any) -> dict[str, Any]:
    return {"name": "h", "active": True, "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x", "max_batch_size": 10,
                                      "flush_timeout_sec": 0.1}}, **kw}


def clicks(n: int, list_id: int = 1) -> list[dict[str, Any]]:
    return [{"event_type": "click", "account_id": 1, "list_id": list_id,
             "event_date": "2026-01-01T00:00:00Z", "id": f"c{list_id}-{i}"} for i in range(n)]


def one_partition(settings: Settings) -> Settings:
    return settings.model_copy(update={"PARTITIONS": 1})


def run_until(worker: Any, predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        worker.step(block_ms=10)


def test_intake_appends_one_entry_per_batch_per_partition(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    intake = Intake(redis_client, keys, partitions=2, max_batch=100)
    intake.ensure_groups()
    result = intake.publish(clicks(250, list_id=1) + clicks(30, list_id=2))
    assert result.accepted == 280 and len(set(result.ids)) == 280
    per_partition = [0, 0]
    for list_id, n in ((1, 250), (2, 30)):
        per_partition[partition_of(1, list_id, 2)] += n
    lengths = [redis_client.xlen(keys.intake(n)) for n in range(2)]
    assert lengths == [-(-n // 100) for n in per_partition]  # one entry per 100 events
    entries = redis_client.xrange(keys.intake(0)) + redis_client.xrange(keys.intake(1))
    assert sum(len(decode_entry(f)) for _, f in entries) == 280
    assert max(len(decode_entry(f)) for _, f in entries) == 100


def test_intake_rejects_a_batch_with_bad_events_unless_partial(
        redis_client: redis.Redis, keys: Keys) -> None:
    intake = Intake(redis_client, keys, partitions=1, max_batch=100)
    intake.ensure_groups()
    batch = [*clicks(2), {"event_type": "clack", "account_id": 1,
                          "event_date": "2026-01-01T00:00:00Z"}]
    with pytest.raises(EventError, match=r"1 bad event\(s\), nothing accepted: event 2: "
                                         r"event_type: unknown event type 'clack'"):
        intake.publish(batch)
    assert redis_client.xlen(keys.intake(0)) == 0
    result = intake.publish(batch, partial=True)
    assert result.accepted == 2 and [i.index for i in result.issues] == [2]
    assert redis_client.xlen(keys.intake(0)) == 1


def test_entries_are_acked_only_when_every_message_is_settled(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = Intake(redis_client, keys, 1, 1000)
    intake.ensure_groups()
    held = InProcessSender(hold=True)
    worker = PartitionWorker(cfg, redis_client, 0, held)
    intake.publish(clicks(25))
    run_until(worker, lambda: len(held.held) == 3)  # 10 + 10 + 5 (timeout flush)
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 1
    # a new worker for the same partition (the first one "died") re-reads the entry
    sender = InProcessSender()
    worker2 = PartitionWorker(cfg, redis_client, 0, sender)
    run_until(worker2, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sum(d.count for d in sender.transport.sent) == 25
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0


def test_failures_go_to_the_retry_schedule_then_dead_letters(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 2,
                                                      "HOOK_RETRY_PERIOD_SEC": 0.1})
    HookRegistry(redis_client, keys).create(hook())
    intake = Intake(redis_client, keys, 1, 1000)
    intake.ensure_groups()
    failing = InProcessSender(StubTransport(always_fail=True))
    worker = PartitionWorker(cfg, redis_client, 0, failing)
    intake.publish(clicks(10))
    retry = RetryStore(redis_client, keys)
    run_until(worker, lambda: retry.pending() == 1)
    assert redis_client.xlen(keys.intake(0)) == 0  # scheduled counts as settled
    retry_worker = RetryWorker(cfg, redis_client, failing)
    deadline = time.monotonic() + 5
    while not retry.dead_letters() and time.monotonic() < deadline:
        retry_worker.step()
    (dead,) = retry.dead_letters()
    assert dead.resends == 2 and "stub failure #3" in dead.last_error
    assert failing.transport.attempts[dead.id] == 3  # first attempt + 2 re-sends
    assert retry.pending() == 0


def test_retry_worker_kills_deliveries_of_deleted_hooks(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    registry = HookRegistry(redis_client, keys)
    gone = registry.create(hook())
    registry.delete(gone.id or 0)
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=gone.id or 0, account_id=1, kind="http_batch",
                            parts=[b"{}"]), due_ms=0, error="HTTP 500")
    RetryWorker(settings, redis_client, InProcessSender()).step()
    (dead,) = retry.dead_letters()
    assert dead.last_error == f"hook {gone.id} was deleted; last error: HTTP 500"


def test_broker_batches_leave_every_round(redis_client: redis.Redis, settings: Settings,
                                          keys: Keys) -> None:
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook(target={"rabbitmq_exchange": {
        "host": "127.0.0.1", "exchange": "x", "type": "topic"}}))
    intake = Intake(redis_client, keys, 1, 1000)
    intake.ensure_groups()
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(3, list_id=7))
    run_until(worker, lambda: sender.transport.sent)
    (delivery,) = sender.transport.sent
    assert delivery.keys == ["7.click"] * 3 and delivery.kind == "rabbitmq_exchange"


def test_replay_with_an_unknown_id_moves_nothing(redis_client: redis.Redis, keys: Keys) -> None:
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=1, account_id=1, kind="http_batch",
                            parts=[b"{}"], resends=3), due_ms=0, error="HTTP 500")
    retry.kill(retry.claim_due()[0], "HTTP 500")
    with pytest.raises(NotFound, match=r"dead letter\(s\) nope do not exist"):
        retry.replay(["d1", "nope"])
    assert [d.id for d in retry.dead_letters()] == ["d1"] and retry.pending() == 0
    assert retry.replay(["d1", "d1"]) == 1
    (due,) = retry.claim_due()
    assert due.id == "d1" and due.resends == 0


def test_an_unreadable_entry_is_set_aside_and_the_rest_delivered(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """An entry no round can decode (damaged, or not written by the intake: here an id
    beyond int64 and a foreign field) is moved to the unreadable stream with the
    reason, not retried forever; the entries around it are delivered."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = Intake(redis_client, keys, 1, 1000)
    intake.ensure_groups()
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(4))
    big = msgspec.msgpack.encode([{"event_type": "click", "event_date": "2026-01-01T00:00:00Z",
                                   "account_id": 1, "list_id": 2**63}])
    bad_ids = [redis_client.xadd(keys.intake(0), {INTAKE_FIELD: big}).decode(),
               redis_client.xadd(keys.intake(0), {b"other": b"x"}).decode(),
               redis_client.xadd(keys.intake(0), {INTAKE_FIELD: b"\xc1garbage"}).decode()]
    intake.publish(clicks(3, list_id=2))
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sum(d.count for d in sender.transport.sent) == 7
    aside = redis_client.xrange(keys.intake_unreadable)
    assert [f[b"_entry"].decode() for _, f in aside] == bad_ids
    assert b"9223372036854775807" in aside[0][1][b"_error"]
    assert b"KeyError" in aside[1][1][b"_error"] and aside[1][1][b"other"] == b"x"
    assert aside[2][1][INTAKE_FIELD] == b"\xc1garbage"
    assert redis_client.hget(keys.engine_stats, "entries_unreadable") == b"3"
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0


def test_a_failing_round_does_not_end_the_worker(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    import threading

    worker = PartitionWorker(one_partition(settings), redis_client, 0, InProcessSender())
    calls: list[Exception] = []
    stop = threading.Event()

    def boom(block_ms: Any = None) -> int:
        if len(calls) >= 2:
            stop.set()
        raise ValueError("a bug")

    worker.step = boom  # type: ignore[method-assign]
    worker.run(stop, calls.append)  # returns once stopped: the errors did not end it
    assert len(calls) >= 2 and all(isinstance(c, ValueError) for c in calls)


def test_reading_pauses_while_too_many_messages_are_unsettled(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.dispatch.MAX_UNSETTLED", 15)
    cfg = one_partition(settings).model_copy(update={"READ_MAX_ENTRIES": 1})
    HookRegistry(redis_client, keys).create(hook())
    intake = Intake(redis_client, keys, 1, 10)  # entries of 10 events
    intake.ensure_groups()
    held = InProcessSender(hold=True)
    worker = PartitionWorker(cfg, redis_client, 0, held)
    intake.publish(clicks(50))
    for _ in range(20):
        worker.step(1)
    # two entries read (20 messages unsettled >= 15), the other three left in the stream
    assert worker.unsettled == 20
    assert sum(d.count for d in held.held) == 20
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 2
    # outcomes arrive: reading resumes and everything is delivered exactly once
    sender = InProcessSender()
    worker.sender = sender
    worker._settle([(d, Outcome(ok=True)) for d in held.held])
    assert worker.unsettled == 0
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sum(d.count for d in sender.transport.sent) == 30
    assert worker.unsettled == 0
