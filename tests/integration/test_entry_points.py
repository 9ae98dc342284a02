"""The Python driver's settings, arguments and joining of Ray, and the intake's partition
count guard."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from actors.driver import Engine
from engine.errors import ConfigError, EventError, HookError, NotFound
from engine.events import Event
from engine.intake import Intake
from engine.keys import Keys
from engine.settings import Settings, ray_address_problem
from tests.services import wait_for

pytestmark = pytest.mark.integration


def click(n: int) -> dict[str, object]:
    return {"event_type": "click", "account_id": 1, "list_id": n,
            "event_date": "2026-01-01T00:00:00Z", "id": f"e{n}"}


def test_keyword_overrides_are_validated_like_any_setting(settings: Settings) -> None:
    with pytest.raises(ConfigError) as info:
        Engine.connect(settings, PARTITIONS=0, REDIS_PREFX="typo", HOOK_RETRY_TIMES="lots")
    text = str(info.value)
    assert "PARTITIONS=0 (given): Input should be greater than or equal to 1" in text
    assert "REDIS_PREFX='typo' (given): unknown setting" in text
    assert "HOOK_RETRY_TIMES='lots' (given)" in text
    engine = Engine.connect(settings, PARTITIONS=3)
    assert engine.settings.PARTITIONS == 3
    engine.redis.close()


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A handle on the test prefix's Redis (no actors)."""
    handle = Engine.connect(settings)
    yield handle
    handle.shutdown()


def hook_data(**changes: object) -> dict[str, object]:
    return {"name": "crm", "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}, **changes}


def test_stats_of_a_hook_that_does_not_exist_is_not_found(
        engine: Engine, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Not a row of zeros: as GET /v1/hooks/{id}/stats (404) and `hookray stats --hook`;
    but a deleted hook that counted messages keeps its counters (its dead letters may
    still be replayed or discarded)."""
    from actors import cli

    hook, kept = engine.create_hook(hook_data()), engine.create_hook(hook_data(name="b"))
    assert engine.stats(hook.id)["accepted"] == 0
    with pytest.raises(NotFound, match=r"^hook 999 does not exist$"):
        engine.stats(999)
    with engine.redis.pipeline() as pipe:
        engine._stats.add(pipe, kept.id, "dead_lettered", 2)
        pipe.execute()
    engine.delete_hook(hook.id)
    engine.delete_hook(kept.id)
    with pytest.raises(NotFound, match=f"^hook {hook.id} does not exist$"):
        engine.stats(hook.id)
    assert engine.stats(kept.id)["dead_lettered"] == 2
    monkeypatch.setenv("REDIS_URL", engine.settings.REDIS_URL)
    monkeypatch.setenv("REDIS_PREFIX", engine.settings.REDIS_PREFIX)
    assert cli.main(["stats", "--hook", "999"]) == 2
    assert capsys.readouterr().err == "hookray: error: hook 999 does not exist\n"


@pytest.mark.parametrize("data", [None, 5, "crm", [], [("name", "crm")]])
def test_a_hook_that_is_not_a_mapping_is_a_hook_error(engine: Engine, data: object) -> None:
    expected = f"invalid hook: expected a mapping of hook fields (a JSON object), " \
               f"got {type(data).__name__}"
    with pytest.raises(HookError) as info:
        engine.create_hook(data)  # type: ignore[arg-type]
    assert str(info.value) == expected
    hook = engine.create_hook(hook_data())
    with pytest.raises(HookError) as info:
        engine.update_hook(hook.id, data)  # type: ignore[arg-type]
    assert str(info.value) == expected
    assert engine.get_hook(hook.id) == hook
    assert [h.id for h in engine.list_hooks()] == [hook.id]


@pytest.mark.parametrize("events", [None, 5, {"event_type": "click"}])
def test_events_that_are_not_a_list_are_an_event_error(engine: Engine, events: object) -> None:
    with pytest.raises(EventError, match=r"^expected a list of events .*; nothing accepted$"):
        engine.publish(events)  # type: ignore[arg-type]
    assert engine.backlog() == 0


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "10", None])
def test_a_dead_letter_limit_below_one_is_refused(engine: Engine, limit: object) -> None:
    with pytest.raises(ValueError, match=r"^dead_letters: limit must be a whole number "
                                         r">= 1, got "):
        engine.dead_letters(limit=limit)  # type: ignore[arg-type]
    assert engine.dead_letters(limit=1) == []


@pytest.mark.parametrize("account", ["x", "23", -1, 2**63, True, 1.0, None])
def test_profiles_of_an_account_that_is_no_id_are_refused(
        engine: Engine, redis_client: redis.Redis, account: object) -> None:
    with pytest.raises(ValueError, match=r"^upsert_profiles: account_id .* is not an integer "
                                         r"from 0 to 9223372036854775807$"):
        engine.upsert_profiles(account, {"p1": {"email": "a@example.org"}})  # type: ignore
    assert not list(redis_client.scan_iter(f"{engine.settings.REDIS_PREFIX}:*profiles*"))


@pytest.mark.parametrize("profiles", [None, ["p1"], {"p1": "a@example.org"}, {1: {"a": 1}}])
def test_profiles_that_are_not_a_mapping_of_mappings_are_refused(
        engine: Engine, profiles: object) -> None:
    with pytest.raises(ValueError, match="^upsert_profiles: profiles must map each profile "
                                         r"id \(a string\) to its fields \(a mapping\)$"):
        engine.upsert_profiles(1, profiles)  # type: ignore[arg-type]
    assert engine.upsert_profiles(1, {"p1": {"email": "a@example.org"}}) == 1


# --- joining Ray ---------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "reason"), [
    ("http://127.0.0.1:8265", "this is the address of the Ray Jobs API"),
    ("garbage", "expected HOST:PORT"),
    ("127.0.0.1:{closed}", "Connection refused"),
])
def test_a_ray_address_naming_no_cluster_is_a_config_error_before_ray_init(
        address: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from actors import driver

    def no_init(*args: object, **kwargs: object) -> None:
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", no_init)
    # a port bound here and not listening refuses connections, and no other process
    # can take it meanwhile (a port found free when the tests were collected could be)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = address.format(closed=closed.getsockname()[1])
    with closed:
        with pytest.raises(ConfigError, match=f"^RAY_ADDRESS={address!r}: .*{reason}"):
            driver._init_ray(address)
        # unset or auto: RAY_ADDRESS of the environment, as ray.init takes it
        monkeypatch.setenv("RAY_ADDRESS", address)
        for given in (None, "", "auto"):
            with pytest.raises(ConfigError, match=f"^RAY_ADDRESS={address!r}: .*{reason}"):
                driver._init_ray(given or None)


def test_inside_a_ray_job_the_address_ray_sets_is_accepted() -> None:
    """Ray's job supervisor sets RAY_ADDRESS to the cluster's GCS, HOST:PORT (and "auto"
    for its own process): both are cluster addresses, unlike the Jobs API's http://."""
    assert ray_address_problem("10.0.0.5:6379") is None
    assert ray_address_problem("auto") is None


def test_a_producer_with_another_partition_count_is_refused(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The engine records its PARTITIONS; a producer writing for another count would put
    events in streams no partition reads: refused, nothing written."""
    engine_side = Intake(redis_client, keys, 2, 100)
    engine_side.ensure_groups()
    engine_side.record_partitions()
    assert redis_client.hget(keys.config, "partitions") == b"2"
    other = Intake(redis_client, keys, 8, 100)
    with pytest.raises(ConfigError, match=r"PARTITIONS is 8 here but the engine .* runs "
                                          r"with 2: .* nothing was accepted"):
        other.publish([click(n) for n in range(20)])
    built = [Event(event_type="click", account_id=1, list_id=1,
                   event_date="2026-01-01T00:00:00Z") for _ in range(3)]
    with pytest.raises(ConfigError, match="PARTITIONS is 8 here"):
        other.publish(built)
    assert [e.id for e in built] == [None] * 3  # ids given for the attempt: taken back
    assert not any(redis_client.exists(keys.intake(n)) for n in range(2, 8))
    assert sum(redis_client.xlen(keys.intake(n)) for n in range(2)) == 0
    assert engine_side.publish([click(n) for n in range(20)]).accepted == 20
    # the engine cannot restart with another count while its intake holds events ...
    with pytest.raises(ConfigError, match=r"PARTITIONS is 8 but the engine ran with 2 and "
                                          r"its intake still holds events: .*intake:\d"):
        other.record_partitions()
    assert redis_client.hget(keys.config, "partitions") == b"2"
    # ... and can once they are delivered (here: deleted)
    for n in range(2):
        redis_client.delete(keys.intake(n))
    other.record_partitions()
    assert redis_client.hget(keys.config, "partitions") == b"8"
    assert other.publish([click(n) for n in range(20)]).accepted == 20
    with pytest.raises(ConfigError, match="PARTITIONS is 2 here"):
        engine_side.publish([click(1)])


def test_streams_written_before_any_count_was_recorded_are_not_stranded(
        redis_client: redis.Redis, keys: Keys) -> None:
    """Data of an earlier version, or producers that ran before any engine: an engine
    whose count would not read some of the streams there refuses to start."""
    producer = Intake(redis_client, keys, 8, 100)
    producer.ensure_groups()
    assert producer.publish([click(n) for n in range(40)]).accepted == 40  # nothing recorded
    high = [n for n in range(4, 8) if redis_client.xlen(keys.intake(n))]
    assert high
    engine_side = Intake(redis_client, keys, 4, 100)
    with pytest.raises(ConfigError, match=r"PARTITIONS is 4 but the engine had no count "
                                          r"recorded and its intake holds events this count "
                                          rf"would never read: .*intake:{high[0]} "):
        engine_side.record_partitions()
    assert redis_client.hget(keys.config, "partitions") is None
    Intake(redis_client, keys, 8, 100).record_partitions()  # the count that wrote them
    assert redis_client.hget(keys.config, "partitions") == b"8"


def test_a_first_record_whose_check_never_ended_is_checked_by_the_next_start(
        redis_client: redis.Redis, keys: Keys) -> None:
    """An engine recorded its count and stopped before checking the streams (the mark
    stays): the next start with that count checks them itself."""
    producer = Intake(redis_client, keys, 8, 100)
    producer.ensure_groups()
    producer.publish([click(n) for n in range(40)])  # nothing recorded yet
    redis_client.hset(keys.config, mapping={"partitions": 4, "checking": "gone-engine"})
    engine_side = Intake(redis_client, keys, 4, 100)
    with pytest.raises(ConfigError, match="holds events this count would never read"):
        engine_side.record_partitions()
    for n in range(4, 8):  # delivered by an engine of 8, say
        redis_client.delete(keys.intake(n))
    engine_side.record_partitions()
    assert redis_client.hgetall(keys.config) == {b"partitions": b"4"}  # checked: mark gone
    engine_side.record_partitions()  # and from then on: nothing to do


def test_a_producer_racing_the_first_record_is_refused_not_stranded(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer of another count publishing while the engine records its count for
    the first time (between the record and the check of the streams): refused."""
    engine_side, producer = Intake(redis_client, keys, 4, 100), Intake(redis_client, keys, 8, 100)
    engine_side.ensure_groups()
    scan = Intake._streams
    refused: list[str] = []

    def racing(self: Intake) -> list[tuple[int, str]]:
        try:
            producer.publish([click(n) for n in range(40)])
        except ConfigError as exc:
            refused.append(str(exc))
        return scan(self)

    monkeypatch.setattr(Intake, "_streams", racing)
    engine_side.record_partitions()
    assert refused and "PARTITIONS is 8 here but the engine" in refused[0]
    assert redis_client.hget(keys.config, "partitions") == b"4"
    assert not any(redis_client.exists(keys.intake(n)) for n in range(4, 8))


SCRIPT = textwrap.dedent("""
    import ray
    from actors.driver import Engine
    from engine.settings import Settings

    def start(prefix):
        return Engine.start(Settings(REDIS_URL={url!r}, REDIS_PREFIX=prefix, PARTITIONS=1,
                                     HTTP_POOL_SIZE=1))

    first, second = start({prefix!r} + "a"), start({prefix!r} + "b")
    first.shutdown()
    assert ray.is_initialized(), "Ray went down with the first engine"
    assert ray.get(second.actors["retry"].ping.remote(), timeout=30)
    second.shutdown()
    assert not ray.is_initialized(), "Ray outlived the last engine"
    second.shutdown()  # again: nothing to do, no error
    print("ok")
""")


def test_ray_started_by_engines_stops_with_the_last_of_them(settings: Settings,
                                                            redis_client: redis.Redis) -> None:
    code = SCRIPT.format(url=settings.REDIS_URL, prefix=settings.REDIS_PREFIX)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=240, cwd=Path(__file__).resolve().parents[2])
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
            proc.stdout[-2000:] + proc.stderr[-3000:]
    finally:
        for suffix in ("a", "b"):
            keys = list(redis_client.scan_iter(f"{settings.REDIS_PREFIX}{suffix}:*"))
            if keys:
                redis_client.delete(*keys)


class RedisProxy:
    """A TCP proxy to Redis; subclasses decide what happens to an EXEC on its way."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.redis_port))
            cut = threading.Event()  # set: nothing more goes back to the client
            for args in ((client, server, cut, True), (server, client, cut, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: threading.Event,
              upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if not upstream:
                    if cut.is_set():
                        break
                    dst.sendall(data)
                elif not self.forward(data, dst, cut):
                    break
        except OSError:
            pass
        finally:
            time.sleep(0.3)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def forward(self, data: bytes, dst: socket.socket, cut: threading.Event) -> bool:
        """Send ``data`` (from the client) on; False ends the connection."""
        dst.sendall(data)
        return True

    def close(self) -> None:
        self.listener.close()


class ExecReplyDropper(RedisProxy):
    """Forwards the first EXEC, lets Redis apply it, and then drops the client's
    connection before the reply: the batch is in, the client sees a lost connection."""

    dropped = 0

    def forward(self, data: bytes, dst: socket.socket, cut: threading.Event) -> bool:
        if b"EXEC" not in data or self.dropped:
            return super().forward(data, dst, cut)
        self.dropped = 1
        cut.set()  # before forwarding: no part of the reply gets through
        dst.sendall(data)
        time.sleep(0.2)  # Redis applies the transaction meanwhile
        return False


class ExecDelayer(RedisProxy):
    """Holds the first EXEC for ``delay`` seconds (a slow network): a client with a
    shorter socket timeout gives up and tries again, and the held EXEC reaches Redis
    after that."""

    held = 0

    def __init__(self, redis_port: int, delay: float) -> None:
        self.delay = delay
        self.sent = threading.Event()  # the held EXEC went on to Redis
        self.held_port = 0  # the local port of the connection that carried it
        super().__init__(redis_port)

    def forward(self, data: bytes, dst: socket.socket, cut: threading.Event) -> bool:
        if b"EXEC" in data and not self.held:
            self.held = 1
            time.sleep(self.delay)
            self.held_port = dst.getsockname()[1]
            goes_on = super().forward(data, dst, cut)
            self.sent.set()
            return goes_on
        return super().forward(data, dst, cut)


def test_a_connection_lost_after_redis_took_a_batch_does_not_write_it_twice(
        redis_client: redis.Redis, keys: Keys) -> None:
    kwargs = redis_client.connection_pool.connection_kwargs
    proxy = ExecReplyDropper(int(kwargs["port"]))
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=int(kwargs.get("db", 0)))
    try:
        result = Intake(client, keys, 1, 100).publish([click(n) for n in range(3)])
    finally:
        client.close()
        proxy.close()
    assert proxy.dropped == 1 and result.accepted == 3
    assert redis_client.xlen(keys.intake(0)) == 1  # one entry, not one per attempt
    assert redis_client.hget(keys.engine_stats, "events_accepted") == b"3"


def test_an_exec_that_arrives_late_after_a_timeout_is_not_written_twice(
        redis_client: redis.Redis, keys: Keys) -> None:
    """The client times out, finds no receipt, appends again; the first EXEC reaches
    Redis afterwards and is aborted by the receipt the second one set."""
    kwargs = redis_client.connection_pool.connection_kwargs
    proxy = ExecDelayer(int(kwargs["port"]), delay=1.5)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=int(kwargs.get("db", 0)),
                         socket_timeout=0.5)
    try:
        result = Intake(client, keys, 1, 100).publish([click(n) for n in range(3)])
    finally:
        client.close()
        proxy.close()
    assert proxy.sent.wait(10)
    # the held EXEC has been run once the connection that carried it last ran an EXEC
    addr = f"127.0.0.1:{proxy.held_port}"
    assert wait_for(lambda: any(c["addr"] == addr and c["cmd"] == "exec"
                                for c in redis_client.client_list()), 10)
    assert proxy.held == 1 and result.accepted == 3
    assert redis_client.xlen(keys.intake(0)) == 1
    assert redis_client.hget(keys.engine_stats, "events_accepted") == b"3"


def test_receipts_of_finished_appends_are_deleted_by_later_ones(
        redis_client: redis.Redis, keys: Keys) -> None:
    """One event per publish, from several threads: the receipts left are a handful
    (the last appends'), not one per publish for RECEIPT_SEC."""
    intake = Intake(redis_client, keys, 2, 100)

    def receipts() -> int:
        return sum(1 for _ in redis_client.scan_iter(match=f"{keys.p}:intake:receipt:*"))

    intake.publish([click(0)])
    assert receipts() == 1
    for n in range(1, 50):
        intake.publish([click(n)])
    assert receipts() == 1
    errors: list[BaseException] = []

    def publish_some(offset: int) -> None:
        try:
            for n in range(50):
                intake.publish([click(offset + n)])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish_some, args=(1000 * (t + 1),)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and receipts() <= 4
    assert redis_client.hget(keys.engine_stats, "events_accepted") == b"250"
    assert sum(redis_client.xlen(keys.intake(n)) for n in range(2)) == 250


def test_receipts_an_append_could_not_delete_are_deleted_by_a_later_one(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A refused append (another PARTITIONS recorded) deletes nothing: the receipt
    it was to delete stays for the next append, which deletes it."""
    intake = Intake(redis_client, keys, 2, 100)

    def receipts() -> set[bytes]:
        return set(redis_client.scan_iter(match=f"{keys.p}:intake:receipt:*"))

    intake.publish([click(0)])
    (first,) = receipts()
    redis_client.hset(keys.config, "partitions", 3)
    with pytest.raises(ConfigError, match="PARTITIONS is 2 here"):
        intake.publish([click(1)])
    assert receipts() == {first}  # not deleted by the refused append, none of its own
    redis_client.hset(keys.config, "partitions", 2)
    intake.publish([click(2)])
    (last,) = receipts()
    assert last != first
