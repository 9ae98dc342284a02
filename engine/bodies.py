"""Event bodies (a JSON array or NDJSON) decoded as far as they can be: where msgspec
refuses a whole array for one event's lone surrogate (JSON "\\ud800", which no UTF-8
holds), Python's json reads it, and only that event is bad, named by its field. Used
by the API's ``POST /v1/events`` and by ``Intake.publish`` of a body."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, cast

import msgspec

from engine.catalogue import EventCatalogue
from engine.events import (
    DecodedBatch,
    EventIssue,
    TooManyEvents,
    cap_issues,
    decode_batch,
    one_object,
)
from engine.hooks import not_utf8

_raw_items_decoder = msgspec.json.Decoder(list[msgspec.Raw])
# a surrogate in a str (it holds no character), after backslashes that are escapes of
# their own (one more would make the escape written an escaped backslash and text)
_LONE = re.compile("(?<!\\\\)((?:\\\\\\\\)*)([\ud800-\udfff])")


def decode_body(body: bytes | str, catalogue: EventCatalogue, *,
                max_events: int | None = None, max_issues: int | None = None
                ) -> tuple[DecodedBatch, list[Any] | None]:
    """The body's events (``decode_batch``), and the events as Python read them if it
    had to (a lone surrogate in an array). A body that is no JSON at all keeps its
    issue of index -1; an event refused for a lone surrogate is named by its field.
    ``max_events`` (TooManyEvents) and ``max_issues`` (the other bad events counted in
    ``DecodedBatch.unlisted``): as ``decode_batch`` takes them."""
    limits = {"max_events": max_events, "max_issues": max_issues}
    if isinstance(body, str):
        escaped: bytes | None
        try:
            escaped = body.encode()
        except UnicodeEncodeError:
            escaped = _escaped_surrogates(body)
        if escaped is None:  # one after an escaping backslash: no JSON at all
            lenient = _decode_leniently(body, catalogue, **limits)
            if lenient is not None:
                return lenient
            reason = f"the body is {not_utf8(body)}"
            return DecodedBatch([], [], [EventIssue(-1, "$", reason)]), None
        raw = escaped
    else:
        raw = body
    batch = decode_batch(raw, catalogue, **limits)
    if batch.issues and batch.issues[0].index < 0:
        lenient = _decode_leniently(raw, catalogue, **limits)
        return (batch, None) if lenient is None else lenient
    if any(i.field == "$" for i in batch.issues):  # msgspec: "truncated" and the like
        batch = _named_surrogates(raw, batch)  # NDJSON lines: which field, not a byte
    return batch, None


def _escaped_surrogates(body: str) -> bytes | None:
    """``body`` with each lone surrogate itself in it (not escaped) written as JSON's
    escape of it, which says the same in a string, so that only its event is bad, in
    NDJSON too (the whole body was refused); None when one follows an escaping
    backslash (no JSON then)."""
    try:
        return _LONE.sub(lambda m: f"{m[1]}\\u{ord(m[2]):04x}", body).encode()
    except UnicodeEncodeError:
        return None


def split_items(body: bytes) -> list[Any]:
    """The body's events, each as its JSON text, split as ``decode_batch`` splits them
    (none when an array cannot be split)."""
    stripped = body.strip()
    try:
        if stripped[:1] == b"[":
            return list(_raw_items_decoder.decode(stripped))
        if one_object(stripped):  # one event over many lines
            return [stripped]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        if stripped[:1] == b"[":
            return []
    return [line for line in body.split(b"\n") if line.strip()]




def _decode_leniently(body: bytes | str, catalogue: EventCatalogue, *,
                      max_events: int | None = None, max_issues: int | None = None
                      ) -> tuple[DecodedBatch, list[Any]] | None:
    """A JSON array refused as a whole for a lone surrogate (JSON "\\ud800", no UTF-8)
    in some event's strings, decoded event by event: those events are bad (index,
    field and reason), the others as ``decode_batch`` finds them. With the events as
    read; None when the body is refused for anything else. Bytes that are not UTF-8
    (0xff, say) in another event's strings make that one bad too. ``max_events`` and
    ``max_issues``: as ``decode_batch`` takes them."""
    read = _read_json(body)
    if read is None:
        return None
    items, escaped = read
    if isinstance(items, dict):  # one event over several lines
        items = [items]
    if not isinstance(items, list):
        return None
    if max_events is not None and len(items) > max_events:
        raise TooManyEvents(max_events)
    issues: list[EventIssue] = []
    kept: list[int] = []
    texts: list[str] = []
    unlisted: list[int] = []
    room = len(items) if max_issues is None else max_issues
    for index, item in enumerate(items):
        try:
            text, where = _lenient_item(item, escaped)
        except RecursionError:
            return None
        if where is None:
            texts.append(text)
            kept.append(index)
        elif len(issues) < room:
            issues.append(EventIssue(index, *where))
        else:
            unlisted.append(index)
    if not issues and not unlisted:
        return None
    try:
        rest = decode_batch(f"[{','.join(texts)}]".encode(), catalogue, max_issues=max_issues)
    except (ValueError, RecursionError):
        return None
    if rest.issues and rest.issues[0].index < 0:  # refused for another reason too
        return None
    issues += [EventIssue(kept[i.index], i.field, i.reason) for i in rest.issues]
    issues, unlisted = cap_issues(issues, unlisted + [kept[i] for i in rest.unlisted],
                                  max_issues)
    return DecodedBatch(rest.events, [kept[i] for i in rest.indices], issues, unlisted), items


def _lenient_item(item: Any, escaped: bool) -> tuple[str, tuple[str, str] | None]:
    """An event as Python's json read it: its JSON text, or (field, reason) of why it
    is bad: a string that is not valid UTF-8, or a number JSON cannot hold (1e400 is
    read as inf: bad, as msgspec says). RecursionError when it is nested too deeply."""
    where = (escaped and invalid_bytes(item)) or lone_surrogate(item)
    if where is not None:
        return "", where
    try:
        return json.dumps(item, allow_nan=False), None
    except ValueError:
        return "", _first_bad(item, _out_of_range) or ("$", "Number out of range")


def _read_json(body: bytes | str) -> tuple[Any, bool] | None:
    """``body`` as Python's json reads it, and whether bytes in it that are not UTF-8
    were read as U+DC80-U+DCFF (errors="surrogateescape"); None when it is no JSON."""
    try:  # NaN and Infinity are no JSON: the body is refused whole, as msgspec does
        return json.loads(body, parse_constant=_no_constant), False
    except UnicodeDecodeError:  # only raised for bytes
        text = cast(bytes, body).decode("utf-8", "surrogateescape")
    except (ValueError, RecursionError):
        return None
    try:
        return json.loads(text, parse_constant=_no_constant), True
    except (ValueError, RecursionError):
        return None


def _named_surrogates(body: bytes, batch: DecodedBatch) -> DecodedBatch:
    """``batch`` with each issue of an event refused for a lone surrogate, or for bytes
    that are not UTF-8 (0xff, an overlong or truncated sequence), naming the field
    that holds it rather than a byte offset."""
    items = split_items(body)
    issues = []
    for issue in batch.issues:
        if issue.field == "$" and issue.index < len(items):
            item = bytes(items[issue.index])
            try:
                try:
                    where = lone_surrogate(json.loads(item))
                except UnicodeDecodeError:  # bytes that are not UTF-8: each read as a
                    # surrogate U+DC80-U+DCFF (surrogateescape), then found
                    where = invalid_bytes(json.loads(item.decode("utf-8",
                                                                 "surrogateescape")))
            except (ValueError, RecursionError):
                where = None
            if where is not None:
                issue = EventIssue(issue.index, *where)
        issues.append(issue)
    return DecodedBatch(batch.events, batch.indices, issues, batch.unlisted)


_ESCAPED = re.compile("[\udc80-\udcff]+")  # bytes read with errors="surrogateescape"


def _escaped_bytes(text: Any) -> str | None:
    if not isinstance(text, str) or (m := _ESCAPED.search(text)) is None:
        return None
    raw = m.group().encode("utf-8", "surrogateescape")
    shown = " ".join(f"0x{b:02x}" for b in raw[:8]) + (" …" if len(raw) > 8 else "")
    return f"not valid UTF-8: the byte{'s' if len(raw) > 1 else ''} {shown} at character " \
           f"{m.start()}"


def invalid_bytes(value: Any) -> tuple[str, str] | None:
    """(field, reason) of the first string (or key) of ``value``, JSON read from bytes
    with errors="surrogateescape", that holds bytes that are not UTF-8 (0xff, an
    overlong or truncated sequence), or None. (A JSON escape "\\udcff" reads the same
    as the byte 0xff: both make the event bad.)"""
    return _first_bad(value, _escaped_bytes, _escaped_bytes)




def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _out_of_range(item: Any) -> str | None:
    return "Number out of range" if isinstance(item, float) and not math.isfinite(item) \
        else None


def lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(field, reason) of the first string (or key) of ``value`` that is not valid
    UTF-8."""
    return _first_bad(value, lambda item: not_utf8(item) if isinstance(item, str) else None,
                      not_utf8)


def _first_bad(value: Any, leaf: Callable[[Any], str | None],
               key: Callable[[Any], str | None] = lambda _: None) -> tuple[str, str] | None:
    """(field, reason) of the first value of ``value`` that ``leaf`` finds a reason
    against, or the first key ``key`` does; walked without recursion."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            for name, sub in reversed(item.items()):
                if problem := key(name):
                    return path or "$", f"a key is {problem}"
                stack.append((sub, f"{path}.{name}" if path else str(name)))
        elif isinstance(item, list):
            stack += [(sub, f"{path}[{n}]") for n, sub in reversed(list(enumerate(item)))]
        elif problem := leaf(item):
            return path or "$", problem
    return None
