"""The operations review's findings on the engine's log and its answers about damaged
data (/work/reviews/ops/REPORT.md 4, 5, 6, 9, 10, 12), without Ray: the workers' round
failures are logged once a minute per error, by one logger; a transport actor drops
aiormq's line per connection it cannot open; the actors' processes give the
``hookray`` logger a handler; the HTTP API (``create_app`` served in-process) logs a
Redis outage or a damaged token record once a minute, answers data Redis refuses to
use with 500 (not "try again") and a damaged ``{p}:config`` with the probe's shape;
token records are read strictly."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

import engine.health as health
from actors import logs
from engine.api import BACKEND, create_app
from engine.auth import TokenStore, tokens_key
from engine.errors import HookError
from engine.health import FAILING_ROUNDS, RoundFailures
from engine.keys import Keys
from engine.settings import Settings
from tests.services import free_port

DATE = "2026-11-29T10:00:00.123456789Z"
EVENT = {"event_type": "click", "event_date": DATE, "account_id": 1, "list_id": 1,
         "event_data": {"campaign_id": 7, "message_id": 5}}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """engine.health's monotonic clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(health.time, "monotonic", lambda: now[0])
    return now


def said(caplog: pytest.LogCaptureFixture, name: str = "hookray") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


# --- 4: a worker whose rounds keep failing -----------------------------------------------


def test_a_round_failing_twice_a_second_is_logged_once_then_once_a_minute(
        clock: list[float], caplog: pytest.LogCaptureFixture) -> None:
    failures = RoundFailures("partition 0", "no event is processed")
    with caplog.at_level(logging.INFO, logger="hookray"):
        for _ in range(120):  # a minute of a round failing every 0.5 s
            failures.failed(ValueError("invalid literal for int() with base 10: b'1.5'"))
            clock[0] += 0.5
        failures.failed(ValueError("invalid literal for int() with base 10: b'1.5'"))
        failures.failed(KeyError(0))  # another error: said at once, with its traceback
        failures.failed(KeyError(0))
    records = said(caplog)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("ERROR", "partition 0: a round failed"),
        ("ERROR", "partition 0: a round failed again, ValueError: invalid literal for int() "
                  "with base 10: b'1.5' (also 119 times since it was last logged, not logged)"),
        ("ERROR", "partition 0: a round failed")]
    first, again, other = records
    assert first.exc_info and isinstance(first.exc_info[1], ValueError)  # the traceback
    assert not again.exc_info
    assert other.exc_info and isinstance(other.exc_info[1], KeyError)
    # what health shows is as before: waiting once FAILING_ROUNDS rounds in a row failed
    assert failures.waiting == (f"every round fails ({FAILING_ROUNDS} or more in a row), "
                                "the last with KeyError: 0")


def test_redis_errors_and_waits_are_said_once_a_minute_too(
        clock: list[float], caplog: pytest.LogCaptureFixture) -> None:
    failures = RoundFailures("retry worker", "nothing is re-sent")
    with caplog.at_level(logging.INFO, logger="hookray"):
        for _ in range(3):
            failures.failed(redis.ConnectionError("Error 111 connecting"))
        assert failures.waiting == ""  # not FAILING_ROUNDS in a row yet
        for _ in range(3):
            failures.failed(HookError("stored hook 4 no longer validates"))
            clock[0] += 30
        assert failures.waiting == "stored hook 4 no longer validates"  # at once
        failures.passed()
        assert failures.waiting == ""
    assert [(r.levelname, r.getMessage()) for r in said(caplog)] == [
        ("WARNING", "retry worker: a round failed, Redis: ConnectionError: Error 111 "
                    "connecting (retrying)"),
        ("ERROR", "retry worker: waiting, nothing is re-sent until this is fixed: stored "
                  "hook 4 no longer validates"),
        ("ERROR", "retry worker: waiting, nothing is re-sent until this is fixed: stored "
                  "hook 4 no longer validates (also 1 time since it was last logged, not "
                  "logged)")]
    assert not any(r.exc_info for r in said(caplog))


def test_an_error_back_after_a_quiet_minute_is_said_in_full_again(
        clock: list[float], caplog: pytest.LogCaptureFixture) -> None:
    failures = RoundFailures("partition 1", "no event is processed")
    with caplog.at_level(logging.INFO, logger="hookray"):
        failures.failed(ValueError("x"))
        clock[0] += health.REPEAT_SEC + 1
        failures.failed(ValueError("x"))
    assert [r.getMessage() for r in said(caplog)] == ["partition 1: a round failed"] * 2
    assert all(r.exc_info for r in said(caplog))


def test_repeats_forget_old_lines_past_their_bound(clock: list[float],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "REPEATS_KEPT", 10)
    repeats = health.Repeats()
    assert [repeats.due(f"line {n}") for n in range(10)] == [0] * 10
    assert repeats.due("line 3") is None  # within the minute: counted
    clock[0] += health.REPEAT_SEC
    assert repeats.due("line 10") == 0  # the old lines are dropped for it
    assert len(repeats._seen) == 1


def test_the_actor_loop_counts_failed_rounds_and_leaves_the_log_to_the_worker(
        caplog: pytest.LogCaptureFixture) -> None:
    from actors.workers import _Looping

    loop = _Looping()
    loop._thread = threading.Thread(name="partition-0")
    loop._errors = 0
    with caplog.at_level(logging.DEBUG, logger="hookray"):
        for _ in range(3):
            loop._on_error(ValueError("the round's key holds the wrong kind of value"))
    assert loop._errors == 3
    assert not said(caplog)


# --- 5: a RabbitMQ hook whose broker is down ---------------------------------------------


def _modified(actor: Any) -> Any:
    """The class a @ray.remote class was made from (no Ray needed to build one)."""
    return actor.__ray_actor_class__


@pytest.fixture
def quiet_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An actor's __init__ without its process-wide side effects on the test run (the
    collector's settings; the hookray handler and aiormq filter are removed after)."""
    import actors.transport as transport

    monkeypatch.setattr(transport, "relax_gc", lambda: None)
    engine_log = logging.getLogger("hookray")
    handlers, level = list(engine_log.handlers), engine_log.level
    yield
    connect_errors = getattr(transport, "_connect_errors", None)
    if connect_errors is not None:
        logging.getLogger("aiormq.connection").removeFilter(connect_errors)
    engine_log.handlers[:] = handlers
    engine_log.setLevel(level)


def test_a_transport_actor_drops_aiormqs_line_per_failed_connect(
        quiet_setup: None, caplog: pytest.LogCaptureFixture) -> None:
    from actors.transport import TransportActor
    from engine.transports.base import Delivery

    actor = _modified(TransportActor)("rabbitmq_queue", Settings(
        BROKER_TIMEOUT_SEC=3.0).model_dump())
    port = free_port()  # nothing listens there
    target = json.dumps({"host": "127.0.0.1", "port": port, "user": "guest",
                         "password": "guest", "queue": "q"})
    model = actor._target("rabbitmq_queue", target)

    async def attempts() -> list[Any]:
        out = []
        for n in range(3):
            delivery = Delivery(id=f"d{n}", hook_id=1, account_id=1, kind="rabbitmq_queue",
                                parts=[b'{"a":1}'], keys=["1.click"], message_ids=["m"])
            out.append(await actor.transport.send(model, delivery))
        await actor.close()
        return out

    with caplog.at_level(logging.DEBUG):
        outcomes = asyncio.run(attempts())
    assert all(not o.ok and o.error == "ConnectError" for o in outcomes)
    assert all(f"127.0.0.1:{port}" in o.detail for o in outcomes)  # the reason is kept
    assert not [r for r in caplog.records
                if r.name.startswith("aiormq") and r.levelno >= logging.WARNING], caplog.text


# --- 9: the actors' processes configure the hookray logger -------------------------------


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The hookray logger as in a process with no logging configured, as Ray starts an
    actor's (the test sets the root's handlers aside: pytest adds its own per phase)."""
    engine_log = logging.getLogger("hookray")
    monkeypatch.setattr(engine_log, "handlers", [])
    level = engine_log.level
    engine_log.setLevel(logging.NOTSET)
    # ``configure`` gives aiohttp's logger its handler too: left to later tests, it
    # wrote to this test's captured stderr, closed by then ("Logging error")
    libraries = [logging.getLogger(name) for name in (*logs.LIBRARIES, *logs.SPARSE_LIBRARIES)]
    levels = [library.level for library in libraries]
    for library in libraries:
        monkeypatch.setattr(library, "handlers", [])
        library.setLevel(logging.NOTSET)
    yield engine_log
    engine_log.setLevel(level)
    for library, library_level in zip(libraries, levels, strict=True):
        library.setLevel(library_level)


def no_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_configure_gives_the_hookray_logger_one_stderr_handler_at_info(
        unconfigured: logging.Logger, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    no_root_handlers(monkeypatch)
    logs.configure()
    logs.configure()  # an actor restarted in the same process: none more
    (handler,) = unconfigured.handlers
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    assert unconfigured.level == logging.INFO
    logging.getLogger("hookray.api").info("hookray API on http://%s:%d", "0.0.0.0", 8080)
    logging.getLogger("hookray").debug("not shown")
    err = capsys.readouterr().err
    line, = err.splitlines()
    assert line.endswith(" INFO hookray.api: hookray API on http://0.0.0.0:8080"), err
    assert line[:4].isdigit()  # the time first


def test_configure_leaves_a_process_whose_logging_is_set_up(
        unconfigured: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    logs.configure()
    assert unconfigured.handlers == [] and unconfigured.level == logging.NOTSET


class _Configured(Exception):
    pass


@pytest.mark.parametrize("name, args", [
    ("actors.workers:PartitionActor", (0, {})),
    ("actors.workers:RetryActor", ({},)),
    ("actors.transport:TransportActor", ()),
    ("actors.api:ApiActor", ()),
])
def test_every_actor_configures_the_log_first(name: str, args: tuple[Any, ...],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # settings of nothing that answers: an actor that went on would do nothing harmful
    settings = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "API_HOST": "127.0.0.1"}
    args = ("http_batch", settings) if name.endswith("TransportActor") else (settings, *args)
    module_name, class_name = name.split(":")
    module = __import__(module_name, fromlist=[class_name])

    def configure() -> None:
        raise _Configured  # before anything else of __init__ runs

    monkeypatch.setattr(logs, "configure", configure)
    with pytest.raises(_Configured):
        _modified(getattr(module, class_name))(*args)


# --- 6 and 10: the HTTP API over a Redis that is down or holds damaged data --------------


async def _client(settings: Settings) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings),
                                                         host="127.0.0.1"))
    await client.start_server()
    return client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_redis_outage_is_logged_once_a_minute_not_per_request(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    down = settings.model_copy(update={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    client = await _client(down)
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            statuses = []
            for _ in range(50):
                async with client.post("/v1/events", json=[EVENT], headers=_bearer(
                        "hr_0123456789abcdef_" + "A" * 43)) as rsp:
                    statuses.append(rsp.status)
                    body = await rsp.json()
    finally:
        await client.close()
    assert statuses == [503] * 50 and body["error"]["code"] == "unavailable"
    lines = [r.getMessage() for r in said(caplog, "hookray.api")]
    assert len(lines) == 1 and lines[0].startswith("POST /v1/events: Redis: "), lines


async def test_a_damaged_token_record_is_warned_about_once_a_minute(
        settings: Settings, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    token, info = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    key = tokens_key(settings.REDIS_PREFIX)
    record = json.loads(redis_client.hget(key, info.id))  # type: ignore[arg-type]
    redis_client.hset(key, info.id, json.dumps({**record, "created": "yesterday"}))
    client = await _client(settings)
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            for _ in range(30):
                async with client.get("/v1/hooks", headers=_bearer(token)) as rsp:
                    assert rsp.status == 401
    finally:
        await client.close()
    lines = [r.getMessage() for r in said(caplog)]
    assert len(lines) == 1 and lines[0].startswith(f"token {info.id}: its record cannot be "
                                                   "read (ValueError: created 'yesterday'")


async def test_data_redis_refuses_to_use_is_500_naming_no_key(
        settings: Settings, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.REDIS_PREFIX)
    token, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    hook = {"name": "crm", "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/hook"}}}
    client = await _client(settings)
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            redis_client.set(keys.hooks_seq, "abc")  # a counter that is no integer
            async with client.post("/v1/hooks", json=hook, headers=_bearer(token)) as rsp:
                seq = rsp.status, await rsp.json()
            redis_client.delete(keys.hooks_seq)
            redis_client.set(keys.config, "x")  # a hash that is a string: WRONGTYPE
            async with client.post("/v1/events", json=[EVENT], headers=_bearer(token)) as rsp:
                events = rsp.status, await rsp.json()
            redis_client.delete(keys.config)
            redis_client.set(tokens_key(settings.REDIS_PREFIX), "x")  # before any token
            async with client.get("/v1/hooks", headers=_bearer(token)) as rsp:
                tokens = rsp.status, await rsp.json()
    finally:
        await client.close()
    for status, body in (seq, events, tokens):
        assert status == 500 and body["error"]["code"] == "internal_error", body
        assert body["error"]["message"].startswith("data the engine keeps in Redis is "
                                                   "damaged: "), body
        assert "try again" not in body["error"]["message"]
        assert settings.REDIS_PREFIX not in json.dumps(body)  # no key named
    assert "a counter holds something other than a number" in seq[1]["error"]["message"]
    assert "Some of the events may have been accepted" in events[1]["error"]["message"]
    assert "a key holds another kind of value" in tokens[1]["error"]["message"]
    lines = [r for r in said(caplog, "hookray.api") if r.levelno == logging.ERROR]
    assert [r.getMessage().split(":")[0] for r in lines] == [
        "POST /v1/hooks", "POST /v1/events", "GET /v1/hooks"]


async def test_data_the_engine_finds_damaged_itself_is_500_naming_no_key_too(
        settings: Settings, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A counter read back that holds no number, a recorded PARTITIONS that is no
    count, a version that is no number: found by the engine, not refused by Redis. They
    answered 503 "unavailable" (try again), naming the key, to any token."""
    keys = Keys(settings.REDIS_PREFIX)
    master, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    ingest, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "ingest")
    hook = {"name": "crm", "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/hook"}}}
    client = await _client(settings)
    answers = []
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            async with client.post("/v1/hooks", json=hook, headers=_bearer(master)) as rsp:
                made = await rsp.json()
            redis_client.hset(keys.stats(made["id"]), "delivered", "oops")
            for path in ("/v1/stats", f"/v1/hooks/{made['id']}/stats"):
                async with client.get(path, headers=_bearer(master)) as rsp:
                    answers.append((rsp.status, await rsp.json()))
            redis_client.hset(keys.config, "partitions", "four")
            async with client.post("/v1/events", json=[EVENT], headers=_bearer(ingest)) as rsp:
                answers.append((rsp.status, await rsp.json()))
    finally:
        await client.close()
    for status, body in answers:
        assert status == 500 and body["error"]["code"] == "internal_error", body
        assert body["error"]["message"].startswith("data the engine keeps in Redis is "
                                                   "damaged: "), body
        assert settings.REDIS_PREFIX not in json.dumps(body)  # no key named
    assert [body["error"]["message"].split(": ")[1].split(".")[0] for _, body in answers] == [
        "a counter holds something other than a number"] * 2 + [
        "the engine's recorded PARTITIONS is no count"]
    assert all(body["error"]["message"].endswith("(the engine's log names the key and how)")
               for _, body in answers)
    lines = [r.getMessage() for r in said(caplog, "hookray.api") if r.levelno == logging.ERROR]
    assert any(keys.config in line for line in lines)  # the log names the key
    assert redis_client.xlen(keys.intake(0)) == redis_client.xlen(keys.intake(1)) == 0


@pytest.mark.parametrize("error", [
    redis.ResponseError("LOADING Redis is loading the dataset in memory"),
    redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's "
                        "currently unable to persist to disk"),
    redis.ResponseError("Command # 1 (HSET k f v) of pipeline caused error: BUSY Redis is "
                        "busy running a script"),
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
    redis.TimeoutError("Timeout reading from socket"),
])
async def test_a_redis_that_refuses_for_now_is_still_503(
        settings: Settings, redis_client: redis.Redis, error: redis.RedisError) -> None:
    token, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    app = create_app(settings)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    app[BACKEND].hooks.listing = refuse  # type: ignore[method-assign]
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with client.get("/v1/hooks", headers=_bearer(token)) as rsp:
            status, body = rsp.status, await rsp.json()
    finally:
        await client.close()
    assert status == 503 and body["error"] == {
        "code": "unavailable", "message": "the engine's Redis is unavailable; try again"}


async def test_health_over_a_damaged_config_answers_the_probe_shape(
        settings: Settings, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.REDIS_PREFIX)
    client = await _client(settings)
    answers = []
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            redis_client.hset(keys.config, "partitions", "four")
            for _ in range(3):
                async with client.get("/v1/health") as rsp:
                    answers.append((rsp.status, await rsp.json()))
            redis_client.delete(keys.config)
            redis_client.set(keys.config, "x")  # no hash at all
            async with client.get("/v1/health") as rsp:
                answers.append((rsp.status, await rsp.json()))
    finally:
        await client.close()
    damaged = {"status": "unavailable",
               "reason": "the engine's configuration in Redis is damaged (the engine's log "
                         "names it)"}
    assert answers == [(503, damaged)] * 4
    lines = [r.getMessage() for r in said(caplog, "hookray.api")]
    assert len(lines) == 2, lines  # once a minute per cause, not per probe
    assert lines[0].startswith(f"GET /v1/health: {keys.config} field partitions holds 'four'")
    assert lines[1].startswith("GET /v1/health: Redis refused a command (WRONGTYPE")


async def test_health_over_a_refusal_that_is_not_the_datas_says_so(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis refusal that does not pass and is no damaged data (an ACL that forbids a
    command) is not called a damaged configuration."""
    import engine.api

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("NOPERM this user has no permissions to run the 'mget' "
                                  "command")

    monkeypatch.setattr(engine.api, "engine_health", refused)
    client = await _client(settings)
    try:
        async with client.get("/v1/health") as rsp:
            status, body = rsp.status, await rsp.json()
    finally:
        await client.close()
    assert (status, body) == (503, {"status": "unavailable", "reason": "the engine's Redis "
                                    "refused a command (the engine's log says which)"})


# --- 12: token records are read as hookray writes them -----------------------------------


@pytest.mark.parametrize("change", [
    {"account_id": True}, {"account_id": -7}, {"account_id": 2**63}, {"account_id": "1"},
    {"account_id": 1.0}, {"created": "nan"}, {"created": float("nan")},
    {"created": float("inf")}, {"created": "1700000000"}, {"created": True},
    {"created": None},
])
def test_a_token_record_with_a_bad_account_or_time_authenticates_nothing(
        settings: Settings, redis_client: redis.Redis, change: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    store = TokenStore(redis_client, settings.REDIS_PREFIX)
    token, info = store.create(1, "master", "mine")
    kept, _ = store.create(2, "ingest", "other")
    record = json.loads(redis_client.hget(store.key, info.id))  # type: ignore[arg-type]
    redis_client.hset(store.key, info.id, json.dumps({**record, **change}))
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert store.authenticate(token) is None
        listed = store.list()
    assert [i.account_id for i in listed] == [2]  # the other token is still read
    field = next(iter(change))
    assert f"token {info.id}: its record cannot be read (ValueError: {field} " in caplog.text
    assert store.authenticate(kept) is not None


def test_a_well_formed_token_record_still_authenticates(
        settings: Settings, redis_client: redis.Redis) -> None:
    store = TokenStore(redis_client, settings.REDIS_PREFIX)
    token, info = store.create(0, "master", "zero")
    record = json.loads(redis_client.hget(store.key, info.id))  # type: ignore[arg-type]
    redis_client.hset(store.key, info.id, json.dumps({**record, "created": 1700000000}))
    found = store.authenticate(token)
    assert found is not None and (found.account_id, found.created) == (0, 1700000000.0)


def test_configure_gives_aiohttps_errors_the_same_handler(
        unconfigured: logging.Logger, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # "Error handling request" and the like, aiohttp's own lines in the API actor
    no_root_handlers(monkeypatch)
    library = logging.getLogger("aiohttp")
    logs.configure()
    assert library.handlers == unconfigured.handlers and library.level == logging.WARNING
    logging.getLogger("aiohttp.server").error("Error handling request")
    logging.getLogger("aiohttp.access").info("not shown: below WARNING")
    line, = capsys.readouterr().err.splitlines()
    assert line.endswith(" ERROR aiohttp.server: Error handling request"), line


def test_configure_says_a_broker_clients_repeated_lines_once_a_minute(
        unconfigured: logging.Logger, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a Kafka broker was down, aiokafka logged each failed connect and metadata
    refresh, bare (Python's last-resort handler), about 7 lines a second per
    destination: 274 of a soak's 334 log lines. Each kind is said once a minute now,
    with its time, level and logger."""
    no_root_handlers(monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    logs.configure()
    for _ in range(50):
        logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", 1,
                                            "refused")
        logging.getLogger("aiokafka.conn").warning("Connection to %s failed", "b:9092")
        clock[0] += 0.1
    logging.getLogger("aiormq.connection").warning("Connection lost")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "ERROR aiokafka: Unable connect to node with id 1: refused",
        "WARNING aiokafka.conn: Connection to b:9092 failed",
        "WARNING aiormq.connection: Connection lost"], lines
    clock[0] += logs.SPARSE_SEC
    logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", 2, "reset")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" ERROR aiokafka: Unable connect to node with id 2: reset")


async def test_an_unexpected_error_is_logged_once_a_minute_with_its_traceback(
        settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a minute per route and cause: a fault that fails every request of a route
    with an id in its path (one per hook) is not said once per id either."""
    token, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    client = await _client(settings)
    backend = client.app[BACKEND]  # type: ignore[index]

    def broken(*args: Any) -> Any:
        raise RuntimeError("a fault of the engine's")

    for store, method in ((backend.stats, "get_many"), (backend.hooks, "owner"),
                          (backend.hooks, "get")):
        monkeypatch.setattr(store, method, broken)
    try:
        with caplog.at_level(logging.INFO, logger="hookray"):
            for n in range(1, 40):
                async with client.get("/v1/stats", headers=_bearer(token)) as rsp:
                    assert rsp.status == 500
                    assert (await rsp.json())["error"]["message"] == "internal error"
                async with client.get(f"/v1/hooks/{n}", headers=_bearer(token)) as rsp:
                    assert rsp.status == 500
    finally:
        await client.close()
    records = said(caplog, "hookray.api")
    assert [r.getMessage() for r in records] == ["GET /v1/stats failed",
                                                 "GET /v1/hooks/1 failed"]
    assert records[0].exc_info and isinstance(records[0].exc_info[1], RuntimeError)


@pytest.mark.parametrize("deny, open_groups", [
    ("link-local,metadata", ["loopback", "private"]),  # the default
    ("none", ["loopback", "private"]),
    ("link-local,loopback", ["private"]),
    ("127.0.0.0/8,::1,0.0.0.0/8,::/128,10.0.0.0/8", ["private"]),  # 172.16/12... open
    ("link-local,loopback,private", []),
    # networks next to one another cover what they cover together
    ("10.0.0.0/9,10.128.0.0/9,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7",
     ["loopback"]),
    ("0.0.0.0/0,::/0", []),
])
def test_internal_open_names_the_groups_of_the_engines_network_left_open(
        deny: str, open_groups: list[str]) -> None:
    from engine.transports.guard import internal_open

    assert internal_open(deny) == open_groups


@pytest.mark.parametrize("deny, warned", [("link-local,metadata", True),
                                          ("link-local,loopback,private", False)])
def test_the_api_warns_at_start_when_accounts_hooks_may_reach_its_network(
        deny: str, warned: bool, quiet_setup: None,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import actors.api as api_actor
    from actors.api import ApiActor

    # the collector's settings of an actor's process are not the test run's
    monkeypatch.setattr(api_actor, "relax_gc", lambda: None)

    settings = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "API_HOST": "127.0.0.1",
                "DESTINATION_DENY": deny}
    with caplog.at_level(logging.INFO, logger="hookray"):
        actor = _modified(ApiActor)(settings, 0)
    try:
        lines = [r.getMessage() for r in said(caplog)
                 if r.levelno == logging.WARNING]
    finally:
        actor.stop()
    if warned:
        assert len(lines) == 1 and lines[0].startswith(
            "DESTINATION_DENY (link-local,metadata) does not deny loopback or private: "), lines
        assert lines[0].endswith("set DESTINATION_DENY to include loopback,private unless "
                                 "every account is trusted")
    else:
        assert lines == []
