"""The partition's column-wise assembly gives the reference messages (``build``)."""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

import msgspec
import numpy as np
import pytest

from bench.workload import CUSTOM_PAIRS, make_events, make_names
from engine.assembly import (
    _DATE_FORMS,
    Assembler,
    Round,
    date_texts,
    dates_ns,
    uuid_json_many,
    warm,
)
from engine.catalogue import load_catalogue
from engine.events import Event, parse_rfc3339_ns
from engine.hooks import parse_hook
from engine.intake import decode_entry, decode_views, encode_entry
from engine.keys import INTAKE_FIELD
from engine.matching import EventColumns
from engine.messages import (
    MessageBuilder,
    PartView,
    encode_message,
    encode_part,
    irregular_events,
    message_id,
    routing_key,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _hook(hook_id: int = 5, **extra: Any) -> Any:
    return parse_hook({"id": hook_id, "name": "h", "account_id": 1, "actions": ["click"],
                       "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}, **extra})


HOOKS = {
    "plain": _hook(),
    "content and mixed values": _hook(send_content=True, custom_data={
        "fields": ["email", "missing"],
        "pairs": {"c": "{{campaign_name}} {{event_date}}", "lit": "x\"y", "q": "{{uuid}}-z"}}),
    "template": _hook(custom_data={"template": {"t": "{{database_name}}"}}),
    "fields only": _hook(custom_data={"fields": ["email", "first_name"]}),
    "every parameter": _hook(custom_data={"fields": ["email"], "pairs": {
        **CUSTOM_PAIRS, "sub": "{{campaign_subid}}", "seg": "{{segment_name}}",
        "tpl": "{{message_name}}", "subj": "{{message_subject}}", "res": "{{resource_name}}",
        "rfc": "{{event_date_rfc3339}}", "nano": "{{event_date_unixnano}}"}}),
    "key clash": _hook(custom_data={"fields": ["email"], "template": {"email": "t"},
                                    "pairs": {"email": "{{database_name}}"}}),
}


def _events() -> list[Event]:
    events = make_events(400)
    events[0].profile_deleted = True
    events[1].custom_data = {"from": "request"}
    events[2].event_date = "2026-03-04T15:13:19.034315796+02:00"  # not UTC: normalized
    events[3].event_data = {}  # dimensions come from the top-level fields
    events[3].campaign_id, events[3].message_id, events[3].resource_id = 9, 3, 2
    events[4].sends_trying_num = 0  # only > 0 is sent
    events[5].sends_trying_num = 2
    events[6].is_static = False
    events[7].profile = None
    events[8].event_data = {k: v for k, v in events[8].event_data.items() if k != "segment_id"}
    events[8].segment_ids = [4]  # segment_id filled in from the top-level field
    events[9].event_data = {k: v for k, v in events[9].event_data.items() if k != "segment_id"}
    events[9].segment_ids = None  # filled in as 0: no segment
    # several segments, event_data showing the second: {{segment_name}} names that one
    events[10].segment_ids = [4, events[10].event_data.get("segment_id") or 5]
    events[10].event_data = {**events[10].event_data, "segment_id": events[10].segment_ids[1]}
    return events


def _stored(events: list[Event]) -> tuple[list[Event], list[PartView] | None]:
    """The events as a partition reads them back: decoded from an intake entry,
    with their part views."""
    fields = {INTAKE_FIELD: encode_entry(events)}
    return decode_entry(fields), decode_views(fields)


def _without_uuids(message: dict[str, Any]) -> dict[str, Any]:
    custom = message.get("custom_data")
    if isinstance(custom, dict):
        for key in ("id", "q"):
            if key in custom:
                value = custom[key]
                assert UUID.match(value.removesuffix("-z")), value
                custom[key] = "<uuid>"
    return message


@pytest.mark.parametrize("stored", [False, True], ids=["events", "read back with views"])
@pytest.mark.parametrize("name", list(HOOKS))
def test_assembled_messages_equal_the_reference(name: str, stored: bool) -> None:
    hook = HOOKS[name]
    catalogue, names = load_catalogue(), make_names()
    for account in range(1, 6):  # named: {{segment_name}} compared, not empty on both
        for segment in range(1, 21):
            names.upsert(account, "segments", segment, name=f"Segment {segment}")
    events, views = _stored(_events()) if stored else (_events(), None)
    assert stored == (views is not None)
    content = {(e.account_id, e.send_id): {"subject": f"s{i}"}
               for i, e in enumerate(events[:100]) if e.send_id}
    rnd = Round(events, catalogue, names, content, views)
    assembler = Assembler(hook, names, catalogue)
    reference = MessageBuilder(hook, names, catalogue)
    idx = list(range(0, len(events), 3)) + list(range(1, len(events), 3))
    messages, mids = assembler.assemble(rnd, idx)
    assert len(messages) == len(mids) == len(idx)
    for i, raw, mid in zip(idx, messages, mids, strict=True):
        got = json.loads(raw)
        want = json.loads(encode_message(reference.build(events[i], content)))
        assert _without_uuids(got) == _without_uuids(want), (name, i)
        assert mid == got["hook_message_id"] == message_id(hook.id, events[i].id)


@pytest.mark.parametrize("stored", [False, True], ids=["events", "read back with views"])
def test_a_warmed_round_gives_every_hook_the_reference_messages(stored: bool) -> None:
    """``warm`` makes the parts and the shared custom_data columns of all the hooks'
    events at once; each hook's messages, over its own overlapping piece of the round,
    are still the reference's, and what ``warm`` made is what they use."""
    catalogue, names = load_catalogue(), make_names()
    events, views = _stored(_events()) if stored else (_events(), None)
    content = {(e.account_id, e.send_id): {"subject": f"s{i}"}
               for i, e in enumerate(events[:100]) if e.send_id}
    rnd = Round(events, catalogue, names, content, views)
    hooks = [*HOOKS.values(), _hook(hook_id=6, custom_data={"fields": ["email"]}),
             _hook(hook_id=7, custom_data={"pairs": {"c": "{{campaign_name}} {{event_date}}"}}),
             _hook(hook_id=8, custom_data={"fields": ["email"]})]
    rng = random.Random(3)
    work = [(Assembler(hook, names, catalogue),
             np.array(sorted(rng.sample(range(len(events)), 150)), dtype=np.int64))
            for hook in hooks]
    warm(rnd, work)
    union = sorted(set().union(*(idx.tolist() for _, idx in work)))
    assert all(rnd.tails[i] is not None for i in union)
    assert all(rnd.tails[i] is None for i in set(range(len(events))) - set(union))
    shared = rnd._fields[(("email",), False)]  # hooks 6 and 8, made for both at once
    assert all(shared[i] is not None for i in {*work[-3][1].tolist(), *work[-1][1].tolist()})
    for (assembler, idx), hook in zip(work, hooks, strict=True):
        reference = MessageBuilder(hook, names, catalogue)
        messages, _ = assembler.assemble(rnd, idx.tolist())
        for i, raw in zip(idx.tolist(), messages, strict=True):
            want = json.loads(encode_message(reference.build(events[i], content)))
            assert _without_uuids(json.loads(raw)) == _without_uuids(want), (hook.id, i)


def test_two_hooks_share_the_round_and_get_their_own_ids() -> None:
    catalogue, names = load_catalogue(), make_names()
    events = make_events(50)
    rnd = Round(events, catalogue, names, {})
    first, _ = Assembler(HOOKS["plain"], names, catalogue).assemble(rnd, list(range(50)))
    other = _hook(hook_id=77)
    second, mids = Assembler(other, names, catalogue).assemble(rnd, list(range(50)))
    for a, b, event in zip(first, second, events, strict=True):
        da, db = json.loads(a), json.loads(b)
        assert da.pop("hook_message_id") != db.pop("hook_message_id")
        assert da == db
        assert db["event_type"] == event.event_type
    assert mids == [message_id(77, e.id) for e in events]


def test_routing_and_kafka_keys() -> None:
    catalogue, names = load_catalogue(), make_names()
    events = make_events(20)
    events[0].list_id = None
    events[1].profile_id = None
    rnd = Round(events, catalogue, names, {})
    idx = list(range(20))
    assert list(rnd.routing_keys(idx)) == [f"{e.list_id or 0}.{e.event_type}" for e in events]
    assert list(rnd.kafka_keys(idx, "list_event")) == list(rnd.routing_keys(idx))
    assert list(rnd.kafka_keys(idx, "profile_id")) == [e.profile_id or "" for e in events]
    assert list(rnd.kafka_keys(idx, "none")) == [""] * 20
    assert list(rnd.routing_keys([3])) == [f"{events[3].list_id}.{events[3].event_type}"]


@pytest.mark.parametrize("with_columns", [False, True])
def test_routing_keys_by_columns_equal_the_reference(with_columns: bool) -> None:
    """Whole-round keys from the matching columns (``np.unique`` over list id and
    type), or by hashing pairs: each the event's own ``routing_key``, with absent,
    zero and int64-limit list ids among many types."""
    catalogue, names = load_catalogue(), make_names()
    codes = catalogue.codes()
    rng = random.Random(7)
    events = make_events(3000)
    lists = [None, 0, 1, 2, 2**63 - 1, 2**40, 17]
    for e in events:
        e.list_id = rng.choice(lists)
        e.event_type = rng.choice(codes)
    columns = EventColumns.from_events(events, catalogue) if with_columns else None
    rnd = Round(events, catalogue, names, {}, columns=columns)
    assert (rnd.columns is not None) == with_columns
    idx = rng.sample(range(3000), 500)
    assert list(rnd.routing_keys(idx)) == [routing_key(events[i]) for i in idx]
    assert list(rnd.kafka_keys(list(range(3000)), "list_event")) == list(
        map(routing_key, events))


def test_uuids_are_version_4_and_distinct() -> None:
    values = [json.loads(u) for u in uuid_json_many(2000)]
    assert all(UUID.match(v) for v in values)
    assert len(set(values)) == 2000
    assert uuid_json_many(0) == []


def test_part_views_encode_as_the_part_of_every_regular_event() -> None:
    catalogue = load_catalogue()
    events, views = _stored(_events())
    assert views is not None and len(views) == len(events)
    irregular = irregular_events(events, catalogue)
    # deleted, not UTC, dimensions from the top level, tries 0, two segment fills
    assert irregular == [0, 2, 3, 4, 8, 9]
    for i, (event, view) in enumerate(zip(events, views, strict=True)):
        if i not in irregular:  # byte for byte, key order included
            assert msgspec.json.encode(view) == encode_part(event, catalogue), i


def test_a_dimension_no_event_has_is_passed_over_and_a_zero_is_a_value() -> None:
    """Events lacking resource_id in event_data are regular when none of the round has
    one (nothing to fill in); an id of 0 is a value, filled in like any other."""
    catalogue = load_catalogue()
    events = make_events(50)
    for e in events:
        e.event_data = {k: v for k, v in e.event_data.items() if k != "resource_id"}
        e.resource_id = None
    stored, views = _stored(events)
    assert irregular_events(stored, catalogue) == []
    events[7].resource_id = 0
    stored, views = _stored(events)
    assert irregular_events(stored, catalogue) == [7]
    assert views is not None
    for i, (event, view) in enumerate(zip(stored, views, strict=True)):
        if i != 7:
            assert msgspec.json.encode(view) == encode_part(event, catalogue), i
    assert b'"resource_id":0' in encode_part(stored[7], catalogue)


def test_an_entry_written_as_json_has_no_views() -> None:
    events = make_events(3)
    raw = msgspec.json.encode(events)
    assert decode_views({INTAKE_FIELD: raw}) is None
    assert len(decode_entry({INTAKE_FIELD: raw})) == 3


@pytest.mark.parametrize("name", ["every parameter", "fields only", "content and mixed values"])
def test_a_regular_round_takes_the_column_paths_and_equals_the_reference(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every date UTC, every profile present: dates, names and profile fields are made
    for all the events at once (``_column``, ``_profile_column``)."""
    hook = HOOKS[name]
    columns: list[tuple[tuple[str, ...], bool]] = []  # (fields, made at once) per call
    profile_column = Round._profile_column

    def recorded(self: Round, fields: tuple[str, ...], more: bool, idx: list[int]) -> Any:
        made = profile_column(self, fields, more, idx)
        columns.append((fields, made is not None))
        return made

    monkeypatch.setattr(Round, "_profile_column", recorded)
    catalogue, names = load_catalogue(), make_names()
    events, views = _stored(make_events(300))
    for n, e in enumerate(events):
        e.profile = {"email": f"u{n}@example.org", "first_name": "Ann", "missing": n}
    rnd = Round(events, catalogue, names, {}, views)
    assembler, reference = Assembler(hook, names, catalogue), MessageBuilder(hook, names, catalogue)
    idx = list(range(len(events)))
    # two hooks' worth: a subset first, then all (the rest filled in, the first reused)
    first, _ = assembler.assemble(rnd, idx[::3])
    messages, _ = assembler.assemble(rnd, idx)
    assert (rnd._ns is not None) == (name == "every parameter")  # dates parsed in bulk
    # the hook's profile fields were made as columns, for the subset and for the rest
    assert columns and all(at_once for _, at_once in columns), columns
    assert {fields for fields, _ in columns} == {tuple(hook.custom_data.fields)}
    for i, raw in zip(idx[::3], first, strict=True):
        assert _without_uuids(json.loads(raw)) == _without_uuids(json.loads(messages[i]))
    for i, raw in zip(idx, messages, strict=True):
        want = json.loads(encode_message(reference.build(events[i], {})))
        assert _without_uuids(json.loads(raw)) == _without_uuids(want), (name, i)


def test_dates_in_bulk_equal_the_forms_one_by_one() -> None:
    rng = random.Random(7)
    dates = []
    for _ in range(3_000):
        secs = rng.randrange(-5 * 10**9, 9 * 10**9)  # 1811 .. 2255
        frac = rng.choice(["", ".5", ".000001", ".123456789", ".100000000", ".999999999"])
        t = time.gmtime(secs)
        dates.append(f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"
                     f"{t.tm_min:02d}:{t.tm_sec:02d}{frac}Z")
    dates += ["1969-12-31T23:59:59.999999999Z", "1970-01-01T00:00:00Z", "2024-02-29T12:00:00Z"]
    ns = dates_ns(dates)
    assert ns is not None
    assert ns.tolist() == [parse_rfc3339_ns(d) for d in dates]
    for param, form in _DATE_FORMS.items():
        assert date_texts(param, ns) == [form(parse_rfc3339_ns(d)) for d in dates]
    # not in bulk: another offset, lowercase t, a leap second, years numpy cannot hold
    for odd in ["2026-11-01T10:00:00+02:00", "2026-11-01t10:00:00Z", "2016-12-31T23:59:60Z",
                "1500-01-01T00:00:00Z", "2300-01-01T00:00:00Z"]:
        assert dates_ns([*dates[:5], odd]) is None, odd
    assert dates_ns([]) is None


def test_a_round_asked_for_every_event_in_any_order_equals_the_reference() -> None:
    hook = HOOKS["every parameter"]
    catalogue, names = load_catalogue(), make_names()
    events, views = _stored(_events()[:60])
    rnd = Round(events, catalogue, names, {}, views)
    idx = list(range(len(events)))[::-1]  # all of them, last first
    messages, _ = Assembler(hook, names, catalogue).assemble(rnd, idx)
    reference = MessageBuilder(hook, names, catalogue)
    for i, raw in zip(idx, messages, strict=True):
        want = json.loads(encode_message(reference.build(events[i], {})))
        assert _without_uuids(json.loads(raw)) == _without_uuids(want), i
