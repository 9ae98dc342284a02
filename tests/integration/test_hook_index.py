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
    for field, raw in r.hscan_iter(keys.hooks, count=1000):  # (not HGETALL: see builds)
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
def builds(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> list[str]:
    """How often a registry built the index again ("build"), and read every hook
    record ("read all": a build reads them, and a listing that could not build it)."""
    made: list[str] = []
    index, hgetall = HookRegistry._index, redis.Redis.hgetall

    def counting(self: HookRegistry, reader: str) -> bool:
        made.append("build")
        return index(self, reader)

    def reading(self: redis.Redis, name: str) -> Any:
        if name == keys.hooks:
            made.append("read all")
        return hgetall(self, name)

    monkeypatch.setattr(HookRegistry, "_index", counting)
    monkeypatch.setattr(redis.Redis, "hgetall", reading)
    return made


def test_an_account_read_through_the_index_reads_no_other_accounts_hooks(
        redis_client: redis.Redis, keys: Keys, builds: list[str]) -> None:
    registry = HookRegistry(redis_client, keys, max_per_account=5)
    mine = [registry.create(hook(1, f"m{i}")) for i in range(3)]
    theirs = registry.create(hook(2, "theirs"))
    assert listed(registry, 1) == ([(h.id or 0, h.name) for h in mine], [])
    assert builds == ["build", "read all"]  # none was kept yet: built from every record
    # from now on, the account's own: another account's record, damaged so that any
    # read of it would show it, is never read
    redis_client.hset(keys.hooks, str(theirs.id), json.dumps({"account_id": 2}))
    redis_client.incr(keys.hooks_version)  # (as an edit from outside must, for workers)
    assert listed(registry, 2) == ([], [theirs.id])
    assert builds == ["build", "read all"] * 2  # an edit from outside: built again
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
    assert builds == ["build", "read all"] * 2  # the engine's own changes kept it whole


class Changes:
    """Changes to the stored hooks, the engine's and others (a restore, a hand edit,
    keys evicted), chosen at random."""

    def __init__(self, r: redis.Redis, keys: Keys, rng: random.Random,
                 registries: list[HookRegistry]) -> None:
        self.r, self.keys, self.rng, self.registries = r, keys, rng, registries
        self.names = iter(range(1_000_000))
        self.backup: dict[str, bytes] = {}
        self.read_now = False
        self.evicted = False

    def ids(self) -> list[int]:
        return [int(f) for f in self.r.hkeys(self.keys.hooks) if f.isdigit()]

    def registry(self) -> HookRegistry:
        return self.rng.choice(self.registries)

    def any(self) -> None:
        ops: list[Callable[[], Any]] = [
            self.create, self.create, self.delete, self.change, self.outside_write,
            self.outside_add, self.outside_delete, self.damage, self.evict, self.save,
            self.back_up, self.restore]
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

    def hand_bump(self) -> None:
        """The version moved on by hand, as the README asks after an edit by hand."""
        self.r.incr(self.keys.hooks_version)
        if self.evicted:  # (the version lost once, it could come back to the index's)
            self.r.delete(self.keys.hooks_index)

    def outside_write(self) -> None:  # another account, and the version moved on
        target = self.rng.choice(self.ids())
        with contextlib.suppress(ValueError):  # damaged before
            record = json.loads(self.r.hget(self.keys.hooks, str(target)) or b"{}")
            if isinstance(record, dict):
                record["account_id"] = self.rng.choice(ACCOUNTS)
                self.r.hset(self.keys.hooks, str(target), json.dumps(record))
                self.hand_bump()

    def outside_add(self) -> None:  # a field added by hand
        new = max(self.ids(), default=0) + 1000
        self.r.hset(self.keys.hooks, str(new), json.dumps(
            {**hook(self.rng.choice(ACCOUNTS), f"raw{new}"), "id": new}))
        self.told()

    def outside_delete(self) -> None:  # a field deleted by hand
        self.r.hdel(self.keys.hooks, str(self.rng.choice(self.ids())))
        self.told()

    def told(self) -> None:
        """As an edit by hand is to (README): the version moved on, or the index's mark
        deleted; or neither, the field count changed and a read made before the next
        change."""
        roll = self.rng.random()
        if roll < 0.4:
            self.hand_bump()
        elif roll < 0.6:
            self.r.delete(self.keys.hooks_index)
        else:
            self.read_now = True

    def damage(self) -> None:
        target = self.rng.choice(self.ids())
        raw = self.r.hget(self.keys.hooks, str(target)) or b""
        self.r.hset(self.keys.hooks, str(target), raw[:raw.index(b'"account_id"') + 18]
                    if b'"account_id"' in raw else b"[]")
        self.hand_bump()

    def back_up(self) -> None:
        self.backup = {key: dumped for key in (self.keys.hooks, self.keys.hooks_version)
                       if (dumped := self.r.dump(key)) is not None}

    def restore(self) -> None:  # the hooks and their version as backed up
        for key, dumped in self.backup.items():
            self.r.restore(key, 0, dumped, replace=True)
        # as the README asks: the version is back, maybe to the index's own number
        self.r.delete(self.keys.hooks_index)

    def evict(self) -> None:  # keys of the index lost (evicted, deleted by hand)
        self.r.delete(self.rng.choice([
            self.keys.hooks_index, self.keys.hooks_of_account(self.rng.choice(ACCOUNTS)),
            self.keys.hooks_version]))
        self.evicted = True


def test_a_listing_says_what_a_read_of_every_record_says_whatever_changed_the_hooks(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Random changes, each followed by every account's listing and count against a
    full read; two registries, as two processes (each its own parse cache)."""
    rng = random.Random(20261202)
    registries = [HookRegistry(redis_client, keys), HookRegistry(redis_client, keys)]
    changes = Changes(redis_client, keys, rng, registries)
    for step in range(400):
        changes.any()
        if rng.random() < 0.6 and not changes.read_now:  # several changes before a read
            continue
        changes.read_now = False
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
    for size in (100_000, 1_000, 10):  # Redis full, to the last small write
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            while True:
                small_redis.set(f"filler:{filler}", b"x" * size)
                filler += 1
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        small_redis.hset(keys.hooks_index, "version", "-")  # the index can be written no more
    for account, made_hook in zip(ACCOUNTS, made, strict=True):
        assert listed(registry, account) == ([(made_hook.id or 0, made_hook.name)], [])
    assert not small_redis.exists(keys.hooks_index)  # read without building it past there


def test_hooks_restored_older_are_not_listed_by_an_index_of_later_hooks(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The hooks and their version restored from a backup (or the version lost): the
    engine's changes after that walk the version back to the number the index was
    whole at, which does not pass it for whole again."""
    registry = HookRegistry(redis_client, keys)
    kept = registry.create(hook(1, "kept"))
    backup = {key: redis_client.dump(key) for key in (keys.hooks, keys.hooks_version)}
    registry.create(hook(1, "after the backup"))
    registry.create(hook(2, "after the backup"))
    assert len(listed(registry, 1)[0]) == 2  # whole, at version 3
    for key, dumped in backup.items():
        redis_client.restore(key, 0, dumped, replace=True)  # back at version 1
    made = [registry.create(hook(1, "made again")), registry.create(hook(2, "made again"))]
    assert redis_client.get(keys.hooks_version) == b"3"  # the index's version again
    for account in (1, 2):
        assert listed(registry, account) == read_all(redis_client, keys, account)
    assert {n for _, n in listed(registry, 1)[0]} == {kept.name, made[0].name}


def test_a_set_left_of_an_account_without_hooks_is_built_away_once(
        redis_client: redis.Redis, keys: Keys, builds: list[str]) -> None:
    """The mark lost while the sets stay, then an account's last hook deleted: the set
    left of it is deleted by the next build, not built around at every read."""
    registry = HookRegistry(redis_client, keys)
    gone = registry.create(hook(1, "gone"))
    registry.create(hook(2, "other"))
    assert listed(registry, 1)[0] == [(gone.id or 0, "gone")]
    redis_client.delete(keys.hooks_index)
    registry.delete(gone.id or 0)
    builds.clear()
    for _ in range(3):
        assert listed(registry, 1) == ([], [])
    assert builds == ["build", "read all"]


def test_a_build_catches_up_with_the_engines_changes_made_while_it_read(
        redis_client: redis.Redis, keys: Keys, builds: list[str]) -> None:
    """Hooks changed by another process between a build's read of every record and
    its write: the build takes those changes in, as logged (it was never done while
    hooks kept changing, each listing then reading everything 3 times over)."""
    registry, other = HookRegistry(redis_client, keys), HookRegistry(redis_client, keys)
    first = [registry.create(hook(a, f"h{a}")) for a in (1, 2)]
    redis_client.delete(keys.hooks_index)
    script = registry._index_script
    changes = iter([
        lambda: other.create(hook(1, "made meanwhile")),
        lambda: (other.delete(first[1].id or 0), other.set_active(first[0].id or 0, False),
                 other.create(hook(3, "a new account"))),
    ])

    def meanwhile(**kwargs: Any) -> Any:
        next(changes, lambda: None)()
        return script(**kwargs)

    registry._index_script = meanwhile  # type: ignore[method-assign]
    for account in (1, 2, 3):
        builds.clear()
        redis_client.delete(keys.hooks_index)
        assert listed(registry, account) == read_all(redis_client, keys, account)
        assert builds == ["build", "read all"], account  # built at once, no read after
    assert [n for _, n in listed(registry, 1)[0]] == ["h1", "made meanwhile"]
    assert listed(registry, 2) == ([], [])
    assert [n for _, n in listed(registry, 3)[0]] == ["a new account"]


def test_index_keys_damaged_from_outside_hold_no_hook_change_up(
        redis_client: redis.Redis, keys: Keys) -> None:
    registry = HookRegistry(redis_client, keys, max_per_account=10)
    made = registry.create(hook(1, "a"))
    for damaged in (keys.hooks_index, keys.hooks_of_account(1), keys.hooks_index_log):
        redis_client.delete(damaged)
        redis_client.set(damaged, "damaged")
        other = registry.create(hook(1, "b"))
        registry.set_active(other.id or 0, False)
        assert listed(registry, 1) == read_all(redis_client, keys, 1)
        registry.delete(other.id or 0)
        assert listed(registry, 1) == ([(made.id or 0, "a")], [])


@pytest.mark.parametrize("again", [False, True])
def test_a_build_replays_no_changes_of_a_version_lost_while_it_read(
        redis_client: redis.Redis, keys: Keys, again: bool) -> None:
    """The hooks' version lost (or set back by a restore) between a build's read of the
    records and its write, and the engine's changes then climbing past the version it
    read: the newest log entries are of the new numbering, not the changes since the
    read; replayed, they left the index wrong, and marked whole. Also where the
    change the build read last is made ``again`` at the same version number."""
    registry, other = HookRegistry(redis_client, keys), HookRegistry(redis_client, keys)
    first = [registry.create(hook(1, "h1")), registry.create(hook(2, "h2")),
             registry.create(hook(2, "h3"))]
    if again:
        registry.set_active(first[0].id or 0, False)  # version 4, read last by the build
    redis_client.delete(keys.hooks_index)
    script = registry._index_script
    raced: list[int] = []

    def lost_meanwhile(**kwargs: Any) -> Any:
        if not raced:
            raced.append(1)
            redis_client.delete(keys.hooks_version)
            other.create(hook(1, "h4"))  # version 1
            other.delete(first[1].id or 0)  # version 2, as many hooks as before
            for n in range(3):  # versions 3 to 5: past the one the build read
                other.set_active(first[0].id or 0, n % 2 == 0)  # (4: inactive again)
        return script(**kwargs)

    registry._index_script = lost_meanwhile  # type: ignore[method-assign]
    for account in (1, 2):
        assert listed(registry, account) == read_all(redis_client, keys, account)
    for n in range(3):  # the engine's later changes keep what it is
        registry.create(hook(1, f"later{n}"))
    for account in (1, 2):
        assert listed(registry, account) == read_all(redis_client, keys, account)
