"""Event input schema: decoding, matching dimensions, per-event issues, ids, RFC 3339 times."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.catalogue import CATEGORIES, EventCatalogue, builtin_catalogue
from engine.errors import EventError, HookrayError
from engine.events import (
    NS,
    DecodedBatch,
    Event,
    EventIssue,
    Subscription,
    decode_batch,
    decode_events,
    encode_events,
    ensure_ids,
    parse_rfc3339_ns,
)

DATE = "2018-03-04T13:13:19.034315796Z"
DATE_NS = 1_520_169_199_034_315_796

TRACKING_DATA = {  # every documented tracking field (spec d)
    "message_id": 17, "campaign_id": 973, "segment_id": 0, "resource_id": 3,
    "ip": "10.9.0.14", "country": ".us", "city": "New York", "postal_code": "101000",
    "region": "Ohio", "tz": "Europe/Vaduz", "lat": 55.244075, "lon": 55.244075,
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:59.0) Gecko/20100101 Firefox/59.0",
    "os": "Linux x86_64", "browser": "Firefox", "device": "web",
    "link_url": "http://www.example.com", "launch_id": "00000017000003cd5a9bf01a",
    "send_message_id": "5a9bf01a17_3cd_11_6f_0_2.5a8c045fc1dde44cbf718f78",
    "extra_uid": "ew4Sgf41",
}
DELIVERY_DATA = {"message_id": 5, "segment_id": 0, "campaign_id": 130}  # documented deliv example
IMPORT_DATA = {"import_id": 881, "resource_id": 3}
PIXEL_DATA = {"pixel_id": 9, "goal": "purchase", "goal_value": 99.5,
              "page_url": "https://shop.example/checkout", "referrer": "https://ads.example/"}
DATA_BY_CATEGORY = {"tracking": TRACKING_DATA, "delivery": DELIVERY_DATA,
                    "import": IMPORT_DATA, "pixel": PIXEL_DATA}

SUBSCRIPTION_FULL = {  # documented v74 example: every item field
    "resource_id": 123, "channel": "email", "email": "user@example.com",
    "phone": "+79991234567", "subscription_id": "abc123", "provider": "androidfirebase",
    "priority": 1, "status": "subscribed", "ccsub": {"custom_key": "custom_value"},
}

FULL = {  # every field of the schema, none at its default
    "event_type": "click",
    "event_date": DATE,
    "account_id": 23,
    "list_id": 111,
    "id": "0f8e3c5d6b7a4e1f9a2b3c4d5e6f7a8b",
    "profile_id": "abcdefgh12345678",
    "_xxh": "ad1850e0d1d9481e",
    "_md5": "145bb30f7ddf1184cb560bc4b7705646",
    "sends_trying_num": 2,
    "is_test": True,
    "is_static": False,
    "subscription_hash_id": "0a4b910312345",
    "subscription": [SUBSCRIPTION_FULL,
                     {"resource_id": 7, "channel": "sms", "phone": "+79990000000",
                      "status": "unsubscribed"}],
    "event_data": TRACKING_DATA,
    "resource_id": 3,
    "campaign_id": 973,
    "message_id": 17,
    "segment_ids": [4, 5],
    "pixel_id": 9,
    "profile": {"email": "alice@example.org", "age": 31, "tags": ["vip"]},
    "profile_deleted": True,
    "historical": True,
    "custom_data": {"email": "alice@example.org"},
    "send_id": "5a9bf01a17_3cd_11_6f_0_2.5a8c045fc1dde44cbf718f78",
}

SPEC_HTTP_EXAMPLE = """[{"event_type": "deliv", "list_id": 50, "account_id": 161,
  "_xxh": "5ada5e6ea3c6da5f", "_md5": "a5656dc1e3f603063a1918d582a10f58",
  "event_data": {"message_id": 5, "segment_id": 0, "campaign_id": 130},
  "event_date": "2016-11-15T09:12:28.514388956Z",
  "custom_data": {"email": "eddie@test-ukr.net"}}]"""


def ev(event_type: str = "click", **fields: Any) -> dict[str, Any]:
    return {"event_type": event_type, "event_date": DATE, "account_id": 23, **fields}


def as_array(items: list[Any]) -> str:
    return json.dumps(items)


def as_ndjson(items: list[Any]) -> str:
    return "\n".join(json.dumps(item) for item in items) + "\n"


def triples(batch: DecodedBatch) -> list[tuple[int, str, str]]:
    return [(i.index, i.field, i.reason) for i in batch.issues]


# --- decoding ------------------------------------------------------------------------------


def test_full_schema_covers_every_field() -> None:
    names = {f.encode_name for f in msgspec.structs.fields(Event)}
    assert names == set(FULL)
    assert {f.encode_name for f in msgspec.structs.fields(Subscription)} == set(SUBSCRIPTION_FULL)


@pytest.mark.parametrize("encode", [as_array, as_ndjson], ids=["array", "ndjson"])
def test_every_field_round_trips(encode: Any) -> None:
    [event] = decode_events(encode([FULL]))
    assert event.event_type == "click"
    assert event.event_date == DATE
    assert event.date_ns == DATE_NS
    assert event.account_id == 23
    assert event.list_id == 111
    assert event.id == FULL["id"]
    assert event.profile_id == "abcdefgh12345678"
    assert event.xxh == "ad1850e0d1d9481e"
    assert event.md5 == "145bb30f7ddf1184cb560bc4b7705646"
    assert event.sends_trying_num == 2
    assert event.is_test is True
    assert event.is_static is False
    assert event.subscription_hash_id == "0a4b910312345"
    assert event.event_data == TRACKING_DATA
    assert (event.resource_id, event.campaign_id, event.message_id, event.pixel_id) == (
        3, 973, 17, 9
    )
    assert event.segment_ids == [4, 5]
    assert event.profile == FULL["profile"]
    assert event.profile_deleted is True
    assert event.custom_data == {"email": "alice@example.org"}
    assert event.send_id == FULL["send_id"]
    assert event.subscription is not None
    first, second = event.subscription
    assert isinstance(first, Subscription)
    assert (first.resource_id, first.channel, first.email, first.phone, first.subscription_id,
            first.provider, first.priority, first.status, first.ccsub) == (
        123, "email", "user@example.com", "+79991234567", "abc123", "androidfirebase", 1,
        "subscribed", {"custom_key": "custom_value"},
    )
    assert (second.channel, second.email, second.ccsub) == ("sms", None, None)
    # and back: the same JSON, with the `_xxh`/`_md5` wire names
    encoded = json.loads(encode_events([event]))
    assert encoded == [FULL]
    assert "_xxh" in encoded[0]
    assert "xxh" not in encoded[0]
    assert decode_events(encode_events([event])) == [event]


def test_minimal_event_defaults_and_encoding() -> None:
    [event] = decode_events(as_array([ev()]))
    assert event.is_test is False
    assert event.profile_deleted is False
    assert event.event_data == {}
    for name in ("list_id", "id", "profile_id", "xxh", "md5", "sends_trying_num", "is_static",
                 "subscription_hash_id", "subscription", "resource_id", "campaign_id",
                 "message_id", "segment_ids", "pixel_id", "profile", "custom_data", "send_id"):
        assert getattr(event, name) is None, name
    assert json.loads(encode_events([event])) == [ev()]  # absent optional keys are omitted


def test_documented_http_example_decodes() -> None:
    [event] = decode_events(SPEC_HTTP_EXAMPLE)
    assert event.event_type == "deliv"
    assert (event.list_id, event.account_id) == (50, 161)
    assert (event.xxh, event.md5) == ("5ada5e6ea3c6da5f", "a5656dc1e3f603063a1918d582a10f58")
    assert (event.message_id, event.campaign_id, event.segment_ids) == (5, 130, None)
    assert event.custom_data == {"email": "eddie@test-ukr.net"}
    assert event.date_ns == 1_479_201_148_514_388_956


def test_array_and_ndjson_give_the_same_events() -> None:
    items = [ev(account_id=i, list_id=100 + i) for i in range(5)]
    from_array = decode_batch(as_array(items))
    from_ndjson = decode_batch(as_ndjson(items))
    assert from_array.events == from_ndjson.events
    assert from_array.indices == from_ndjson.indices == [0, 1, 2, 3, 4]
    assert from_array.issues == from_ndjson.issues == []
    assert [e.list_id for e in from_array.events] == [100, 101, 102, 103, 104]


def test_bytes_and_text_input() -> None:
    text = as_array([ev()])
    assert decode_batch(text).events == decode_batch(text.encode()).events


def test_array_with_leading_whitespace() -> None:
    batch = decode_batch("\n  \t" + as_array([ev(), ev("open")]))
    assert [e.event_type for e in batch.events] == ["click", "open"]
    assert batch.issues == []


def test_ndjson_with_crlf_and_blank_lines() -> None:
    line = json.dumps(ev())
    batch = decode_batch(f"{line}\r\n\r\n   \n{json.dumps(ev('open'))}\r\n")
    assert [e.event_type for e in batch.events] == ["click", "open"]
    assert batch.indices == [0, 1]  # blank lines are not events and take no index
    assert batch.issues == []


@pytest.mark.parametrize("data", ["", b"", "   \n", "[]", b"[ ]"])
def test_empty_input(data: str | bytes) -> None:
    batch = decode_batch(data)
    assert (batch.events, batch.indices, batch.issues) == ([], [], [])
    assert decode_events(data) == []


def test_single_object_is_one_ndjson_line() -> None:
    batch = decode_batch(json.dumps(ev("open")))
    assert [e.event_type for e in batch.events] == ["open"]
    assert batch.indices == [0]


def test_unknown_event_data_keys_are_kept() -> None:
    [event] = decode_events(as_array([ev(event_data={"anything": {"nested": [1, 2]}})]))
    assert event.event_data == {"anything": {"nested": [1, 2]}}


# --- matching dimensions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_data", "top", "expected"),
    [
        pytest.param({"resource_id": 3, "campaign_id": 973, "message_id": 17, "segment_id": 4,
                      "pixel_id": 9}, {}, (3, 973, 17, [4], 9), id="all-from-event-data"),
        pytest.param(TRACKING_DATA, {}, (3, 973, 17, None, None), id="tracking-example"),
        pytest.param(DELIVERY_DATA, {}, (None, 130, 5, None, None), id="delivery-example"),
        pytest.param(IMPORT_DATA, {}, (3, None, None, None, None), id="import"),
        pytest.param(PIXEL_DATA, {}, (None, None, None, None, 9), id="pixel"),
        pytest.param({"segment_id": 0}, {}, (None, None, None, None, None),
                     id="segment-0-means-none"),
        pytest.param({"resource_id": 0, "campaign_id": 0}, {}, (0, 0, None, None, None),
                     id="zero-is-a-value-except-segment"),
        pytest.param({}, {}, (None, None, None, None, None), id="no-event-data"),
        pytest.param({"resource_id": 1, "campaign_id": 2, "message_id": 3, "segment_id": 6,
                      "pixel_id": 7},
                     {"resource_id": 1, "campaign_id": 2, "message_id": 3, "segment_ids": [5, 6],
                      "pixel_id": 7},
                     (1, 2, 3, [5, 6], 7), id="top-level-agrees"),
        pytest.param({"campaign_id": 0, "segment_id": 0}, {"campaign_id": 0, "segment_ids": []},
                     (None, 0, None, [], None), id="top-level-zero-and-empty"),
        pytest.param({"campaign_id": 973}, {"resource_id": 8}, (8, 973, None, None, None),
                     id="mixed-sources"),
    ],
)
def test_matching_dimensions(
    event_data: dict[str, Any], top: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    [event] = decode_events(as_array([ev(event_data=event_data, **top)]))
    assert (event.resource_id, event.campaign_id, event.message_id, event.segment_ids,
            event.pixel_id) == expected
    assert event.event_data == event_data  # the payload itself is untouched


@pytest.mark.parametrize("dim", ["resource_id", "campaign_id", "message_id", "pixel_id",
                                 "segment_id"])
@pytest.mark.parametrize("bad", ["3", 1.5, True, [3], {"id": 3}])
def test_bad_event_data_dimension(dim: str, bad: Any) -> None:
    batch = decode_batch(as_array([ev(event_data={dim: bad}), ev()]))
    assert triples(batch) == [(0, f"event_data.{dim}", f"expected an integer, got {bad!r}")]
    assert batch.indices == [1]


@pytest.mark.parametrize(
    ("field", "value", "where", "reason"),
    [
        ("resource_id", "3", "resource_id", "Expected `int | null`, got `str`"),
        ("campaign_id", 1.5, "campaign_id", "Expected `int | null`, got `float`"),
        ("segment_ids", 4, "segment_ids", "Expected `array | null`, got `int`"),
        ("segment_ids", [4, "5"], "segment_ids[1]", "Expected `int`, got `str`"),
        ("pixel_id", True, "pixel_id", "Expected `int | null`, got `bool`"),
    ],
)
def test_bad_top_level_dimension(field: str, value: Any, where: str, reason: str) -> None:
    assert triples(decode_batch(as_array([ev(**{field: value})]))) == [(0, where, reason)]


# --- bad events ----------------------------------------------------------------------------

GOOD_SUB = [SUBSCRIPTION_FULL]
MIXED: list[Any] = [
    ev(account_id=0),                                                       # 0 good
    ev(account_id="23"),                                                    # 1 wrong type
    ev(account_id=2, subscription=GOOD_SUB),                                # 2 good
    {"event_type": "click", "account_id": 3},                               # 3 missing date
    ev(account_id=4, xxh="ad1850e0d1d9481e"),                               # 4 unknown field
    ev(account_id=5, event_date="2018-03-04"),                              # 5 bad date
    ev("clik", account_id=6),                                               # 6 unknown type
    "click",                                                                # 7 not an object
    ev(account_id=8, event_data={"segment_id": "4"}),                       # 8 bad dimension
    ev("deliv", account_id=9, event_data=DELIVERY_DATA),                    # 9 good
    ev(account_id=10, subscription=[SUBSCRIPTION_FULL, {"priority": "high"}]),  # 10 nested type
    ev(5, account_id=11),                                                   # 11 type not text
    ev(account_id=-1),                                                      # 12 negative account
    ev(account_id=13, is_test="false"),                                     # 13 bool as text
    None,                                                                   # 14 null
    ev("pixel", account_id=15, event_data=PIXEL_DATA),                      # 15 good
    ev(account_id=16, event_date="2023-02-29T10:00:00Z"),                   # 16 no such day
    ev(account_id=17, subscription=[{"channel": "email", "mail": "x"}]),    # 17 nested unknown
    {"event_type": "click", "event_date": DATE},                            # 18 missing account
]
MIXED_ISSUES = [
    (1, "account_id", "Expected `int`, got `str`"),
    (3, "event_date", "Object missing required field `event_date`"),
    (4, "xxh", "Object contains unknown field `xxh`"),
    (5, "event_date",
     "'2018-03-04' is not an RFC 3339 time like 2018-03-04T13:13:19.034315796Z"),
    (6, "event_type", "unknown event type 'clik'"),
    (7, "$", "Expected `object`, got `str`"),
    (8, "event_data.segment_id", "expected an integer, got '4'"),
    (10, "subscription[1].priority", "Expected `int | null`, got `str`"),
    (11, "event_type", "Expected `str`, got `int`"),
    (12, "account_id", "must be >= 0"),
    (13, "is_test", "Expected `bool`, got `str`"),
    (14, "$", "Expected `object`, got `null`"),
    (16, "event_date", "'2023-02-29T10:00:00Z' has an out-of-range date or time"),
    (17, "subscription[0]", "Object contains unknown field `mail`"),
    (18, "account_id", "Object missing required field `account_id`"),
]
MIXED_GOOD = [0, 2, 9, 15]


@pytest.mark.parametrize("encode", [as_array, as_ndjson], ids=["array", "ndjson"])
@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_mixed_batch_reports_every_bad_event_and_keeps_the_good(
    encode: Any, as_bytes: bool
) -> None:
    data = encode(MIXED)
    batch = decode_batch(data.encode() if as_bytes else data)
    assert triples(batch) == MIXED_ISSUES
    assert batch.indices == MIXED_GOOD
    # each good event is the one at its reported index
    assert [e.account_id for e in batch.events] == MIXED_GOOD
    assert [e.event_type for e in batch.events] == ["click", "click", "deliv", "pixel"]
    assert batch.events[1].subscription is not None
    assert batch.events[2].campaign_id == 130
    assert batch.events[3].pixel_id == 9


def test_malformed_ndjson_line() -> None:
    batch = decode_batch(f"{json.dumps(ev(account_id=0))}\n{{bad json\n"
                         f"{json.dumps(ev(account_id=2))}\n[1]\n")
    assert batch.indices == [0, 2]
    assert [(i.index, i.field) for i in batch.issues] == [(1, "$"), (3, "$")]
    assert batch.issues[0].reason.startswith("JSON is malformed")
    assert batch.issues[1].reason == "Expected `object`, got `array`"


@pytest.mark.parametrize(
    "data",
    [f"[{json.dumps(ev())}", f"[{json.dumps(ev())}, {{bad]", f"[{json.dumps(ev())}] trailing",
     "[", "[1, 2"],
)
def test_not_a_json_array(data: str) -> None:
    batch = decode_batch(data)
    assert batch.events == []
    assert batch.indices == []
    [issue] = batch.issues
    assert (issue.index, issue.field) == (-1, "$")
    assert issue.reason.startswith("not a JSON array of events: ")
    with pytest.raises(EventError) as info:
        decode_events(data)
    assert str(info.value).startswith("1 bad event(s): the batch: not a JSON array of events")


@pytest.mark.parametrize(
    ("data", "reason"),
    [("42", "Expected `object`, got `int`"), ('"events"', "Expected `object`, got `str`"),
     ("null", "Expected `object`, got `null`"), ("true", "Expected `object`, got `bool`")],
)
def test_scalar_input_is_one_bad_event(data: str, reason: str) -> None:
    assert triples(decode_batch(data)) == [(0, "$", reason)]


def test_array_of_non_objects() -> None:
    assert triples(decode_batch("[1, [], \"x\"]")) == [
        (0, "$", "Expected `object`, got `int`"),
        (1, "$", "Expected `object`, got `array`"),
        (2, "$", "Expected `object`, got `str`"),
    ]


def test_decode_events_raises_listing_every_issue() -> None:
    with pytest.raises(EventError) as info:
        decode_events(as_array(MIXED))
    error = info.value
    assert isinstance(error, HookrayError)
    assert [(i.index, i.field, i.reason) for i in error.issues] == MIXED_ISSUES
    message = str(error)
    assert message.startswith(f"{len(MIXED_ISSUES)} bad event(s): ")
    assert message == f"{len(MIXED_ISSUES)} bad event(s): " + "; ".join(
        f"event {i}: {f}: {r}" for i, f, r in MIXED_ISSUES
    )


def test_decode_events_message_is_capped_at_20_issues() -> None:
    items = [ev(account_id=-1) for _ in range(25)]
    with pytest.raises(EventError) as info:
        decode_events(as_array(items))
    assert len(info.value.issues) == 25
    message = str(info.value)
    assert message.startswith("25 bad event(s): event 0: account_id: must be >= 0; ")
    assert "event 19: account_id" in message
    assert "event 20:" not in message


def test_decode_events_returns_good_batch() -> None:
    events = decode_events(as_ndjson([ev("send"), ev("import_api", event_data=IMPORT_DATA)]))
    assert [e.event_type for e in events] == ["send", "import_api"]


def test_event_issue_text() -> None:
    assert str(EventIssue(3, "event_date", "bad")) == "event 3: event_date: bad"


def test_event_error_defaults_to_no_issues() -> None:
    assert EventError("x").issues == []


# --- catalogue -----------------------------------------------------------------------------


def test_every_builtin_code_of_every_category_decodes() -> None:
    cat = builtin_catalogue()
    items = [ev(code, event_data=DATA_BY_CATEGORY[cat.category(code)]) for code in cat.codes()]
    batch = decode_batch(as_array(items))
    assert batch.issues == []
    assert [e.event_type for e in batch.events] == cat.codes()
    assert {cat.category(e.event_type) for e in batch.events} == set(CATEGORIES)


def test_custom_catalogue_code() -> None:
    custom = builtin_catalogue().extended(
        [{"code": "promo_activated", "category": "tracking", "channel": "promo"}]
    )
    data = as_array([ev("promo_activated"), ev("click")])
    assert decode_batch(data, catalogue=custom).indices == [0, 1]
    assert triples(decode_batch(data)) == [
        (0, "event_type", "unknown event type 'promo_activated'")
    ]


def test_empty_catalogue_knows_no_code() -> None:
    batch = decode_batch(as_array([ev("click")]), catalogue=EventCatalogue([]))
    assert triples(batch) == [(0, "event_type", "unknown event type 'click'")]
    assert batch.events == []


# --- ids -----------------------------------------------------------------------------------


def test_ensure_ids_only_where_missing() -> None:
    events = decode_events(as_array([ev(id="producer-1"), ev(), ev(), ev(id="producer-2")]))
    result = ensure_ids(events)
    assert result is events
    assert events[0].id == "producer-1"
    assert events[3].id == "producer-2"
    fresh = [events[1].id, events[2].id]
    for new_id in fresh:
        assert isinstance(new_id, str)
        assert len(new_id) == 32
        int(new_id, 16)  # hex
    assert fresh[0] != fresh[1]
    ensure_ids(events)  # idempotent: assigned ids are kept
    assert [events[1].id, events[2].id] == fresh
    assert json.loads(encode_events(events))[1]["id"] == fresh[0]


def test_ensure_ids_of_nothing() -> None:
    assert ensure_ids([]) == []


# --- RFC 3339 ------------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DATE, DATE_NS),
        ("2018-03-04T13:13:19Z", 1_520_169_199 * NS),
        ("2018-03-04T13:13:19.034315Z", 1_520_169_199_034_315_000),  # microseconds
        ("2018-03-04T13:13:19.5Z", 1_520_169_199_500_000_000),
        ("2018-03-04T13:13:19.000000001Z", 1_520_169_199 * NS + 1),
        ("2018-03-04t13:13:19z", 1_520_169_199 * NS),
        ("2018-03-04T16:13:19+03:00", 1_520_169_199 * NS),
        ("2018-03-04T08:43:19.034315796-04:30", DATE_NS),
        ("2018-03-04T13:13:19+00:00", 1_520_169_199 * NS),
        ("2018-03-04T13:13:19-00:00", 1_520_169_199 * NS),
        ("2018-03-05T13:12:19+23:59", 1_520_169_199 * NS),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.999999999Z", -1),
        ("2024-02-29T00:00:00Z", 1_709_164_800 * NS),  # leap day
        ("2000-02-29T00:00:00Z", 951_782_400 * NS),
        ("2016-12-31T23:59:60Z", 1_483_228_799 * NS),  # leap second: folded onto :59
        # RFC 3339 takes any number of fraction digits: cut to nanoseconds, as Go does
        ("2018-03-04T13:13:19.0343157961Z", 1_520_169_199_034_315_796),
    ],
)
def test_parse_rfc3339_ns(text: str, expected: int) -> None:
    assert parse_rfc3339_ns(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "2018-03-04", "2018-03-04T13:13:19", "2018-03-04 13:13:19Z", "2018-03-04T13:13Z",
        "2018-03-04T13:13:19.Z", "2018-3-4T13:13:19Z",
        "18-03-04T13:13:19Z", "2018-03-04T13:13:19+0300", "2018-03-04T13:13:19+03",
        "2018-03-04T13:13:19 Z", " 2018-03-04T13:13:19Z", "2018-03-04T13:13:19Z\n",
        "2018-03-04T13:13:19UTC", "1520169199",
        "\uff12\uff10\uff11\uff18-03-04T13:13:19Z",  # fullwidth digits
        "\u0662\u0660\u0661\u0668-03-04T13:13:19Z",  # Arabic-Indic digits
    ],
)
def test_parse_rfc3339_rejects_bad_format(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rfc3339_ns(text)
    assert str(info.value) == (
        f"{text!r} is not an RFC 3339 time like 2018-03-04T13:13:19.034315796Z"
    )


@pytest.mark.parametrize(
    "text",
    [
        "2018-13-04T13:13:19Z", "2018-00-04T13:13:19Z", "2018-03-00T13:13:19Z",
        "2018-03-32T13:13:19Z", "2018-04-31T13:13:19Z", "2023-02-29T13:13:19Z",
        "1900-02-29T13:13:19Z", "2018-03-04T24:00:00Z", "2018-03-04T13:60:19Z",
        "2018-03-04T13:13:61Z",
    ],
)
def test_parse_rfc3339_rejects_out_of_range(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rfc3339_ns(text)
    assert str(info.value) == f"{text!r} has an out-of-range date or time"


@pytest.mark.parametrize("text", ["2018-03-04T13:13:19+24:00", "2018-03-04T13:13:19-00:60",
                                  "2018-03-04T13:13:19+99:99"])
def test_parse_rfc3339_rejects_bad_offset(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rfc3339_ns(text)
    assert str(info.value) == f"{text!r} has an out-of-range UTC offset"


@given(
    moment=st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2200, 12, 30)),
    nanos=st.integers(0, NS - 1),
    digits=st.integers(0, 9),
    offset_min=st.integers(-(24 * 60 - 1), 24 * 60 - 1),
    zulu=st.booleans(),
)
def test_parse_rfc3339_matches_datetime(
    moment: datetime, nanos: int, digits: int, offset_min: int, zulu: bool
) -> None:
    moment = moment.replace(microsecond=0)
    if zulu:
        offset_min = 0
    nanos = nanos // 10 ** (9 - digits) * 10 ** (9 - digits)  # keep `digits` fraction digits
    fraction = f".{nanos:09d}"[: digits + 1] if digits else ""
    if zulu:
        zone = "Z"
    else:
        sign = "-" if offset_min < 0 else "+"
        zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_min)))
    expected = (aware - EPOCH) // timedelta(seconds=1) * NS + nanos
    assert parse_rfc3339_ns(text) == expected


def test_event_date_ns_property() -> None:
    [event] = decode_events(as_array([ev(event_date="2018-03-04T16:13:19.5+03:00")]))
    # stored as messages carry it: UTC, Go's RFC3339Nano
    assert event.event_date == "2018-03-04T13:13:19.5Z"
    assert event.date_ns == 1_520_169_199_500_000_000
    issues = decode_batch(as_array([ev(event_date="9999-12-31T23:30:00-01:00")])).issues
    assert [(i.index, i.field) for i in issues] == [(0, "event_date")]
    assert "outside the years 0001-9999 in UTC" in issues[0].reason
    # a fraction finer than nanoseconds is cut to them (Go's time.Parse does the same)
    [fine] = decode_events(as_array([ev(event_date="2018-03-04T13:13:19.12345678919Z")]))
    assert fine.event_date == "2018-03-04T13:13:19.123456789Z"
    assert fine.date_ns == 1_520_169_199_123_456_789
    (issue,) = decode_batch(as_array([ev(event_date="2018-03-04T13:13:19." + "1" * 31 + "Z")]
                                     )).issues
    assert issue.field == "event_date" and "is not an RFC 3339 time" in issue.reason


def test_intake_entries_round_trip_and_json_entries_still_read() -> None:
    from engine.intake import decode_entry, encode_entry
    from engine.keys import INTAKE_FIELD

    events = [Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1,
                    id=f"e{i}", list_id=i, event_data={"campaign_id": i}) for i in range(300)]
    packed = encode_entry(events)
    assert packed[:1] != b"["
    want = msgspec.to_builtins(events)
    assert msgspec.to_builtins(decode_entry({INTAKE_FIELD: packed})) == want
    # entries an older version wrote as JSON
    assert msgspec.to_builtins(decode_entry({INTAKE_FIELD: encode_events(events)})) == want


# --- ids within int64 ------------------------------------------------------------------------

BIG = 2**63


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"list_id": BIG}, "list_id", "Expected `int` <= 9223372036854775807"),
    ({"resource_id": -1}, "resource_id", "Expected `int` >= 0"),
    ({"segment_ids": [1, BIG]}, "segment_ids[1]", "Expected `int` <= 9223372036854775807"),
    ({"account_id": BIG}, "account_id", "must be <= 9223372036854775807"),
    ({"event_data": {"campaign_id": BIG}}, "event_data.campaign_id",
     "expected an id from 0 to 9223372036854775807, got 9223372036854775808"),
])
def test_ids_beyond_int64_or_negative_are_bad_events(fields: dict[str, Any], field: str,
                                                     reason: str) -> None:
    """Matching keeps ids in int64 columns: a larger id would fail every round of the
    partition that reads it, so it is refused at intake, naming the field."""
    good = {"event_type": "click", "event_date": DATE, "account_id": 1}
    batch = decode_batch(msgspec.json.encode([good, {**good, **fields}]))
    assert len(batch.events) == 1
    assert [(i.index, i.field, i.reason) for i in batch.issues] == [(1, field, reason)]


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"campaign_id": 6, "event_data": {"campaign_id": 5}}, "event_data.campaign_id",
     "5 differs from the event's campaign_id 6"),
    ({"resource_id": 1, "event_data": {"resource_id": 0}}, "event_data.resource_id",
     "0 differs from the event's resource_id 1"),
    ({"message_id": 7, "event_data": {"message_id": 8}}, "event_data.message_id",
     "8 differs from the event's message_id 7"),
    ({"pixel_id": 1, "event_data": {"pixel_id": 2}}, "event_data.pixel_id",
     "2 differs from the event's pixel_id 1"),
    ({"segment_ids": [], "event_data": {"segment_id": 5}}, "event_data.segment_id",
     "5 is not among the event's segment_ids []"),
    ({"segment_ids": [3, 4], "event_data": {"segment_id": 5}}, "event_data.segment_id",
     "5 is not among the event's segment_ids [3, 4]"),
])
def test_ids_contradicting_the_top_level_are_bad_events(fields: dict[str, Any], field: str,
                                                        reason: str) -> None:
    """Matching uses the top-level id and the message carries event_data as sent: a hook
    filtered on campaign 6 would deliver a message showing campaign 5."""
    good = {"event_type": "click", "event_date": DATE, "account_id": 1}
    batch = decode_batch(msgspec.json.encode([good, {**good, **fields}]))
    assert len(batch.events) == 1
    assert [(i.index, i.field, i.reason) for i in batch.issues] == [(1, field, reason)]
    with pytest.raises(ValueError, match=f"^{field}: "):
        Event(**{**good, **fields})


def test_a_contradiction_quotes_a_long_segment_list_by_its_start() -> None:
    good = {"event_type": "click", "event_date": DATE, "account_id": 1}
    batch = decode_batch(msgspec.json.encode([{**good, "segment_ids": list(range(1, 100_000)),
                                               "event_data": {"segment_id": 10**6}}]))
    [issue] = batch.issues
    assert issue.field == "event_data.segment_id" and len(issue.reason) < 200, issue.reason


def test_ids_agreeing_with_the_top_level_are_accepted() -> None:
    fields = {"campaign_id": 5, "segment_ids": [5, 6], "resource_id": 0,
              "event_data": {"campaign_id": 5, "segment_id": 6, "resource_id": 0}}
    good = {"event_type": "click", "event_date": DATE, "account_id": 1}
    batch = decode_batch(msgspec.json.encode([{**good, **fields},
                                              {**good, "segment_ids": [2],
                                               "event_data": {"segment_id": 0}}]))
    assert batch.issues == []
    assert [(e.campaign_id, e.segment_ids) for e in batch.events] == [(5, [5, 6]), (None, [2])]


def test_event_objects_with_ids_out_of_range_are_refused_by_the_intake(
        redis_client: Any, prefix: str) -> None:
    from engine.errors import EventError
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    events = [Event(event_type="click", event_date=DATE, account_id=1, list_id=3),
              Event(event_type="click", event_date=DATE, account_id=1, campaign_id=BIG),
              Event(event_type="click", event_date=DATE, account_id=1, segment_ids=[2, -4]),
              Event(event_type="click", event_date=DATE, account_id=1, pixel_id=7)]
    good, issues = intake.validate(events)
    assert good == [events[0], events[3]]
    # the same fields and reasons as for JSON events
    assert [(i.index, i.field, i.reason) for i in issues] == [
        (1, "campaign_id", "Expected `int` <= 9223372036854775807"),
        (2, "segment_ids[1]", "Expected `int` >= 0")]
    with pytest.raises(EventError, match="event 1: campaign_id: Expected `int` <= "):
        intake.publish(events)
    assert intake.validate(events[:1]) == (events[:1], [])
    events[0].account_id = BIG  # changed after it was built
    assert [(i.index, i.field) for i in intake.validate(events[:1])[1]] == [(0, "account_id")]


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"list_id": "5"}, "list_id", "Expected `int | null`, got `str`"),
    ({"event_data": None}, "event_data", "Expected `object`, got `None`"),
    ({"profile": [1]}, "profile", "Expected `object | null`, got `array`"),
    ({"is_test": "yes"}, "is_test", "Expected `bool`, got `str`"),
    ({"subscription": [{"resource_id": "x"}]}, "subscription[0].resource_id",
     "Expected `int | null`, got `str`"),
    ({"event_data": {"when": object()}}, "event_data.when", "cannot be encoded: "),
    ({"segment_ids": [1, 2**64]}, "segment_ids[1]", "cannot be encoded: "),
    ({"xxh": b"\x00"}, "_xxh", "Expected `str | null`, got `bytes`"),
    # text no message could carry
    ({"event_data": {"k": "\udcff"}}, "event_data.k", "not valid UTF-8: a lone surrogate"),
    ({"profile_id": "p\ud800"}, "profile_id", "not valid UTF-8: a lone surrogate '\\ud800'"),
    # a key msgpack takes and no JSON message can hold: the partition would fail on it
    ({"event_data": {"x": {None: 1}}}, "event_data.x.None",
     "cannot be encoded: Only dicts with str-like or number-like keys are supported"),
    ({"profile": {"a": {(1, 2): 1}}}, "profile.a.(1, 2)", "cannot be encoded: Only dicts"),
    ({"custom_data": {"k": [{True: 1}]}}, "custom_data.k[0].True",
     "cannot be encoded: Only dicts"),
])
def test_event_objects_with_fields_of_the_wrong_type_are_refused_by_the_intake(
        fields: dict[str, Any], field: str, reason: str, redis_client: Any, prefix: str) -> None:
    """msgspec does not check the types of a Struct built in Python: an event with a
    wrong one would make its whole intake entry unreadable for the partition, so the
    intake refuses it, naming the field, like a JSON event; the others are kept."""
    from engine.intake import Intake, decode_entry, encode_entry
    from engine.keys import INTAKE_FIELD, Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    events = [Event(event_type="click", event_date=DATE, account_id=1, list_id=3)
              for _ in range(3)]
    for name, value in fields.items():
        setattr(events[1], name, value)
    good, issues = intake.validate(events)
    assert good == [events[0], events[2]]
    [issue] = issues
    assert (issue.index, issue.field) == (1, field) and issue.reason.startswith(reason)
    # what is kept reads back as the partition reads it
    read = decode_entry({INTAKE_FIELD: encode_entry(good)})
    assert msgspec.to_builtins(read) == msgspec.to_builtins(good)
    # and a publish of them (checked on the entries it writes) keeps only those
    result = intake.publish(events, partial=True)
    assert result.accepted == 2 and [i.field for i in result.issues] == [field]


def test_a_segment_0_built_in_python_drops_no_bad_segment_beside_it(
        redis_client: Any, prefix: str) -> None:
    """0 is "no segment" and dropped; a None beside it is a bad segment id still."""
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    event = Event(event_type="click", event_date=DATE, account_id=1,
                  segment_ids=[0, None])  # type: ignore[list-item]
    good, issues = intake.validate([event])
    assert good == [] and [(i.field, i.reason) for i in issues] == [
        ("segment_ids[0]", "Expected `int`, got `None`")]


def test_an_unencodable_event_does_not_hide_another_of_the_wrong_type(
        redis_client: Any, prefix: str) -> None:
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    events = [Event(event_type="click", event_date=DATE, account_id=1) for _ in range(3)]
    events[0].event_data = {"when": object()}
    events[2].list_id = "5"  # type: ignore[assignment]
    good, issues = intake.validate(events)
    assert good == [events[1]]
    assert [(i.index, i.field) for i in issues] == [(0, "event_data.when"), (2, "list_id")]


def test_events_refused_at_publish_keep_no_id_they_were_given(
        redis_client: Any, prefix: str) -> None:
    from engine.errors import EventError
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    events = [Event(event_type="click", event_date=DATE, account_id=1) for _ in range(3)]
    events[1].list_id = "5"  # type: ignore[assignment]
    with pytest.raises(EventError, match="event 1: list_id"):
        intake.publish(events)
    assert [e.id for e in events] == [None, None, None]
    # the bad event is counted as rejected (the good ones were not accepted either)
    assert redis_client.hget(Keys(prefix).engine_stats, "events_rejected") == b"1"


def test_an_empty_event_id_is_a_bad_event(
        redis_client: Any, prefix: str) -> None:
    """hook_message_id is derived from the event id: two events with an empty id would
    share one, so an id, when given, must not be empty (JSON and Python events alike)."""
    from engine.intake import Intake
    from engine.keys import Keys

    good = {"event_type": "click", "event_date": DATE, "account_id": 1}
    batch = decode_batch(msgspec.json.encode([good, {**good, "id": ""}]))
    assert [(i.index, i.field) for i in batch.issues] == [(1, "id")]
    assert "length >= 1" in batch.issues[0].reason
    intake = Intake(redis_client, Keys(prefix), 1, 10)
    _, issues = intake.validate([Event(event_type="click", event_date=DATE, account_id=1,
                                       id="")])
    assert [(i.index, i.field) for i in issues] == [(0, "id")]


# --- what decodes but cannot be written --------------------------------------------------


@pytest.mark.parametrize(("fields", "field"), [
    ({"event_data": {"campaign_id": 7, "x": 2**64}}, "event_data.x"),
    ({"profile": {"x": -2**63 - 1}}, "profile.x"),
    ({"custom_data": {"a": [1, {"b": 2**70}]}}, "custom_data.a[1].b"),
    ({"sends_trying_num": 2**64}, "sends_trying_num"),
    ({"subscription": [{"priority": 2**64}]}, "subscription[0].priority"),
])
@pytest.mark.parametrize("encode", [as_array, as_ndjson], ids=["array", "ndjson"])
def test_integers_beyond_64_bits_are_bad_events_naming_the_field(
        fields: dict[str, Any], field: str, encode: Any, redis_client: Any, prefix: str) -> None:
    """JSON has no integer bound, msgpack (the intake's entries) a 64-bit one: such an
    event is refused like any bad event, not the whole request with an error."""
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    body = encode([ev(), ev(**fields), ev()])
    good, issues = intake.validate(body)
    assert len(good) == 2
    assert [(i.index, i.field) for i in issues] == [(1, field)]
    assert issues[0].reason == "cannot be encoded: can't serialize ints < -2**63 or > 2**64 - 1"
    with pytest.raises(EventError, match=re.escape(f"event 1: {field}: cannot be encoded")):
        intake.publish(body)  # refused before anything is written: no Redis needed
    # the bounds themselves are written
    assert intake.validate(encode([ev(event_data={"x": 2**64 - 1, "y": -2**63})]))[1] == []


def test_an_event_nested_deeper_than_a_partition_could_read_is_a_bad_event(
        redis_client: Any, prefix: str) -> None:
    """msgspec gives up on data nested deeper than the recursion limit allows from where
    it runs: what the intake accepts must leave room for a partition's deeper stack."""
    from engine.intake import NESTED_TOO_DEEPLY, Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    deep, fine = "[" * 900 + "]" * 900, "[" * 50 + "]" * 50
    head = f'"event_date": "{DATE}", "account_id": 1'
    body = (f'[{json.dumps(ev())}, {{"event_type": "click", {head}, "event_data": {{"x": {deep}}}}}'
            f', {{"event_type": "open", {head}, "profile": {{"y": {fine}}}}}]')
    good, issues = intake.validate(body)
    assert [e.event_type for e in good] == ["click", "open"]
    assert [(i.index, i.field, i.reason) for i in issues] == [
        (1, "event_data", NESTED_TOO_DEEPLY)]
    with pytest.raises(EventError, match="event 1: event_data: nested too deeply"):
        intake.publish(body)


def test_json_nested_too_deeply_to_decode_is_a_bad_event_or_a_bad_body() -> None:
    """msgspec raises RecursionError on such input: it is reported like malformed input,
    by event where the body can still be split into events (NDJSON lines)."""
    from engine.events import NESTED_TOO_DEEPLY

    deep = "[" * 5000 + "]" * 5000
    event = f'{{"event_type": "click", "event_date": "{DATE}", "account_id": 1, "event_data": '
    batch = decode_batch(f"[{json.dumps(ev())}, {event}{{\"x\": {deep}}}}}]")
    assert (batch.events, triples(batch)) == ([], [(-1, "$", NESTED_TOO_DEEPLY)])
    batch = decode_batch(f"{json.dumps(ev())}\n{event}{{\"x\": {deep}}}}}\n{json.dumps(ev())}")
    assert len(batch.events) == 2 and batch.indices == [0, 2]
    assert triples(batch) == [(1, "$", NESTED_TOO_DEEPLY)]


@pytest.mark.parametrize("value", [None, False, 0.0, "", [], {}])
@pytest.mark.parametrize("dim", ["segment_id", "resource_id", "campaign_id", "message_id",
                                 "pixel_id"])
def test_an_id_in_event_data_is_checked_whatever_its_value_and_the_top_level(
        dim: str, value: Any) -> None:
    """A falsy id (null, false, "") is no id: refused, also where the event names the
    dimension at its top level, since the message carries event_data as sent."""
    top = {"segment_ids": [4]} if dim == "segment_id" else {dim: 4}
    for extra in ({}, top):
        batch = decode_batch(as_array([ev(event_data={dim: value}, **extra)]))
        assert triples(batch) == [(0, f"event_data.{dim}",
                                   f"expected an integer, got {value!r}")]
    good = decode_batch(as_array([ev(event_data={dim: 0}),
                                  ev(event_data={dim: 4}, **top)]))
    assert triples(good) == [] and len(good.events) == 2


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"profile_id": "\ud800"}, "profile_id", "not valid UTF-8: a lone surrogate '\\ud800'"),
    ({"event_data": {"k\udfff": 1}}, "event_data.k\udfff", "not valid UTF-8"),
    ({"profile": {None: 1}}, "profile.None", "cannot be encoded: "),
    ({"event_data": {"x": object()}}, "event_data.x", "cannot be encoded: "),
    ({"custom_data": {"a": [1, {"b": 1j}]}}, "custom_data.a[1].b", "cannot be encoded: "),
])
def test_event_dicts_json_cannot_hold_are_bad_events_naming_the_field(
        fields: dict[str, Any], field: str, reason: str, redis_client: Any,
        prefix: str) -> None:
    """A dict event given in Python with a value JSON cannot hold is one bad event
    (with partial, the others are accepted), never an error of the whole call."""
    from engine.intake import Intake, decode_entry
    from engine.keys import Keys

    keys = Keys(prefix)
    intake = Intake(redis_client, keys, 1, 10)
    intake.ensure_groups()
    events = [ev(id="a"), ev(id="b", **fields), ev(id="c"), Event(**ev(id="d"))]
    good, issues = intake.validate(events)
    assert [e.id for e in good] == ["a", "c", "d"]
    [issue] = issues
    assert (issue.index, issue.field) == (1, field) and issue.reason.startswith(reason)
    # the same fields in an Event among dicts
    mixed = [ev(id="a"), Event(**ev(id="b")), ev(id="c")]
    for name, value in fields.items():
        setattr(mixed[1], name, value)
    good, issues = intake.validate(mixed)
    assert [e.id for e in good] == ["a", "c"]
    [issue] = issues
    assert (issue.index, issue.field) == (1, field) and issue.reason.startswith(reason)
    with pytest.raises(EventError, match=re.escape(f"event 1: {field}: {reason}")):
        intake.publish(events)
    assert redis_client.xlen(keys.intake(0)) == 0  # nothing accepted
    result = intake.publish(events, partial=True)
    assert result.accepted == 3 and result.ids == ["a", "c", "d"]
    [issue] = result.issues
    assert (issue.index, issue.field) == (1, field) and issue.reason.startswith(reason)
    written = redis_client.xrange(keys.intake(0))
    assert sum(len(decode_entry(f)) for _, f in written) == 3
    # rejected: once refused whole, once left out of the partial publish
    assert redis_client.hget(keys.engine_stats, "events_rejected") == b"2"


def test_a_text_body_holding_a_lone_surrogate_names_its_event(
        redis_client: Any, prefix: str) -> None:
    """A body given as Python text with a lone surrogate itself in it (not the JSON
    escape): that event is bad, named by its field, in an array and in NDJSON (whose
    whole body was refused). Never a UnicodeEncodeError."""
    from engine.intake import Intake
    from engine.keys import Keys

    intake = Intake(redis_client, Keys(prefix), 1, 10)
    intake.ensure_groups()
    good = json.dumps(ev(id="g"))
    bad = json.dumps(ev(id="b", profile_id="p"))[:-1] + ', "name": "a\ud800"}'
    result = intake.publish(f"[{good}, {bad}]", partial=True)
    assert result.accepted == 1 and result.ids == ["g"]
    [issue] = result.issues
    assert (issue.index, issue.field) == (1, "name")
    assert issue.reason.startswith("not valid UTF-8: a lone surrogate")
    other = json.dumps(ev(id="g2"))
    lines = intake.publish(f"{other}\n{bad}", partial=True)
    assert lines.accepted == 1 and lines.ids == ["g2"]
    assert [(i.index, i.field) for i in lines.issues] == [(1, "name")]
    with pytest.raises(EventError, match="1 bad event"):  # not partial: none accepted
        intake.publish(f"{good}\n{bad}")
