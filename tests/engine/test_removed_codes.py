"""An event code removed from EVENT_TYPES_FILE while the intake holds accepted events of
it: such events match no hook (a hook naming the code no longer loads), the rest of
their entries is delivered and the entries are acknowledged, not set aside; the
partition says so once a minute per code, and a start says so when the recorded codes
lose some while the intake holds entries."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis

from engine.catalogue import builtin_catalogue
from engine.dispatch import PartitionWorker
from engine.events import Event
from engine.hooks import parse_hook
from engine.intake import Intake, SetAside
from engine.keys import CONSUMER_GROUP, Keys
from engine.matching import EventColumns, HookIndex, reference_match
from engine.settings import Settings
from engine.stores import HookRegistry, Stats
from tests.integration.test_workers import InProcessSender

PROMO = {"code": "promo_view", "name": "promo", "category": "tracking", "channel": "email"}
BEFORE = builtin_catalogue().extended([dict(PROMO)])  # the catalogue that accepted them
NOW = builtin_catalogue()  # promo_view removed since
LAST = NOW.codes()[-1]  # the catalogue's last code (index len - 1)


def event(code: str, n: int, list_id: int = 1) -> dict[str, Any]:
    return {"event_type": code, "account_id": 1, "list_id": list_id,
            "event_date": "2026-01-01T00:00:00Z", "id": f"{code}-{list_id}-{n}"}




def accepted(r: redis.Redis, keys: Keys, *entries: list[dict[str, Any]]) -> Intake:
    """One partition's intake under the catalogue that knew promo_view, each of
    ``entries`` appended as one intake entry."""
    intake = Intake(r, keys, 1, 1000, BEFORE)
    intake.ensure_groups()
    for events in entries:
        intake.publish(events)
    return intake


def drained(worker: PartitionWorker, r: redis.Redis, keys: Keys, rounds: int = 40) -> None:
    for _ in range(rounds):
        worker.step(block_ms=10)
        if not r.xlen(keys.intake(0)) and not worker.entry_left and not worker.settling:
            return
    raise AssertionError("the intake was not drained")


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_an_event_of_a_code_the_catalogue_lacks_is_columned_apart_and_matches_no_hook(
        ) -> None:
    events = [Event(event_type=code, event_date="2024-01-01T00:00:00Z", account_id=1,
                    list_id=10) for code in ("click", "promo_view", LAST, "promo_view")]
    cols = EventColumns.from_events(events, NOW)
    assert cols.event_type.tolist()[0] == NOW.index("click")
    assert cols.event_type.tolist()[2] == NOW.index(LAST)
    # no catalogue index, and none a hook could list
    assert cols.event_type.tolist()[1] == cols.event_type.tolist()[3] < 0
    assert dict(cols.unknown_types) == {"promo_view": 2}
    assert not EventColumns.from_events(events[:1], NOW).unknown_types
    # a hook of every code, unrestricted otherwise, and one of the last code only
    hooks = [parse_hook({"name": name, "active": True, "account_id": 1, "actions": actions,
                         "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}, NOW)
             for name, actions in (("all", NOW.codes()), ("last", [LAST]))]
    found = {pos: idx.tolist() for pos, idx in HookIndex.compile(hooks, NOW).match(cols).items()}
    assert found == {0: [0, 2], 1: [2]}
    assert {pos: idx.tolist() for pos, idx in reference_match(hooks, cols, NOW).items()} == found


def test_an_entry_with_an_event_of_a_removed_code_is_delivered_and_acknowledged(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """The review's case: one entry of click, promo_view, click; promo_view removed
    since. The clicks are delivered, the entry acknowledged, nothing set aside; said
    once a minute per code, with how many such events came."""
    caplog.set_level(logging.WARNING, "hookray")
    cfg = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys, NOW)
    clicks = registry.create({"name": "clicks", "active": True, "account_id": 1,
                              "actions": ["click"], "target": {"http_batch": {
                                  "url": "http://127.0.0.1:9/x", "max_batch_size": 10,
                                  "flush_timeout_sec": 0.01}}})
    accepted(redis_client, keys, [event("click", 1), event("promo_view", 1), event("click", 2)])
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender, NOW)
    drained(worker, redis_client, keys)
    assert sum(d.count for d in sender.transport.sent) == 2
    assert not SetAside(redis_client, keys).page()
    assert redis_client.xpending(keys.intake(0), CONSUMER_GROUP)["pending"] == 0
    counts = Stats(redis_client, keys).get(clicks.id or 0)
    assert (counts["accepted"], counts["delivered"]) == (2, 2)
    (line,) = said(caplog, "promo_view")
    assert line.startswith("partition 0: 1 event(s) of event type 'promo_view'")
    assert "matched no hook" in line

    # more within the minute: processed, counted, not said again
    caplog.clear()
    accepted(redis_client, keys, [event("promo_view", 2), event("promo_view", 3),
                                  event("click", 3)])
    drained(worker, redis_client, keys)
    assert not said(caplog, "promo_view")
    worker.dispatcher.unknown_said.every = 0.0  # the minute passed
    accepted(redis_client, keys, [event("promo_view", 4)])
    drained(worker, redis_client, keys)
    (line,) = said(caplog, "promo_view")
    assert line.startswith("partition 0: 3 event(s) of event type 'promo_view'")
    assert sum(d.count for d in sender.transport.sent) == 3
    assert not SetAside(redis_client, keys).page() and redis_client.xlen(keys.intake(0)) == 0


def test_routing_keys_of_a_round_with_a_removed_code_are_each_events_own(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Routing keys by columns number (list, event type) pairs by the catalogue's size:
    a removed code's event in list 2 must not lend its key to an event of the
    catalogue's last code in list 1."""
    cfg = settings.model_copy(update={"PARTITIONS": 1})
    HookRegistry(redis_client, keys, NOW).create({
        "name": "last", "active": True, "account_id": 1, "actions": [LAST],
        "target": {"rabbitmq_exchange": {"host": "127.0.0.1", "exchange": "x",
                                         "type": "topic"}}})
    accepted(redis_client, keys, [event("promo_view", 1, list_id=2), event(LAST, 1, list_id=1)])
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender, NOW)
    drained(worker, redis_client, keys)
    (delivery,) = sender.transport.sent
    assert delivery.keys == [f"1.{LAST}"]
    assert not SetAside(redis_client, keys).page()


def test_a_start_without_codes_the_intake_still_holds_events_of_says_so(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hookray")
    first = accepted(redis_client, keys)
    first.record_partitions()
    first.keep_records()
    first.publish([event("promo_view", 1), event("click", 1)])
    assert not said(caplog, "promo_view")
    # the next start, promo_view removed from EVENT_TYPES_FILE
    second = Intake(redis_client, keys, 1, 1000, NOW)
    second.record_partitions()
    second.keep_records()
    (line,) = said(caplog, "promo_view")
    assert "'promo_view'" in line and "holds 1 entries (0 set aside)" in line
    caplog.clear()
    second.keep_records()  # the codes recorded are this engine's now: nothing to say
    assert not said(caplog, "promo_view")
    # removed while the intake is empty: nothing to say either
    redis_client.delete(keys.intake(0))
    first.keep_records()
    second.keep_records()
    assert not said(caplog, "promo_view")


def test_a_code_added_is_not_warned_about(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hookray")
    accepted(redis_client, keys, [event("click", 1)])
    Intake(redis_client, keys, 1, 1000, NOW).keep_records()
    Intake(redis_client, keys, 1, 1000, BEFORE).keep_records()  # promo_view added
    assert not said(caplog, "are not in this engine's event types")
