"""Kafka transport (spec e, our proposal): one record per message, through aiokafka.

* **Records.** Every part of a ``Delivery`` becomes one record: value = the
  message's JSON bytes, key = ``Delivery.keys[i]`` as UTF-8 (the hook's key
  choice, computed by the dispatcher; ``""`` means no key), and one header
  ``hook_message_id`` = ``Delivery.message_ids[i]`` so consumers can
  de-duplicate what at-least-once delivery may send twice. Producers use
  ``acks=all``, no compression and no idempotence (de-duplication is the
  consumer's, by that header).
* **Batching.** Records are written straight into record batches, 256 KiB at
  most, one or more per partition and delivery, handed to aiokafka's
  ``send_batch``: against tansu on one machine, 170-270k records/s where one
  ``send()`` per record gives 35-40k. The batches are built a whole batch at a
  time (``kafka_batch``: the bytes aiokafka's builder writes, about 0.45 against
  0.73 us per record with aiokafka's ``append`` loop). The partition is chosen
  here, the way Kafka's default partitioner does: keyed records by
  ``murmur2(key)`` (the same partition a Java or aiokafka producer picks for
  that key), keyless records all go to one partition per delivery, rotating
  from delivery to delivery over the partitions with a leader (sticky partitioning).
  A batch the broker refuses as too large (a topic whose ``max.message.bytes`` is
  below 256 KiB) is split, as Kafka's own producer does: once the delivery's other
  batches are answered, its records go again at once in batches of half its size
  (and again, until they fit), so they land after the delivery's later records
  of that partition. The topic's batches stay at most that half from then on
  (for the transport's life, and smaller when a half is refused again). A record
  too large on its own is ``Rejected``.
* **Topics are never created by hookray.** The topic must exist, or the broker
  must create it on first use (Kafka's ``auto.create.topics.enable``; tansu
  always does). A topic the broker neither knows nor creates is ``Rejected``,
  retried and finally dead-lettered like any other failure.
* **Producers** are cached per (bootstrap servers, security settings), started
  on their first delivery. At most ``concurrency`` deliveries are in flight on one
  producer; the others wait their turn before their ``timeout_sec`` starts, so a
  backlog is not mistaken for a dead broker. A producer that lost its connection,
  or had nothing acknowledged for a whole timeout, is closed; for
  ``BREAKER_OPEN_SEC`` deliveries to it then fail fast (so a black-holed broker
  does not hold every queued delivery for a full timeout), and the next delivery
  after that starts a new producer, which picks up a restarted or replaced broker.
* **Errors.** ``ConnectError``: no bootstrap server reachable (the message names
  them and the reason), TLS or SASL handshake failure; ``Timeout``: the records
  were not all acknowledged within ``timeout_sec``; ``Rejected``: the broker
  refused the records (unknown topic, authorization, size...). aiokafka's own
  exceptions never leave ``send``. Each record batch is acknowledged on its own:
  when some of a delivery's batches were and others were not, the error names
  the records of the others (``TransportError.failed``), and only they are sent
  again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import aiokafka.client
import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    ProducerClosed,
    RecordListTooLargeError,
    RequestTimedOutError,
)
from aiokafka.partitioner import murmur2

from engine.assembly import gather
from engine.errors import ConnectError, Rejected, Timeout, TransportError
from engine.hooks import Kafka
from engine.partitioning import positions_by_code
from engine.transports.base import (
    Delivery,
    IdleSweep,
    Outcome,
    Transport,
    close_idle,
    make_room,
)
from engine.transports.guard import Denied, DestinationGuard
from engine.transports.kafka_batch import PrebuiltBatch, batches, header_fields, key_field
from engine.transports.tls import client_context_for

log = logging.getLogger("hookray.kafka")

HEADER = "hook_message_id"
DEFAULT_TIMEOUT_SEC = 10.0
MAX_BATCH_BYTES = 256 * 1024  # per record batch; measured best of 16 KiB .. 1 MiB
MAX_REQUEST_BYTES = 4 * 1024 * 1024
KEY_CACHE_MAX = 100_000  # key text -> (bytes, murmur2) entries before the cache is dropped
BREAKER_OPEN_SEC = 1.0  # after a producer failed, deliveries fail fast this long
MAX_PRODUCERS = 64  # distinct (servers, security) producers kept by one transport
# a producer no delivery used for this long is stopped (a hook whose settings changed,
# or that was deleted, leaves its producer behind): looked at every IDLE_CHECK_SEC
# (engine.transports.base.IdleSweep), deliveries or not, and when another is made
IDLE_CLOSE_SEC = 600.0
# a topic a producer sent nothing to for this long is no longer asked for in its
# metadata refreshes (aiokafka asks for every topic it ever sent to, every 5 minutes,
# which on a broker that creates topics makes one an operator deleted again), and a
# producer left with none is stopped; looked at by the same sweep and, at most every
# TOPIC_IDLE_SEC, by a delivery to that producer
TOPIC_IDLE_SEC = 600.0
METADATA_TRIES = 6  # metadata requests for an unknown topic before it is Rejected
METADATA_BACKOFF_SEC = 0.2
_CONNECTION_ERRORS = (KafkaConnectionError, NodeNotReadyError, ProducerClosed)
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class _BootstrapErrors(logging.Filter):
    """Keeps the reason aiokafka logs, but does not raise, when a bootstrap server
    cannot be connected or asked for metadata, so a ConnectError can say why, not only
    that it failed."""

    MESSAGES = ('Unable connect to "%s:%s": %s', 'Unable to request metadata from "%s:%s": %s')

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.MESSAGES and isinstance(record.args, tuple) \
                and len(record.args) == 3:
            host, port, err = record.args
            if len(self.last) > 1_000:
                self.last.clear()
            reason = str(err) or ("no answer within the timeout"
                                  if isinstance(err, TimeoutError) else type(err).__name__)
            self.last[server_key(str(host), port)] = reason
        return True

    def reason(self, server: str) -> str | None:
        host, _, port = server.rpartition(":")
        return self.last.get(server_key(host, port))

    def forget(self, server: str) -> None:
        host, _, port = server.rpartition(":")
        self.last.pop(server_key(host, port), None)


def server_key(host: str, port: Any) -> str:
    """A server as aiokafka names it in its log: an IPv6 address without brackets."""
    return f"{host.strip('[]').lower()}:{port}"


def _described(exc: BaseException) -> str:
    """``exc`` with its type's name once (aiokafka's errors start with it already)."""
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


_bootstrap_errors = _BootstrapErrors()
logging.getLogger("aiokafka").addFilter(_bootstrap_errors)


def producer_options(target: Kafka, timeout_sec: float) -> dict[str, Any]:
    """AIOKafkaProducer keyword arguments for ``target`` (without the TLS context)."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(target.bootstrap_servers),
        "client_id": "hookray",
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 0,
        "max_batch_size": MAX_BATCH_BYTES,
        "max_request_size": MAX_REQUEST_BYTES,
        # batches that could not be sent expire with the delivery that holds them
        "request_timeout_ms": max(int(timeout_sec * 1000), 1000),
        "security_protocol": "SSL" if target.tls else "PLAINTEXT",
    }
    if target.sasl_mechanism:
        options["security_protocol"] = "SASL_SSL" if target.tls else "SASL_PLAINTEXT"
        options["sasl_mechanism"] = target.sasl_mechanism
        options["sasl_plain_username"] = target.sasl_username
        options["sasl_plain_password"] = (target.sasl_password.get_secret_value()
                                          if target.sasl_password else None)
    return options


@dataclass
class _Fence:
    """One producer's DESTINATION_DENY and the last connection it refused."""

    guard: DestinationGuard
    refused: str = ""
    refused_at: float = 0.0  # monotonic


# the fence of the delivery (and of the producer tasks it started) that connects
_FENCE: ContextVar[_Fence | None] = ContextVar("hookray_kafka_fence", default=None)
_DEFAULT_FENCE = _Fence(DestinationGuard())
_create_conn = aiokafka.client.create_conn


BOOTSTRAP_MIN_MS = 1000  # the least time a bootstrap server's share is


@dataclass
class _Share:
    """The request timeout of each connection a starting producer makes (its
    bootstrap servers' share of the delivery's time), until it has started."""

    timeout_ms: int
    over: bool = False


# the share of the producer start that connects (tasks it starts inherit it: ``over``)
_SHARE: ContextVar[_Share | None] = ContextVar("hookray_kafka_share", default=None)


async def _fenced_create_conn(host: str, port: int, **options: Any) -> Any:
    """aiokafka's every connection, to a bootstrap server or to a broker its metadata
    names, made only to an address DESTINATION_DENY allows: a plain one to the
    addresses checked, in turn; a TLS one to the name (its certificate is checked
    against the name, so it cannot be an address that answered another name's
    lookup)."""
    share = _SHARE.get()
    if share is not None and not share.over:
        options["request_timeout_ms"] = min(options.get("request_timeout_ms") or
                                            share.timeout_ms, share.timeout_ms)
    fence = _FENCE.get() or _DEFAULT_FENCE
    if not fence.guard:
        return await _create_conn(host, port, **options)
    try:
        addresses = await fence.guard.allowed(host, port)
    except Denied as exc:
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address as it is written
        fence.refused, fence.refused_at = f"{shown}:{port}: {exc}", time.monotonic()
        raise
    if options.get("ssl_context") is not None:
        return await _create_conn(host, port, **options)
    for n, address in enumerate(addresses):
        try:
            return await _create_conn(address, port, **options)
        except OSError:
            if n == len(addresses) - 1:
                raise
    raise AssertionError("unreachable")  # allowed() names at least one address


# aiokafka connects through aiokafka.client.create_conn alone; it has no hook for
# the socket or the address, so the check goes in there
aiokafka.client.create_conn = _fenced_create_conn


def _unawaited(future: asyncio.Future[Any]) -> None:
    """A metadata request no delivery awaits: its failure is the next request's."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def _producer_key(target: Kafka) -> tuple[Any, ...]:
    secret = target.sasl_password.get_secret_value() if target.sasl_password else None
    return (tuple(target.bootstrap_servers), target.sasl_mechanism, target.sasl_username,
            secret, target.tls, target.tls_cafile)


@dataclass
class _Slot:
    """One cached producer, what is needed to (re)build it, and its gate."""

    target: Kafka
    servers: str
    gate: asyncio.Semaphore  # deliveries in flight on this producer
    fence: _Fence  # DESTINATION_DENY, and what it refused this producer
    producer: AIOKafkaProducer | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # one batch hand-over at a time per (topic, partition): aiokafka's add_batch
    # shortens its own wait on every wake-up, so contended hand-overs time out early
    queues: dict[tuple[str, int], asyncio.Lock] = field(default_factory=dict)
    # topic -> most batch bytes sent to it: half the smallest batch it refused as too large
    caps: dict[str, int] = field(default_factory=dict)
    # topic -> monotonic time of its last delivery, and when idle ones were last let go
    topics: dict[str, float] = field(default_factory=dict)
    topics_pruned: float = 0.0
    last_ack: float = 0.0  # monotonic time of the last acknowledged delivery
    failed_until: float = 0.0  # monotonic; no new producer before (see BREAKER_OPEN_SEC)
    last_error: str = ""
    users: int = 0  # deliveries holding this slot: it is not dropped under them
    used_at: float = field(default_factory=time.monotonic)  # a delivery began or ended


class KafkaTransport(Transport):
    kind = "kafka"

    def __init__(self, concurrency: int = 8, timeout_sec: float = DEFAULT_TIMEOUT_SEC,
                 **options: Any) -> None:
        super().__init__(**options)
        self.concurrency = concurrency
        self.timeout_sec = timeout_sec
        self.breaker_sec = BREAKER_OPEN_SEC
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        # idle producers stopped, idle topics let go: on a timer, and by deliveries
        self._idle = IdleSweep(self._sweep_idle, "Kafka transport")
        self._keys: dict[str, tuple[bytes, int | None]] = {}
        self._sticky = itertools.count()
        self._closing: set[asyncio.Task[None]] = set()

    # --- delivery ----------------------------------------------------------------------

    async def _deliver(self, target: Kafka, delivery: Delivery) -> Outcome:
        slot = self._slot(target)
        where = f"Kafka {slot.servers} topic {target.topic!r}"
        if not delivery.parts:
            return Outcome(ok=True, detail=f"{where}: no records")
        # this delivery's connections, and those of the producer tasks it starts: each
        # producer keeps its own record of what was refused (hooks of other accounts
        # share the transport, and must not read of each other's brokers)
        _FENCE.set(slot.fence)
        began = time.monotonic()
        # the timeout starts once through the gate: time spent queueing behind other
        # deliveries to the same producer is not the broker's fault
        slot.users += 1
        slot.used_at = time.monotonic()
        try:
            await self._take(slot.gate, f"Kafka {slot.servers} (its producer, shared by "
                             "every topic there)", self.concurrency)
            try:
                left = slot.failed_until - time.monotonic()
                if slot.producer is None and left > 0:
                    raise ConnectError(f"{where}: not reconnecting for another {left:.1f} s "
                                       f"after: {slot.last_error}")
                try:
                    await self._attempt(slot, target.topic, delivery, where)
                except (ConnectError, Timeout) as exc:
                    fence = slot.fence
                    if fence.refused_at >= began and fence.refused not in str(exc):
                        # a broker the metadata names was refused: aiokafka only
                        # logs why it could not connect
                        exc.args = (f"{exc}; a connection was refused: {fence.refused}",)
                    if slot.producer is None:  # found dead: fail fast a while
                        slot.failed_until = time.monotonic() + self.breaker_sec
                        slot.last_error = str(exc)
                    raise
            finally:
                slot.gate.release()
        finally:
            slot.users -= 1
            slot.used_at = time.monotonic()  # idle from its last delivery's end
        slot.last_ack = time.monotonic()
        return Outcome(ok=True, detail=f"{where}: {delivery.count} record(s) acknowledged")

    async def _attempt(self, slot: _Slot, topic: str, delivery: Delivery, where: str) -> None:
        """Send the delivery's records; a TransportError names the records not
        acknowledged in ``failed`` when some of its batches were (another partition's
        leader failed, say): only those are sent again."""
        sent = _Sent()
        try:
            await self._attempt_batches(slot, topic, delivery, where, sent)
        except TransportError as exc:
            exc.failed = unacknowledged(sent.waiters, sent.positions, delivery.count)
            if exc.failed is not None:  # some were: the error counts those that were not
                said = f"{delivery.count} record(s) not acknowledged"
                exc.args = (str(exc).replace(
                    said, f"{len(exc.failed)} of {delivery.count} record(s) not "
                    "acknowledged", 1),)
            raise
        finally:
            _abandon(sent.waiters)

    async def _attempt_batches(self, slot: _Slot, topic: str, delivery: Delivery, where: str,
                               sent: _Sent) -> None:
        stage = "connect"
        producer: AIOKafkaProducer | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_sec
        try:
            async with asyncio.timeout_at(deadline):
                producer = await self._started(slot)
                stage = "metadata"
                partitions = await self._partitions(slot, producer, topic)
                stage = "send"
                records = await self._enqueue(slot, producer, topic, partitions, delivery,
                                              sent)
            stage = "acknowledgement"
            while await _settled(sent, deadline - loop.time()):
                # batches the broker refused as too large (the topic's max.message.bytes
                # is below MAX_BATCH_BYTES): their records go again in smaller batches,
                # as Kafka's own producer splits them; the topic's cap is kept
                stage = "send"
                async with asyncio.timeout_at(deadline):
                    await self._split(slot, producer, topic, records, sent)
                stage = "acknowledgement"
            _raise_first(sent, where)
        except TimeoutError:
            if stage == "connect":
                self._retire(slot, producer)
                raise ConnectError(f"{where}: no connection within {self.timeout_sec:g} s"
                                   ) from None
            self._retire_if_silent(slot, producer)
            raise Timeout(f"{where}: {delivery.count} record(s) not acknowledged within "
                          f"{self.timeout_sec:g} s ({stage})") from None
        except (ConnectError, Timeout):
            self._retire(slot, producer)
            raise
        except Rejected:
            raise
        except KafkaError as exc:
            raise self._error(slot, producer, where, exc) from None
        except OSError as exc:  # a socket error aiokafka did not wrap
            self._retire(slot, producer)
            raise ConnectError(f"{where}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # anything else aiokafka raises: never out of send()
            log.warning("unexpected error from aiokafka for %s", where, exc_info=True)
            raise Rejected(f"{where}: {type(exc).__name__}: {exc}") from None

    def _error(self, slot: _Slot, producer: AIOKafkaProducer | None, where: str,
               exc: KafkaError) -> Exception:
        text = f"{where}: {type(exc).__name__}: {exc}"
        if isinstance(exc, _CONNECTION_ERRORS):
            self._retire(slot, producer)
            return ConnectError(text)
        if isinstance(exc, KafkaTimeoutError | RequestTimedOutError):
            self._retire_if_silent(slot, producer)
            return Timeout(text)
        return Rejected(text)

    def _retire_if_silent(self, slot: _Slot, producer: AIOKafkaProducer | None) -> None:
        """After a timeout: a producer that had no delivery acknowledged for a whole
        timeout is taken for dead (broker gone or frozen) and retired; one that did is
        only busy (a backlog, a slow broker) and kept, with its other deliveries."""
        if time.monotonic() - slot.last_ack >= self.timeout_sec:
            self._retire(slot, producer)

    async def _enqueue(self, slot: _Slot, producer: AIOKafkaProducer, topic: str,
                       partitions: list[int], delivery: Delivery, sent: _Sent) -> _Records:
        """Write the records into per-partition batches (``kafka_batch``) and hand them
        to the producer, each noted in ``sent``; the records as written."""
        parts = delivery.parts
        keys = delivery.keys
        mids = delivery.message_ids
        count = len(parts)
        if len(keys) != count:
            keys = [*keys[:count], *[""] * (count - len(keys))]
        if len(mids) != count:
            mids = [*mids[:count], *[""] * (count - len(mids))]
        n = len(partitions)
        # keyless records may go to any partition: one with a leader now (Kafka's own
        # partitioner does so), not one whose leader is gone, failing them all
        ready = producer.client.cluster.available_partitions_for_topic(topic)
        choices = sorted(ready) if ready else partitions
        sticky = choices[next(self._sticky) % len(choices)]
        cache = self._keys
        new = set(keys).difference(cache)
        if len(cache) + len(new) > KEY_CACHE_MAX:  # dropped before, not while adding
            cache.clear()
            new = set(keys)
        for text in new:
            self._key(text)
        fields = list(map(itemgetter(0), map(cache.__getitem__, keys)))
        # the partition of each distinct key: murmur2 like Kafka's default
        # partitioner; keyless records all to this delivery's sticky partition
        where = {text: sticky if h is None else partitions[h % n]
                 for text in set(keys) for h in (cache[text][1],)}
        headers = header_fields(mids)
        groups: list[tuple[int, list[int] | None]]
        if len(set(where.values())) == 1:
            groups = [(next(iter(where.values())), None)]
        else:
            groups = list(positions_by_code(
                np.fromiter(map(where.__getitem__, keys), np.int64, count)))
        records = _Records(parts, fields, headers, int(time.time() * 1000))
        cap = slot.caps.get(topic, MAX_BATCH_BYTES)
        for partition, idx in groups:
            await _hand_records(slot, producer, topic, partition, records, idx, cap, sent)
        return records

    async def _split(self, slot: _Slot, producer: AIOKafkaProducer, topic: str,
                     records: _Records, sent: _Sent) -> None:
        """Send the records of each batch refused as too large again, in batches of at
        most half its size; the topic's cap becomes the smallest such half."""
        for i in sent.too_large():
            partition, size = sent.placed[i]
            # smaller each time (at worst one record a batch), and no larger than what
            # another delivery learnt meanwhile
            cap = min(max(size // 2, 1), slot.caps.get(topic, MAX_BATCH_BYTES))
            if cap < slot.caps.get(topic, MAX_BATCH_BYTES):
                if len(slot.caps) > 10_000:
                    slot.caps.clear()
                slot.caps[topic] = cap
                log.warning("Kafka %s topic %r refused a %d-byte record batch as too large; "
                            "its batches are now at most %d bytes", slot.servers, topic, size,
                            cap)
            sent.superseded.add(i)
            await _hand_records(slot, producer, topic, partition, records,
                                list(sent.positions[i]), cap, sent)

    def _key(self, text: str) -> tuple[bytes, int | None]:
        """The key field of records keyed ``text`` and its murmur2 (None: no key)."""
        if not text:
            known = self._keys[text] = (key_field(None), None)
            return known
        raw = text.encode()
        known = self._keys[text] = (key_field(raw), murmur2(raw) & 0x7FFFFFFF)
        return known

    # --- producers and metadata -------------------------------------------------------

    def _slot(self, target: Kafka) -> _Slot:
        if self._idle.due():  # before the lookup: an idle one closed is made anew
            self._sweep_idle()
            self._idle.start()  # (in case its loop was another's)
        key = _producer_key(target)
        slot = self._slots.get(key)
        if slot is None:
            make_room(self._slots, MAX_PRODUCERS, IDLE_CLOSE_SEC,
                      lambda old, _: self._retire(old, old.producer), "Kafka producers")
            slot = self._slots[key] = _Slot(target, ",".join(target.bootstrap_servers),
                                            asyncio.Semaphore(self.concurrency),
                                            _Fence(self.guard))
            self._idle.start()
        else:  # most recently used last
            self._slots[key] = self._slots.pop(key)
        return slot

    def _sweep_idle(self) -> bool:
        """Stop the producers no delivery used for IDLE_CLOSE_SEC (their slots
        forgotten); let go of the topics a producer sent nothing to for TOPIC_IDLE_SEC,
        and stop a producer left with none (its slot kept: a delivery starts a new
        one). A slot a delivery holds is left as it is. Whether any slot is left."""
        close_idle(self._slots, IDLE_CLOSE_SEC, lambda old, _: self._retire(old, old.producer))
        now = time.monotonic()
        for slot in self._slots.values():
            producer = slot.producer
            if producer is not None and slot.users == 0 and not _prune(slot, producer, now):
                log.debug("Kafka %s: producer stopped, no topic sent to for %g s",
                          slot.servers, TOPIC_IDLE_SEC)
                self._retire(slot, producer)
        return bool(self._slots)

    async def _started(self, slot: _Slot) -> AIOKafkaProducer:
        producer = slot.producer
        if producer is not None:
            return producer
        async with slot.lock:
            if slot.producer is not None:
                return slot.producer
            producer = await self._start(slot)
            slot.producer = producer
            # a new producer asks for no topic yet: each is added as it is sent to
            # (kept from the one before, a topic would not be, and the first new
            # topic's metadata request would leave the others out)
            slot.topics.clear()
            return producer

    async def _start(self, slot: _Slot) -> AIOKafkaProducer:
        target = slot.target
        options = producer_options(target, self.timeout_sec)
        if target.tls:
            # (an empty tls_cafile, which older hooks may hold: the system's CAs, as
            # aiokafka took it)
            options["ssl_context"] = await client_context_for(f"Kafka {slot.servers}",
                                                              target.tls_cafile or None)
        for server in target.bootstrap_servers:
            _bootstrap_errors.forget(server)
        producer = AIOKafkaProducer(**options)
        # each bootstrap server its share of the time (aiokafka tries them in turn, each
        # with the whole request timeout: one that accepts and never answers, listed
        # with a good one, used up the delivery's time in every other start)
        servers = len(target.bootstrap_servers)
        share = None if servers < 2 else _Share(
            max(int(self.timeout_sec * 1000 / (servers + 1)), BOOTSTRAP_MIN_MS))
        token = _SHARE.set(share)
        try:
            await producer.start()
        except BaseException as exc:
            self._stop_later(producer)
            if isinstance(exc, Exception):
                raise ConnectError(self._start_failure(slot, exc)) from None
            raise
        finally:
            if share is not None:
                share.over = True  # connections made later (to brokers) take it all
            _SHARE.reset(token)
        return producer

    def _start_failure(self, slot: _Slot, exc: Exception) -> str:
        target = slot.target
        reasons = [f"{s}: {why}" for s in target.bootstrap_servers
                   if (why := _bootstrap_errors.reason(s)) is not None]
        reason = "; ".join(reasons) or _described(exc)
        text = f"cannot connect to Kafka bootstrap server(s) {slot.servers}: {reason}"
        if not target.sasl_mechanism:
            return text
        sasl = f"SASL {target.sasl_mechanism} as user {target.sasl_username!r}"
        if not isinstance(exc, KafkaError | OSError):
            # aiokafka's SCRAM code fails with a KeyError when the server refuses
            return (f"Kafka {slot.servers}: {sasl}: authentication failed "
                    f"({type(exc).__name__}: {exc})")
        return f"{text} ({sasl})"

    async def _partitions(self, slot: _Slot, producer: AIOKafkaProducer, topic: str
                          ) -> list[int]:
        """The topic's partitions from the producer's metadata; asks the broker when
        the topic is not known yet (the broker may create it then)."""
        client = producer.client
        self._track(slot, producer, topic)
        known = client.cluster.partitions_for_topic(topic)
        if known:
            return sorted(known)
        for attempt in range(METADATA_TRIES):
            if attempt:
                await asyncio.sleep(METADATA_BACKOFF_SEC)
            client.add_topic(topic)
            updated = await client.force_metadata_update()
            known = client.cluster.partitions_for_topic(topic)
            if known:
                return sorted(known)
            if not updated:
                raise ConnectError(f"Kafka {slot.servers}: no broker answered a metadata "
                                   "request")
            if topic in client.cluster.unauthorized_topics:
                raise Rejected(f"Kafka {slot.servers}: not authorized for topic {topic!r}")
        raise Rejected(f"Kafka {slot.servers}: topic {topic!r} does not exist and the broker "
                       "did not create it (hookray does not create topics)")

    @staticmethod
    def _track(slot: _Slot, producer: AIOKafkaProducer, topic: str) -> None:
        """Note the topic's use; every TOPIC_IDLE_SEC, the producer's metadata stops
        asking for the topics idle that long (sent to again, one is asked for anew)."""
        now = time.monotonic()
        if topic not in slot.topics:
            # asked for again, also when the producer's metadata still holds it from
            # before it was let go (the next refresh would drop it, records in flight
            # to it waiting for a leader no refresh names)
            _unawaited(producer.client.add_topic(topic))
        slot.topics[topic] = now
        if now - slot.topics_pruned >= TOPIC_IDLE_SEC:
            _prune(slot, producer, now)  # this topic stays

    def _retire(self, slot: _Slot, producer: AIOKafkaProducer | None) -> None:
        """Close ``producer`` in the background; the slot's next delivery starts anew."""
        if producer is None:
            return
        if slot.producer is producer:
            slot.producer = None
        self._stop_later(producer)

    def _stop_later(self, producer: AIOKafkaProducer) -> None:
        task = asyncio.get_running_loop().create_task(_stop(producer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self._idle.stop()
        for slot in self._slots.values():
            self._retire(slot, slot.producer)
        self._slots.clear()
        if self._closing:
            await asyncio.wait(list(self._closing))


def _prune(slot: _Slot, producer: AIOKafkaProducer, now: float) -> bool:
    """Let go of the slot's topics idle for TOPIC_IDLE_SEC: the producer's metadata
    refreshes no longer ask for them. Whether the slot has topics left (a producer
    left with none is to be stopped: an empty set would have it ask for every topic)."""
    slot.topics_pruned = now
    idle = {t for t, used in slot.topics.items() if now - used >= TOPIC_IDLE_SEC}
    if not idle:
        return bool(slot.topics)
    for t in idle:
        del slot.topics[t]
        slot.caps.pop(t, None)
    for key in [k for k, lock in slot.queues.items() if k[0] in idle and not lock.locked()]:
        del slot.queues[key]
    if not slot.topics:
        return False
    # the topics in use; a metadata request it starts is awaited by no one: its
    # failure is the next's
    _unawaited(producer.client.set_topics(list(slot.topics)))
    return True


async def _hand_over(slot: _Slot, producer: AIOKafkaProducer, builder: Any, topic: str,
                     partition: int) -> asyncio.Future[Any]:
    queue = slot.queues.get((topic, partition))
    if queue is None:
        if len(slot.queues) > 10_000:
            slot.queues.clear()
        queue = slot.queues[(topic, partition)] = asyncio.Lock()
    async with queue:
        future: asyncio.Future[Any] = await producer.send_batch(builder, topic,
                                                                partition=partition)
        return future


@dataclass
class _Records:
    """A delivery's records as written: values, key fields, header fields, timestamp."""

    parts: list[bytes]
    fields: list[bytes]
    headers: list[bytes]
    stamp: int


@dataclass
class _Sent:
    """The record batches of one delivery handed to the producer, in order: each one's
    future, its records' positions in the delivery, its partition and bytes; the
    batches whose records went again in smaller ones (``superseded``)."""

    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    positions: list[range | list[int]] = field(default_factory=list)
    placed: list[tuple[int, int]] = field(default_factory=list)
    superseded: set[int] = field(default_factory=set)

    def current(self) -> list[int]:
        return [i for i in range(len(self.waiters)) if i not in self.superseded]

    def too_large(self) -> list[int]:
        """The batches of more than one record refused as too large, not split yet."""
        return [i for i in self.current() if len(self.positions[i]) > 1
                and _refused_as_too_large(self.waiters[i])]


def _refused_as_too_large(waiter: asyncio.Future[Any]) -> bool:
    return waiter.done() and not waiter.cancelled() and \
        isinstance(waiter.exception(), _TOO_LARGE)


async def _hand_records(slot: _Slot, producer: AIOKafkaProducer, topic: str, partition: int,
                        records: _Records, idx: list[int] | None, cap: int, sent: _Sent) -> None:
    """Hand the records at ``idx`` (None: all) to the producer for ``partition``, in
    batches of at most ``cap`` bytes, each noted in ``sent``."""
    values, keyed, headed = (records.parts, records.fields, records.headers) if idx is None \
        else (list(gather(records.parts, idx)), list(gather(records.fields, idx)),
              list(gather(records.headers, idx)))
    start = 0
    for data, count in batches(values, keyed, headed, records.stamp, cap):
        sent.waiters.append(await _hand_over(slot, producer, PrebuiltBatch(data, count),
                                             topic, partition))
        sent.positions.append(range(start, start + count) if idx is None
                              else idx[start:start + count])
        sent.placed.append((partition, len(data)))
        start += count


async def _settled(sent: _Sent, timeout: float) -> bool:
    """Wait for every current batch, TimeoutError after ``timeout``; whether some of
    more than one record were refused as too large (to be split).

    Not ``asyncio.timeout`` around a gather: cancelling aiokafka's shielded batch
    futures would leave the errors they get later unretrieved (and logged)."""
    current = [sent.waiters[i] for i in sent.current()]
    if current:
        _, pending = await asyncio.wait(current, timeout=max(timeout, 0))
        if pending:
            raise TimeoutError
    return bool(sent.too_large())


def _raise_first(sent: _Sent, where: str) -> None:
    """Raise the first current batch's error: a record alone too large for the topic is
    Rejected, naming its size."""
    for i in sent.current():
        waiter = sent.waiters[i]
        if waiter.cancelled():
            raise ProducerClosed()
        error = waiter.exception()
        if isinstance(error, _TOO_LARGE):
            raise Rejected(f"{where}: the broker refused a record as too large "
                           f"({type(error).__name__}): a record batch of {sent.placed[i][1]:,} "
                           "bytes holding that one record is more than the topic's "
                           "max.message.bytes (or the broker's message.max.bytes) allows")
        if error is not None:
            raise error


def unacknowledged(waiters: list[asyncio.Future[Any]], positions: list[range | list[int]],
                   count: int) -> list[int] | None:
    """The positions of a delivery's ``count`` records not acknowledged, given its
    batches' futures and the records of each (``positions``, in the same order; records
    after the last are the ones never handed over); None if none was (all failed)."""
    acknowledged = [where for waiter, where in zip(waiters, positions, strict=False)
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None]
    if not acknowledged:
        return None
    left = np.ones(count, bool)
    for where in acknowledged:
        left[list(where) if isinstance(where, range) else where] = False
    return np.flatnonzero(left).tolist() or None


def _abandon(waiters: list[asyncio.Future[Any]]) -> None:
    """Retrieve the outcome of batches nobody waits for any more, now or when done."""
    for waiter in waiters:
        if waiter.done():
            _retrieve(waiter)
        else:
            waiter.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _stop(producer: AIOKafkaProducer) -> None:
    """Stop a producer; batches it still holds are sent or expire (request timeout)."""
    try:
        await producer.stop()
    except Exception as exc:  # closing is best effort
        log.debug("closing a Kafka producer failed: %s", exc)


TRANSPORTS = {"kafka": KafkaTransport}
