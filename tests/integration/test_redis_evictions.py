"""Redis evicting keys (a maxmemory-policy other than noeviction, at its maxmemory):
the retry worker says so, as an ERROR, once a minute at most, while it goes on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis

import engine.health as health
from engine.retrying import RetryWorker
from engine.settings import Settings
from tests.integration.test_redis_checks import own_redis
from tests.integration.test_workers import InProcessSender

pytestmark = pytest.mark.integration


@pytest.fixture
def evicting() -> Iterator[redis.Redis]:
    yield from own_redis("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")


def fill(r: redis.Redis, n: int) -> None:
    for i in range(n):
        r.set(f"filler:{i}", b"x" * 50_000)


def test_the_retry_worker_says_when_redis_evicted_keys(
        evicting: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    port = evicting.connection_pool.connection_kwargs["port"]
    settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PREFIX="ev",
                        HOOK_RETRY_PERIOD_SEC=0.3)
    worker = RetryWorker(settings, evicting, InProcessSender())
    with caplog.at_level(logging.ERROR, logger="hookray"):
        worker.step()  # the count as it is: no eviction yet
        fill(evicting, 10)  # 500 kB, within maxmemory
        worker.evictions.read_at = -float("inf")
        worker.step()
        assert not [r for r in caplog.records if "evicted" in r.getMessage()]
        fill(evicting, 200)  # 10 MB into 3 MB: most are evicted
        worker.step()  # read less than a minute ago: not read again yet
        assert not [r for r in caplog.records if "evicted" in r.getMessage()]
        monkeypatch.setattr(health, "EVICTIONS_READ_SEC", 0.0)
        worker.step()
    evicted = int(evicting.info("stats")["evicted_keys"])
    (said,) = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert said.startswith(f"Redis evicted {evicted} key(s) since it was last asked")
    assert "(maxmemory-policy allkeys-lru, at its maxmemory)" in said
    assert "accepted events, re-sends, dead letters or hooks may be lost" in said
    assert said.endswith("use maxmemory-policy noeviction")
    evicting.config_set("maxmemory-policy", "volatile-lru")
    evicting.delete(*evicting.keys("filler:*"))  # (volatile-lru evicts none of these)
    for i in range(200):  # keys with a TTL, to be evicted under volatile-lru
        evicting.set(f"content:{i}", b"x" * 50_000, ex=3600)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="hookray"):
        assert worker.evictions.check() is not None
    (said,) = [r.getMessage() for r in caplog.records]
    assert "message content may be gone" in said


def test_a_redis_that_does_not_say_its_evictions_is_passed_over(
        evicting: redis.Redis) -> None:
    evicting.execute_command("ACL", "SETUSER", "eng", "on", ">pw", "+@all", "-info",
                             "allkeys")
    port = evicting.connection_pool.connection_kwargs["port"]
    user = redis.Redis(port=port, username="eng", password="pw")
    watch = health.EvictionWatch(user)
    assert watch.check() is None and watch.seen is None
    user.close()
