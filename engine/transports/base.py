"""The transport contract: what every transport (http, rabbitmq, kafka, stub) does.

A transport sends one ``Delivery`` (a batch of encoded messages of one hook) to the
hook's target and reports an ``Outcome``. Driver errors are wrapped into
``engine.errors.TransportError`` subclasses inside ``_deliver``; ``send`` turns
them into a failed Outcome, so callers never see a driver exception.

Implementations live one per module (``http``, ``stub``, ...) and are loaded by
``load_transport(kind)`` on first use, so aio-pika or aiokafka are imported only
by the processes that need them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, cast

import msgspec
import numpy as np

from engine.errors import ConnectError, Queued, TransportError
from engine.transports.guard import DestinationGuard, guard_for

log = logging.getLogger("hookray")

EXCERPT_CHARS = 300  # how much of a response body an Outcome keeps
DEFAULT_QUEUE_SEC = 60.0  # DESTINATION_QUEUE_SEC's default


class Delivery(msgspec.Struct, forbid_unknown_fields=True):
    """A batch of one hook's encoded messages, as sent, retried and dead-lettered.

    Stored (re-sends, dead letters) with its fields by name. A stored one with a field
    this version does not know (written by a newer version, read after a roll-back)
    is refused when decoded (``msgspec.ValidationError``, naming the field), not read
    without it: a re-send is set aside (``{p}:retry:unreadable``, put back by
    ``set-aside --retries --requeue`` once a version that reads it runs), a dead
    letter is skipped by listings and refused by replay, both kept as they are. One
    without a later field (an earlier version's) takes its default."""

    id: str
    hook_id: int
    account_id: int
    kind: str
    parts: list[bytes]  # one encoded message each
    keys: list[str] = []  # per part: routing key (RabbitMQ) or record key (Kafka)
    message_ids: list[str] = []
    resends: int = 0  # re-sends done so far (the first attempt is not one; -1: a
    # replayed dead letter, whose replay is not one either)
    created_ms: int = 0
    last_error: str = ""
    last_attempt_ms: int = 0
    restarts: int = 0  # TransportRestarted failures in a row, using up no re-send

    @property
    def count(self) -> int:
        return len(self.parts)


class Outcome(msgspec.Struct, omit_defaults=True):
    ok: bool
    status: int | None = None  # HTTP status, when there was a response
    detail: str = ""  # a body excerpt, a broker answer or the error text
    error: str | None = None  # ConnectError | Timeout | Rejected | ...
    # a failure of some of the delivery's messages only: their positions (the others
    # were delivered); None: every message failed (or, ok, none)
    failed: list[int] | None = None

    def describe(self) -> str:
        """A failure in one line, as kept with a re-send or dead letter: its error kind
        and detail (an HTTP failure's detail starts with its status)."""
        kind = f"{self.error}: " if self.error else ""
        return f"{kind}{self.detail}"[:1000]


# TransportRestarted failures in a row that use up no re-send: one more is charged (a
# delivery that ends its transport actor each time it is sent is no restart's victim)
MAX_UNCHARGED_RESTARTS = 5


def uncharged(delivery: Delivery, outcome: Outcome) -> bool:
    """Whether a failed delivery's failure says nothing of its destination: it is
    scheduled again without using up a re-send, and never dead-lettered for it. One
    that waited DESTINATION_QUEUE_SEC for its destination and was never sent
    (``Queued``); one a stop's drain left without an outcome (``Stopped``); one whose
    transport actor died or restarted (calls made while Ray restarts it fail at once,
    sent or not: with HOOK_RETRY_TIMES 0, or on a last re-send, a batch never sent
    would be a dead letter), up to MAX_UNCHARGED_RESTARTS times in a row
    (``Delivery.restarts``)."""
    if outcome.error in ("Queued", "Stopped"):
        return True
    return outcome.error == "TransportRestarted" and \
        delivery.restarts < MAX_UNCHARGED_RESTARTS


def restarts_after(delivery: Delivery, outcome: Outcome) -> int:
    """``Delivery.restarts`` after ``outcome``: counted on, or back to 0."""
    return delivery.restarts + 1 if outcome.error == "TransportRestarted" else 0


def queued(outcome: Outcome) -> bool:
    """Whether a failed delivery was never sent, having waited DESTINATION_QUEUE_SEC for
    its destination (Queued)."""
    return outcome.error == "Queued"


def undelivered(delivery: Delivery, outcome: Outcome) -> tuple[Delivery, int]:
    """What of a failed ``delivery`` is still to send after ``outcome``, and how many
    of its messages were delivered: the messages ``outcome.failed`` names (same id,
    resends and history), or all of them when it names none or cannot be read."""
    failed = outcome.failed
    count = delivery.count
    if not failed:
        return delivery, 0
    keep = sorted({i for i in failed if isinstance(i, int) and 0 <= i < count})
    if not keep or len(keep) >= count:
        return delivery, 0

    def pick(column: list[str]) -> list[str]:
        return [column[i] for i in keep] if len(column) == count else column

    rest = msgspec.structs.replace(delivery, parts=[delivery.parts[i] for i in keep],
                                   keys=pick(delivery.keys),
                                   message_ids=pick(delivery.message_ids))
    return rest, count - len(keep)


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(Delivery)
_many_unpacker = msgspec.msgpack.Decoder(list[Delivery])


def pack_delivery(delivery: Delivery) -> bytes:
    return _packer.encode(delivery)


def unpack_delivery(data: bytes) -> Delivery:
    return _unpacker.decode(data)


def pack_deliveries(deliveries: list[Delivery]) -> np.ndarray:
    """Deliveries as one msgpack blob: what crosses from a partition to a transport
    actor (several times cheaper than pickling the structs). A uint8 array over the
    encoder's buffer, not ``bytes``: Ray hands an array to the object store out of
    band, and the actor decodes it in place, where ``bytes`` go through pickle (a
    4 MiB call: 1.4 against 6.2 ms of the caller's CPU, measured here)."""
    buf = bytearray()
    _packer.encode_into(deliveries, buf)
    return np.frombuffer(buf, np.uint8)


def unpack_deliveries(data: bytes | np.ndarray) -> list[Delivery]:
    """What ``pack_deliveries`` packed (an array or the same bytes)."""
    return _many_unpacker.decode(cast(bytes, data))  # any buffer


def writable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate (a header or body a destination
    sent in another encoding, which aiohttp or a charset it named decoded so) shown as
    its escape, ``\\udce9``. An outcome's text is kept with a re-send or dead letter:
    one that cannot be written would stop the worker booking it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def now_ms() -> int:
    return int(time.time() * 1000)


class Transport(ABC):
    """One transport kind; one instance per transport actor, shared by all its hooks."""

    kind: ClassVar[str]

    def __init__(self, deny: str | DestinationGuard | None = None,
                 queue_sec: float = DEFAULT_QUEUE_SEC, **options: Any) -> None:
        # DESTINATION_DENY: the addresses no delivery may connect to (engine.transports.guard)
        self.guard = guard_for(deny)
        # DESTINATION_QUEUE_SEC: the longest a delivery waits for its destination
        self.queue_sec = queue_sec
        self.options = options

    async def _take(self, slots: asyncio.Semaphore, what: str, size: int) -> None:
        """Take one of a destination's ``size`` ``slots`` (release it after the send),
        or fail with Queued (a Timeout) after ``queue_sec``: a destination slower than
        its hooks' batches arrive sheds the excess, unsent, into the retry schedule
        (without using up a re-send), rather than holding the batches, and with them
        the reading of every partition that sends to it."""
        try:
            async with asyncio.timeout(self.queue_sec):
                await slots.acquire()
        except TimeoutError:
            raise Queued(f"{what}: waited {self.queue_sec:g} s (DESTINATION_QUEUE_SEC) for "
                          f"one of its {size} sending slot(s) (DESTINATION_CONCURRENCY), busy "
                          "with earlier batches: it takes them more slowly than they come; "
                          "sent again later, not counted as a re-send") from None

    async def send(self, target: Any, delivery: Delivery) -> Outcome:
        """Deliver and report; never raises for a delivery failure."""
        try:
            outcome = await self._deliver(target, delivery)
        except TransportError as exc:
            return Outcome(ok=False, status=exc.status, error=type(exc).__name__,
                           detail=writable(str(exc)[:1000]), failed=exc.failed)
        outcome.detail = writable(outcome.detail)
        return outcome

    @abstractmethod
    async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
        """Send ``delivery`` to ``target`` (the hook's target settings model)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class TransportUnavailable(ConnectError):
    """The transport kind has no implementation installed; deliveries retry, then die."""


TRANSPORT_MODULES = {
    "http_batch": "engine.transports.http",
    "rabbitmq_queue": "engine.transports.rabbitmq",
    "rabbitmq_exchange": "engine.transports.rabbitmq",
    "kafka": "engine.transports.kafka",
    "stub": "engine.transports.stub",
}


def load_transport(kind: str, **options: Any) -> Transport:
    """A transport instance for ``kind``, importing its module only now."""
    if kind not in TRANSPORT_MODULES:
        raise ValueError(f"unknown transport kind {kind!r}; known: {', '.join(TRANSPORT_MODULES)}")
    try:
        module = importlib.import_module(TRANSPORT_MODULES[kind])
    except ModuleNotFoundError as exc:
        raise TransportUnavailable(
            f"transport {kind!r} is not available in this installation ({exc})") from None
    cls: type[Transport] = module.TRANSPORTS[kind]
    return cls(**options)


def available_kinds() -> list[str]:
    """Target kinds whose transport module is installed."""
    from importlib.util import find_spec

    return [k for k, m in TRANSPORT_MODULES.items() if k != "stub" and find_spec(m) is not None]


IDLE_CHECK_SEC = 60.0  # how often a transport closes its idle connections or producers
# the idle timer wakes no more often than this, whatever IDLE_CHECK_SEC says (0: a
# delivery looks each time, the timer every IDLE_TIMER_MIN_SEC)
IDLE_TIMER_MIN_SEC = 0.5


def close_idle(entries: dict[Any, Any], idle_sec: float,
               close: Callable[[Any, str], None]) -> None:
    """Close the ``entries`` (as ``make_room``'s) no delivery holds and none began to
    use for ``idle_sec``."""
    now = time.monotonic()
    for key, entry in list(entries.items()):
        if now - entry.used_at < idle_sec:
            break
        if entry.users == 0:
            close(entries.pop(key), f"unused for {idle_sec:g} s")


class IdleSweep:
    """A transport's idle sweep, ``sweep()``: it closes the connections, producers (or
    channels) no delivery holds and none used for a while, and returns whether the
    transport has any left to watch. Run at most once every IDLE_CHECK_SEC, by

    * a timer (``start()``): an asyncio task on the transport's event loop, started
      when the transport makes its first entry, which ends once ``sweep()`` leaves
      none, or at ``stop()`` (the transport's ``close()``). Without it, idle entries
      were closed only when a delivery came: a transport whose last hook was deleted
      kept its connections (and a Kafka producer its metadata refreshes, which make
      a topic the operator deleted again on a broker that creates topics) for good;
    * a delivery that finds it ``due()``: one made every IDLE_CHECK_SEC, before the
      delivery looks its entry up, as before the timer (a busy transport does what it
      did). Without it, idle ones were closed only when a new one joined: a hook whose
      password changed kept the old, authenticated connection open.

    The timer never raises: a failed sweep is logged, and tried again next time."""

    def __init__(self, sweep: Callable[[], bool], what: str) -> None:
        self.sweep = sweep
        self.what = what
        self.at = time.monotonic()  # when the last sweep was made
        self._task: asyncio.Task[None] | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.at < IDLE_CHECK_SEC:
            return False
        self.at = now
        return True

    def start(self) -> None:
        """Run the timer on the running event loop, unless it runs there already."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._task = loop.create_task(self._run(), name=f"hookray idle sweep: {self.what}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            wait = self.at + max(IDLE_CHECK_SEC, IDLE_TIMER_MIN_SEC) - time.monotonic()
            if wait > 0:  # a delivery may have swept meanwhile: counted from then
                await asyncio.sleep(wait)
                continue
            self.at = time.monotonic()
            try:
                if not self.sweep():
                    return  # nothing left to watch: started again by the next entry
            except Exception:
                log.exception("%s: closing idle connections failed (tried again in "
                              "%g s)", self.what, max(IDLE_CHECK_SEC, IDLE_TIMER_MIN_SEC))

    async def stop(self) -> None:
        """End the timer (the transport closes)."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        if task.get_loop() is asyncio.get_running_loop():
            await asyncio.wait([task])


# an entry used more lately than this is not closed to make room: with more
# destinations in use at once than a transport keeps, closing the least recently used
# one made every delivery open its destination anew (a producer started, TLS and SASL
# done again) while the cache stayed full
ROOM_IDLE_SEC = 30.0
ROOM_HARD_TIMES = 4  # past this many times the limit, one used lately is closed too
ROOM_WARN_SEC = 60.0  # at most one warning a minute of a cache kept over its limit
_room_warned: dict[int, float] = {}  # id(entries) -> when its last warning was said


def make_room(entries: dict[Any, Any], limit: int, idle_sec: float,
              close: Callable[[Any, str], None], what: str = "entries") -> None:
    """Before a new entry joins ``entries`` (a transport's cached connections or
    producers, least recently used first, each with ``users`` and ``used_at``): those
    no delivery holds and none began to use for ``idle_sec`` are closed (a hook whose
    settings changed, or that was deleted, leaves its own behind), and, while ``limit``
    is still reached, the least recently used ones no delivery holds and none used for
    ROOM_IDLE_SEC. One a delivery holds is never closed under it (the delivery would
    open it again, outside the cache, where nothing closes it), nor one in use lately
    (its next delivery would open it again): then the cache grows past ``limit``, up
    to ROOM_HARD_TIMES the limit, with a warning (``what``: "Kafka producers") at most
    once a minute, and shrinks again as they idle. ``close(entry, why)``."""
    close_idle(entries, idle_sec, close)
    now = time.monotonic()
    while len(entries) >= limit:
        # past ROOM_HARD_TIMES the limit, the least recently used one no delivery holds
        # goes even if used lately: a bound on sockets and tasks all the same
        lately = len(entries) < limit * ROOM_HARD_TIMES
        idle = next((k for k, e in entries.items() if e.users == 0 and
                     (not lately or now - e.used_at >= ROOM_IDLE_SEC)), None)
        if idle is None:
            if now - _room_warned.get(id(entries), -ROOM_WARN_SEC) >= ROOM_WARN_SEC:
                if len(_room_warned) > 1_000:
                    _room_warned.clear()
                _room_warned[id(entries)] = now
                log.warning("%d %s in use within %g s, more than the %d kept: all kept "
                            "(closing one would open it again at its next delivery)",
                            len(entries) + 1, what, ROOM_IDLE_SEC, limit)
            return
        close(entries.pop(idle), f"making room: at most {limit} are kept")
