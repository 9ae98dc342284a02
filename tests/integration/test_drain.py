"""A worker stopping drains: the open batches go, and the outcomes of what is in flight
are booked, for DRAIN_SEC at most; what is left is read (or claimed) and sent again by
the next start, as after any end."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.keys import CONSUMER_GROUP, Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import Delivery
from tests.integration.test_workers import InProcessSender, clicks, hook, one_intake
from tests.services import wait_for

pytestmark = pytest.mark.integration


class Later(InProcessSender):
    """Outcomes come back ``after`` polls after their send (a transport answering over
    time); with ``hold``, never."""

    def __init__(self, after: int = 3, hold: bool = False) -> None:
        super().__init__(hold=hold)
        self.after, self.polls = after, 0
        self.waiting: list[tuple[int, Any]] = []

    def submit(self, hook: Any, delivery: Delivery) -> None:
        super().submit(hook, delivery)
        self.waiting += [(self.polls + self.after, done) for done in self.done]
        self.done = []

    def poll(self, timeout: float) -> list[Any]:
        self.polls += 1
        out = [done for due, done in self.waiting if due <= self.polls]
        self.waiting = [(due, done) for due, done in self.waiting if due > self.polls]
        return out

    def inflight(self) -> int:
        return len(self.waiting) + len(self.held)


def open_messages(worker: PartitionWorker) -> int:
    """The worker's open messages, read from another thread (its batches may change
    while they are counted: then none yet)."""
    try:
        return worker.dispatcher.open_messages()
    except RuntimeError:  # dictionary changed size during iteration
        return -1


def pending(r: redis.Redis, keys: Keys) -> int:
    return int(r.xpending(keys.intake(0), CONSUMER_GROUP)["pending"])


def holding_30(redis_client: redis.Redis, settings: Settings, keys: Keys) -> PartitionWorker:
    """One hook, 30 clicks in 3 entries, and a partition holding their 3 batches
    without an outcome."""
    HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 10).publish(clicks(30))
    worker = PartitionWorker(settings, redis_client, 0, Later(hold=True))
    for _ in range(3):
        worker.step(block_ms=10)
    assert worker.unsettled == 30 and len(worker.submitted) == 3
    return worker


def sent_by_next_start(redis_client: redis.Redis, settings: Settings,
                       resends: int) -> list[str]:
    """The message ids the next start sends: its partition's, then its retry
    worker's ``resends`` re-sends."""
    again = InProcessSender()
    restarted = PartitionWorker(settings, redis_client, 0, again)
    for _ in range(3):
        restarted.step(block_ms=10)
    restarted.drain(5)
    assert RetryWorker(settings, redis_client, again).step() == resends
    return [mid for d in again.transport.sent for mid in d.message_ids]


def test_a_partition_stopping_sends_its_open_batches_and_acknowledges_them(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A clean stop left open batches unsent and entries in flight unacknowledged: the
    next start read them again, and sent again what had been delivered. Stopping, the
    partition sends what it batched and books the outcomes as they come."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    # a window that outlasts the run: only the stop sends the batches
    created = HookRegistry(redis_client, keys).create(hook(target={"http_batch": {
        "url": "http://127.0.0.1:9/x", "max_batch_size": 7, "flush_timeout_sec": 600}}))
    one_intake(redis_client, keys, 10).publish(clicks(50))
    sender = Later()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        # 7 batches closed full and sent, the last one (1 message) left open
        assert wait_for(lambda: open_messages(worker) == 1, timeout=20)
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()
    sent = [mid for d in sender.transport.sent for mid in d.message_ids]
    assert len(sent) == len(set(sent)) == 50  # the open batch too, once each
    assert pending(redis_client, keys) == 0 and redis_client.xlen(keys.intake(0)) == 0
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 50
    # a start after it has nothing to send again
    again = Later()
    for _ in range(5):
        PartitionWorker(settings, redis_client, 0, again).step(block_ms=10)
    assert again.transport.sent == []


def test_a_partition_stops_within_its_drain_time_scheduling_the_rest_as_re_sends(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outcomes that do not come within the drain time are not waited for: their
    batches are scheduled as re-sends of their hooks, due at once and using up no
    re-send (even with HOOK_RETRY_TIMES 0), their entries acknowledged, and the stop
    says how many messages that was."""
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    settings = settings.model_copy(update={"PARTITIONS": 1, "HOOK_RETRY_TIMES": 0})
    created = HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 10).publish(clicks(30))
    worker = PartitionWorker(settings, redis_client, 0, Later(hold=True))
    for _ in range(3):
        worker.step(block_ms=10)
    assert worker.unsettled == 30
    with caplog.at_level(logging.WARNING, logger="hookray"):
        worker._stopping()
    said = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert said == ["partition 0: stopped with 30 message(s) in 3 batch(es) whose outcome "
                    "did not come within 0.3 s; scheduled as re-sends of their own hooks, "
                    "due at once (a destination that took one meanwhile gets it twice)"]
    assert worker.stop_said == said  # for the driver to say too
    # said once, not again per hook as failures
    assert not [r for r in caplog.records if "Stopped:" in r.getMessage()]
    assert pending(redis_client, keys) == 0 and redis_client.xlen(keys.intake(0)) == 0
    retry = RetryStore(redis_client, keys)
    assert retry.pending() == 3 and not retry.dead_letters()
    assert Stats(redis_client, keys).get(created.id or 0)["retried"] == 30
    again = InProcessSender()  # the next start's retry worker sends them, at once
    restarted = RetryWorker(settings, redis_client, again)
    assert restarted.step() == 3
    assert sorted(mid for d in again.transport.sent for mid in d.message_ids) == \
        sorted(mid for d in worker.sender.held for mid in d.message_ids)
    assert {(d.resends, d.last_error.split(":")[0]) for d in again.transport.sent} == \
        {(0, "Stopped")}


def test_a_stop_whose_acknowledgement_is_refused_leaves_no_re_sends_beside_the_entries(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-sends of a stop's unanswered batches and the acknowledgement of their
    entries are one booking. Booked one by one and then acknowledged, an
    acknowledgement Redis refused left the entries pending beside the re-sends: the
    next start sent every message twice (and a third time to a destination that took
    the batch late)."""
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    settings = settings.model_copy(update={"PARTITIONS": 1})
    worker = holding_30(redis_client, settings, keys)

    def refused(*args: Any) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(worker, "_ack_round", refused)
    worker._stopping()
    assert pending(redis_client, keys) == 0
    sent = sent_by_next_start(redis_client, settings, resends=3)
    assert len(sent) == len(set(sent)) == 30


def test_a_stop_books_its_re_sends_in_groups_each_settling_its_own_entries(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop's re-sends are booked in groups of STOP_BOOKING_BYTES or so (one script
    copying every payload held Redis up); each group acknowledges the entries of its
    own batches only, so a later group Redis refuses leaves its entries pending, read
    and sent once by the next start, and nothing of the groups booked before twice."""
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    monkeypatch.setattr(engine.dispatch, "STOP_BOOKING_BYTES", 1)  # a group per entry
    settings = settings.model_copy(update={"PARTITIONS": 1})
    worker = holding_30(redis_client, settings, keys)
    book = worker.side.retry.schedule_settling
    calls: list[int] = []

    def second_refused(items: Any, *args: Any) -> None:
        calls.append(len(items))
        if len(calls) == 2:
            raise redis.ConnectionError("Connection reset by peer")
        book(items, *args)

    monkeypatch.setattr(worker.side.retry, "schedule_settling", second_refused)
    worker._stopping()
    assert calls == [1, 1]
    assert "partition 0: 1 of 3 unanswered batch(es) were scheduled as re-sends" in \
        " ".join(worker.stop_said)
    assert RetryStore(redis_client, keys).pending() == 1
    assert pending(redis_client, keys) == 2  # the refused group's entry, and the third's
    sent = sent_by_next_start(redis_client, settings, resends=1)
    assert len(sent) == len(set(sent)) == 30


def test_batches_sharing_an_entry_are_booked_together_at_a_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter

    from engine.dispatch import _sharing_entries

    def made(name: str, size: int) -> Delivery:
        return Delivery(id=name, hook_id=1, account_id=1, kind="http_batch",
                        parts=[b"x" * size])

    deliveries = [made("a", 5), made("b", 5), made("c", 5), made("d", 5), made("e", 5)]
    pending_hooks: dict[str, Any] = {
        "a": (None, Counter({"e1": 1})), "b": (None, Counter({"e2": 1})),
        "c": (None, Counter({"e1": 1, "e3": 1})), "d": (None, Counter({"e4": 1})),
        "e": (None, Counter({"e3": 1}))}
    import engine.dispatch

    for limit, want in ((1, [["a", "c", "e"], ["b"], ["d"]]),
                        (10, [["a", "c", "e"], ["b", "d"]]),
                        (1000, [["a", "c", "e", "b", "d"]])):
        monkeypatch.setattr(engine.dispatch, "STOP_BOOKING_BYTES", limit)
        got = [[d.id for d in g] for g in _sharing_entries(deliveries, pending_hooks)]
        assert got == want, limit


class HoldsOne(Later):
    """Answers at once, except for the hook ``slow``'s batches: never."""

    def __init__(self, slow: int) -> None:
        super().__init__(after=1)
        self.slow = slow

    def submit(self, hook: Any, delivery: Delivery) -> None:
        if delivery.hook_id == self.slow:
            self.hooks.append(hook)
            self.held.append(delivery)
            return
        super().submit(hook, delivery)


def test_a_stop_sends_again_only_the_slow_hooks_batches_not_every_hooks(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hooks take the same events; one destination answers, the other does not
    within the drain. Left pending, each entry was read again by the next start and
    sent again to both hooks; now only the slow hook's batches go again."""
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    fast, slow = registry.create(hook()), registry.create(hook())
    one_intake(redis_client, keys, 10).publish(clicks(20))
    sender = HoldsOne(slow.id or 0)
    worker = PartitionWorker(settings, redis_client, 0, sender)
    for _ in range(3):
        worker.step(block_ms=10)
    worker._stopping()
    assert pending(redis_client, keys) == 0
    stats = Stats(redis_client, keys)
    assert stats.get(fast.id or 0)["delivered"] == 20
    assert stats.get(slow.id or 0)["retried"] == 20
    # the next start: nothing read again; the re-sends go to the slow hook alone
    again = InProcessSender()
    PartitionWorker(settings, redis_client, 0, again).step(block_ms=10)
    retry_worker = RetryWorker(settings, redis_client, again)
    assert retry_worker.step() == 2
    assert {d.hook_id for d in again.transport.sent} == {slow.id}
    assert sum(d.count for d in again.transport.sent) == 20


def test_a_stop_leaving_open_batches_unsent_does_not_also_schedule_their_entries_batches(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks cannot be loaded at the stop: one hook's open batches stay unsent, so
    their entries stay pending and the next start sends every hook's messages of them.
    Another hook's unanswered batches of the same entries were also scheduled as
    re-sends, and that hook got them twice; now they are left to the next start."""
    import engine.dispatch
    from tests.integration.test_workers import break_stored_hook

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    registry.create(hook(target={"http_batch": {"url": "http://127.0.0.1:9/x",
                                                "max_batch_size": 100,
                                                "flush_timeout_sec": 600}}))
    slow = registry.create(hook(target={"http_batch": {"url": "http://127.0.0.1:9/y",
                                                       "max_batch_size": 5}}))
    broken = registry.create({**hook(), "actions": ["open"]})
    one_intake(redis_client, keys, 10).publish(clicks(15))
    worker = PartitionWorker(settings, redis_client, 0, HoldsOne(slow.id or 0))
    for _ in range(3):
        worker.step(block_ms=10)
    assert worker.dispatcher.open_messages() == 15 and worker.unsettled == 30
    break_stored_hook(redis_client, keys, broken.id)
    redis_client.incr(keys.hooks_version)
    assert worker.drain() == 15  # the slow hook's, without an outcome
    assert RetryStore(redis_client, keys).pending() == 0
    assert pending(redis_client, keys) == 2  # both entries, for the next start
    registry.delete(broken.id or 0)
    again = InProcessSender()
    restarted = PartitionWorker(settings, redis_client, 0, again)
    for _ in range(3):
        restarted.step(block_ms=10)
    restarted.drain(5)
    assert RetryWorker(settings, redis_client, again).step() == 0
    sent = [(d.hook_id, mid) for d in again.transport.sent for mid in d.message_ids]
    assert len(sent) == len(set(sent)) == 30  # each hook's 15, once


def test_a_partition_stop_with_nothing_in_flight_does_not_wait(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    settings = settings.model_copy(update={"PARTITIONS": 1})
    worker = PartitionWorker(settings, redis_client, 0, Later(hold=True))
    worker.step(block_ms=10)
    started = time.monotonic()
    assert worker.drain(30) == 0
    assert time.monotonic() - started < 1  # at once: nothing was read


def test_a_partition_waiting_behind_another_engine_stops_at_once_saying_nothing(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """Holding nothing, it does not ask for the claim (another engine's: PrefixTaken)
    and say it stopped without outcomes of batches it never had."""
    from engine.lease import EngineLease

    settings = settings.model_copy(update={"PARTITIONS": 1})
    assert EngineLease(redis_client, keys, ttl_sec=30).claim() is None  # another's
    worker = PartitionWorker(settings, redis_client, 0, Later(), owner="not-the-holder")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        worker._stopping()
    assert not [r for r in caplog.records if "stopped" in r.getMessage()]


def test_a_partition_stopping_closes_its_open_batches_for_the_hooks_as_stored_now(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The stop sent open batches to the hook as it was when they opened: a destination
    changed since, or a secret rotated, was passed over, and a deleted hook's batch went
    out (a round closes them for the hook as stored now, as the stop does now)."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)

    def long_window(url: str) -> dict[str, Any]:
        return hook(target={"http_batch": {"url": url, "max_batch_size": 100,
                                           "flush_timeout_sec": 600}})

    moved = registry.create(long_window("http://127.0.0.1:9/old"))
    gone = registry.create({**long_window("http://127.0.0.1:9/gone"), "actions": ["open"]})
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(5) + [{**e, "event_type": "open", "id": f"o{n}"}
                                for n, e in enumerate(clicks(3))])
    sender = Later()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    for _ in range(3):
        worker.step(block_ms=10)
    assert worker.dispatcher.open_messages() == 8
    registry.update(moved.id or 0, long_window("http://127.0.0.1:9/new"))
    registry.delete(gone.id or 0)
    assert worker.drain(5) == 0
    assert [(h.id, h.target.settings.url) for h in sender.hooks] == \
        [(moved.id, "http://127.0.0.1:9/new")]
    # the deleted hook's batch is not sent: a failed send, dead-lettered by the retry
    # worker as its hook is gone (as a round does with it)
    assert RetryStore(redis_client, keys).pending() == 1
    assert pending(redis_client, keys) == 0


def test_a_partition_whose_hooks_cannot_be_loaded_leaves_its_open_batches_unsent(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stored hook that no longer validates fails every refresh: the open batches
    cannot be closed for the hooks as stored now, so they are left to the next start
    (their entries pending), and it is said."""
    from tests.integration.test_workers import break_stored_hook

    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    registry.create(hook(target={"http_batch": {"url": "http://127.0.0.1:9/x",
                                                "max_batch_size": 100,
                                                "flush_timeout_sec": 600}}))
    broken = registry.create({**hook(), "actions": ["open"]})
    one_intake(redis_client, keys, 10).publish(clicks(4))
    sender = Later()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    for _ in range(3):
        worker.step(block_ms=10)
    assert worker.dispatcher.open_messages() == 4
    break_stored_hook(redis_client, keys, broken.id)
    redis_client.incr(keys.hooks_version)  # as any change moves it
    with caplog.at_level(logging.WARNING, logger="hookray"):
        worker._stopping()
    said = [r.getMessage() for r in caplog.records if "partition 0" in r.getMessage()]
    assert said == [said[0]] and said[0].startswith(
        "partition 0: stopping, its open batches are not sent: the hooks could not be "
        "loaded (HookError: "), said
    assert sender.hooks == [] and pending(redis_client, keys) == 1


def test_the_retry_worker_stopping_books_the_outcomes_of_its_re_sends(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A stop took back every re-send handed over without waiting for its outcome: one
    delivered was sent again once its lease ran out. Stopping, the worker books the
    outcomes that come within the drain time."""
    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    for n in range(4):
        retry.schedule(Delivery(id=f"d{n}", hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=[b"{}"], message_ids=[f"m{n}"]),
                       due_ms=0, error="HTTP 500")
    sender = Later()
    worker = RetryWorker(settings, redis_client, sender)
    assert worker.step() == 4 and len(worker.handed) == 4
    stop = threading.Event()
    stop.set()  # stopped before the outcomes came
    worker.run(stop)
    assert worker.handed == {}
    assert redis_client.zcard(keys.retry) == 0  # done: not sent again
    assert redis_client.hlen(keys.retry_unanswered) == 0
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 4


def test_the_retry_worker_hands_back_what_did_not_come_within_its_drain_time(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.3)
    created = HookRegistry(redis_client, keys).create(hook())
    RetryStore(redis_client, keys).schedule(
        Delivery(id="d1", hook_id=created.id or 0, account_id=1, kind="http_batch",
                 parts=[b"{}"], message_ids=["m1"]), due_ms=0, error="HTTP 500")
    worker = RetryWorker(settings, redis_client, Later(hold=True))
    assert worker.step() == 1
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.WARNING, logger="hookray"):
        worker.run(stop)
    said = [r.getMessage() for r in caplog.records if "retry worker: stopped" in
            r.getMessage()]
    assert said == ["retry worker: stopped with 1 re-send(s) whose outcome did not come "
                    "within 0.3 s; they are sent again once their leases run out"]
    assert worker.stop_said == said
    assert redis_client.zcard(keys.retry) == 1  # still scheduled, under its lease
    assert redis_client.hlen(keys.retry_unanswered) == 0  # a stop is no crash
