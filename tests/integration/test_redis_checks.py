"""What the engine says about a Redis that could drop accepted work on its own, or
that it cannot use at all."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from actors.driver import Engine
from engine.errors import ConfigError
from engine.health import cluster_mode, eviction_risk, too_old
from engine.settings import Settings
from tests.services import free_port, missing


def cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too, and exists:
    a free port above 55535 has none, and redis-server then exits at start."""
    for _ in range(100):
        port = free_port()
        if port + 10_000 < 65_536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10_000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port with a free cluster bus port")


def own_redis(*options: str, cwd: str | None = None, port: int | None = None
              ) -> Iterator[redis.Redis]:
    """A redis-server of this test's own with ``options``."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    port = port or free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    client = redis.Redis(port=port, protocol=2)  # (a test may refuse HELLO)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"redis-server exited ({proc.returncode})"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def evicting_redis() -> Iterator[redis.Redis]:
    """A Redis that evicts any key when memory runs short."""
    yield from own_redis("--maxmemory-policy", "allkeys-lru")


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis Cluster node (alone, no slots: enough to say it is one)."""
    yield from own_redis("--cluster-enabled", "yes", "--cluster-config-file",
                         str(tmp_path / "nodes.conf"), cwd=str(tmp_path), port=cluster_port())


def test_a_redis_cluster_node_is_refused_by_name_before_anything_is_written(
        cluster_node: redis.Redis, redis_client: redis.Redis, settings: Settings) -> None:
    problem = cluster_mode(cluster_node)
    assert problem is not None and "Redis Cluster node" in problem
    assert cluster_mode(redis_client) is None  # the shared standalone Redis
    port = cluster_node.connection_pool.connection_kwargs["port"]
    url = f"redis://:pw-SECRET@127.0.0.1:{port}/0"
    cluster_node.config_set("requirepass", "pw-SECRET")
    for how in (Engine.connect, Engine.start):
        with pytest.raises(ConfigError) as err:
            how(settings.model_copy(update={"REDIS_URL": url}))
        assert "needs a standalone Redis" in str(err.value), how
        assert "pw-SECRET" not in str(err.value)
    authed = redis.Redis(port=port, password="pw-SECRET")
    assert authed.dbsize() == 0  # nothing written: no claim, no intake groups
    authed.close()


def test_an_eviction_policy_is_named(evicting_redis: redis.Redis,
                                     redis_client: redis.Redis) -> None:
    risk = eviction_risk(evicting_redis)
    assert risk is not None and "maxmemory-policy allkeys-lru" in risk
    assert "accepted events, retries and dead letters" in risk and "use noeviction" in risk
    evicting_redis.config_set("maxmemory-policy", "volatile-lru")  # keys with a TTL
    risk = eviction_risk(evicting_redis)
    assert risk is not None and "stored message content could be dropped" in risk
    assert "claim on its REDIS_PREFIX" in risk and "publish receipts" in risk
    evicting_redis.config_set("maxmemory-policy", "noeviction")
    assert eviction_risk(evicting_redis) is None
    assert eviction_risk(redis_client) is None  # the shared test Redis: noeviction


def test_a_redis_older_than_6_2_is_refused_naming_its_version(
        redis_client: redis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert too_old(redis_client) is None  # the shared Redis (6.2 or later)
    # no older server can be started here: the shared one answers INFO as a 6.0 would
    info = redis.Redis.info

    def as_6_0(self: redis.Redis, section: str | None = None, *args: Any) -> Any:
        answer = info(self, section, *args)
        if section == "server":
            answer = {**answer, "redis_version": "6.0.16"}
        return answer

    monkeypatch.setattr(redis.Redis, "info", as_6_0)
    problem = too_old(redis_client)
    assert problem is not None and "version 6.0.16: hookray needs 6.2 or later" in problem
    with pytest.raises(ConfigError) as err:
        Engine.connect(settings)
    assert "needs 6.2 or later" in str(err.value)


def test_a_booking_refused_for_memory_is_not_made_in_part() -> None:
    """Out of memory is no damaged counter: a booking whose first write (a count) Redis
    refuses for it fails whole, to be sent again, rather than being recorded done with
    its count left out."""
    from engine.keys import Keys
    from engine.stores import Booking, Stats

    for r in own_redis("--maxmemory-policy", "noeviction"):
        keys = Keys("oom")
        r.xadd(keys.intake(0), {"e": "1"})
        r.xgroup_create(keys.intake(0), "g", id="0")
        r.xreadgroup("g", "c", {keys.intake(0): ">"})
        # full, and staying full: a limit filled by writes is passed again once Redis
        # frees a buffer, and a write then fits; one byte is below any Redis's use
        r.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("probe", "x")
        booking = Booking(r, keys.epoch)
        entry = r.xrange(keys.intake(0))[0][0]
        with pytest.raises(redis.ResponseError, match="OOM command not allowed"), \
                booking((keys.last_ack(0, "c"), "t1")) as pipe:
            Stats(r, keys).add(pipe, 7, "delivered", 1)
            pipe.xack(keys.intake(0), "g", entry)
        assert r.xpending(keys.intake(0), "g")["pending"] == 1  # not acknowledged
        assert r.llen(keys.last_ack(0, "c")) == 0  # nor recorded done


def test_a_partition_at_redis_maxmemory_delivers_and_makes_room_counts_made_later(
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis at its maxmemory (noeviction) refuses every write that may grow memory: a
    partition still delivers what it reads and acknowledges and deletes its entries
    (the deletions first in each acknowledgement, which Redis takes), so it makes room
    rather than stalling for good, also when its outcomes come back one at a time (a
    round with counts and no entry to delete is refused: its counts wait) and when it
    restarts (entries read again are processed uncounted); the hooks' counts it was
    refused are made once there is room, and no entry is blamed (set aside)."""
    import logging

    from engine.dispatch import PartitionWorker, redis_unavailable
    from engine.intake import Intake
    from engine.keys import Keys
    from engine.stores import HookRegistry, Stats
    from tests.integration.test_workers import InProcessSender, clicks, hook

    class OneAtATime(InProcessSender):
        """Outcomes come back one per poll, as a transport answering over time."""

        def poll(self, timeout: float) -> list[Any]:
            out, self.done = self.done[:1], self.done[1:]
            return out

    assert redis_unavailable(redis.ResponseError(
        "@user_script: 23: -OOM command not allowed when used memory > 'maxmemory'."))
    for r in own_redis("--maxmemory-policy", "noeviction"):
        port = r.connection_pool.connection_kwargs["port"]
        settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PREFIX="oom",
                            PARTITIONS=1)
        keys = Keys("oom")
        created = HookRegistry(r, keys).create(hook())
        intake = Intake(r, keys, 1, 5000)
        intake.ensure_groups()
        for n in range(60):
            intake.publish(clicks(30, list_id=n + 1))  # 3 batches of 10 each
        first = OneAtATime()
        worker = PartitionWorker(settings, r, 0, first)

        def full(r: redis.Redis = r) -> None:
            # full for good: a margin below use can be freed (a client's buffer) and a
            # write then fits; reads, acknowledgements and deletions are still taken
            r.config_set("maxmemory", 1)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                r.set("probe", "x" * 100_000)  # full: writes that grow memory are refused

        for _ in range(6):
            worker.step(block_ms=10)
        full()
        left = r.xlen(keys.intake(0))
        with caplog.at_level(logging.WARNING, logger="hookray"):
            deadline = time.monotonic() + 20
            while r.xlen(keys.intake(0)) > left - 10:  # acknowledged and deleted
                assert time.monotonic() < deadline, (r.xlen(keys.intake(0)), worker.unsure)
                worker.step(block_ms=10)
            # the process ends with entries read and not acknowledged; Redis is full
            # again when its partition starts anew and reads them again
            r.config_set("maxmemory", 0)
            first.hold = True
            for _ in range(3):
                worker.step(block_ms=10)
            full()
            again = OneAtATime()
            restarted = PartitionWorker(settings, r, 0, again)
            deadline = time.monotonic() + 30
            while r.xlen(keys.intake(0)):
                assert time.monotonic() < deadline, r.xlen(keys.intake(0))
                restarted.step(block_ms=10)
        assert any("Redis is at its maxmemory" in rec.getMessage() for rec in caplog.records)
        r.config_set("maxmemory", 0)
        for _ in range(5):  # room again: the counts that waited are made
            restarted.step(block_ms=10)
        sent = [mid for sender in (first, again) for d in sender.transport.sent
                for mid in d.message_ids]
        assert len(set(sent)) == 1_800  # every message, at least once
        counts = Stats(r, keys).get(created.id or 0)
        # (the first process's outcomes not taken up before it ended are not counted)
        assert counts["accepted"] >= 1_800 and 1_800 <= counts["delivered"] <= len(sent)
        assert r.xlen(keys.intake_unreadable) == 0


def test_health_says_redis_is_full_when_workers_seem_stopped() -> None:
    """At its maxmemory Redis refuses the workers' marks that they run: `hookray health`
    (and the run's progress) says Redis is full rather than only that they stopped."""
    from actors.cli import _health_problems

    health = {"partitions": {"expected": 1, "running": 0, "waiting": [], "stopped": [0]},
              "retry_running": False, "retry_waiting": None}
    for r in own_redis("--maxmemory-policy", "noeviction"):
        assert not any("maxmemory" in p for p in _health_problems(health, "p", r))
        r.config_set("maxmemory", 1)  # full for good (a margin below use can be freed)
        problems = _health_problems(health, "p", r)
        assert problems[0].startswith("Redis is at its maxmemory (") and len(problems) == 3
        running = {**health, "partitions": {**health["partitions"], "stopped": [],
                                            "running": 1}, "retry_running": True}
        assert _health_problems(running, "p", r) == []  # asked only when one seems stopped


async def test_the_apis_health_says_redis_is_full_when_workers_seem_stopped() -> None:
    """GET /v1/health (the probe, no token) says so too: a worker shown stopped while
    Redis is full may be delivering all the same."""
    from aiohttp.test_utils import TestClient, TestServer

    from engine.api import create_app
    from engine.keys import Keys

    for r in own_redis("--maxmemory-policy", "noeviction"):
        port = r.connection_pool.connection_kwargs["port"]
        settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PREFIX="full")
        r.hset(Keys("full").config, "partitions", 1)
        async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
            async with client.get("/v1/health") as rsp:
                assert (rsp.status, (await rsp.json())["redis_full"]) == (200, False)
            r.config_set("maxmemory", 1)  # full for good (a margin below use can be freed)
            async with client.get("/v1/health") as rsp:
                body = await rsp.json()
        assert rsp.status == 200 and body["redis_full"] is True
        assert body["partitions"]["stopped"] == [0] and body["retry_running"] is False


def test_a_stop_gives_up_its_claim_within_its_time_on_a_hung_redis(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The claim on the prefix was given up with the driver's client, whose calls wait
    30 s: a Redis that hung at a stop held the stop that long past STOP_SEC (and `ray
    job stop` killed the job first). The release now waits the stop's time left, at
    most 5 s, and says the claim lapses by itself."""
    import logging
    import os
    import signal

    from engine.lease import EngineLease

    for client in own_redis():
        port = client.connection_pool.connection_kwargs["port"]
        engine = Engine.connect(settings.model_copy(
            update={"REDIS_URL": f"redis://127.0.0.1:{port}/0"}))
        lease = EngineLease(engine.redis, engine.keys, ttl_sec=30)
        assert lease.claim() is None
        engine.lease = lease
        pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGSTOP)  # hung: connections open, nothing answers
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="hookray"):
                engine.shutdown()
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert took < 10, took  # the client's own timeout is 30 s
        assert f"releasing {engine.keys.engine}: TimeoutError: " in caplog.text
        assert "(the claim lapses by itself within 30 s)" in caplog.text
        assert client.pttl(engine.keys.engine) > 0  # left to lapse, not released


async def test_health_names_an_evicting_policy_also_when_config_is_disabled(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Redis that may evict keys on its own drops accepted events, re-sends and
    hooks without a word: the start's one warning was all, and managed services,
    CONFIG disabled, gave not even that. GET /v1/health and `hookray health` name the
    policy (read from INFO), and `hookray health` exits 1 saying why."""
    import json as json_module

    from aiohttp.test_utils import TestClient, TestServer

    from actors.cli import main
    from engine.api import create_app
    from engine.health import eviction_policy
    from engine.keys import Keys

    for r in own_redis("--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""):
        with pytest.raises(redis.ResponseError):
            r.config_get("maxmemory-policy")  # as on a managed service
        assert eviction_policy(r) == "allkeys-lru" and eviction_risk(r) is not None
        port = r.connection_pool.connection_kwargs["port"]
        settings = Settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_PREFIX="evicts")
        async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client, \
                client.get("/v1/health") as rsp:
            body = await rsp.json()
        assert rsp.status == 200 and body["redis_eviction"] == "allkeys-lru"
        config = tmp_path / "main.json"
        config.write_text(json_module.dumps({"REDIS_URL": settings.REDIS_URL,
                                             "REDIS_PREFIX": "evicts"}))
        r.hset(Keys("evicts").config, "partitions", 1)
        capsys.readouterr()
        code = main(["-c", str(config), "health"])
        out, err = capsys.readouterr()
        assert code == 1 and json_module.loads(out)["redis_eviction"] == "allkeys-lru"
        assert "hookray: health: Redis evicts any key when it runs out of memory " \
            "(maxmemory-policy allkeys-lru)" in err
    for r in own_redis("--maxmemory-policy", "noeviction"):
        assert eviction_policy(r) is None


def test_the_engines_clients_speak_resp2_and_never_send_a_command_twice(
        settings: Settings) -> None:
    """redis-py 8 opens each connection with HELLO 3 (RESP3) by default: a Redis, proxy
    or ACL refusing HELLO refused the engine, and its replies' shapes hung on the
    installed redis-py. A client given to the engine is set to try no command again
    by itself (redis-py's default sends one again after a lost reply, when Redis may
    have carried it out: a hook created twice)."""
    from actors.workers import _redis
    from engine.api import Backend
    from engine.health import quick_client

    for r in own_redis("--rename-command", "HELLO", ""):
        port = r.connection_pool.connection_kwargs["port"]
        ours = settings.model_copy(update={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        engine = Engine.connect(ours)
        created = engine.create_hook({"name": "crm", "account_id": 3, "actions": ["click"],
                                      "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
        assert engine.get_hook(created.id or 0).name == "crm"
        for client in (engine.redis, _redis(ours), Backend.of(ours).r,
                       quick_client(engine.redis, 2)):
            assert client.ping()  # HELLO refused: no client of the engine sends it
            assert client.connection_pool.connection_kwargs["protocol"] == 2
            assert client.get_retry()._retries == 0
        engine.redis.close()
    given = redis.Redis(port=6379)  # redis-py's own default: 10 tries again
    assert given.get_retry()._retries > 0
    assert Engine(settings, r=given).redis.get_retry()._retries == 0
    given.close()
