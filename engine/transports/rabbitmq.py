"""RabbitMQ transports (spec e): ``rabbitmq_queue`` and ``rabbitmq_exchange``.

Client: aiormq (the AMQP layer under aio-pika), with the frames of a delivery
written by ``engine.transports.amqp_batch`` — all of them in one write, their
confirms settled by aiormq's own reader. ``python -m bench.rabbit_clients``
(20,000 persistent messages with confirms, 1,000 pipelined at once, median of 3
rounds): aio-pika 4.6k msg/s at 192 µs of client CPU per message, aiormq's
``basic_publish(wait=False)`` 5.9k at 138 µs, ``amqp_batch`` 11.3k at 21 µs (the
broker is then the slow side); aiormq's own path takes a coroutine, a lock, a
timeout, a pamqp marshalling and a socket write per message.

Every part of a ``Delivery`` (one already-encoded JSON message) becomes one AMQP
message: ``delivery_mode=2`` (persistent), ``content_type=application/json``,
``message_id`` = the part's ``hook_message_id``. All parts of a delivery are
published at once on a confirm-mode channel and their confirms awaited together
(never one round trip per message); the delivery succeeds when the broker has
confirmed every part. Parts the broker nacks or returns fail the delivery: the
outcome names them, the confirmed ones count as delivered and only the failed ones
are re-sent (``engine.retrying``); a delivery that fails as a whole (connection
lost, timeout) is re-sent whole, so a consumer can see a message twice after a
failure: de-duplicate by ``message_id``.

* Queue: published through the default exchange with the queue name as routing
  key. The queue is looked up with a passive declare and, only when it is missing,
  declared durable (an existing queue is used as it is — quorum, TTL or
  dead-letter arguments included — and a user without "configure" permission can
  still publish to it). Messages are published ``mandatory``: if the queue is
  deleted after it was declared, the broker returns them, the delivery fails
  (Rejected) and the next attempt declares the queue again — nothing vanishes.
* Exchange: declared ``direct`` or ``topic`` with the hook's ``durable`` and
  ``auto_delete``; the routing key of each message is ``<list_id>.<event_type>``
  (``Delivery.keys``). A mismatch with an existing exchange (another type or
  durability) is the broker's PRECONDITION_FAILED, reported as Rejected. When the
  user may not configure the exchange (ACCESS_REFUSED), an existing one is used
  as it is (passive declare). Messages are published **without** ``mandatory``:
  a message whose routing key matches no binding is dropped by the broker and the
  delivery still succeeds. That is RabbitMQ's exchange semantics — the consumer
  side decides what it binds (e.g. only ``*.click``) — not a transport failure.
  Bind a queue with ``#`` (topic) or use an alternate exchange to keep everything.

With ``tls`` the connection is amqps: the broker's certificate is checked against
the system's CAs (or the hook's ``tls_cafile``) and its name against the host; a
certificate not trusted and a handshake with a port that is not a TLS listener are
ConnectErrors that say so.

Connections are cached per (host, port, user, password, vhost, TLS settings), at most
MAX_BROKERS, and each
destination (queue, or exchange with its settings) has a confirm channel of its
own on that connection, declared once per channel: a broker error about one
destination closes only its channel. A connection, or a destination's channel, no
delivery used for IDLE_CLOSE_SEC is closed (never one a delivery holds): looked at
every IDLE_CHECK_SEC, deliveries or not (``engine.transports.base.IdleSweep``), and a
connection also when another opens. After any connection failure (broker
restart, network loss) the next delivery opens a new connection and channels and
declares again (a non-durable exchange does not survive a restart); a delivery
that times out without the connection making any progress drops that connection
too, so a half-open socket does not stall later deliveries. Concurrent deliveries
that were waiting for a connection attempt that fails get its error at once
instead of each trying again.

Errors (``engine.errors``; driver exceptions never escape ``_deliver``):

* ConnectError — cannot connect, the login is refused (wrong user name or
  password), the virtual host does not exist or the user has no permissions on
  it, or the connection is lost mid-delivery; each names its cause.
* Timeout — connect, declare or confirms take longer than ``timeout_sec`` (one
  budget for the whole delivery, counted from when it gets a concurrency slot).
* Rejected — the broker nacks a message, returns a mandatory one (queue missing),
  or closes the channel (type mismatch, access refused, entity not found).

Options: ``concurrency`` deliveries in flight per broker connection (the
installation's DESTINATION_CONCURRENCY), ``timeout_sec`` per delivery.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiormq
from aiormq import exceptions as amqp
from aiormq.abc import AbstractConnection, DeliveredMessage
from yarl import URL

from engine.errors import ConnectError, Rejected, Timeout, TransportError
from engine.hooks import RabbitExchange, RabbitQueue, vhost_problem
from engine.transports.amqp_batch import publish_all
from engine.transports.base import (
    Delivery,
    IdleSweep,
    Outcome,
    Transport,
    close_idle,
    make_room,
)
from engine.transports.guard import Denied, DestinationGuard
from engine.transports.tls import client_context_for

DEFAULT_TIMEOUT_SEC = 10.0
JSON = "application/json"
PERSISTENT = 2
MAX_CHANNELS = 512  # destination channels per connection before unused ones are closed
# connections kept (one per host, port, user, password, vhost): a hook whose password
# or vhost changed leaves its old connection, closed once this many are newer (or
# after IDLE_CLOSE_SEC unused)
MAX_BROKERS = 64
# a broker no delivery used for this long is closed (a hook whose settings changed, or
# that was deleted, leaves its connection behind), and so is a destination's channel:
# looked at every IDLE_CHECK_SEC (engine.transports.base.IdleSweep), deliveries or not,
# and a broker also when another is opened
IDLE_CLOSE_SEC = 600.0
BREAKER_OPEN_SEC = 1.0  # after a connection failed, deliveries to its broker fail fast
CLOSE_TIMEOUT_SEC = 5.0
# a limit learnt from a broker's refusal (its max_message_size, a user's channel limit,
# which counts the user's channels on every connection, others' too) is kept this long
LEARNT_SEC = 600.0
CHANNEL_WAIT_SEC = 0.01  # how often a channel waits for one being closed under channel_max

log = logging.getLogger("hookray.rabbitmq")

BrokerKey = tuple[str, int, str, str, str, bool, str | None]
DestKey = tuple[Any, ...]


class _ReturnedBodies(logging.Filter):
    """aiormq logs a returned message it cannot match (one that came back after its
    delivery timed out) at ERROR with its repr, which holds the message's body: a
    subscriber's data, up to megabytes. Logged with its id and routing only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
                isinstance(arg, DeliveredMessage) for arg in record.args):
            record.args = tuple(_shown_message(arg) if isinstance(arg, DeliveredMessage)
                                else arg for arg in record.args)
        return True


def _shown_message(message: DeliveredMessage) -> str:
    return (f"<message id {message.header.properties.message_id!r}, exchange "
            f"{message.exchange!r}, routing key {message.routing_key!r}, "
            f"{len(message.body)} bytes>")


logging.getLogger("aiormq.channel").addFilter(_ReturnedBodies())


class _Blocked(logging.Filter):
    """aiormq logs, and keeps to itself, why the broker blocks a connection's publishers
    (a memory or disk alarm): kept here by connection, so that a delivery timing out on
    it can say so rather than only that no confirm came."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        try:
            if record.msg == "Connection %r was blocked by: %r" and len(args) == 2:
                self.reasons[args[0]] = str(args[1])
            elif record.msg == "Connection %r was unblocked" and len(args) == 1:
                self.reasons.pop(args[0], None)
        except TypeError:  # not weakly referable: nothing kept
            pass
        return True


_blocked = _Blocked()
logging.getLogger("aiormq.connection").addFilter(_blocked)
# the broker's answer to a message over its max_message_size (it closes the channel)
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
# an exchange's argument other than those a hook sets (alternate-exchange, say): the
# exchange as it is will do, as when the user may not declare it
_OTHER_ARG = re.compile(r"inequivalent arg '([^']+)'")
_HOOK_ARGS = ("type", "durable", "auto_delete", "internal")


@dataclass
class _Channel:
    """A destination's confirm channel; closed once stale and no delivery uses it."""

    channel: aiormq.Channel
    users: int = 0
    stale: bool = False


@dataclass
class _Dest:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: _Channel | None = None
    failed_at: float = float("-inf")
    error: TransportError | None = None
    users: int = 0  # deliveries holding this destination: its channel stays open
    used_at: float = field(default_factory=time.monotonic)  # a delivery began or ended


@dataclass
class _Connection:
    connection: AbstractConnection
    dests: dict[DestKey, _Dest] = field(default_factory=dict)
    # set when a delivery lets go of its destination: one waiting for a channel looks
    # again (_dest)
    freed: asyncio.Event = field(default_factory=asyncio.Event)


def _learnt(at: float) -> bool:
    """Whether a limit of the broker's learnt ``at`` is recent enough to go by."""
    return time.monotonic() - at < LEARNT_SEC


def _bare(exc: TransportError) -> TransportError:
    """A failure as kept for the deliveries waiting on the same attempt: its type and
    text, not the exception raised, whose traceback holds the frames of the delivery
    that met it (its batch, up to MAX_BATCH_BYTES) for as long as the entry lives."""
    return type(exc)(str(exc))


@dataclass
class _Broker:
    url: URL
    where: str  # for messages: no password
    user: str
    vhost: str
    semaphore: asyncio.Semaphore
    tls: bool = False
    tls_cafile: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: _Connection | None = None
    failed_at: float = float("-inf")
    error: TransportError | None = None
    progress_at: float = 0.0  # last connect or fully confirmed delivery (monotonic)
    # learnt from the broker: the most channels a connection may hold for the user
    # (channel_max, or a user limit that closed the connection), its max_message_size
    channel_cap: int | None = None
    max_message: int | None = None
    # when each was learnt (monotonic): forgotten LEARNT_SEC later (limits change)
    cap_learnt_at: float = float("-inf")
    size_learnt_at: float = float("-inf")
    users: int = 0  # deliveries holding this broker: it is not dropped under them
    used_at: float = field(default_factory=time.monotonic)  # a delivery began or ended


class _Phase:
    """What a delivery is doing, for the Timeout message."""

    def __init__(self) -> None:
        self.now = "waiting for the connection"


class RabbitTransport(Transport):
    """Shared by both kinds; the target model decides queue or exchange."""

    kind = "rabbitmq"

    def __init__(self, concurrency: int = 8, timeout_sec: float = DEFAULT_TIMEOUT_SEC,
                 **options: Any) -> None:
        super().__init__(**options)
        self.concurrency = concurrency
        self.timeout_sec = timeout_sec
        self._brokers: dict[BrokerKey, _Broker] = {}
        # idle connections and channels closed: on a timer, and by deliveries
        self._idle = IdleSweep(self._sweep_idle, f"RabbitMQ transport ({self.kind})")
        self._closing: set[asyncio.Task[None]] = set()

    # --- delivery ----------------------------------------------------------------------

    async def _deliver(self, target: RabbitQueue | RabbitExchange, delivery: Delivery
                       ) -> Outcome:
        try:
            broker = self._broker(target)
        except ValueError as exc:  # e.g. a host name yarl will not put in a URL
            raise ConnectError(f"RabbitMQ {target.host}:{target.port}: cannot connect: "
                               f"{exc}") from None
        if isinstance(target, RabbitQueue):
            dest_key: DestKey = ("queue", target.queue)
            what = f"queue {target.queue!r}"
        else:
            dest_key = ("exchange", target.exchange, target.type, target.durable,
                        target.auto_delete)
            what = f"{target.type} exchange {target.exchange!r}"
        if not delivery.parts:
            return Outcome(ok=True, detail=f"nothing to publish to {what}")
        phase = _Phase()
        broker.users += 1
        broker.used_at = time.monotonic()
        try:
            return await self._deliver_on(broker, target, delivery, dest_key, what, phase)
        finally:
            broker.users -= 1
            broker.used_at = time.monotonic()  # idle from its last delivery's end

    async def _deliver_on(self, broker: _Broker, target: RabbitQueue | RabbitExchange,
                          delivery: Delivery, dest_key: DestKey, what: str, phase: _Phase
                          ) -> Outcome:
        await self._take(broker.semaphore, broker.where, self.concurrency)
        try:
            return await self._deliver_held(broker, target, delivery, dest_key, what, phase)
        finally:
            broker.semaphore.release()

    async def _deliver_held(self, broker: _Broker, target: RabbitQueue | RabbitExchange,
                            delivery: Delivery, dest_key: DestKey, what: str, phase: _Phase
                            ) -> Outcome:
        """``_deliver_on`` with one of the broker's connections taken."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_sec):
                conn = await self._connection(broker, started)
                dest = await self._dest(broker, conn, dest_key, phase)
                phase.now = f"opening a channel and declaring {what}"
                dest.users += 1  # not closed as idle under this delivery
                dest.used_at = started
                try:
                    chan = await self._channel(broker, conn, dest, target, started)
                    phase.now = (f"awaiting the broker's confirms of {delivery.count} "
                                 "message(s)")
                    chan.users += 1
                    try:
                        await self._publish(broker, conn, dest, chan, target, delivery, what)
                    except TransportError:
                        raise
                    except Exception as exc:  # a driver surprise: never escapes
                        self._retire(dest, chan)
                        raise Rejected(f"{broker.where}: {what}: {_text(exc)}") from None
                    finally:
                        chan.users -= 1
                        if chan.stale and chan.users == 0:
                            self._close_later(chan.channel.close())
                finally:
                    dest.users -= 1
                    dest.used_at = time.monotonic()  # idle from its last delivery's end
                    conn.freed.set()
        except TimeoutError:
            current = broker.current
            blocked = _blocked.reasons.get(current.connection) if current else None
            if broker.progress_at < started:
                self._drop(broker, current, "no answer within the timeout")
            said = f"; the broker blocks publishers: {blocked} (a resource alarm: " \
                "memory or disk)" if blocked else ""
            raise Timeout(f"{broker.where}: no answer within {self.timeout_sec:g} s "
                          f"while {phase.now}{said}") from None
        broker.progress_at = time.monotonic()
        return Outcome(ok=True, detail=f"{delivery.count} message(s) confirmed by "
                                       f"{broker.where}, {what}")

    async def _publish(self, broker: _Broker, conn: _Connection, dest: _Dest, chan: _Channel,
                       target: RabbitQueue | RabbitExchange, delivery: Delivery,
                       what: str) -> None:
        ids = delivery.message_ids
        if isinstance(target, RabbitQueue):
            exchange, mandatory = "", True
            keys: Sequence[str] = [target.queue] * delivery.count
        else:
            exchange, mandatory = target.exchange, False
            keys = delivery.keys if len(delivery.keys) == delivery.count else \
                [*delivery.keys, *[""] * (delivery.count - len(delivery.keys))]
        if len(ids) != delivery.count:
            ids = [*ids[:delivery.count], *[""] * (delivery.count - len(ids))]
        results = await self._publish_fitting(broker, chan, exchange, keys, ids,
                                              delivery.parts, mandatory, what)
        # a CancelledError among the results is no cancellation of this delivery: aiormq
        # fails the confirms that way when their connection or channel is closed here
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        first = failures[0]
        # the broker's own failures first: refusals of messages too large that were
        # never written (TransportError) leave the channel as it is
        first = next((r for r in failures if not isinstance(r, TransportError)), first)
        for failure in failures:  # the broker's max_message_size, learnt
            if (found := _TOO_LARGE.search(str(failure))) is not None:
                broker.max_message = int(found.group(2))
                broker.size_learnt_at = time.monotonic()
                first = failure
                break
        error = self._wrap(first, broker, conn, what)
        if isinstance(error, ConnectError):
            self._drop(broker, conn)
        elif isinstance(first, ValueError | TransportError):
            pass  # refused before anything was written: the channel is fine
        elif not isinstance(first, amqp.DeliveryError) or isinstance(first, amqp.PublishError):
            # channel closed, or a message returned (queue gone): new channel, declare again
            self._retire(dest, chan)
        refused = type(error)(f"{len(failures)} of {delivery.count} message(s) not "
                              f"confirmed: {error}")
        if len(failures) < delivery.count:  # the others were confirmed: only these again
            refused.failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        raise refused

    @staticmethod
    async def _publish_fitting(broker: _Broker, chan: _Channel, exchange: str,
                               keys: Sequence[str], ids: Sequence[str],
                               parts: Sequence[bytes], mandatory: bool, what: str
                               ) -> list[object]:
        """Each part's outcome (``publish_all``'s): all parts in one write, the
        confirms awaited together. A message over the broker's max_message_size, once
        it is known, is not written (the broker would close the channel, failing every
        message of the write with it, at every re-send): it fails alone, naming its
        size."""
        limit = broker.max_message if _learnt(broker.size_learnt_at) else None
        big = set() if limit is None else {i for i, p in enumerate(parts) if len(p) > limit}
        fits = [i for i in range(len(parts)) if i not in big]
        sent = parts if not big else [parts[i] for i in fits]
        try:
            results = await publish_all(
                chan.channel, exchange, keys if not big else [keys[i] for i in fits], sent,
                ids if not big else [ids[i] for i in fits], content_type=JSON,
                delivery_mode=PERSISTENT, mandatory=mandatory) if sent else []
        except (asyncio.CancelledError, TimeoutError):
            raise
        except Exception as exc:  # nothing written: a closed channel, a name too long
            results = [exc] * len(sent)
        if not big:
            return results
        by_position: list[object] = [Rejected(
            f"{broker.where}: {what}: a message of {len(parts[min(big)])} bytes is larger "
            f"than the broker's max_message_size ({limit} bytes)")] * len(parts)
        for i, result in zip(fits, results, strict=True):
            by_position[i] = result
        return by_position

    # --- connections and channels ------------------------------------------------------

    def _broker(self, target: RabbitQueue | RabbitExchange) -> _Broker:
        if self._idle.due():  # before the lookup: an idle one closed is made anew
            self._sweep_idle()
            self._idle.start()  # (in case its loop was another's)
        password = target.password.get_secret_value()
        key = (target.host, target.port, target.user, password, target.vhost, target.tls,
               target.tls_cafile)
        broker = self._brokers.get(key)
        if broker is not None:  # most recently used last
            self._brokers[key] = self._brokers.pop(key)
        else:
            if (problem := vhost_problem(target.vhost)) is not None:  # a stored hook's
                raise ValueError(f"vhost {target.vhost!r}: {problem}")
            make_room(self._brokers, MAX_BROKERS, IDLE_CLOSE_SEC,
                      lambda old, why: self._drop(old, old.current, why),
                      "RabbitMQ connections")
            url = URL.build(scheme="amqps" if target.tls else "amqp", user=target.user,
                            password=password, host=target.host, port=target.port,
                            path="/" + target.vhost)
            tls = " (TLS)" if target.tls else ""
            broker = self._brokers[key] = _Broker(
                url=url,
                where=f"RabbitMQ {target.host}:{target.port}{tls} vhost {target.vhost!r}",
                user=target.user, vhost=target.vhost,
                semaphore=asyncio.Semaphore(self.concurrency), tls=target.tls,
                tls_cafile=target.tls_cafile)
            self._idle.start()
        return broker

    def _sweep_idle(self) -> bool:
        """Close the connections no delivery used for IDLE_CLOSE_SEC (their brokers
        forgotten), and, on the others, the channels of the destinations no delivery
        used for that long (a hook deleted, or whose queue or exchange changed, leaves
        its channel behind). None a delivery holds. Whether any broker is left."""
        close_idle(self._brokers, IDLE_CLOSE_SEC,
                   lambda old, why: self._drop(old, old.current, why))
        now = time.monotonic()
        for broker in self._brokers.values():
            conn = broker.current
            if conn is None:
                continue
            for key, dest in list(conn.dests.items()):
                if dest.users or dest.lock.locked() or now - dest.used_at < IDLE_CLOSE_SEC:
                    continue
                del conn.dests[key]
                if dest.current is not None:
                    self._retire(dest, dest.current)
        return bool(self._brokers)

    async def _connection(self, broker: _Broker, started: float) -> _Connection:
        conn = broker.current
        if conn is not None and not conn.connection.is_closed:
            return conn
        async with broker.lock:
            conn = broker.current
            if conn is not None and not conn.connection.is_closed:
                return conn
            if broker.error is not None and broker.failed_at >= started:
                # an attempt made while this delivery waited has just failed
                raise type(broker.error)(str(broker.error))
            left = broker.failed_at + BREAKER_OPEN_SEC - time.monotonic()
            if broker.error is not None and left > 0:
                # failed a moment ago: not tried again at once (as Kafka's producers):
                # against a broker that is down, each round's batches and each re-send
                # would open a connection each (and aiormq logs every failure)
                raise type(broker.error)(f"{broker.error}; not reconnecting for another "
                                         f"{left:.1f} s")
            if conn is not None:
                self._drop(broker, conn)
            try:
                # made for each new connection: a CA file replaced on disk is read again
                context = await client_context_for(broker.where, broker.tls_cafile) \
                    if broker.tls else None
                guarded = {"transport_factory": _GuardedConnect(self.guard, broker.tls)
                           } if self.guard else {}
                connection = await aiormq.connect(
                    broker.url, context=context,
                    client_properties={"connection_name": "hookray " + self.kind}, **guarded)
            except Exception as exc:
                error = self._wrap_connect(exc, broker)
                broker.error, broker.failed_at = _bare(error), time.monotonic()
                raise error from None
            broker.current = conn = _Connection(connection)
            broker.error = None
            broker.progress_at = time.monotonic()
            return conn

    async def _dest(self, broker: _Broker, conn: _Connection, key: DestKey,
                    phase: _Phase) -> _Dest:
        """The destination's entry; past the channels a connection may hold (MAX_CHANNELS,
        the broker's channel_max, a limit it closed the connection for: opening one
        more would close the connection under every hook on it), the least recently
        used ones no delivery holds are dropped, their channels closed; all held, it
        waits for one to be let go (within the delivery's timeout)."""
        while (dest := conn.dests.get(key)) is None:
            limit = self._channel_limit(broker, conn)
            if len(conn.dests) < limit:
                dest = conn.dests[key] = _Dest()
                self._idle.start()
                return dest
            # one whose channel is being opened (its lock held) stays: dropped, the
            # channel it opens would be kept by no entry, and never closed
            idle = [(d.used_at, k) for k, d in conn.dests.items()
                    if not (d.lock.locked() or d.users)
                    and (d.current is None or d.current.users == 0)]
            if idle:
                old = conn.dests.pop(min(idle)[1])
                if old.current is not None:
                    self._close_later(old.current.channel.close())
                continue
            phase.now = (f"waiting for one of the {limit} channels the connection may "
                         "hold, all in use by deliveries")
            conn.freed.clear()
            await conn.freed.wait()
        return dest

    @staticmethod
    def _channel_limit(broker: _Broker, conn: _Connection) -> int:
        """Destinations (a channel each) one connection holds: MAX_CHANNELS, less where
        the broker allows fewer (room kept for the second channel a declaration may
        open, and for channel 0's numbering)."""
        limit = MAX_CHANNELS
        tune = getattr(conn.connection, "connection_tune", None)
        channel_max = getattr(tune, "channel_max", 0) or 0
        if channel_max:
            limit = min(limit, max(channel_max - 2, 1))
        if broker.channel_cap is not None and _learnt(broker.cap_learnt_at):
            limit = min(limit, broker.channel_cap)
        return limit

    async def _channel(self, broker: _Broker, conn: _Connection, dest: _Dest,
                       target: RabbitQueue | RabbitExchange, started: float) -> _Channel:
        chan = dest.current
        if chan is not None and not chan.channel.is_closed:
            return chan
        async with dest.lock:
            chan = dest.current
            if chan is not None and not chan.channel.is_closed:
                return chan
            if dest.error is not None and dest.failed_at >= started:
                raise type(dest.error)(str(dest.error))
            try:
                channel = await self._open(broker, conn, target)
            except TransportError as exc:
                dest.error, dest.failed_at = _bare(exc), time.monotonic()
                if isinstance(exc, ConnectError):
                    if "NOT_ALLOWED" in str(exc) and "channel" in str(exc):
                        # a limit of the user's (max-channels): this many and no more
                        opened = sum(d.current is not None for d in conn.dests.values())
                        broker.channel_cap = max(opened, 1)
                        broker.cap_learnt_at = time.monotonic()
                        log.warning("%s: the broker allows fewer channels than hookray "
                                    "opened; at most %d destinations per connection now",
                                    broker.where, broker.channel_cap)
                    self._drop(broker, conn)
                raise
            dest.current = chan = _Channel(channel)
            dest.error = None
            return chan

    async def _open(self, broker: _Broker, conn: _Connection,
                    target: RabbitQueue | RabbitExchange) -> aiormq.Channel:
        """A confirm channel on which the target is known to exist (declared). A channel
        made on the way and not returned is closed: a declaration the delivery's timeout
        cancels leaves it open (the broker closes only those it refused), one more on a
        connection other hooks keep busy at each try, until the broker's channel_max
        closed the connection under all of them."""
        made: list[aiormq.Channel] = []
        try:
            channel = await self._declared(broker, conn, target, made)
        except BaseException:
            for left in made:
                if not left.is_closed:
                    self._close_later(left.close())
            raise
        return channel

    async def _declared(self, broker: _Broker, conn: _Connection,
                        target: RabbitQueue | RabbitExchange,
                        made: list[aiormq.Channel]) -> aiormq.Channel:
        """``_open``'s declarations, each channel it makes added to ``made``."""
        if isinstance(target, RabbitQueue):
            what = f"queue {target.queue!r}"
        else:
            what = f"{target.type} exchange {target.exchange!r}"

        async def new_channel() -> aiormq.Channel:
            made.append(await self._new_channel(broker, conn, what))
            return made[-1]

        if isinstance(target, RabbitQueue):
            return await self._declared_queue(broker, conn, target, what, new_channel)
        return await self._declared_exchange(broker, conn, target, what, new_channel)

    async def _declared_queue(self, broker: _Broker, conn: _Connection, target: RabbitQueue,
                              what: str, new_channel: Callable[[], Awaitable[aiormq.Channel]]
                              ) -> aiormq.Channel:
        channel = await new_channel()
        try:  # an existing queue is used as it is, whatever its arguments
            await channel.queue_declare(target.queue, passive=True)
            return channel
        except amqp.ChannelNotFoundEntity:
            pass
        except Exception as exc:
            raise self._wrap(exc, broker, conn, what) from None
        channel = await new_channel()
        try:
            await channel.queue_declare(target.queue, durable=True)
            return channel
        except amqp.ChannelAccessRefused as exc:
            raise Rejected(f"{broker.where}: {what} does not exist and user "
                           f"{broker.user!r} may not declare it ({exc})") from None
        except Exception as exc:
            raise self._wrap(exc, broker, conn, what) from None

    async def _declared_exchange(self, broker: _Broker, conn: _Connection,
                                 target: RabbitExchange, what: str,
                                 new_channel: Callable[[], Awaitable[aiormq.Channel]]
                                 ) -> aiormq.Channel:
        channel = await new_channel()
        try:
            await channel.exchange_declare(
                target.exchange, exchange_type=target.type, durable=target.durable,
                auto_delete=target.auto_delete)
            return channel
        except amqp.ChannelAccessRefused:
            pass  # no "configure" permission: an existing exchange will do
        except amqp.ChannelPreconditionFailed as exc:
            arg = _OTHER_ARG.search(str(exc))
            if arg is None or arg.group(1) in _HOOK_ARGS:
                raise Rejected(f"{broker.where}: {what} exists with other settings than "
                               f"the hook's (type {target.type}, durable={target.durable}, "
                               f"auto_delete={target.auto_delete}): {exc}") from None
            # declared with an argument of its own (an alternate exchange): used as it is
        except Exception as exc:
            raise self._wrap(exc, broker, conn, what) from None
        channel = await new_channel()
        try:
            await channel.exchange_declare(target.exchange, passive=True)
            return channel
        except amqp.ChannelNotFoundEntity:
            raise Rejected(f"{broker.where}: {what} does not exist and user "
                           f"{broker.user!r} may not declare it") from None
        except Exception as exc:
            raise self._wrap(exc, broker, conn, what) from None

    async def _new_channel(self, broker: _Broker, conn: _Connection,
                           what: str) -> aiormq.Channel:
        """A confirm channel. Under a broker's channel_max, numbered from the lowest
        free number (aiormq counts on from the highest in use, past channel_max once
        channels closed below it), once the channels being closed are (a closed one
        counts until the broker confirms it)."""
        connection = conn.connection
        tune = getattr(connection, "connection_tune", None)
        cap = getattr(tune, "channel_max", 0) or 0
        try:
            number = None
            if cap:
                while len(connection.channels) >= cap and not connection.is_closed:
                    await asyncio.sleep(CHANNEL_WAIT_SEC)
                number = next(n for n in range(1, cap + 1) if n not in connection.channels)
            channel = await connection.channel(number, publisher_confirms=True,
                                               on_return_raises=True)
        except Exception as exc:
            raise self._wrap(exc, broker, conn, what) from None
        return cast(aiormq.Channel, channel)

    def _retire(self, dest: _Dest, chan: _Channel) -> None:
        if dest.current is chan:
            dest.current = None
        chan.stale = True
        if chan.users == 0:
            self._close_later(chan.channel.close())

    def _drop(self, broker: _Broker, conn: _Connection | None,
              why: str = "it failed") -> None:
        """Forget ``conn``; the next delivery connects again. Closed with a reason, not
        aiormq's default CancelledError: a delivery of another hook waiting on it (a
        channel opening, a queue declared) then fails as a lost connection, which it
        reports, rather than as a cancelled task with no outcome."""
        if conn is None:
            return
        if broker.current is conn:
            broker.current = None
        if not conn.connection.is_closed:
            self._close_later(conn.connection.close(
                amqp.AMQPConnectionError(f"closed by hookray: {why}")))

    def _close_later(self, closing: Any) -> None:
        task = asyncio.ensure_future(_quietly(closing))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self._idle.stop()
        for broker in self._brokers.values():
            conn, broker.current = broker.current, None
            if conn is not None and not conn.connection.is_closed:
                await _quietly(conn.connection.close(
                    amqp.AMQPConnectionError("closed by hookray: the transport stops")))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._brokers.clear()

    # --- errors ------------------------------------------------------------------------

    @staticmethod
    def _wrap_connect(exc: Exception, broker: _Broker) -> TransportError:
        if isinstance(exc, TransportError):
            return exc
        tls = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        if isinstance(tls, ssl.SSLCertVerificationError):
            return ConnectError(f"{broker.where}: TLS: the broker's certificate is not "
                                f"trusted: {tls.verify_message} (tls_cafile: "
                                f"{broker.tls_cafile or 'none, the system CAs'})")
        if isinstance(tls, ssl.SSLError):
            return ConnectError(f"{broker.where}: TLS handshake failed ({tls.reason or tls}): "
                                "is this port a TLS (amqps) listener?")
        if isinstance(exc, amqp.AuthenticationError | amqp.ProbableAuthenticationError):
            guest = " (or, for guest, a broker that takes it only from its own host, as " \
                "RabbitMQ's loopback_users does by default: give the broker's own user)" \
                if broker.user == "guest" else ""
            return ConnectError(f"{broker.where}: login refused for user {broker.user!r}: "
                                f"wrong user name or password{guest} ({_text(exc)})")
        if isinstance(exc, amqp.ConnectionNotAllowed) or (
                isinstance(exc, amqp.InvalidFrameError) and "Connection.OpenOk" in str(exc)):
            # the broker closes the connection on Connection.Open, with no reason aiormq keeps
            return ConnectError(f"{broker.where}: virtual host {broker.vhost!r} refused: it "
                                f"does not exist or user {broker.user!r} has no permissions "
                                "on it")
        text = _text(exc)
        if not broker.tls and isinstance(exc, amqp.AMQPConnectionError) and any(
                word in text for word in ("reset", "closed")):
            # what a TLS-only listener does with a plain AMQP greeting
            text += "; if this port takes TLS (amqps) only, set tls: true"
        return ConnectError(f"{broker.where}: cannot connect: {text}")

    @staticmethod
    def _wrap(exc: BaseException, broker: _Broker, conn: _Connection, what: str
              ) -> TransportError:
        if isinstance(exc, TransportError):
            return exc
        if isinstance(exc, amqp.PublishError):
            reply = getattr(exc.frame, "reply_text", "")
            return Rejected(f"{broker.where}: the broker returned the message as unroutable "
                            f"({reply}): {what} no longer exists; it is declared again on "
                            "the next attempt")
        if isinstance(exc, amqp.DeliveryError):
            return Rejected(f"{broker.where}: the broker nacked the message for {what}")
        if isinstance(exc, amqp.AMQPChannelError):
            return Rejected(f"{broker.where}: the broker closed the channel for {what}: "
                            f"{_text(exc)}")
        if isinstance(exc, OSError | amqp.AMQPConnectionError) or conn.connection.is_closed:
            return ConnectError(f"{broker.where}: connection lost: {_text(exc)}")
        if isinstance(exc, amqp.ChannelInvalidStateError):
            return Rejected(f"{broker.where}: the channel for {what} is closed: {_text(exc)}")
        return Rejected(f"{broker.where}: {what}: {_text(exc)}")


class RabbitQueueTransport(RabbitTransport):
    kind = "rabbitmq_queue"


class RabbitExchangeTransport(RabbitTransport):
    kind = "rabbitmq_exchange"


class _GuardedConnect(aiormq.TransportFactory):
    """Opens the broker's connection on a socket connected to an address
    DESTINATION_DENY allows (the name resolved and each address checked here, so
    aiormq never resolves it again), then hands it to aiormq as its own factories do."""

    def __init__(self, guard: DestinationGuard, tls: bool) -> None:
        self.guard = guard
        self.tls = tls

    async def create(self, url: URL, **kwargs: Any
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider", None)
        context = await provider.get_context() if self.tls and provider is not None else None
        host = url.host or ""
        try:
            sock = await self.guard.connect(host, url.port or 0)
            try:
                return await asyncio.open_connection(
                    sock=sock, ssl=context, server_hostname=host if context else None,
                    **kwargs)
            except BaseException:
                sock.close()
                raise
        except Denied as exc:
            raise amqp.AMQPConnectionError(str(exc)) from exc
        except OSError as exc:  # as aiormq's own factories raise it
            raise amqp.AMQPConnectionError(*exc.args) from exc


def _text(exc: BaseException) -> str:
    args = [a for a in exc.args if a not in (None, "")]
    text = " ".join(str(a) for a in args) if args else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _quietly(closing: Any) -> None:
    """Await ``closing`` (a connection's close) for CLOSE_TIMEOUT_SEC at most, its
    errors ignored: a CancelledError of aiormq's own futures too, but not this task's
    own cancellation (a stop that cancels ``close()`` must not be turned into a
    return)."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_SEC):
            await closing
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # a close that fails leaves nothing to do
        pass


TRANSPORTS = {"rabbitmq_queue": RabbitQueueTransport,
              "rabbitmq_exchange": RabbitExchangeTransport}
