"""A Redis whose ACL refuses the engine's user a command or a key: every entry
reaching it fails alike, the operator's to mend, and no entry is blamed for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from engine.dispatch import PartitionWorker, acl_refusal, redis_unavailable
from engine.intake import Intake
from engine.keys import Keys
from engine.settings import Settings, engine_redis
from engine.stores import HookRegistry
from tests.integration.test_redis_checks import own_redis
from tests.integration.test_workers import InProcessSender, clicks, hook

pytestmark = pytest.mark.integration

PREFIX = "acl"
# every key of the engine's but the stored profiles: an operator's list short of one
PATTERNS = [f"~{PREFIX}:{x}" for x in (
    "intake:*", "hooks*", "version:*", "stats:*", "acked:*", "booked:*", "config",
    "processing:*", "alive:*", "retry*", "dead*", "names", "engine", "content:*", "epoch")]


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    yield from own_redis()


def test_an_acl_refusal_mid_round_sets_no_entry_aside_and_passes_once_mended(
        admin: redis.Redis) -> None:
    """A user whose key patterns leave out the profiles, and a hook copying a profile
    field: each round fails at the profiles. The entries were counted failures and,
    after 5 rounds, set aside as entries that cannot be processed, their events sent to
    no hook; now they wait, and go once the ACL lets the user read the profiles."""
    admin.execute_command("ACL", "SETUSER", "eng", "on", ">pw", "+@all", *PATTERNS)
    port = admin.connection_pool.connection_kwargs["port"]
    url = f"redis://eng:pw@127.0.0.1:{port}/0"
    settings = Settings(REDIS_URL=url, REDIS_PREFIX=PREFIX, PARTITIONS=1)
    r, keys = engine_redis(url), Keys(PREFIX)
    HookRegistry(r, keys).create(hook(custom_data={"fields": ["email"], "pairs": {}}))
    intake = Intake(r, keys, 1, 1000)
    intake.ensure_groups()
    for n in range(3):
        intake.publish([dict(e, profile_id="abcdefgh12345678")
                        for e in clicks(4, list_id=n + 1)])
    sender = InProcessSender()
    worker = PartitionWorker(settings, r, 0, sender)
    errors = []
    for _ in range(12):
        try:
            worker.step(block_ms=5)
        except redis.RedisError as exc:
            errors.append(exc)
    assert errors and all(acl_refusal(e) and not redis_unavailable(e) for e in errors)
    # refused at the profiles, the round's own read (not before it, at a key of the
    # hooks' refresh): each a round the entries would have been blamed for
    assert all("profiles" in str(e) or "HMGET" in str(e) for e in errors), errors[:1]
    assert not worker.failures
    assert admin.xlen(keys.intake_unreadable) == 0
    assert admin.hget(keys.engine_stats, "entries_unreadable") is None
    assert sender.transport.sent == []
    admin.execute_command("ACL", "SETUSER", "eng", "allkeys")  # mended
    for _ in range(10):
        worker.step(block_ms=5)
    worker.drain(5)
    sent = [mid for d in sender.transport.sent for mid in d.message_ids]
    assert len(sent) == len(set(sent)) == 12
    assert admin.xlen(keys.intake(0)) == 0


def test_acl_refusals_are_told_apart_in_every_form_redis_gives_them(
        admin: redis.Redis) -> None:
    admin.execute_command("ACL", "SETUSER", "u", "on", ">pw", "+@all", "~a*")
    port = admin.connection_pool.connection_kwargs["port"]
    user = redis.Redis(port=port, username="u", password="pw")
    refusals: list[Exception] = []
    for call in (lambda: user.get("b"),
                 lambda: user.eval("return redis.call('GET', 'b')", 0),
                 lambda: user.eval("return redis.pcall('GET', 'b')", 0)):
        with pytest.raises(redis.ResponseError) as caught:
            call()
        refusals.append(caught.value)
    with user.pipeline() as pipe:
        pipe.get("a")
        pipe.get("b")
        with pytest.raises(redis.ResponseError) as caught:
            pipe.execute()
        refusals.append(caught.value)
    assert [acl_refusal(e) for e in refusals] == [True] * 4
    # as Redis 7.2 and Valkey word a refusal inside a script
    assert acl_refusal(redis.ResponseError(
        "ACL failure in script: No permissions to access a key script: "
        "f_2d7e1d0bb1a1bd8ea0ec0a0c8b43bb3ad0aa6bb4, on @user_script:1."))
    with pytest.raises(redis.ResponseError) as wrongtype:
        admin.set("s", "x")
        admin.hget("s", "f")
    assert not acl_refusal(wrongtype.value)
    user.close()


def test_a_policy_the_engines_user_may_not_read_is_told_apart_from_noeviction(
        admin: redis.Redis) -> None:
    """With INFO and CONFIG refused (as managed services often do), the policy of an
    evicting Redis cannot be read: the engine's start says so, rather than nothing as
    for noeviction."""
    from engine.health import eviction_risk, read_policy

    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.execute_command("ACL", "SETUSER", "eng", "on", ">pw", "+@all", "-info", "-config",
                          "allkeys")
    port = admin.connection_pool.connection_kwargs["port"]
    user = redis.Redis(port=port, username="eng", password="pw")
    assert read_policy(admin) == "allkeys-lru"
    assert read_policy(user) is None and eviction_risk(user) is None
    admin.config_set("maxmemory-policy", "noeviction")
    assert read_policy(admin) == "noeviction"
    user.close()
