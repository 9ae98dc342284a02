"""The data path of one partition, without Ray: read → match → build → batch → send
→ settle → acknowledge. ``actors.workers.PartitionActor`` runs ``PartitionWorker.run``
in a Ray actor and supplies a ``Sender`` that calls the transport pool.

Bookkeeping that makes "nothing accepted is lost" hold:

* every message added to a batch counts against the stream entry it came from;
* a batch leaves as a ``Delivery``; its outcome *settles* it: delivered, or
  written to the retry schedule (which the retry worker owns from then on);
* an entry is acknowledged (XACK + XDEL) only when all its messages are settled;
* after a crash, the actor reads its own pending entries again first
  (at-least-once; receivers de-duplicate by ``hook_message_id``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgspec
import numpy as np
import redis

from engine.assembly import Assembler, Round, warm
from engine.catalogue import EventCatalogue, load_catalogue
from engine.collector import paused_gc
from engine.errors import PrefixTaken, quoted
from engine.events import Event
from engine.failurelog import FailureLog
from engine.health import Heartbeat, Repeats, RoundFailures
from engine.hooks import Hook, hook_secrets, scrub
from engine.intake import decode_entry, decode_views
from engine.keys import CONSUMER_GROUP, Keys
from engine.lease import Holding
from engine.matching import EventColumns, HookIndex
from engine.messages import Content, PartView, content_key, for_target
from engine.names import NameCatalogue
from engine.partitioning import retry_due_ms
from engine.settings import DEFAULT_MAX_BATCH_BYTES, Settings
from engine.stores import (
    Booking,
    ContentStore,
    DataLost,
    HookRegistry,
    NameStore,
    ProfileStore,
    RetryStore,
    Stats,
    other_account,
    version_number,
)
from engine.transports.base import (
    Delivery,
    Outcome,
    now_ms,
    restarts_after,
    uncharged,
    undelivered,
)

log = logging.getLogger("hookray")

PROFILE_CACHE_MAX = 200_000  # cached profiles per partition before the cache is dropped
MAX_INFLIGHT = 2_000  # deliveries awaiting an outcome before reading pauses
STOP_BOOKING_BYTES = 8 * 2**20  # payloads a stop books as re-sends per script, or so
# messages built and not yet settled before reading pauses: bounds a partition's memory
# when its destinations are slower than its reading (4,000-message Kafka batches)
MAX_UNSETTLED = 200_000
# a worker stopping sends its open batches and waits this long at most for the outcomes
# of those in flight, so that what was delivered is acknowledged, not read and sent again
# by the next start (within the actor's 10 s and the driver's STOP_SEC)
DRAIN_SEC = 5.0
MAX_ENTRY_FAILURES = 5  # failed rounds (not Redis errors) before an entry is set aside
# times the process ended while processing an entry (out of memory, a crash in native
# code), its first read included, before it is set aside: else the partition would
# restart, read it first, and end again, for ever
MAX_PROCESS_ENDS = 3
# Redis errors that pass (a lost connection, a timeout, a replica or a loading server,
# one out of memory or refusing writes until it can persist or reach its replicas, a
# busy script): an entry is never set aside for them. Other Redis errors (WRONGTYPE on
# a key the round uses...) would fail every round, and count as the entry's failures.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError,
                     redis.exceptions.TryAgainError, redis.exceptions.OutOfMemoryError,
                     redis.exceptions.MasterDownError, redis.exceptions.ClusterDownError)
# the same refusals where redis-py raises them as a plain ResponseError: by error code
REDIS_REFUSALS = ("MISCONF", "NOREPLICAS", "BUSY", "LOADING", "MASTERDOWN", "OOM",
                  "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# an ACL refusal inside a script, as Redis words it with no NOPERM code: 6.2 and 7.0,
# then 7.2 and Valkey ("ERR ACL failure in script: No permissions to access a key")
_SCRIPT_ACL = ("The user executing the script can't", "ACL failure in script")


def redis_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says Redis cannot serve now (it passes), not that something
    of the round is wrong: see REDIS_UNAVAILABLE."""
    if isinstance(error, REDIS_UNAVAILABLE):
        return True
    if not isinstance(error, redis.ResponseError):
        return False
    # in a pipeline, redis-py puts "Command # N (...) of pipeline caused error: " first;
    # an error a script returned (book_once.lua), Redis 6.2 "@user_script: 23: -OOM ..."
    text = str(error).rpartition(" of pipeline caused error: ")[2]
    text = _SCRIPT_ERROR.sub("", text, count=1)
    return text.split(" ", 1)[0] in REDIS_REFUSALS


def acl_refusal(error: BaseException) -> bool:
    """Whether ``error`` is an ACL refusing the engine's Redis user a command or a key:
    every entry reaching that command fails alike, which is the operator's to mend (the
    worker's health says it), not an entry's fault."""
    if isinstance(error, redis.exceptions.NoPermissionError):
        return True
    text = str(error).rpartition(" of pipeline caused error: ")[2]
    return isinstance(error, redis.ResponseError) and (
        _SCRIPT_ERROR.sub("", text, count=1).startswith("NOPERM")
        or any(words in text for words in _SCRIPT_ACL))


def drain_at_stop(drain: Callable[[], int], who: str, things: str, units: str,
                  then: str) -> str | None:
    """Run a stopping worker's ``drain`` and say what it leaves without an outcome
    (``units``: "re-send(s)"), and ``then`` what becomes of it; a drain that failed is
    said too (with its traceback if it is a bug: ``expected_stop_error``). Returns what
    it said (for the driver to say too: Ray may end before a worker's log reaches it)."""
    try:
        left = drain()
    except Exception as exc:  # Redis down, the claim taken, a transport gone
        said = (f"{who}: stopped without the outcomes of the {things} in flight "
                f"({type(exc).__name__}: {str(exc)[:300]}); {then}")
        log.warning("%s", said, exc_info=not expected_stop_error(exc))
        return said
    if not left:
        return None
    said = (f"{who}: stopped with {left} {units} whose outcome did not come within "
            f"{DRAIN_SEC:g} s; {then}")
    log.warning("%s", said)
    return said


def expected_stop_error(error: BaseException) -> bool:
    """Whether a stop's drain failed for a reason of the moment (Redis, the claim, a
    transport gone): said in one line; any other error is a bug, said with its
    traceback."""
    return isinstance(error, (redis.RedisError, PrefixTaken, OSError)) or \
        type(error).__module__.startswith("ray")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is Redis refusing a write at its maxmemory (nothing of the
    command, or of the script, was carried out)."""
    if isinstance(error, redis.exceptions.OutOfMemoryError):
        return True
    text = str(error).rpartition(" of pipeline caused error: ")[2]
    return _SCRIPT_ERROR.sub("", text, count=1).startswith("OOM ")


_SCRIPT_ERROR = re.compile(r"^@user_script: ?\d+: -?")


# how often a partition looks for entries pending for it that it does not hold (handed
# over by a read whose reply never came: see PartitionWorker._orphans), and how long such
# an entry has been pending at least
ORPHAN_CHECK_SEC = 60.0
ORPHAN_IDLE_MS = 30_000
ORPHAN_PAGE = 1_000
IMMEDIATE_MAX_BATCH = 1_000  # broker batches: messages per delivery, sent every round
# Kafka deliveries are split by partition inside the transport: a larger delivery keeps
# each partition's record batch near its 256 KiB size
KAFKA_MAX_BATCH = 4_000


class Sender(Protocol):
    """Hands deliveries to transports and returns their outcomes."""

    def submit(self, hook: Hook, delivery: Delivery) -> None: ...
    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]: ...
    def inflight(self) -> int: ...
    def holds(self, delivery_id: str) -> bool:
        """True while a delivery of this id was submitted and has no outcome yet."""
        ...


@dataclass
class _Batch:
    hook: Hook
    opened: float
    parts: list[bytes] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    mids: list[str] = field(default_factory=list)
    entries: Counter[str] = field(default_factory=Counter)
    size: int = 0  # bytes of parts


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
        self.content = ContentStore(r, self.keys, settings.content_ttl_sec)
        self.retry = RetryStore(r, self.keys)
        self.stats = Stats(r, self.keys)


class Dispatcher:
    """Matching, message building and per-hook batching for a partition."""

    def __init__(self, side: Side, catalogue: EventCatalogue, max_http_batch: int,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, who: str = "a partition"
                 ) -> None:
        self.side = side
        self.who = who  # "partition 3", for the log
        self.max_http_batch = max_http_batch
        self.max_batch_bytes = max_batch_bytes
        self.catalogue = catalogue
        self.index = HookIndex.compile([], catalogue)
        self.builders: dict[int, Assembler] = {}
        self.batches: dict[int, _Batch] = {}
        self.names = NameCatalogue()
        self.versions = {"hooks": -1, "names": -1, "profiles": -1}
        # the change logs' tokens (ChangeLog) the names and profiles versions are of
        self.logs = {"names": b"", "profiles": b""}
        self.epoch: bytes | None = None  # of the data the versions are of (Keys.epoch)
        # called when the epoch changes from a known one: Redis lost the data the
        # batches held were of (PartitionWorker._data_lost)
        self.on_lost: Callable[[], None] | None = None
        self.profile_cache: dict[tuple[int, str], dict[str, Any] | None] = {}
        # delivery id -> (hook it was built for, messages per stream entry), until settled
        self.pending_hooks: dict[str, tuple[Hook, Counter[str]]] = {}
        # what the worker takes after every round, even one that failed half-way:
        self.outbox: list[Delivery] = []  # batches closed (full, due or flushed by a change)
        # batches closed that cannot be sent (their hook deleted) and why: booked as
        # failed sends, so the retry worker dead-letters them
        self.unsendable: list[tuple[Delivery, Outcome]] = []
        self.produced: Counter[str] = Counter()  # stream entry id -> messages batched
        # the hooks whose matches the last process() counted as accepted (with those
        # it was told were counted before), None if it counted none
        self.counted: frozenset[int] | None = None
        # the ``accepted`` counts of a round sent without a reply: (token, hook id ->
        # matches), sent again with its token before anything else, so made once
        self.unsure_count: tuple[str, Counter[int]] | None = None
        self.count_once: str | None = None  # the worker's booking-token key (Booking)
        # ``accepted`` counts Redis refused for want of memory (not made): made later
        self.deferred: Counter[int] = Counter()
        self.deferred_said = -60.0  # when that was last logged
        # events of codes the catalogue lacks, matched to no hook: logged once a minute
        # per code, with how many came since it was last logged (``say_unknown``)
        self.unknown_said = Repeats()
        self.unknown_unsaid: Counter[str] = Counter()
        self._booking = Booking(side.registry.r, side.keys.epoch)

    def take_outbox(self) -> list[Delivery]:
        out, self.outbox = self.outbox, []
        return out

    def take_produced(self) -> Counter[str]:
        out, self.produced = self.produced, Counter()
        return out

    # --- configuration ---------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """Pick up hook, name and profile changes (batches of changed hooks are flushed
        to the outbox)."""
        (hooks_v, names_v, profiles_v), epoch, (names_log, profiles_log) = self._versions()
        if epoch != self.epoch:  # Redis lost the data (or this is the first look)
            if self.epoch is not None and self.on_lost is not None:
                # before the hooks of the new data are installed: a batch held now is
                # of an event gone with the old data, and of a hook whose id a new hook
                # may have taken, which never captured it
                self.on_lost()
            self.versions = {"hooks": -1, "names": -1, "profiles": -1}
            self.logs = {"names": b"", "profiles": b""}
            self.epoch = epoch
        if names_v != self.versions["names"] or names_log != self.logs["names"]:
            names = self.side.names.since(self.names, self.versions["names"],
                                          self.logs["names"])
            self.names = names.what if names.what is not None else self.side.names.load()
            # the version read with the token (not names_v, read a round trip before),
            # once the names are in (a load that failed leaves the worker where it was)
            self.versions["names"], self.logs["names"] = names.version, names.token
            for builder in self.builders.values():
                builder.names = self.names
        if profiles_v != self.versions["profiles"] or profiles_log != self.logs["profiles"]:
            changed = self.side.profiles.changed_since(self.versions["profiles"],
                                                       self.logs["profiles"])
            if changed.what is None:
                self.profile_cache.clear()
            else:  # those changed since: the rest of the cache holds
                for profile in changed.what:
                    self.profile_cache.pop(profile, None)
            self.versions["profiles"], self.logs["profiles"] = changed.version, changed.token
        if hooks_v != self.versions["hooks"]:
            version, hooks = self.side.registry.load()
            self._install(hooks)
            self.versions["hooks"] = version

    def _versions(self) -> tuple[tuple[int, int, int], bytes | None, tuple[bytes, bytes]]:
        """(the hooks', names' and profiles' versions), the data's epoch, and the names'
        and profiles' change logs' tokens (b"": none), in one round trip."""
        keys = (self.side.keys.hooks_version, self.side.keys.names_version,
                self.side.keys.profiles_version)
        with self.side.registry.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            pipe.get(self.side.keys.epoch)
            # the change logs' tokens: a version moved back (by hand, or lost) to one a
            # worker holds is no change by the number alone, but the next change starts
            # the log again, under another token (a mark damaged from outside: none)
            for mark in (self.side.keys.names_logged, self.side.keys.profiles_logged):
                pipe.hget(mark, "token")
            *versions, epoch, names_log, profiles_log = pipe.execute(raise_on_error=False)
        for reply in (*versions, epoch):
            if isinstance(reply, Exception):
                raise reply
        hooks_v, names_v, profiles_v = (version_number(key, v) for key, v in
                                        zip(keys, versions, strict=True))
        logs = tuple(log if isinstance(log, bytes) else b"" for log in (names_log, profiles_log))
        return (hooks_v, names_v, profiles_v), epoch, cast(tuple[bytes, bytes], logs)

    def _install(self, hooks: list[Hook]) -> None:
        self.index = HookIndex.compile(hooks, self.catalogue)
        current = {h.id: h for h in self.index.hooks}
        stored = {h.id: h for h in hooks}
        for hid, b in list(self.batches.items()):
            if current.get(hid) != b.hook:
                # closed now, for the hook as it is stored now: a changed destination
                # or secret is where (and how) it goes, as its re-sends would; a
                # deleted hook's batch is not sent (its hook was deleted to stop them)
                self._flush(hid, stored.get(hid), changed=True)
        # batches closed but not handed over yet (a hand-over refused: they wait for
        # the next round) go as the open ones do
        outbox, self.outbox = self.outbox, []
        for delivery in outbox:
            built_for, held = self.pending_hooks.pop(delivery.id)
            if current.get(delivery.hook_id) == built_for:
                self.pending_hooks[delivery.id] = (built_for, held)
                self.outbox.append(delivery)
            else:
                self._close(delivery, built_for, held, stored.get(delivery.hook_id),
                            changed=True)
        self.builders = {hid: self.builders[hid] if hid in self.builders
                         and self.builders[hid].hook == h else Assembler(h, self.names,
                                                                         self.catalogue)
                         for hid, h in current.items() if hid is not None}

    # --- events → batches ------------------------------------------------------------

    def process(self, entries: list[tuple[str, list[Event]]], now: float,
                views: list[PartView] | None = None,
                counted: frozenset[int] | None = None) -> None:
        """Match and batch the events of ``entries``: batches that become full go to
        the outbox, the messages batched per entry are counted in ``produced`` (as they
        are batched, so a round failing half-way leaves an exact account). ``views``:
        the events' message-part fields as read from the stream, in the same order
        (see ``decode_views``). The hooks' ``accepted`` stats are counted, but for the
        hooks in ``counted`` (those a failed round counted already for these entries:
        a hook made or activated since is counted, none twice); ``self.counted`` says
        for which hooks they now are."""
        self.counted = None
        self.count_unsure()
        events = [e for _, evs in entries for e in evs]
        if not events or not self.index.hooks:
            return
        entry_ids = [eid for eid, _ in entries]
        owner = np.repeat(np.arange(len(entries)), [len(evs) for _, evs in entries])
        columns = EventColumns.from_events(events, self.catalogue)
        if columns.unknown_types:
            self.say_unknown(columns.unknown_types)
        matches = self.index.match(columns)
        # counted before anything is batched, by a booking with a token: one whose
        # reply is lost is sent again (the round's entries are not counted anew), and
        # no message of the round has left yet to be sent twice
        before = counted or frozenset()
        matched = {self.index.hooks[pos].id or 0: len(idx) for pos, idx in matches.items()}
        self.unsure_count = (uuid.uuid4().hex, Counter(
            {hook_id: n for hook_id, n in matched.items() if hook_id not in before}))
        self.counted = before | matched.keys()
        self.count_unsure()
        # routing keys by columns number the event types of the catalogue only: with a
        # type it lacks among them, they are made per event
        rnd = Round(events, self.catalogue, self.names, self._content(matches, events), views,
                    None if columns.unknown_types else columns)
        self._attach_profiles(matches, events)
        warm(rnd, [(self.builders[self.index.hooks[pos].id or 0], idx)
                   for pos, idx in matches.items()])
        for pos, idx in matches.items():
            self._add(self.index.hooks[pos], idx, rnd, owner, entry_ids, now)

    def count_unsure(self) -> None:
        """Book the ``accepted`` counts not known to be booked (``unsure_count``):
        raises while Redis fails; carried out once however often it is sent. Counts
        of the data Redis lost since (DataLost) go with it, and so does what the
        partition holds (``on_lost``); DataLost is raised then: the round's events
        were matched to the hooks of that data."""
        if self.unsure_count is None:
            if not self.deferred:
                return
            self.unsure_count, self.deferred = (uuid.uuid4().hex, self.deferred), Counter()
        token, counts = self.unsure_count
        if counts:
            once = None if self.count_once is None else (self.count_once, token)
            try:
                with self._booking(once, self.epoch) as pipe:
                    for hook_id, n in sorted(counts.items()):
                        self.side.stats.add(pipe, hook_id, "accepted", n)
            except DataLost:
                if self.on_lost is not None:
                    self.on_lost()
                self.unsure_count, self.deferred = None, Counter()
                raise
            except redis.ResponseError as exc:
                if not out_of_memory(exc):
                    raise
                # Redis at its maxmemory refused it before any write: counted by a
                # later round, and this one goes on, as the deliveries it acknowledges
                # and deletes make room (PartitionWorker._ack_round); else the engine
                # would stall for good, its entries filling Redis
                self.deferred.update(counts)
                self.say_deferred()
        self.unsure_count = None

    def say_deferred(self) -> None:
        """Log, once a minute, that counts wait for room in Redis."""
        if time.monotonic() - self.deferred_said < 60:
            return
        log.warning("Redis is at its maxmemory: the hooks' accepted and delivered counts "
                    "wait (made once it has room; lost if the partition's process ends "
                    "meanwhile), delivery and acknowledgements go on")
        self.deferred_said = time.monotonic()

    def say_unknown(self, codes: Counter[str]) -> None:
        """Log events whose code the catalogue lacks (removed from EVENT_TYPES_FILE
        after they were accepted): they match no hook, as no hook that names the code
        loads, and are acknowledged with their entries. Once a minute per code, with
        how many such events came since it was last said."""
        for code, n in codes.items():
            self.unknown_unsaid[code] += n
            if self.unknown_said.due(code) is None:
                continue
            count = self.unknown_unsaid.pop(code)
            log.warning("%s: %d event(s) of event type %s, which this engine's event types "
                        "lack (removed from EVENT_TYPES_FILE after they were accepted?), "
                        "matched no hook (a hook naming it would not load) and are "
                        "acknowledged with their intake entries; add the code back to "
                        "EVENT_TYPES_FILE to deliver such events", self.who, count,
                        quoted(code))

    def _add(self, hook: Hook, idx: np.ndarray, rnd: Round, owner: np.ndarray,
             entry_ids: list[str], now: float) -> None:
        """Add the hook's messages for the events ``idx`` to its open batch, in chunks
        that fill the batch exactly; batches that become full go to the outbox."""
        assembler = self.builders[hook.id or 0]
        max_size, _ = batch_limits(hook, self.max_http_batch)
        kind = hook.target.kind
        key_choice = hook.target.kafka.key if hook.target.kafka else "list_event"
        batch = self.batches.get(hook.id or 0)
        if batch is None or not batch.parts:  # the window starts with its first message
            batch = self._open(hook, now)
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
            stop = min(start + max_size - len(batch.parts), len(where))
            size = sum(map(len, messages[start:stop]))
            full = len(batch.parts) + stop - start >= max_size
            if batch.size + size > self.max_batch_bytes:
                # too many bytes for the batch: the messages that fit (at least one in
                # an empty batch), then it closes
                stop, size = self._fitting(messages, start, stop, batch)
                full = True
            counts = np.bincount(owner[idx[start:stop]], minlength=len(entry_ids))
            batch.parts += messages[start:stop]
            batch.mids += mids[start:stop]
            batch.keys += keys[start:stop]
            batch.size += size
            for n in np.flatnonzero(counts).tolist():
                batch.entries[entry_ids[n]] += int(counts[n])
                self.produced[entry_ids[n]] += int(counts[n])
            start = stop
            if full:
                self._flush(hook.id or 0)
                if start < len(where):
                    batch = self._open(hook, now)

    def _fitting(self, messages: Sequence[bytes], start: int, stop: int, batch: _Batch
                 ) -> tuple[int, int]:
        """(end, bytes) of the messages from ``start`` that fit in ``batch`` under
        MAX_BATCH_BYTES; one at least when the batch is empty."""
        size, end = 0, start
        room = self.max_batch_bytes - batch.size
        while end < stop and (size + len(messages[end]) <= room
                              or (end == start and not batch.parts)):
            size += len(messages[end])
            end += 1
        return end, size

    def _open(self, hook: Hook, now: float) -> _Batch:
        batch = self.batches[hook.id or 0] = _Batch(hook, now)
        return batch

    def _content(self, matches: dict[int, Any], events: list[Event]) -> Content:
        """Stored content of the events matched by send_content hooks: one MGET."""
        wanted = {key for pos, idx in matches.items() if self.index.hooks[pos].send_content
                  for i in idx.tolist() if (key := content_key(events[i]))}
        return self.side.content.get_many(sorted(wanted))

    def _attach_profiles(self, matches: dict[int, Any], events: list[Event]) -> None:
        """Profiles for events without one, for hooks that copy profile fields: cached,
        missing ones fetched in one round trip."""
        # the events of the round without a profile, then those among them a hook
        # with profile fields matched (most rounds: none without, no more work)
        hooks = self.index.hooks
        if not any(hooks[pos].custom_data.fields for pos in matches):
            return
        lacking = np.zeros(len(events), bool)
        lacking[[i for i, e in enumerate(events) if e.profile is None and e.profile_id]] = True
        if not lacking.any():
            return
        wanted_by = np.zeros(len(events), bool)
        for pos, idx in matches.items():
            if hooks[pos].custom_data.fields:
                wanted_by[idx] = True
        needy: list[int] = np.flatnonzero(lacking & wanted_by).tolist()
        missing: set[tuple[int, str]] = {(events[i].account_id, events[i].profile_id or "")
                                         for i in needy}
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
            e.profile = self.profile_cache.get((e.account_id, e.profile_id or ""))

    def due(self, now: float) -> None:
        """Flush the batches whose flush timeout elapsed (broker batches: every round)."""
        for hook_id, batch in list(self.batches.items()):
            _, timeout = batch_limits(batch.hook, self.max_http_batch)
            if batch.parts and now - batch.opened >= timeout:
                self._flush(hook_id)

    def open_messages(self) -> int:
        return sum(len(b.parts) for b in self.batches.values())

    def drop_batches(self) -> None:
        """Forget every batch, open, closed or in flight (their entries are read
        again, by this worker or another engine's)."""
        self.batches.clear()
        self.outbox.clear()
        self.unsendable.clear()
        self.produced.clear()
        self.pending_hooks.clear()

    def take_unsendable(self) -> list[tuple[Delivery, Outcome]]:
        out, self.unsendable = self.unsendable, []
        return out

    def _flush(self, hook_id: int, now: Hook | None = None, changed: bool = False) -> None:
        """Close the hook's open batch into a Delivery in the outbox. ``changed``: the
        hook changed (``now``, as stored now) or was deleted (None) since the batch
        opened; one that cannot go out goes to ``unsendable`` with its failure."""
        batch = self.batches.pop(hook_id, None)
        if batch is None or not batch.parts:
            return
        delivery = Delivery(id=uuid.uuid4().hex, hook_id=hook_id,
                            account_id=batch.hook.account_id, kind=batch.hook.target.kind,
                            parts=batch.parts, keys=batch.keys, message_ids=batch.mids,
                            created_ms=now_ms())
        self._close(delivery, batch.hook, batch.entries, now, changed)

    def _close(self, delivery: Delivery, built_for: Hook, entries: Counter[str],
               now: Hook | None, changed: bool) -> None:
        """Put ``delivery``, made for ``built_for``, in the outbox; ``changed``: for
        the hook as it is stored now (``now``; None: deleted), or in ``unsendable``
        with its failure when it cannot go out."""
        hook_id, batch_account = delivery.hook_id, built_for.account_id
        hook, failure = built_for, None
        if changed and now is None:
            failure = f"hook {hook_id} was deleted before this batch was sent"
        elif changed and now is not None and now.account_id != batch_account:
            # its id given to another account's hook: the batch never goes there (nor
            # do its re-sends: the retry worker kills them)
            failure = other_account(now, delivery)
        elif changed and now is not None:
            try:
                delivery, hook = for_target(now, delivery), now
            except Exception as exc:  # parts the changed target cannot take
                failure = (f"cannot be made for the hook's {now.target.kind} target: "
                           f"{type(exc).__name__}: {exc}")
        self.pending_hooks[delivery.id] = (hook, entries)
        if failure is None:
            self.outbox.append(delivery)
        else:  # re-sent by the retry worker (dead-lettered, if the hook stays deleted)
            self.unsendable.append((delivery, Outcome(ok=False, error="NotSent",
                                                      detail=failure)))


def _sharing_entries(deliveries: list[Delivery],
                     pending: dict[str, tuple[Hook, Counter[str]]]) -> list[list[Delivery]]:
    """``deliveries`` in groups of STOP_BOOKING_BYTES of payloads or so: those with
    messages of the same entry in the same group (the ack of an entry may not go before
    the booking of any of them), however large that makes it."""
    parent = list(range(len(deliveries)))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first: dict[str, int] = {}
    for n, delivery in enumerate(deliveries):
        for eid in pending[delivery.id][1]:
            parent[root(n)] = root(first.setdefault(eid, n))
    parts: dict[int, list[Delivery]] = {}
    for n, delivery in enumerate(deliveries):
        parts.setdefault(root(n), []).append(delivery)
    groups: list[list[Delivery]] = []
    size = 0
    for part in parts.values():
        part_size = sum(len(p) for d in part for p in d.parts)
        if not groups or size + part_size > STOP_BOOKING_BYTES:
            groups.append([])
            size = 0
        groups[-1] += part
        size += part_size
    return groups


def _stream_order(entry_id: str) -> tuple[int, int]:
    """A stream id as it sorts ("0" is before every entry)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _before(entry_id: str) -> str:
    """The stream id just before ``entry_id`` (reads after it start at ``entry_id``)."""
    ms, seq = map(int, entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"


@dataclass
class _Entry:
    """One intake entry read: its fields (kept to set it aside), events and part views
    (None: written as JSON by an older version)."""

    id: str
    fields: dict[bytes, bytes]
    events: list[Event]
    views: list[PartView] | None
    held: bool = False  # processing failed once: a phantom message keeps it unacked
    # the hooks its events' matches are counted for in their accepted stats
    counted: frozenset[int] | None = None
    reread: bool = False  # read again from this consumer's pending entries (a restart)


# Set an entry aside while it is pending for the group (sent again after its reply
# was lost, it is not copied twice), its copy written first: a copy Redis refuses
# leaves the entry where it is, pending (Redis does not undo a script's writes).
# KEYS: the partition's stream, the set-aside stream, the engine's stats; ARGV: the
# consumer group, the entry's id, then the field/value items of its set-aside copy
_SET_ASIDE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.pcall('HINCRBY', KEYS[3], 'entries_unreadable', 1)  -- a damaged count: not made
return 1
"""
# an entry of more fields than this (no intake wrote it) is set aside with its fields
# as one msgpack map in ``_fields``: a script takes a few thousand arguments at most
SET_ASIDE_MAX_FIELDS = 1_000


class ProcessEnded(RuntimeError):
    """Why an entry was set aside: the process ended each time it was processed."""


def _views(entries: list[_Entry]) -> list[PartView] | None:
    """The part views of all the entries' events, in order; None if one has none."""
    views: list[PartView] = []
    for entry in entries:
        if entry.views is None:
            return None
        views += entry.views
    return views


class PartitionWorker:
    """Reads one partition's stream and drives the Dispatcher; owns acknowledgements."""

    def __init__(self, settings: Settings, r: redis.Redis, partition: int, sender: Sender,
                 catalogue: EventCatalogue | None = None, consumer: str | None = None,
                 owner: str | None = None) -> None:
        """``owner``: the id of the engine's claim on its prefix (engine/lease.py); the
        worker waits while another engine holds it. None: no claim is looked at."""
        self.settings = settings
        self.r = r
        self.partition = partition
        self.sender = sender
        catalogue = load_catalogue(settings.EVENT_TYPES_FILE) if catalogue is None else catalogue
        self.side = Side(r, settings, catalogue)
        # waits too while the engine's recorded PARTITIONS is not this one (another
        # engine's, recorded while it held the claim)
        self.holding = Holding(r, self.side.keys, owner, settings.PARTITIONS) if owner \
            else None
        self.dispatcher = Dispatcher(self.side, catalogue, settings.MAX_HTTP_BATCH,
                                     settings.MAX_BATCH_BYTES, f"partition {partition}")
        self.stream = self.side.keys.intake(partition)
        self.consumer = consumer or f"partition-{partition}"
        self.entry_left: Counter[str] = Counter()  # entry id -> messages not yet settled
        self.unsettled = 0  # the sum of entry_left
        self.reading_own_pending = True  # after a restart, re-read unacknowledged entries
        # entries read again after a restart, until acknowledged: their processing-start
        # counts go with their acknowledgement
        self.reread: set[str] = set()
        # entries whose processing start this process counted (or tried to): once each
        self.started: set[str] = set()
        self.pending_cursor = "0"
        self.last_read = "0"  # the id of the last entry read (see _read)
        self.orphans_checked = time.monotonic()  # see _orphans
        self.orphans_now = False  # the next _orphans looks at once (_data_lost)
        # entries of a failed round, processed again one per round before any new read;
        # each holds one phantom message in entry_left until then, so it is not
        # acknowledged while messages an earlier attempt batched settle
        self.again: deque[_Entry] = deque()
        self.failures: Counter[str] = Counter()  # entry id -> failed rounds (not Redis)
        self.settling: deque[tuple[Delivery, Outcome]] = deque()  # outcomes to book
        # deliveries handed to the sender, until their outcome is booked (a stop
        # schedules those left unanswered as re-sends of their own hooks: drain)
        self.submitted: dict[str, Delivery] = {}
        self.to_ack: list[str] = []  # settled entries to acknowledge
        self.delivered: Counter[int] = Counter()  # hook id -> delivered, to count
        self.failure_log = FailureLog(f"partition {partition}")
        self.stop_said: list[str] = []  # what the last stop left, as it said it
        # entries read from this consumer's pending ones count a process end each
        # (_processing_ends), but those read again after another engine's claim did not
        self.count_ends = True
        # an acknowledgement round sent without a reply: (token, entry ids, delivered)
        self.unsure: tuple[str, list[str], Counter[int]] | None = None
        self.last_ack = self.side.keys.last_ack(partition, self.consumer)
        # the token of the failed outcome being booked (settling[0]), kept until booked
        self.booking: str | None = None
        self.booked = self.side.keys.booked(f"partition:{partition}:{self.consumer}")
        self.processing = self.side.keys.processing(partition, self.consumer)
        self._booking = Booking(r, self.side.keys.epoch)
        self.dispatcher.count_once = self.booked
        self.dispatcher.on_lost = self._data_lost
        self.lost_round = False  # the refresh of this round found the data lost
        self._set_aside_once = r.register_script(_SET_ASIDE)

    def step(self, block_ms: int | None = None) -> int:
        """One round: refresh, read, batch, send, settle, ack. Returns entries read.
        PrefixTaken, touching nothing, while another engine holds the prefix."""
        if self.holding is not None:
            self.holding.check(lambda: self.sender.poll(0.0), self.settling.extend,
                               self._drop_work)
        with paused_gc():
            return self._step(block_ms)

    def _drop_work(self) -> None:
        """Another engine took the claim: the entries this worker read and has not
        acknowledged are its now (pending for the same consumer, it reads them again),
        and an outcome booked later, when the claim is this engine's again, would undo
        what it booked meanwhile (a delivered batch sent again, or a dead letter).
        Batches and outcomes still to come are dropped, and the entries are read again
        from this consumer's pending ones once the claim is back (at-least-once: a
        batch delivered meanwhile is sent again). Settled entries are still
        acknowledged: their work is done."""
        if self.unsettled or self.settling or self.again:
            log.warning("partition %s: another engine took this engine's REDIS_PREFIX "
                        "claim; %d message(s) in open or unanswered batches are left to it "
                        "(read again once the claim is back)", self.partition, self.unsettled)
        self._forget_held()
        self.reading_own_pending, self.pending_cursor = True, "0"
        # not a restart: entries read again now did not end the process
        self.count_ends = False

    def _forget_held(self) -> None:
        """Drop every batch (open, closed or in flight), the outcomes still to book and
        the failed rounds' entries, with what counts them."""
        self.dispatcher.drop_batches()
        self.submitted.clear()
        self.entry_left.clear()
        self.unsettled = 0
        self.again.clear()
        self.failures.clear()
        self.settling.clear()
        self.booking = None

    def _data_lost(self) -> None:
        """Redis lost the engine's data (another epoch, found by a refresh or a booking
        refused: DataLost): the batches held, open, closed or in flight, and the
        entries of failed rounds, are of events gone with it, and of hooks whose ids
        new hooks may take: dropped, not sent to those hooks (their outcomes, when they
        come, are not booked), with the outcomes and counts still to book."""
        held = self.unsettled - sum(e.held for e in self.again)  # (less their phantoms)
        self.lost_round = True
        # hooks' counts not booked yet (delivered, accepted)
        counts = len(self.delivered) + len(self.dispatcher.deferred) + \
            (len(self.unsure[2]) if self.unsure else 0) + \
            (len(self.dispatcher.unsure_count[1]) if self.dispatcher.unsure_count else 0)
        if held or self.settling or counts:
            log.warning("partition %s: Redis lost the engine's data; what the partition "
                        "held of events from before is dropped with it: %d message(s) in "
                        "batches, %d outcome(s) and %d hook count(s) not booked yet",
                        self.partition, held, len(self.settling), counts)
        # as _drop_work, but nothing is read again: the entries pending are the new
        # data's, and this round's are processed next; those read since the loss by a
        # round that failed (held for the next, dropped now with the rest) are taken
        # up at once as orphans, not 30-90 s on
        self.orphans_now = True
        self._forget_held()
        self.to_ack.clear()
        self.delivered.clear()
        self.unsure = None
        self.dispatcher.unsure_count = None
        self.dispatcher.deferred.clear()

    def _next_entries(self, block_ms: int | None) -> list[_Entry]:
        """A failed round's entries first, one at a time; else those read, unless too
        much is in flight."""
        if self.again:
            return [self.again.popleft()]
        if self.sender.inflight() >= MAX_INFLIGHT or self.unsettled >= MAX_UNSETTLED:
            return []
        try:
            return self._orphans() or self._read(block_ms)
        except Exception:
            # outcomes are still collected while reading fails (Redis down): left
            # uncollected through a long outage, a transport actor would drop them
            # and the batches would be sent again; booked by a later round
            with suppress(Exception):
                self.settling.extend(self.sender.poll(0.0))
            raise

    def _step(self, block_ms: int | None) -> int:
        entries = self._next_entries(block_ms)
        marked = [e.id for e in entries if e.reread]
        self.reread.update(marked)
        if marked:
            try:
                entries = self._processing_ends(entries, marked)
            except redis.RedisError as exc:  # tried again, as a failed round's
                self._failed(entries, exc, blame=False)
                raise
        error, refreshed = self._process(entries)
        if marked:  # the process lived through it: no end to count
            with suppress(redis.RedisError):
                self.r.hdel(self.processing, *marked)
                self.started.difference_update(marked)
        # what was batched and closed counts even when the round failed half-way
        produced = self.dispatcher.take_produced()
        for eid, n in produced.items():
            self.entry_left[eid] += n
        self.unsettled += sum(produced.values())
        # batches waiting from an earlier round go only for hooks as loaded now: with
        # the refresh failed, a deleted or changed hook's would go as it was
        ready = self.dispatcher.take_outbox() if refreshed else []
        self.settling.extend(self.dispatcher.take_unsendable())
        handed = 0
        try:
            for delivery in ready:
                hook, _ = self.dispatcher.pending_hooks[delivery.id]
                self.sender.submit(hook, delivery)
                self.submitted[delivery.id] = delivery
                handed += 1
        except Exception as exc:
            self.dispatcher.outbox[:0] = ready[handed:]  # not handed over: the next round's
            error = error or exc
        if isinstance(error, DataLost):
            # Redis lost the data in the midst of the round (said, what was held
            # dropped: _data_lost): no failure; its entries, if of the new data, are
            # pending for this consumer, and taken up as orphans (_orphans)
            with suppress(Exception):
                self._settle(self.sender.poll(0.0))
            return len(entries)
        if error is not None:
            # hooks or names that cannot be loaded (a stored hook that no longer
            # validates) are no fault of the entries: they wait, however long
            self._failed(entries, error, blame=refreshed)
            # outcomes are still collected: left uncollected through a long outage, a
            # transport actor would drop them, and send again; and booked, entries
            # settled acknowledged, if Redis takes it (at its maxmemory, it takes the
            # acknowledgements, which make room: _ack_round), else by a later round
            with suppress(Exception):
                self._settle(self.sender.poll(0.0))
            raise error
        for entry in entries:
            if entry.held:  # processed at last: its phantom message goes
                self._count_settled(entry.id, 1)
            elif not self.entry_left.get(entry.id):
                self.to_ack.append(entry.id)  # nothing to send for it
            self.failures.pop(entry.id, None)
        self._settle(self.sender.poll(0.0 if entries or ready else 0.01))
        self.failure_log.say()
        return len(entries)

    def _processing_ends(self, entries: list[_Entry], marked: list[str]) -> list[_Entry]:
        """Count the start of processing of entries read again after a restart (an
        end of the process before it finishes leaves the count); those whose
        processing ended the process MAX_PROCESS_ENDS times are set aside instead.
        The count of an entry read again is the ends so far: its first read (not
        counted: entries are not marked before a restart) ended once, and each start
        counted before this one ended again."""
        try:
            begun = self._count_starts(marked)
        except redis.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            # Redis at its maxmemory: processed uncounted (this guard against an entry
            # that ends the process is lost while Redis is full), rather than stalling
            # a restarted partition, which must deliver and acknowledge to make room
            self.dispatcher.say_deferred()
            return entries
        kept = []
        for entry in entries:
            if begun.get(entry.id, 0) < MAX_PROCESS_ENDS:  # (counted before: 0, kept)
                kept.append(entry)
                continue
            self._set_aside(entry.id, entry.fields, ProcessEnded(
                f"the partition's process ended {MAX_PROCESS_ENDS} times while processing "
                "it, read again after each restart (out of memory, or a crash in native "
                "code?)"))
            self.r.hdel(self.processing, entry.id)
            self.reread.discard(entry.id)
            self.started.discard(entry.id)
            if entry.held:
                self._count_settled(entry.id, 1, ack=False)
        return kept

    def _count_starts(self, marked: list[str]) -> dict[str, int]:
        """Add a processing start to each of ``marked``; its count after. A count
        damaged from outside (not an integer, or the hash of another type) starts
        again at 1, with a warning: failing each round, it held the partition's
        entries for good."""
        # one start per process: a round tried again (its count's reply lost, Redis
        # timing out) counted each try, and an entry no process ended was set aside
        marked = [eid for eid in marked if eid not in self.started]
        if len(self.started) > MAX_UNSETTLED * 4:  # (entries settled leave it anyway)
            self.started.clear()
        self.started.update(marked)
        with self.r.pipeline(transaction=False) as pipe:
            for eid in marked:
                pipe.hincrby(self.processing, eid, 1)
            replies = pipe.execute(raise_on_error=False) if marked else []
        begun: dict[str, int] = {}
        replaced = False
        for eid, reply in zip(marked, replies, strict=True):
            if not isinstance(reply, redis.ResponseError):
                begun[eid] = int(reply)
                continue
            text = str(reply)
            if "WRONGTYPE" in text:
                if not replaced:
                    log.warning("partition %s: %s holds no hash of processing starts "
                                "(damaged from outside?); replaced, the counts start again",
                                self.partition, self.processing)
                    self.r.delete(self.processing)
                    replaced = True
            elif not ("not an integer" in text or "overflow" in text):
                raise reply  # Redis at its maxmemory, an ACL...: the caller's to judge
            else:
                log.warning("partition %s: %s field %s holds no count (damaged from "
                            "outside?); it starts again at 1", self.partition,
                            self.processing, eid)
            self.r.hset(self.processing, eid, 1)
            begun[eid] = 1
        return begun

    def _process(self, entries: list[_Entry]) -> tuple[Exception | None, bool]:
        """Refresh, then batch ``entries`` and close due batches: the error that stopped
        it (booked by the caller, then raised), and whether the refresh succeeded."""
        self.dispatcher.counted = None
        refreshed = False
        self.lost_round = False
        try:
            # refresh after reading: a hook change committed before an event was
            # appended is always seen by the round that processes the event
            now = time.monotonic()
            self.dispatcher.refresh(now)
            refreshed = True
            if self.lost_round:
                # a failed round's entry taken up again is of the data Redis lost (its
                # phantom message went with _data_lost's counts): not processed, nor
                # counted or acknowledged by the caller, which goes on with this list
                entries[:] = [e for e in entries if not e.held]
            before = [e.counted for e in entries if e.counted is not None]
            # (a failed round's entries come again one at a time)
            self.dispatcher.process([(e.id, e.events) for e in entries], now, _views(entries),
                                    counted=frozenset().union(*before) if before else None)
            self.dispatcher.due(time.monotonic())
        except Exception as exc:
            return exc, refreshed
        finally:
            if self.dispatcher.counted is not None:  # not counted again for those hooks
                for entry in entries:
                    entry.counted = self.dispatcher.counted
        return None, refreshed

    def _failed(self, entries: list[_Entry], error: Exception, blame: bool = True) -> None:
        """A round failed: its entries are processed again, one per round (messages
        batched before the failure are sent, and sent again then: at-least-once).
        An entry whose rounds failed MAX_ENTRY_FAILURES times while processing it
        (``blame``), not because Redis was unavailable (``redis_unavailable``) or refused
        the engine's user (``acl_refusal``), is set aside like an unreadable one."""
        alone = len(entries) == 1
        for entry in entries:
            if blame and not redis_unavailable(error) and not acl_refusal(error):
                self.failures[entry.id] += 1
            if alone and self.failures[entry.id] >= MAX_ENTRY_FAILURES:
                try:
                    self._set_aside(entry.id, entry.fields, error)
                except redis.RedisError:
                    pass  # Redis is down now: the entry stays for another round
                else:
                    self.failures.pop(entry.id)
                    if entry.held:
                        self._count_settled(entry.id, 1, ack=False)
                    continue
            if not entry.held:
                entry.held = True
                self.entry_left[entry.id] += 1
                self.unsettled += 1
            self.again.append(entry)

    def _read(self, block_ms: int | None) -> list[_Entry]:
        """Entries read and decoded (undecodable ones are set aside)."""
        if block_ms is None:
            busy = self.sender.inflight() or self.dispatcher.open_messages()
            block_ms = 20 if busy else 100
        start = self.pending_cursor if self.reading_own_pending else ">"
        try:
            reply: Any = self.r.xreadgroup(CONSUMER_GROUP, self.consumer, {self.stream: start},
                                           # read again after a restart: one at a
                                           # time, so one that ends the process is
                                           # known (_processing_ends)
                                           count=1 if self.reading_own_pending
                                           else self.settings.READ_MAX_ENTRIES,
                                           block=None if self.reading_own_pending else block_ms)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            self._recreate_group(exc)
            return []
        except Exception:
            if start == ">":
                # Redis may have handed entries over (now pending for this consumer)
                # with the reply lost on the way: read this consumer's pending entries
                # after the last one this worker saw, or they would wait for a restart
                self.reading_own_pending = True
                self.pending_cursor = self.last_read
            raise
        items = reply[0][1] if reply else []
        if items:
            self.last_read = items[-1][0].decode()
        try:
            return self._decoded(items)
        except Exception:
            # read (pending for this consumer) but not handed to the round: read them
            # again from this consumer's pending entries, or a restart would be needed
            if items:
                self.reading_own_pending = True
                self.pending_cursor = start if start != ">" else _before(items[0][0].decode())
            raise

    def _orphans(self) -> list[_Entry]:
        """Every ORPHAN_CHECK_SEC: entries pending for this consumer for ORPHAN_IDLE_MS
        that this worker does not hold, taken up as if just read. A read Redis carried
        out after the worker gave up on it (its reply lost, or the command late on a
        connection already dropped while the worker read on) hands entries over that
        no later read returns: without this they would wait for the actor's restart."""
        if self.reading_own_pending or (
                not self.orphans_now and
                time.monotonic() - self.orphans_checked < ORPHAN_CHECK_SEC):
            return []
        idle = 0 if self.orphans_now else ORPHAN_IDLE_MS  # (after a loss: none is read)
        self.orphans_now = False
        held = set(self.entry_left) | set(self.to_ack) | {e.id for e in self.again}
        if self.unsure is not None:
            held.update(self.unsure[1])
        orphans: list[str] = []
        start = "-"
        while len(orphans) < ORPHAN_PAGE:
            try:
                page = cast(list[dict[str, Any]], self.r.xpending_range(
                    self.stream, CONSUMER_GROUP, min=start, max="+", count=ORPHAN_PAGE,
                    consumername=self.consumer, idle=idle))
            except redis.ResponseError as exc:
                # the group is gone (Redis came back without its data, the stream was
                # deleted): made again as a read makes it, or this check would fail
                # each round before any read could
                if not str(exc).startswith("NOGROUP"):
                    raise
                self.orphans_checked = time.monotonic()
                self._recreate_group(exc)
                return []
            ids = [p["message_id"].decode() for p in page]
            orphans += [eid for eid in ids if eid not in held]
            if len(ids) < ORPHAN_PAGE:
                break
            start = "(" + ids[-1]
        self.orphans_checked = time.monotonic()
        if not orphans:
            return []
        log.warning("partition %s: %d intake entries pending for this partition were not "
                    "being processed (a read whose reply was lost); processing them now",
                    self.partition, len(orphans))
        # claimed by this consumer again: returns their fields (deleted ones are dropped
        # from the pending list by Redis), and resets their idle time
        items = cast(list[tuple[bytes, dict[bytes, bytes]]], self.r.xclaim(
            self.stream, CONSUMER_GROUP, self.consumer, 0,
            list[Any](orphans[:ORPHAN_PAGE])))
        if items:
            # taken up as if just read: a read of this consumer's pending entries after
            # a later lost reply starts after them, not at entries this worker holds
            newest = max((eid.decode() for eid, _ in items), key=_stream_order)
            if _stream_order(newest) > _stream_order(self.last_read):
                self.last_read = newest
        return self._decoded(items)

    def _recreate_group(self, exc: Exception) -> None:
        """The stream or its consumer group is gone (Redis restarted without the data,
        or the key was deleted or evicted) while the intake may append again (XADD
        makes the stream): the group is made again, reading from the stream's start,
        so events accepted since are read. Entries of this worker still in flight
        belonged to the old group: their acknowledgements change nothing."""
        log.warning("partition %s: the intake stream's consumer group is missing (%s); "
                    "creating it again", self.partition, exc)
        try:
            self.r.xgroup_create(self.stream, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as busy:
            if "BUSYGROUP" not in str(busy):
                raise
        self.reading_own_pending = False
        self.last_read = "0"

    def _decoded(self, items: list[tuple[bytes, dict[bytes, bytes]]]) -> list[_Entry]:
        if self.reading_own_pending:
            # entries this consumer read before a restart and never acknowledged
            self._ack([eid.decode() for eid, fields in items if not fields])  # deleted ones
        entries = []
        for eid, fields in items:
            if not fields:
                continue
            try:
                events, views = decode_entry(fields), decode_views(fields)
            except Exception as exc:  # not written by the intake: would fail every round
                self._set_aside(eid.decode(), fields, exc)
                continue
            entries.append(_Entry(eid.decode(), fields, events, views,
                                  reread=self.reading_own_pending and self.count_ends))
        if self.reading_own_pending:
            if items:
                self.pending_cursor = items[-1][0].decode()
            else:
                self.reading_own_pending, self.count_ends = False, True
        return entries

    def _set_aside(self, entry_id: str, fields: dict[bytes, bytes], exc: Exception) -> None:
        """An entry that cannot be decoded (not written by hookray's intake, or damaged),
        or whose processing failed MAX_ENTRY_FAILURES times, is copied, with
        ``_partition``, ``_entry`` and ``_error`` fields, to the ``intake_unreadable``
        stream and acknowledged, instead of failing every round after it; counted as
        ``entries_unreadable`` in the engine's stats. Once: an entry no longer pending
        (set aside by a call whose reply was lost) is left as it is."""
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        # the entry's own fields, then why
        record: dict[Any, Any] = dict(fields) if len(fields) <= SET_ASIDE_MAX_FIELDS \
            else {b"_fields": msgspec.msgpack.encode(fields)}
        record.update({b"_partition": str(self.partition), b"_entry": entry_id,
                       b"_error": reason})
        self._set_aside_once(keys=[self.stream, self.side.keys.intake_unreadable,
                                   self.side.keys.engine_stats],
                             args=[CONSUMER_GROUP, entry_id,
                                   *(x for kv in record.items() for x in kv)])
        # said once done (a refused script sets nothing aside)
        log.warning("partition %s: intake entry %s cannot be processed, set aside: %s",
                    self.partition, entry_id, reason)

    def _settle(self, outcomes: list[tuple[Delivery, Outcome]]) -> None:
        """Book outcomes: delivered ones counted, failed ones written to the retry
        schedule (before any entry of theirs is acknowledged). An outcome leaves
        ``settling`` only once booked, and entries wait in ``to_ack`` until the ack
        went through: a Redis error half-way loses no outcome and no ack. Each is
        booked into the data of the epoch its batch was built under: one refused
        (DataLost, Redis lost the data since) is dropped with it (``_data_lost``)."""
        self.settling.extend(outcomes)
        while self.settling:
            delivery, outcome = self.settling[0]
            if delivery.id not in self.dispatcher.pending_hooks:
                # a batch from before another engine took the claim (_drop_work), or
                # one a stop scheduled unanswered (drain), answered late
                self.settling.popleft()
                continue
            if outcome.ok:
                self.delivered[delivery.hook_id] += delivery.count
            else:
                # only the messages that failed are kept (the others were delivered)
                rest, done = undelivered(delivery, outcome)
                # a copy (``rest`` may be ``delivery`` itself): a booking tried again
                # after a Redis error starts from the delivery as it was
                rest = msgspec.structs.replace(rest, last_attempt_ms=now_ms(),
                                               restarts=restarts_after(delivery, outcome))
                # by Redis' clock, which the claim goes by (this machine's may differ)
                due = retry_due_ms(self.side.retry.clock.now_ms(),
                                   self.settings.HOOK_RETRY_PERIOD_SEC)
                # a destination's answer may echo the hook's secrets: never kept
                hook, _ = self.dispatcher.pending_hooks[delivery.id]
                error = scrub(outcome.describe(), hook_secrets(hook))
                # a booking sent again after its reply was lost counts once
                self.booking = self.booking or uuid.uuid4().hex
                once = (self.booked, self.booking)
                dead = self.settings.HOOK_RETRY_TIMES == 0 and \
                    not uncharged(delivery, outcome)
                try:
                    if dead:
                        self.side.retry.kill(rest, error, once=once,
                                             epoch=self.dispatcher.epoch)
                    else:
                        self.side.retry.schedule(rest, due, error, once=once,
                                                 epoch=self.dispatcher.epoch)
                except DataLost:  # (a round or a stop whose refresh failed after it)
                    self._data_lost()
                    return
                self.failure_log.failed(delivery.hook_id, delivery.account_id,
                                        delivery.kind, rest.count, error, dead)
                if done:
                    self.delivered[delivery.hook_id] += done
            self.settling.popleft()
            self.booking = None
            _, entries = self.dispatcher.pending_hooks.pop(delivery.id)
            self.submitted.pop(delivery.id, None)
            for eid, n in entries.items():
                self._count_settled(eid, n)
        self._ack([])

    def _count_settled(self, eid: str, n: int, ack: bool = True) -> None:
        self.entry_left[eid] -= n
        self.unsettled -= n
        if self.entry_left[eid] <= 0:
            del self.entry_left[eid]
            if ack:
                self.to_ack.append(eid)

    def _ack(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete ``entry_ids`` and the settled entries, and count
        deliveries: one script, once (``Booking``). A round whose reply did
        not come (Redis down, the connection lost) may have been carried out or not:
        it is sent again, with its token, before anything new, and counts once."""
        self.to_ack += entry_ids
        if self.unsure is not None:
            self._ack_unsure()
        if not self.to_ack and not self.delivered:
            return
        self.unsure = (uuid.uuid4().hex, self.to_ack, self.delivered)
        self.to_ack, self.delivered = [], Counter()
        self._ack_unsure()

    def _ack_unsure(self) -> None:
        """Send the round in ``unsure``. One Redis at its maxmemory refused (one whose
        first write is a count: no entry to delete first) was not carried out: its
        counts wait with the others (made by a later round, once there is room), and
        its entries, if any, go now alone, their deletions making room."""
        assert self.unsure is not None
        try:
            self._ack_round(*self.unsure)
        except redis.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            _, entry_ids, delivered = self.unsure
            self.unsure = None
            self.delivered.update(delivered)
            self.dispatcher.say_deferred()
            if entry_ids:
                self.unsure = (uuid.uuid4().hex, entry_ids, Counter())
                self._ack_round(*self.unsure)
        self.unsure = None

    def _ack_round(self, token: str, entry_ids: list[str], delivered: Counter[int]) -> None:
        try:
            self._ack_booking(token, entry_ids, delivered)
        except DataLost:  # the entries and deliveries were of the data Redis lost since
            self._data_lost()
            return
        self.reread.difference_update(entry_ids)
        self.started.difference_update(entry_ids)

    def _ack_booking(self, token: str, entry_ids: list[str], delivered: Counter[int]
                     ) -> None:
        with self._booking((self.last_ack, token), self.dispatcher.epoch) as pipe:
            # the deletions first: Redis at its maxmemory refuses a script whose first
            # write may grow memory (the counts), and carries out the rest of one whose
            # first write frees some: entries delivered are still acknowledged and
            # deleted then, so the engine makes room rather than stalling for good
            if entry_ids:
                pipe.xack(self.stream, CONSUMER_GROUP, *entry_ids)
                pipe.xdel(self.stream, *entry_ids)
                # the count of processing starts of an entry read again after a restart,
                # should the round's own HDEL have failed (_step): gone with the entry
                reread = [eid for eid in entry_ids if eid in self.reread]
                if reread:
                    pipe.hdel(self.processing, *reread)
            for hook_id, n in delivered.items():
                self.side.stats.add(pipe, hook_id, "delivered", n)

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None
            ) -> None:
        """Loop until ``stop`` is set; a failing round is reported and retried (a
        hook that no longer validates: once, not every round). While it loops, its
        heartbeat says it runs (``engine.health``)."""
        alive = Heartbeat(self.r, self.side.keys, f"partition:{self.partition}")
        try:
            self._loop(stop, on_error, alive)
            self._stopping()
        finally:  # stopped: no longer running, at once
            with suppress(redis.RedisError):
                self.r.delete(alive.key)

    def drain(self, seconds: float | None = None) -> int:
        """Stopping: nothing more is read; the open batches go now, closed for their
        hooks as stored now (as a round closes them: a deleted hook's are not sent),
        and the outcomes of the batches in flight are booked and their entries
        acknowledged as they come, for ``seconds`` at most; the batches still without an
        outcome then are scheduled as re-sends of their own hooks where that settles
        their entries (``_schedule_unanswered``). Returns the messages left without an
        outcome: their entries are read again, and sent again, by the next start (as
        after any end). Entries of failed rounds (``again``) are left to it too, not
        counted here."""
        deadline = time.monotonic() + (DRAIN_SEC if seconds is None else seconds)
        self.stop_said = []
        if not self._holds_work():
            return 0
        try:
            self.dispatcher.refresh(time.monotonic())
            fresh = True
        except Exception as exc:  # a stored hook no longer validates, Redis down...
            # the open batches stay unsent (their entries are read again by the next
            # start, for the hooks as they are then); those in flight are still booked
            self.stop_said.append(
                f"partition {self.partition}: stopping, its open batches are not sent: "
                f"the hooks could not be loaded ({type(exc).__name__}: {str(exc)[:300]})")
            log.warning("%s", self.stop_said[-1])
            fresh = False
        while True:
            if self.holding is not None:  # PrefixTaken: nothing of it is this engine's
                self.holding.check(lambda: self.sender.poll(0.0), self.settling.extend,
                                   self._drop_work)
            if fresh:
                self.dispatcher.due(float("inf"))  # every open batch closes
            produced = self.dispatcher.take_produced()
            for eid, n in produced.items():
                self.entry_left[eid] += n
            self.unsettled += sum(produced.values())
            self.settling.extend(self.dispatcher.take_unsendable())
            # (with the hooks not loaded, the batches waiting are left as the open ones)
            ready = self.dispatcher.take_outbox() if fresh else []
            for handed, delivery in enumerate(ready):
                try:
                    self.sender.submit(self.dispatcher.pending_hooks[delivery.id][0],
                                       delivery)
                    self.submitted[delivery.id] = delivery
                except Exception:
                    self.dispatcher.outbox[:0] = ready[handed:]
                    raise
            left = deadline - time.monotonic()
            self._settle(self.sender.poll(min(max(left, 0.0), 0.05)))
            if left <= 0 or not (self.sender.inflight() or self.settling):
                break  # all settled, or none to come
        self._schedule_unanswered()
        self.failure_log.say()  # the failures booked meanwhile, as a round says them
        open_ = self.dispatcher.open_messages()  # (refresh failed: not sent)
        return max(self.unsettled - open_ - sum(e.held for e in self.again), 0)

    def _schedule_unanswered(self) -> None:
        """The batches in flight without an outcome at the drain's end are scheduled as
        re-sends of their own hooks, due at once and using up no re-send (``Stopped``),
        and their entries acknowledged: left pending instead, each entry would be read
        again and every hook's messages of it sent again, the hooks that had their
        answer too. A destination that took such a batch late gets it twice. Only
        batches all of whose entries are then settled: an entry that stays pending
        anyway (messages of it in open batches left unsent, or a failed round's entry)
        is read again by the next start and all of its messages sent then, so a re-send
        of some of them would go twice. Not while another engine may hold the claim
        (its bookings are not to be undone)."""
        if self.holding is not None:
            self.holding.check(lambda: self.sender.poll(0.0), self.settling.extend,
                               self._drop_work)
        self._settle([])  # outcomes still to book first: their entries settle with them
        unanswered = self._settled_by_stop()
        if not unanswered or not self._book_stopped(unanswered):
            return
        self.stop_said.append(
            f"partition {self.partition}: stopped with {sum(d.count for d in unanswered)} "
            f"message(s) in {len(unanswered)} batch(es) whose outcome did not come within "
            f"{DRAIN_SEC:g} s; scheduled as re-sends of their own hooks, due at once (a "
            "destination that took one meanwhile gets it twice)")
        log.warning("%s", self.stop_said[-1])

    def _book_stopped(self, unanswered: list[Delivery]) -> bool:
        """Schedule ``unanswered`` as re-sends due at once (``Stopped``, using up no
        re-send) and acknowledge the entries they settle, in bookings of both or
        neither: booked one by one and then acknowledged, an acknowledgement Redis
        refused left the entries pending, and the next start sent all of their messages
        again beside the re-sends. The batches sharing an entry are booked together,
        those of different entries in bookings of STOP_BOOKING_BYTES or so (one script
        copying hundreds of megabytes would hold Redis up for seconds). False: refused,
        the batches of data Redis lost since (DataLost), dropped with it."""
        booked = 0
        for group in _sharing_entries(unanswered, self.dispatcher.pending_hooks):
            try:
                self._book_stopped_group(group)
            except DataLost:  # (a stop whose refresh failed after the loss)
                self._data_lost()
                return False
            except Exception:
                if booked:  # the drain's error says the rest
                    self.stop_said.append(
                        f"partition {self.partition}: {booked} of {len(unanswered)} "
                        "unanswered batch(es) were scheduled as re-sends of their own "
                        "hooks, their entries acknowledged, before Redis refused the rest")
                    log.warning("%s", self.stop_said[-1])
                raise
            booked += len(group)
        return True

    def _book_stopped_group(self, unanswered: list[Delivery]) -> None:
        stopped = Outcome(ok=False, error="Stopped", detail=(
            f"no outcome within the stop's drain ({DRAIN_SEC:g} s); sent again by the next "
            "start"))
        items = []
        entries: Counter[str] = Counter()
        for delivery in unanswered:
            hook, held = self.dispatcher.pending_hooks[delivery.id]
            rest = msgspec.structs.replace(delivery, last_attempt_ms=now_ms(), restarts=0)
            items.append((rest, self.side.retry.clock.now_ms(),
                          scrub(stopped.describe(), hook_secrets(hook))))
            entries.update(held)
        eids = list(entries)
        reread = [eid for eid in eids if eid in self.reread]

        def acknowledge(pipe: Any) -> None:
            pipe.xack(self.stream, CONSUMER_GROUP, *eids)
            pipe.xdel(self.stream, *eids)
            if reread:  # as _ack_round
                pipe.hdel(self.processing, *reread)

        self.side.retry.schedule_settling(items, (self.booked, uuid.uuid4().hex),
                                          acknowledge, self.dispatcher.epoch)
        for delivery in unanswered:
            _, held = self.dispatcher.pending_hooks.pop(delivery.id)
            self.submitted.pop(delivery.id, None)
            for eid, n in held.items():
                self._count_settled(eid, n, ack=False)
        self.reread.difference_update(eids)
        self.started.difference_update(eids)

    def _settled_by_stop(self) -> list[Delivery]:
        """The unanswered batches whose entries are all settled once these batches are:
        every message of each such entry is in one of them."""
        booked = {delivery.id for delivery, _ in self.settling}
        chosen = {i: d for i, d in self.submitted.items()
                  if i not in booked and i in self.dispatcher.pending_hooks}
        while chosen:
            covered: Counter[str] = Counter()
            for i in chosen:
                covered.update(self.dispatcher.pending_hooks[i][1])
            short = {eid for eid, n in covered.items() if n < self.entry_left.get(eid, 0)}
            if not short:
                break
            chosen = {i: d for i, d in chosen.items()
                      if not short.intersection(self.dispatcher.pending_hooks[i][1])}
        return list(chosen.values())

    def _holds_work(self) -> bool:
        """Whether anything is open, in flight or to be booked: a partition holding
        nothing (waiting behind another engine's claim, or idle) stops at once."""
        return bool(self.unsettled or self.dispatcher.open_messages() or self.settling
                    or self.to_ack or self.unsure is not None or self.delivered
                    or self.dispatcher.outbox)

    def _stopping(self) -> None:
        """Drain (``drain``), saying what is left to the next start."""
        said = drain_at_stop(
            self.drain, f"partition {self.partition}", "batches", "message(s) in batches",
            "their entries are read again by the next start, and every hook's messages of "
            "them sent again")
        self.stop_said += [said] if said else []
        if self.again:
            self.stop_said.append(f"partition {self.partition}: stopped with "
                                  f"{len(self.again)} entr(ies) of failed rounds; read and "
                                  "processed again by the next start")
            log.warning("%s", self.stop_said[-1])

    def _loop(self, stop: threading.Event, on_error: Callable[[Exception], None] | None,
              alive: Heartbeat) -> None:
        failures = RoundFailures(f"partition {self.partition}", "no event is processed")
        while not stop.is_set():
            try:
                self.step()
                failures.passed()
            except Exception as exc:  # Redis down, or a bug: reported, and the loop lives on
                failures.failed(exc)
                if on_error:
                    on_error(exc)
                time.sleep(0.5)
            with suppress(redis.RedisError):
                alive.beat(failures.waiting)
