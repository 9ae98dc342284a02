"""Hook matching: every filter kind, scope, isolation, edge cases, and HookIndex == reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import matching
from engine.catalogue import load_catalogue
from engine.events import Event
from engine.hooks import Hook, parse_hook
from engine.matching import EventColumns, HookIndex, reference_match

CATALOGUE = load_catalogue()
SINK = {"http_batch": {"url": "http://127.0.0.1:9/x"}}
BIG = 2**40  # an id far from the others: its dimension uses the hash table, not a lookup table

# filter kind -> Event field holding the event's value
EVENT_FIELD = {
    "resources": "resource_id",
    "campaigns": "campaign_id",
    "templates": "message_id",
    "pixels": "pixel_id",
}


def hook(
    account: int = 1,
    database: str | int = "all",
    actions: Sequence[str] = ("click",),
    active: bool = True,
    **filters: list[int],
) -> Hook:
    return parse_hook({
        "name": "h",
        "active": active,
        "account_id": account,
        "database": database,
        "actions": list(actions),
        "filters": filters,
        "target": SINK,
    }, CATALOGUE)


def event(event_type: str = "click", account: int = 1, list_id: int | None = 10,
          **fields: Any) -> Event:
    return Event(event_type=event_type, event_date="2024-01-01T00:00:00Z",
                 account_id=account, list_id=list_id, **fields)


def matched(hooks: Sequence[Hook], events: Sequence[Event]) -> dict[int, list[int]]:
    """HookIndex.match as plain lists, after checking it against the reference and its shape."""
    cols = EventColumns.from_events(events, CATALOGUE)
    result = HookIndex.compile(hooks, CATALOGUE).match(cols)
    assert_same(result, reference_match(hooks, cols, CATALOGUE))
    for events_of_hook in result.values():
        assert events_of_hook.dtype == np.int64
        assert len(events_of_hook) > 0
        assert np.all(np.diff(events_of_hook) > 0)
    return {h: ev.tolist() for h, ev in sorted(result.items())}


def assert_same(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for h in want:
        assert got[h].tolist() == want[h].tolist(), f"hook {h}"


# --- event type, scope, isolation ----------------------------------------------------------


def test_no_filters_match_every_event_of_the_selected_types() -> None:
    events = [event("click"), event("open"), event("click", list_id=None), event("send")]
    assert matched([hook(actions=["click", "send"])], events) == {0: [0, 2, 3]}


def test_event_type_selection_per_hook() -> None:
    hooks = [hook(actions=["open"]), hook(actions=["click", "uclick"]), hook(actions=["pixel"])]
    events = [event("click"), event("open"), event("uclick"), event("deliv")]
    assert matched(hooks, events) == {0: [1], 1: [0, 2]}


def test_database_all_versus_one_list() -> None:
    hooks = [hook(database="all"), hook(database=10), hook(database=11)]
    events = [event(list_id=10), event(list_id=11), event(list_id=12), event(list_id=None)]
    # an event without list_id only reaches "all" hooks
    assert matched(hooks, events) == {0: [0, 1, 2, 3], 1: [0], 2: [1]}


def test_accounts_are_isolated() -> None:
    hooks = [hook(account=1), hook(account=2, database=10), hook(account=3)]
    events = [event(account=1), event(account=2), event(account=3, list_id=None),
              event(account=4), event(account=2, list_id=11)]
    assert matched(hooks, events) == {0: [0], 1: [1], 2: [2]}


def test_all_databases_hook_never_sees_another_accounts_events() -> None:
    hooks = [hook(account=7, database="all", actions=["click", "open", "send"])]
    events = [event("click", account=8), event("open", account=6, list_id=None),
              event("send", account=70), event("send", account=7)]
    assert matched(hooks, events) == {0: [3]}


def test_inactive_hooks_are_dropped_and_positions_follow_active_hooks() -> None:
    hooks = [hook(active=False), hook(actions=["open"]), hook(active=False), hook()]
    index = HookIndex.compile(hooks, CATALOGUE)
    assert index.hooks == [hooks[1], hooks[3]]
    result = index.match(EventColumns.from_events([event("open"), event("click")], CATALOGUE))
    assert {h: v.tolist() for h, v in result.items()} == {0: [0], 1: [1]}
    assert matched(hooks, [event("open"), event("click")]) == {0: [0], 1: [1]}


# --- filter kinds ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(EVENT_FIELD))
def test_single_valued_filter(kind: str) -> None:
    field = EVENT_FIELD[kind]
    hooks = [hook(**{kind: [5, 6]}), hook()]
    events = [event(**{field: 5}), event(**{field: 6}), event(**{field: 7}), event(),
              event(**{field: 0})]
    # in the list: match; another value or no value: only the unrestricted hook
    assert matched(hooks, events) == {0: [0, 1], 1: [0, 1, 2, 3, 4]}


@pytest.mark.parametrize("kind", sorted(EVENT_FIELD))
def test_filter_value_zero_is_a_real_id(kind: str) -> None:
    field = EVENT_FIELD[kind]
    assert matched([hook(**{kind: [0]})], [event(**{field: 0}), event()]) == {0: [0]}


def test_template_and_campaign_taken_from_event_data() -> None:
    hooks = [hook(templates=[17]), hook(campaigns=[973]), hook(resources=[3])]
    events = [event(event_data={"message_id": 17, "campaign_id": 973, "resource_id": 3}),
              event(event_data={"message_id": 18, "campaign_id": 1})]
    assert matched(hooks, events) == {0: [0], 1: [0], 2: [0]}


def test_segments_any_of_the_events_segments() -> None:
    hooks = [hook(segments=[3, 4]), hook(segments=[9])]
    events = [
        event(segment_ids=[1, 3]),  # one of several segments listed
        event(segment_ids=[4]),
        event(segment_ids=[1, 2, 5, 9]),  # the last of many
        event(segment_ids=[1, 2]),  # none listed
        event(),  # no segments at all
        event(segment_ids=[9, 4, 4]),  # both hooks, duplicates harmless
    ]
    assert matched(hooks, events) == {0: [0, 1, 5], 1: [2, 5]}


def test_segment_id_from_event_data_zero_means_none() -> None:
    hooks = [hook(segments=[8]), hook()]
    events = [event(event_data={"segment_id": 8}), event(event_data={"segment_id": 0})]
    assert matched(hooks, events) == {0: [0], 1: [0, 1]}


def test_segment_zero_in_segment_ids_means_none_as_in_event_data() -> None:
    """0 is "no segment" however the producer writes it: events whose messages are the
    same are captured alike (segment_ids [0] was a segment a filter could name)."""
    hooks = [hook(segments=[5]), hook()]
    events = [event(segment_ids=[0]), event(event_data={"segment_id": 0}),
              event(segment_ids=[0, 5])]
    assert [e.segment_ids for e in events] == [None, None, [5]]
    assert matched(hooks, events) == {0: [2], 1: [0, 1, 2]}


def test_events_without_segments_next_to_events_with_many() -> None:
    hooks = [hook(segments=[2]), hook(segments=[40, 41])]
    events = [event(segment_ids=list(range(50)) if i % 3 == 0 else None) for i in range(10)]
    assert matched(hooks, events) == {0: [0, 3, 6, 9], 1: [0, 3, 6, 9]}


def test_or_within_a_kind_and_across_kinds() -> None:
    hooks = [hook(campaigns=[1, 2], templates=[10, 11], segments=[5])]
    events = [
        event(campaign_id=1, message_id=11, segment_ids=[5]),  # all three kinds hold
        event(campaign_id=2, message_id=10, segment_ids=[6, 5]),
        event(campaign_id=3, message_id=10, segment_ids=[5]),  # campaign fails
        event(campaign_id=1, message_id=12, segment_ids=[5]),  # template fails
        event(campaign_id=1, message_id=10, segment_ids=[6]),  # segment fails
        event(campaign_id=1, segment_ids=[5]),  # no template
    ]
    assert matched(hooks, events) == {0: [0, 1]}


def test_missing_value_for_a_filtered_dimension_does_not_match() -> None:
    hooks = [hook(actions=["import_api"], resources=[3]),
             hook(actions=["import_api"], pixels=[1]),
             hook(actions=["import_api"], segments=[1]),
             hook(actions=["import_api"])]
    assert matched(hooks, [event("import_api")]) == {3: [0]}


def test_pixel_filter_with_pixel_events() -> None:
    hooks = [hook(actions=["pixel"], pixels=[21]), hook(actions=["pixel", "click"])]
    events = [event("pixel", pixel_id=21), event("pixel", pixel_id=22), event("click")]
    assert matched(hooks, events) == {0: [0], 1: [0, 1, 2]}


def test_filters_combine_with_scope_and_type() -> None:
    hooks = [hook(database=10, actions=["open"], campaigns=[1])]
    events = [event("open", list_id=10, campaign_id=1), event("open", list_id=11, campaign_id=1),
              event("click", list_id=10, campaign_id=1), event("open", list_id=10, campaign_id=2)]
    assert matched(hooks, events) == {0: [0]}


# --- edge cases -----------------------------------------------------------------------------


def test_empty_batch() -> None:
    index = HookIndex.compile([hook()], CATALOGUE)
    assert index.match(EventColumns.from_events([], CATALOGUE)) == {}
    assert index.match(EventColumns.empty()) == {}


def test_no_hooks_and_only_inactive_hooks() -> None:
    cols = EventColumns.from_events([event(), event("open")], CATALOGUE)
    assert HookIndex.compile([], CATALOGUE).match(cols) == {}
    index = HookIndex.compile([hook(active=False)], CATALOGUE)
    assert index.hooks == []
    assert index.match(cols) == {}


def test_no_event_matches() -> None:
    assert matched([hook(actions=["open"]), hook(account=2)], [event("click")]) == {}


def test_more_than_64_hooks_in_one_account() -> None:
    # 150 hooks of one account: three words per bitset; hook i listens to campaign i % 50
    hooks = [hook(campaigns=[i % 50]) for i in range(150)] + [hook(account=2)]
    events = [event(campaign_id=c) for c in (0, 49, 7, 50)] + [event(account=2)]
    result = matched(hooks, events)
    assert result[0] == [0] and result[149] == [1] and result[57] == [2]
    assert result[150] == [4]
    assert sum(len(v) for v in result.values()) == 3 * 3 + 1


def test_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matching, "CHUNK_EVENTS", 4)
    hooks = [hook(actions=["click", "open"], segments=[1]), hook(actions=["click", "open"])]
    events = [event("open" if i % 2 else "click", segment_ids=[1] * (i % 3) or None)
              for i in range(11)]
    assert matched(hooks, events) == {0: [1, 2, 4, 5, 7, 8, 10], 1: list(range(11))}


def test_big_ids_and_forced_hash_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matching, "LUT_MAX", 0)  # every id lookup through a hash table
    hooks = [hook(account=BIG, campaigns=[BIG, 0]), hook(account=3, database=BIG + 1)]
    events = [event(account=BIG, campaign_id=BIG), event(account=BIG, campaign_id=0),
              event(account=BIG, campaign_id=BIG + 64), event(account=3, list_id=BIG + 1),
              event(account=3, list_id=1), event(account=BIG + 3, campaign_id=BIG)]
    assert matched(hooks, events) == {0: [0, 1], 1: [3]}


def test_hook_without_actions_captures_nothing() -> None:
    # the platform's default (no action chosen yet): must not turn into "every type"
    bare = hook(actions=())
    cols = EventColumns.from_events([event()], CATALOGUE)
    assert HookIndex.compile([bare, hook()], CATALOGUE).match(cols).keys() == {1}
    assert reference_match([bare, hook()], cols, CATALOGUE).keys() == {1}


# --- EventColumns ---------------------------------------------------------------------------


def test_from_events_columns() -> None:
    cols = EventColumns.from_events([
        event("open", account=5, list_id=None, resource_id=1, campaign_id=2, message_id=3,
              pixel_id=4, segment_ids=[6, 7]),
        event("pixel", account=6, list_id=9),
    ], CATALOGUE)
    assert len(cols) == 2
    assert cols.account_id.tolist() == [5, 6]
    assert cols.list_id.tolist() == [-1, 9]
    assert cols.event_type.tolist() == [CATALOGUE.index("open"), CATALOGUE.index("pixel")]
    assert cols.event_type.dtype == np.int32
    assert cols.resource_id.tolist() == [1, -1]
    assert cols.campaign_id.tolist() == [2, -1]
    assert cols.template_id.tolist() == [3, -1]
    assert cols.pixel_id.tolist() == [4, -1]
    assert cols.segment_values.tolist() == [6, 7]
    assert cols.segment_offsets.tolist() == [0, 2, 2]


def test_from_events_unknown_event_type() -> None:
    # a code removed from EVENT_TYPES_FILE after the event was accepted: no hook selects it
    cols = EventColumns.from_events([event("nope"), event("click")], CATALOGUE)
    assert cols.event_type.tolist() == [matching.UNKNOWN_EVENT_TYPE, CATALOGUE.index("click")]
    assert dict(cols.unknown_types) == {"nope": 1}
    assert matched([hook(actions=CATALOGUE.codes())], [event("nope"), event("click")]) == {0: [1]}


def test_slice_rebases_segments() -> None:
    cols = EventColumns.from_events(
        [event(segment_ids=[1]), event(segment_ids=[2, 3]), event(), event(segment_ids=[4])],
        CATALOGUE,
    )
    part = cols.slice(1, 3)
    assert len(part) == 2
    assert part.segment_offsets.tolist() == [0, 2, 2]
    assert part.segment_values.tolist() == [2, 3]
    assert len(cols.slice(3, 99)) == 1 and cols.slice(3, 99).segments_of(0).tolist() == [4]


def test_columns_of_different_lengths_are_rejected() -> None:
    cols = EventColumns.from_events([event(), event()], CATALOGUE)
    with pytest.raises(ValueError, match=r"EventColumns\.pixel_id: expected a 1-D array of 2"):
        EventColumns(**{**cols.__dict__, "pixel_id": np.array([1])})
    with pytest.raises(ValueError, match="segment_offsets"):
        EventColumns(**{**cols.__dict__, "segment_offsets": np.array([0, 0])})
    with pytest.raises(ValueError, match="must not decrease"):
        EventColumns(**{**cols.__dict__, "segment_values": np.array([1]),
                        "segment_offsets": np.array([0, 2, 1])})


@pytest.mark.parametrize("spread", ["dense", "sparse"])
def test_id_map_lookup(spread: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    high = 1_000 if spread == "dense" else 2**62
    ids = np.unique(rng.integers(0, high, 3_000))
    probe = np.r_[ids, ids + 1, rng.integers(-5, high, 3_000), -1, -(2**63), 2**63 - 1]
    want = np.searchsorted(ids, probe)
    want[(want == len(ids)) | (ids[np.minimum(want, len(ids) - 1)] != probe)] = len(ids)
    if spread == "dense":
        table = matching._IdMap(ids)
        assert table._lut is not None
        assert table.lookup(probe).tolist() == want.tolist()
    monkeypatch.setattr(matching, "LUT_MAX", 0)
    hashed = matching._IdMap(ids)
    assert hashed._lut is None
    if spread == "sparse":  # random ids collide: some had to probe past their home slot
        assert np.any(np.take(hashed._slot_key, hashed._hash(ids)) != ids)
    assert hashed.lookup(probe).tolist() == want.tolist()


# --- property: HookIndex.match == reference_match ----------------------------------------

# small domains, so that hooks and events collide often: most examples have matches
CODES = ["click", "open", "pixel"]
IDS = [0, 1, BIG]  # BIG: a dimension that lists it uses a hash table instead of a lookup table

filter_values = st.sampled_from([[], [], []]) | st.lists(st.sampled_from(IDS), min_size=1,
                                                          max_size=2)
# 0 is "no segment", which no filter may name (an event's segment_ids drop it)
segment_values = st.sampled_from([[], [], []]) | st.lists(st.sampled_from([1, 2, BIG]),
                                                           min_size=1, max_size=2)
hooks_strategy = st.lists(
    st.builds(
        hook,
        account=st.sampled_from([1, 2]),
        database=st.sampled_from(["all", "all", 10, 11]),
        actions=st.lists(st.sampled_from(CODES), min_size=1, max_size=3),
        active=st.sampled_from([True, True, True, False]),
        resources=filter_values,
        campaigns=filter_values,
        templates=filter_values,
        segments=segment_values,
        pixels=filter_values,
    ),
    max_size=10,
)
maybe_id = st.sampled_from([None, 0, 1, 2, BIG])
random_event = st.builds(
    event,
    event_type=st.sampled_from([*CODES, "send"]),
    account=st.sampled_from([1, 1, 2, 3]),
    list_id=st.sampled_from([None, 10, 11, 12]),
    resource_id=maybe_id,
    campaign_id=maybe_id,
    message_id=maybe_id,
    pixel_id=maybe_id,
    segment_ids=st.none() | st.lists(st.sampled_from([0, 1, 2, BIG]), max_size=3),
)


@st.composite
def near_event(draw: st.DrawFn, target: Hook) -> Event:
    """An event that ``target`` matches, then (often) with one field changed: a near miss."""
    def value(kind: str) -> int | None:
        listed = getattr(target.filters, kind)
        return draw(st.sampled_from(listed)) if listed else draw(maybe_id)

    fields: dict[str, Any] = {EVENT_FIELD[kind]: value(kind) for kind in EVENT_FIELD}
    fields["segment_ids"] = draw(st.lists(st.sampled_from([0, 1, 2, BIG]), max_size=2))
    if target.filters.segments:
        fields["segment_ids"].append(draw(st.sampled_from(target.filters.segments)))
    fields.update(
        event_type=draw(st.sampled_from(target.actions)),
        account=target.account_id,
        list_id=draw(st.sampled_from([None, 10, 11, 12])) if target.database == "all"
        else target.database,
    )
    change = draw(st.sampled_from([None, None, "event_type", "account", "list_id",
                                   "segment_ids", *EVENT_FIELD.values()]))
    if change is not None:  # take that field from a random event
        fields[change] = getattr(draw(random_event), {"account": "account_id"}.get(change, change))
    return event(**fields)


@st.composite
def hooks_and_events(draw: st.DrawFn) -> tuple[list[Hook], list[Event]]:
    hooks = draw(hooks_strategy)
    near = [near_event(h) for h in hooks]
    events = draw(st.lists(st.one_of(random_event, *near), max_size=25))
    return hooks, events


@pytest.mark.parametrize(("lut_max", "chunk"), [(matching.LUT_MAX, 65_536), (0, 3)])
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hooks_and_events())
def test_index_equals_reference(
    lut_max: int, chunk: int, case: tuple[list[Hook], list[Event]]
) -> None:
    hooks, events = case
    cols = EventColumns.from_events(events, CATALOGUE)
    want = reference_match(hooks, cols, CATALOGUE)
    with mock.patch.object(matching, "LUT_MAX", lut_max), \
            mock.patch.object(matching, "CHUNK_EVENTS", chunk):
        index = HookIndex.compile(hooks, CATALOGUE)
        got = index.match(cols)
    assert index.hooks == [h for h in hooks if h.active]
    assert_same(got, want)


def test_index_equals_reference_on_a_large_random_workload() -> None:
    """Hundreds of hooks over two accounts (multi-word bitsets), thousands of events."""
    rng = np.random.default_rng(7)
    hooks = []
    for _ in range(300):
        filters = {kind: (rng.choice(8, int(rng.integers(1, 3)), replace=False)
                          + (kind == "segments")).tolist()  # no segment 0: "none"
                   for kind in ("resources", "campaigns", "templates", "segments", "pixels")
                   if rng.random() < 0.25}
        hooks.append(hook(
            account=int(rng.integers(1, 3)),
            database="all" if rng.random() < 0.4 else int(rng.integers(10, 13)),
            actions=rng.choice(CODES, int(rng.integers(1, 4)), replace=False).tolist(),
            active=bool(rng.random() < 0.9),
            **filters,
        ))
    events = []
    for _ in range(1500):
        def opt() -> int | None:
            return None if rng.random() < 0.2 else int(rng.integers(0, 9))
        n_segments = int(rng.integers(0, 4))
        events.append(event(
            str(rng.choice(CODES)), account=int(rng.integers(1, 4)),
            list_id=None if rng.random() < 0.1 else int(rng.integers(10, 14)),
            resource_id=opt(), campaign_id=opt(), message_id=opt(), pixel_id=opt(),
            segment_ids=rng.integers(0, 9, n_segments).tolist() or None,
        ))
    result = matched(hooks, events)
    assert sum(len(v) for v in result.values()) > 1000  # the workload does match
