"""Records in Redis damaged from outside the engine (written by hand, by another
version, cut short): each one affects what it holds, and is named; nothing else waits
on it, and nothing delivers unseen."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.errors import HookError
from engine.keys import Keys
from engine.messages import message_id
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import ContentStore, HookRegistry, ProfileStore, RetryStore, Stats
from engine.transports.base import Delivery
from tests.integration.test_workers import (
    InProcessSender,
    clicks,
    hook,
    one_intake,
    one_partition,
    run_until,
)

pytestmark = pytest.mark.integration


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "hookray" and r.levelno == logging.WARNING]


# --- profiles and content ----------------------------------------------------------


@pytest.mark.parametrize("kind, damaged", [
    ("profile", b"email=a@x"), ("profile", b"[1, 2]"), ("profile", b'"a@x"'),
    ("profile", b"[" * 100_000), ("content", b"not json"), ("content", b"[1]")],
    ids=["profile-not-json", "profile-list", "profile-string", "profile-too-deep",
         "content-not-json", "content-list"])
def test_a_damaged_profile_or_content_record_is_taken_as_absent_holding_back_nothing(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture, kind: str, damaged: bytes) -> None:
    """As an unknown profile or expired content, with a warning naming the key (and
    field): the other events of the entry, and the hooks that read neither, are
    delivered (the whole entry was set aside after 5 failed rounds, for every hook)."""
    registry = HookRegistry(redis_client, keys)
    reading = registry.create(hook(name="reads", custom_data={"fields": ["email"]},
                                   send_content=True))
    other = registry.create(hook(name="other"))
    ProfileStore(redis_client, keys).upsert(1, {"p1": {"email": "a@x"}, "p2": {"email": "b@x"}})
    ContentStore(redis_client, keys, 3600).put(1, {"s1": {"subject": "one"},
                                                   "s2": {"subject": "two"}})
    if kind == "profile":
        redis_client.hset(keys.profiles(1), "p1", damaged)
    else:
        redis_client.set(keys.content(1, "s1"), damaged)
    events = [{**e, "profile_id": p, "send_id": s}
              for e, p, s in zip(clicks(3), ("p1", "p2", "p1"), ("s1", "s2", "s2"), strict=True)]
    intake = one_intake(redis_client, keys, 1000)
    intake.publish(events)
    sender = InProcessSender()
    worker = PartitionWorker(one_partition(settings), redis_client, 0, sender)
    with caplog.at_level(logging.WARNING, logger="hookray"):
        run_until(worker, lambda: sum(d.count for d in sender.transport.sent) == 6)
    assert redis_client.xlen(keys.intake_unreadable) == 0
    got = {msg["hook_message_id"]: msg for d in sender.transport.sent
           for msg in map(json.loads, d.parts)}
    assert all(message_id(other.id, e["id"]) in got for e in events)
    read = [got[message_id(reading.id, e["id"])] for e in events]
    emails = [m.get("custom_data", {}).get("email") for m in read]
    subjects = [m.get("content", {}).get("subject") for m in read]
    if kind == "profile":
        assert emails == [None, "b@x", None] and subjects == ["one", "two", "two"]
        where = f"{keys.profiles(1)} field 'p1'"
    else:
        assert emails == ["a@x", "b@x", "a@x"] and subjects == [None, "two", "two"]
        where = keys.content(1, "s1")
    (said,) = warnings_of(caplog)
    assert said.startswith(f"{kind} record {where} cannot be read ("), said
    assert "taken as absent" in said


def test_unreadable_records_are_warned_of_at_most_once_a_minute_with_a_count(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """A partition reads damaged content in every round that needs it: one warning a
    minute per kind of record, saying how many more were left out meanwhile."""
    profiles, content = ProfileStore(redis_client, keys), ContentStore(redis_client, keys, 60)
    redis_client.hset(keys.profiles(1), mapping={"a": "x", "b": "[]", "ok": '{"e": 1}'})
    redis_client.set(keys.content(1, "s"), "x")
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert profiles.get_many({1: ["a", "b", "ok"]}) == {(1, "ok"): {"e": 1}}
        assert content.get_many([(1, "s")]) == {}  # another kind: said too
        assert profiles.get_many({1: ["a"]}) == {}
        assert len(warnings_of(caplog)) == 2
        profiles._unreadable.said_at -= 61  # a minute later
        assert profiles.get_many({1: ["b"]}) == {}
    said = warnings_of(caplog)
    assert len(said) == 3
    assert said[0].startswith(f"profile record {keys.profiles(1)} field 'a' cannot be read "
                              "(not JSON: ")
    assert said[1].startswith(f"content record {keys.content(1, 's')} cannot be read")
    assert said[2].startswith(f"profile record {keys.profiles(1)} field 'b' cannot be read "
                              "(JSON, but not an object: a list)")
    assert said[2].endswith("(2 more profile record(s) left out since the last such warning)")


# --- stored hooks ----------------------------------------------------------------------


def _store(r: redis.Redis, keys: Keys, field: str, record: dict[str, Any]) -> None:
    r.hset(keys.hooks, field, json.dumps(record))
    r.incr(keys.hooks_version)


@pytest.mark.parametrize("change, reason", [
    ({"id": None}, "holds id null: its record is damaged"),
    ({"id": 1}, "holds id 1: its record is damaged"),
    ({"id": "2"}, 'holds id "2": its record is damaged'),
    ({"id": True}, "holds id true: its record is damaged"),
    ("no id", "has no id: its record is damaged")])
def test_a_stored_hook_whose_id_is_not_its_own_is_damaged(
        redis_client: redis.Redis, keys: Keys, change: Any, reason: str) -> None:
    """A record without its id, or with another one (a record copied by hand): both
    would load as one hook (batches merged, counted twice), or one without an id
    failed every entry it matched (set aside), and its re-sends died as if the hook
    were deleted. The engine waits on it, named, as on any damaged record; the
    listings keep it apart, and it can still be deleted."""
    registry = HookRegistry(redis_client, keys)
    first, second = registry.create(hook(name="one")), registry.create(hook(name="two"))
    assert (first.id, second.id) == (1, 2)
    record = second.to_storage()
    if change == "no id":
        del record["id"]
    else:
        record.update(change)
    _store(redis_client, keys, "2", record)
    message = f"stored hook 2 {reason} (the record of a hook holds its id, 2)"
    with pytest.raises(HookError) as caught:
        registry.load()
    assert str(caught.value) == message
    with pytest.raises(HookError, match="stored hook 2 "):
        registry.get(2)
    with pytest.raises(HookError, match="stored hook 2 "):
        registry.set_active(2, False)
    assert registry.listing(None) == ([first], [(2, message)])
    assert registry.listing(1) == ([first], [(2, message)])
    assert registry.stored_ids() == [1, 2] and registry.owner(2) == 1
    registry.delete(2)
    assert registry.load()[1] == [first]


@pytest.mark.parametrize("field", ["abc", "007", "-3", "2 "])
def test_a_stored_hook_under_a_field_that_is_no_hook_id_is_damaged(
        redis_client: redis.Redis, keys: Keys, field: str) -> None:
    """No tool lists, gets or deletes a hook stored under such a field (they look
    hooks up by their decimal id): it delivered unseen. Loading it names it and how
    to remove it; the listings and the ids still leave it out (no id to show)."""
    registry = HookRegistry(redis_client, keys)
    visible = registry.create(hook(name="visible"))
    _store(redis_client, keys, field, {**visible.to_storage(), "name": "hidden", "id": 7})
    with pytest.raises(HookError) as caught:
        registry.load()
    assert str(caught.value).startswith(f"stored hook {field!r} is damaged: that field of "
                                        f"{keys.hooks} is no hook id")
    assert f"HDEL {keys.hooks}" in str(caught.value)
    assert registry.listing(None) == ([visible], [])
    assert registry.stored_ids() == [visible.id]
    redis_client.hdel(keys.hooks, field)
    assert registry.load()[1] == [visible]


def test_workers_wait_on_a_stored_hook_without_its_id_and_lose_nothing(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A partition waits (its entries kept, not set aside after failed rounds, no hook's
    messages sent meanwhile); the retry worker waits too (its re-sends were killed as
    those of a deleted hook, and the hook marked deleted, while it was stored)."""
    cfg = one_partition(settings)
    registry = HookRegistry(redis_client, keys)
    fine, idless = registry.create(hook(name="fine")), registry.create(hook(name="idless"))
    record = idless.to_storage()
    del record["id"]
    _store(redis_client, keys, str(idless.id), record)
    intake = one_intake(redis_client, keys, 1000)
    intake.publish(clicks(2))
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=idless.id or 0, account_id=1,
                            kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    retry_worker = RetryWorker(cfg, redis_client, sender)
    for _ in range(10):
        with pytest.raises(HookError, match=f"stored hook {idless.id} has no id"):
            worker.step(block_ms=10)
        with pytest.raises(HookError, match=f"stored hook {idless.id} has no id"):
            retry_worker.step()
    assert not sender.transport.sent and redis_client.xlen(keys.intake_unreadable) == 0
    assert retry.pending() == 1 and not retry.dead_letters()
    assert not redis_client.exists(keys.hooks_gone)
    _store(redis_client, keys, str(idless.id), idless.to_storage())  # set right
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sorted(d.hook_id for d in sender.transport.sent) == [fine.id, idless.id]
    retry_worker.step()
    assert retry.pending() == 0 and not retry.dead_letters()


@pytest.mark.parametrize("change, hint", [
    ({"actions": ["no_such_event"]}, " (was EVENT_TYPES_FILE changed?): invalid hook: actions"),
    ({"retry_policy": {"times": 3}}, " (written by another hookray version?): invalid hook: "
                                     "retry_policy: Extra inputs are not permitted"),
    ({"target": {"sqs": {"queue": "q"}}}, " (written by another hookray version?): invalid "
                                          "hook: target.sqs"),
    ({"active": "yes"}, ": invalid hook: active: Input should be a valid boolean")])
def test_why_a_stored_hook_no_longer_validates_is_hinted_by_its_cause(
        redis_client: redis.Redis, keys: Keys, change: dict[str, Any], hint: str) -> None:
    """Every error suggested EVENT_TYPES_FILE: a key or target kind of another version
    (rolled back from) and a value edited by hand too."""
    registry = HookRegistry(redis_client, keys)
    created = registry.create(hook())
    _store(redis_client, keys, str(created.id), {**created.to_storage(), **change})
    with pytest.raises(HookError) as caught:
        registry.load()
    message = str(caught.value)
    assert message.startswith(f"stored hook {created.id} no longer validates{hint}"), message
    assert ("EVENT_TYPES_FILE" in message) == ("EVENT_TYPES_FILE" in hint)
    assert ("another hookray version" in message) == ("another hookray version" in hint)


# --- the retry schedule ------------------------------------------------------------


def test_a_damaged_hand_over_count_stalls_no_re_send(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """One ``{p}:retry:unanswered`` field that is no integer failed the count of every
    re-send claimed with it: the group was handed back, due again together, none ever
    sent. That one counts from 1 again, with a warning naming it; the others go on."""
    created = HookRegistry(redis_client, keys).create(hook())
    retry = RetryStore(redis_client, keys)
    ids = [f"d{n}" for n in range(5)]
    for delivery_id in ids:
        retry.schedule(Delivery(id=delivery_id, hook_id=created.id or 0, account_id=1,
                                kind="http_batch", parts=[b"{}"]), due_ms=0, error="HTTP 500")
    redis_client.hset(keys.retry_unanswered, mapping={"d2": "x", "d3": 2**63 - 1})
    sender = InProcessSender(hold=True)
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert RetryWorker(settings, redis_client, sender).step() == 5
    assert sorted(d.id for d in sender.held) == ids
    assert redis_client.hgetall(keys.retry_unanswered) == {i.encode(): b"1" for i in ids}
    (said,) = warnings_of(caplog)  # d3's too, in the count of the next one
    assert said.startswith(f"hand-over count record {keys.retry_unanswered} field d2 cannot "
                           "be read (") and "not an integer" in said, said
    assert "counted again from 1" in said
    # a count that can be made is made as before
    assert retry.handed_over(["d0", "d9"]) == [2, 1]


def test_a_damaged_hand_over_count_fails_no_hand_back(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A worker stopping takes back its hand-overs: one count damaged meanwhile (no
    integer, or one HINCRBY cannot take down) failed the script for every one handed
    back with it, so their stop counted as a crash. It is dropped, the others taken
    back."""
    retry = RetryStore(redis_client, keys)
    assert retry.handed_over(["a", "a", "b", "c", "d"]) == [1, 2, 1, 1, 1]
    redis_client.hset(keys.retry_unanswered, mapping={"b": "x", "c": "1.5", "d": "nan",
                                                      "e": "9" * 30})
    retry.handed_back(["b", "a", "c", "d", "e"])
    assert redis_client.hgetall(keys.retry_unanswered) == {b"a": b"1"}


def test_a_hand_over_count_on_a_key_of_another_type_fails_the_call(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The whole key damaged is no one delivery's: the claimed group is handed back."""
    redis_client.set(keys.retry_unanswered, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        RetryStore(redis_client, keys).handed_over(["d1"])


# --- dead letters of deleted hooks ---------------------------------------------------


def test_a_replayed_letters_deleted_hook_is_marked_in_the_move_itself(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The mark was made after the move, in other round trips: the retry worker's
    sweep between the two found a deleted hook without dead letters and deleted its
    counters. With the sweep run right after the move's script, they stay."""
    api, worker = RetryStore(redis_client, keys), RetryStore(redis_client, keys)
    registry = HookRegistry(redis_client, keys)
    kept = registry.create(hook())
    gone_id = 7
    for delivery_id, hook_id in (("d1", gone_id), ("d2", kept.id or 0)):
        d = Delivery(id=delivery_id, hook_id=hook_id, account_id=1, kind="http_batch",
                     parts=[b"{}"] * 3)
        api.schedule(d, 0, "boom")
        worker.kill(d, "dead")
    redis_client.hset(keys.stats(gone_id), mapping={"accepted": 1000, "delivered": 997,
                                                    "retried": 15})
    counts = {"accepted": 1000, "delivered": 997, "retried": 15}
    hour_ago = int(time.time() * 1000) - 3_600_000
    redis_client.zadd(keys.hooks_gone, {str(gone_id): hour_ago})  # deleted an hour ago
    swept: list[int] = []
    script = api._replay

    def then_the_sweep(*args: Any, **kwargs: Any) -> Any:
        reply = script(*args, **kwargs)
        swept.append(worker.forget_gone_stats(16 * 60_000))
        return reply

    api._replay = then_the_sweep  # type: ignore[assignment]
    assert api.replay(["d1", "d2"]) == 2
    assert swept == [0]
    assert {k: v for k, v in Stats(redis_client, keys).get(gone_id).items() if k in counts} \
        == counts
    # marked now, by Redis' clock; the stored hook is not marked
    [(member, score)] = cast(list[tuple[bytes, float]],
                             redis_client.zrange(keys.hooks_gone, 0, -1, withscores=True))
    assert member == str(gone_id).encode()
    assert abs(score - api._redis_ms()) < 60_000
    # a discard marks nothing: the counters go once the hook has no letter left
    api._replay = script
    for d in worker.claim_due(10, now=10**15):
        worker.kill(d, "dead again")
    redis_client.zadd(keys.hooks_gone, {str(gone_id): hour_ago})
    assert api.discard(["d1", "d2"]) == 2
    assert redis_client.zscore(keys.hooks_gone, str(gone_id)) == hour_ago
    assert worker.forget_gone_stats(16 * 60_000) == 1


def test_a_kill_that_a_damaged_index_fails_is_not_made_in_part_nor_counted_again(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A booking is not undone by a command that fails (a hook's dead-letter index
    damaged from outside: of another type), and one that failed is sent again: the
    kill's delivered count was made at each try, and the delivery left the schedule
    without reaching the dead letters. The writes that can fail come first now."""
    store = RetryStore(redis_client, keys)
    delivery = Delivery(id="d1", hook_id=5, account_id=1, kind="http_batch",
                        parts=[b"{}"] * 3, message_ids=["m1", "m2", "m3"])
    store.schedule(delivery, due_ms=0, error="HTTP 500")
    redis_client.set(keys.dead_of_hook(5), "damaged")
    for _ in range(4):  # as the retry worker tries a failed booking again
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            store.kill(delivery, "HTTP 500", delivered=10, once=(keys.booked("t"), "tok"))
    assert redis_client.zscore(keys.retry, "d1") is not None  # still in the schedule
    assert Stats(redis_client, keys).get(5)["delivered"] == 0
    redis_client.delete(keys.dead_of_hook(5))  # repaired
    store.kill(delivery, "HTTP 500", delivered=10, once=(keys.booked("t"), "tok"))
    assert redis_client.zscore(keys.retry, "d1") is None
    assert [d.id for d in store.dead_letters()] == ["d1"]
    counts = Stats(redis_client, keys).get(5)
    assert (counts["delivered"], counts["dead_lettered"]) == (10, 3)


@pytest.mark.parametrize("which", ["hooks", "names", "profiles"])
def test_a_version_key_that_holds_no_number_is_named(
        which: str, redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Every round failed on a bare ``invalid literal for int() with base 10: b'abc'``:
    the error names the key now, and how to mend it."""
    from engine.errors import ConfigError

    key = {"hooks": keys.hooks_version, "names": keys.names_version,
           "profiles": keys.profiles_version}[which]
    redis_client.set(key, "abc")
    worker = PartitionWorker(one_partition(settings), redis_client, 0, InProcessSender())
    with pytest.raises(ConfigError, match=f"^{key} holds 'abc', not a version number "):
        worker.step(block_ms=10)
    redis_client.set(key, 1_000_000)  # as the error says: the next round goes on
    worker.step(block_ms=10)
    assert worker.dispatcher.versions[which] == 1_000_000
