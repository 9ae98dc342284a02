"""custom_data rendering (spec section g).

A hook's custom_data set is compiled once (``CompiledCustomData``): each template
value becomes a list of literal strings and parameter getters, so rendering an
event is a few joins, not a parse.

Result, for one event (later sources win on a key clash):

1. profile fields named by the hook (``null`` for a deleted profile; left out
   when the profile lacks them);
2. the custom_data brought by the triggering request when there is one,
   otherwise the hook's ``template`` rendered;
3. the hook's ``pairs`` rendered.

Parameters: ``{{uuid}}`` (a fresh UUIDv4 per message), five ``event_date`` forms
and seven names from the ``NameCatalogue``. Unknown ``{{parameters}}`` are kept
as written.

Date forms follow the Go layouts the platform documents:

* ``{{event_date}}`` — ``2006-01-25T15:04:05.999999Z``: UTC, microseconds, trailing
  zeros of the fraction trimmed (and the dot dropped when the fraction is zero),
  as Go's ``.999999`` layout does;
* ``{{event_date_ymd}}`` — ``2006-01-25``;
* ``{{event_date_rfc3339}}`` — Go's ``time.RFC3339`` in UTC: ``2006-01-25T15:04:05Z``;
* ``{{event_date_unix}}`` — unix seconds; ``{{event_date_unixnano}}`` — unix nanoseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from os import urandom
from typing import Any

from engine.events import NS, Event, parse_rfc3339_ns, shown_segment
from engine.hooks import PARAMETER, PARAMETER_NAMES, CustomData
from engine.names import NameCatalogue


class EventContext:
    """Per-event values shared by every hook rendering the same event."""

    __slots__ = ("_ns", "event", "names")

    def __init__(self, event: Event, names: NameCatalogue, date_ns: int | None = None) -> None:
        self.event = event
        self.names = names
        self._ns = date_ns

    @property
    def ns(self) -> int:
        if self._ns is None:
            self._ns = parse_rfc3339_ns(self.event.event_date)
        return self._ns

    def name(self, kind: str, obj_id: int | None, field: str = "name") -> str:
        return self.names.get(self.event.account_id, kind, obj_id, field)


def _secs(ctx: EventContext) -> int:
    return ctx.ns // NS


# not strftime("%Y"): glibc does not zero-pad years below 1000, Go's "2006" layout does
@lru_cache(maxsize=4096)
def day_text(day: int) -> str:
    t = time.gmtime(day * 86_400)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


def _ymd(secs: int) -> str:
    return day_text(secs // 86_400)


def ymd_hms(secs: int) -> str:
    rest = secs % 86_400
    return f"{day_text(secs // 86_400)}T{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"


_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def _uuid4() -> str:
    """A random (version 4) UUID as text, from the system's random source (as
    uuid.uuid4: Python's own generator can be predicted from enough of its output,
    and a partition makes them for every account it serves); cheaper than
    str(uuid.uuid4())."""
    h = f"{(int.from_bytes(urandom(16)) & _V4_CLEAR) | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_event_date(ns: int) -> str:
    """``2006-01-25T15:04:05.999999Z`` (Go layout: fraction trimmed of trailing zeros)."""
    micros = (ns % NS) // 1000
    base = ymd_hms(ns // NS)
    return f"{base}.{micros:06d}".rstrip("0").rstrip(".") + "Z"


def format_rfc3339_nano(ns: int) -> str:
    """Go's RFC3339Nano in UTC: the form of a message's ``event_date``."""
    frac = ns % NS
    base = ymd_hms(ns // NS)
    return f"{base}.{frac:09d}".rstrip("0").rstrip(".") + "Z"


def _segment(ctx: EventContext) -> int | None:
    return shown_segment(ctx.event)


PARAMETERS: dict[str, Callable[[EventContext], str]] = {
    "uuid": lambda ctx: _uuid4(),
    "event_date": lambda ctx: format_event_date(ctx.ns),
    "event_date_ymd": lambda ctx: _ymd(_secs(ctx)),
    "event_date_rfc3339": lambda ctx: ymd_hms(_secs(ctx)) + "Z",
    "event_date_unix": lambda ctx: str(_secs(ctx)),
    "event_date_unixnano": lambda ctx: str(ctx.ns),
    "campaign_name": lambda ctx: ctx.name("campaigns", ctx.event.campaign_id),
    "campaign_subid": lambda ctx: ctx.name("campaigns", ctx.event.campaign_id, "subid"),
    "database_name": lambda ctx: ctx.name("databases", ctx.event.list_id),
    "segment_name": lambda ctx: ctx.name("segments", _segment(ctx)),
    "message_name": lambda ctx: ctx.name("templates", ctx.event.message_id),
    "message_subject": lambda ctx: ctx.name("templates", ctx.event.message_id, "subject"),
    "resource_name": lambda ctx: ctx.name("resources", ctx.event.resource_id),
}
if set(PARAMETERS) != PARAMETER_NAMES:  # the hooks' limit counts these (engine.hooks)
    raise RuntimeError("engine.hooks.PARAMETER_NAMES differs from customdata.PARAMETERS")

Part = str | Callable[[EventContext], str]


def compile_value(template: str) -> list[Part]:
    """Split a template value into literals and getters; unknown parameters stay literal."""
    parts: list[Part] = []
    pos = 0
    for m in PARAMETER.finditer(template):
        getter = PARAMETERS.get(m.group(1))
        if getter is None:
            continue
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        parts.append(getter)
        pos = m.end()
    if pos < len(template) or not parts:
        parts.append(template[pos:])
    return parts


def render_value(parts: list[Part], ctx: EventContext) -> str:
    """One compiled template value (``compile_value``) for an event."""
    if len(parts) == 1:
        part = parts[0]
        return part if isinstance(part, str) else part(ctx)
    return "".join(p if isinstance(p, str) else p(ctx) for p in parts)


class CompiledCustomData:
    """A hook's custom_data set, compiled once; ``render`` runs per message."""

    __slots__ = ("empty", "fields", "pairs", "template")

    def __init__(self, spec: CustomData) -> None:
        self.fields = tuple(spec.fields)
        self.template = [(k, compile_value(v)) for k, v in spec.template.items()]
        self.pairs = [(k, compile_value(v)) for k, v in spec.pairs.items()]
        self.empty = not (self.fields or self.template or self.pairs)

    def render(self, ctx: EventContext) -> dict[str, Any] | None:
        """The message's custom_data, or None when there is nothing to send."""
        event = ctx.event
        if self.empty and event.custom_data is None:
            return None
        out: dict[str, Any] = {}
        if self.fields:
            self._profile_fields(event, out)
        if event.custom_data is not None:
            out.update(event.custom_data)
        else:
            for key, parts in self.template:
                out[key] = render_value(parts, ctx)
        for key, parts in self.pairs:
            out[key] = render_value(parts, ctx)
        return out

    def _profile_fields(self, event: Event, out: dict[str, Any]) -> None:
        if event.profile_deleted:
            out.update(dict.fromkeys(self.fields))
            return
        profile = event.profile
        if profile:
            for name in self.fields:
                if name in profile:
                    out[name] = profile[name]
