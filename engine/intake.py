"""Durable intake: validated events appended to the Redis Stream of their partition.

One stream entry holds a batch of events (field ``e``: a msgpack array, which
msgspec writes and reads back faster than JSON), never one event; all entries of
one publish call go out in one pipelined round trip. An event is *accepted* once
that round trip returned.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from itertools import repeat
from operator import attrgetter
from typing import Any, TypeVar, cast

import msgspec
import numpy as np
import redis

from engine.assembly import gather
from engine.bodies import decode_body
from engine.catalogue import EventCatalogue, engine_codes, load_catalogue
from engine.collector import paused_gc
from engine.errors import Backlogged, ConfigError, EventError, quoted
from engine.events import (
    MAX_ID,
    NESTED_TOO_DEEPLY,
    DecodedBatch,
    Event,
    EventIssue,
    decode_batch,
    ensure_ids,
    validation_issue,
)
from engine.keys import CONSUMER_GROUP, INTAKE_FIELD, Keys, damaged_count, recorded_partitions
from engine.messages import PartView
from engine.partitioning import partition_of, positions_by_code


class StoredEvent(Event, gc=False):
    """An event read back from the intake: validated (and its dimensions filled) before
    it was appended, so decoding skips the checks."""

    def __post_init__(self) -> None:
        pass


log = logging.getLogger("hookray")
WRITE_TRIES = 10  # publish attempts while the engine's recorded PARTITIONS changes
RECEIPT_SEC = 600  # how long the receipt of an append is kept at most (see Intake._write)
SPENT_PER_WRITE = 256  # receipts of finished appends deleted by one later append
BACKLOG_CHECK_SEC = 1.0  # how long the streams' lengths read for INTAKE_MAX_ENTRIES serve

_entry_decoder = msgspec.msgpack.Decoder(list[StoredEvent])
_one_decoder = msgspec.msgpack.Decoder(StoredEvent)
_entry_encoder = msgspec.msgpack.Encoder()
_ACCOUNT = attrgetter("account_id")
_DATABASE = attrgetter("account_id", "list_id")
_ID = attrgetter("id")


# Python frames the intake encodes events below (see _deeper)
RECURSION_RESERVE = 100
# what encoding a batch raises when one of its events cannot be written
_UNENCODABLE = (TypeError, OverflowError, UnicodeEncodeError, RecursionError)
_json_encode = msgspec.json.encode
T = TypeVar("T")
R = TypeVar("R")


def _deeper(fn: Callable[[T], R], arg: T, frames: int = RECURSION_RESERVE) -> R:
    """``fn(arg)``, called ``frames`` Python frames deeper than here.

    msgspec gives up (RecursionError) on data nested deeper than the interpreter's
    recursion limit allows from where it runs. The intake encodes under this reserve,
    so that what it accepts is read back, and its messages encoded, by a partition
    whose stack is deeper than the intake's was, not set aside there as unreadable
    (a partition reads in a thread of its own: a few dozen frames at most). Costs
    5-20 µs a call, once per publish."""
    return _deeper(fn, arg, frames - 1) if frames else fn(arg)


def _read_back(events: list[Event]) -> object:
    # and as JSON: msgpack takes a nested key of None, a bool or a tuple, which no
    # message can hold (the partition would fail on its entry, round after round)
    _json_check(events)
    return _entry_decoder.decode(_entry_encoder.encode(events))


# JSON with sorted keys: refuses (TypeError) an object with a key that is no string
_json_str_keys = msgspec.json.Encoder(order="deterministic").encode
_json_decode = msgspec.json.decode


def _json_check(value: Any) -> None:
    """Encode ``value`` as JSON, as messages carry it: TypeError (or the like) for what
    no JSON holds, and for an object two of whose keys are written as the same text
    (1 and "1", given in Python: msgpack keeps both, and each message would then
    carry the key twice). Sorting the keys finds keys that are no string (measured
    here: 30 ns more per event with a 3-id event_data, 0.7 µs with every field and a
    20-key one); only then is the text read back (a duplicate key makes it shorter:
    1.5 µs an event) and, if it is, the value walked."""
    try:
        _json_str_keys(value)
    except TypeError:  # a key that is no string, or a value JSON cannot hold
        text = _json_encode(value)  # raises for the latter
        if len(_json_encode(_json_decode(text))) != len(text) and duplicate_key(value):
            raise TypeError("two keys of an object are written as the same text") from None


def duplicate_key(value: Any) -> tuple[str, str] | None:
    """(path, reason) of the first object inside ``value`` (an event) two of whose keys
    JSON writes as the same text, or None; walked without recursion, and only when
    one of its keys is no string."""
    try:
        _json_str_keys(value)
        return None
    except TypeError:
        pass
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, msgspec.Struct):
            fields = zip(item.__struct_fields__, item.__struct_encode_fields__, strict=True)
            stack += reversed([(getattr(item, attr), f"{path}.{name}" if path else name)
                               for attr, name in fields])
        elif isinstance(item, dict):
            if not all(type(key) is str for key in item):  # strings cannot collide
                seen: dict[str, Any] = {}
                for key in item:
                    text = key if type(key) is str else \
                        next(iter(_json_decode(_json_encode({key: None}))))
                    if text in seen:
                        return path or "$", (f"duplicate key: {quoted(seen[text])} and "
                                             f"{quoted(key)} are both written as "
                                             f"{quoted(text)} in JSON")
                    seen[text] = key
            stack += reversed([(sub, f"{path}.{key}" if path else str(key))
                               for key, sub in item.items()])
        elif isinstance(item, list | tuple):
            stack += reversed([(sub, f"{path}[{n}]") for n, sub in enumerate(item)])
    return None


def encoding_issue(index: int, event: Event) -> EventIssue | None:
    """Why ``event`` cannot be written to an intake entry (an integer beyond 64 bits, a
    value of no JSON type, nesting too deep for a partition to read back), or None."""
    try:
        _deeper(_entry_encoder.encode, [event])  # in a list, as in an entry
    except RecursionError:
        return EventIssue(index, _too_deep(event), NESTED_TOO_DEEPLY)
    except (TypeError, OverflowError, UnicodeEncodeError) as exc:
        return _unencodable_issue(index, event, _entry_encoder.encode, exc)
    return None


def _unencodable_issue(index: int, value: Any, encode: Callable[[Any], bytes],
                       exc: Exception) -> EventIssue:
    """The issue of an event ``encode`` failed on with ``exc``, naming the field."""
    try:
        where = _unencodable(value, "", encode)
    except RecursionError:  # deep, as well
        where = "$"
    if isinstance(exc, UnicodeEncodeError):  # a lone surrogate: no message could carry it
        return EventIssue(index, where, "not valid UTF-8: a lone surrogate "
                                        f"{exc.object[exc.start:exc.start + 1]!r}")
    return EventIssue(index, where, f"cannot be encoded: {exc}")


def encoding_issues(events: Sequence[Event], indices: Sequence[int] | None = None
                    ) -> list[EventIssue]:
    """``encoding_issue`` of each event, at its index in ``indices`` (default: its
    position). One event at a time: for when encoding the batch failed."""
    found = (encoding_issue(i if indices is None else indices[i], e)
             for i, e in enumerate(events))
    return [issue for issue in found if issue is not None]


def read_back_issues(events: list[Event]) -> list[EventIssue]:
    """Issues of events built in Python, whose field types and id ranges msgspec does
    not check (it checks while decoding): each event must read back from the msgpack
    the intake writes, as a partition reads it, or its whole entry could not be read.
    One encode and decode of the batch (0.7 µs per plain event, 1.2 with profile and
    event_data dicts, measured here) and a JSON encode (0.3 µs); event by event only
    when that fails.
    ``account_id``, a plain int there, is range-checked here."""
    issues: list[EventIssue] = []
    try:
        _deeper(_read_back, events)
    except (msgspec.ValidationError, msgspec.DecodeError, *_UNENCODABLE):
        for i, event in enumerate(events):
            issue = encoding_issue(i, event)
            if issue is None:
                try:
                    _deeper(_json_encode, event)
                    _one_decoder.decode(_entry_encoder.encode(event))
                except _UNENCODABLE as exc:
                    issue = _unencodable_issue(i, event, _json_encode, exc)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    issue = validation_issue(i, exc)
                else:
                    if (where := duplicate_key(event)) is not None:
                        issue = EventIssue(i, *where)
            if issue is not None:
                issues.append(issue)
    accounts = list(map(_ACCOUNT, events))
    if issues or (accounts and not 0 <= min(accounts) <= max(accounts) <= MAX_ID):
        bad = {issue.index for issue in issues}
        issues += [EventIssue(i, "account_id", f"expected an id from 0 to {MAX_ID}")
                   for i, a in enumerate(accounts) if i not in bad
                   and isinstance(a, int) and not 0 <= a <= MAX_ID]
    return sorted(issues, key=attrgetter("index"))


def _unencodable(value: Any, path: str,
                 encode: Callable[[Any], bytes] = _entry_encoder.encode) -> str:
    """The path (as in a validation error) of the first value inside ``value`` that
    ``encode`` (msgpack's) cannot encode; ``$`` for ``value`` itself."""
    items: Iterator[tuple[str, Any]] = iter(())
    if isinstance(value, msgspec.Struct):
        items = ((f"{path}.{name}" if path else name, getattr(value, attr)) for attr, name
                 in zip(value.__struct_fields__, value.__struct_encode_fields__, strict=True))
    elif isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), v) for key, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{n}]", v) for n, v in enumerate(value))
    for inner, v in items:
        try:
            encode(v)
        except (TypeError, OverflowError, UnicodeEncodeError):
            return _unencodable(v, inner, encode)
    if isinstance(value, dict):  # a key: not a string (msgspec.json), or not UTF-8
        for key in value:
            try:
                encode({key: None})
            except (TypeError, OverflowError, UnicodeEncodeError):
                return f"{path}.{key}" if path else str(key)
    return path or "$"


def _too_deep(event: Event) -> str:
    """The field of ``event`` nested too deeply to be encoded under the reserve."""
    for attr, name in zip(event.__struct_fields__, event.__struct_encode_fields__, strict=True):
        try:
            _deeper(_entry_encoder.encode, [[getattr(event, attr)]])
        except RecursionError:
            return name
        except (TypeError, OverflowError):
            pass
    return "$"


@dataclass(slots=True)
class Encoded:
    """Events ready to append: the stream entries they make, each encoded once, and the
    issues of the events left out because they could not be (see ``Intake.encode``)."""

    events: list[Event]
    entries: list[tuple[int, bytes]]
    issues: list[EventIssue]


@dataclass
class PublishResult:
    accepted: int
    issues: list[EventIssue] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # ids of the accepted events


def encode_entry(events: list[Event]) -> bytes:
    """The ``e`` field of a stream entry holding ``events``."""
    return _entry_encoder.encode(events)


_json_entry_decoder = msgspec.json.Decoder(list[StoredEvent])


def decode_entry(fields: dict[bytes, bytes]) -> list[Event]:
    """The events of one stream entry. Entries written as a JSON array (before the
    intake wrote msgpack) are still read, so an upgrade loses nothing in the streams:
    a msgpack array never starts with ``[``."""
    raw = fields[INTAKE_FIELD]
    decoder = _json_entry_decoder if raw[:1] == b"[" else _entry_decoder
    return cast(list[Event], decoder.decode(raw))


_EVENT_TYPE = attrgetter("event_type")
_view_decoder = msgspec.msgpack.Decoder(list[PartView])


def decode_views(fields: dict[bytes, bytes]) -> list[PartView] | None:
    """The message-part fields of the events of one stream entry, in order (see
    ``engine.messages.PartView``); None for an entry written as JSON or one these
    fields cannot be read from, whose parts are then encoded event by event."""
    raw = fields[INTAKE_FIELD]
    if raw[:1] == b"[":
        return None
    try:
        return cast(list[PartView], _view_decoder.decode(raw))
    except msgspec.DecodeError:
        return None


COUNT_WARNING_SEC = 60.0  # at most one warning a minute of a count not made
_count_warned = [-COUNT_WARNING_SEC]  # when it was last given


def _written(replies: list[Any], count_at: int, stats_key: str) -> None:
    """Check the replies of an append's MULTI: raise the first failure but that of
    the count (reply ``count_at``) for its counter's damage, which is logged (at most
    once every COUNT_WARNING_SEC), as the events were written."""
    for n, reply in enumerate(replies):
        if isinstance(reply, Exception):
            if n != count_at or not damaged_count(reply):
                raise reply
            if time.monotonic() - _count_warned[0] >= COUNT_WARNING_SEC:
                _count_warned[0] = time.monotonic()
                log.warning("%s events_accepted not counted: %s (a damaged record: set it "
                            "right with HSET or delete the field)", stats_key, reply)


def _refusal(issues: list[EventIssue]) -> EventError:
    # events, not issues: one event may have several (a wrong type and an unknown code)
    bad = len({issue.index for issue in issues})
    return EventError(f"{bad} bad event(s), nothing accepted: "
                      + "; ".join(map(str, issues[:20])), issues)


def _known_types(catalogue: EventCatalogue, events: Sequence[Event]) -> bool:
    """Whether every event's code is in ``catalogue``; False also when one is not
    hashable (a list built in Python: ``validate`` names it)."""
    try:
        return all(map(catalogue.__contains__, set(map(_EVENT_TYPE, events))))
    except TypeError:
        return False


class Intake:
    def __init__(self, r: redis.Redis, keys: Keys, partitions: int, max_batch: int,
                 catalogue: EventCatalogue | None = None, max_entries: int = 0) -> None:
        """``max_entries``: INTAKE_MAX_ENTRIES (0: no limit)."""
        self.r, self.k = r, keys
        self.partitions = partitions
        self.max_batch = max_batch
        self.max_entries = max_entries
        # the partitions' stream lengths as last read, and when (see _check_backlog)
        self._lengths: list[int] = []
        self._lengths_at = -float("inf")
        self.catalogue = load_catalogue() if catalogue is None else catalogue
        self._scripts: dict[str, Any] = {}  # registered on first use (validate needs none)
        self.records_kept = False  # keep_records ran once (the engine's start)
        self._spent: deque[str] = deque()  # receipts of finished appends, to delete
        # the engine's recorded event codes as last read, and this intake's codes not
        # among them
        self._engine_types: tuple[bytes | str | None, list[str]] = (None, [])

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            text = resources.files("engine").joinpath(f"{name}.lua").read_text("utf-8")
            self._scripts[name] = self.r.register_script(text)
        return self._scripts[name]

    def ensure_groups(self) -> None:
        """Create every partition stream and its consumer group (idempotent)."""
        for n in range(self.partitions):
            try:
                self.r.xgroup_create(self.k.intake(n), CONSUMER_GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def validate(self, events: bytes | str | Sequence[Event | dict[str, Any]]
                 ) -> tuple[list[Event], list[EventIssue]]:
        """Decode and check events; returns the good ones and every issue."""
        if not isinstance(events, bytes | str) and all(map(isinstance, events, repeat(Event))):
            built = list(cast(Sequence[Event], events))
            # Event objects were checked when built (__post_init__), but not their
            # fields' types and ids' ranges: msgspec checks those only while decoding
            issues = read_back_issues(built)
            if not _known_types(self.catalogue, built):
                # not where read_back_issues named it already (one of another type)
                named = {issue.index for issue in issues if issue.field == "event_type"}
                issues += [EventIssue(i, "event_type",
                                      f"unknown event type {quoted(e.event_type)}")
                           for i, e in enumerate(built)
                           if i not in named and not _known_types(self.catalogue, [e])]
            if not issues:
                return built, []
            bad = {issue.index for issue in issues}
            return ([e for i, e in enumerate(built) if i not in bad],
                    sorted(issues, key=attrgetter("index")))
        batch = self._decode(events)
        try:  # what decoded may still not encode: an integer beyond 64 bits in event_data
            _deeper(_entry_encoder.encode, batch.events)
        except _UNENCODABLE:
            unwritable = encoding_issues(batch.events, batch.indices)
            left_out = {issue.index for issue in unwritable}
            return ([e for e, i in zip(batch.events, batch.indices, strict=True)
                     if i not in left_out],
                    sorted(batch.issues + unwritable, key=attrgetter("index")))
        return batch.events, batch.issues

    def _decode(self, events: bytes | str | Sequence[Event | dict[str, Any]]) -> DecodedBatch:
        if isinstance(events, bytes | str):
            # a lone surrogate escape in one event of an array: that event is bad, named
            # by its field, not the whole body (as the API decodes it)
            return decode_body(events, self.catalogue)[0]
        try:
            plain = [msgspec.to_builtins(e) if isinstance(e, Event) else e for e in events]
            return decode_batch(_json_encode(plain), self.catalogue)
        except _UNENCODABLE:
            pass
        # one JSON cannot hold (a key that is no string, a value of no JSON type, a
        # lone surrogate): each event alone, those that fail named, the others decoded
        texts: list[bytes] = []
        kept: list[int] = []
        issues: list[EventIssue] = []
        for i, item in enumerate(events):
            try:
                texts.append(_deeper(_json_encode, msgspec.to_builtins(item)
                                     if isinstance(item, Event) else item))
                kept.append(i)
            except RecursionError:
                issues.append(EventIssue(i, "$", NESTED_TOO_DEEPLY))
            except _UNENCODABLE as exc:
                issues.append(_unencodable_issue(i, item, _json_encode, exc))
        batch = decode_batch(b"[" + b",".join(texts) + b"]", self.catalogue)
        issues += [EventIssue(kept[x.index], x.field, x.reason) if x.index >= 0 else x
                   for x in batch.issues]
        return DecodedBatch(batch.events, [kept[j] for j in batch.indices],
                            sorted(issues, key=attrgetter("index")))

    def publish(self, events: bytes | str | Sequence[Event | dict[str, Any]],
                partial: bool = False) -> PublishResult:
        """Validate and append events. With bad events: raise EventError listing them and
        accept nothing, unless ``partial`` (then the good ones are accepted and the issues
        returned). The cyclic collector is paused meanwhile (``engine.collector``)."""
        if isinstance(events, Mapping | Event) or not isinstance(events, bytes | str | Iterable):
            what = "one event" if isinstance(events, Mapping | Event) else type(events).__name__
            raise EventError(f"expected a list of events (or a JSON array or NDJSON body), "
                             f"got {what}; nothing accepted",
                             [EventIssue(-1, "$", f"expected a list of events, got {what}")])
        if not isinstance(events, bytes | str | Sequence):
            events = list(events)  # a generator, say: read once, here
        with paused_gc():
            return self._publish(events, partial)

    def _publish(self, events: bytes | str | Sequence[Event | dict[str, Any]],
                 partial: bool) -> PublishResult:
        if not isinstance(events, bytes | str) and all(map(isinstance, events, repeat(Event))):
            built = list(cast(Sequence[Event], events))
            if self._publish_checked(built):
                return PublishResult(len(built), [], [e.id or "" for e in built])
        if isinstance(events, bytes | str) or not all(map(isinstance, events, repeat(Event))):
            batch = self._decode(events)  # what does not encode: found while encoding
        else:  # built in Python, and one is bad: validate names it
            good, found = self.validate(events)
            bad = {issue.index for issue in found}
            batch = DecodedBatch(good, [i for i in range(len(events)) if i not in bad], found)
        if batch.issues and not partial:
            self.count_rejected(batch.issues)
            raise _refusal(batch.issues)
        fresh = [e for e in batch.events if e.id is None]
        ensure_ids(fresh)
        encoded = self.encode(batch.events, batch.indices)
        issues = sorted(batch.issues + encoded.issues, key=attrgetter("index"))
        if encoded.issues and not partial:
            for event in fresh:
                event.id = None
            self.count_rejected(issues)
            raise _refusal(issues)
        self.write(encoded, fresh)
        self.count_rejected(issues)
        return PublishResult(len(encoded.events), issues, [e.id or "" for e in encoded.events])

    def count_rejected(self, issues: Sequence[EventIssue]) -> None:
        """Count the bad events of ``issues`` as ``events_rejected`` in the engine's
        stats; a count Redis does not take is left out (the caller is told anyway)."""
        bad = len({issue.index for issue in issues if issue.index >= 0})
        if bad:
            with suppress(redis.RedisError):
                self.r.hincrby(self.k.engine_stats, "events_rejected", bad)

    def _publish_checked(self, events: list[Event]) -> bool:
        """Append ``events`` (built in Python) if they are all good, checked on the
        very entries written: each entry's msgpack must read back (``read_back_issues``
        in one pass, without encoding the events twice). False, with nothing written,
        when one is not: ``validate`` then names the bad ones."""
        if not _known_types(self.catalogue, events):
            return False
        accounts = list(map(_ACCOUNT, events))
        # ids are given before encoding, and taken back if the batch is refused
        fresh = [e for e in events if e.id is None] if None in map(_ID, events) else []
        try:
            if accounts and not 0 <= min(accounts) <= max(accounts) <= MAX_ID:
                return False
            ensure_ids(fresh)
            encoded = _deeper(self._encode_read_back, events)
        except (msgspec.ValidationError, msgspec.DecodeError, *_UNENCODABLE):
            for event in fresh:
                event.id = None
            return False
        self._write_refundable(encoded, len(events), fresh, events)
        return True

    def _encode_read_back(self, events: list[Event]) -> list[tuple[int, bytes]]:
        _json_check(events)  # as ``_read_back``
        encoded = self._encode(events)
        for _, data in encoded:
            _entry_decoder.decode(data)
        return encoded

    def _encode(self, events: list[Event]) -> list[tuple[int, bytes]]:
        return [(n, encode_entry(chunk)) for n, chunk in self._entries(events)]

    def encode(self, events: list[Event], indices: Sequence[int] | None = None) -> Encoded:
        """The stream entries of ``events`` (decoded, given their ids), encoded once. When
        that fails, the events that cannot be encoded (an integer beyond 64 bits in
        ``event_data``, nesting too deep) are found one by one and left out, each with
        an issue at its index in ``indices`` (default: its position)."""
        try:
            return Encoded(events, _deeper(self._encode, events), [])
        except _UNENCODABLE:
            issues = encoding_issues(events, indices)
        positions = indices if indices is not None else range(len(events))
        bad = {issue.index for issue in issues}
        good = [e for e, i in zip(events, positions, strict=True) if i not in bad]
        return Encoded(good, _deeper(self._encode, good), issues)

    def write(self, encoded: Encoded, fresh: Sequence[Event] = ()) -> None:
        """Append what ``encode`` made; ``fresh``: the events whose ids were given for
        this append (taken back if it is refused)."""
        self._write_refundable(encoded.entries, len(encoded.events), fresh, encoded.events)

    def _write_refundable(self, entries: list[tuple[int, bytes]], count: int,
                          fresh: Sequence[Event], events: Sequence[Event] = ()) -> None:
        """``_write``; if it is refused (ConfigError: surely not written), the ids given
        to ``fresh`` for it are taken back. After a Redis error they stay: a retry with
        the same events then repeats their message ids, which receivers can see."""
        try:
            self._check_backlog(entries)
            self._write(entries, count, events)
        except (ConfigError, Backlogged):
            for event in fresh:
                event.id = None
            raise

    def _check_backlog(self, entries: list[tuple[int, bytes]]) -> None:
        """Backlogged, nothing written, if a partition the entries go to holds
        ``max_entries`` entries or more. The lengths are read (one pipeline) at most
        every BACKLOG_CHECK_SEC: a bound on the backlog, not an exact count."""
        if not self.max_entries or not entries:
            return
        now = time.monotonic()
        if now - self._lengths_at >= BACKLOG_CHECK_SEC:
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hget(self.k.config, "partitions")
                for n in range(self.partitions):
                    pipe.xlen(self.k.intake(n))
                recorded, *lengths = pipe.execute()
            if recorded is not None and recorded != str(self.partitions).encode():
                return  # the engine reads other streams: _write says so, not this
            self._lengths = [int(x) for x in lengths]
            self._lengths_at = now
        full = sorted({n for n, _ in entries if self._lengths[n] >= self.max_entries})
        if full:
            shown = ", ".join(f"partition {n} holds {self._lengths[n]:,}" for n in full)
            raise Backlogged(
                f"the intake is behind: {shown} entries not yet processed (INTAKE_MAX_"
                f"ENTRIES is {self.max_entries:,}); nothing was accepted, publish again "
                "later (the engine's health says whether its partitions run or wait)")

    def append(self, events: list[Event], fresh: Sequence[Event] = ()) -> None:
        """Append validated events (with ids) to their partitions' streams; ``fresh``:
        those whose ids were given for this append (taken back if it is refused).
        EventError, nothing appended, if one cannot be encoded."""
        encoded = self.encode(events)
        if encoded.issues:
            raise _refusal(encoded.issues)
        self.write(encoded, fresh)

    def _entries(self, events: list[Event]) -> list[tuple[int, list[Event]]]:
        """(partition, events) of each stream entry to write: events grouped by the
        partition of their database, in their order, at most ``max_batch`` per entry.
        The partition is computed once per distinct database and the grouping done by
        one stable sort (no Python step per event)."""
        groups: list[tuple[int, list[Event]]]
        databases = list(map(_DATABASE, events))
        known = {db: partition_of(db[0], db[1], self.partitions)
                 for db in dict.fromkeys(databases)}
        if len(set(known.values())) <= 1:
            groups = [(next(iter(known.values()), 0), events)]
        else:
            codes = np.fromiter(map(known.__getitem__, databases), np.int64, len(events))
            groups = [(n, list(gather(events, idx))) for n, idx in positions_by_code(codes)]
        return [(n, part[start:start + self.max_batch]) for n, part in groups
                for start in range(0, len(part), self.max_batch)]

    def _write(self, entries: list[tuple[int, bytes]], count: int,
               events: Sequence[Event] = ()) -> None:
        """XADD the encoded entries and count ``count`` events accepted, in one MULTI,
        at most once, refused (ConfigError, nothing written) if the engine reads
        another number of partitions than this intake writes to.

        The MULTI also sets a receipt key of this append; the engine's PARTITIONS and
        the receipt are WATCHed. So an attempt after a lost connection or a timeout
        (redis-py reports both as a WatchError) finds the receipt if an earlier EXEC
        went through, and an earlier EXEC that reaches Redis only after a later one
        is aborted by the receipt that one set: a batch is never written twice.

        Once the append is known to be written, its receipt has done its work (an
        earlier attempt's late EXEC was aborted when the receipt was set): the next
        append's MULTI deletes it, so an intake fed one event per publish keeps a
        handful of receipts, not one per publish for RECEIPT_SEC."""
        if not entries:
            return
        receipt = f"{self.k.p}:intake:receipt:{uuid.uuid4().hex}"
        spent = self._take_spent()
        deleted = False
        try:
            deleted = self._write_once(entries, count, receipt, spent, events)
        finally:
            if not deleted:  # perhaps not deleted: by a later append
                self._spent.extendleft(spent)
        self._spent.append(receipt)

    def _take_spent(self) -> list[str]:
        spent: list[str] = []
        try:
            while len(spent) < SPENT_PER_WRITE:
                spent.append(self._spent.popleft())
        except IndexError:
            pass
        return spent

    def _write_once(self, entries: list[tuple[int, bytes]], count: int, receipt: str,
                    spent: list[str], events: Sequence[Event] = ()) -> bool:
        """``_write``'s attempts; True when the MULTI that wrote also deleted ``spent``."""
        lost: Exception | None = None
        for attempt in range(WRITE_TRIES):
            lost = None
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self.k.config, receipt)
                    if attempt and pipe.exists(receipt):
                        # an earlier attempt's EXEC went through (with its deletes,
                        # but this cannot tell: they are made again later)
                        return False
                    recorded, types = pipe.hmget(self.k.config, "partitions", "event_types")
                    if types is not None and events:
                        self._refuse_foreign_types(types, events)
                    engine_count = recorded_partitions(recorded, self.k.config)
                    if engine_count is not None and engine_count != self.partitions:
                        raise ConfigError(
                            f"PARTITIONS is {self.partitions} here but the engine (REDIS_PREFIX "
                            f"{self.k.p!r}) runs with {engine_count}: events would go to "
                            "streams no partition reads; nothing was accepted. Use the "
                            "engine's settings")
                    pipe.multi()
                    for n, data in entries:
                        pipe.xadd(self.k.intake(n), {INTAKE_FIELD: data})
                    pipe.hincrby(self.k.engine_stats, "events_accepted", count)
                    pipe.set(receipt, 1, ex=RECEIPT_SEC)
                    if spent:
                        pipe.delete(*spent)
                    # a MULTI is not undone by one of its commands failing: the events
                    # are written even where the count fails (its field damaged from
                    # outside), and are then accepted, not reported lost
                    _written(pipe.execute(raise_on_error=False), len(entries),
                             self.k.engine_stats)
                    return True
                except redis.WatchError as exc:
                    # a changed count or receipt, or (so redis-py reports them) a
                    # connection lost or timed out while watching: read them again
                    if isinstance(exc.__context__, redis.ConnectionError | redis.TimeoutError) \
                            or "occurred while watching" in str(exc):
                        lost = exc
        if lost is not None:
            raise redis.ConnectionError(f"Redis connection lost while appending: {lost}")
        raise ConfigError("PARTITIONS: the engine's recorded count kept changing while "
                          "publishing; nothing was accepted")

    def _streams(self) -> list[tuple[int, str]]:
        """(partition, key) of every intake stream in Redis."""
        head = self.k.intake(0)[:-1]
        found = []
        for raw in self.r.scan_iter(match=f"{head}*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if key[len(head):].isdigit():
                found.append((int(key[len(head):]), key))
        return sorted(found)

    def _unread(self) -> list[Any]:
        """The streams this intake's count would not read that hold events: key,
        length, key, length..."""
        busy: list[Any] = []
        for n, key in self._streams():
            if n >= self.partitions and (length := int(self.r.xlen(key))):
                busy += [key, length]
        return busy

    def _refuse(self, before: int | None, busy: list[Any]) -> ConfigError:
        listed = ", ".join(f"{k.decode() if isinstance(k, bytes) else k} ({int(n)} entries)"
                           for k, n in zip(busy[::2], busy[1::2], strict=True))
        ran = f"ran with {before} and its intake still holds events" if before is not None \
            else "had no count recorded and its intake holds events this count would never read"
        return ConfigError(
            f"PARTITIONS is {self.partitions} but the engine {ran}: {listed}. Start with the "
            "count that wrote them until they are delivered (backlog 0), then change it")

    def keep_records(self) -> None:
        """Write this engine's records beside its PARTITIONS count where Redis lacks them
        (``Engine.start``, after ``record_partitions``, and the claim renewer: Redis may
        come back without its data, or with older data): PARTITIONS where it is missing,
        marked as not checked (the next start checks the streams of other counts), and
        the event codes where they differ. Producers with another count, and producers
        and hook stores with codes the engine lacks (no hook of the engine could capture
        such events; a stored hook it cannot load stops every partition), are then
        refused. Writes nothing when both are there, so producers' WATCHed appends are
        not aborted. Codes recorded before that this engine lacks are logged while the
        intake holds entries: their events match no hook (``EventColumns.from_events``)."""
        wrote, before = self._script("intake_restore")(
            keys=[self.k.config, self.k.epoch],
            args=[self.partitions, json.dumps(sorted(self.catalogue.codes())), "restored",
                  uuid.uuid4().hex])
        if int(wrote) & 2 and before:
            self._say_removed(before)
        if int(wrote) & 4 and self.records_kept:
            # kept at the start, gone since: Redis lost the engine's data while it ran
            log.error("Redis lost the engine's data under REDIS_PREFIX %r while it ran (a "
                      "restart without persistence, a flush, or keys evicted): the accepted "
                      "events not yet delivered, the scheduled re-sends, the dead letters "
                      "and the hooks it held are gone, and the hooks' counts start again; "
                      "the engine's records are written again and it goes on with what "
                      "Redis holds now (give Redis persistence, AOF, and maxmemory-policy "
                      "noeviction)", self.k.p)
        self.records_kept = True

    def _say_removed(self, recorded: bytes | str) -> None:
        """Warn when codes ``recorded`` before are not this engine's while its intake
        (or the set-aside stream) holds entries: events of those codes accepted before
        are acknowledged undelivered."""
        removed = sorted(set(engine_codes(recorded) or ()).difference(self.catalogue.codes()))
        if not removed:
            return
        with self.r.pipeline(transaction=False) as pipe:
            for n in range(self.partitions):
                pipe.xlen(self.k.intake(n))
            pipe.xlen(self.k.intake_unreadable)
            *lengths, aside = pipe.execute()
        if not sum(lengths) and not aside:
            return
        shown = ", ".join(map(quoted, removed[:10])) + (
            f" and {len(removed) - 10} more" if len(removed) > 10 else "")
        log.warning("event type(s) %s, which the engine had (REDIS_PREFIX %r), are not in "
                    "this engine's event types (EVENT_TYPES_FILE) while its intake holds %d "
                    "entries (%d set aside): events of them accepted before match no hook "
                    "and are acknowledged undelivered as the partitions reach them; to "
                    "deliver them, stop the engine and start it with the codes in "
                    "EVENT_TYPES_FILE again", shown, self.k.p, sum(lengths), aside)

    def record_again(self) -> None:
        """``keep_records``, and this engine's PARTITIONS where another is recorded (the
        claim renewer of a running engine, ``Renewer.also``): should its claim lapse,
        an engine with another count may take it and record that count, which refuses
        this engine's producers and leaves its workers waiting (``Holding``) once the
        claim is back. This engine's count is recorded again as at a start
        (``record_partitions``: ConfigError, nothing changed, while that count's streams
        hold events). A count recorded as this engine's is left as it is."""
        self.keep_records()
        raw = cast(bytes | None, self.r.hget(self.k.config, "partitions"))
        recorded = recorded_partitions(raw, self.k.config)
        if recorded is not None and recorded != self.partitions:
            self.record_partitions()

    def _refuse_foreign_types(self, recorded: bytes | str, events: Sequence[Event]) -> None:
        """ConfigError if an event's code is not one of the engine's ``recorded`` codes.
        The events are looked at only when this intake knows codes the engine lacks."""
        if recorded != self._engine_types[0]:
            known = engine_codes(recorded)
            self._engine_types = (recorded, [] if known is None else sorted(
                set(self.catalogue.codes()).difference(known)))
        foreign = self._engine_types[1]
        if not foreign:
            return
        found = sorted(set(map(_EVENT_TYPE, events)).intersection(foreign))
        if found:
            raise ConfigError(
                f"event type(s) {', '.join(map(repr, found))} are not known to the engine "
                f"(REDIS_PREFIX {self.k.p!r}): its EVENT_TYPES_FILE lacks them, so no "
                "hook of the engine could capture these events; nothing was accepted. Use "
                "the engine's settings")

    def record_partitions(self) -> None:
        """Record this intake's PARTITIONS as the engine's (``Engine.start``). A
        different count recorded before is replaced only while all its streams are
        empty; else ConfigError naming them (their events would never be read).

        With nothing recorded (data of an earlier version, or producers that ran before
        any engine), the count is recorded first, marked as not checked: producers of
        another count are refused from then on; then every stream this count would not
        read is checked, and the record kept (mark cleared) or taken back. A start that
        finds the mark (another engine checking, or one that stopped half-way) checks
        again itself."""
        config = self.k.config
        for _ in range(10):
            raw: dict[bytes, bytes] = self.r.hgetall(config)  # type: ignore[assignment]
            recorded, mark = raw.get(b"partitions"), raw.get(b"checking")
            before = recorded_partitions(recorded, config)
            if before == self.partitions:
                if mark is None:
                    return
                if busy := self._unread():  # left unchecked: check now
                    raise self._refuse(None, busy)
                self._script("intake_checked")(keys=[config], args=[mark, "keep"])
                return
            token = uuid.uuid4().hex if before is None else ""
            streams = [self.k.intake(n) for n in range(before or 0)]
            answer = self._script("intake_partitions")(
                keys=[config, *streams],
                args=[self.partitions, "" if before is None else before, token])
            if answer and answer[0] == b"changed":
                continue  # another engine recorded meanwhile: look again
            if answer:
                raise self._refuse(before, answer)
            if before is None:
                busy = self._unread()
                self._script("intake_checked")(keys=[config],
                                               args=[token, "undo" if busy else "keep"])
                if busy:
                    raise self._refuse(None, busy)
            else:
                log.warning("PARTITIONS changed from %d to %d (the intake was empty)",
                            before, self.partitions)
            return
        raise ConfigError("PARTITIONS: the recorded count kept changing; is another engine "
                          "starting with the same REDIS_PREFIX?")


class SetAside:
    """Intake entries a partition set aside (``{p}:intake:unreadable``): ones it could
    not decode, and ones whose processing failed MAX_ENTRY_FAILURES times (an error
    since fixed, say). Listed, and put back into the intake to be processed again."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.k = keys

    def page(self, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """The oldest ``limit`` set-aside entries (after the one of id ``after``):
        ``{"id", "partition", "entry", "error", "events"}``, ``events`` their count, or
        None for one that cannot be decoded (it would be set aside again)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 2**31:
            raise ValueError(f"set_aside: limit must be a whole number from 1 to 2**31, got "
                             f"{limit!r}")
        if after is not None and not _stream_id(after):
            raise ValueError(f"set_aside: after: expected a set-aside entry's id (as "
                             f"1700000000000-0), got {after!r}")
        if after == f"{2**64 - 1}-{2**64 - 1}":  # the last id there can be: none after it
            return []
        start = "-" if after is None else "(" + after
        out = []
        for eid, fields in _entries(self.r.xrange(self.k.intake_unreadable, start, "+",
                                                  count=limit)):
            out.append({"id": eid.decode(),
                        "partition": _number(_text(fields.get(b"_partition"))),
                        "entry": _text(fields.get(b"_entry")),
                        "error": _text(fields.get(b"_error")),
                        "events": _event_count(fields)})
        return out

    def discard(self, ids: list[str]) -> int:
        """Delete set-aside entries for good (``ids``, all or none), counted as
        ``entries_discarded`` in the engine's stats; how many. An unknown id raises
        ValueError naming it, and nothing is deleted; one requeued or discarded by
        another run meanwhile is not counted twice."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0
        self._found(wanted, "discarded")
        done = 0
        for start in range(0, len(wanted), 1000):  # a script takes some thousands at most
            done += int(self.r.eval(_DISCARD, 2, self.k.intake_unreadable,
                                    self.k.engine_stats, *wanted[start:start + 1000]))
        return done

    def _found(self, ids: list[str], done: str) -> dict[str, dict[bytes, bytes]]:
        """The fields of each set-aside entry of ``ids``; ValueError naming those that
        are no ids or do not exist (``done``: what did not happen to any)."""
        wrong = [eid for eid in ids if not _stream_id(eid)]
        if wrong:
            raise ValueError(f"{wrong[0]!r} is no set-aside entry's id (as "
                             f"1700000000000-0); nothing {done}")
        found: dict[str, dict[bytes, bytes]] = {}
        with self.r.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.xrange(self.k.intake_unreadable, eid, eid)
            for eid, reply in zip(ids, pipe.execute(), strict=True):
                if reply:
                    found[eid] = _entries(reply)[0][1]
        unknown = [eid for eid in ids if eid not in found]
        if unknown:
            raise ValueError(f"set-aside entr(y/ies) {', '.join(unknown[:20])} do not "
                             f"exist; nothing {done}")
        return found

    def requeue(self, ids: list[str] | None = None, partitions: int = 1) -> int:
        """Append set-aside entries (``ids``, all or none; None: every one that can be
        decoded) to the intake again, each by the one script that removes it from the
        set-aside stream (two runs at once put it back once); returns how many. An
        unknown id, or one that cannot be decoded, raises ValueError naming it, and
        nothing is moved. ``partitions``: the engine's PARTITIONS (its recorded value
        wins), to place each entry."""
        recorded = recorded_partitions(self.r.hget(self.k.config, "partitions"), self.k.config)
        partitions = recorded if recorded is not None else partitions
        if ids is None:
            items = [(eid, f) for eid, f in _entries(self.r.xrange(self.k.intake_unreadable))
                     if _event_count(f) is not None]
        else:
            found = self._found(ids, "requeued")
            undecodable = [eid for eid in ids if _event_count(found[eid]) is None]
            if undecodable:
                raise ValueError(f"set-aside entr(y/ies) {', '.join(undecodable[:20])} "
                                 "cannot be decoded (they would be set aside again); "
                                 "nothing requeued")
            items = [(eid.encode(), found[eid]) for eid in dict.fromkeys(ids)]
        moved = 0
        for entry_id, fields in items:
            # each event to the partition of its database under the PARTITIONS of now,
            # which may differ from the count when it was set aside: the entry as it
            # was when its events share one, else one entry per partition
            groups: dict[int, list[Event]] = {}
            for event in decode_entry(fields):
                groups.setdefault(partition_of(event.account_id, event.list_id, partitions),
                                  []).append(event)
            if len(groups) <= 1:
                original = [x for k, v in fields.items() if not k.startswith(b"_")
                            for x in (k, v)]
                parts = [(next(iter(groups), 0), original)]
            else:
                parts = [(n, [INTAKE_FIELD, encode_entry(group)])
                         for n, group in sorted(groups.items())]
            args: list[Any] = [entry_id]
            for _, values in parts:
                args += [len(values), *values]
            # appended only by the call that removes it: two at once put it back once
            moved += int(cast(int, self.r.eval(
                _REQUEUE, 2 + len(parts), self.k.intake_unreadable, self.k.engine_stats,
                *(self.k.intake(n) for n, _ in parts), *args)))
        return moved


# KEYS: the set-aside stream, the engine's stats; ARGV: the ids to delete
_DISCARD = """
local n = redis.call('XDEL', KEYS[1], unpack(ARGV))
redis.pcall('HINCRBY', KEYS[2], 'entries_discarded', n)  -- a damaged count: not made
return n
"""

# KEYS: the set-aside stream, the engine's stats, then one intake stream per part;
# ARGV: the entry's id, then per part its number of field/value items and those items
_REQUEUE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  local at = 2
  for k = 3, #KEYS do
    local n = tonumber(ARGV[at])
    redis.call('XADD', KEYS[k], '*', unpack(ARGV, at + 1, at + n))
    at = at + n + 1
  end
  redis.pcall('HINCRBY', KEYS[2], 'entries_requeued', 1)  -- a damaged count: not made
  return 1
end
return 0
"""


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """An XRANGE reply as redis-py gives it for this client (bytes, not decoded)."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reply)


def _stream_id(value: Any) -> bool:
    """A stream entry's id: two whole numbers up to 2^64-1, joined by a ``-``."""
    return isinstance(value, str) and re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", value) is not None \
        and all(int(part) < 2**64 for part in value.split("-"))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _number(text: str | None) -> int | str | None:
    """A set-aside entry's partition as a number, as everywhere else (its text as stored
    when it is none: damaged, or written from outside)."""
    return int(text) if text is not None and text.isascii() and text.isdigit() else text


def _event_count(fields: dict[bytes, bytes]) -> int | None:
    try:
        return len(decode_entry(fields))
    except Exception:  # not written by the intake, or damaged
        return None
