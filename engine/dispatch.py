"""The data path of one partition, without Ray: read → match → build → batch → send
→ settle → acknowledge. ``actors.partition`` runs ``PartitionWorker.run`` in a Ray
actor and supplies a ``Sender`` that calls the transport pool.

Bookkeeping that makes "nothing accepted is lost" hold:

* every message added to a batch counts against the stream entry it came from;
* a batch leaves as a ``Delivery``; its outcome *settles* it: delivered, or
  written to the retry schedule (which the retry worker owns from then on);
* an entry is acknowledged (XACK + XDEL) only when all its messages are settled;
* after a crash, the actor reads its own pending entries again first
  (at-least-once; receivers de-duplicate by ``hook_message_id``).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np
import redis

from engine.assembly import Assembler, Round
from engine.catalogue import EventCatalogue, load_catalogue
from engine.events import Event
from engine.hooks import Hook
from engine.intake import decode_entry, decode_views
from engine.keys import CONSUMER_GROUP, Keys
from engine.matching import EventColumns, HookIndex
from engine.messages import PartView
from engine.names import NameCatalogue
from engine.partitioning import retry_due_ms
from engine.settings import Settings
from engine.stores import ContentStore, HookRegistry, NameStore, ProfileStore, RetryStore, Stats
from engine.transports.base import Delivery, Outcome, now_ms

log = logging.getLogger("hookray")

PROFILE_CACHE_MAX = 200_000  # cached profiles per partition before the cache is dropped
MAX_INFLIGHT = 2_000  # deliveries awaiting an outcome before reading pauses
# messages built and not yet settled before reading pauses: bounds a partition's memory
# when its destinations are slower than its reading (4,000-message Kafka batches)
MAX_UNSETTLED = 200_000
IMMEDIATE_MAX_BATCH = 1_000  # broker batches: messages per delivery, sent every round
# Kafka deliveries are split by partition inside the transport: a larger delivery keeps
# each partition's record batch near its 256 KiB size
KAFKA_MAX_BATCH = 4_000


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic GC during a round: its objects are freed by reference counting, and a
    full collection over a round's hundreds of thousands of live objects costs more
    than the round's own work. Collection resumes (and catches up) afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Sender(Protocol):
    """Hands deliveries to transports and returns their outcomes."""

    def submit(self, hook: Hook, delivery: Delivery) -> None: ...
    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]: ...
    def inflight(self) -> int: ...


@dataclass
class _Batch:
    hook: Hook
    opened: float
    parts: list[bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    mids: list[str] = field(default_factory=list)
    entries: Counter[str] = field(default_factory=Counter)


def batch_limits(hook: Hook, cap: int) -> tuple[int, float]:
    """(max messages, flush timeout sec) of a hook's outgoing batches; ``cap`` is the
    installation's MAX_HTTP_BATCH."""
    target = hook.target.http_batch
    if target is not None:
        return min(target.max_batch_size, cap), target.flush_timeout_sec
    if hook.target.kafka is not None:
        return KAFKA_MAX_BATCH, 0.0
    return IMMEDIATE_MAX_BATCH, 0.0


class Side:
    """Redis-side stores one worker uses."""

    def __init__(self, r: redis.Redis, settings: Settings, catalogue: EventCatalogue) -> None:
        self.keys = Keys(settings.REDIS_PREFIX)
        self.registry = HookRegistry(r, self.keys, catalogue)
        self.names = NameStore(r, self.keys)
        self.profiles = ProfileStore(r, self.keys)
        self.content = ContentStore(r, self.keys, int(settings.HOOK_CONTENT_CLEANUP_HOURS * 3600))
        self.retry = RetryStore(r, self.keys)
        self.stats = Stats(r, self.keys)


class Dispatcher:
    """Matching, message building and per-hook batching for a partition."""

    def __init__(self, side: Side, catalogue: EventCatalogue, max_http_batch: int) -> None:
        self.side = side
        self.max_http_batch = max_http_batch
        self.catalogue = catalogue
        self.index = HookIndex.compile([], catalogue)
        self.builders: dict[int, Assembler] = {}
        self.batches: dict[int, _Batch] = {}
        self.names = NameCatalogue()
        self.versions = {"hooks": -1, "names": -1, "profiles": -1}
        self.profile_cache: dict[tuple[int, str], dict[str, Any] | None] = {}
        # delivery id -> (hook it was built for, messages per stream entry), until settled
        self.pending_hooks: dict[str, tuple[Hook, Counter[str]]] = {}

    # --- configuration ---------------------------------------------------------------

    def refresh(self, now: float) -> list[Delivery]:
        """Pick up hook, name and profile changes; returns batches flushed by a change."""
        with self.side.registry.r.pipeline(transaction=False) as pipe:
            for key in (self.side.keys.hooks_version, self.side.keys.names_version,
                        self.side.keys.profiles_version):
                pipe.get(key)
            hooks_v, names_v, profiles_v = (int(v or 0) for v in pipe.execute())
        flushed: list[Delivery] = []
        if names_v != self.versions["names"]:
            self.names = self.side.names.load()
            self.versions["names"] = names_v
            for builder in self.builders.values():
                builder.names = self.names
        if profiles_v != self.versions["profiles"]:
            self.profile_cache.clear()
            self.versions["profiles"] = profiles_v
        if hooks_v != self.versions["hooks"]:
            version, hooks = self.side.registry.load()
            flushed = self._install(hooks)
            self.versions["hooks"] = version
        return flushed

    def _install(self, hooks: list[Hook]) -> list[Delivery]:
        self.index = HookIndex.compile(hooks, self.catalogue)
        current = {h.id: h for h in self.index.hooks}
        flushed = [self._flush(hid) for hid, b in list(self.batches.items())
                   if current.get(hid) != b.hook]
        self.builders = {hid: self.builders[hid] if hid in self.builders
                         and self.builders[hid].hook == h else Assembler(h, self.names,
                                                                         self.catalogue)
                         for hid, h in current.items() if hid is not None}
        return [d for d in flushed if d is not None]

    # --- events → batches ------------------------------------------------------------

    def process(self, entries: list[tuple[str, list[Event]]], now: float,
                views: list[PartView] | None = None) -> tuple[list[Delivery], Counter[str]]:
        """Match and batch the events of ``entries``; returns full batches and, per
        entry id, how many messages it produced. ``views``: the events' message-part
        fields as read from the stream, in the same order (see ``decode_views``)."""
        produced: Counter[str] = Counter({eid: 0 for eid, _ in entries})
        events = [e for _, evs in entries for e in evs]
        if not events or not self.index.hooks:
            return [], produced
        entry_ids = [eid for eid, _ in entries]
        owner = np.repeat(np.arange(len(entries)), [len(evs) for _, evs in entries])
        matches = self.index.match(EventColumns.from_events(events, self.catalogue))
        rnd = Round(events, self.catalogue, self.names, self._content(matches, events), views)
        self._attach_profiles(matches, events)
        per_entry = np.zeros(len(entries), np.int64)
        full: list[Delivery] = []
        with self.side.registry.r.pipeline(transaction=False) as pipe:
            for pos, idx in matches.items():
                hook = self.index.hooks[pos]
                self.side.stats.add(pipe, hook.id or 0, "accepted", len(idx))
                full.extend(self._add(hook, idx, rnd, owner, entry_ids, per_entry, now))
            pipe.execute()
        for n, count in enumerate(per_entry.tolist()):
            produced[entry_ids[n]] += count
        return full, produced

    def _add(self, hook: Hook, idx: np.ndarray, rnd: Round, owner: np.ndarray,
             entry_ids: list[str], per_entry: np.ndarray, now: float) -> list[Delivery]:
        """Add the hook's messages for the events ``idx`` to its open batch, in chunks
        that fill the batch exactly; returns the batches that became full."""
        assembler = self.builders[hook.id or 0]
        max_size, _ = batch_limits(hook, self.max_http_batch)
        kind = hook.target.kind
        key_choice = hook.target.kafka.key if hook.target.kafka else "list_event"
        full = []
        batch = self.batches.get(hook.id or 0) or self._open(hook, now)
        where = idx.tolist()
        # the hook's messages of the round at once (whole columns), then cut to batches
        messages, mids = assembler.assemble(rnd, where)
        if kind == "kafka":
            keys: Sequence[str] = rnd.kafka_keys(where, key_choice)
        elif kind != "http_batch":
            keys = rnd.routing_keys(where)
        else:
            keys = ()
        start = 0
        while start < len(where):
            stop = start + max_size - len(batch.parts)
            batch.parts += messages[start:stop]
            batch.mids += mids[start:stop]
            batch.keys += keys[start:stop]
            counts = np.bincount(owner[idx[start:stop]], minlength=len(entry_ids))
            per_entry += counts
            for n in np.flatnonzero(counts).tolist():
                batch.entries[entry_ids[n]] += int(counts[n])
            start = stop
            if len(batch.parts) >= max_size:
                full.append(self._flush(hook.id or 0))
                batch = self._open(hook, now)
        return [d for d in full if d is not None]

    def _open(self, hook: Hook, now: float) -> _Batch:
        batch = self.batches[hook.id or 0] = _Batch(hook, now)
        return batch

    def _content(self, matches: dict[int, Any], events: list[Event]) -> dict[str, dict[str, Any]]:
        """Stored content of the events matched by send_content hooks: one MGET."""
        wanted = {send_id for pos, idx in matches.items() if self.index.hooks[pos].send_content
                  for i in idx.tolist() if (send_id := events[i].send_id)}
        return self.side.content.get_many(sorted(wanted))

    def _attach_profiles(self, matches: dict[int, Any], events: list[Event]) -> None:
        """Profiles for events without one, for hooks that copy profile fields: cached,
        missing ones fetched in one round trip."""
        needy: list[int] = [i for pos, idx in matches.items()
                            if self.index.hooks[pos].custom_data.fields for i in idx.tolist()]
        missing: set[tuple[int, str]] = {(events[i].account_id, pid) for i in needy
                                         if events[i].profile is None
                                         and (pid := events[i].profile_id)}
        unknown = [key for key in missing if key not in self.profile_cache]
        if unknown:
            if len(self.profile_cache) > PROFILE_CACHE_MAX:
                self.profile_cache.clear()
            wanted: dict[int, list[str]] = {}
            for account, pid in unknown:
                wanted.setdefault(account, []).append(pid)
            found = self.side.profiles.get_many(wanted)
            for key in unknown:
                self.profile_cache[key] = found.get(key)
        for i in needy:
            e = events[i]
            if e.profile is None and e.profile_id:
                e.profile = self.profile_cache.get((e.account_id, e.profile_id))

    def due(self, now: float) -> list[Delivery]:
        """Batches whose flush timeout elapsed (broker batches: every round)."""
        out = []
        for hook_id, batch in list(self.batches.items()):
            _, timeout = batch_limits(batch.hook, self.max_http_batch)
            if batch.parts and now - batch.opened >= timeout:
                out.append(self._flush(hook_id))
        return [d for d in out if d is not None]

    def open_messages(self) -> int:
        return sum(len(b.parts) for b in self.batches.values())

    def _flush(self, hook_id: int) -> Delivery | None:
        batch = self.batches.pop(hook_id, None)
        if batch is None or not batch.parts:
            return None
        delivery = Delivery(id=uuid.uuid4().hex, hook_id=hook_id,
                            account_id=batch.hook.account_id, kind=batch.hook.target.kind,
                            parts=batch.parts, keys=batch.keys, message_ids=batch.mids,
                            created_ms=now_ms())
        self.pending_hooks[delivery.id] = (batch.hook, batch.entries)
        return delivery


class PartitionWorker:
    """Reads one partition's stream and drives the Dispatcher; owns acknowledgements."""

    def __init__(self, settings: Settings, r: redis.Redis, partition: int, sender: Sender,
                 catalogue: EventCatalogue | None = None, consumer: str | None = None) -> None:
        self.settings = settings
        self.r = r
        self.partition = partition
        self.sender = sender
        catalogue = load_catalogue(settings.EVENT_TYPES_FILE) if catalogue is None else catalogue
        self.side = Side(r, settings, catalogue)
        self.dispatcher = Dispatcher(self.side, catalogue, settings.MAX_HTTP_BATCH)
        self.stream = self.side.keys.intake(partition)
        self.consumer = consumer or f"partition-{partition}"
        self.entry_left: Counter[str] = Counter()  # entry id -> messages not yet settled
        self.unsettled = 0  # the sum of entry_left
        self.reading_own_pending = True  # after a restart, re-read unacknowledged entries
        self.pending_cursor = "0"

    def step(self, block_ms: int | None = None) -> int:
        """One round: refresh, read, batch, send, settle, ack. Returns entries read."""
        with paused_gc():
            return self._step(block_ms)

    def _step(self, block_ms: int | None) -> int:
        reading = self.sender.inflight() < MAX_INFLIGHT and self.unsettled < MAX_UNSETTLED
        entries, views = self._read(block_ms) if reading else ([], None)
        # refresh after reading: a hook change committed before an event was appended
        # is always seen by the round that processes the event
        now = time.monotonic()
        ready = self.dispatcher.refresh(now)
        full, produced = self.dispatcher.process(entries, now, views)
        ready += full
        for eid, n in produced.items():
            self.entry_left[eid] += n
        self.unsettled += sum(produced.values())
        ready += self.dispatcher.due(time.monotonic())
        for delivery in ready:
            hook, _ = self.dispatcher.pending_hooks[delivery.id]
            self.sender.submit(hook, delivery)
        self._settle(self.sender.poll(0.0 if entries or ready else 0.01))
        self._ack([eid for eid, n in produced.items() if n == 0])
        return len(entries)

    def _read(self, block_ms: int | None
              ) -> tuple[list[tuple[str, list[Event]]], list[PartView] | None]:
        """Entries read (id, events), and the events' part views (None when an
        entry has none: written as JSON by an older version)."""
        if block_ms is None:
            busy = self.sender.inflight() or self.dispatcher.open_messages()
            block_ms = 20 if busy else 100
        start = self.pending_cursor if self.reading_own_pending else ">"
        reply: Any = self.r.xreadgroup(CONSUMER_GROUP, self.consumer, {self.stream: start},
                                  count=self.settings.READ_MAX_ENTRIES,
                                  block=None if self.reading_own_pending else block_ms)
        items = reply[0][1] if reply else []
        if self.reading_own_pending:
            # entries this consumer read before a restart and never acknowledged
            if items:
                self.pending_cursor = items[-1][0].decode()
            else:
                self.reading_own_pending = False
            self._ack([eid.decode() for eid, fields in items if not fields])  # deleted ones
        entries = []
        readable = []
        for eid, fields in items:
            if not fields:
                continue
            try:
                entries.append((eid.decode(), decode_entry(fields)))
                readable.append(fields)
            except (msgspec.DecodeError, KeyError) as exc:  # would fail every round
                self._set_aside(eid.decode(), fields, exc)
        views: list[PartView] | None = []
        for fields in readable:
            part = decode_views(fields)
            if part is None:
                views = None
                break
            views += part  # type: ignore[operator]
        return entries, views

    def _set_aside(self, entry_id: str, fields: dict[bytes, bytes], exc: Exception) -> None:
        """An entry that cannot be decoded (not written by hookray's intake, or damaged)
        is copied, with ``_partition``, ``_entry`` and ``_error`` fields, to the
        ``intake_unreadable`` stream and acknowledged, instead of failing every round
        after it; counted as ``entries_unreadable`` in the engine's stats."""
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        log.warning("partition %s: intake entry %s cannot be read, set aside: %s",
                    self.partition, entry_id, reason)
        record: dict[Any, Any] = dict(fields)  # the entry's own fields, then why
        record.update({b"_partition": str(self.partition), b"_entry": entry_id,
                       b"_error": reason})
        with self.r.pipeline(transaction=True) as pipe:
            pipe.xadd(self.side.keys.intake_unreadable, record)
            pipe.hincrby(self.side.keys.engine_stats, "entries_unreadable", 1)
            pipe.xack(self.stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.execute()

    def _settle(self, outcomes: list[tuple[Delivery, Outcome]]) -> None:
        if not outcomes:
            return
        done: list[str] = []
        delivered: Counter[int] = Counter()
        for delivery, outcome in outcomes:
            if outcome.ok:
                delivered[delivery.hook_id] += delivery.count
            else:
                delivery.last_attempt_ms = now_ms()
                due = retry_due_ms(delivery.last_attempt_ms, self.settings.HOOK_RETRY_PERIOD_SEC)
                if self.settings.HOOK_RETRY_TIMES == 0:
                    self.side.retry.kill(delivery, outcome.describe())
                else:
                    self.side.retry.schedule(delivery, due, outcome.describe())
            _, entries = self.dispatcher.pending_hooks.pop(delivery.id)
            for eid, n in entries.items():
                self.entry_left[eid] -= n
                self.unsettled -= n
                if self.entry_left[eid] <= 0:
                    del self.entry_left[eid]
                    done.append(eid)
        self._ack(done, delivered)  # retries were written above, before any ack

    def _ack(self, entry_ids: list[str], delivered: Counter[int] | None = None) -> None:
        """Acknowledge and delete settled entries, and count deliveries: one round trip."""
        if not entry_ids and not delivered:
            return
        with self.r.pipeline(transaction=False) as pipe:
            for hook_id, n in (delivered or {}).items():
                self.side.stats.add(pipe, hook_id, "delivered", n)
            if entry_ids:
                pipe.xack(self.stream, CONSUMER_GROUP, *entry_ids)
                pipe.xdel(self.stream, *entry_ids)
            pipe.execute()

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None
            ) -> None:
        """Loop until ``stop`` is set; a failing round is reported and retried."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:  # Redis down, or a bug: reported, and the loop lives on
                if not isinstance(exc, redis.RedisError):
                    log.exception("partition %s: a round failed", self.partition)
                if on_error:
                    on_error(exc)
                time.sleep(0.5)
