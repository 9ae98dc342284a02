"""Partition and retry workers without Ray: real Redis, in-process senders."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, cast

import msgspec
import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.errors import ConfigError, EventError, HookError, NotFound, PrefixTaken
from engine.events import Event
from engine.hooks import Hook
from engine.intake import Intake, decode_entry
from engine.keys import CONSUMER_GROUP, INTAKE_FIELD, Keys
from engine.messages import event_digest, message_id
from engine.partitioning import partition_of
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import ContentStore, HookRegistry, ProfileStore, RetryStore, Stats
from engine.transports.base import Delivery, Outcome, now_ms, pack_delivery
from engine.transports.http import HttpTransport
from engine.transports.stub import StubTransport
from tests.services import wait_for

pytestmark = pytest.mark.integration


class InProcessSender:
    """Sends through a StubTransport at once; outcomes come back on the next poll."""

    def __init__(self, transport: Any = None, hold: bool = False) -> None:
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

    def holds(self, delivery_id: str) -> bool:
        return any(d.id == delivery_id for d, _ in self.done) or \
            any(d.id == delivery_id for d in self.held)


def hook(**kw: Any) -> dict[str, Any]:
    return {"name": "h", "active": True, "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x", "max_batch_size": 10,
                                      "flush_timeout_sec": 0.1}}, **kw}


def clicks(n: int, list_id: int = 1) -> list[dict[str, Any]]:
    return [{"event_type": "click", "account_id": 1, "list_id": list_id,
             "event_date": "2026-01-01T00:00:00Z", "id": f"c{list_id}-{i}"} for i in range(n)]


def one_intake(r: redis.Redis, keys: Keys, max_batch: int) -> Intake:
    """The intake of one partition, its stream and group made."""
    intake = Intake(r, keys, 1, max_batch)
    intake.ensure_groups()
    return intake


def one_partition(settings: Settings) -> Settings:
    return settings.model_copy(update={"PARTITIONS": 1})


def break_stored_hook(r: redis.Redis, keys: Keys, hook_id: int | None) -> None:
    """Store the hook as an older event types file allowed it: an action the
    catalogue no longer knows (the hooks' version is not bumped)."""
    stored = json.loads(r.hget(keys.hooks, str(hook_id)) or b"{}")
    stored["actions"] = ["no_such_event"]
    r.hset(keys.hooks, str(hook_id), json.dumps(stored))


@contextmanager
def running(workers: list[Any]) -> Iterator[None]:
    """The workers' ``run`` loops in threads for the block; stopped after it."""
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)


def sent_once(sender: InProcessSender) -> bool:
    """Every message the sender's transport sent, sent once."""
    mids = [mid for d in sender.transport.sent for mid in d.message_ids]
    return len(mids) == len(set(mids))


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


def test_intake_refuses_a_publish_for_a_partition_too_far_behind(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """INTAKE_MAX_ENTRIES: a publish with events for a partition whose stream holds that
    many entries is refused whole (Backlogged), its other partitions' events too, and
    the ids it gave are taken back; one for the other partitions alone is accepted."""
    from engine import intake as intake_module
    from engine.errors import Backlogged

    monkeypatch.setattr(intake_module, "BACKLOG_CHECK_SEC", 0.0)
    intake = Intake(redis_client, keys, partitions=2, max_batch=100, max_entries=1)
    intake.ensure_groups()
    full, other = (next(i for i in range(1, 50) if partition_of(1, i, 2) == n) for n in (0, 1))
    assert intake.publish(clicks(3, list_id=full)).accepted == 3
    fresh = [Event(event_type="click", account_id=1, list_id=other,
                   event_date="2026-01-01T00:00:00Z")]
    with pytest.raises(Backlogged, match=r"partition 0 holds 1 entries not yet processed "
                                         r"\(INTAKE_MAX_ENTRIES is 1\); nothing was accepted"):
        intake.publish(clicks(2, list_id=full) + clicks(2, list_id=other))
    with pytest.raises(Backlogged):
        intake.publish([*fresh, Event(event_type="click", account_id=1, list_id=full,
                                      event_date="2026-01-01T00:00:00Z")])
    assert fresh[0].id is None  # its id taken back with the refusal
    assert [redis_client.xlen(keys.intake(n)) for n in range(2)] == [1, 0]
    assert intake.publish(fresh).accepted == 1  # the other partition is not behind
    assert [redis_client.xlen(keys.intake(n)) for n in range(2)] == [1, 1]
    # no limit: 0
    unlimited = Intake(redis_client, keys, partitions=2, max_batch=100)
    assert unlimited.publish(clicks(1, list_id=full)).accepted == 1
    # an engine reading other streams: that is the error, not "publish again later"
    redis_client.hset(keys.config, "partitions", 3)
    with pytest.raises(ConfigError, match="PARTITIONS is 2 here but the engine"):
        intake.publish(clicks(1, list_id=full))


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


def test_intake_takes_a_list_or_a_body_of_events_not_one_event(
        redis_client: redis.Redis, keys: Keys) -> None:
    """One event given where a batch is expected (a dict, an Event, None) is refused
    saying so, not read key by key; a generator of events is read once; one event
    written over several lines (not NDJSON) is one event; a UTF-8 BOM is no content."""
    intake = Intake(redis_client, keys, partitions=1, max_batch=100)
    intake.ensure_groups()
    (event,) = clicks(1)
    for one in (event, Event(**event), None):
        with pytest.raises(EventError, match=r"expected a list of events .*, got "):
            intake.publish(one)  # type: ignore[arg-type]
    assert redis_client.xlen(keys.intake(0)) == 0
    assert intake.publish(e for e in clicks(2)).accepted == 2
    pretty = json.dumps({**event, "id": "pretty"}, indent=2).encode()
    assert intake.publish(pretty).ids == ["pretty"]
    assert intake.publish(b"\xef\xbb\xbf" + json.dumps([{**event, "id": "bom"}]).encode()
                          ).ids == ["bom"]
    nd = b"\n".join(json.dumps({**event, "id": f"nd{n}"}).encode() for n in range(2))
    assert intake.publish(b"\xef\xbb\xbf" + nd).ids == ["nd0", "nd1"]


def test_publishing_pauses_the_cyclic_collector_and_resumes_it_even_on_errors(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.collector: the collector is off while a publish decodes, checks and
    writes, on again after it, whether the publish succeeded or was refused; one left
    off by its owner stays off."""
    import gc

    intake = Intake(redis_client, keys, partitions=1, max_batch=100)
    intake.ensure_groups()
    seen: list[bool] = []
    write = intake._write

    def spying(entries: Any, count: int, events: Any = ()) -> None:
        seen.append(gc.isenabled())
        write(entries, count, events)

    monkeypatch.setattr(intake, "_write", spying)
    assert gc.isenabled()
    assert intake.publish(clicks(3)).accepted == 3
    assert seen == [False] and gc.isenabled()
    with pytest.raises(EventError):
        intake.publish([{"event_type": "clack", "account_id": 1,
                         "event_date": "2026-01-01T00:00:00Z"}])
    assert gc.isenabled()
    gc.disable()
    try:
        assert intake.publish(clicks(2)).accepted == 2
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert seen == [False, False]


def test_event_objects_go_to_their_partitions_in_order_and_bad_ones_write_nothing(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Event objects are checked on the very entries written; interleaved databases are
    grouped by partition, each partition's events in their order; a batch with a bad
    event writes nothing, or only the good ones when partial."""
    from engine.events import Event

    intake = Intake(redis_client, keys, partitions=3, max_batch=7)
    intake.ensure_groups()
    events = [Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1,
                    list_id=i % 5, id=f"e{i}") for i in range(60)]
    assert intake.publish(events).ids == [f"e{i}" for i in range(60)]
    for n in range(3):
        entries = redis_client.xrange(keys.intake(n))
        read = [e.id for _, f in entries for e in decode_entry(f)]
        want = [e.id for e in events if partition_of(1, e.list_id, 3) == n]
        assert read == want and max((len(decode_entry(f)) for _, f in entries), default=0) <= 7
    assert len({partition_of(1, e.list_id, 3) for e in events}) > 1  # interleaved indeed
    written = sum(redis_client.xlen(keys.intake(n)) for n in range(3))

    bad = [Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1,
                 list_id=i % 5) for i in range(10)]
    bad[4].list_id = [4]  # type: ignore[assignment]  # unhashable, and not an id
    with pytest.raises(EventError, match=r"event 4: list_id: Expected `int \| null`"):
        intake.publish(bad)
    assert sum(redis_client.xlen(keys.intake(n)) for n in range(3)) == written
    result = intake.publish(bad, partial=True)
    assert result.accepted == 9 and [i.index for i in result.issues] == [4]
    assert result.ids == [e.id for i, e in enumerate(bad) if i != 4]


def test_entries_are_acked_only_when_every_message_is_settled(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
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


def test_a_deleted_profiles_fields_are_forgotten_and_no_longer_copied(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A profile deleted on the platform: its stored data goes (it is personal data),
    and a later event of that id, even one without ``profile_deleted``, copies none of
    it, also in a partition that had it cached."""
    registry = HookRegistry(redis_client, keys)
    with_fields = registry.create(hook(actions=["click"], custom_data={"fields": ["email"]}))
    profiles = ProfileStore(redis_client, keys)
    profiles.upsert(1, {"p1": {"email": "ann@example.org"}, "p2": {"email": "bo@example.org"}})
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    base = clicks(1)[0]

    def email(event_id: str) -> Any:
        intake.publish([{**base, "id": event_id, "profile_id": "p1"}])
        mid = message_id(with_fields.id, event_id)
        run_until(worker, lambda: any(mid in d.message_ids for d in sender.transport.sent))
        [msg] = [m for d in sender.transport.sent for m in map(json.loads, d.parts)
                 if m["hook_message_id"] == mid]
        return msg.get("custom_data", {}).get("email")

    assert email("before") == "ann@example.org"  # now cached by the partition
    assert profiles.delete(1, ["p1", "p3"] * 700) == 1  # chunked, unknown ids counted 0
    assert redis_client.hkeys(keys.profiles(1)) == [b"p2"]
    assert email("after") is None


def test_stored_profiles_fill_custom_data_only_for_hooks_with_profile_fields(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An event without a profile gets its stored one when a hook copying profile
    fields matches it (fetched once, cached); an inline profile is kept; an unknown
    profile leaves the fields out; events only other hooks match cost no lookup."""
    registry = HookRegistry(redis_client, keys)
    with_fields = registry.create(hook(actions=["click"], custom_data={"fields": ["email"]}))
    registry.create(hook(actions=["open"]))  # no profile fields
    ProfileStore(redis_client, keys).upsert(1, {"p1": {"email": "ann@example.org"},
                                                "p9": {"email": "never@example.org"}})
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    asked: list[dict[int, list[str]]] = []
    get_many = worker.side.profiles.get_many

    def counting(wanted: dict[int, list[str]]) -> Any:
        asked.append({a: sorted(p) for a, p in wanted.items()})
        return get_many(wanted)

    monkeypatch.setattr(worker.side.profiles, "get_many", counting)
    base = clicks(1)[0]
    intake.publish([
        {**base, "id": "stored", "profile_id": "p1"},
        {**base, "id": "again", "profile_id": "p1"},
        {**base, "id": "inline", "profile_id": "p1", "profile": {"email": "own@example.org"}},
        {**base, "id": "unknown", "profile_id": "p2"},
        {**base, "id": "open", "event_type": "open", "profile_id": "p9"},
    ])
    run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 5)
    got = {msg["hook_message_id"]: msg for d in sender.transport.sent
           if d.hook_id == with_fields.id for msg in map(json.loads, d.parts)}
    by_event = {e: got[message_id(with_fields.id, e)].get("custom_data", {}).get("email")
                for e in ("stored", "again", "inline", "unknown")}
    assert by_event == {"stored": "ann@example.org", "again": "ann@example.org",
                        "inline": "own@example.org", "unknown": None}, got
    assert asked == [{1: ["p1", "p2"]}]  # one lookup; p9's event needs none


def test_content_is_stored_per_account_and_bad_content_is_refused_whole(
        redis_client: redis.Redis, keys: Keys) -> None:
    store = ContentStore(redis_client, keys, 60)
    assert store.put(1, {"s1": {"subject": "one"}}) == 1
    assert store.put(2, {"s1": {"subject": "two"}, "s2": {"subject": "x"}}, ttl_sec=5) == 2
    assert store.get_many([(1, "s1"), (2, "s1"), (1, "s2"), (3, "s1")]) == {
        (1, "s1"): {"subject": "one"}, (2, "s1"): {"subject": "two"}}
    assert 0 < redis_client.ttl(keys.content(2, "s2")) <= 5
    assert 55 < redis_client.ttl(keys.content(1, "s1")) <= 60
    for account, contents, reason in [
            ("1", {"s": {}}, "store_content: account_id '1' is not an integer"),
            (True, {"s": {}}, "store_content: account_id True is not an integer"),
            (-1, {"s": {}}, "store_content: account_id -1 is not an integer"),
            (1, ["s"], "contents must map each send id"),
            (1, {"": {}}, "contents must map each send id"),
            (1, {"s": "text"}, "contents must map each send id"),
            (1, {"s3": {"ok": 1}, "s4": {"at": object()}},
             "content of send id 's4': not JSON: .*nothing stored"),
            (1, {"s5": {"n": float("nan")}}, "content of send id 's5': not JSON")]:
        with pytest.raises(ValueError, match=reason):
            store.put(account, contents)  # type: ignore[arg-type]
    assert store.get_many([(1, "s3")]) == {}  # a refused call stores none of its content


def test_failures_go_to_the_retry_schedule_then_dead_letters(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 2,
                                                      "HOOK_RETRY_PERIOD_SEC": 0.1})
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
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
    # replayed, it is sent as a new delivery is: once, then 2 re-sends (not 2 in all)
    assert retry.replay([dead.id]) == 1
    deadline = time.monotonic() + 5
    while not retry.dead_letters() and time.monotonic() < deadline:
        retry_worker.step()
    (again,) = retry.dead_letters()
    assert again.resends == 2 and failing.transport.attempts[dead.id] == 3 + 3
    assert Stats(redis_client, keys).get(1)["retried"] == 10 * 4  # 2 re-sends each time


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
    # replayed (a deleted hook's letters may be), it dies again unsent: 0 re-sends, not -1
    assert retry.replay(["d1"]) == 1
    RetryWorker(settings, redis_client, InProcessSender()).step()
    (dead,) = retry.dead_letters()
    assert dead.resends == 0 and dead.last_error.startswith(f"hook {gone.id} was deleted")


def test_a_deleted_hooks_counters_stay_while_a_resend_or_an_old_letter_may_count(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Kept while a re-send of the hook may still be waiting (HOOK_RETRY_PERIOD_SEC),
    after a replay of its letters (in the schedule, in no dead-letter index until
    killed again), and while a dead letter kept before the hook index existed is
    its."""
    registry, retry = HookRegistry(redis_client, keys), RetryStore(redis_client, keys)
    waiting, replayed, old = (registry.create(hook(name=f"h{n}")) for n in range(3))
    for h in (waiting, replayed, old):
        redis_client.hincrby(keys.stats(h.id or 0), "delivered", 5)
    now = retry._redis_ms()
    retry.schedule(Delivery(id="w1", hook_id=waiting.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=now + 3_000_000,
                   error="HTTP 500")
    retry.kill(Delivery(id="r1", hook_id=replayed.id or 0, account_id=1,
                        kind="http_batch", parts=[b"{}"]), "HTTP 500")
    for h in (waiting, replayed, old):
        registry.delete(h.id or 0)
    # deleted 16 minutes ago, as far as the sweep can tell
    redis_client.zadd(keys.hooks_gone, {str(h.id): now - 960_000
                                        for h in (waiting, replayed, old)})
    # a letter of the old one from before the indexes (as an earlier version kept it)
    retry.kill(Delivery(id="o1", hook_id=old.id or 0, account_id=1, kind="http_batch",
                        parts=[b"{}"]), "HTTP 500")
    redis_client.delete(keys.dead_of_hook(old.id or 0), keys.dead_of_account(1),
                        keys.dead_indexed)
    assert retry.replay(["r1"]) == 1  # its hook is marked deleted again, now
    slow = settings.model_copy(update={"HOOK_RETRY_PERIOD_SEC": 3600.0})
    worker = RetryWorker(slow, redis_client, InProcessSender())
    worker.step()  # r1 is due: killed again (its hook is gone), w1 waits
    assert {d.id for d in retry.dead_letters()} == {"r1", "o1"}
    for h in (waiting, replayed, old):
        assert Stats(redis_client, keys).get(h.id or 0)["delivered"] == 5, h.name
    assert redis_client.zcard(keys.hooks_gone) == 3


def test_a_deleted_hooks_counters_go_once_it_has_no_dead_letter(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted hook's counters stay while its dead letters may be replayed or
    discarded, then go (they had stayed for good: 100 bytes for every hook ever
    deleted, which nothing listed)."""
    import engine.retrying

    registry, retry, stats = HookRegistry(redis_client, keys), RetryStore(redis_client, keys), \
        Stats(redis_client, keys)
    idle, failing, back = (registry.create(hook(name=f"h{n}")) for n in range(3))
    for h in (idle, failing, back):
        redis_client.hincrby(keys.stats(h.id or 0), "delivered", 5)
    retry.schedule(Delivery(id="d1", hook_id=failing.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    record = redis_client.hget(keys.hooks, str(back.id))
    for h in (idle, failing, back):
        registry.delete(h.id or 0)
    redis_client.hset(keys.hooks, str(back.id), record or b"")  # restored (a backup)
    assert retry.forget_gone_stats(keep_ms=60_000) == 0  # not yet: its last sends count
    assert stats.get(idle.id or 0)["delivered"] == 5
    # the re-send of the deleted hook dies unsent, marking it deleted again
    monkeypatch.setattr(engine.retrying, "STATS_GONE_SEC", 0.0)
    quick = settings.model_copy(update={"HOOK_RETRY_PERIOD_SEC": 0.001})
    worker = RetryWorker(quick, redis_client, InProcessSender())
    worker.step()
    assert [d.id for d in retry.dead_letters(hook_id=failing.id)] == ["d1"]
    # the idle one's counters went; the failing one's stay with its dead letter; the
    # one stored again (by hand) is no longer looked at
    assert not redis_client.exists(keys.stats(idle.id or 0))
    counts = stats.get(failing.id or 0)
    assert counts["delivered"] == 5 and counts["dead_lettered"] == 1
    assert stats.get(back.id or 0)["delivered"] == 5
    assert redis_client.zrange(keys.hooks_gone, 0, -1) == [str(failing.id).encode()]
    assert retry.discard(["d1"]) == 1
    assert stats.get(failing.id or 0)["discarded"] == 1
    worker.gone_at = -float("inf")
    worker.step()
    assert not redis_client.exists(keys.stats(failing.id or 0), keys.hooks_gone)
    assert stats.get(back.id or 0)["delivered"] == 5


def test_a_stopped_hook_still_sends_what_it_captured_while_active(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Stopping captures nothing more; the open batch and the re-sends still leave."""
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook(target={"http_batch": {
        "url": "http://127.0.0.1:9/x", "max_batch_size": 100, "flush_timeout_sec": 60}}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    intake.publish(clicks(3))
    run_until(worker, lambda: worker.dispatcher.open_messages() == 3)  # batch open
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    registry.set_active(created.id or 0, False)
    run_until(worker, lambda: len(sender.transport.sent) == 1)  # flushed by the change
    intake.publish([{**c, "id": f"late-{i}"} for i, c in enumerate(clicks(2))])
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert [d.count for d in sender.transport.sent] == [3]  # nothing captured after
    RetryWorker(settings, redis_client, sender).step()
    assert [d.id for d in sender.transport.sent][1:] == ["d1"]
    assert retry.pending() == 0 and not retry.dead_letters()


def test_errors_kept_for_retries_and_dead_letters_never_hold_the_hooks_secrets(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A destination may echo a credential in its answer: masked before it is stored,
    so no reader (API, driver, CLI) of the schedule or the dead letters sees it."""
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook(target={"http_batch": {
        "url": "https://r.example/x?api_key=key-SECRET",
        "auth": {"kind": "bearer", "token": "tok-SECRET"}}}))
    echo = ("HTTP 401: status is not 200; body: Authorization: Bearer tok-SECRET, "
            "api_key=key-SECRET")
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 1})
    worker = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    delivery = Delivery(id="d1", hook_id=created.id or 0, account_id=1, kind="http_batch",
                        parts=[b"{}"], message_ids=["m1"])
    worker.dispatcher.pending_hooks["d1"] = (created, Counter())
    worker._settle([(delivery, Outcome(ok=False, error="Rejected", detail=echo))])
    retry = RetryStore(redis_client, keys)
    (due,) = retry.claim_due(now=now_ms() + 3_600_000)  # due after the retry period
    assert "SECRET" not in due.last_error and "HTTP 401" in due.last_error
    retry_worker = RetryWorker(cfg, redis_client, InProcessSender())
    retry_worker._refresh()
    retry_worker.settle(due, Outcome(ok=False, error="Rejected", detail=echo))
    (dead,) = retry.dead_letters()
    assert "SECRET" not in dead.last_error and "Bearer **********" in dead.last_error


def test_a_resends_error_is_masked_with_its_hook_deleted_or_changed_during_the_send(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The retry worker masks an error with the secrets of the hook as it was sent:
    deleted (or given new secrets) during the send, its old secrets are still masked
    in the dead letter (the hook's secrets are not kept after a delete)."""
    registry = HookRegistry(redis_client, keys)
    retry = RetryStore(redis_client, keys)
    cfg = settings.model_copy(update={"HOOK_RETRY_TIMES": 0})
    sender = InProcessSender(hold=True)
    worker = RetryWorker(cfg, redis_client, sender)
    created = []
    for n in range(2):
        created.append(registry.create(hook(name=f"h{n}", target={"http_batch": {
            "url": "https://r.example/x", "auth": {"kind": "bearer", "token": f"tok{n}-SECRET"}}})))
        retry.schedule(Delivery(id=f"d{n}", hook_id=created[n].id or 0, account_id=1,
                                kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    assert worker.step() == 2 and len(sender.held) == 2
    registry.delete(created[0].id or 0)
    registry.update(created[1].id or 0, {**created[1].to_storage(), "target": {"http_batch": {
        "url": "https://r.example/x", "auth": {"kind": "bearer", "token": "tok-NEW"}}}})
    worker._refresh()
    for sent in sender.held:
        n = sent.id[-1]
        worker.settle(sent, Outcome(ok=False, error="Rejected",
                                    detail=f"HTTP 401: body: Bearer tok{n}-SECRET"))
    letters = retry.dead_letters()
    assert len(letters) == 2
    assert {d.last_error for d in letters} == {"Rejected: HTTP 401: body: Bearer **********"}
    assert worker.sent_with == {}


def test_a_delivery_still_being_sent_is_not_claimed_twice(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Its lease ran out during a long send and its hook was deleted meanwhile: it is
    not dead-lettered while the first send is out; that send's outcome settles it."""
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook())
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    sender = InProcessSender(hold=True)
    worker = RetryWorker(settings, redis_client, sender)
    assert worker.step() == 1 and [d.id for d in sender.held] == ["d1"]
    registry.delete(created.id or 0)
    redis_client.zadd(keys.retry, {"d1": 0})  # the lease ran out
    assert worker.step() == 0
    assert not retry.dead_letters() and [d.id for d in sender.held] == ["d1"]
    (sent,) = sender.held  # the first send succeeds at last
    worker.settle(sent, Outcome(ok=True))
    assert retry.pending() == 0 and not retry.dead_letters()
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 1


def test_a_delivery_whose_outcome_waits_for_its_booking_is_not_claimed_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent and answered, but Redis failed the booking for longer than the claim's
    lease: the outcome held settles it; it is not sent (nor counted) a second time."""
    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    sender = InProcessSender()
    worker = RetryWorker(settings, redis_client, sender)
    complete = worker.side.retry.complete

    def down(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(worker.side.retry, "complete", down)
    with pytest.raises(redis.ConnectionError):
        worker.step()  # sent, answered; the booking fails
    assert len(sender.transport.sent) == 1 and len(worker.settling) == 1
    redis_client.zadd(keys.retry, {"d1": 0})  # the lease ran out meanwhile
    monkeypatch.setattr(worker.side.retry, "complete", complete)
    worker.step()
    assert len(sender.transport.sent) == 1 and not worker.settling
    assert retry.pending() == 0 and not retry.dead_letters()
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 1


def test_broker_batches_leave_every_round(redis_client: redis.Redis, settings: Settings,
                                          keys: Keys) -> None:
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook(target={"rabbitmq_exchange": {
        "host": "127.0.0.1", "exchange": "x", "type": "topic"}}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(3, list_id=7))
    run_until(worker, lambda: sender.transport.sent)
    (delivery,) = sender.transport.sent
    assert delivery.keys == ["7.click"] * 3 and delivery.kind == "rabbitmq_exchange"


def test_a_batch_after_a_full_one_waits_its_whole_flush_timeout(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The batch opened when a full one left kept that moment as its start: an event
    arriving later than the timeout after it was sent at once, with no window."""
    HookRegistry(redis_client, keys).create(hook(target={"http_batch": {
        "url": "http://127.0.0.1:9/x", "max_batch_size": 2, "flush_timeout_sec": 1.0}}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    intake.publish(clicks(2))
    run_until(worker, lambda: sender.transport.sent)  # full: sent at once
    time.sleep(1.2)
    intake.publish([{**clicks(3)[2]}])
    started = time.monotonic()
    run_until(worker, lambda: len(sender.transport.sent) == 2)
    assert time.monotonic() - started >= 0.9  # the window of the event's own batch
    assert [d.count for d in sender.transport.sent] == [2, 1]


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
    assert due.id == "d1" and due.resends == -1  # its replay is not a re-send


def test_a_replay_racing_another_moves_each_dead_letter_once(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Replay B read the dead letter, then replay A moved it and its re-send was
    delivered: B finds it gone (NotFound) and does not put it back."""
    retry, other = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    retry.kill(Delivery(id="d1", hook_id=1, account_id=1, kind="http_batch",
                        parts=[b"{}"], resends=3), "HTTP 500")
    script = retry._replay
    raced: list[int] = []

    def late(*args: Any, **kwargs: Any) -> Any:
        if not raced:  # A runs between B's read and B's move
            raced.append(other.replay(["d1"]))
            other.complete(other.claim_due()[0])
        return script(*args, **kwargs)

    retry._replay = late  # type: ignore[method-assign]
    with pytest.raises(NotFound, match="d1"):
        retry.replay(["d1"])
    assert raced == [1] and retry.pending() == 0 and not retry.dead_letters()
    assert not redis_client.hlen(keys.retry_payload)
    assert Stats(redis_client, keys).get(1)["delivered"] == 1


def test_a_replay_takes_a_dead_letter_written_again_meanwhile(
        redis_client: redis.Redis, keys: Keys) -> None:
    retry = RetryStore(redis_client, keys)
    letter = Delivery(id="d1", hook_id=1, account_id=1, kind="http_batch", parts=[b"{}"],
                      resends=3)
    retry.kill(letter, "HTTP 500")
    script = retry._replay
    calls: list[int] = []

    def late(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            retry.kill(letter, "HTTP 503")  # dead-lettered again, a new payload
        calls.append(1)
        return script(*args, **kwargs)

    retry._replay = late  # type: ignore[method-assign]
    assert retry.replay(["d1"]) == 1 and len(calls) == 2
    (due,) = retry.claim_due()
    assert due.last_error == "HTTP 503" and due.resends == -1 and not retry.dead_letters()


def _letter(delivery_id: str, account: int, hook_id: int) -> Delivery:
    return Delivery(id=delivery_id, hook_id=hook_id, account_id=account, kind="http_batch",
                    parts=[b"{}"], resends=3)


def test_dead_letters_of_an_account_or_hook_read_only_their_index(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """An account's or a hook's dead letters come from its own index: another
    account's dead letters are not read at all (here: damaged, so reading one would
    log a warning)."""
    retry = RetryStore(redis_client, keys)
    assert retry.dead_letters() == []  # a new prefix: indexed from the start
    for n in range(3):
        retry.kill(_letter(f"a{n}", 1, 10 + n % 2), "HTTP 500")
    for n in range(50):  # another account's, damaged: reading them would raise
        retry.kill(_letter(f"b{n}", 2, 20), "HTTP 500")
        redis_client.hset(keys.dead_payload, f"b{n}", b"\xc1 damaged")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert [d.id for d in retry.dead_letters(account_id=1)] == ["a0", "a1", "a2"]
        assert [d.id for d in retry.dead_letters(account_id=1, hook_id=11)] == ["a1"]
    assert not [r for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert [d.id for d in retry.dead_letters(account_id=1, limit=2)] == ["a0", "a1"]
    assert retry.dead_letters(account_id=1, hook_id=20) == []  # not the account's
    assert retry.dead_letters(account_id=3) == []
    assert retry.replay(["a1"]) == 1  # leaves the indexes too
    assert [d.id for d in retry.dead_letters(account_id=1)] == ["a0", "a2"]
    assert retry.dead_letters(hook_id=11) == []
    assert not redis_client.zscore(keys.dead_of_account(1), "a1")
    assert not redis_client.zscore(keys.dead_of_hook(11), "a1")
    retry.kill(retry.claim_due()[0], "HTTP 500")  # dead again: indexed again
    assert [d.id for d in retry.dead_letters(account_id=1)] == ["a0", "a2", "a1"]


def test_discard_deletes_dead_letters_all_or_nothing_and_counts_them(
        redis_client: redis.Redis, keys: Keys) -> None:
    retry = RetryStore(redis_client, keys)
    for n in range(3):
        retry.kill(Delivery(id=f"d{n}", hook_id=10 + n % 2, account_id=1, kind="http_batch",
                            parts=[b"{}"] * (n + 1)), "HTTP 500")
    with pytest.raises(NotFound, match=r"dead letter\(s\) nope do not exist"):
        retry.discard(["d0", "nope"])
    assert [d.id for d in retry.dead_letters()] == ["d0", "d1", "d2"]
    assert retry.discard(["d0", "d2", "d0"]) == 2
    assert [d.id for d in retry.dead_letters()] == ["d1"] and retry.pending() == 0
    assert redis_client.hkeys(keys.dead_payload) == [b"d1"]
    assert redis_client.zrange(keys.dead_of_hook(10), 0, -1) == []
    assert redis_client.zrange(keys.dead_of_account(1), 0, -1) == [b"d1"]
    stats = Stats(redis_client, keys)
    assert stats.get(10)["discarded"] == 1 + 3 and stats.get(11)["discarded"] == 0


def test_dead_letters_past_their_retention_are_discarded_by_the_retry_worker(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """DEAD_LETTER_RETENTION_HOURS: the retry worker discards the dead letters that died
    longer ago than that, counted as discarded and logged; younger ones stay, and
    with 0 (the default) none goes."""
    retry = RetryStore(redis_client, keys)
    for n in range(3):
        retry.kill(_letter(f"old{n}", 1, 10), "HTTP 500")
    # died an hour ago: the dead letters' scores are their times of death
    hour_ago = retry._redis_ms() - 3_600_000
    for key in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
        redis_client.zadd(key, {f"old{n}": hour_ago for n in range(3)}, xx=True)
    retry.kill(_letter("young", 1, 10), "HTTP 500")
    RetryWorker(settings, redis_client, InProcessSender()).step()  # 0: kept
    assert len(retry.dead_letters()) == 4
    keep_half_an_hour = settings.model_copy(update={"DEAD_LETTER_RETENTION_HOURS": 0.5})
    with caplog.at_level(logging.WARNING, logger="hookray"):
        RetryWorker(keep_half_an_hour, redis_client, InProcessSender()).step()
    assert [d.id for d in retry.dead_letters()] == ["young"]
    assert redis_client.hkeys(keys.dead_payload) == [b"young"]
    assert Stats(redis_client, keys).get(10)["discarded"] == 3
    assert "discarded 3 dead letter(s) older than DEAD_LETTER_RETENTION_HOURS (0.5 h)" \
        in caplog.text


@pytest.mark.parametrize("run", ["expire", "replay_all", "discard_all"])
def test_a_letter_dead_again_since_its_page_was_read_is_not_taken(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
        run: str) -> None:
    """An expiry (or a run over every dead letter) reads a page, then moves what in it
    is past its cutoff. A letter replayed and dead again in between died after the
    cutoff: it stays (an expiry discarded it, within its retention, as if it had died
    an hour ago)."""
    retry = RetryStore(redis_client, keys)
    retry.kill(_letter("old", 1, 10), "HTTP 500")
    hour_ago = retry._redis_ms() - 3_600_000
    for key in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
        redis_client.zadd(key, {"old": hour_ago}, xx=True)
    pages = RetryStore._pages

    def read_then_dead_again(self: Any, *args: Any, **kwargs: Any) -> Any:
        for page in pages(self, *args, **kwargs):
            if run != "expire":  # the run's cutoff is its start: one just after
                time.sleep(0.005)
            with monkeypatch.context() as inner:  # meanwhile: replayed, and dead again
                inner.setattr(RetryStore, "_pages", pages)
                assert RetryStore(redis_client, keys).replay(["old"]) == 1
                (due,) = retry.claim_due(now=retry._redis_ms() + 1)
                retry.kill(due, "HTTP 500 again")
            yield page

    monkeypatch.setattr(RetryStore, "_pages", read_then_dead_again)
    if run == "expire":
        assert retry.expire(1_800_000, budget_sec=5) == (0, True)
    else:
        assert getattr(retry, run)() == 0
    monkeypatch.undo()
    (letter,) = retry.dead_letters()
    assert letter.id == "old" and letter.last_error == "HTTP 500 again"
    assert Stats(redis_client, keys).get(10).get("discarded", 0) == 0
    assert redis_client.zcard(keys.retry) == 0


def test_dead_letter_expiry_goes_a_little_per_step_and_never_fails_one(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A backlog past the retention goes a chunk or so per step (re-sends go on between
    steps), one that cannot be decoded goes too, and a failing expiry is logged, not a
    failed step."""
    import engine.retrying
    import engine.stores

    monkeypatch.setattr(engine.stores, "DEAD_MOVE_CHUNK", 2)
    monkeypatch.setattr(engine.retrying, "EXPIRE_BUDGET_SEC", 0.0)
    retry = RetryStore(redis_client, keys)
    for n in range(5):
        retry.kill(_letter(f"old{n}", 1, 10), "HTTP 500")
    redis_client.hset(keys.dead_payload, "old2", b"\xc1 damaged")
    hour_ago = retry._redis_ms() - 3_600_000
    redis_client.zadd(keys.dead, {f"old{n}": hour_ago + n for n in range(5)}, xx=True)
    worker = RetryWorker(settings.model_copy(update={"DEAD_LETTER_RETENTION_HOURS": 0.5}),
                         redis_client, InProcessSender())
    left = []
    for _ in range(3):
        worker.step()
        left.append(int(redis_client.zcard(keys.dead)))
    assert left == [3, 1, 0]  # two per step: the chunk, then the budget is spent
    assert redis_client.hlen(keys.dead_payload) == 0
    assert Stats(redis_client, keys).get(10)["discarded"] == 4
    assert redis_client.hget(keys.engine_stats, "dead_letters_unreadable_discarded") == b"1"

    def broken(*args: Any) -> Any:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(worker.side.retry, "expire", broken)
    worker.expired_at = -float("inf")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        worker.step()  # no error out of the step
    assert "discarding dead letters past DEAD_LETTER_RETENTION_HOURS failed " \
        "(ConnectionError: gone); tried again in 60 s" in caplog.text


def test_a_discard_racing_a_replay_leaves_the_replayed_one_alone(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The replay moved the dead letter between the discard's read and its script:
    the discard finds it gone and the re-send stays scheduled."""
    retry, other = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    retry.kill(_letter("d1", 1, 10), "HTTP 500")
    script = retry._replay
    raced: list[int] = []

    def late(*args: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(other.replay(["d1"]))
        return script(*args, **kwargs)

    retry._replay = late  # type: ignore[method-assign]
    with pytest.raises(NotFound, match="d1"):
        retry.discard(["d1"])
    assert raced == [1] and retry.pending() == 1 and not retry.dead_letters()
    assert Stats(redis_client, keys).get(10)["discarded"] == 0


@pytest.mark.parametrize("verb", ["replay", "discard"])
def test_all_dead_letters_move_in_chunks_with_progress(
        redis_client: redis.Redis, keys: Keys, verb: str) -> None:
    """1,203 dead letters of a hook: scripts of at most DEAD_MOVE_CHUNK ids, progress
    after each, another hook's and an undecodable one's left where they are."""
    from engine.stores import DEAD_MOVE_CHUNK

    retry = RetryStore(redis_client, keys)
    with redis_client.pipeline(transaction=False) as pipe:  # quicker than 1,203 kills
        for n in range(1203):
            raw = pack_delivery(_letter(f"d{n:04}", 1, 10))
            pipe.hset(keys.dead_payload, f"d{n:04}", raw)
            for key in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
                pipe.zadd(key, {f"d{n:04}": 1000 + n})
        pipe.execute()
    retry.kill(_letter("other", 1, 11), "HTTP 500")
    redis_client.hset(keys.dead_payload, "d0007", b"\xc1 damaged")
    script = retry._replay
    sizes: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        sizes.append((len(kwargs["args"]) - 2) // 8)  # mode, due, then 8 per id
        return script(*args, **kwargs)

    retry._replay = counting  # type: ignore[method-assign]
    seen: list[int] = []
    moved = getattr(retry, f"{verb}_all")(hook_id=10, progress=seen.append)
    assert moved == 1202 and sum(sizes) == 1202
    assert max(sizes) <= DEAD_MOVE_CHUNK and len(sizes) == 3
    assert seen == [DEAD_MOVE_CHUNK - 1, 2 * DEAD_MOVE_CHUNK - 1, 1202]
    assert redis_client.zrange(keys.dead_of_hook(10), 0, -1) == [b"d0007"]
    assert [d.id for d in retry.dead_letters()] == ["other"]  # d0007: undecodable
    assert retry.pending() == (1202 if verb == "replay" else 0)
    assert Stats(redis_client, keys).get(10)["discarded"] == (0 if verb == "replay" else 1202)


def test_large_re_sends_are_claimed_a_few_at_a_time(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A claim copies at most ``max_bytes`` of payloads (one larger alone), in the
    order due; those left wait for the next claim, unleased."""
    retry = RetryStore(redis_client, keys)
    for n, size in enumerate([400, 400, 400, 3000, 100]):
        retry.schedule(Delivery(id=f"d{n}", hook_id=1, account_id=1, kind="http_batch",
                                parts=[b"x" * size]), due_ms=n, error="HTTP 500")
    two = sum(redis_client.hstrlen(keys.retry_payload, f"d{n}") for n in (0, 1))
    claims = []
    while claimed := retry.claim_due(200, now=100, max_bytes=two):
        claims.append([d.id for d in claimed])
    assert claims == [["d0", "d1"], ["d2"], ["d3"], ["d4"]]
    assert retry.pending() == 5  # leased, none lost
    assert [d.id for d in retry.claim_due(200, now=2**62)] == ["d0", "d1", "d2", "d3", "d4"]


def test_a_scheduled_re_send_without_its_payload_is_dropped_with_a_warning(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """Never the engine's doing (it writes both or neither), but a Redis evicting keys
    or a hand at redis-cli: the schedule's entry goes, named in the log, and the
    claim takes the others, a large one alone as ever."""
    retry = RetryStore(redis_client, keys)
    for n, size in enumerate([100, 3000, 100]):
        retry.schedule(Delivery(id=f"d{n}", hook_id=1, account_id=1, kind="http_batch",
                                parts=[b"x" * size]), due_ms=n, error="HTTP 500")
    redis_client.hdel(keys.retry_payload, "d0")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert [d.id for d in retry.claim_due(200, now=100, max_bytes=1000)] == ["d1"]
    assert "scheduled re-send d0 had no payload" in caplog.text
    assert [d.id for d in retry.claim_due(200, now=100, max_bytes=1000)] == ["d2"]
    assert retry.pending() == 2


@pytest.mark.parametrize("how", ["discard", "expire"])
def test_an_undecodable_dead_letter_gone_leaves_no_index_entry_behind(
        redis_client: redis.Redis, keys: Keys, how: str) -> None:
    """An undecodable dead letter discarded or expired names no owner, so its
    account's and hook's index entries stay at first; the next read of an index
    takes them out (not walked over by every read, nor kept forever), and never one
    of a letter that is there."""
    retry = RetryStore(redis_client, keys)
    for n in range(4):
        retry.kill(_letter(f"d{n}", 1, 10), "HTTP 500")
    redis_client.hset(keys.dead_payload, "d1", b"\xc1 damaged")
    if how == "discard":
        assert retry.discard(["d1"]) == 1
    else:
        hour_ago = retry._redis_ms() - 3_600_000
        redis_client.zadd(keys.dead, {"d1": hour_ago}, xx=True)
        assert retry.expire(1_800_000, budget_sec=5) == (1, True)
    assert redis_client.hget(keys.engine_stats, "dead_letters_unreadable_discarded") == b"1"
    assert redis_client.zcard(keys.dead_of_hook(10)) == 4  # not known when it went
    assert [d.id for d in retry.dead_letters(hook_id=10)] == ["d0", "d2", "d3"]
    assert redis_client.zrange(keys.dead_of_hook(10), 0, -1) == [b"d0", b"d2", b"d3"]
    # the account's index: its walk to replay takes the entry out too
    assert redis_client.zcard(keys.dead_of_account(1)) == 4
    assert retry.replay_all(account_id=1) == 3
    assert not redis_client.exists(keys.dead_of_account(1), keys.dead_of_hook(10))


@pytest.mark.parametrize("verb", ["replay", "discard"])
def test_large_dead_letters_move_a_few_per_script(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
        verb: str) -> None:
    """Scripts copy at most DEAD_MOVE_BYTES of payloads (one larger alone); given ids
    still move all or none."""
    import engine.stores

    retry = RetryStore(redis_client, keys)
    letters = [Delivery(id=f"d{n}", hook_id=10, account_id=1, kind="http_batch",
                        parts=[b"x" * 400]) for n in range(5)]
    for letter in letters:
        retry.kill(letter, "HTTP 500")
    monkeypatch.setattr(engine.stores, "DEAD_MOVE_BYTES", sum(
        redis_client.hstrlen(keys.dead_payload, f"d{n}") for n in (0, 1)))
    script, ids_per_script = retry._replay, []

    def counting(*args: Any, **kwargs: Any) -> Any:
        ids_per_script.append(kwargs["args"][3::8])
        return script(*args, **kwargs)

    retry._replay = counting  # type: ignore[method-assign]
    assert getattr(retry, verb)(["d0", "d1", "d2"]) == 3
    assert ids_per_script == [["d0", "d1"], ["d2"]]
    redis_client.hset(keys.dead_payload, "d4", b"\xc1 damaged" + b"x" * 600)
    ids_per_script.clear()
    if verb == "discard":  # one no replay can send is deleted when named, after the others
        assert retry.discard(["d4", "d3"]) == 2
        assert ids_per_script == [["d3"]] and redis_client.zrange(keys.dead, 0, -1) == []
        assert redis_client.hget(keys.engine_stats, "dead_letters_unreadable_discarded") \
            == b"1"
        return
    with pytest.raises(NotFound, match=r"^dead letter d4 cannot be decoded; it is left "
                                       "where it is$"):
        retry.replay(["d3", "d4"])  # two scripts' worth: neither runs
    assert ids_per_script == [] and redis_client.zrange(keys.dead, 0, -1) == [b"d3", b"d4"]
    assert retry.replay_all(hook_id=10) == 1  # d4 stays where it is
    assert redis_client.zrange(keys.dead, 0, -1) == [b"d4"]
    assert retry.pending() == 4


def test_two_runs_over_all_dead_letters_at_once_keep_to_the_chunk(
        redis_client: redis.Redis, keys: Keys) -> None:
    """While one run discards all, another discards half of each chunk the first has
    read: every chunk still holds at most DEAD_MOVE_CHUNK (those gone are passed
    over, not made up for by reading more), and between them every dead letter
    goes once."""
    from engine.stores import DEAD_MOVE_CHUNK

    retry, other = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    with redis_client.pipeline(transaction=False) as pipe:
        for n in range(3000):
            pipe.hset(keys.dead_payload, f"d{n:04}", pack_delivery(_letter(f"d{n:04}", 1, 10)))
            for key in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
                pipe.zadd(key, {f"d{n:04}": 1000 + n})
        pipe.set(keys.dead_indexed, 10_000)  # indexed above: the mark is past them
        pipe.execute()
    real = retry._move
    sizes: list[int] = []
    by_other: list[int] = []

    def racing(mode: str, ids: list[str], *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(ids))
        by_other.append(other.discard(ids[::2]))  # gone before this run reads them
        return real(mode, ids, *args, **kwargs)

    retry._move = racing  # type: ignore[method-assign]
    moved = retry.discard_all()
    assert sizes and max(sizes) <= DEAD_MOVE_CHUNK
    assert moved + sum(by_other) == 3000 and retry.dead_letters() == []
    assert Stats(redis_client, keys).get(10)["discarded"] == 3000


def test_replaying_all_takes_none_twice_that_dies_again_meanwhile(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A dead letter replayed by the first chunk is sent, fails and is dead-lettered
    again before the run ends: the run does not take it again (it would go on for as
    long as the destination fails)."""
    from engine.stores import DEAD_MOVE_CHUNK

    retry = RetryStore(redis_client, keys)
    for n in range(DEAD_MOVE_CHUNK + 10):
        retry.kill(_letter(f"d{n:04}", 1, 10), "HTTP 500")
    time.sleep(0.002)
    script = retry._replay
    calls: list[int] = []

    def failing_again(*args: Any, **kwargs: Any) -> Any:
        out = script(*args, **kwargs)
        if not calls:  # the first chunk's first re-send fails for good at once
            time.sleep(0.002)
            retry.kill(retry.claim_due(limit=1)[0], "HTTP 500 again")
        calls.append(1)
        return out

    retry._replay = failing_again  # type: ignore[method-assign]
    assert retry.replay_all() == DEAD_MOVE_CHUNK + 10 and len(calls) == 2
    (again,) = retry.dead_letters()
    assert again.last_error == "HTTP 500 again" and retry.pending() == DEAD_MOVE_CHUNK + 9


def test_replaying_all_takes_those_a_clock_ahead_of_redis_killed(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A dead letter's time of death is its worker's clock: one a minute ahead of
    Redis' still killed them before the replay started, and they are all taken."""
    retry = RetryStore(redis_client, keys)
    ids = [f"d{n}" for n in range(5)]
    for delivery_id in ids:
        retry.kill(_letter(delivery_id, 1, 10), "HTTP 500")
    seconds, micros = redis_client.time()
    ahead = seconds * 1000 + micros // 1000 + 60_000
    for zset in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
        assert redis_client.zadd(zset, dict.fromkeys(ids, ahead), xx=True) == 0
    assert retry.replay_all() == 5 and retry.dead_letters() == []
    assert retry.pending() == 5


def test_a_replay_from_a_clock_an_hour_ahead_is_due_at_once(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replayed letters are due now by Redis' clock, not by that of the machine the
    operator replays from: one an hour ahead left them waiting an hour."""
    retry = RetryStore(redis_client, keys)
    retry.kill(_letter("d1", 1, 10), "HTTP 500")
    import time

    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600)  # this machine's clock
    assert retry.replay(["d1"]) == 1
    seconds, micros = redis_client.time()
    redis_now = seconds * 1000 + micros // 1000
    assert [d.id for d in retry.claim_due(now=redis_now + 1000)] == ["d1"]


def test_dead_letters_page_by_cursor_reading_each_once_however_many_died_together(
        redis_client: redis.Redis, keys: Keys) -> None:
    """1,200 dead letters of one millisecond (one score), paged 500 at a time: each is
    read from Redis once (paging by score alone read the whole tie again for every
    page), in Redis' order, and a cursor whose dead letter is gone still goes on."""
    retry = RetryStore(redis_client, keys)
    with redis_client.pipeline(transaction=False) as pipe:
        for n in range(1200):
            pipe.hset(keys.dead_payload, f"d{n:04}", pack_delivery(_letter(f"d{n:04}", 1, 10)))
            for key in (keys.dead, keys.dead_of_account(1), keys.dead_of_hook(10)):
                pipe.zadd(key, {f"d{n:04}": 5000})
        pipe.set(keys.dead_indexed, 10_000)  # indexed above: the mark is past them
        pipe.execute()
    retry.dead_letters(limit=1)  # its index pass made (none died after the mark)
    script = retry._page
    fetched: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        out = script(*args, **kwargs)
        fetched.append(len(out) // 2)
        return out

    retry._page = counting  # type: ignore[method-assign]
    assert [d.id for d in retry.dead_letters(limit=2000)] == [f"d{n:04}" for n in range(1200)]
    assert sum(fetched) == 1200 and fetched == [500, 500, 200]
    fetched.clear()
    seen: list[str] = []
    after = None
    while page := retry.dead_page(account_id=1, limit=500, after=after):
        seen += [d.id for d, _ in page]
        after = page[-1][1]
    assert seen == [f"d{n:04}" for n in range(1200)] and sum(fetched) == 1200
    first = retry.dead_page(hook_id=10, limit=3)
    assert [c for _, c in first] == ["5000:d0000", "5000:d0001", "5000:d0002"]
    assert retry.discard(["d0002", "d0003"]) == 2  # the cursor's own, and the next
    assert [d.id for d in retry.dead_letters(hook_id=10, limit=2, after=first[-1][1])] == \
        ["d0004", "d0005"]
    for bad in ("d0001", "x:d0001", "5000:", "nan:d1", " 5000:d1"):
        with pytest.raises(ValueError, match="not a dead-letter cursor"):
            retry.dead_letters(after=bad)


def test_dead_letters_kept_before_the_indexes_are_indexed_once(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Dead letters written without the account and hook indexes (an older version)
    are indexed on the first read, with their times; later reads use the indexes (the
    mark: a time of death, up to which every dead letter is indexed)."""
    from engine.transports.base import pack_delivery

    for n, (account, hook_id) in enumerate([(1, 10), (2, 20), (1, 11), (1, 10)]):
        redis_client.hset(keys.dead_payload, f"d{n}", pack_delivery(_letter(f"d{n}", account,
                                                                            hook_id)))
        redis_client.zadd(keys.dead, {f"d{n}": 1000 + n})
    redis_client.zadd(keys.dead, {"gone": 999})  # a stale id without a payload
    retry = RetryStore(redis_client, keys)
    assert [d.id for d in retry.dead_letters(account_id=1)] == ["d0", "d2", "d3"]
    assert int(redis_client.get(keys.dead_indexed) or 0) > 1003
    assert redis_client.zscore(keys.dead_of_hook(10), "d3") == 1003
    assert [d.id for d in retry.dead_letters(hook_id=10)] == ["d0", "d3"]
    assert [d.id for d in RetryStore(redis_client, keys).dead_letters(account_id=2)] == ["d1"]
    assert [d.id for d in retry.dead_letters()] == ["d0", "d1", "d2", "d3"]


def test_indexing_old_dead_letters_while_replays_run_indexes_each_remaining_one(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays that move dead letters out while the one-time index is built (before,
    inside and after the page being indexed) leave no dead letter out of the indexes
    and no index entry without a dead letter; paging by score skips nothing."""
    from engine import stores
    from engine.transports.base import pack_delivery

    monkeypatch.setattr(stores, "DEAD_READ_CHUNK", 50)
    for n in range(300):  # written by an earlier version: no indexes; ties on scores
        redis_client.hset(keys.dead_payload, f"d{n:03}", pack_delivery(_letter(f"d{n:03}", 1,
                                                                               10 + n % 3)))
        redis_client.zadd(keys.dead, {f"d{n:03}": 1000 + n // 7})
    retry, other = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    other._indexed = True  # a replay by ids, as from an older reader
    script = retry._index
    calls: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # ids already indexed, in this page and ahead of it
            other.replay([f"d{n:03}" for n in (3, 60, 61, 75, 200, 201, 299)])
        return script(*args, **kwargs)

    retry._index = racing  # type: ignore[method-assign]
    letters = retry.dead_letters(account_id=1, limit=10_000)
    remaining = {m.decode() for m in redis_client.zrange(keys.dead, 0, -1)}
    assert len(remaining) == 293 and len(calls) == 6
    assert {d.id for d in letters} == remaining
    indexed = {m.decode() for m in redis_client.zrange(keys.dead_of_account(1), 0, -1)}
    assert indexed == remaining
    by_hook = set().union(*({m.decode() for m in redis_client.zrange(keys.dead_of_hook(h), 0, -1)}
                            for h in (10, 11, 12)))
    assert by_hook == remaining


def test_reading_dead_letters_skips_none_when_others_are_replayed_meanwhile(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import stores

    monkeypatch.setattr(stores, "DEAD_READ_CHUNK", 50)
    retry, other = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    assert retry.dead_letters() == []
    for n in range(200):
        retry.kill(_letter(f"d{n:03}", 1, 10), "HTTP 500")
    hmget = redis_client.hmget
    pages: list[int] = []

    def replaying(*args: Any, **kwargs: Any) -> Any:
        pages.append(1)
        if len(pages) == 2:  # two of the first page go while the second is read
            other.replay(["d000", "d001"])
        return hmget(*args, **kwargs)

    monkeypatch.setattr(redis_client, "hmget", replaying)
    got = [d.id for d in retry.dead_letters(account_id=1, limit=1000)]
    assert got == [f"d{n:03}" for n in range(200)] and len(pages) >= 4


def test_an_undecodable_dead_letter_is_skipped_not_an_error(
        redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.hset(keys.dead_payload, "bad", b"\xc1")
    redis_client.zadd(keys.dead, {"bad": 1})
    retry = RetryStore(redis_client, keys)
    retry.kill(_letter("ok", 1, 10), "HTTP 500")
    assert [d.id for d in retry.dead_letters(account_id=1)] == ["ok"]
    assert [d.id for d in retry.dead_letters()] == ["ok"]
    assert redis_client.hexists(keys.dead_payload, "bad")  # kept for inspection
    with pytest.raises(NotFound, match="dead letter bad cannot be decoded"):
        retry.replay(["bad"])
    assert redis_client.hexists(keys.dead_payload, "bad")
    # named, it can be discarded (no replay could send it); an unknown id beside it
    # discards nothing
    with pytest.raises(NotFound, match=r"dead letter\(s\) nope do not exist"):
        retry.discard(["bad", "nope"])
    assert retry.discard(["bad"]) == 1
    assert not redis_client.hexists(keys.dead_payload, "bad")
    assert redis_client.zrange(keys.dead, 0, -1) == [b"ok"]
    assert retry.discard(["ok"]) == 1 and retry.dead_letters() == []


def test_an_unreadable_entry_is_set_aside_and_the_rest_delivered(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """An entry no round can decode (damaged, or not written by the intake: here an id
    beyond int64 and a foreign field) is moved to the unreadable stream with the
    reason, not retried forever; the entries around it are delivered."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
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


def test_an_entry_of_thousands_of_fields_is_set_aside_whole(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """More fields than a script takes as arguments: kept as one msgpack map."""
    from engine.dispatch import SET_ASIDE_MAX_FIELDS

    cfg = one_partition(settings)
    one_intake(redis_client, keys, 10)
    fields = {f"f{n}".encode(): b"v" for n in range(5000)}
    entry = redis_client.xadd(keys.intake(0), fields).decode()  # type: ignore[arg-type]
    worker = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    ((_, aside),) = redis_client.xrange(keys.intake_unreadable)
    assert len(fields) > SET_ASIDE_MAX_FIELDS and aside[b"_entry"].decode() == entry
    assert msgspec.msgpack.decode(aside[b"_fields"]) == fields
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0


def test_an_entry_redis_refuses_to_set_aside_stays_pending(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The copy fails (the set-aside key holds another type): the entry is not
    acknowledged, so it is set aside once the key is fixed, never lost."""
    cfg = one_partition(settings)
    one_intake(redis_client, keys, 10)
    redis_client.set(keys.intake_unreadable, "not a stream")
    entry = redis_client.xadd(keys.intake(0), {b"other": b"x"}).decode()
    worker = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    errors: list[Exception] = []
    for _ in range(20):
        try:
            worker.step(block_ms=10)
        except redis.ResponseError as exc:
            errors.append(exc)
    assert len(errors) >= 3 and all("WRONGTYPE" in str(e) for e in errors)
    assert redis_client.xlen(keys.intake(0)) == 1
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 1
    redis_client.delete(keys.intake_unreadable)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    ((_, aside),) = redis_client.xrange(keys.intake_unreadable)
    assert aside[b"_entry"].decode() == entry and aside[b"other"] == b"x"
    assert redis_client.hget(keys.engine_stats, "entries_unreadable") == b"1"


def test_the_processing_count_of_an_entry_read_again_goes_with_its_ack(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry read again after a restart has its processing starts counted; when the
    round's own HDEL of that count fails, the entry's acknowledgement removes it, so
    no field is left behind for ever."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 100).publish(clicks(5))
    first = PartitionWorker(cfg, redis_client, 0, InProcessSender(hold=True))
    run_until(first, lambda: first.sender.inflight() > 0)  # sent, never settled: no ack
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 1
    hdel = redis_client.hdel
    failed: list[str] = []

    def fails_on_processing(name: Any, *fields: Any) -> Any:
        if name == keys.processing(0, "partition-0") and not failed:
            failed.append(name)
            raise redis.ConnectionError("lost")
        return hdel(name, *fields)

    monkeypatch.setattr(redis_client, "hdel", fails_on_processing)
    restarted = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    run_until(restarted, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert failed  # the round's HDEL did fail
    assert not redis_client.exists(keys.processing(0, "partition-0"))


def test_an_acknowledgement_of_thousands_of_entries_is_carried_out(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A script takes some thousands of arguments at most: an acknowledgement of 9,000
    entries (one-event publishes, settled at once after an outage), all of them read
    again after a restart, is carried out, and counts its deliveries once."""
    from collections import Counter

    stream = keys.intake(0)
    redis_client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    with redis_client.pipeline(transaction=False) as pipe:
        for _ in range(9_000):
            pipe.xadd(stream, {"e": b"x"})
        ids = [eid.decode() for eid in pipe.execute()]
    redis_client.xreadgroup(CONSUMER_GROUP, "partition-0", {stream: ">"}, count=9_000)
    worker = PartitionWorker(Settings(REDIS_URL="redis://x", REDIS_PREFIX=keys.p,
                                      PARTITIONS=1), redis_client, 0, InProcessSender())
    worker.reread.update(ids)
    redis_client.hset(worker.processing, mapping={eid: 1 for eid in ids})
    worker._ack_round("t-1", ids, Counter({7: 9_000}))
    worker._ack_round("t-1", ids, Counter({7: 9_000}))  # sent again: carried out once
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    assert not redis_client.exists(worker.processing)
    assert Stats(redis_client, keys).get(7)["delivered"] == 9_000
    assert worker.reread == set()


def test_an_entry_that_ends_the_process_each_time_is_set_aside_after_restarts(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Processing one entry ends the process (out of memory, say: no exception the
    worker sees). Each restart reads it again, one pending entry at a time; after
    MAX_PROCESS_ENDS such ends it is set aside, and the others are delivered."""
    from engine.assembly import Assembler
    from engine.dispatch import MAX_PROCESS_ENDS

    class ProcessEnds(BaseException):  # not caught by the worker, as a SIGKILL is not
        pass

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 5)
    intake.publish(clicks(5, list_id=1) + clicks(5, list_id=2) + clicks(5, list_id=3))
    poisoned = next(eid for eid, ids in entry_events(redis_client, keys.intake(0)).items()
                    if "c2-0" in ids)
    assemble = Assembler.assemble

    def ends_on_poison(self: Any, rnd: Any, where: list[int]) -> Any:
        if any(rnd.events[i].id == "c2-0" for i in where):
            raise ProcessEnds
        return assemble(self, rnd, where)

    monkeypatch.setattr(Assembler, "assemble", ends_on_poison)
    ends, senders = 0, []
    for _ in range(MAX_PROCESS_ENDS + 2):  # a new worker each time: a restarted actor
        senders.append(InProcessSender())
        worker = PartitionWorker(cfg, redis_client, 0, senders[-1])
        try:
            run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
            break
        except ProcessEnds:
            ends += 1
    # the first read, then once per restart but the last: set aside once it ended
    # the process MAX_PROCESS_ENDS times, as its error says
    assert ends == MAX_PROCESS_ENDS
    ((_, aside),) = redis_client.xrange(keys.intake_unreadable)
    assert aside[b"_entry"].decode() == poisoned
    assert aside[b"_error"].startswith(b"ProcessEnded: the partition's process ended 3 times")
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert not redis_client.exists(keys.processing(0, "partition-0"))
    # every event of the other entries delivered (at least once: a restart re-sends)
    delivered = {mid for sender in senders for d in sender.transport.sent
                 for mid in d.message_ids}
    assert len(delivered) == 10


class LostCountReplies:
    """A client whose pipelines counting processing starts are carried out by Redis,
    their replies lost (a timeout), ``times`` times."""

    def __init__(self, r: redis.Redis, key: str, times: int) -> None:
        self.r, self.key, self.left = r, key, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.r.pipeline(*args, **kwargs)
        execute = pipe.execute

        def lost(*a: Any, **k: Any) -> Any:
            counts = any(c[0][:2] == ("HINCRBY", self.key) for c in pipe.command_stack)
            out = execute(*a, **k)
            if counts and self.left:
                self.left -= 1
                raise redis.TimeoutError("Timeout reading from socket")
            return out
        pipe.execute = lost
        return pipe


def test_a_count_of_processing_starts_whose_reply_is_lost_counts_once(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The round counting an entry's start after a restart failed on a lost reply
    (Redis carried it out), and each round tried again counted once more in the same
    process: two lost replies, and an entry no process ended was set aside as
    ProcessEnded, its events sent to no hook."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 5).publish(clicks(5))
    first = PartitionWorker(cfg, redis_client, 0, InProcessSender(hold=True))
    for _ in range(3):  # read, never settled: the process ended
        first.step(block_ms=10)
    flaky = LostCountReplies(redis_client, keys.processing(0, "partition-0"), 2)
    sender = InProcessSender()
    restarted = PartitionWorker(cfg, cast(redis.Redis, flaky), 0, sender)
    failed = 0
    for _ in range(8):
        try:
            restarted.step(block_ms=10)
        except redis.TimeoutError:
            failed += 1
    assert failed >= 1  # once: tried again, the start is not counted again
    assert redis_client.xlen(keys.intake_unreadable) == 0
    sent = [mid for d in sender.transport.sent for mid in d.message_ids]
    assert len(sent) == len(set(sent)) == 5
    assert redis_client.xlen(keys.intake(0)) == 0


@pytest.mark.parametrize("damage", ["field", "key"])
def test_a_damaged_processing_count_starts_again_and_holds_nothing_up(
        damage: str, redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """An entry read again after a restart counts a processing start; a count damaged
    from outside (not an integer, or the hash of another type) failed every round,
    holding the partition's entries for good. It starts again at 1, said."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 5).publish(clicks(10))
    first = PartitionWorker(cfg, redis_client, 0, InProcessSender(hold=True))
    for _ in range(3):  # read, never settled: the process ended
        first.step(block_ms=10)
    pending = [e["message_id"].decode() for e in redis_client.xpending_range(
        keys.intake(0), CONSUMER_GROUP, "-", "+", 10)]
    assert len(pending) == 2
    processing = keys.processing(0, "partition-0")
    if damage == "field":
        redis_client.hset(processing, pending[0], "abc")
    else:
        redis_client.set(processing, "abc")
    sender = InProcessSender()
    restarted = PartitionWorker(cfg, redis_client, 0, sender)
    with caplog.at_level(logging.WARNING, logger="hookray"):
        run_until(restarted, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sum(d.count for d in sender.transport.sent) == 10
    said = "field " + pending[0] + " holds no count" if damage == "field" else \
        "holds no hash of processing starts"
    assert f"partition 0: {processing} {said}" in caplog.text
    assert not redis_client.exists(processing)


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
    intake = one_intake(redis_client, keys, 10)  # entries of 10 events
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


# --- rounds that fail after reading -----------------------------------------------------


def run_through_failures(worker: Any, predicate: Any, timeout: float = 10.0) -> list[Exception]:
    """``run_until``, but a round that raises is noted and the next one runs (as
    ``PartitionWorker.run`` does, without its pause)."""
    errors: list[Exception] = []
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached; errors: {errors[-3:]}"
        try:
            worker.step(block_ms=10)
        except Exception as exc:
            errors.append(exc)
    return errors


def entry_events(r: redis.Redis, stream: str) -> dict[str, set[str]]:
    """Entry id -> the ids of its events."""
    return {eid.decode(): {e.id for e in decode_entry(fields)}
            for eid, fields in r.xrange(stream)}


def fail_assembly(monkeypatch: pytest.MonkeyPatch, should_fail: Any) -> list[int]:
    """Make ``Assembler.assemble`` raise ValueError when ``should_fail(hook id, event
    ids)`` is true; returns the list of failures so far (one item per failure)."""
    from engine.assembly import Assembler

    original = Assembler.assemble
    failures: list[int] = []

    def assemble(self: Any, rnd: Any, idx: list[int]) -> Any:
        if should_fail(self.hook.id, {rnd.events[i].id for i in idx}):
            failures.append(self.hook.id)
            raise ValueError("assembly failed")
        return original(self, rnd, idx)

    monkeypatch.setattr(Assembler, "assemble", assemble)
    return failures


def test_a_round_failing_half_way_is_processed_again_and_acked_only_when_complete(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hook 1's messages are batched (and sent) before hook 2's assembly fails: the
    entries stay unacknowledged until hook 2's messages are sent too, and are processed
    again without a restart (hook 1 may get duplicates: same message ids)."""
    cfg = one_partition(settings)
    registry = HookRegistry(redis_client, keys)
    first = registry.create(hook(name="first"))
    second = registry.create(hook(name="second"))
    failures = fail_assembly(monkeypatch, lambda hook_id, _: hook_id == second.id and
                             len(failures) == 0)
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(20))
    events_of = entry_events(redis_client, keys.intake(0))
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)

    def sent_ids(hook_id: int | None) -> list[str]:
        return [mid.split("-")[0] for d in sender.transport.sent if d.hook_id == hook_id
                for mid in d.message_ids]

    errors = run_through_failures(worker, lambda: failures)
    assert [str(e) for e in errors] == ["assembly failed"]
    assert len(sent_ids(first.id)) == 20 and not sent_ids(second.id)  # batched, then the failure
    acked_early: list[str] = []
    while redis_client.xlen(keys.intake(0)):
        worker.step(block_ms=10)
        done = set(events_of) - set(entry_events(redis_client, keys.intake(0)))
        digests = set(sent_ids(second.id))
        acked_early += [eid for eid in done
                        if not {event_digest(i) for i in events_of[eid]} <= digests]
    assert not acked_early
    assert len(sent_ids(second.id)) == len(set(sent_ids(second.id))) == 20
    assert set(sent_ids(first.id)) == set(sent_ids(second.id))  # at least once each
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert worker.unsettled == 0 and not worker.entry_left and not worker.again
    assert not redis_client.exists(keys.intake_unreadable)


def test_an_entry_that_keeps_failing_is_set_aside_and_the_others_delivered(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.dispatch import MAX_ENTRY_FAILURES

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    failures = fail_assembly(monkeypatch, lambda _, ids: "c1-3" in ids)  # a poison event
    intake = one_intake(redis_client, keys, 5)
    intake.publish(clicks(5) + clicks(7, list_id=2) + clicks(4, list_id=3))
    poisoned = next(eid for eid, ids in entry_events(redis_client, keys.intake(0)).items()
                    if "c1-3" in ids)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert all(isinstance(e, ValueError) for e in errors)
    # the first round (all entries together), then the poisoned entry alone
    assert len(errors) == len(failures) == MAX_ENTRY_FAILURES
    delivered = {mid for d in sender.transport.sent for mid in d.message_ids}
    assert len(delivered) == 11  # 7 + 4: every event of the other entries
    (aside,) = redis_client.xrange(keys.intake_unreadable)
    assert aside[1][b"_entry"].decode() == poisoned
    assert aside[1][b"_error"] == b"ValueError: assembly failed"
    assert {e.id for e in decode_entry(aside[1])} == {f"c1-{i}" for i in range(5)}
    assert redis_client.hget(keys.engine_stats, "entries_unreadable") == b"1"
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert worker.unsettled == 0 and not worker.failures
    # once what failed it is fixed, the entry is put back and its events are sent
    from engine.intake import SetAside

    monkeypatch.undo()
    assert SetAside(redis_client, keys).requeue() == 1
    assert redis_client.xlen(keys.intake_unreadable) == 0
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    delivered = [mid for d in sender.transport.sent for mid in d.message_ids]
    assert len(delivered) == len(set(delivered)) == 16  # 5 + 7 + 4, each once


def test_an_entry_set_aside_without_a_reply_is_set_aside_once(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis sets a failing entry aside and the reply is lost: the next attempt
    finds it done, so one copy is kept, counted once, and requeued once."""
    from engine.dispatch import MAX_ENTRY_FAILURES
    from engine.intake import SetAside

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    fail_assembly(monkeypatch, lambda _, ids: True)
    one_intake(redis_client, keys, 5).publish(clicks(5))
    execute, call, lost = redis.client.Pipeline.execute, redis.commands.core.Script.__call__, []

    def reply_lost(out: Any, words: list[Any]) -> Any:
        if not lost and keys.intake_unreadable in words:
            lost.append(1)
            raise redis.ConnectionError("connection lost")
        return out

    def pipeline_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        words = [w for cmd in self.command_stack for w in cmd[0]]
        return reply_lost(execute(self, *args, **kwargs), words)

    def script_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return reply_lost(call(self, *args, **kwargs), list(kwargs.get("keys") or ()))

    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline_execute)
    monkeypatch.setattr(redis.commands.core.Script, "__call__", script_call)
    worker = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    # the entry stays to be tried again, fails again, and is found set aside
    errors += run_through_failures(worker, lambda: not worker.again and worker.unsettled == 0)
    assert lost and len(errors) == MAX_ENTRY_FAILURES + 1
    assert redis_client.xlen(keys.intake(0)) == 0
    assert redis_client.xlen(keys.intake_unreadable) == 1
    assert redis_client.hget(keys.engine_stats, "entries_unreadable") == b"1"
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    monkeypatch.undo()
    assert SetAside(redis_client, keys).requeue() == 1
    assert sum(len(decode_entry(f)) for _, f in redis_client.xrange(keys.intake(0))) == 5


@pytest.mark.parametrize("outage_error", [
    redis.ConnectionError("Redis is restarting"),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    redis.ResponseError("Command # 2 (HINCRBY hookray:stats:1 accepted 25) of pipeline "
                        "caused error: MISCONF Redis is configured to save RDB snapshots, "
                        "but it's currently unable to persist to disk"),
    redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis.ResponseError("BUSY Redis is busy running a script."),
], ids=["connection", "oom", "misconf-in-pipeline", "noreplicas", "busy"])
def test_redis_errors_never_set_an_entry_aside(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, outage_error: redis.RedisError) -> None:
    """Redis refusing for a while (gone, out of memory, unable to persist or reach
    its replicas, busy) is no fault of the entry: it waits, however long that lasts."""
    from engine.dispatch import MAX_ENTRY_FAILURES, Dispatcher

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    original = Dispatcher._content
    outage = [MAX_ENTRY_FAILURES + 3]

    def content(self: Any, *args: Any) -> Any:
        if outage[0]:
            outage[0] -= 1
            raise outage_error
        return original(self, *args)

    monkeypatch.setattr(Dispatcher, "_content", content)
    intake = one_intake(redis_client, keys, 25)
    intake.publish(clicks(25))  # one entry: each failed round is its own
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert len(errors) == MAX_ENTRY_FAILURES + 3
    assert all(e is outage_error for e in errors)
    assert sent_once(sender)
    assert sum(d.count for d in sender.transport.sent) == 25
    assert not redis_client.exists(keys.intake_unreadable)


def lose_first(monkeypatch: pytest.MonkeyPatch, carried_out: bool,
               matches: Callable[[list[Any]], bool]) -> list[int]:
    """The first pipeline or script whose words ``matches`` fails with a lost
    connection: before Redis saw it, or (``carried_out``) after Redis carried it out,
    its reply lost. Returns the list the failure is noted in."""
    failed: list[int] = []
    execute, call = redis.client.Pipeline.execute, redis.commands.core.Script.__call__

    def lose(run: Callable[[], Any]) -> Any:
        failed.append(1)
        if carried_out:
            run()
        raise redis.ConnectionError("connection lost")

    def pipeline_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not failed and matches([w for cmd in self.command_stack for w in cmd[0]]):
            return lose(lambda: execute(self, *args, **kwargs))
        return execute(self, *args, **kwargs)

    def script_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not failed and matches(list(kwargs.get("args") or ())):
            return lose(lambda: call(self, *args, **kwargs))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline_execute)
    monkeypatch.setattr(redis.commands.core.Script, "__call__", script_call)
    return failed


def lose_first_ack(monkeypatch: pytest.MonkeyPatch, carried_out: bool) -> list[int]:
    """The first acknowledgement round (a pipeline or script holding XACK) fails:
    ``lose_first``."""
    return lose_first(monkeypatch, carried_out, lambda words: "XACK" in words)


@pytest.mark.parametrize("carried_out", [False, True], ids=["not-sent", "reply-lost"])
def test_a_failed_acknowledgement_is_made_in_a_later_round_and_counted_once(
        carried_out: bool, redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = one_partition(settings)
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(20))
    failed = lose_first_ack(monkeypatch, carried_out)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    for _ in range(3):  # what the failed round left to do is done by now
        worker.step(block_ms=10)
    assert failed and len(errors) == 1
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert sum(d.count for d in sender.transport.sent) == 20
    stats = Stats(redis_client, keys).get(created.id or 0)
    assert (stats["accepted"], stats["delivered"]) == (20, 20)


@pytest.mark.parametrize("retry_times", [0, 2])
def test_a_failed_delivery_booked_again_after_a_lost_reply_counts_once(
        retry_times: int, redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The partition books a failed first attempt (a retry, or a dead letter with
    HOOK_RETRY_TIMES=0); Redis carries the booking out, its reply is lost."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": retry_times})
    created = HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 10).publish(clicks(10))

    class Refusing(StubTransport):
        async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
            self.attempts[delivery.id] += 1
            return Outcome(ok=False, error="Rejected", detail="HTTP 503")

    sender = InProcessSender(Refusing())
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    booking = worker.side.retry.kill if retry_times == 0 else worker.side.retry.schedule
    lost: list[int] = []

    def reply_lost(*args: Any, **kwargs: Any) -> None:
        booking(*args, **kwargs)
        if not lost:
            lost.append(1)
            raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(worker.side.retry, booking.__name__, reply_lost)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert [type(e) for e in errors] == [redis.ConnectionError]
    stats = Stats(redis_client, keys).get(created.id or 0)
    field = "dead_lettered" if retry_times == 0 else "retried"
    assert (stats["accepted"], stats[field], stats["delivered"]) == (10, 10, 0)
    retry = RetryStore(redis_client, keys)
    waiting = retry.dead_letters() if retry_times == 0 else retry.claim_due(10, now=2**62)
    assert [d.count for d in waiting] == [10]


def test_a_batch_shed_unsent_by_a_busy_destination_uses_up_no_re_send(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Queued (it waited DESTINATION_QUEUE_SEC and was never sent): scheduled again,
    never a dead letter for it, even with HOOK_RETRY_TIMES=0 or its re-sends used up;
    sent at last, it is delivered."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    created = HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 10).publish(clicks(10))
    shed: list[str] = []

    class Busy(StubTransport):
        async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
            if len(shed) < 3:
                shed.append(delivery.id)
                return Outcome(ok=False, error="Queued", detail="waited 60 s")
            return await super()._deliver(target, delivery)

    sender = InProcessSender(Busy())
    run_until(PartitionWorker(cfg, redis_client, 0, sender),
              lambda: redis_client.xlen(keys.intake(0)) == 0)
    retry = RetryStore(redis_client, keys)
    (waiting,) = retry.claim_due(10, now=2**62)
    assert waiting.resends == 0 and not retry.dead_letters()
    redis_client.zadd(keys.retry, {waiting.id: 0})  # due again now
    worker = RetryWorker(cfg.model_copy(update={"HOOK_RETRY_PERIOD_SEC": 0.001}),
                         redis_client, sender)
    deadline = time.monotonic() + 5
    while retry.pending() or worker.handed:
        assert time.monotonic() < deadline, "not delivered"
        worker.step()
        time.sleep(0.002)
    assert len(shed) == 3 and not retry.dead_letters()
    assert sorted(m for d in sender.transport.sent for m in d.message_ids) == sorted(
        waiting.message_ids)
    stats = Stats(redis_client, keys).get(created.id or 0)
    assert (stats["delivered"], stats["dead_lettered"]) == (10, 0)


def test_a_late_copy_of_an_earlier_booking_changes_nothing(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A booking whose reply was lost may reach Redis late, after the next one."""
    retry = RetryStore(redis_client, keys)
    once_key = keys.booked("retry")

    def schedule(n: int, token: str) -> None:
        retry.schedule(Delivery(id=f"d{n}", hook_id=7, account_id=1, kind="http_batch",
                                parts=[b"{}"] * 3, message_ids=["a", "b", "c"]), 0, "HTTP 500",
                       delivered=2, once=(once_key, token))

    schedule(1, "t1")
    schedule(2, "t2")
    schedule(1, "t1")  # late
    assert Stats(redis_client, keys).get(7) == {
        "accepted": 0, "delivered": 4, "retried": 6, "dead_lettered": 0, "discarded": 0}
    for n in range(3, 40):  # only the last 32 tokens are kept
        schedule(n, f"t{n}")
    assert redis_client.llen(once_key) == 32


def test_an_acknowledgement_of_thousands_of_entries_is_made_once(
        redis_client: redis.Redis, keys: Keys) -> None:
    """More ids than one script command may take (engine.stores.ONCE_CHUNK)."""
    from engine.stores import ONCE_CHUNK, Booking

    stream, group = keys.intake(0), CONSUMER_GROUP
    redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    with redis_client.pipeline(transaction=False) as pipe:
        for n in range(2 * ONCE_CHUNK + 500):
            pipe.xadd(stream, {"e": str(n)})
        ids = [i.decode() for i in pipe.execute()]
    redis_client.xreadgroup(group, "c", {stream: ">"}, count=len(ids))
    booking, once = Booking(redis_client, keys.epoch), (keys.last_ack(0, "c"), "t1")
    for _ in range(2):  # the second time: sent again after a lost reply
        with booking(once) as pipe:
            Stats(redis_client, keys).add(pipe, 7, "delivered", len(ids))
            pipe.xack(stream, group, *ids)
            pipe.xdel(stream, *ids)
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, group)["pending"] == 0
    assert Stats(redis_client, keys).get(7)["delivered"] == len(ids)


@pytest.mark.parametrize("with_token", [True, False], ids=["book_once", "multi"])
def test_a_count_that_cannot_be_made_leaves_the_rest_of_a_booking_made_once(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture,
        with_token: bool) -> None:
    """A counter damaged from outside (not an integer) fails its HINCRBY, and neither a
    script nor a MULTI undoes the commands before it: the booking is made, that count
    left out and named, so a booking sent again does not repeat the others' counts nor
    keep the entries from being acknowledged."""
    from engine.stores import Booking

    stream, group = keys.intake(0), CONSUMER_GROUP
    redis_client.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [redis_client.xadd(stream, {"e": str(n)}).decode() for n in range(3)]
    redis_client.xreadgroup(group, "c", {stream: ">"}, count=3)
    redis_client.hset(keys.stats(8), "delivered", "oops")
    stats, booking = Stats(redis_client, keys), Booking(redis_client, keys.epoch)
    once = (keys.last_ack(0, "c"), "t1") if with_token else None
    with caplog.at_level(logging.WARNING, logger="hookray"):
        for _ in range(3 if with_token else 1):  # again and again: after a lost reply
            with booking(once) as pipe:
                stats.add(pipe, 7, "delivered", 3)
                stats.add(pipe, 8, "delivered", 3)
                stats.add(pipe, 9, "delivered", 3)
                pipe.xack(stream, group, *ids)
                pipe.xdel(stream, *ids)
    assert stats.get(7)["delivered"] == 3 and stats.get(9)["delivered"] == 3
    assert redis_client.hget(keys.stats(8), "delivered") == b"oops"
    assert redis_client.xlen(stream) == 0
    assert redis_client.xpending(stream, group)["pending"] == 0
    assert f"{keys.stats(8)} delivered" in caplog.text and "not made" in caplog.text


def test_a_publish_whose_count_cannot_be_made_is_accepted_once(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The append's MULTI writes the events even where counting them fails (the
    engine's events_accepted damaged from outside): the publish says so, rather than
    reporting a failure a producer would answer by publishing them again."""
    import engine.intake

    monkeypatch.setattr(engine.intake, "_count_warned", [-1e9])  # none given lately
    intake = one_intake(redis_client, keys, 10)
    redis_client.hset(keys.engine_stats, "events_accepted", "oops")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert intake.publish(clicks(5)).accepted == 5
    assert sum(len(decode_entry(f)) for _, f in redis_client.xrange(keys.intake(0))) == 5
    assert "events_accepted not counted" in caplog.text


def test_discarding_dead_letters_of_a_hook_whose_count_is_damaged(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Letters removed one by one, each hook's count after them: a damaged count leaves
    its letters discarded and the call a success, not an error for a done discard."""
    retry = RetryStore(redis_client, keys)
    for n in range(2):
        retry.kill(Delivery(id=f"d{n}", hook_id=1 + n, account_id=1, kind="http_batch",
                            parts=[b"{}"]), "HTTP 500")
    redis_client.hset(keys.stats(2), "discarded", "oops")
    assert retry.discard(["d0", "d1"]) == 2
    assert retry.dead_letters() == []
    assert Stats(redis_client, keys).get(1)["discarded"] == 1


def test_a_round_failing_after_counting_its_matches_counts_them_once(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    # Given a sender whose first hand-over fails, after the round counted what it matched
    cfg = one_partition(settings)
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(20))

    class FailsOnce(InProcessSender):
        def submit(self, hook: Hook, delivery: Delivery) -> None:
            if not refused:
                refused.append(delivery.id)
                raise RuntimeError("hand-over failed")
            super().submit(hook, delivery)

    refused: list[str] = []
    sender = FailsOnce()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    # When the round fails and its entries are processed again
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert [str(e) for e in errors] == ["hand-over failed"]
    # Then every event is delivered, the matches counted once, as the deliveries are
    assert len({mid for d in sender.transport.sent for mid in d.message_ids}) == 20
    stats = Stats(redis_client, keys).get(created.id or 0)
    assert stats["accepted"] == 20
    assert stats["delivered"] == sum(d.count for d in sender.transport.sent)


@pytest.mark.parametrize("carried_out", [False, True], ids=["not-sent", "reply-lost"])
def test_matches_counted_without_a_reply_are_counted_once_and_sent_once(
        carried_out: bool, redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The round's ``accepted`` counts fail with a lost connection: before Redis saw
    them, or after Redis carried them out, the reply lost. The count is made once,
    and no message of the round is sent twice."""
    cfg = one_partition(settings)
    created = HookRegistry(redis_client, keys).create(hook())
    one_intake(redis_client, keys, 20).publish(clicks(20))
    lost = lose_first(monkeypatch, carried_out, lambda words: "accepted" in words)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert lost and [type(e) for e in errors] == [redis.ConnectionError]
    assert sum(d.count for d in sender.transport.sent) == 20 and sent_once(sender)
    stats = Stats(redis_client, keys).get(created.id or 0)
    assert (stats["accepted"], stats["delivered"]) == (20, 20)


def test_entries_read_when_setting_one_aside_fails_are_read_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis fails while an unreadable entry is set aside: the entries read with it
    are pending for this consumer, so they are read again from there (not left until
    a restart), and every event is delivered once."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(15))
    redis_client.xadd(keys.intake(0), {b"junk": b"not an intake entry"})
    intake.publish(clicks(12, list_id=2))
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    run_until(worker, lambda: not worker.reading_own_pending)  # nothing pending at start
    original = PartitionWorker._set_aside
    refused: list[str] = []

    def set_aside(self: Any, entry_id: str, *args: Any) -> None:
        if not refused:
            refused.append(entry_id)
            raise redis.ConnectionError("connection lost")
        original(self, entry_id, *args)

    monkeypatch.setattr(PartitionWorker, "_set_aside", set_aside)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert refused and [type(e) for e in errors] == [redis.ConnectionError]
    assert sent_once(sender)
    assert sum(d.count for d in sender.transport.sent) == 27
    (aside,) = redis_client.xrange(keys.intake_unreadable)
    assert aside[1][b"_entry"].decode() == refused[0]
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert not worker.reading_own_pending and worker.unsettled == 0


def test_a_redis_error_that_does_not_pass_counts_against_the_entry(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """WRONGTYPE on a key one entry's round uses would fail every round: unlike an
    unreachable Redis, it sets the entry aside after MAX_ENTRY_FAILURES rounds."""
    from engine.assembly import Assembler
    from engine.dispatch import MAX_ENTRY_FAILURES

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    original = Assembler.assemble

    def assemble(self: Any, rnd: Any, idx: list[int]) -> Any:
        if any(rnd.events[i].id == "c1-3" for i in idx):
            raise redis.ResponseError("WRONGTYPE Operation against a key holding the "
                                      "wrong kind of value")
        return original(self, rnd, idx)

    monkeypatch.setattr(Assembler, "assemble", assemble)
    intake = one_intake(redis_client, keys, 5)
    intake.publish(clicks(5) + clicks(7, list_id=2))
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    errors = run_through_failures(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert len(errors) == MAX_ENTRY_FAILURES
    assert all(isinstance(e, redis.ResponseError) for e in errors)
    (aside,) = redis_client.xrange(keys.intake_unreadable)
    assert aside[1][b"_error"].startswith(b"ResponseError: WRONGTYPE")
    assert sum(d.count for d in sender.transport.sent) == 7


def test_outcomes_are_collected_in_a_failing_round_and_booked_later(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.dispatch import Dispatcher

    cfg = one_partition(settings)
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(10))  # one entry, one full batch of 10
    original = Dispatcher.due
    outage = [1]

    def due(self: Any, now: float) -> None:
        if outage[0] and self.outbox:  # once the round has a full batch
            outage[0] -= 1
            raise redis.ConnectionError("Redis is restarting")
        original(self, now)

    monkeypatch.setattr(Dispatcher, "due", due)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    with pytest.raises(redis.ConnectionError):
        while not sender.transport.sent:
            worker.step(block_ms=10)
    # the batch went out before the failure: its outcome is taken from the sender and,
    # as Redis takes it, booked now (its entry, processed again, is not acknowledged)
    assert not worker.settling and not sender.done
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 10
    assert redis_client.xlen(keys.intake(0)) == 1
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert not worker.settling and worker.unsettled == 0
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 20  # sent twice


def test_a_change_racing_a_delete_does_not_bring_the_hook_back(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook())
    hook_id = created.id or 0
    original = HookRegistry._parse

    def read_then_deleted(self: Any, wanted: str, raw: bytes) -> Hook:
        found = original(self, wanted, raw)
        HookRegistry(redis_client, keys).delete(int(wanted))  # a DELETE lands meanwhile
        return found

    monkeypatch.setattr(HookRegistry, "_parse", read_then_deleted)
    with pytest.raises(NotFound, match=f"hook {hook_id} does not exist"):
        registry.set_active(hook_id, False)
    assert registry.all() == []
    monkeypatch.undo()
    again = registry.create(hook())
    monkeypatch.setattr(HookRegistry, "_parse", read_then_deleted)
    with pytest.raises(NotFound):
        registry.update(again.id or 0, hook(name="renamed"))
    monkeypatch.undo()
    assert registry.all() == []


def token(stored: Hook) -> str:
    auth = stored.target.http_batch.auth  # type: ignore[union-attr]
    return auth.token.get_secret_value()  # type: ignore[union-attr]


def test_a_stop_racing_an_update_is_made_on_the_update_not_over_it(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop (or an update) reads the hook, and another update lands before it writes:
    it is made again on that update's result. Written over it, the rotated token of the
    update would be the leaked one again, and both calls would have said done."""
    registry = HookRegistry(redis_client, keys)
    target = {"http_batch": {"url": "http://127.0.0.1:9/h",
                             "auth": {"kind": "bearer", "token": "leaked"}}}
    created = registry.create(hook(target=target))
    hook_id = created.id or 0
    rotated = {"http_batch": {"url": "http://127.0.0.1:9/h",
                              "auth": {"kind": "bearer", "token": "rotated"}}}
    again = {"http_batch": {"url": "http://127.0.0.1:9/h",
                            "auth": {"kind": "bearer", "token": "rotated again"}}}
    original = HookRegistry._parse
    racing = [lambda: HookRegistry(redis_client, keys).update(hook_id, hook(target=rotated))]

    def read_then_changed(self: Any, wanted: str, raw: bytes) -> Hook:
        found = original(self, wanted, raw)
        if racing:  # another change lands between this one's read and its write
            with monkeypatch.context() as inner:
                inner.setattr(HookRegistry, "_parse", original)
                racing.pop(0)()
        return found

    monkeypatch.setattr(HookRegistry, "_parse", read_then_changed)
    stopped = registry.set_active(hook_id, False)
    assert stopped.active is False
    stored = HookRegistry(redis_client, keys).get(hook_id)
    assert stored.active is False and token(stored) == "rotated"
    # an update of settings as read (the token redacted) racing an update that rotates
    # the token again keeps that token, not the one stored when it read the hook
    shown = registry.get(hook_id).display()
    racing.append(lambda: HookRegistry(redis_client, keys).update(
        hook_id, hook(target=again, name="renamed")))
    updated = registry.update(hook_id, {**shown, "name": "mine"})
    assert updated.name == "mine" and not racing
    stored = HookRegistry(redis_client, keys).get(hook_id)
    assert stored.name == "mine" and token(stored) == "rotated again"


def test_a_hook_changed_by_others_on_every_try_is_a_conflict_not_a_lost_change(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.errors import Conflict
    from engine.stores import REPLACE_TRIES

    registry = HookRegistry(redis_client, keys)
    hook_id = registry.create(hook()).id or 0
    original = HookRegistry._parse
    tries = []

    def read_then_changed(self: Any, wanted: str, raw: bytes) -> Hook:
        found = original(self, wanted, raw)
        tries.append(1)
        redis_client.hset(keys.hooks, wanted, raw.replace(b'"name"', b' "name"'))
        return found

    monkeypatch.setattr(HookRegistry, "_parse", read_then_changed)
    with pytest.raises(Conflict, match=f"hook {hook_id} changed {REPLACE_TRIES} times"):
        registry.set_active(hook_id, False)
    assert len(tries) == REPLACE_TRIES
    monkeypatch.undo()
    assert registry.get(hook_id).active is True


def test_an_undecodable_retry_payload_is_set_aside_and_the_others_sent(
        redis_client: redis.Redis, keys: Keys) -> None:
    retry = RetryStore(redis_client, keys)
    for n in range(3):
        retry.schedule(Delivery(id=f"d{n}", hook_id=1, account_id=1, kind="http_batch",
                                parts=[b"{}"]), due_ms=0, error="HTTP 500")
    redis_client.hset(keys.retry_payload, "d1", b"\xc1damaged")
    assert [d.id for d in retry.claim_due()] == ["d0", "d2"]
    assert redis_client.hget(keys.retry_unreadable, "d1") == b"\xc1damaged"
    assert redis_client.zscore(keys.retry, "d1") is None
    assert Stats(redis_client, keys).engine()["retries_unreadable"] == 1
    # after the lease: the two good ones are due again, the damaged one is gone
    assert sorted(d.id for d in retry.claim_due(now=10**15)) == ["d0", "d2"]


def test_a_stored_hook_that_no_longer_validates_is_named(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Hooks are validated against the event types file; one stored under an older
    file that lacks an action now fails loading with its id and field named."""
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook())
    break_stored_hook(redis_client, keys, created.id)
    with pytest.raises(HookError, match=rf"stored hook {created.id} no longer validates .*"
                                        r"actions"):
        registry.load()
    with pytest.raises(HookError, match=rf"stored hook {created.id} "):
        registry.get(created.id or 0)


def test_a_delivery_whose_sends_never_end_becomes_a_dead_letter(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Each retry worker that claims it dies during the send (its sender holds it for
    ever, then the lease runs out): after MAX_UNANSWERED such sends it is a dead letter
    naming why, instead of being claimed again for ever. An outcome resets the count."""
    from engine.retrying import MAX_UNANSWERED

    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    for delivery_id in ("d1", "d2"):
        retry.schedule(Delivery(id=delivery_id, hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    for n in range(MAX_UNANSWERED):
        sender = InProcessSender(hold=True)  # a worker that dies mid-send
        worker = RetryWorker(settings, redis_client, sender)
        assert worker.step() == 2
        assert sorted(d.id for d in sender.held) == ["d1", "d2"]
        if n == 0:  # d2's first send fails at last: an outcome, its count starts again
            d2 = next(d for d in sender.held if d.id == "d2")
            worker.settle(d2, Outcome(ok=False, error="Rejected", detail="HTTP 503"))
        redis_client.zadd(keys.retry, {"d1": 0, "d2": 0})  # the leases run out
    sender = InProcessSender(hold=True)
    RetryWorker(settings, redis_client, sender).step()
    (dead,) = retry.dead_letters()
    assert dead.id == "d1" and [d.id for d in sender.held] == ["d2"]
    assert dead.last_error == (f"handed over {MAX_UNANSWERED} times without an outcome "
                               "(the retry worker stopped during each send); last error: "
                               "HTTP 500")
    assert not redis_client.hexists(keys.retry_unanswered, "d1")
    assert int(redis_client.hget(keys.retry_unanswered, "d2") or 0) == MAX_UNANSWERED


def test_hand_overs_counted_without_a_reply_are_taken_back(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis counts a re-send's hand-over, the reply is lost and nothing is sent: the
    count is taken back, so however often that happens the delivery is sent, never
    dead-lettered as handed over without an outcome."""
    from engine.retrying import MAX_UNANSWERED

    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    handed_over, lost = RetryStore.handed_over, []

    def reply_lost(self: RetryStore, ids: list[str]) -> list[int]:
        handed_over(self, ids)
        lost.append(1)
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(RetryStore, "handed_over", reply_lost)
    sender = InProcessSender()
    worker = RetryWorker(settings, redis_client, sender)
    for _ in range(MAX_UNANSWERED + 1):
        with pytest.raises(redis.ConnectionError):
            worker.step()
        assert int(redis_client.hget(keys.retry_unanswered, "d1") or 0) == 0
        redis_client.zadd(keys.retry, {"d1": 0})  # the lease runs out
    monkeypatch.setattr(RetryStore, "handed_over", handed_over)
    worker.step()
    worker.step()
    assert len(lost) == MAX_UNANSWERED + 1 and not retry.dead_letters()
    assert [d.id for d in sender.transport.sent] == ["d1"]
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 1


def test_an_invalid_stored_hook_holds_the_intake_and_loses_nothing(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """Rounds fail while a stored hook no longer validates: the entries wait in the
    stream (not set aside as unreadable, however many rounds fail) and are delivered
    once the hook is deleted."""
    cfg = one_partition(settings)
    registry = HookRegistry(redis_client, keys)
    broken, fine = registry.create(hook()), registry.create(hook())
    break_stored_hook(redis_client, keys, broken.id)
    redis_client.incr(keys.hooks_version)
    intake = one_intake(redis_client, keys, 1000)
    intake.publish(clicks(3))
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    for _ in range(20):
        with pytest.raises(HookError, match=f"stored hook {broken.id} no longer validates"):
            worker.step(block_ms=10)
    assert redis_client.xlen(keys.intake_unreadable) == 0 and not sender.transport.sent
    stop = threading.Event()  # running, the worker says so once, not every round
    failed: list[Exception] = []
    with caplog.at_level(logging.ERROR, logger="hookray"):
        runner = threading.Thread(target=worker.run, args=(stop, failed.append))
        runner.start()
        assert wait_for(lambda: len(failed) >= 3, 10)  # 3 failed rounds at least
        stop.set()
        runner.join(5)
        assert not runner.is_alive(), "the worker did not stop"
    assert all(isinstance(exc, HookError) for exc in failed)
    (said,) = [r.getMessage() for r in caplog.records if r.name == "hookray"]
    assert said.startswith("partition 0: waiting, no event is processed until this is fixed")
    registry.delete(broken.id or 0)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert [d.hook_id for d in sender.transport.sent] == [fine.id]
    assert sum(d.count for d in sender.transport.sent) == 3
    assert redis_client.xlen(keys.intake_unreadable) == 0


def test_a_stopped_retry_worker_takes_its_unanswered_hand_overs_back(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stops and redeployments are no crashes: however often the worker is stopped
    mid-send (its outcome not come within the stop's drain), a delivery is not
    dead-lettered for lack of outcomes."""
    import engine.dispatch
    from engine.retrying import MAX_UNANSWERED

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.2)

    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    for _ in range(MAX_UNANSWERED + 2):
        sender = InProcessSender(hold=True)  # sends that never end ...
        worker = RetryWorker(settings, redis_client, sender)
        stop = threading.Event()
        runner = threading.Thread(target=worker.run, args=(stop,))
        runner.start()
        assert wait_for(lambda: bool(sender.held), 5)  # noqa: B023
        stop.set()  # ... until the worker is stopped
        runner.join(5)
        assert not runner.is_alive(), "the worker did not stop"
        assert int(redis_client.hget(keys.retry_unanswered, "d1") or 0) == 0
        redis_client.zadd(keys.retry, {"d1": 0})  # the lease runs out
    assert not retry.dead_letters() and retry.pending() == 1


def test_a_hand_back_that_fails_at_a_stop_is_said(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stop's hand-back that Redis fails leaves the re-send counted as a send the
    worker stopped during (three make a dead letter): the log says so, not silence."""
    import engine.dispatch

    monkeypatch.setattr(engine.dispatch, "DRAIN_SEC", 0.2)
    created = HookRegistry(redis_client, keys).create(hook())
    RetryStore(redis_client, keys).schedule(
        Delivery(id="d1", hook_id=created.id or 0, account_id=1, kind="http_batch",
                 parts=[b"{}"]), due_ms=0, error="HTTP 500")

    def refused(self: RetryStore, ids: list[str]) -> None:
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(RetryStore, "handed_back", refused)
    sender = InProcessSender(hold=True)
    worker = RetryWorker(settings, redis_client, sender)
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="hookray"):
        runner = threading.Thread(target=worker.run, args=(stop,))
        runner.start()
        assert wait_for(lambda: bool(sender.held), 5)
        stop.set()
        runner.join(5)
    assert not runner.is_alive(), "the worker did not stop"
    assert int(redis_client.hget(keys.retry_unanswered, "d1") or 0) == 1
    assert "retry worker: 1 re-send(s) not answered (the worker stops) could not be " \
        "taken back as handed over (ConnectionError: Connection reset by peer)" in caplog.text


def test_entries_a_lost_read_handed_over_are_found_and_processed(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A read Redis carries out after the worker gave up on it (its connection timed
    out, the command arrived late) hands an entry over to the worker's consumer that no
    later read returns: the worker finds it among its pending entries and sends it."""
    import engine.dispatch as dispatch

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 100)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    worker.step(block_ms=10)  # its start-up read of its own pending entries: none
    assert not worker.reading_own_pending
    intake.publish(clicks(3))
    # the late read: the entry is now pending for the worker's consumer
    late = redis_client.xreadgroup(CONSUMER_GROUP, worker.consumer, {keys.intake(0): ">"})
    assert len(late[0][1]) == 1
    intake.publish(clicks(2, list_id=2))
    run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 2)
    assert redis_client.xlen(keys.intake(0)) == 1  # read on: the handed-over one waits
    monkeypatch.setattr(dispatch, "ORPHAN_CHECK_SEC", 0.0)
    monkeypatch.setattr(dispatch, "ORPHAN_IDLE_MS", 0)
    with caplog.at_level(logging.WARNING, logger="hookray"):
        run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sum(d.count for d in sender.transport.sent) == 5 and sent_once(sender)
    assert "1 intake entries pending for this partition were not being processed" in \
        caplog.text
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    assert worker.unsettled == 0 and not worker.entry_left


def test_orphans_taken_up_are_not_read_again_after_a_later_lost_read(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries the orphan check took up are being sent; a later read whose reply is
    lost makes the worker read its own pending entries after the last it read, which
    must be after them, or their messages are built and sent a second time."""
    import engine.dispatch as dispatch

    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 100)
    sender = InProcessSender(hold=True)  # sends that do not end (a slow destination)
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    worker.step(block_ms=10)  # its start-up read of its own pending entries: none
    intake.publish(clicks(5))
    redis_client.xreadgroup(CONSUMER_GROUP, worker.consumer, {keys.intake(0): ">"})  # late
    monkeypatch.setattr(dispatch, "ORPHAN_CHECK_SEC", 0.0)
    monkeypatch.setattr(dispatch, "ORPHAN_IDLE_MS", 0)
    run_until(worker, lambda: len(sender.held) == 1)  # taken up, its batch sent
    monkeypatch.setattr(dispatch, "ORPHAN_CHECK_SEC", 3600.0)
    real = redis_client.xreadgroup

    def lost(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(redis_client, "xreadgroup", real)
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(redis_client, "xreadgroup", lost)
    with pytest.raises(redis.TimeoutError):
        worker.step(block_ms=10)
    assert worker.reading_own_pending
    run_until(worker, lambda: not worker.reading_own_pending)
    for _ in range(5):
        worker.step(block_ms=10)
    sent = [mid for d in sender.held for mid in d.message_ids]
    assert len(sent) == 5 and len(set(sent)) == 5, sent


def test_entries_the_worker_holds_are_no_orphans(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries whose messages are being sent, or wait in an open batch, are pending
    for the worker's consumer too: the look for orphans leaves them alone."""
    import engine.dispatch as dispatch

    monkeypatch.setattr(dispatch, "ORPHAN_CHECK_SEC", 0.0)
    monkeypatch.setattr(dispatch, "ORPHAN_IDLE_MS", 0)
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())  # batches of 10, flushed after 0.1 s
    intake = one_intake(redis_client, keys, 7)
    sender = InProcessSender(hold=True)  # sends that do not end
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(10) + clicks(3, list_id=2))  # 2 entries sent, 2 more batched
    run_until(worker, lambda: len(sender.held) == 1)
    for _ in range(20):
        worker.step(block_ms=10)
    assert sum(d.count for d in sender.held) in (10, 13)
    assert len({mid for d in sender.held for mid in d.message_ids}) == \
        sum(d.count for d in sender.held)  # nothing taken up twice
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 2
    assert set(worker.entry_left) == {eid.decode() for eid, _ in
                                      redis_client.xrange(keys.intake(0))}


def test_batches_close_before_they_pass_max_batch_bytes(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Large messages (here a profile field copied into custom_data) close a batch by
    bytes before its message count is reached; one larger than the limit goes alone."""
    from engine.stores import ProfileStore

    cfg = one_partition(settings).model_copy(update={"MAX_BATCH_BYTES": 8 * 1024})
    HookRegistry(redis_client, keys).create(hook(
        custom_data={"fields": ["bio"]},
        target={"http_batch": {"url": "http://127.0.0.1:9/x", "max_batch_size": 100,
                               "flush_timeout_sec": 0.1}}))
    profiles = {f"p{n}": {"bio": "x" * 1_000} for n in range(40)}
    profiles["p7"] = {"bio": "y" * 20_000}  # alone larger than the limit
    ProfileStore(redis_client, keys).upsert(1, profiles)
    events = [{**e, "profile_id": f"p{n}"} for n, e in enumerate(clicks(40))]
    one_intake(redis_client, keys, 1000).publish(events)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    sent = sender.transport.sent
    assert sum(d.count for d in sent) == 40 and sent_once(sender)
    sizes = [sum(map(len, d.parts)) for d in sent]
    alone = [d for d in sent if any(b"y" * 20_000 in p for p in d.parts)]
    assert len(alone) == 1 and alone[0].count == 1  # the large one, by itself
    assert all(size <= 8 * 1024 for d, size in zip(sent, sizes, strict=True)
               if d is not alone[0])
    assert len(sent) >= 40 * 1_000 // (8 * 1024) + 1  # more batches than the count asks


def test_a_hand_over_that_fails_counts_no_send_it_did_not_make(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The worker counts a claim's hand-overs, then hands them over one by one: when
    that fails (the sender refuses, Redis goes), the ones not handed over are not
    counted as sends the worker died during, so however often it happens no dead
    letter says so, and the deliveries are sent once it works again."""
    from engine.retrying import MAX_UNANSWERED

    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    ids = ["d1", "d2", "d3"]
    for delivery_id in ids:
        retry.schedule(Delivery(id=delivery_id, hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")

    def refuse(hook: Any, delivery: Delivery) -> None:
        raise RuntimeError("the transport actor is gone")

    for _ in range(MAX_UNANSWERED + 2):
        sender = InProcessSender(hold=True)
        sender.submit = refuse  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="the transport actor is gone"):
            RetryWorker(settings, redis_client, sender).step()
        assert not any(int(n) for n in redis_client.hvals(keys.retry_unanswered))
        redis_client.zadd(keys.retry, dict.fromkeys(ids, 0))  # the leases run out
    assert retry.dead_letters() == []
    sender = InProcessSender(hold=True)
    assert RetryWorker(settings, redis_client, sender).step() == 3
    assert sorted(d.id for d in sender.held) == ids


def test_a_re_send_that_cannot_be_made_for_the_target_is_dead_lettered_alone(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A batch made for HTTP whose hook is now a RabbitMQ exchange gets its routing
    keys from its parts; a part that cannot give them fails that delivery for good,
    named, and the deliveries claimed with it are sent."""
    created = HookRegistry(redis_client, keys).create(hook(
        target={"rabbitmq_exchange": {"host": "mq.example", "exchange": "x"}}))
    retry = RetryStore(redis_client, keys)
    part = json.dumps({"event_type": "click", "list_id": 3}).encode()
    for delivery_id, parts in (("a-bad", [b"\xff not json"]), ("b-good", [part])):
        retry.schedule(Delivery(id=delivery_id, hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=parts, message_ids=["m"]),
                       due_ms=0, error="HTTP 500")
    sender = InProcessSender(hold=True)
    RetryWorker(settings, redis_client, sender).step()
    assert [(d.id, d.keys) for d in sender.held] == [("b-good", ["3.click"])]
    (dead,) = retry.dead_letters()
    assert dead.id == "a-bad"
    assert dead.last_error.startswith("cannot be made for the hook's rabbitmq_exchange "
                                      "target: "), dead.last_error
    assert dead.last_error.endswith("; last error: HTTP 500")


def test_handing_back_never_takes_a_count_below_zero(redis_client: redis.Redis,
                                                     keys: Keys) -> None:
    retry = RetryStore(redis_client, keys)
    assert retry.handed_over(["a", "a", "b"]) == [1, 2, 1]
    retry.handed_back(["a", "b", "c"])  # c: reset meanwhile (an outcome came)
    assert redis_client.hgetall(keys.retry_unanswered) == {b"a": b"1"}
    retry.handed_back(["a", "a"])
    assert redis_client.hgetall(keys.retry_unanswered) == {}


def test_the_index_takes_the_time_a_dead_letter_died_last(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read by the one-time index, then replayed and dead again before it is indexed:
    indexed with the time it died again, as the dead letters hold it."""
    from engine.transports.base import pack_delivery

    letter = _letter("d1", 1, 10)
    redis_client.hset(keys.dead_payload, "d1", pack_delivery(letter))
    redis_client.zadd(keys.dead, {"d1": 1000})
    retry = RetryStore(redis_client, keys)
    script = retry._index

    def died_again(*args: Any, **kwargs: Any) -> Any:
        redis_client.zadd(keys.dead, {"d1": 5000})  # as a replay and a new kill leave it
        return script(*args, **kwargs)

    retry._index = died_again  # type: ignore[method-assign]
    retry.dead_letters()
    assert redis_client.zscore(keys.dead_of_account(1), "d1") == 5000
    assert redis_client.zscore(keys.dead_of_hook(10), "d1") == 5000


def test_health_says_which_workers_run_and_forgets_a_stopped_one_at_once(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    from engine.health import engine_health

    assert engine_health(redis_client, keys) == {
        "partitions": {"expected": None, "running": 0, "waiting": [], "stopped": []},
        "retry_running": False, "retry_waiting": None}
    redis_client.hset(keys.config, "partitions", 2)  # as an engine's start records it
    cfg = settings.model_copy(update={"PARTITIONS": 2})
    Intake(redis_client, keys, 2, 1000).ensure_groups()
    workers = [PartitionWorker(cfg, redis_client, 1, InProcessSender()),
               RetryWorker(cfg, redis_client, InProcessSender())]
    with running(workers):
        assert wait_for(lambda: engine_health(redis_client, keys)["retry_running"], 5)
        assert wait_for(lambda: engine_health(redis_client, keys)["partitions"]["running"], 5)
        assert engine_health(redis_client, keys) == {
            "partitions": {"expected": 2, "running": 1, "waiting": [], "stopped": [0]},
            "retry_running": True, "retry_waiting": None}
        assert 0 < redis_client.ttl(keys.alive("partition:1")) <= 15
    assert engine_health(redis_client, keys) == {
        "partitions": {"expected": 2, "running": 0, "waiting": [], "stopped": [0, 1]},
        "retry_running": False, "retry_waiting": None}


def test_health_names_the_workers_waiting_for_an_invalid_hook_and_why(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A partition and a retry worker that loop but process nothing while a stored
    hook no longer validates are not "running": health lists them as waiting, with
    the error, at once; once the hook is deleted they run again, at once."""
    from engine.health import engine_health

    registry = HookRegistry(redis_client, keys)
    broken = registry.create(hook())
    break_stored_hook(redis_client, keys, broken.id)
    redis_client.incr(keys.hooks_version)
    redis_client.hset(keys.config, "partitions", 1)
    cfg = one_partition(settings)
    one_intake(redis_client, keys, 1000).ensure_groups()
    workers = [PartitionWorker(cfg, redis_client, 0, InProcessSender()),
               RetryWorker(cfg, redis_client, InProcessSender())]
    with running(workers):
        assert wait_for(lambda: engine_health(redis_client, keys)["partitions"]["waiting"], 5)
        assert wait_for(lambda: engine_health(redis_client, keys)["retry_waiting"], 5)
        health = engine_health(redis_client, keys)
        (waiting,) = health["partitions"]["waiting"]
        assert waiting["partition"] == 0
        assert waiting["reason"].startswith(f"stored hook {broken.id} no longer validates")
        assert health["partitions"]["running"] == 0 and health["partitions"]["stopped"] == []
        assert health["retry_running"] is True
        assert str(health["retry_waiting"]).startswith(f"stored hook {broken.id} ")
        registry.delete(broken.id or 0)
        assert wait_for(lambda: engine_health(redis_client, keys) == {
            "partitions": {"expected": 1, "running": 1, "waiting": [], "stopped": []},
            "retry_running": True, "retry_waiting": None}, 5)


def test_workers_wait_while_another_engine_holds_the_prefix(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The claim of the engine these workers belong to lapsed and another engine took
    it: they read and re-send nothing, and health says why, until it is theirs again."""
    from engine.health import engine_health
    from engine.lease import EngineLease

    created = HookRegistry(redis_client, keys).create(hook())
    redis_client.hset(keys.config, "partitions", 1)
    cfg = one_partition(settings)
    one_intake(redis_client, keys, 1000).publish(clicks(20))
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b'{"x": 1}'], message_ids=["m1"]),
                   due_ms=0, error="HTTP 500")
    ours = EngineLease(redis_client, keys, 30, about={"host": "here"})
    other = EngineLease(redis_client, keys, 30, about={"host": "elsewhere", "pid": 9})
    assert other.claim() is None
    senders = [InProcessSender(), InProcessSender()]
    workers = [PartitionWorker(cfg, redis_client, 0, senders[0], owner=ours.owner),
               RetryWorker(cfg, redis_client, senders[1], owner=ours.owner)]
    with running(workers):
        assert wait_for(lambda: engine_health(redis_client, keys)["partitions"]["waiting"], 5)
        assert wait_for(lambda: engine_health(redis_client, keys)["retry_waiting"], 5)
        time.sleep(0.5)
        health = engine_health(redis_client, keys)
        assert health["partitions"]["waiting"][0]["reason"] == (
            f"another engine holds this engine's REDIS_PREFIX claim, the workers wait: "
            f"{keys.engine} is held by host elsewhere, pid 9; stop one of the two engines")
        assert str(health["retry_waiting"]).startswith("another engine holds")
        assert not senders[0].transport.sent and not senders[1].transport.sent
        assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
        assert retry.pending() == 1
        # the other engine stopped: the claim is this engine's again
        assert other.release() and ours.claim() is None
        assert wait_for(lambda: redis_client.xlen(keys.intake(0)) == 0
                        and sum(d.count for d in senders[0].transport.sent) == 20, 10)
        assert wait_for(lambda: [d.id for d in senders[1].transport.sent] == ["d1"], 10)
        assert wait_for(lambda: not engine_health(redis_client, keys)["partitions"]["waiting"]
                        and engine_health(redis_client, keys)["retry_waiting"] is None, 5)


def test_entries_of_a_read_whose_reply_was_lost_are_read_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis ran the XREADGROUP (its entries are now pending for this consumer) but the
    reply was lost (a reset connection, a timeout): the worker reads its pending
    entries after the last one it saw, and sends each event once."""
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    intake.publish(clicks(3))
    run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 3)
    for _ in range(3):  # flushed, settled, acked
        worker.step(block_ms=10)
    assert not worker.reading_own_pending
    intake.publish(clicks(5, list_id=2))
    real = redis_client.xreadgroup
    lost = [True]

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        reply = real(*args, **kwargs)
        if lost:
            lost.pop()
            raise redis.ConnectionError("Connection reset by peer")
        return reply

    monkeypatch.setattr(worker.r, "xreadgroup", reply_lost)
    with pytest.raises(redis.ConnectionError):
        worker.step(block_ms=10)
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 1
    run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 8)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    sent = [json.loads(p)["event_data"] for d in sender.transport.sent for p in d.parts]
    assert len(sent) == 8
    mids = [m for d in sender.transport.sent for m in d.message_ids]
    assert len(set(mids)) == 8  # none twice: entries read before are not read again
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0


@pytest.mark.parametrize("orphan_check_due", [False, True])
def test_a_lost_consumer_group_is_made_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        orphan_check_due: bool) -> None:
    """Redis came back empty (no persistence) while the engine ran: publishing makes
    the stream again (XADD), and the partition makes its consumer group again and
    sends what was accepted since; also when the periodic check for orphaned pending
    entries is due on the first round after (an outage of a minute or more), and meets
    the missing group before any read does."""
    cfg = one_partition(settings)
    registry = HookRegistry(redis_client, keys)
    registry.create(hook())
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    worker.step(block_ms=10)
    for key in redis_client.scan_iter(match=f"{keys.p}*"):
        redis_client.delete(key)
    registry.create(hook())
    redis_client.hset(keys.config, "partitions", 1)
    assert intake.publish(clicks(3)).accepted == 3
    if orphan_check_due:
        worker.orphans_checked = 0.0
        worker.step(block_ms=10)  # (before the fix: NOGROUP from XPENDING, every round)
        assert redis_client.xinfo_groups(keys.intake(0))[0]["name"].decode() == \
            CONSUMER_GROUP
    run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 3)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)


class OneShotHttp:
    """The HTTP transport, made and closed for each send (each in an event loop of its
    own: InProcessSender runs every send with asyncio.run)."""

    async def send(self, target: Any, delivery: Delivery) -> Outcome:
        transport = HttpTransport()
        try:
            return await transport.send(target, delivery)
        finally:
            await transport.close()


@contextmanager
def raw_http_server(answer: bytes) -> Iterator[int]:
    """A server on 127.0.0.1 answering every request with ``answer``, byte for byte
    (what aiohttp's server would not send: a header in Latin-1); its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_destination_answering_text_utf8_cannot_hold_does_not_stop_the_partition(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A redirect whose Location is Latin-1 (aiohttp decodes it with surrogates): the
    failure's text is kept with the dead letter, its byte escaped, and the partition
    goes on acknowledging (before: the booking failed on every round)."""
    answer = (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1/caf\xe9\r\n"
              b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    with raw_http_server(answer) as port:
        stored = HookRegistry(redis_client, keys).create(hook(target={"http_batch": {
            "url": f"http://127.0.0.1:{port}/x", "max_batch_size": 10,
            "flush_timeout_sec": 0.1}}))
        intake = one_intake(redis_client, keys, 1000)
        worker = PartitionWorker(cfg, redis_client, 0, InProcessSender(OneShotHttp()))
        assert intake.publish(clicks(5)).accepted == 5
        retry = RetryStore(redis_client, keys)
        run_until(worker, lambda: len(retry.dead_letters(hook_id=stored.id)) == 1, 15)
        run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0, 15)
    (dead,) = retry.dead_letters(hook_id=stored.id)
    assert "http://127.0.0.1/caf\\udce9" in dead.last_error, dead.last_error
    assert dead.count == 5
    assert Stats(redis_client, keys).get(stored.id)["dead_lettered"] == 5


def test_outcomes_are_collected_while_the_engine_claim_cannot_be_read(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers of an engine look at its claim on the prefix first in each round;
    while Redis is down that look fails, and the sender is still polled (partition and
    retry worker), so no outcome waits in a transport actor long enough to be dropped."""
    cfg = one_partition(settings)
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=created.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    senders = [InProcessSender(hold=True), InProcessSender(hold=True)]
    workers: list[Any] = [PartitionWorker(cfg, redis_client, 0, senders[0], owner="e1"),
                          RetryWorker(cfg, redis_client, senders[1], owner="e1")]
    intake.publish(clicks(10))
    run_until(workers[0], lambda: len(senders[0].held) == 1)
    assert workers[1].step() == 1 and len(senders[1].held) == 1
    helds = []
    for sender in senders:
        (held,) = sender.held
        helds.append(held)
        sender.hold, sender.held = False, []
        sender.done.append((held, Outcome(ok=True)))  # the outcome arrives meanwhile

    def down(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(redis_client, "get", down)
    for worker in workers:
        worker.holding.looked = -3600.0  # the claim is due to be looked at
        with pytest.raises(redis.ConnectionError):
            worker.step()
    # each outcome left its sender, to be booked once Redis answers
    assert [list(w.settling) for w in workers] == [[(h, Outcome(ok=True))] for h in helds]
    assert [s.done for s in senders] == [[], []]
    monkeypatch.undo()
    run_until(workers[0], lambda: redis_client.xlen(keys.intake(0)) == 0)
    workers[1].step()
    assert retry.pending() == 0
    assert Stats(redis_client, keys).get(created.id or 0)["delivered"] == 11


def claim_scene(redis_client: redis.Redis, settings: Settings, keys: Keys) -> tuple[Any, ...]:
    """An engine's partition and retry workers (HOOK_RETRY_TIMES 1) under its claim on
    the prefix, each with a send out and held: a batch of 10 clicks and a re-send."""
    from engine.lease import EngineLease

    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 1})
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
    retry = RetryStore(redis_client, keys)
    resend = Delivery(id="d1", hook_id=created.id or 0, account_id=1, kind="http_batch",
                      parts=[b"{}"], message_ids=["m1"], resends=0)
    retry.schedule(resend, due_ms=0, error="HTTP 500")
    ours = EngineLease(redis_client, keys, 30, about={"host": "here"})
    other = EngineLease(redis_client, keys, 30, about={"host": "elsewhere"})
    assert ours.claim() is None
    senders = [InProcessSender(hold=True), InProcessSender(hold=True)]
    workers: list[Any] = [PartitionWorker(cfg, redis_client, 0, senders[0], owner=ours.owner),
                          RetryWorker(cfg, redis_client, senders[1], owner=ours.owner)]
    intake.publish(clicks(10))
    run_until(workers[0], lambda: len(senders[0].held) == 1)
    assert workers[1].step() == 1 and len(senders[1].held) == 1
    return created, retry, resend, ours, other, senders, workers


def test_outcomes_of_sends_from_before_another_engine_took_the_claim_are_not_booked(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The workers' claim lapsed and another engine took it while a batch and a re-send
    were out; they failed meanwhile, and the other engine delivered the re-send. Once
    the claim is back, those stale failures are dropped, not booked over the other
    engine's work (which would send the delivered re-send again, or dead-letter it),
    and the partition reads its unacknowledged entries again and delivers them."""
    created, retry, resend, ours, other, senders, workers = claim_scene(
        redis_client, settings, keys)
    # our claim lapsed and the other engine took it
    assert ours.release() and other.claim() is None
    for worker in workers:
        worker.holding.looked = -3600.0
        with pytest.raises(PrefixTaken):
            worker.step()
    for sender in senders:  # the sends fail meanwhile
        (held,) = sender.held
        sender.hold, sender.held = False, []
        sender.done.append((held, Outcome(ok=False, error="ConnectError",
                                          detail="connection refused")))
    for worker in workers:  # still waiting: collected, not booked
        with pytest.raises(PrefixTaken):
            worker.step()
    retry.complete(resend)  # the other engine delivered the re-send
    # the other engine stopped: the claim is ours again
    assert other.release() and ours.claim() is None
    for worker in workers:
        worker.holding.looked = -3600.0
    run_until(workers[0], lambda: redis_client.xlen(keys.intake(0)) == 0)
    for _ in range(3):
        workers[1].step()
    assert retry.pending() == 0 and retry.dead_letters() == []
    assert sum(d.count for d in senders[0].transport.sent) == 10
    counts = Stats(redis_client, keys).get(created.id or 0)
    # the 10 events, and the re-send the other engine delivered
    assert (counts["delivered"], counts["dead_lettered"]) == (11, 0)


def test_a_claim_lost_and_taken_back_while_the_workers_could_not_look_drops_their_work(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers cannot reach Redis while their claim lapses, another engine takes
    it, delivers their re-send and stops, and their engine takes the claim again: they
    never saw the other claim, yet the claim is another taking of it, so the outcomes
    they collected meanwhile are dropped, not booked over the other engine's work."""
    created, retry, resend, ours, other, senders, workers = claim_scene(
        redis_client, settings, keys)

    def cut(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection timed out")

    monkeypatch.setattr(redis_client, "get", cut)  # the workers' look at the claim
    for sender in senders:  # the sends fail meanwhile
        (held,) = sender.held
        sender.hold, sender.held = False, []
        sender.done.append((held, Outcome(ok=False, error="ConnectError", detail="refused")))
    for worker in workers:
        worker.holding.looked = -3600.0
        with pytest.raises(redis.ConnectionError):
            worker.step()
    monkeypatch.undo()
    # meanwhile the claim lapsed; the other engine took it, delivered the re-send, stopped
    redis_client.delete(keys.engine)
    assert other.claim() is None
    retry.complete(resend)
    assert other.release()
    assert ours.claim() is None  # the renewer takes the free claim again
    for worker in workers:
        worker.holding.looked = -3600.0
    run_until(workers[0], lambda: redis_client.xlen(keys.intake(0)) == 0)
    for _ in range(3):
        workers[1].step()
    assert [w.holding.losses for w in workers] == [1, 1]
    assert retry.pending() == 0 and retry.dead_letters() == []
    assert sum(d.count for d in senders[0].transport.sent) == 10  # read again, delivered
    counts = Stats(redis_client, keys).get(created.id or 0)
    assert (counts["delivered"], counts["dead_lettered"]) == (11, 0)


def test_open_batch_of_a_deleted_hook_is_not_sent_one_of_a_changed_hook_goes_to_its_new_target(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A hook deleted while its batch waits for its flush timeout: the batch is not
    sent to the deleted destination (nor with its secrets) but dead-lettered, as its
    re-sends are; a hook whose URL changed meanwhile has its open batch sent to the
    new URL."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    registry = HookRegistry(redis_client, keys)
    slow = {"url": "http://127.0.0.1:9/old", "max_batch_size": 100, "flush_timeout_sec": 60,
            "auth": {"kind": "bearer", "token": "s3cret-token"}}
    deleted = registry.create(hook(target={"http_batch": slow}))
    changed = registry.create(hook(account_id=2, target={"http_batch": slow}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(3) + [{**c, "account_id": 2} for c in clicks(4)])
    run_until(worker, lambda: worker.dispatcher.open_messages() == 7)
    registry.delete(deleted.id or 0)
    registry.update(changed.id or 0, hook(account_id=2, target={"http_batch": {
        **slow, "url": "http://127.0.0.1:9/new"}}))
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert [(h.id, str(h.target.http_batch.url)) for h in sender.hooks
            if h.target.http_batch] == [(changed.id, "http://127.0.0.1:9/new")]
    retry = RetryStore(redis_client, keys)
    (dead,) = retry.dead_letters(hook_id=deleted.id)
    assert dead.count == 3
    assert dead.last_error == f"NotSent: hook {deleted.id} was deleted before this batch " \
                              "was sent"
    assert Stats(redis_client, keys).get(deleted.id or 0)["dead_lettered"] == 3


def test_a_transport_actor_restart_uses_up_no_re_send(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Calls made while Ray restarts a transport actor fail at once, the batches sent
    or not: no fault of the destination. With HOOK_RETRY_TIMES 0 such a batch waits
    for a re-send rather than becoming a dead letter, and a last re-send failing so
    is scheduled again, its re-sends not used up."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0,
                                                      "HOOK_RETRY_PERIOD_SEC": 0.05})
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(10))
    restarted = Outcome(ok=False, error="TransportRestarted",
                        detail="transport actor failed: ActorUnavailableError: restarting")
    senders = [InProcessSender(hold=True), InProcessSender(hold=True)]
    partition = PartitionWorker(cfg, redis_client, 0, senders[0])
    run_until(partition, lambda: len(senders[0].held) == 1)
    senders[0].done.append((senders[0].held.pop(), restarted))
    run_until(partition, lambda: redis_client.xlen(keys.intake(0)) == 0)
    retry = RetryStore(redis_client, keys)
    assert retry.pending() == 1 and retry.dead_letters() == []
    worker = RetryWorker(cfg, redis_client, senders[1])
    deadline = time.monotonic() + 5
    while not senders[1].held:
        assert time.monotonic() < deadline
        worker.step()
    (resend,) = senders[1].held
    assert (resend.resends, resend.restarts) == (0, 1)
    senders[1].held.clear()
    senders[1].done.append((resend, restarted))
    worker.step()
    assert retry.pending() == 1 and retry.dead_letters() == []
    counts = Stats(redis_client, keys).get(created.id or 0)
    assert counts["dead_lettered"] == 0
    # but a delivery whose every send ends its transport actor is no restart's victim:
    # after MAX_UNCHARGED_RESTARTS such failures in a row, the next one is charged
    from engine.transports.base import MAX_UNCHARGED_RESTARTS

    tries = 1
    while not retry.dead_letters():
        assert tries <= MAX_UNCHARGED_RESTARTS, "never charged"
        deadline = time.monotonic() + 5
        while not senders[1].held:
            assert time.monotonic() < deadline
            worker.step()
        (resend,) = senders[1].held
        senders[1].held.clear()
        senders[1].done.append((resend, restarted))
        worker.step()
        tries += 1
    assert tries == MAX_UNCHARGED_RESTARTS  # with the partition's: one more than that
    (dead,) = retry.dead_letters()
    assert dead.resends == 1 and dead.last_error.startswith("TransportRestarted: ")


def test_a_restart_counted_once_however_often_its_booking_is_tried(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition's TransportRestarted failure whose booking Redis failed several times
    is booked as one restart (the delivery is not changed by the tries), so it still
    uses up no re-send; a replayed dead letter starts its restarts again too."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    created = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 10)
    intake.publish(clicks(10))
    sender = InProcessSender(hold=True)
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    run_until(worker, lambda: len(sender.held) == 1)
    sender.done.append((sender.held.pop(), Outcome(ok=False, error="TransportRestarted",
                                                   detail="transport actor failed")))
    real = worker.side.retry.schedule
    fails = [4]

    def down(*args: Any, **kwargs: Any) -> Any:
        if fails[0]:
            fails[0] -= 1
            raise redis.ConnectionError("Connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.side.retry, "schedule", down)
    deadline = time.monotonic() + 5
    while redis_client.xlen(keys.intake(0)):
        assert time.monotonic() < deadline
        with suppress(redis.ConnectionError):
            worker.step(block_ms=10)
    retry = RetryStore(redis_client, keys)
    assert retry.dead_letters() == [] and fails == [0]
    (scheduled,) = retry.claim_due(10, now=now_ms() + 3_600_000)
    assert (scheduled.restarts, scheduled.resends) == (1, 0)
    # dead-lettered with restarts counted, then replayed: a new delivery's count
    retry.kill(msgspec.structs.replace(scheduled, restarts=4), "TransportRestarted: x")
    assert retry.replay([scheduled.id]) == 1
    (replayed,) = retry.claim_due(10, now=now_ms() + 3_600_000)
    assert (replayed.restarts, replayed.resends) == (0, -1)
    assert created.id is not None


def test_the_retry_worker_holds_a_bounded_size_of_re_sends_awaiting_outcomes(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-sends of a destination slower than its traffic wait long in the sender: the
    retry worker claims more only while those waiting for an outcome are under
    INFLIGHT_BYTES of payloads (not only under 2,000 deliveries of up to 8 MiB)."""
    monkeypatch.setattr("engine.retrying.INFLIGHT_BYTES", 1024 * 1024)
    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    for n in range(64):
        retry.schedule(Delivery(id=f"d{n}", hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=[b"x" * 65_536]),
                       due_ms=0, error="HTTP 500")
    sender = InProcessSender(hold=True)
    worker = RetryWorker(one_partition(settings), redis_client, sender)
    for _ in range(5):
        worker.step()
    assert len(sender.held) == 16  # 1 MiB of 64 KiB payloads
    sender.done.append((sender.held.pop(), Outcome(ok=True)))
    worker.step()
    worker.step()
    assert len(sender.held) == 16 and retry.pending() == 63


def test_outcomes_are_collected_while_reading_fails(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While Redis is down, a partition's rounds fail at the read; the sender is still
    polled, so a transport actor keeps no outcome long enough to drop it, and the
    outcomes collected are booked once Redis is back."""
    cfg = one_partition(settings)
    HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender(hold=True)
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(10))
    run_until(worker, lambda: len(sender.held) == 1)
    polled: list[int] = []
    poll = sender.poll

    def counting(timeout: float) -> list[tuple[Delivery, Outcome]]:
        polled.append(1)
        return poll(timeout)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(sender, "poll", counting)
    monkeypatch.setattr(worker.r, "xreadgroup", down)
    (held,) = sender.held
    sender.hold, sender.held = False, []
    sender.done.append((held, Outcome(ok=True)))  # the outcome arrives meanwhile
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            worker.step(block_ms=10)
    assert len(polled) == 3 and list(worker.settling) == [(held, Outcome(ok=True))]
    monkeypatch.undo()
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert Stats(redis_client, keys).get(held.hook_id)["delivered"] == 10


@pytest.mark.parametrize("carried_out", [False, True], ids=["not-sent", "reply-lost"])
def test_the_retry_worker_books_every_outcome_despite_a_redis_error(
        carried_out: bool, redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Booking one outcome fails (Redis; before Redis saw it, or its reply lost): it
    and the outcomes after it are booked by the next step, each once; none is sent
    again."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 3})
    h = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    for n in range(3):
        retry.schedule(Delivery(id=f"d{n}", hook_id=h.id or 0, account_id=1,
                                kind="http_batch", parts=[b'{"n":%d}' % n],
                                message_ids=[f"m{n}"]), 0, "first attempt failed")
    class FailingD2(StubTransport):
        async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
            if delivery.id == "d2":
                self.attempts[delivery.id] += 1
                return Outcome(ok=False, error="Rejected", detail="d2 refused")
            return await super()._deliver(target, delivery)

    sender = InProcessSender(FailingD2())
    worker = RetryWorker(cfg, redis_client, sender)
    complete = worker.side.retry.complete
    failed = [True]

    def flaky(delivery: Delivery, once: Any = None, epoch: bytes | None = None) -> None:
        if failed:
            failed.pop()
            if carried_out:
                complete(delivery, once=once, epoch=epoch)
            raise redis.ConnectionError("Connection reset by peer")
        complete(delivery, once=once, epoch=epoch)

    monkeypatch.setattr(worker.side.retry, "complete", flaky)
    with pytest.raises(redis.ConnectionError):
        worker.step()
    assert len(worker.settling) == 3
    worker.step()
    assert not worker.settling and not worker.handed
    assert dict(sender.transport.attempts) == {"d0": 1, "d1": 1, "d2": 1}
    assert Stats(redis_client, keys).get(h.id or 0)["delivered"] == 2
    (again,) = retry.claim_due(10, now=2**62)
    assert again.id == "d2" and again.resends == 1  # its failed re-send counted once


def test_a_retried_batch_goes_to_the_hooks_new_kind_of_target(
        redis_client: redis.Redis, settings: Settings, keys: Keys, rabbit: Any) -> None:
    """A failed HTTP batch waits for its re-send while its hook is changed to a
    RabbitMQ exchange: the re-send is published with each message's routing key
    (``<list_id>.<event_type>``), read back from the messages, not with none (which
    the exchange would drop, confirmed as delivered)."""
    from engine.transports.rabbitmq import RabbitExchangeTransport

    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 3,
                                                      "HOOK_RETRY_PERIOD_SEC": 0.1})
    registry = HookRegistry(redis_client, keys)
    h = registry.create(hook())
    intake = one_intake(redis_client, keys, 1000)
    worker = PartitionWorker(cfg, redis_client, 0,
                             InProcessSender(StubTransport(always_fail=True)))
    intake.publish(clicks(3, list_id=4) + clicks(2, list_id=5))
    retry = RetryStore(redis_client, keys)
    run_until(worker, lambda: retry.pending() == 1)
    exchange = rabbit.declare_exchange("retarget", "direct")
    queue = rabbit.declare_queue("retarget-4", bind=("4.click",), exchange=exchange)
    other = rabbit.declare_queue("retarget-5", bind=("5.click",), exchange=exchange)
    data = h.to_storage()
    data["target"] = {"rabbitmq_exchange": rabbit.broker(exchange=exchange, type="direct")}
    registry.update(h.id or 0, data)
    sender = InProcessSender(RabbitExchangeTransport(timeout_sec=10))
    retry_worker = RetryWorker(cfg, redis_client, sender)
    deadline = time.monotonic() + 10
    while retry.pending() and time.monotonic() < deadline:
        retry_worker.step()
    assert retry.pending() == 0 and not retry.dead_letters()
    got = rabbit.consume(queue, expect=3) + rabbit.consume(other, expect=2)
    assert sorted(m.routing_key for m in got) == ["4.click"] * 3 + ["5.click"] * 2
    assert Stats(redis_client, keys).get(h.id or 0)["delivered"] == 5


def test_a_damaged_stored_hook_or_name_is_reported_not_a_crash(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """A stored hook that is not JSON (or not an object) is a HookError naming it, so
    the workers say they are waiting and why; a names record that cannot be read is
    left out with a warning, and the other names load."""
    from engine.stores import NameStore

    registry = HookRegistry(redis_client, keys)
    good = registry.create(hook())
    redis_client.hset(keys.hooks, "77", b"{not json")
    with pytest.raises(HookError, match="stored hook 77 is not valid JSON"):
        registry.load()
    redis_client.hset(keys.hooks, "77", b"[1, 2]")
    with pytest.raises(HookError, match="stored hook 77 is not a JSON object"):
        registry.load()
    redis_client.hdel(keys.hooks, "77")
    assert [h.id for h in registry.load()[1]] == [good.id]
    names = NameStore(redis_client, keys)
    names.upsert([{"account_id": 1, "kind": "campaigns", "id": 5, "name": "Spring"}])
    redis_client.hset(keys.names, mapping={"1:campaigns:6": b"{broken", "junk": b"{}",
                                           "1:campaigns:7": b'"text"'})
    with caplog.at_level(logging.WARNING, logger="hookray"):
        catalogue = names.load()
    assert catalogue.get(1, "campaigns", 5) == "Spring"
    assert catalogue.get(1, "campaigns", 6) == "" and catalogue.get(1, "campaigns", 7) == ""
    assert sum("left out" in r.getMessage() for r in caplog.records) == 3


def test_a_names_record_updates_the_fields_it_gives_and_keeps_the_others(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The store replaced a stored record whole: a record of a campaign's subid alone
    dropped its name, and {{campaign_name}} came out empty. Fields are merged, as the
    in-memory catalogue merges them; "" clears one; the same again changes nothing."""
    from engine.stores import NameStore

    names = NameStore(redis_client, keys)
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 973, "name": "Black Friday"}])
    version = names.version()
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 973, "subid": "BF/ü"}])
    assert names.load().to_records() == [{"account_id": 23, "kind": "campaigns", "id": 973,
                                          "name": "Black Friday", "subid": "BF/ü"}]
    assert names.version() == version + 1
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 973, "subid": "BF/ü"},
                  {"account_id": 23, "kind": "campaigns", "id": 973}])
    assert names.version() == version + 1  # nothing changed
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 973, "name": ""}])
    assert names.load().get(23, "campaigns", 973) == ""
    assert names.load().get(23, "campaigns", 973, "subid") == "BF/ü"
    redis_client.hset(keys.names, "23:campaigns:974", b"{broken")  # damaged: replaced
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 974, "name": "Spring"}])
    assert names.load().get(23, "campaigns", 974) == "Spring"
    # written from outside: a number is kept (the engine reads it), a field the kind has
    # not is left out (the engine would not load the record with it)
    redis_client.hset(keys.names, "23:campaigns:975", b'{"name": "Kept", "subid": 5, "x": "y"}')
    names.upsert([{"account_id": 23, "kind": "campaigns", "id": 976, "name": "Other"}])
    assert names.load().get(23, "campaigns", 975) == ""  # not loaded as it is
    names.upsert([{"account_id": 23, "kind": "templates", "id": 975, "subject": "S"},
                  {"account_id": 23, "kind": "campaigns", "id": 975, "subid": "6"}])
    loaded = names.load()
    assert (loaded.get(23, "campaigns", 975), loaded.get(23, "campaigns", 975, "subid")) == \
        ("Kept", "6")


def test_names_version_moves_with_the_write_so_a_call_tried_again_still_moves_it(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The names version moves in the same script as the names it writes or deletes:
    a call whose reply was lost (the connection dropped after Redis carried it out) and
    that is tried again finds nothing to change, yet partitions see a new version."""
    from engine.stores import NameStore

    names = NameStore(redis_client, keys)
    names.upsert([{"account_id": 1, "kind": "campaigns", "id": 5, "name": "old"}])
    real_eval = redis_client.eval
    lost = {"replies": 0}

    def eval_reply_lost(*args: Any, **kwargs: Any) -> Any:
        result = real_eval(*args, **kwargs)
        if lost["replies"]:
            lost["replies"] -= 1
            raise redis.ConnectionError("connection lost before the reply")
        return result

    redis_client.eval = eval_reply_lost  # type: ignore[method-assign]
    for call in (
            lambda: names.upsert([{"account_id": 1, "kind": "campaigns", "id": 5,
                                   "name": "new"}]),
            lambda: names.delete(1, [{"kind": "campaigns", "id": 5}])):
        before = names.version()
        lost["replies"] = 1
        with pytest.raises(redis.ConnectionError):
            call()
        call()  # tried again: nothing left to change
        assert names.version() > before
    assert redis_client.hget(keys.names, "1:campaigns:5") is None
    # a sync of names already stored moves nothing
    redis_client.eval = real_eval  # type: ignore[method-assign]
    names.upsert([{"account_id": 1, "kind": "campaigns", "id": 6, "name": "same"}])
    stable = names.version()
    names.upsert([{"account_id": 1, "kind": "campaigns", "id": 6, "name": "same"}])
    assert names.delete(1, [{"kind": "campaigns", "id": 99}]) == 0
    assert names.version() == stable


def test_only_the_messages_that_failed_are_sent_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A destination that refuses some messages of a batch (a broker's nacks): the
    others count as delivered, and only the refused ones wait for a re-send, and then
    for the next one, until none is left."""
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 3,
                                                      "HOOK_RETRY_PERIOD_SEC": 0.05})

    class RefusesOdd(StubTransport):
        """Refuses the messages of odd events; the first re-send refuses event 1 again,
        the next takes it."""

        async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
            self.attempts[delivery.id] += 1
            ns = [json.loads(p)["event_data"]["n"] for p in delivery.parts]
            attempt = self.attempts[delivery.id]
            odd = [i for i, n in enumerate(ns) if (n % 2 if attempt == 1 else
                                                   n == 1 and attempt == 2)]
            self.sent.append(msgspec.structs.replace(
                delivery, parts=[p for i, p in enumerate(delivery.parts) if i not in odd]))
            if odd:
                return Outcome(ok=False, error="Rejected", detail="refused", failed=odd)
            return Outcome(ok=True)

    h = HookRegistry(redis_client, keys).create(hook())
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender(RefusesOdd())
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    events = clicks(6)
    for n, event in enumerate(events):
        event["event_data"] = {"n": n}
    intake.publish(events)
    retry = RetryStore(redis_client, keys)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    (waiting,) = retry.claim_due(10, now=2**62)
    assert [json.loads(p)["event_data"]["n"] for p in waiting.parts] == [1, 3, 5]
    assert len(waiting.message_ids) == 3 and waiting.resends == 0
    assert Stats(redis_client, keys).get(h.id or 0)["delivered"] == 3
    retry.handed_back([waiting.id])
    redis_client.zadd(keys.retry, {waiting.id: 0})  # due now
    retry_worker = RetryWorker(cfg, redis_client, sender)
    deadline = time.monotonic() + 5
    while retry.pending() and time.monotonic() < deadline:
        retry_worker.step()
    assert retry.pending() == 0 and not retry.dead_letters()
    sent = [json.loads(p)["event_data"]["n"] for d in sender.transport.sent for p in d.parts]
    assert sorted(sent) == list(range(6))  # each delivered once
    assert Stats(redis_client, keys).get(h.id or 0)["delivered"] == 6


def test_events_and_hooks_of_codes_the_engine_lacks_are_refused_by_other_producers(
        redis_client: redis.Redis, keys: Keys, tmp_path: Any) -> None:
    """The engine records its event codes at start; a producer or hook store whose
    EVENT_TYPES_FILE has more refuses events and hooks of those codes (a partition
    could not process the events; a stored hook it cannot load stops every partition),
    and takes the rest."""
    from engine.catalogue import load_catalogue

    extra = tmp_path / "types.json"
    extra.write_text(json.dumps({"event_types": [
        {"code": "promo", "name": "Promo", "category": "delivery", "channel": "promo"}]}))
    wider = load_catalogue(str(extra))
    engine_side = one_intake(redis_client, keys, 1000)  # the built-in codes
    shell = Intake(redis_client, keys, 1, 1000, wider)
    registry = HookRegistry(redis_client, keys, wider)
    # before the engine records its codes, nothing is refused (an older engine)
    promo = [{**e, "event_type": "promo"} for e in clicks(2)]
    assert shell.publish(promo).accepted == 2
    registry.create(hook(actions=["promo"]))
    engine_side.keep_records()
    with pytest.raises(ConfigError) as err:
        shell.publish(clicks(3) + promo)
    assert "event type(s) 'promo' are not known to the engine" in str(err.value)
    assert "nothing was accepted" in str(err.value)
    assert redis_client.xlen(keys.intake(0)) == 1  # only the earlier append
    assert shell.publish(clicks(3)).accepted == 3  # codes the engine knows: taken
    with pytest.raises(HookError) as refused:
        registry.create(hook(name="p2", actions=["click", "promo"]))
    assert refused.value.issues[0][0] == "actions"
    assert "'promo': not an event type of the engine" in str(refused.value)
    kept = registry.create(hook(name="c"))
    with pytest.raises(HookError):
        registry.update(kept.id or 0, hook(name="c", actions=["promo"]))
    assert registry.get(kept.id or 0).actions == ["click"]


def test_a_last_error_is_cut_so_replays_of_a_deleted_hook_do_not_grow_it(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Each kill of a deleted hook's replayed letter puts its reason in front of the
    last error: kept to LAST_ERROR_CHARS, newest reason first."""
    from engine.stores import LAST_ERROR_CHARS

    store = RetryStore(redis_client, keys)
    delivery = Delivery(id="cut", hook_id=9, account_id=1, kind="http_batch", parts=[b"{}"])
    error = "HTTP 503"
    for _ in range(60):
        store.kill(delivery, f"hook 9 was deleted; last error: {error}")
        (letter,) = store.dead_letters()
        error = letter.last_error
    assert len(error) == LAST_ERROR_CHARS and error.startswith("hook 9 was deleted; last ")
    store.schedule(delivery, now_ms(), "x" * 5000)
    (due,) = store.claim_due(10)
    assert due.last_error == "x" * LAST_ERROR_CHARS


def test_replay_all_takes_no_letter_twice_when_the_workers_clock_lags_redis(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted hook's letters, replayed in chunks while a worker whose clock is 5 s
    behind Redis' kills each one again: each is replayed once, as the time of death
    is Redis' clock, after the run's cutoff, not before it."""
    import engine.stores as stores_module

    store = RetryStore(redis_client, keys)
    for n in range(6):
        store.kill(Delivery(id=f"lag-{n}", hook_id=9, account_id=1, kind="http_batch",
                            parts=[b"{}"]), "HTTP 503")
    monkeypatch.setattr(stores_module, "DEAD_MOVE_CHUNK", 2)
    import time

    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - 5)  # this machine's clock
    killed: list[str] = []

    def worker_kills_again(_: int) -> None:  # as the retry worker does: hook 9 is gone
        for delivery in store.claim_due(100):
            killed.append(delivery.id)
            store.kill(delivery, f"hook 9 was deleted; last error: {delivery.last_error}")

    assert store.replay_all(hook_id=9, progress=worker_kills_again) == 6
    assert sorted(killed) == [f"lag-{n}" for n in range(6)]  # each once
    assert len(store.dead_letters(hook_id=9)) == 6


def test_a_set_aside_entry_is_requeued_to_the_partitions_of_its_databases_now(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Set aside under PARTITIONS=1, put back under 4: each event goes to the partition
    its database has now (the entry split where its databases part), not to its old
    partition number modulo the new count."""
    from engine.intake import SetAside

    Intake(redis_client, keys, 1, 100).publish(
        [{"event_type": "click", "account_id": 1, "list_id": db, "id": f"s{db}-{n}",
          "event_date": "2026-01-01T00:00:00Z"} for db in range(1, 9) for n in range(2)])
    ((entry_id, fields),) = redis_client.xrange(keys.intake(0))  # type: ignore[misc]
    redis_client.delete(keys.intake(0))
    redis_client.xadd(keys.intake_unreadable, {**fields, b"_partition": b"0",
                                               b"_entry": entry_id, b"_error": b"x"})
    redis_client.hset(keys.config, "partitions", 4)  # the engine restarted with 4
    assert SetAside(redis_client, keys).requeue(partitions=4) == 1
    placed: dict[str, int] = {}
    for n in range(4):
        for _, entry in redis_client.xrange(keys.intake(n)):  # type: ignore[union-attr]
            placed.update((e.id or "", n) for e in decode_entry(entry))
    assert len(placed) == 16 and redis_client.xlen(keys.intake_unreadable) == 0
    assert all(placed[f"s{db}-{n}"] == partition_of(1, db, 4)
               for db in range(1, 9) for n in range(2))
    assert len(set(placed.values())) > 1  # the databases of this entry part ways
    assert redis_client.hget(keys.engine_stats, "entries_requeued") == b"1"


def test_health_shows_a_worker_whose_every_round_fails_as_waiting_and_why(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Rounds that keep failing (a bug, a damaged key): after FAILING_ROUNDS in a row
    the worker is no longer counted as running, and health says why; its next round
    that passes counts it as running again."""
    import engine.health as health
    from engine.health import engine_health

    monkeypatch.setattr(health, "FAILING_ROUNDS", 3)
    redis_client.hset(keys.config, "partitions", 1)
    cfg = one_partition(settings)
    Intake(redis_client, keys, 1, 1000).ensure_groups()
    partition = PartitionWorker(cfg, redis_client, 0, InProcessSender())
    retry = RetryWorker(cfg, redis_client, InProcessSender())
    broken = {"on": True}
    for worker in (partition, retry):
        step = worker.step

        def failing(*args: Any, _step: Any = step, **kwargs: Any) -> Any:
            if broken["on"]:
                raise ValueError("the round's key holds the wrong kind of value")
            return _step(*args, **kwargs)

        monkeypatch.setattr(worker, "step", failing)
    why = ("every round fails (3 or more in a row), the last with ValueError: the round's "
           "key holds the wrong kind of value")
    with caplog.at_level(logging.ERROR, logger="hookray"), running([partition, retry]):
        assert wait_for(lambda: engine_health(redis_client, keys)["retry_waiting"], 10)
        assert wait_for(lambda: engine_health(redis_client, keys)["partitions"]["waiting"], 10)
        shown = engine_health(redis_client, keys)
        assert shown["partitions"]["running"] == 0 and shown["retry_running"] is True
        assert shown["partitions"]["waiting"] == [{"partition": 0, "reason": why}]
        assert shown["retry_waiting"] == why
        broken["on"] = False
        assert wait_for(lambda: engine_health(redis_client, keys) == {
            "partitions": {"expected": 1, "running": 1, "waiting": [], "stopped": []},
            "retry_running": True, "retry_waiting": None}, 10)
    logged = [r.getMessage() for r in caplog.records if r.name == "hookray"]
    assert "partition 0: a round failed" in logged and "retry worker: a round failed" in logged


def test_failed_deliveries_and_dead_letters_are_logged_per_hook_once_a_minute(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination that fails every batch: the log names the hook, its account and
    target kind, how many messages failed and were dead-lettered, and the last error
    (its secrets scrubbed) at once, then at most once a minute per worker, not one
    line per batch."""
    import engine.failurelog

    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    created = HookRegistry(redis_client, keys).create(hook(
        target={"http_batch": {"url": "http://127.0.0.1:9/x", "max_batch_size": 5,
                               "flush_timeout_sec": 0.01,
                               "headers": {"X-Key": "s3cret-key"}}}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender(hold=True)
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    failure = Outcome(ok=False, error="Rejected", detail="HTTP 403 bad key s3cret-key")
    clock = [1000.0]
    monkeypatch.setattr(engine.failurelog.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="hookray"):
        for n in range(3):  # three batches fail, within the same minute
            intake.publish(clicks(5, list_id=n + 1))
            run_until(worker, lambda: len(sender.held) == 1)
            sender.done.append((sender.held.pop(), failure))
            clock[0] += 1
        run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
        said = [r.getMessage() for r in caplog.records if "message(s) failed" in r.getMessage()]
        assert said == [f"partition 0: hook {created.id} (account 1, http_batch): 5 message(s) "
                        f"failed, 5 dead-lettered since the last such line; last error: "
                        f"Rejected: HTTP 403 bad key {'*' * 10}"]
        clock[0] += 60  # a minute later, the other two batches in one line
        worker.step(block_ms=10)
        said = [r.getMessage() for r in caplog.records if "message(s) failed" in r.getMessage()]
        assert len(said) == 2 and "10 message(s) failed, 10 dead-lettered" in said[1]
    assert Stats(redis_client, keys).get(created.id or 0)["dead_lettered"] == 15
