"""Hook ids never given to a second hook: ``HookRegistry.create`` with ``{p}:hooks:seq``
lost or restored older than the hooks, and the retry worker refusing to send a
delivery to a hook of another account (real Redis, in-process sender, no Ray)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.errors import Conflict
from engine.keys import Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import Delivery
from tests.integration.test_workers import (
    InProcessSender,
    clicks,
    one_intake,
    one_partition,
    run_until,
)
from tests.integration.test_workers import hook as worker_hook

pytestmark = pytest.mark.integration


def hook(account: int, url: str, name: str = "h") -> dict[str, Any]:
    return {"name": name, "active": True, "account_id": account, "actions": ["click"],
            "target": {"http_batch": {"url": url}}}


def stored(r: redis.Redis, keys: Keys) -> dict[int, tuple[int, str]]:
    """(account, url) of each stored hook record, by id, read as stored."""
    out = {}
    for field, raw in r.hgetall(keys.hooks).items():
        data = json.loads(raw)
        out[int(field)] = (data["account_id"], data["target"]["http_batch"]["url"])
    return out


def test_create_with_the_id_counter_lost_overwrites_no_hook(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The counter missing (hooks copied to a new Redis without it): the new hook takes
    an id above every stored hook's, and every stored hook stays as it was."""
    registry = HookRegistry(redis_client, keys)
    a = registry.create(hook(1, "https://crm.account1.example/hook"))
    b = registry.create(hook(1, "https://crm.account1.example/other"))
    assert (a.id, b.id) == (1, 2)
    before = stored(redis_client, keys)
    version = registry.version()
    redis_client.delete(keys.hooks_seq)
    c = registry.create(hook(2, "https://account2.example/in"))
    assert c.id == 3
    assert stored(redis_client, keys) == {**before, 3: (2, "https://account2.example/in")}
    assert registry.version() == version + 1  # partitions reload, as for any create
    assert registry.create(hook(2, "https://account2.example/in")).id == 4
    assert redis_client.get(keys.hooks_seq) == b"4"


def test_create_with_the_id_counter_restored_older_skips_stored_and_deleted_ids(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A counter older than the hooks: an id it gives that is a stored hook's, or a
    deleted hook's still marked (its counters and dead letters kept), is passed over
    for one above them all."""
    registry = HookRegistry(redis_client, keys)
    for n in range(1, 4):
        registry.create(hook(1, f"https://a1.example/{n}"))
    gone = registry.create(hook(1, "https://a1.example/gone"))  # 4, deleted: marked
    registry.delete(gone.id or 0)
    redis_client.set(keys.hooks_seq, 1)  # restored from before hooks 2-4
    before = stored(redis_client, keys)
    new = registry.create(hook(2, "https://account2.example/in"))
    assert new.id == 5
    assert stored(redis_client, keys) == {**before, 5: (2, "https://account2.example/in")}
    # lost, hook 5 gone unmarked: above stored hook 3 and deleted hook 4, still marked
    redis_client.delete(keys.hooks_seq)
    redis_client.hdel(keys.hooks, "5")
    assert registry.create(hook(2, "https://account2.example/in")).id == 5


def test_an_emptied_redis_gives_no_new_hook_the_counters_or_dead_letters_of_an_old_id(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Redis emptied under a running engine (FLUSHDB, a restart without persistence):
    outcomes still in flight write hook 1's counters (and dead letters) again, and the
    counter starts over. A new hook took id 1 and those counters with it (delivered
    above accepted); ids with counters or dead letters are passed over."""
    registry = HookRegistry(redis_client, keys)
    registry.create(hook(1, "https://a1.example/1"))
    registry.create(hook(1, "https://a1.example/2"))
    for key in (keys.hooks, keys.hooks_seq, keys.hooks_gone):  # emptied...
        redis_client.delete(key)
    redis_client.hset(keys.stats(1), "delivered", 20)  # ... then outcomes came in
    redis_client.zadd(keys.dead_of_hook(2), {"d1": 1})
    redis_client.hset(keys.stats(4), "delivered", 5)  # for the hook after the first too
    made = registry.create(hook(2, "https://account2.example/in"))
    assert made.id == 3
    assert registry.create(hook(2, "https://account2.example/again")).id == 5
    assert redis_client.get(keys.hooks_seq) == b"5"


def test_ids_from_10_to_the_14_on_are_checked_for_counters_under_their_own_key(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Lua wrote such an id as 1e+14 in the keys it checked, so counters kept under the
    id itself were never seen."""
    registry = HookRegistry(redis_client, keys)
    redis_client.set(keys.hooks_seq, 10**14 - 1)
    redis_client.hset(keys.stats(10**14), "delivered", 7)
    redis_client.zadd(keys.dead_of_hook(10**14 + 1), {"d1": 1})
    assert registry.create(hook(1, "https://a1.example/big")).id == 10**14 + 2


def test_create_stores_no_hook_over_one_written_meanwhile(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A record written at the new id between taking it and storing (from outside the
    engine) is kept; the hook takes the next id. Always taken: Conflict, nothing
    stored over another."""
    registry = HookRegistry(redis_client, keys)
    take = registry._next_id
    written: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        hook_id = take(*args, **kwargs)
        if not written:  # a restore writes this id first
            written.append(hook_id)
            redis_client.hset(keys.hooks, str(hook_id), json.dumps(
                {"id": hook_id, **hook(1, "https://restored.example/")}))
        return hook_id

    registry._next_id = racing  # type: ignore[assignment]
    made = registry.create(hook(2, "https://account2.example/in"))
    assert written == [1] and made.id == 2
    assert stored(redis_client, keys) == {1: (1, "https://restored.example/"),
                                          2: (2, "https://account2.example/in")}

    def always(*args: Any, **kwargs: Any) -> Any:
        return 1  # an id that is always taken

    registry._next_id = always  # type: ignore[assignment]
    with pytest.raises(Conflict, match="stored under 10 new ids while one was being created"):
        registry.create(hook(2, "https://account2.example/other"))
    assert stored(redis_client, keys)[1] == (1, "https://restored.example/")


def test_retry_worker_sends_no_resend_to_another_accounts_hook(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """Hook 1 of account 1 has a re-send waiting; its record is then another account's
    (a restore wrote it over): the re-send is never sent, and becomes a dead letter
    saying why. A replay of it dies again at once, unsent."""
    registry = HookRegistry(redis_client, keys)
    mine = registry.create(hook(1, "https://crm.account1.example/hook"))
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d1", hook_id=mine.id or 0, account_id=1, kind="http_batch",
                            parts=[b'{"email":"alice@account1"}']), due_ms=0, error="HTTP 503")
    redis_client.hset(keys.hooks, str(mine.id), json.dumps(
        {"id": mine.id, **hook(2, "https://attacker.account2.example/in")}))
    redis_client.incr(keys.hooks_version)
    sender = InProcessSender()
    worker = RetryWorker(settings, redis_client, sender)
    worker.step()
    assert sender.hooks == [] and sender.transport.sent == []
    (dead,) = retry.dead_letters(account_id=1)
    assert dead.id == "d1" and retry.pending() == 0
    assert dead.last_error == ("hook 1 now belongs to account 2, not the delivery's account "
                               "1; last error: HTTP 503")
    assert Stats(redis_client, keys).get(1)["dead_lettered"] == 1
    assert retry.replay(["d1"]) == 1  # by account 1, its own dead letter
    worker.step()
    assert sender.transport.sent == []
    (again,) = retry.dead_letters(hook_id=1)
    assert again.last_error.startswith("hook 1 now belongs to account 2, not the delivery's "
                                       "account 1; last error: hook 1 now belongs")
    # the hook's own account's re-sends are still sent to it
    retry.schedule(Delivery(id="d2", hook_id=1, account_id=2, kind="http_batch",
                            parts=[b"{}"]), due_ms=0, error="HTTP 503")
    worker.step()
    assert [d.id for d in sender.transport.sent] == ["d2"]


def test_the_counter_lost_then_a_create_leaks_no_resend(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """The review's case end to end: account 1's re-send waits, the counter is lost,
    account 2 creates a hook: the re-send still goes to account 1's destination."""
    registry = HookRegistry(redis_client, keys)
    mine = registry.create(hook(1, "https://crm.account1.example/hook"))
    RetryStore(redis_client, keys).schedule(
        Delivery(id="d1", hook_id=mine.id or 0, account_id=1, kind="http_batch",
                 parts=[b'{"email":"alice@account1"}']), due_ms=0, error="HTTP 503")
    redis_client.delete(keys.hooks_seq)
    theirs = registry.create(hook(2, "https://attacker.account2.example/in"))
    assert theirs.id != mine.id
    sender = InProcessSender()
    RetryWorker(settings, redis_client, sender).step()
    assert [(h.account_id, getattr(h.target.settings, "url", None)) for h in sender.hooks] == [
        (1, "https://crm.account1.example/hook")]


def test_an_open_batch_is_not_sent_to_another_accounts_hook_under_its_id(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    cfg = one_partition(settings).model_copy(update={"HOOK_RETRY_TIMES": 0})
    registry = HookRegistry(redis_client, keys)
    slow = {"url": "http://127.0.0.1:9/account1", "max_batch_size": 100,
            "flush_timeout_sec": 60}
    mine = registry.create(worker_hook(target={"http_batch": slow}))
    intake = one_intake(redis_client, keys, 1000)
    sender = InProcessSender()
    worker = PartitionWorker(cfg, redis_client, 0, sender)
    intake.publish(clicks(3))
    run_until(worker, lambda: worker.dispatcher.open_messages() == 3)
    redis_client.hset(keys.hooks, str(mine.id), json.dumps({"id": mine.id, **worker_hook(
        account_id=2, target={"http_batch": {**slow, "url": "http://127.0.0.1:9/account2"}})}))
    redis_client.incr(keys.hooks_version)
    run_until(worker, lambda: redis_client.xlen(keys.intake(0)) == 0)
    assert sender.hooks == []
    (dead,) = RetryStore(redis_client, keys).dead_letters(account_id=1)
    assert dead.count == 3
    assert dead.last_error == (f"NotSent: hook {mine.id} now belongs to account 2, not the "
                               "delivery's account 1")
