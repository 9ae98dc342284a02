"""What the engine says about a Redis that could drop accepted work on its own."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from engine.health import eviction_risk
from tests.services import free_port, missing


@pytest.fixture
def evicting_redis() -> Iterator[redis.Redis]:
    """A redis-server of this test's own, which evicts any key when memory runs short."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no",
                             "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_an_eviction_policy_is_named(evicting_redis: redis.Redis,
                                     redis_client: redis.Redis) -> None:
    risk = eviction_risk(evicting_redis)
    assert risk is not None and "maxmemory-policy allkeys-lru" in risk
    assert "accepted events, retries and dead letters" in risk and "use noeviction" in risk
    evicting_redis.config_set("maxmemory-policy", "volatile-lru")  # keys with a TTL
    risk = eviction_risk(evicting_redis)
    assert risk is not None and "stored message content could be dropped" in risk
    evicting_redis.config_set("maxmemory-policy", "noeviction")
    assert eviction_risk(evicting_redis) is None
    assert eviction_risk(redis_client) is None  # the shared test Redis: noeviction
