"""Hook messages in the platform's format (spec d) and their encodings (spec e).

``MessageBuilder`` is made once per hook (it holds the compiled custom_data) and
turns events into ``Message`` structs; ``encode_message`` produces the bytes that
every transport sends:

* HTTP batch: ``http_body(parts)`` — a JSON array of encoded messages, joined as
  bytes (no re-encoding when a batch is assembled);
* RabbitMQ queue/exchange: one encoded message per AMQP message, routing key
  ``<list_id>.<event_type>`` (``routing_key``);
* Kafka: value = the encoded message, key per the hook's setting (``kafka_key``).

Absent optional keys are left out, never ``null``; the fields of a deleted
profile (historical export) are the one place ``null`` appears. Every message
carries ``hook_message_id``, stable across re-sends, for de-duplication.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from itertools import compress, repeat
from operator import attrgetter
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType
from xxhash import xxh3_128_hexdigest

from engine.catalogue import EventCatalogue, load_catalogue
from engine.customdata import CompiledCustomData, EventContext, format_rfc3339_nano
from engine.events import Event, Subscription, parse_rfc3339_ns
from engine.hooks import Hook
from engine.names import NameCatalogue
from engine.transports.base import Delivery

# event_data keys a category's messages always carry (spec d), filled from the
# event's matching dimensions when the producer left them out of event_data.
_SEGMENT = "segment_id"
_DIMENSION_KEYS: dict[str, tuple[str, ...]] = {
    "tracking": ("message_id", "campaign_id", _SEGMENT, "resource_id"),
    "delivery": ("message_id", "campaign_id", _SEGMENT, "resource_id"),
    "import": ("resource_id",),
    "pixel": ("pixel_id", "resource_id"),
}
_DIMENSION_SETS = {category: frozenset(keys) for category, keys in _DIMENSION_KEYS.items()}


def _dimension(event: Event, key: str) -> int | None:
    if key == _SEGMENT:  # 0 means "no segment" in the platform's format
        return event.segment_ids[0] if event.segment_ids else 0
    value: int | None = getattr(event, key)
    return value


class EventPart(msgspec.Struct, gc=False):
    """The part of a message that depends on the event only (the same for every hook).
    UNSET fields are omitted from the JSON."""

    event_type: str
    event_date: str
    account_id: int
    is_test: bool
    event_data: dict[str, Any]
    profile_id: str | UnsetType | None = UNSET
    xxh: str | UnsetType | None = msgspec.field(default=UNSET, name="_xxh")
    md5: str | UnsetType | None = msgspec.field(default=UNSET, name="_md5")
    list_id: int | UnsetType = UNSET
    sends_trying_num: int | UnsetType = UNSET
    is_static: bool | UnsetType = UNSET
    subscription_hash_id: str | UnsetType = UNSET
    subscription: list[Subscription] | UnsetType | None = UNSET


class PartView(msgspec.Struct, gc=False):
    """The message-part fields of a stored event, decoded straight from an intake
    entry (other fields skipped) so that a whole round's parts are encoded in C.

    Encoded, it equals ``encode_part`` for a *plain* event: profile not deleted,
    a UTC (``Z``) date, no ``sends_trying_num`` <= 0 and every dimension of its
    category present in ``event_data`` or not known at all (see ``plain_events``).
    Absent fields decode as UNSET and are left out of the JSON; ``is_test`` and
    ``event_data`` are always written, as in ``EventPart``."""

    event_type: str
    event_date: str
    account_id: int
    is_test: bool = False
    event_data: dict[str, Any] = {}
    profile_id: str | UnsetType = UNSET
    xxh: str | UnsetType = msgspec.field(default=UNSET, name="_xxh")
    md5: str | UnsetType = msgspec.field(default=UNSET, name="_md5")
    list_id: int | UnsetType = UNSET
    sends_trying_num: int | UnsetType = UNSET
    is_static: bool | UnsetType = UNSET
    subscription_hash_id: str | UnsetType = UNSET
    subscription: list[Subscription] | UnsetType = UNSET


class Message(EventPart, gc=False):
    """One hook message: the event part plus what the hook adds."""

    hook_message_id: str = ""
    custom_data: dict[str, Any] | UnsetType | None = UNSET
    content: dict[str, Any] | UnsetType = UNSET


_encoder = msgspec.json.Encoder()


def encode_message(message: Message) -> bytes:
    return _encoder.encode(message)


def http_body(parts: list[bytes]) -> bytes:
    """The HTTP batch body: a JSON array of already-encoded messages."""
    return b"[" + b",".join(parts) + b"]"


def event_digest(event_id: str | None) -> str:
    """24 hex digits of the xxh3-128 hash of the event id: the part of a message id
    shared by every hook (computed once per event). xxh3 is a non-cryptographic hash;
    96 bits keep collisions out of reach for de-duplication, at about a seventh of
    blake2b's cost per id (0.07 against 0.5 µs measured here)."""
    return xxh3_128_hexdigest((event_id or "").encode())[:24]


def event_digests(event_ids: list[str | None]) -> list[str]:
    """``event_digest`` of each id, the loop run by ``map`` in C."""
    ids = event_ids if None not in event_ids else [i or "" for i in event_ids]
    encoded = map(str.encode, ids)  # type: ignore[arg-type]
    return list(map(operator.getitem, map(xxh3_128_hexdigest, encoded), repeat(slice(0, 24))))


def message_id(hook_id: int | None, event_id: str | None) -> str:
    """Stable id of (hook, event), the same on every re-send:
    ``<event_digest(event id)>-<hook id>`` (the digest has a fixed width, so two
    different pairs never give the same id)."""
    return f"{event_digest(event_id)}-{hook_id or 0}"


# stored message content by (account id, send id), as ContentStore.get_many gives it
Content = Mapping[tuple[int, str], dict[str, Any]]


def content_key(event: Event) -> tuple[int, str] | None:
    """(account id, send id) of the stored content a message of ``event`` may carry:
    none without a send id, and none for a deleted profile's event, which comes from
    a historical export, whose messages never carry content (spec a)."""
    if event.send_id is None or event.profile_deleted or event.historical:
        return None
    return event.account_id, event.send_id


class _KeyFields(msgspec.Struct):
    """The fields of an encoded message its routing or record key is made from."""

    event_type: str = ""
    list_id: int | None = None
    profile_id: str | None = None


_key_fields = msgspec.json.Decoder(_KeyFields)


def routing_key(event: Event | _KeyFields) -> str:
    """RabbitMQ routing key ``<list_id>.<event_type>`` (``0`` when the event has no list)."""
    return f"{event.list_id if event.list_id is not None else 0}.{event.event_type}"


def kafka_key(key_choice: str, event: Event | _KeyFields) -> bytes | None:
    """The record key: ``<list_id>.<event_type>``, the message's ``profile_id`` (none
    for a deleted profile's event, whose message carries ``"profile_id": null``), or
    none."""
    if key_choice == "list_event":
        return routing_key(event).encode()
    if key_choice == "profile_id":
        pid = None if getattr(event, "profile_deleted", False) else event.profile_id
        return pid.encode() if pid else None
    return None


def keys_from_parts(hook: Hook, parts: list[bytes]) -> list[str]:
    """The routing keys (RabbitMQ exchange) or record keys (Kafka) of the hook's
    target for encoded messages, read back from them: as ``routing_key`` and
    ``kafka_key`` make them from the events (``""`` for no key)."""
    target = hook.target
    if target.rabbitmq_exchange is None and target.kafka is None:
        return []
    fields = [_key_fields.decode(part) for part in parts]
    if target.kafka is None:
        return list(map(routing_key, fields))
    choice = target.kafka.key
    return [key.decode() if (key := kafka_key(choice, f)) else "" for f in fields]


def for_target(hook: Hook, delivery: Delivery) -> Delivery:
    """``delivery`` as the hook's current target sends it: a batch made for another
    kind of target (the hook's target changed while it waited for a re-send, or it
    was dead-lettered and replayed after the change) gets this kind and the keys
    this target needs, read back from its messages; without them an exchange would
    drop every message as unroutable, and the broker would confirm it. A Kafka batch
    also gets the record keys of the hook's current ``key`` choice, which may have
    changed meanwhile (keys decide the records' partitions, so their order)."""
    kind = hook.target.kind
    if delivery.kind == kind and kind != "kafka":
        return delivery
    keys = keys_from_parts(hook, delivery.parts)
    if delivery.kind == kind and keys == delivery.keys:
        return delivery
    return msgspec.structs.replace(delivery, kind=kind, keys=keys)


def message_date(event: Event, date_ns: int | None = None) -> str:
    """``event_date`` of the message: RFC 3339, UTC, nanosecond fraction."""
    text = event.event_date
    if text.endswith("Z"):
        return text
    return format_rfc3339_nano(date_ns if date_ns is not None else parse_rfc3339_ns(text))


class MessageBuilder:
    """Builds one hook's messages; made once per hook, reused for every batch."""

    def __init__(
        self, hook: Hook, names: NameCatalogue | None = None,
        catalogue: EventCatalogue | None = None,
    ) -> None:
        self.hook = hook
        self.names = NameCatalogue() if names is None else names
        self.catalogue = load_catalogue() if catalogue is None else catalogue
        self.custom_data = CompiledCustomData(hook.custom_data)
        self.send_content = hook.send_content

    def build(self, event: Event, content: Content | None = None,
              ctx: EventContext | None = None) -> Message:
        """The message for ``event``; ``content`` maps (account id, send id) to stored
        content."""
        msg = fill_part(Message, event, self.catalogue)
        msg.hook_message_id = message_id(self.hook.id, event.id)
        custom = self.custom_data.render(ctx or EventContext(event, self.names))
        if custom is not None:
            msg.custom_data = custom
        found = self._content(event, content)
        if found is not None:
            msg.content = found
        return msg

    def _content(self, event: Event, content: Content | None) -> dict[str, Any] | None:
        if self.send_content and content and (key := content_key(event)):
            return content.get(key)
        return None

    def encode(self, events: list[Event], content: Content | None = None,
               ) -> list[bytes]:
        return [_encoder.encode(self.build(e, content)) for e in events]


P = TypeVar("P", bound=EventPart)


def fill_part(cls: type[P], event: Event, catalogue: EventCatalogue) -> P:
    """An EventPart (or Message) with every event-derived field of ``event``."""
    part = cls(event_type=event.event_type, event_date=message_date(event),
               account_id=event.account_id, is_test=event.is_test,
               event_data=event_data_of(event, catalogue))
    if event.list_id is not None:
        part.list_id = event.list_id
    if event.sends_trying_num is not None and event.sends_trying_num > 0:  # spec d: only > 0
        part.sends_trying_num = event.sends_trying_num
    if event.is_static is not None:
        part.is_static = event.is_static
    if event.subscription_hash_id is not None:
        part.subscription_hash_id = event.subscription_hash_id
    if event.profile_deleted:  # historical export of a deleted profile: null, not absent
        part.profile_id = part.xxh = part.md5 = None
        part.subscription = None
        return part
    if event.profile_id is not None:
        part.profile_id = event.profile_id
    if event.xxh is not None:
        part.xxh = event.xxh
    if event.md5 is not None:
        part.md5 = event.md5
    if event.subscription is not None:
        part.subscription = event.subscription
    return part


def encode_part(event: Event, catalogue: EventCatalogue) -> bytes:
    """The encoded part of every message of ``event`` (see ``engine.assembly``)."""
    return _encoder.encode(fill_part(EventPart, event, catalogue))


def dimension_keys(catalogue: EventCatalogue, code: str) -> frozenset[str]:
    """The event_data keys every message of event type ``code`` carries."""
    return _DIMENSION_SETS.get(catalogue.category(code), frozenset())


def event_data_of(event: Event, catalogue: EventCatalogue) -> dict[str, Any]:
    """The message's event_data: the event's, with the category's dimensions filled in."""
    data = event.event_data
    category = catalogue.category(event.event_type)
    if data.keys() >= _DIMENSION_SETS.get(category, frozenset()):  # all given: the usual case
        return data
    keys = _DIMENSION_KEYS[category]
    fill = {k: v for k in keys if k not in data and (v := _dimension(event, k)) is not None}
    return {**data, **fill} if fill else data


def irregular_events(events: list[Event], catalogue: EventCatalogue) -> list[int]:
    """Positions of the events whose ``PartView`` does not encode as their message
    part (a deleted profile, a non-UTC date, ``sends_trying_num`` <= 0, a dimension
    to fill into event_data). The checks run over whole columns in C; only events
    that lack a dimension in event_data are looked at one by one."""
    if not events:
        return []
    out: set[int] = set()
    if any(map(attrgetter("profile_deleted"), events)):
        out.update(i for i, e in enumerate(events) if e.profile_deleted)
    if not all(map(str.endswith, map(attrgetter("event_date"), events), repeat("Z"))):
        out.update(i for i, e in enumerate(events) if not e.event_date.endswith("Z"))
    tries = set(map(attrgetter("sends_trying_num"), events))
    if any(t is not None and t <= 0 for t in tries):
        out.update(i for i, e in enumerate(events)
                   if e.sends_trying_num is not None and e.sends_trying_num <= 0)
    dims_of = {code: dimension_keys(catalogue, code)
               for code in set(map(attrgetter("event_type"), events))}
    # a dimension is filled in only from a value the event has (segment_id always, 0
    # for none): one that no event of the round has is passed over at once
    fillable = {key for key in frozenset().union(*dims_of.values())
                if key == _SEGMENT or any(map(operator.is_not,
                                              map(attrgetter(key), events), repeat(None)))}
    if not fillable:
        return sorted(out)
    dims_of = {code: keys & fillable for code, keys in dims_of.items()}
    dims = list(map(dims_of.__getitem__, map(attrgetter("event_type"), events)))
    have = list(map(operator.le, dims, map(dict.keys, map(attrgetter("event_data"), events))))
    if not all(have):
        out.update(_to_fill(events, dims, have))
    return sorted(out)


def _to_fill(events: list[Event], dims: list[frozenset[str]], have: list[bool]) -> list[int]:
    """Of the events lacking a dimension in event_data (``have`` false), those for
    which ``event_data_of`` would fill one in, checked a key at a time over whole
    columns: a key no lacking event has a value for is passed over at once."""
    lacking = list(compress(range(len(events)), map(operator.not_, have)))
    picked = [events[i] for i in lacking]
    datas = list(map(attrgetter("event_data"), picked))
    out: set[int] = set()
    for key in sorted(frozenset().union(*set(dims))):
        lacks = list(map(operator.not_, map(operator.contains, datas, repeat(key))))
        if not any(lacks):
            continue
        if key == _SEGMENT:  # always filled (0: no segment)
            known: list[bool] | repeat[bool] = repeat(True)
        else:
            values = map(attrgetter(key), picked)
            known = list(map(operator.is_not, values, repeat(None)))
            if not any(known):
                continue
        out.update(lacking[n] for n, (gap, ok) in enumerate(zip(lacks, known, strict=False))
                   if gap and ok and key in dims[lacking[n]])
    return sorted(out)
