"""An engine's claim lapses, an engine with another PARTITIONS takes it and records its
count, then stops; the first engine's renewer takes the claim back. Its own count is
recorded again (moved back while the other count's streams are empty), so its
producers are accepted again; meanwhile, and for as long as those streams hold
events, its partition workers wait, saying why (health is not green). Without Ray:
EngineLease, Renewer, Intake and PartitionWorker driven directly on the real Redis."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.errors import ConfigError, PrefixTaken
from engine.health import engine_health
from engine.intake import Intake
from engine.keys import Keys
from engine.lease import EngineLease, Renewer
from engine.partitioning import partition_of
from engine.settings import Settings
from tests.integration.test_workers import InProcessSender
from tests.services import wait_for

pytestmark = pytest.mark.integration




def click(list_id: int) -> dict[str, Any]:
    return {"event_type": "click", "account_id": 1, "list_id": list_id,
            "event_date": "2026-01-01T00:00:00Z"}


def started(r: redis.Redis, keys: Keys, partitions: int, ttl: float = 30) -> tuple[
        EngineLease, Intake]:
    """An engine's start (Engine._start_actors without Ray): the claim, then records."""
    lease = EngineLease(r, keys, ttl, about={"host": f"engine-{partitions}"})
    assert lease.claim() is None
    intake = Intake(r, keys, partitions, 1000)
    intake.ensure_groups()
    intake.record_partitions()
    intake.keep_records()
    return lease, intake


def workers(settings: Settings, r: redis.Redis, n: int, owner: str) -> list[PartitionWorker]:
    cfg = settings.model_copy(update={"PARTITIONS": n})
    return [PartitionWorker(cfg, r, p, InProcessSender(), owner=owner) for p in range(n)]


def look_again(ws: list[PartitionWorker]) -> None:
    for w in ws:
        assert w.holding is not None
        w.holding.looked = -3600.0


@contextmanager
def renewing(lease: EngineLease, intake: Intake) -> Iterator[Renewer]:
    """The driver's renewer, as Engine._start_actors sets it up."""
    renewer = Renewer(lease)
    renewer.also = intake.record_again
    try:
        yield renewer
    finally:
        renewer.stop()


def recorded(r: redis.Redis, keys: Keys) -> bytes | None:
    return r.hget(keys.config, "partitions")  # type: ignore[return-value]


def test_a_claim_regained_records_this_engines_count_again(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The review's case: A runs with 4; its claim lapses; B starts with 2 (A's streams
    are empty, so it records 2) and stops; A takes the claim back."""
    lease_a, intake_a = started(redis_client, keys, 4, ttl=1)
    ws = workers(settings, redis_client, 4, lease_a.owner)
    for w in ws:
        w.step(block_ms=1)
    redis_client.delete(keys.engine)  # A's claim lapsed (its driver cut off from Redis)
    lease_b, _ = started(redis_client, keys, 2)
    assert recorded(redis_client, keys) == b"2"
    look_again(ws)
    with pytest.raises(PrefixTaken, match="another engine holds"):
        ws[0].step(block_ms=1)
    assert lease_b.release()
    # the claim is free, and the record B's: A's workers wait, saying why
    look_again(ws)
    for w in ws:
        with pytest.raises(PrefixTaken, match="the engine's recorded PARTITIONS is 2, not "
                                              "this engine's 4, the workers wait: "):
            w.step(block_ms=1)
    stop = threading.Event()
    thread = threading.Thread(target=ws[0].run, args=(stop,))
    thread.start()
    try:  # health is not green: partition 0 waits, 1 does not run (of the 2 recorded)
        assert wait_for(lambda: engine_health(redis_client, keys)["partitions"]["waiting"], 5)
        health = engine_health(redis_client, keys)["partitions"]
    finally:
        stop.set()
        thread.join(15)
    assert (health["expected"], health["running"], health["stopped"]) == (2, 0, [1])
    (waiting,) = health["waiting"]
    assert waiting["partition"] == 0
    assert waiting["reason"].startswith("the engine's recorded PARTITIONS is 2, not this "
                                        "engine's 4, the workers wait: another engine ran")
    with pytest.raises(ConfigError, match="PARTITIONS is 4 here but the engine"):
        intake_a.publish([click(1)])

    with renewing(lease_a, intake_a):  # A's renewer takes the free claim back
        assert wait_for(lambda: recorded(redis_client, keys) == b"4", 5)
    look_again(ws)
    for w in ws:
        w.step(block_ms=1)
    events = [click(n) for n in range(1, 40)]
    intake_a.publish(events)
    busy = {partition_of(1, n, 4) for n in range(1, 40)}
    assert len(busy) > 2  # streams B's count never read
    for w in ws:  # every stream read, in one round (no hook: nothing to send)
        held = redis_client.xlen(keys.intake(w.partition))
        assert w.step(block_ms=1) == held
    assert [redis_client.xlen(keys.intake(n)) for n in range(4)] == [0, 0, 0, 0]


def test_a_claim_regained_while_the_other_counts_streams_hold_events_keeps_waiting(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    """B ran with 8 and left events in its streams (a clean stop does not drain): A's
    count cannot be recorded while they are there; A's workers wait, the renewer says
    why; once they are gone, the next renewal records A's count."""
    caplog.set_level(logging.ERROR, "hookray")
    lease_a, intake_a = started(redis_client, keys, 4, ttl=1)
    ws = workers(settings, redis_client, 4, lease_a.owner)
    redis_client.delete(keys.engine)
    lease_b, intake_b = started(redis_client, keys, 8)
    intake_b.publish([click(n) for n in range(1, 40)])
    assert any(redis_client.xlen(keys.intake(n)) for n in range(4, 8))
    assert lease_b.release()
    with renewing(lease_a, intake_a):
        assert wait_for(lambda: [r for r in caplog.records
                                 if "cannot write its records again" in r.getMessage()], 5)
        assert recorded(redis_client, keys) == b"8"
        look_again(ws)
        with pytest.raises(PrefixTaken, match="recorded PARTITIONS is 8, not this engine's 4"):
            ws[0].step(block_ms=1)
        (said,) = [r.getMessage() for r in caplog.records
                   if "cannot write its records again" in r.getMessage()]  # once a minute
        assert "PARTITIONS is 4 but the engine ran with 8 and its intake still holds" in said
        for n in range(8):  # B's events delivered (by B, run again with 8)
            redis_client.xtrim(keys.intake(n), maxlen=0)
        assert wait_for(lambda: recorded(redis_client, keys) == b"4", 5)
    look_again(ws)
    for w in ws:
        w.step(block_ms=1)
    intake_a.publish([click(1)])


def test_the_renewer_leaves_the_record_alone_while_another_engine_holds_the_claim(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Another engine's count is replaced only once the claim is this engine's again."""
    lease_a, intake_a = started(redis_client, keys, 4, ttl=1)
    with renewing(lease_a, intake_a):
        assert wait_for(lambda: redis_client.pttl(keys.engine) > 0, 2)
        # B takes the lapsed claim (in one command: the renewer looks every 0.2 s)
        lease_b = EngineLease(redis_client, keys, 30, about={"host": "engine-2"})
        redis_client.set(keys.engine, f"{lease_b.owner} {{}}", px=30_000)
        intake_b = Intake(redis_client, keys, 2, 1000)
        intake_b.ensure_groups()
        intake_b.record_partitions()
        # several renewals of A's, each finding B's claim: B's count stays
        assert not wait_for(lambda: recorded(redis_client, keys) != b"2", 1)
        assert lease_b.release()
        assert wait_for(lambda: recorded(redis_client, keys) == b"4", 5)
        holder = cast(bytes, redis_client.get(keys.engine))
        assert holder.startswith(lease_a.owner.encode())
