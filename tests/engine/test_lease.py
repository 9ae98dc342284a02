"""engine/lease.py against the real Redis: one engine's claim on a REDIS_PREFIX."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from engine import lease as lease_module
from engine.api import public_reason
from engine.errors import ConfigError, PrefixTaken
from engine.keys import Keys
from engine.lease import EngineLease, Holding, Renewer
from tests.services import wait_for

ABOUT = {"host": "box-a", "pid": 41, "ray": "10.0.0.1:6379", "started": "2026-11-30T05:00:00Z"}


def lease(redis_client: redis.Redis, keys: Keys, ttl: float = 1.0, **about: object
          ) -> EngineLease:
    return EngineLease(redis_client, keys, ttl, about={**ABOUT, **about})


def test_a_free_prefix_is_claimed_with_the_ttl_and_released(
        redis_client: redis.Redis, keys: Keys) -> None:
    mine = lease(redis_client, keys, ttl=5)
    assert mine.claim() is None
    value = redis_client.get(keys.engine)
    assert value is not None and value.startswith(mine.owner.encode() + b" ")
    assert 4000 < redis_client.pttl(keys.engine) <= 5000
    assert mine.release() is True
    assert redis_client.exists(keys.engine) == 0
    assert mine.release() is False  # nothing left to give up


def test_a_held_prefix_names_its_holder_and_is_left_alone(
        redis_client: redis.Redis, keys: Keys) -> None:
    first, second = lease(redis_client, keys, ttl=5), lease(redis_client, keys, host="box-b")
    assert first.claim() is None
    before = redis_client.get(keys.engine)
    holder = second.claim()
    assert holder is not None and holder.about == ABOUT and 0 < holder.expires_ms <= 5000
    assert holder.describe() == ("host box-a, pid 41, Ray cluster 10.0.0.1:6379, "
                                 "started 2026-11-30T05:00:00Z")
    assert second.release() is False  # not its claim: kept
    assert redis_client.get(keys.engine) == before


def test_renewing_keeps_the_claim_past_its_ttl(redis_client: redis.Redis, keys: Keys) -> None:
    mine = lease(redis_client, keys, ttl=1)
    assert mine.claim() is None
    said = redis_client.get(keys.engine)
    renewer = Renewer(EngineLease(redis_client, keys, 1, owner=mine.owner, about={"x": 1}))
    try:
        time.sleep(2.5)
        assert redis_client.get(keys.engine) == said  # renewed, what it says kept
    finally:
        renewer.stop()
    assert not renewer.thread.is_alive()
    # no renewal any more: it lapses
    assert wait_for(lambda: redis_client.exists(keys.engine) == 0, 10)


def test_a_start_waits_for_a_crashed_engines_claim_to_lapse(
        redis_client: redis.Redis, keys: Keys) -> None:
    crashed = lease(redis_client, keys, ttl=0.8)
    assert crashed.claim() is None  # and nothing renews it
    starting = lease(redis_client, keys, ttl=5, host="box-b")
    began = time.monotonic()
    starting.claim_or_wait("p")
    waited = time.monotonic() - began
    assert 0.3 < waited < 10  # waited for the lapse (0.8 s), not for its own TTL
    value = redis_client.get(keys.engine)
    assert value is not None and value.startswith(starting.owner.encode())


def test_a_start_is_refused_while_the_holder_renews(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    running = lease(redis_client, keys, ttl=1)
    assert running.claim() is None
    renewer = Renewer(running)
    try:
        starting = lease(redis_client, keys, ttl=1, host="box-b")
        with caplog.at_level(logging.WARNING, logger="hookray"), \
                pytest.raises(PrefixTaken) as info:
            starting.claim_or_wait("shop")
    finally:
        renewer.stop()
    assert str(info.value) == (
        f"an engine with REDIS_PREFIX 'shop' already runs on this Redis (host box-a, pid 41, "
        f"Ray cluster 10.0.0.1:6379, started 2026-11-30T05:00:00Z): it renewed its claim on "
        f"{keys.engine} while this one waited for it to lapse; stop that engine first, or "
        f"give this engine another REDIS_PREFIX (two engines on one prefix would send every "
        f"message twice)")
    assert "is held by another engine (host box-a" in caplog.text
    value = redis_client.get(keys.engine)
    assert value is not None and value.startswith(running.owner.encode())


def test_a_holder_on_the_same_cluster_is_refused_at_once(
        redis_client: redis.Redis, keys: Keys) -> None:
    assert lease(redis_client, keys, ttl=30).claim() is None
    seen = []

    def same_cluster(holder: object) -> ConfigError:
        seen.append(holder)
        return ConfigError("runs here")

    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"^runs here$"):
        lease(redis_client, keys, host="box-b").claim_or_wait("p", same_cluster)
    assert time.monotonic() - began < 10 and len(seen) == 1  # not the 30 s TTL


def test_a_claim_taken_by_another_engine_is_logged_and_taken_back_when_free(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    mine = lease(redis_client, keys, ttl=1)
    assert mine.claim() is None
    # another engine took the prefix (say Redis lost its keys and it started meanwhile)
    other = lease(redis_client, keys, ttl=1.5, host="box-b")
    redis_client.delete(keys.engine)
    assert other.claim() is None
    with caplog.at_level(logging.ERROR, logger="hookray"):
        renewer = Renewer(mine)
        try:
            assert wait_for(lambda: "another engine holds this engine's REDIS_PREFIX "
                            "claim" in caplog.text, 10)
            assert "(host box-b, pid 41" in caplog.text
            # the other one's claim lapses (1.5 s): renewed as ours again
            assert wait_for(lambda: (redis_client.get(keys.engine) or b"").startswith(
                mine.owner.encode()), 10)
        finally:
            renewer.stop()


def test_an_unreadable_claim_still_refuses(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.set(keys.engine, "f" * 32 + " not json", px=5000)
    holder = lease(redis_client, keys).claim()
    assert holder is not None and holder.about == {}
    assert holder.describe() == "host ?, pid ?"


def test_a_claim_that_never_expires_is_named_not_waited_for(
        redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.set(keys.engine, "f" * 32 + ' {"host": "box-c", "pid": 3}')
    began = time.monotonic()
    with pytest.raises(ConfigError) as info:
        lease(redis_client, keys).claim_or_wait("p")
    assert time.monotonic() - began < 10  # named at once, not waited for
    assert str(info.value) == (
        f"{keys.engine} holds a claim on REDIS_PREFIX 'p' that never expires (host box-c, "
        f"pid 3); no engine writes it so: delete the key if no engine of this prefix runs")


def test_the_renewer_outlives_an_unexpected_error(
        redis_client: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    mine = lease(redis_client, keys, ttl=1)
    assert mine.claim() is None
    renew, calls = mine.renew, []

    def renew_once_broken() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug")
        return renew()

    monkeypatch.setattr(mine, "renew", renew_once_broken)
    with caplog.at_level(logging.ERROR, logger="hookray"):
        renewer = Renewer(mine)
        try:
            assert wait_for(lambda: len(calls) > 5, 10)
            assert renewer.thread.is_alive()
            value = redis_client.get(keys.engine)
            assert value is not None and value.startswith(mine.owner.encode())
        finally:
            renewer.stop()
    assert f"renewing {keys.engine} (or writing the engine's records again) failed" \
        in caplog.text and "ValueError: a bug" in caplog.text


def test_a_worker_waits_only_while_another_engine_holds_the_prefix(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_module, "CHECK_SEC", 0.0)  # look every time
    mine = lease(redis_client, keys, ttl=5)
    holding = Holding(redis_client, keys, mine.owner)
    drops: list[int] = []  # each time the worker drops its work
    kept: list[object] = []

    def check() -> None:
        holding.check(lambda: ["outcome"], kept.extend, lambda: drops.append(holding.losses))

    check()  # nobody's claim (Redis lost it, say): no reason to wait
    assert mine.claim() is None
    check()  # ours
    assert mine.claim() is None
    check()  # renewed: the same claim
    assert drops == []
    redis_client.delete(keys.engine)
    assert lease(redis_client, keys, host="box-b").claim() is None
    with pytest.raises(PrefixTaken) as info:
        check()
    assert drops == [1] and kept == []  # work dropped, outcomes not kept
    assert str(info.value) == (
        f"another engine holds this engine's REDIS_PREFIX claim, the workers wait: "
        f"{keys.engine} is held by host box-b, pid 41, Ray cluster 10.0.0.1:6379, started "
        f"2026-11-30T05:00:00Z; stop one of the two engines")
    # shown without a token: what waits, not where the other engine runs
    assert public_reason(str(info.value)) == (
        "another engine holds this engine's REDIS_PREFIX claim, the workers wait")
    redis_client.delete(keys.engine)
    check()  # free again
    assert mine.claim() is None
    check()  # ours again: the loss was counted when the other claim was seen
    assert drops == [1]
    # the claim lapses and is taken again unseen (the worker could not look): another
    # engine may have held it meanwhile, so the worker drops its work
    redis_client.delete(keys.engine)
    assert mine.claim() is None
    check()
    assert drops == [1, 2]
    # Redis fails the look: outcomes kept to be booked later, nothing dropped
    def down(*args: object) -> None:
        raise redis.ConnectionError("down")

    monkeypatch.setattr(redis_client, "get", down)
    with pytest.raises(redis.ConnectionError):
        check()
    assert kept == ["outcome"] and drops == [1, 2]


def test_a_worker_looks_at_the_claim_at_most_once_a_second(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # the claim module's own clock, moved by the test
    monkeypatch.setattr(lease_module, "time", SimpleNamespace(
        monotonic=lambda: clock[0], sleep=time.sleep, gmtime=time.gmtime,
        strftime=time.strftime))
    holding = Holding(redis_client, keys, "a" * 32)
    redis_client.set(keys.engine, "b" * 32 + " {}", px=5000)
    def check() -> None:
        holding.check(list, lambda outcomes: None, lambda: None)

    with pytest.raises(PrefixTaken):
        check()
    redis_client.delete(keys.engine)
    clock[0] += lease_module.CHECK_SEC * 0.99
    with pytest.raises(PrefixTaken):  # within CHECK_SEC: the last look still holds
        check()
    clock[0] += lease_module.CHECK_SEC * 0.01
    check()


def test_the_renewer_writes_the_records_again_only_while_the_claim_is_its_own(
        redis_client: redis.Redis, keys: Keys) -> None:
    mine, theirs = lease(redis_client, keys, ttl=1), lease(redis_client, keys, ttl=60)
    assert mine.claim() is None
    written: list[int] = []
    # the records written so far, at each renewal that saw another engine's claim
    saw_theirs: list[int] = []
    renew = mine.renew

    def renewing() -> Any:
        holder = renew()
        if holder is not None:
            saw_theirs.append(len(written))
        return holder

    mine.renew = renewing  # type: ignore[method-assign]
    renewer = Renewer(mine)
    renewer.also = lambda: written.append(1)
    try:
        # while the claim is this engine's, each renewal writes the records again
        assert wait_for(lambda: len(written) >= 2, 10)
        # while another engine holds it (this one's lapsed and was taken), none does
        redis_client.set(keys.engine, f"{theirs.owner} {{}}", px=60_000)
        assert wait_for(lambda: len(saw_theirs) >= 3, 10)
        assert len(written) == saw_theirs[0] >= 2
        assert redis_client.get(keys.engine).startswith(theirs.owner.encode())  # type: ignore[union-attr]
    finally:
        renewer.stop()
