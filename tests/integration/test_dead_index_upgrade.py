"""Dead letters kept by a version without the account and hook indexes, also after this
version ran (upgrade, roll back, upgrade again), are indexed: the watermark in
``{p}:dead:indexed`` (real Redis, no Ray)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from engine import stores
from engine.keys import Keys
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import Delivery, pack_delivery

pytestmark = pytest.mark.integration


def letter(delivery_id: str, account: int = 7, hook_id: int = 1) -> Delivery:
    return Delivery(id=delivery_id, hook_id=hook_id, account_id=account, kind="http_batch",
                    parts=[b'{"a":1}'], message_ids=[f"m-{delivery_id}"])


def old_kill(r: redis.Redis, keys: Keys, delivery: Delivery, died: int) -> None:
    """``RetryStore.kill`` of the version before the indexes (``ace6f9f^``): the dead
    letter scored by its worker's clock (``died``), in no index."""
    delivery.last_error = "old version's dead letter"
    with r.pipeline() as pipe:
        pipe.zrem(keys.retry, delivery.id)
        pipe.hdel(keys.retry_payload, delivery.id)
        pipe.hset(keys.dead_payload, delivery.id, pack_delivery(delivery))
        pipe.zadd(keys.dead, {delivery.id: died})
        pipe.hincrby(keys.stats(delivery.hook_id), "dead_lettered", delivery.count)
        pipe.execute()


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
def rolled_back(redis_client: redis.Redis, keys: Keys) -> tuple[int, RetryStore]:
    """This version kept d1 (and marked the index), then an earlier one kept d2, both of
    hook 1 of account 7; returns the hook's id and a store of this version's next run."""
    registry = HookRegistry(redis_client, keys)
    h = registry.create({"name": "h", "active": True, "account_id": 7, "actions": ["click"],
                         "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
    store = RetryStore(redis_client, keys)
    store.kill(letter("d1", hook_id=h.id or 0), "new version's dead letter")
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1"]
    assert redis_client.exists(keys.dead_indexed)
    old_kill(redis_client, keys, letter("d2", hook_id=h.id or 0), redis_ms(redis_client))
    return h.id or 0, RetryStore(redis_client, keys)


def test_an_earlier_versions_dead_letters_written_after_the_mark_are_listed_by_account_and_hook(
        rolled_back: tuple[int, RetryStore]) -> None:
    hook_id, store = rolled_back
    assert [d.id for d in store.dead_letters()] == ["d1", "d2"]
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1", "d2"]
    assert [d.id for d in store.dead_letters(hook_id=hook_id)] == ["d1", "d2"]


def test_an_earlier_versions_dead_letters_are_replayed_and_discarded_with_their_hooks(
        redis_client: redis.Redis, keys: Keys, rolled_back: tuple[int, RetryStore]) -> None:
    hook_id, store = rolled_back
    assert store.replay_all(hook_id=hook_id) == 2
    assert store.dead_letters() == [] and store.pending() == 2
    for d in store.claim_due(10):
        store.kill(d, "HTTP 500")  # dead again, by this version
    assert store.discard_all(account_id=7) == 2
    assert store.dead_letters() == []
    assert Stats(redis_client, keys).get(hook_id)["discarded"] == 2


def test_a_deleted_hook_keeps_its_counters_while_an_earlier_versions_letter_is_left(
        redis_client: redis.Redis, keys: Keys, rolled_back: tuple[int, RetryStore]) -> None:
    hook_id, store = rolled_back
    store.discard(["d1"])
    HookRegistry(redis_client, keys).delete(hook_id)
    assert store.forget_gone_stats(0) == 0  # d2 is still there
    assert Stats(redis_client, keys).get(hook_id)["dead_lettered"] == 2
    store.discard(["d2"])
    assert store.forget_gone_stats(0) == 1
    assert Stats(redis_client, keys).get(hook_id)["dead_lettered"] == 0


def test_an_earlier_versions_mark_has_every_dead_letter_looked_at_again(
        redis_client: redis.Redis, keys: Keys) -> None:
    """``1``, the mark the version before this one set once (read as "indexed"), then
    an earlier version's dead letter: indexed at the first read."""
    store = RetryStore(redis_client, keys)
    store.kill(letter("d1"), "HTTP 500")
    old_kill(redis_client, keys, letter("d2", account=8, hook_id=2), redis_ms(redis_client))
    redis_client.set(keys.dead_indexed, 1)
    fresh = RetryStore(redis_client, keys)
    assert [d.id for d in fresh.dead_letters(account_id=8)] == ["d2"]
    assert [d.id for d in fresh.dead_letters(hook_id=2)] == ["d2"]
    assert float(redis_client.get(keys.dead_indexed) or 0) > 1


def test_the_retry_workers_minute_indexes_what_an_earlier_version_kept_since(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A store that has read (its first pass done) looks again at each
    ``forget_gone_stats`` (the retry worker's minute): a letter kept since by an
    earlier version, its worker's clock behind Redis' (within DEAD_INDEX_SKEW_MS), is
    indexed then; reads in between use the pass already made."""
    store = RetryStore(redis_client, keys)
    store.kill(letter("d1"), "HTTP 500")
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1"]
    old_kill(redis_client, keys, letter("d2"),
             redis_ms(redis_client) - 30_000)  # within DEAD_INDEX_SKEW_MS
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1"]  # not yet
    store.forget_gone_stats(10**9)
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d2", "d1"]
    assert redis_client.zscore(keys.dead_of_hook(1), "d2") == redis_client.zscore(keys.dead,
                                                                                  "d2")


def test_a_pass_reads_only_the_dead_letters_after_the_mark(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Each process's first read makes a pass, reading only the dead letters that died
    after the mark (not every one), and moves the mark to its start less
    DEAD_INDEX_SKEW_MS; a mark already later (another pass, a clock ahead) stays."""
    now = redis_ms(redis_client)
    with redis_client.pipeline(transaction=False) as pipe:
        for n in range(300):  # indexed long ago
            d = letter(f"a{n:03}")
            pipe.hset(keys.dead_payload, d.id, pack_delivery(d))
            for key in (keys.dead, keys.dead_of_account(7), keys.dead_of_hook(1)):
                pipe.zadd(key, {d.id: now - 3_600_000 + n})
        pipe.set(keys.dead_indexed, now - 600_000)
        pipe.execute()
    old_kill(redis_client, keys, letter("b1"), now - 1000)  # after the mark
    store = RetryStore(redis_client, keys)
    read: list[list[str]] = []
    hmget = store.r.hmget

    def counting(name: str, fields: Any, *args: Any) -> Any:
        if name == keys.dead_payload:
            read.append([f if isinstance(f, str) else f.decode() for f in fields])
        return hmget(name, fields, *args)

    store.r.hmget = counting  # type: ignore[method-assign,assignment]
    before = redis_ms(redis_client)
    assert [d.id for d in store.dead_letters(account_id=7, limit=1000)][-1] == "b1"
    assert read[0] == ["b1"]  # the pass; then the listing's own reads
    mark = float(redis_client.get(keys.dead_indexed) or 0)
    skew = stores.DEAD_INDEX_SKEW_MS
    assert before - skew <= mark <= redis_ms(redis_client) - skew
    redis_client.set(keys.dead_indexed, now + 3_600_000)  # a later pass's
    store.forget_gone_stats(10**9)
    assert redis_client.get(keys.dead_indexed) == str(now + 3_600_000).encode()


def test_a_minutes_pass_reads_no_payload_of_what_this_versions_kill_indexed(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A destination down makes many dead letters a minute, each indexed by the kill
    that made it: the retry worker's pass each minute reads the payloads of an
    earlier version's letters only, and forgets the kills below its mark."""
    store = RetryStore(redis_client, keys)
    store.dead_letters(limit=1)  # the first pass: the mark set
    for n in range(50):
        store.kill(letter(f"k{n:02}"), "ConnectError")
    old_kill(redis_client, keys, letter("old"), redis_ms(redis_client))
    read: list[str] = []
    hmget = store.r.hmget

    def counting(name: str, fields: Any, *args: Any) -> Any:
        if name == keys.dead_payload:
            read.extend(f if isinstance(f, str) else f.decode() for f in fields)
        return hmget(name, fields, *args)

    store.r.hmget = counting  # type: ignore[method-assign,assignment]
    store.forget_gone_stats(10**9)
    assert read == ["old"]
    assert [d.id for d in store.dead_letters(hook_id=1, limit=100)][-1] == "old"
    assert redis_client.zcard(keys.dead_recent) == 50  # within a minute of the mark
    redis_client.set(keys.dead_indexed, redis_ms(redis_client) + 120_000)
    store.forget_gone_stats(10**9)
    assert redis_client.zcard(keys.dead_recent) == 0  # below the mark: forgotten


def test_a_damaged_mark_or_an_undecodable_letter_fails_no_read(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A mark that is no number is taken as none (every dead letter looked at, the mark
    written again); a letter that cannot be decoded is skipped, not indexed."""
    old_kill(redis_client, keys, letter("d1"), redis_ms(redis_client))
    redis_client.hset(keys.dead_payload, "bad", b"\xc1")
    redis_client.zadd(keys.dead, {"bad": redis_ms(redis_client)})
    redis_client.set(keys.dead_indexed, "abc")
    store = RetryStore(redis_client, keys)
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1"]
    assert float(redis_client.get(keys.dead_indexed) or 0) > 0
    assert redis_client.zscore(keys.dead_of_account(7), "bad") is None


@pytest.mark.parametrize("mark", [b"nan", b"inf", b"-inf"])
def test_a_mark_that_is_no_time_of_death_is_replaced(
        redis_client: redis.Redis, keys: Keys, mark: bytes) -> None:
    """nan or inf (written from outside) is no mark: every dead letter is looked at once,
    and the mark written again as a time; reads do not fail."""
    old_kill(redis_client, keys, letter("d1"), redis_ms(redis_client))
    redis_client.set(keys.dead_indexed, mark)
    store = RetryStore(redis_client, keys)
    assert [d.id for d in store.dead_letters(account_id=7)] == ["d1"]
    store.forget_gone_stats(10**9)
    assert 0 < float(redis_client.get(keys.dead_indexed) or 0) < redis_ms(redis_client)
