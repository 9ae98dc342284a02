"""Messages of a read round, assembled by columns: the hot path of a partition.

``MessageBuilder.build`` makes one message at a time and is the reference (tests,
test events). A partition instead turns a whole round — every event of a few
stream entries, every hook that matched some of them — into encoded messages
with almost no Python work per message:

* ``Round`` holds what depends on the event only, computed once per event on
  first use and shared by every hook that matched it: the encoded event part
  (without its opening brace), the message-id head, the routing key, and the
  JSON of each custom_data value that does not change per message. Event parts
  and ids are made for the whole round at once, by ``map`` over the part views
  the stream entry is decoded into (``messages.PartView``); only irregular
  events (``messages.irregular_events``) are encoded one by one;
* ``Assembler`` (one per hook, made once) knows the constant bytes between those
  columns, so a message is one ``bytes.join`` over a ``zip`` of columns, run by
  ``map`` in C.

A message is ``{"hook_message_id":"…","custom_data":{…},"content":{…},<event
part>}``: the same keys and values as ``encode_message(build(event))``, hook keys
first. custom_data values fall back to the reference renderer where a key clash
or the request's own custom_data makes the plain columns wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import attrgetter, getitem, itemgetter
from typing import Any

import msgspec
import numpy as np
from xxhash import xxh3_128_hexdigest

from engine.catalogue import EventCatalogue
from engine.customdata import (
    PARAMETERS,
    CompiledCustomData,
    EventContext,
    Part,
    day_text,
    format_event_date,
    render_value,
    ymd_hms,
)
from engine.events import NS, Event, parse_rfc3339_ns
from engine.hooks import Hook
from engine.messages import (
    MessageBuilder,
    PartView,
    encode_part,
    event_digest,
    irregular_events,
    routing_key,
)
from engine.names import NameCatalogue

_encode = msgspec.json.Encoder().encode
_HEAD = b'{"hook_message_id":"'
_UUID = PARAMETERS["uuid"]


def _segment_input(event: Event) -> Any:
    return event.account_id, event.segment_ids[0] if event.segment_ids else None


# what each parameter's value depends on: equal inputs, equal values
_DATE_INPUT = attrgetter("event_date")
_INPUTS: dict[Any, Callable[[Event], Any]] = {
    PARAMETERS["campaign_name"]: attrgetter("account_id", "campaign_id"),
    PARAMETERS["campaign_subid"]: attrgetter("account_id", "campaign_id"),
    PARAMETERS["database_name"]: attrgetter("account_id", "list_id"),
    PARAMETERS["segment_name"]: _segment_input,
    PARAMETERS["message_name"]: attrgetter("account_id", "message_id"),
    PARAMETERS["message_subject"]: attrgetter("account_id", "message_id"),
    PARAMETERS["resource_name"]: attrgetter("account_id", "resource_id"),
    **{PARAMETERS[p]: _DATE_INPUT for p in PARAMETERS if p.startswith("event_date")},
}
# the date parameters as functions of the event's unix nanoseconds
_DATE_FORMS: dict[Any, Callable[[int], str]] = {
    PARAMETERS["event_date"]: format_event_date,
    PARAMETERS["event_date_ymd"]: lambda ns: day_text(ns // NS // 86_400),
    PARAMETERS["event_date_rfc3339"]: lambda ns: ymd_hms(ns // NS) + "Z",
    PARAMETERS["event_date_unix"]: lambda ns: str(ns // NS),
    PARAMETERS["event_date_unixnano"]: str,
}


def gather(values: Sequence[Any], idx: list[int]) -> tuple[Any, ...]:
    """``values`` at positions ``idx``, gathered in C."""
    if len(idx) == 1:
        return (values[idx[0]],)
    return itemgetter(*idx)(values) if idx else ()


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
# where each of a UUID's 32 hex digits goes in '"xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx"'
_UUID_SLOTS = np.array([i + 1 + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20)
                        for i in range(32)])
_UUID_FRAME = np.frombuffer(b'"00000000-0000-0000-0000-000000000000"', np.uint8)


def uuid_json_many(n: int) -> list[bytes]:
    """``n`` random version-4 UUIDs, each as a JSON string (quotes included)."""
    if n == 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = np.empty((n, 32), np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 0x0F]
    out = np.tile(_UUID_FRAME, (n, 1))
    out[:, _UUID_SLOTS] = digits
    blob = out.tobytes()
    width = len(_UUID_FRAME)
    return [blob[i:i + width] for i in range(0, n * width, width)]


class Round:
    """Per-event values of one read round, each computed on first use."""

    def __init__(self, events: list[Event], catalogue: EventCatalogue,
                 names: NameCatalogue, content: Mapping[str, dict[str, Any]],
                 views: list[PartView] | None = None) -> None:
        self.events = events
        self.views = views if views is not None and len(views) == len(events) else None
        self.catalogue = catalogue
        self.names = names
        self.content = content
        n = len(events)
        self.tails: list[bytes | None] = [None] * n
        self.heads: list[bytes | None] = [None] * n  # b'{"hook_message_id":"<digest>'
        self.digests: list[str | None] = [None] * n
        self._all_rkeys: list[str] | None = None
        self._ctx: list[EventContext | None] = [None] * n
        self._values: dict[Any, list[bytes | None]] = {}
        self._fields: dict[tuple[tuple[str, ...], bool], list[bytes | None]] = {}
        self._content: list[bytes | None] = [None] * n
        self._rkey_cache: dict[tuple[int | None, str], str] = {}
        self._irregular: set[int] | None = None
        self._bulk_done = False
        self._memo: dict[Any, dict[Any, bytes]] = {}
        self.request_custom = {i for i, e in enumerate(events) if e.custom_data is not None}

    def irregular(self) -> set[int]:
        """Events whose ``PartView`` is not their message part (``irregular_events``)."""
        if self._irregular is None:
            self._irregular = set(irregular_events(self.events, self.catalogue))
        return self._irregular

    def _prepare_all(self, views: list[PartView]) -> None:
        """Every event's part and message-id head at once, by ``map`` over the round's
        ``PartView``s; the irregular events are left to ``prepare``'s general path."""
        self._bulk_done = True
        tails = list(map(getitem, map(_encode, views), repeat(slice(1, None))))
        ids = list(map(attrgetter("id"), self.events))
        if None in ids:
            ids = [i or "" for i in ids]
        digests = list(map(getitem, map(xxh3_128_hexdigest, map(str.encode, ids)),
                           repeat(slice(0, 24))))
        heads = list(map(_HEAD.__add__, map(str.encode, digests)))  # type: ignore[arg-type]
        for i in self.irregular():
            tails[i] = None  # type: ignore[call-overload]
        self.tails, self.digests, self.heads = tails, digests, heads  # type: ignore[assignment]

    def prepare(self, idx: list[int]) -> None:
        """Event parts (without their opening brace) and message-id heads of ``idx``:
        for most of the round at once when it has part views, else event by event
        (from the view when the event is regular, by ``encode_part`` when not)."""
        views = self.views
        if views is not None and not self._bulk_done and 2 * len(idx) >= len(self.events):
            self._prepare_all(views)
        tails, heads, digests = self.tails, self.heads, self.digests
        irregular = self.irregular() if views is not None else set()
        for i in idx:
            if tails[i] is not None:
                continue
            e = self.events[i]
            if views is not None and i not in irregular:
                tails[i] = _encode(views[i])[1:]
            else:
                tails[i] = encode_part(e, self.catalogue)[1:]
            digest = digests[i] = event_digest(e.id)
            heads[i] = _HEAD + digest.encode()

    def routing_keys(self, idx: list[int]) -> tuple[str, ...]:
        """``<list_id>.<event_type>`` of the events ``idx`` (made for the whole round
        on first use: one string per distinct pair)."""
        if self._all_rkeys is None:
            events, cache = self.events, self._rkey_cache
            pairs = list(zip(map(attrgetter("list_id"), events),
                             map(attrgetter("event_type"), events), strict=True))
            for pair, event in dict(zip(pairs, events, strict=True)).items():
                if pair not in cache:
                    cache[pair] = routing_key(event)
            self._all_rkeys = list(map(cache.__getitem__, pairs))
        return gather(self._all_rkeys, idx)

    def kafka_keys(self, idx: list[int], choice: str) -> list[str] | tuple[str, ...]:
        if choice == "list_event":
            return self.routing_keys(idx)
        if choice == "profile_id":
            return [self.events[i].profile_id or "" for i in idx]
        return [""] * len(idx)

    def context(self, i: int) -> EventContext:
        ctx = self._ctx[i]
        if ctx is None:
            ctx = self._ctx[i] = EventContext(self.events[i], self.names)
        return ctx

    def values(self, parts: list[Part], idx: list[int]) -> tuple[bytes, ...] | list[bytes]:
        """JSON of a custom_data value for the events ``idx``; per event when the value
        has no ``{{uuid}}`` (shared by every hook with the same template)."""
        if parts == [_UUID]:
            return uuid_json_many(len(idx))
        if _UUID in parts:
            return [_encode(render_value(parts, self.context(i))) for i in idx]
        key = tuple(parts)
        col = self._values.get(key)
        if col is None:
            col = self._values[key] = [None] * len(self.events)
        missing = [i for i in idx if col[i] is None]
        date_form = _DATE_FORMS.get(parts[0]) if len(parts) == 1 else None
        if missing and date_form is not None:  # ASCII digits and signs: no escaping
            events = self.events
            for i in missing:
                col[i] = b'"%s"' % date_form(parse_rfc3339_ns(events[i].event_date)).encode()
        elif missing:
            inputs = _INPUTS.get(parts[0]) if len(parts) == 1 else None
            if inputs is None:
                for i in missing:
                    col[i] = _encode(render_value(parts, self.context(i)))
            else:  # one parameter: rendered once per distinct input (a name's id, a date)
                memo = self._memo.setdefault(key, {})
                events = self.events
                for i in missing:
                    arg = inputs(events[i])
                    value = memo.get(arg)
                    if value is None:
                        value = memo[arg] = _encode(render_value(parts, self.context(i)))
                    col[i] = value
        return gather(col, idx)

    def profile_fields(self, fields: tuple[str, ...], more: bool, idx: list[int]
                       ) -> tuple[bytes, ...]:
        """Per event: the profile fields' JSON members, each followed by a comma when
        ``more`` members follow (spec g: null for a deleted profile; a field the
        profile lacks is left out)."""
        col = self._fields.get((fields, more))
        if col is None:
            col = self._fields[(fields, more)] = [None] * len(self.events)
        keys = [_encode(f) + b":" for f in fields]
        for i in idx:
            if col[i] is None:
                event = self.events[i]
                if event.profile_deleted:
                    members = [k + b"null" for k in keys]
                else:
                    profile = event.profile or {}
                    members = [k + _encode(profile[f]) for k, f in zip(keys, fields, strict=True)
                               if f in profile]
                text = b",".join(members)
                col[i] = text + b"," if more and members else text
        return gather(col, idx)

    def contents(self, idx: list[int]) -> tuple[bytes, ...]:
        """Per event: ``"content":{…},`` when its content is stored, else nothing."""
        col, events, content = self._content, self.events, self.content
        for i in idx:
            if col[i] is None:
                send_id = events[i].send_id
                found = content.get(send_id) if send_id else None
                col[i] = b'"content":' + _encode(found) + b"," if found is not None else b""
        return gather(col, idx)


class Assembler:
    """One hook's message layout; ``assemble`` encodes its messages for a round."""

    def __init__(self, hook: Hook, names: NameCatalogue, catalogue: EventCatalogue) -> None:
        self.hook = hook
        self.builder = MessageBuilder(hook, names, catalogue)  # the reference, for fallbacks
        self.suffix = f"-{hook.id or 0}"
        self.send_content = hook.send_content
        cd: CompiledCustomData = self.builder.custom_data
        self.custom = cd
        items = [(k, p) for k, p in cd.template] + list(cd.pairs)
        keys = [k for k, _ in items]
        # a key given twice (profile field, template, pairs): later sources win in the
        # reference; the columns cannot express that, so such hooks render per message
        self.clash = len(set(keys) | set(cd.fields)) != len(keys) + len(cd.fields)
        self.items = items  # the template's, then the pairs' (no request custom_data)
        self.opener = f'{self.suffix}","custom_data":{{'.encode()
        self.seps = [(b"" if n == 0 else b",") + _encode(k) + b":" for n, k in enumerate(keys)]

    @property
    def names(self) -> NameCatalogue:
        return self.builder.names

    @names.setter
    def names(self, value: NameCatalogue) -> None:
        self.builder.names = value

    def assemble(self, rnd: Round, idx: list[int]) -> tuple[list[bytes], list[str]]:
        """(encoded messages, message ids) of the events ``idx`` for this hook."""
        rnd.prepare(idx)
        suffix = self.suffix
        mids = list(map(str.__add__, gather(rnd.digests, idx), repeat(suffix)))
        heads = gather(rnd.heads, idx)
        tails = gather(rnd.tails, idx)
        columns: list[Any] = [heads]
        cd = self.custom
        slow: list[int] = []
        if cd.empty:
            columns.append(repeat(suffix.encode() + b'",'))
            slow = [j for j, i in enumerate(idx) if i in rnd.request_custom] \
                if rnd.request_custom else []
        else:
            columns += self._custom_columns(rnd, idx)
            if self.clash:
                slow = list(range(len(idx)))
            elif rnd.request_custom:
                slow = [j for j, i in enumerate(idx) if i in rnd.request_custom]
        if self.send_content:
            columns.append(rnd.contents(idx))
        columns.append(tails)
        messages = list(map(b"".join, zip(*columns, strict=False)))  # repeat() is endless
        for j in slow:  # the reference renderer, for what the columns cannot express
            messages[j] = self._one(rnd, idx[j], mids[j], tails[j])
        return messages, mids

    def _custom_columns(self, rnd: Round, idx: list[int]) -> list[Any]:
        cd = self.custom
        columns: list[Any] = [repeat(self.opener)]
        if cd.fields:
            columns.append(rnd.profile_fields(cd.fields, bool(self.items), idx))
        for sep, (_, parts) in zip(self.seps, self.items, strict=True):
            columns.append(repeat(sep))
            columns.append(rnd.values(parts, idx))
        columns.append(repeat(b"},"))
        return columns

    def _one(self, rnd: Round, i: int, mid: str, tail: bytes) -> bytes:
        out = [_HEAD, mid.encode(), b'"']
        custom = self.custom.render(rnd.context(i))
        if custom is not None:
            out += (b',"custom_data":', _encode(custom))
        if self.send_content:
            content = rnd.contents([i])[0]
            if content:
                out += (b",", content[:-1])
        out += (b",", tail)
        return b"".join(out)

