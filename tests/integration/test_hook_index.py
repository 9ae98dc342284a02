"""The index of hooks by account: an account's listing, stats and bound read its own
hooks, not every account's, and say what a read of every record would say, whatever
changed the hooks (the engine, a restore, an edit from outside, keys lost)."""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from engine.errors import HookError, NotFound
from engine.keys import Keys
from engine.stores import HookRegistry, stored_account
from tests.integration.test_redis_checks import own_redis

pytestmark = pytest.mark.integration

ACCOUNTS = (1, 2, 3, 4)


def hook(account: int, name: str) -> dict[str, Any]:
    return {"name": name, "account_id": account, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/in"}}}


def read_all(r: redis.Redis, keys: Keys, account: int) -> tuple[list[tuple[int, str]],
                                                                 list[int]]:
    """An account's hooks (id, name) and its invalid ones' ids, as a read of every
    stored record finds them."""
    valid, invalid = [], []
    registry = HookRegistry(r, keys)
    for field, raw in r.hgetall(keys.hooks).items():
        if not field.isdigit() or stored_account(raw) != account:
            continue
        try:
            parsed = registry._parse(field.decode(), raw)
        except HookError:
            invalid.append(int(field))
        else:
            valid.append((parsed.id or 0, parsed.name))
    return sorted(valid), sorted(invalid)


def listed(registry: HookRegistry, account: int) -> tuple[list[tuple[int, str]], list[int]]:
    hooks, invalid = registry.listing(account)
    return [(h.id or 0, h.name) for h in hooks], [i for i, _ in invalid]


def counted(r: redis.Redis, keys: Keys) -> Counter[int]:
    return Counter(a for raw in r.hvals(keys.hooks) if (a := stored_account(raw)) is not None)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often a registry built the index again."""
    made: list[int] = []
    original = HookRegistry._index

    def counting(self: HookRegistry) -> bool:
        made.append(1)
        return original(self)

    monkeypatch.setattr(HookRegistry, "_index", counting)
    return made


def test_an_account_read_through_the_index_reads_no_other_accounts_hooks(
        redis_client: redis.Redis, keys: Keys, builds: list[int]) -> None:
    registry = HookRegistry(redis_client, keys, max_per_account=5)
    mine = [registry.create(hook(1, f"m{i}")) for i in range(3)]
    theirs = registry.create(hook(2, "theirs"))
    assert listed(registry, 1) == ([(h.id or 0, h.name) for h in mine], [])
    assert builds == [1]  # none was kept yet: built once, from every record
    # from now on, the account's own: another account's record, damaged so that any
    # read of it would show it, is never read
    redis_client.hset(keys.hooks, str(theirs.id), json.dumps({"account_id": 2}))
    redis_client.incr(keys.hooks_version)  # (as an edit from outside must, for workers)
    assert listed(registry, 2) == ([], [theirs.id])
    assert builds == [1, 1]  # an edit from outside: built again
    registry.delete(mine[0].id or 0)
    registry.set_active(mine[1].id or 0, False)
    registry.create(hook(3, "another"))
    registry.create(hook(1, "m3"))
    assert listed(registry, 1) == read_all(redis_client, keys, 1)
    assert len(listed(registry, 1)[0]) == 3
    registry.create(hook(1, "m4"))
    registry.create(hook(1, "m5"))
    with pytest.raises(HookError, match="the account has 5 hooks"):
        registry.create(hook(1, "m6"))
    assert builds == [1, 1]  # the engine's own changes kept it whole


class Changes:
    """Changes to the stored hooks, the engine's and others (a restore, a hand edit,
    keys evicted), chosen at random."""

    def __init__(self, r: redis.Redis, keys: Keys, rng: random.Random,
                 registries: list[HookRegistry]) -> None:
        self.r, self.keys, self.rng, self.registries = r, keys, rng, registries
        self.names = iter(range(1_000_000))

    def ids(self) -> list[int]:
        return [int(f) for f in self.r.hkeys(self.keys.hooks) if f.isdigit()]

    def registry(self) -> HookRegistry:
        return self.rng.choice(self.registries)

    def any(self) -> None:
        ops: list[Callable[[], Any]] = [
            self.create, self.create, self.delete, self.change, self.outside_write,
            self.outside_add, self.outside_delete, self.damage, self.evict, self.save]
        if not self.ids():  # those that need a stored hook
            ops = [self.create, self.outside_add, self.evict]
        self.rng.choice(ops)()

    def create(self) -> None:
        self.registry().create(hook(self.rng.choice(ACCOUNTS), f"h{next(self.names)}"))

    def delete(self) -> None:
        with contextlib.suppress(NotFound):
            self.registry().delete(self.rng.choice(self.ids()))

    def change(self) -> None:
        with contextlib.suppress(HookError, NotFound):  # a damaged one cannot be changed
            self.registry().set_active(self.rng.choice(self.ids()), self.rng.random() < .5)

    def save(self) -> None:  # as tests and tools store a hook as it is (over any record)
        with contextlib.suppress(HookError):
            stored = self.registry().get(self.rng.choice(self.ids()))
            self.registry()._save(stored.model_copy(update={
                "name": f"saved{next(self.names)}", "account_id": self.rng.choice(ACCOUNTS)}))

    def outside_write(self) -> None:  # another account, and the version moved on
        target = self.rng.choice(self.ids())
        with contextlib.suppress(ValueError):  # damaged before
            record = json.loads(self.r.hget(self.keys.hooks, str(target)) or b"{}")
            if isinstance(record, dict):
                record["account_id"] = self.rng.choice(ACCOUNTS)
                self.r.hset(self.keys.hooks, str(target), json.dumps(record))
                self.r.incr(self.keys.hooks_version)

    def outside_add(self) -> None:  # a field added without a version change
        new = max(self.ids(), default=0) + 1000
        self.r.hset(self.keys.hooks, str(new), json.dumps(
            {**hook(self.rng.choice(ACCOUNTS), f"raw{new}"), "id": new}))

    def outside_delete(self) -> None:  # a field deleted without a version change
        self.r.hdel(self.keys.hooks, str(self.rng.choice(self.ids())))

    def damage(self) -> None:
        target = self.rng.choice(self.ids())
        raw = self.r.hget(self.keys.hooks, str(target)) or b""
        self.r.hset(self.keys.hooks, str(target), raw[:raw.index(b'"account_id"') + 18]
                    if b'"account_id"' in raw else b"[]")
        self.r.incr(self.keys.hooks_version)

    def evict(self) -> None:  # keys of the index lost (evicted, deleted by hand)
        self.r.delete(self.rng.choice([
            self.keys.hooks_index, self.keys.hooks_of_account(self.rng.choice(ACCOUNTS)),
            self.keys.hooks_version]))


def test_a_listing_says_what_a_read_of_every_record_says_whatever_changed_the_hooks(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Random changes, each followed by every account's listing and count against a
    full read; two registries, as two processes (each its own parse cache)."""
    rng = random.Random(20261202)
    registries = [HookRegistry(redis_client, keys), HookRegistry(redis_client, keys)]
    changes = Changes(redis_client, keys, rng, registries)
    for step in range(300):
        changes.any()
        expected = counted(redis_client, keys)
        for account in ACCOUNTS:
            reader = rng.choice(registries)
            assert listed(reader, account) == read_all(redis_client, keys, account), step
            assert reader._of_account(account, "count")[0] == expected[account], step


@pytest.fixture
def small_redis() -> Iterator[redis.Redis]:
    yield from own_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")


def test_a_redis_at_its_maxmemory_still_lists_an_accounts_hooks(
        small_redis: redis.Redis) -> None:
    keys = Keys("full")
    registry = HookRegistry(small_redis, keys)
    made = [registry.create(hook(a, f"h{a}")) for a in ACCOUNTS]
    small_redis.delete(keys.hooks_index)  # to be built again, at the next read
    filler = 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        while True:  # Redis full: the index can be written no more
            small_redis.set(f"filler:{filler}", b"x" * 100_000)
            filler += 1
    assert filler > 0
    for account, made_hook in zip(ACCOUNTS, made, strict=True):
        assert listed(registry, account) == ([(made_hook.id or 0, made_hook.name)], [])
