"""Event input schema: what producers send (msgspec), and batch decoding.

An event carries the message-format fields of spec section (d), plus what
matching and enrichment need:

* matching dimensions ``resource_id``, ``campaign_id``, ``message_id`` (template),
  ``segment_ids``, ``pixel_id`` — given at the top level, or taken from
  ``event_data`` (``resource_id``, ``campaign_id``, ``message_id``, ``segment_id``
  where 0 means none, ``pixel_id``) when absent;
* ``profile``: profile fields, for hooks that copy them into custom_data;
  ``profile_deleted``: the profile no longer exists (historical export);
* ``historical``: the event comes from an export of past events, whose messages never
  carry content (spec a); a deleted profile's event is taken as one too;
* ``custom_data``: custom_data brought by the request that launched a trigger;
* ``send_id``: key of the message content in the content store;
* ``id``: the event's stable id; the intake assigns one when the producer did not.

``decode_batch`` reports every bad event (index, field, reason) and still returns
the good events of the same batch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from calendar import monthrange, timegm
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from operator import attrgetter
from typing import Annotated, Any

import msgspec

from engine.catalogue import EventCatalogue, load_catalogue
from engine.errors import SHOWN_CHARS, quoted

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,30}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # RFC 3339 digits are ASCII; without this \d also takes e.g. fullwidth digits
)
NS = 1_000_000_000
MAX_ID = 2**63 - 1  # ids are matched as int64 columns


def is_account_id(value: object) -> bool:
    """Whether ``value`` can be an account id: an integer (not a bool) from 0 to MAX_ID."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


# an id: non-negative and within int64 (checked by msgspec while decoding)
IdInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
# an event id, when given, is not empty: hook_message_id is derived from it, and two
# events with an empty id would share one (receivers de-duplicate by it)
EventId = Annotated[str, msgspec.Meta(min_length=1)]


# an event_date already in the form messages carry: UTC, no trailing zero in the fraction
_CANONICAL_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:[0-5]\d(?:\.\d{0,8}[1-9])?Z", re.ASCII)


@lru_cache(maxsize=1 << 15)
def parse_rfc3339_ns(text: str) -> int:
    """Unix nanoseconds of an RFC 3339 time (a fraction finer than nanoseconds is cut
    to them, as Go's time.Parse does; at most 30 digits: the texts are cached).

    Cached: an event's date is parsed when it is decoded and again when its
    messages are rendered, usually within one read round (READ_MAX_ENTRIES entries
    of up to INTAKE_MAX_BATCH events: 20,000 by default). 32,768 dates hold such a
    round, in about 7 MB; 2^18 had taken about 54 MB in every process once full."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"{quoted(text)} is not an RFC 3339 time like "
                         "2018-03-04T13:13:19.034315796Z")
    y, mo, d, h, mi, s = map(int, m.group(1, 2, 3, 4, 5, 6))
    if not (1 <= mo <= 12 and 1 <= d <= monthrange(y, mo)[1] and h < 24 and mi < 60 and s < 61):
        raise ValueError(f"{quoted(text)} has an out-of-range date or time")
    if m.group(9) and not (int(m.group(10)) < 24 and int(m.group(11)) < 60):
        raise ValueError(f"{quoted(text)} has an out-of-range UTC offset")
    secs = timegm((y, mo, d, h, mi, min(s, 59), 0, 0, 0))
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        secs -= offset if m.group(9) == "+" else -offset
    frac = (m.group(7) or "")[:9].ljust(9, "0")
    return secs * NS + int(frac)


# gc=False: events hold plain data and never form reference cycles; leaving them out
# of the cyclic GC makes decoding a 5,000-event batch ~4x faster in a busy process.
class Subscription(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    resource_id: int | None = None
    channel: str | None = None
    email: str | None = None
    phone: str | None = None
    subscription_id: str | None = None
    provider: str | None = None
    priority: int | None = None
    status: str | None = None
    ccsub: dict[str, Any] | None = None


class Event(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    event_type: str
    event_date: str
    account_id: int
    list_id: IdInt | None = None
    id: EventId | None = None
    profile_id: str | None = None
    xxh: str | None = msgspec.field(default=None, name="_xxh")
    md5: str | None = msgspec.field(default=None, name="_md5")
    sends_trying_num: int | None = None
    is_test: bool = False
    is_static: bool | None = None
    subscription_hash_id: str | None = None
    subscription: list[Subscription] | None = None
    event_data: dict[str, Any] = {}
    resource_id: IdInt | None = None
    campaign_id: IdInt | None = None
    message_id: IdInt | None = None
    segment_ids: list[IdInt] | None = None
    pixel_id: IdInt | None = None
    profile: dict[str, Any] | None = None
    profile_deleted: bool = False
    historical: bool = False  # from an export of past events: its messages carry no content
    custom_data: dict[str, Any] | None = None
    send_id: str | None = None

    def __post_init__(self) -> None:
        # validation errors raised here name their field first: "field: reason"
        try:
            try:
                ns = parse_rfc3339_ns(self.event_date)
            except ValueError as exc:
                raise ValueError(f"event_date: {exc}") from None
            if _CANONICAL_DATE.fullmatch(self.event_date) is None:
                # stored as messages carry it (RFC 3339, UTC, nanosecond fraction without
                # trailing zeros, as Go's RFC3339Nano): an offset, a lowercase t or z, a
                # fraction with trailing zeros, a leap second (:60, as :59)
                from engine.customdata import format_rfc3339_nano

                utc = format_rfc3339_nano(ns)
                if _CANONICAL_DATE.fullmatch(utc) is None or utc.startswith("0000"):
                    raise ValueError(f"event_date: {self.event_date!r} is outside the years "
                                     "0001-9999 in UTC")
                self.event_date = utc
            if self.account_id < 0:
                raise ValueError("account_id: must be >= 0")
            if self.account_id > MAX_ID:
                raise ValueError(f"account_id: must be <= {MAX_ID}")
            if self.segment_ids and 0 in self.segment_ids:
                # 0 is "no segment" (spec d), in segment_ids as in event_data.segment_id:
                # not a segment a filter can capture, nor the segment a message shows
                # (only integer zeros: a None or "" built in Python is left to the type check)
                self.segment_ids = [s for s in self.segment_ids
                                    if type(s) is not int or s != 0] or None
            if self.event_data:
                self._dimensions(self.event_data)
        except TypeError:
            # built in Python with a field of another type (msgspec decodes these
            # exact types): named here, not a TypeError naming nothing (a check
            # before the others cost every decoded event 80 ns)
            _refuse_wrong_types(self)
            raise

    def _dimensions(self, data: dict[str, Any]) -> None:
        """Check the ids of ``data`` (event_data) and fill the event's own from them."""
        # an id in event_data is checked even where the event names it at the top
        # (the message carries event_data as sent): null, false or "" never pass;
        # one that contradicts the top level is refused, as the event would be
        # matched by one id and delivered showing the other
        for dim in ("resource_id", "campaign_id", "message_id", "pixel_id"):
            if dim in data:
                value = _int_or_fail(data[dim], f"event_data.{dim}")
                top = getattr(self, dim)
                if top is None:
                    setattr(self, dim, value)
                elif top != value:
                    raise ValueError(f"event_data.{dim}: {value} differs from the "
                                     f"event's {dim} {top}")
        if "segment_id" in data:
            segment = _int_or_fail(data["segment_id"], "event_data.segment_id")
            if self.segment_ids is None:
                if segment:  # 0: no segment (spec d)
                    self.segment_ids = [segment]
            elif segment and segment not in self.segment_ids:
                raise ValueError(f"event_data.segment_id: {segment} is not among the "
                                 f"event's segment_ids {quoted(self.segment_ids)}")

    @property
    def date_ns(self) -> int:
        return parse_rfc3339_ns(self.event_date)


def _refuse_wrong_types(event: Event) -> None:
    """ValueError naming the first field ``Event.__post_init__`` relies on whose type
    it cannot use (only an event built in Python can have one)."""
    if not isinstance(event.event_date, str):
        raise ValueError(f"event_date: expected a string (an RFC 3339 time), got "
                         f"{quoted(event.event_date)}")
    if isinstance(event.account_id, bool) or not isinstance(event.account_id, int):
        raise ValueError(f"account_id: expected an integer, got {quoted(event.account_id)}")
    if not isinstance(event.event_data, dict):
        raise ValueError(f"event_data: expected an object, got {quoted(event.event_data)}")
    if event.segment_ids is not None and not isinstance(
            event.segment_ids, list | tuple | set | frozenset):  # written as an array
        raise ValueError(f"segment_ids: expected an array of ids, got "
                         f"{quoted(event.segment_ids)}")


def shown_segment(event: Event) -> int | None:
    """The segment a message of ``event`` is about (``{{segment_name}}``): the one its
    ``event_data`` shows (the send's), when not 0, else the first of ``segment_ids``
    (the profile's, those a hook's ``filters.segments`` matches), else None."""
    segment = event.event_data.get("segment_id") if event.event_data else None
    if isinstance(segment, int) and not isinstance(segment, bool) and segment:
        return segment
    return event.segment_ids[0] if event.segment_ids else None


def _int_or_fail(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an integer, got {quoted(value)}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{field}: expected an id from 0 to {MAX_ID}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class EventIssue:
    """One bad event of a batch: its index, the field at fault and why."""

    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        if self.index < 0:  # the batch as a whole (index -1, field "$")
            return f"the batch: {self.reason}"
        return f"event {self.index}: {self.field}: {self.reason}"


@dataclass(slots=True)
class DecodedBatch:
    events: list[Event]
    indices: list[int]  # position of each good event in the input
    issues: list[EventIssue]
    # positions of the bad events beyond ``max_issues`` (``decode_batch``): counted, with
    # no issue built (one issue per bad event: ``len(issues) + len(unlisted)`` are bad)
    unlisted: list[int] = dataclasses.field(default_factory=list)


class TooManyEvents(ValueError):
    """A body holds more events than its reader takes (``decode_batch``'s
    ``max_events``), found before they are decoded one by one."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit:,} events")
        self.limit = limit


def cap_issues(issues: list[EventIssue], unlisted: list[int], max_issues: int | None
               ) -> tuple[list[EventIssue], list[int]]:
    """``issues`` in index order, the first ``max_issues`` of them (all: None), and the
    positions of the others added to ``unlisted`` (sorted)."""
    issues = sorted(issues, key=attrgetter("index"))
    if max_issues is None or len(issues) <= max_issues:
        return issues, sorted(unlisted) if unlisted else unlisted
    return issues[:max_issues], sorted(unlisted + [i.index for i in issues[max_issues:]])


NESTED_TOO_DEEPLY = "nested too deeply (objects and arrays within each other)"
_batch_decoder = msgspec.json.Decoder(list[Event])
_event_decoder = msgspec.json.Decoder(Event)
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_event_encoder = msgspec.json.Encoder()
# msgspec's path: "- at `$[0].field`", or "- at `key` in `$.field`" for a key of the
# object at that path (a key that is no string, in an event built in Python)
_AT = re.compile(r"^(.*?)(?: - at (`key` in )?`\$(?:\[\d+\])?\.?([^`]*)`)?$", re.S)


def validation_issue(index: int, exc: msgspec.ValidationError | msgspec.DecodeError
                     ) -> EventIssue:
    """The issue of event ``index`` from msgspec's error (field from its path)."""
    m = _AT.match(str(exc))
    msg, path = (m.group(1), m.group(3)) if m else (str(exc), None)
    if m and m.group(2):  # a key of the object at ``path``
        msg = f"a key: {msg}"
    head = msg.split(": ", 1)[0]
    if not path and ": " in msg and head.replace(".", "").replace("_", "").isalnum():
        path, msg = msg.split(": ", 1)  # raised by __post_init__ as "field: reason"
    if not path and msg.startswith(("Object missing required field",
                                    "Object contains unknown field")):
        path = msg[msg.index("`") + 1:msg.rindex("`")]  # the key may hold backticks
    if path and len(path) > SHOWN_CHARS:  # a key of megabytes: named by its start
        msg = msg.replace(path, path[:SHOWN_CHARS] + "…")
        path = path[:SHOWN_CHARS] + "…"
    return EventIssue(index, path or "$", msg)


def decode_batch(
    data: bytes | str, catalogue: EventCatalogue | None = None, *,
    max_events: int | None = None, max_issues: int | None = None
) -> DecodedBatch:
    """Decode a JSON array (or NDJSON) of events; bad ones are reported, good ones kept.

    ``max_events``: TooManyEvents for a body of more events, raised before they are
    decoded one by one (an array is split first; an NDJSON body's lines are counted).
    ``max_issues``: issues are built for the first that many bad events only, the
    others are counted (``DecodedBatch.unlisted``): a body of megabytes may hold
    millions of bad events (``{}`` or ``1`` is one), and an issue each would cost a
    hundred times the body in memory. None: no limit."""
    catalogue = load_catalogue() if catalogue is None else catalogue  # an empty one is falsy
    raw = data.encode() if isinstance(data, str) else data
    if raw.startswith(_BOM):  # written by some editors and Windows tools: not content
        raw = raw[len(_BOM):]
    stripped = raw.lstrip()
    alone = one_object(stripped)
    if alone:
        raw = b"[" + raw + b"]"  # one event written over several lines, not NDJSON
        stripped = raw
    if stripped[:1] != b"[":
        return _decode_ndjson(raw, catalogue, max_events, max_issues)
    unlisted: list[int] = []
    if max_events is not None and len(raw) > max_events * SPLIT_FIRST_BYTES:
        _count_first(raw, max_events)
    try:
        events = _batch_decoder.decode(raw)
        indices = list(range(len(events)))
        issues: list[EventIssue] = []
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        try:
            items = _raw_list_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if alone:  # said of the object as sent (its bytes counted without the [)
                return DecodedBatch([], [], [EventIssue(-1, "$", f"not a JSON object: "
                                                        f"{_decode_error(raw[1:-1])}")])
            return DecodedBatch([], [], [EventIssue(-1, "$", f"not a JSON array of events: {exc}")])
        except RecursionError:  # too deep even to be split into events
            return DecodedBatch([], [], [EventIssue(-1, "$", NESTED_TOO_DEEPLY)])
        if max_events is not None and len(items) > max_events:
            raise TooManyEvents(max_events) from None
        events, indices, issues, unlisted = _decode_each(items, catalogue, max_issues)
    else:
        if max_events is not None and len(events) > max_events:
            raise TooManyEvents(max_events)
    return _check_types(events, indices, issues, catalogue, unlisted, max_issues)


def _count_first(raw: bytes, max_events: int) -> None:
    """TooManyEvents if the array ``raw`` splits into more than ``max_events`` items:
    a body that may hold too many events is counted before any is built (as an NDJSON
    body's lines are), not after all of them were. One that does not split is left to
    the decoding to say why."""
    try:
        items = len(_raw_list_decoder.decode(raw))
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return
    if items > max_events:
        raise TooManyEvents(max_events)


def _decode_each(
    items: list[Any], catalogue: EventCatalogue, max_issues: int | None = None
) -> tuple[list[Event], list[int], list[EventIssue], list[int]]:
    """The events of ``items`` that decode, their positions, an issue for each of the
    first ``max_issues`` that do not, and the positions of the other bad ones."""
    events: list[Event] = []
    indices: list[int] = []
    issues: list[EventIssue] = []
    unlisted: list[int] = []
    room = len(items) if max_issues is None else max_issues
    for i, item in enumerate(items):
        try:
            events.append(_event_decoder.decode(item))
            indices.append(i)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            if len(issues) < room:
                issues.append(validation_issue(i, exc))
            else:
                unlisted.append(i)
        except RecursionError:
            if len(issues) < room:
                issues.append(EventIssue(i, "$", NESTED_TOO_DEEPLY))
            else:
                unlisted.append(i)
    return events, indices, issues, unlisted


_BOM = b"\xef\xbb\xbf"
# an array body longer than this many bytes per event allowed is split and counted
# before its events are built (an event of the fields an event needs takes more)
SPLIT_FIRST_BYTES = 40


LINES_LOOKED_AT = 100  # lines of a body one_object reads for an object of its own


def one_object(stripped: bytes) -> bool:
    """Whether a body (leading blanks stripped) is one JSON object written over several
    lines, not NDJSON: it is one object, or its first line is no whole JSON value and
    none of its next LINES_LOOKED_AT lines is an object (an event pretty-printed with a
    slip in it, a trailing comma or a lone surrogate: one bad event, or a malformed
    body, not a bad event per line; NDJSON whose first lines are bad still has events
    of a line each after them)."""
    if stripped[:1] != b"{" or b"\n" not in stripped.rstrip():
        return False
    try:
        if isinstance(msgspec.json.decode(stripped), dict):
            return True
    except (msgspec.DecodeError, RecursionError):
        pass
    lines = (m.group() for m in _LINE.finditer(stripped))
    if _as_json(next(lines)) is not _NOT_JSON:
        return False
    return not any(isinstance(_as_json(line), dict)
                   for line in islice(lines, LINES_LOOKED_AT))


_NOT_JSON = object()


def _decode_error(raw: bytes) -> str:
    """What msgspec says of ``raw`` (a body it refused)."""
    try:
        msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return str(exc)
    except RecursionError:
        return NESTED_TOO_DEEPLY
    return "not one JSON value"


def _as_json(line: bytes) -> Any:
    """``line`` as Python's json reads it (lone surrogates and bytes that are no UTF-8
    let through), or _NOT_JSON."""
    try:
        return json.loads(line.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return _NOT_JSON


_LINE = re.compile(rb"\S[^\n]*")  # a non-blank line (bytes.strip's blanks are \s)


def _more_lines(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` has more than ``limit`` non-blank lines, found without splitting
    it (at most ``limit`` + 1 lines are looked at)."""
    if raw.count(b"\n") < limit:
        return False
    return next(islice(_LINE.finditer(raw), limit, None), None) is not None


def _decode_ndjson(raw: bytes, catalogue: EventCatalogue, max_events: int | None = None,
                   max_issues: int | None = None) -> DecodedBatch:
    if max_events is not None and _more_lines(raw, max_events):
        raise TooManyEvents(max_events)
    lines = [line for line in raw.split(b"\n") if line.strip()]
    events, indices, issues, unlisted = _decode_each(lines, catalogue, max_issues)
    return _check_types(events, indices, issues, catalogue, unlisted, max_issues)


def _check_types(
    events: list[Event], indices: list[int], issues: list[EventIssue], catalogue: EventCatalogue,
    unlisted: list[int] | None = None, max_issues: int | None = None
) -> DecodedBatch:
    """The events of a code in ``catalogue``; the others bad (at most ``max_issues``
    issues built in all, the rest counted in ``unlisted``)."""
    good_events, good_indices = [], []
    unlisted = list(unlisted or ())
    room = len(events) if max_issues is None else max_issues
    for event, index in zip(events, indices, strict=True):
        if event.event_type in catalogue:
            good_events.append(event)
            good_indices.append(index)
        elif room:
            room -= 1
            reason = f"unknown event type {quoted(event.event_type)}"
            issues.append(EventIssue(index, "event_type", reason))
        else:  # after max_issues of them: none is among the first max_issues bad ones
            unlisted.append(index)
    issues, unlisted = cap_issues(issues, unlisted, max_issues)
    return DecodedBatch(good_events, good_indices, issues, unlisted)


def decode_events(data: bytes | str, catalogue: EventCatalogue | None = None) -> list[Event]:
    """Decode a batch, raising EventError listing every bad event."""
    from engine.errors import EventError

    batch = decode_batch(data, catalogue)
    if batch.issues:
        raise EventError(
            f"{len(batch.issues)} bad event(s): " + "; ".join(map(str, batch.issues[:20])),
            batch.issues,
        )
    return batch.events


def ensure_ids(events: list[Event]) -> list[Event]:
    """Give every event without an id a fresh one (done once, at intake)."""
    if None not in map(attrgetter("id"), events):  # the usual case: a scan in C
        return events
    for event in events:
        if event.id is None:
            event.id = uuid.uuid4().hex
    return events


def encode_events(events: list[Event]) -> bytes:
    return _event_encoder.encode(events)
