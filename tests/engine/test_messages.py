"""Hook messages (spec d) and their encodings (spec e)."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.assembly import Assembler, Round
from engine.catalogue import load_catalogue
from engine.events import Event, Subscription, decode_events
from engine.hooks import Hook, parse_hook
from engine.messages import (
    Message,
    MessageBuilder,
    encode_message,
    http_body,
    kafka_key,
    message_date,
    message_id,
    routing_key,
)
from engine.names import NameCatalogue

# When a hypothesis test fails, its pytest plugin imports libcst (to suggest a patch),
# which warns through mypy_extensions; with filterwarnings=error that warning would
# turn the failure report into an INTERNALERROR that aborts the whole run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

URL = "http://127.0.0.1:9/x"
DATE = "2016-11-15T09:12:28.514388956Z"
REQUIRED = {"event_type", "event_date", "account_id", "is_test", "event_data", "hook_message_id"}
CATALOGUE = load_catalogue()


def make_hook(hook_id: int | None = 1, **kw: Any) -> Hook:
    data: dict[str, Any] = {
        "id": hook_id, "name": "h", "account_id": 161, "actions": ["deliv"],
        "target": {"http_batch": {"url": URL}},
    }
    data.update(kw)
    return parse_hook(data)


def make_event(**kw: Any) -> Event:
    fields: dict[str, Any] = {"event_type": "deliv", "event_date": DATE, "account_id": 161,
                              "id": "ev-1"}
    fields.update(kw)
    return Event(**fields)


def build(event: Event, hook: Hook | None = None,
          content: dict[tuple[int, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The message as a receiver sees it: the decoded JSON object."""
    msg = MessageBuilder(hook or make_hook()).build(event, content)
    return json.loads(encode_message(msg))


def nulls(value: Any, path: str = "$") -> list[str]:
    """Paths of every null inside a decoded JSON value."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
    return []


# --- the documented HTTP example (spec e) --------------------------------------------------


SPEC_BODY = [{
    "event_type": "deliv", "list_id": 50, "account_id": 161,
    "_xxh": "5ada5e6ea3c6da5f", "_md5": "a5656dc1e3f603063a1918d582a10f58",
    "event_data": {"message_id": 5, "segment_id": 0, "campaign_id": 130},
    "event_date": "2016-11-15T09:12:28.514388956Z",
    "custom_data": {"email": "eddie@test-ukr.net"},
}]


def test_documented_http_example() -> None:
    producer = [{**{k: v for k, v in SPEC_BODY[0].items() if k != "custom_data"},
                 "id": "spec-e", "profile": {"email": "eddie@test-ukr.net", "name": "Eddie"}}]
    events = decode_events(json.dumps(producer))
    hook = make_hook(hook_id=7, custom_data={"fields": ["email"]})
    body = http_body(MessageBuilder(hook).encode(events))
    expected = [{**SPEC_BODY[0], "is_test": False, "hook_message_id": message_id(7, "spec-e")}]
    assert json.loads(body) == expected
    assert re.fullmatch(r"[0-9a-f]{24}-7", expected[0]["hook_message_id"])


# --- optional keys ---------------------------------------------------------------------------


def test_minimal_message_has_the_required_keys_only() -> None:
    body = build(make_event(event_type="import_api"))
    assert body == {
        "event_type": "import_api", "event_date": DATE, "account_id": 161, "is_test": False,
        "event_data": {}, "hook_message_id": message_id(1, "ev-1"),
    }
    deliv = build(make_event())
    assert set(deliv) == REQUIRED
    assert deliv["event_data"] == {"segment_id": 0}
    assert nulls(deliv) == []


def test_every_optional_key_when_set() -> None:
    sub = {"resource_id": 3, "channel": "email", "email": "a@example.org",
           "status": "subscribed"}
    event = make_event(
        profile_id="abcdefgh12345678", xxh="ad1850e0d1d9481e",
        md5="145bb30f7ddf1184cb560bc4b7705646", list_id=111, sends_trying_num=2,
        is_test=True, is_static=False, subscription_hash_id="0a4b910312345",
        subscription=[Subscription(**sub)], send_id="s-1",
        event_data={"message_id": 5, "campaign_id": 130, "segment_id": 0, "resource_id": 3},
    )
    hook = make_hook(send_content=True, custom_data={"pairs": {"k": "v"}})
    content = {(161, "s-1"): {"subject": "Hi", "html": "<p>Hi</p>"}}
    assert build(event, hook, content) == {
        "event_type": "deliv",
        "event_date": DATE,
        "profile_id": "abcdefgh12345678",
        "_xxh": "ad1850e0d1d9481e",
        "_md5": "145bb30f7ddf1184cb560bc4b7705646",
        "list_id": 111,
        "account_id": 161,
        "sends_trying_num": 2,
        "is_test": True,
        "is_static": False,
        "subscription_hash_id": "0a4b910312345",
        "custom_data": {"k": "v"},
        "event_data": {"message_id": 5, "campaign_id": 130, "segment_id": 0, "resource_id": 3},
        "subscription": [sub],
        "content": {"subject": "Hi", "html": "<p>Hi</p>"},
        "hook_message_id": message_id(1, "ev-1"),
    }


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("profile_id", "p1", "profile_id"),
        ("xxh", "ad1850e0d1d9481e", "_xxh"),
        ("md5", "145bb30f7ddf1184cb560bc4b7705646", "_md5"),
        ("list_id", 50, "list_id"),
        ("list_id", 0, "list_id"),
        ("sends_trying_num", 1, "sends_trying_num"),
        ("is_static", True, "is_static"),
        ("is_static", False, "is_static"),
        ("subscription_hash_id", "h1", "subscription_hash_id"),
        ("subscription", [], "subscription"),
    ],
)
def test_optional_key_present_exactly_when_set(field: str, value: Any, key: str) -> None:
    assert key not in build(make_event())
    body = build(make_event(**{field: value}))
    assert body[key] == value
    assert set(body) == REQUIRED | {key}


@pytest.mark.parametrize("tries", [None, 0, -1])
def test_sends_trying_num_only_when_positive(tries: int | None) -> None:
    assert "sends_trying_num" not in build(make_event(sends_trying_num=tries))


@pytest.mark.parametrize("is_test", [False, True])
def test_is_test_always_present(is_test: bool) -> None:
    assert build(make_event(is_test=is_test))["is_test"] is is_test
    assert build(make_event(event_type="import_file", is_test=is_test))["is_test"] is is_test


def test_deleted_profile_fields_are_null() -> None:
    event = make_event(
        profile_id="p1", xxh="ad1850e0d1d9481e", md5="145bb30f7ddf1184cb560bc4b7705646",
        subscription=[Subscription(resource_id=1, channel="email", email="a@example.org")],
        profile={"email": "a@example.org"}, profile_deleted=True, list_id=50,
        subscription_hash_id="h1", sends_trying_num=1,
    )
    hook = make_hook(custom_data={"fields": ["email"], "pairs": {"k": "v"}})
    body = build(event, hook)
    assert body == {
        "event_type": "deliv", "event_date": DATE, "account_id": 161, "is_test": False,
        "event_data": {"segment_id": 0}, "hook_message_id": message_id(1, "ev-1"),
        "list_id": 50, "subscription_hash_id": "h1", "sends_trying_num": 1,
        "profile_id": None, "_xxh": None, "_md5": None, "subscription": None,
        "custom_data": {"email": None, "k": "v"},
    }
    # null even when the producer sent none of them
    bare = build(make_event(profile_deleted=True))
    assert sorted(nulls(bare)) == ["$._md5", "$._xxh", "$.profile_id", "$.subscription"]
    assert "custom_data" not in bare


# --- event_date ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_date", "expected"),
    [
        # already as Go's RFC3339Nano writes UTC: kept
        (DATE, DATE),
        ("2016-11-15T09:12:28Z", "2016-11-15T09:12:28Z"),
        ("2016-11-15T09:12:28.5Z", "2016-11-15T09:12:28.5Z"),
        # otherwise normalised to it when the event is made (trailing zeros trimmed, as
        # Go does; a lowercase t; a leap second, as :59 like the template parameters)
        ("2016-11-15T09:12:28.500000000Z", "2016-11-15T09:12:28.5Z"),
        ("2016-11-15t09:12:28.5Z", "2016-11-15T09:12:28.5Z"),
        ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59Z"),
        ("2016-11-15T12:12:28.514388956+03:00", DATE),
        ("2016-11-15T03:42:28.100-05:30", "2016-11-15T09:12:28.1Z"),
        ("2016-11-15T09:12:28+00:00", "2016-11-15T09:12:28Z"),
        ("2016-11-15T09:12:28.000000000-00:00", "2016-11-15T09:12:28Z"),
        ("2016-11-16T01:00:00.000000001+02:00", "2016-11-15T23:00:00.000000001Z"),
        ("2016-11-15t09:12:28.5z", "2016-11-15T09:12:28.5Z"),
        ("0999-01-02T03:04:05+01:00", "0999-01-02T02:04:05Z"),
    ],
)
def test_event_date(event_date: str, expected: str) -> None:
    event = make_event(event_date=event_date)
    assert message_date(event) == expected
    assert build(event)["event_date"] == expected


def test_message_date_uses_a_given_instant() -> None:
    """An event stored by an earlier version, which kept the date as sent, is
    normalised when its message is built; a date in Z is never re-formatted."""
    from engine.intake import StoredEvent

    event = StoredEvent(event_type="click", account_id=1,
                        event_date="2016-11-15T12:12:28+03:00")
    assert event.event_date == "2016-11-15T12:12:28+03:00"
    assert message_date(event) == "2016-11-15T09:12:28Z"
    assert message_date(event, 1_000_000_000_000_000_001) == "2001-09-09T01:46:40.000000001Z"
    assert message_date(make_event(), 0) == DATE


@pytest.mark.parametrize("event_date", ["0001-01-01T00:00:00+01:00",
                                        "9999-12-31T23:59:59-01:00"])
def test_a_date_outside_years_1_to_9999_in_utc_is_refused(event_date: str) -> None:
    with pytest.raises(ValueError, match=r"event_date: .* outside the years 0001-9999 in UTC"):
        make_event(event_date=event_date)


# --- event_data ---------------------------------------------------------------------------------


DIMS = {"campaign_id": 973, "message_id": 17, "segment_ids": [4, 9], "resource_id": 3,
        "pixel_id": 12}


@pytest.mark.parametrize(
    "code", CATALOGUE.by_category("tracking") + CATALOGUE.by_category("delivery")
)
def test_tracking_and_delivery_event_data_filled(code: str) -> None:
    event = make_event(event_type=code, event_data={"ip": "10.9.0.14"}, **DIMS)
    assert build(event)["event_data"] == {
        "ip": "10.9.0.14", "message_id": 17, "campaign_id": 973, "segment_id": 4,
        "resource_id": 3,
    }
    # nothing known: segment_id is 0, the other ids are left out
    assert build(make_event(event_type=code))["event_data"] == {"segment_id": 0}
    partial = make_event(event_type=code, campaign_id=5)
    assert build(partial)["event_data"] == {"campaign_id": 5, "segment_id": 0}


@pytest.mark.parametrize("code", CATALOGUE.by_category("import"))
def test_import_event_data_filled(code: str) -> None:
    event = make_event(event_type=code, event_data={"import_id": "i1"}, **DIMS)
    assert build(event)["event_data"] == {"import_id": "i1", "resource_id": 3}
    assert build(make_event(event_type=code))["event_data"] == {}


@pytest.mark.parametrize("code", CATALOGUE.by_category("pixel"))
def test_pixel_event_data_filled(code: str) -> None:
    event = make_event(event_type=code, event_data={"goal": "buy"}, **DIMS)
    assert build(event)["event_data"] == {"goal": "buy", "pixel_id": 12, "resource_id": 3}
    assert build(make_event(event_type=code, pixel_id=12))["event_data"] == {"pixel_id": 12}
    assert build(make_event(event_type=code))["event_data"] == {}


def test_event_data_ids_taken_from_event_data_itself() -> None:
    # the producer's own event_data already holds the ids: nothing is added or changed
    data = {"message_id": 5, "segment_id": 0, "campaign_id": 130, "resource_id": 3}
    assert build(make_event(event_data=dict(data)))["event_data"] == data


def test_producer_values_never_overwritten() -> None:
    """The intake refuses an event whose event_data contradicts its top level; one an
    older version accepted (read back unchecked, as StoredEvent) is delivered with its
    event_data as sent, only missing keys filled."""
    from engine.intake import StoredEvent

    def stored(**kw: Any) -> Event:
        return StoredEvent(**{"event_date": DATE, "account_id": 161, "id": "ev-1", **kw})

    data = {"message_id": 99, "campaign_id": 98, "segment_id": 0}
    event = stored(event_type="click", event_data=dict(data), message_id=17,
                   campaign_id=973, segment_ids=[4], resource_id=3)
    assert build(event)["event_data"] == {**data, "resource_id": 3}
    pixel = stored(event_type="pixel", event_data={"pixel_id": 1, "resource_id": 2},
                   pixel_id=12, resource_id=3)
    assert build(pixel)["event_data"] == {"pixel_id": 1, "resource_id": 2}
    imp = stored(event_type="import_api", event_data={"resource_id": 2}, resource_id=3)
    assert build(imp)["event_data"] == {"resource_id": 2}
    with pytest.raises(ValueError, match=r"event_data\.resource_id: 2 differs"):
        make_event(event_type="import_api", event_data={"resource_id": 2}, resource_id=3)


def test_event_data_of_the_event_not_mutated() -> None:
    event = make_event(event_type="click", event_data={"ip": "10.0.0.1"}, campaign_id=1)
    build(event)
    assert event.event_data == {"ip": "10.0.0.1"}


def test_event_data_of_a_code_added_by_configuration() -> None:
    catalogue = CATALOGUE.extended(
        [{"code": "promo_open", "category": "tracking", "channel": "email"}]
    )
    builder = MessageBuilder(make_hook(), catalogue=catalogue)
    msg = builder.build(make_event(event_type="promo_open", campaign_id=2))
    assert msg.event_data == {"campaign_id": 2, "segment_id": 0}


# --- content ------------------------------------------------------------------------------------


CONTENT = {(161, "s-1"): {"subject": "Hi", "html": "<p>Hi</p>", "text": "Hi"}}


def test_content_attached_when_enabled_and_stored() -> None:
    body = build(make_event(send_id="s-1"), make_hook(send_content=True), CONTENT)
    assert body["content"] == {"subject": "Hi", "html": "<p>Hi</p>", "text": "Hi"}


@pytest.mark.parametrize(
    ("send_content", "send_id", "content"),
    [
        (False, "s-1", CONTENT),  # option off
        (True, "s-2", CONTENT),  # content expired / never stored
        (True, None, CONTENT),  # event has no send id
        (True, "s-1", None),  # no content mapping given
        (True, "s-1", {}),
    ],
)
def test_content_omitted_otherwise(
    send_content: bool, send_id: str | None, content: dict[str, Any] | None
) -> None:
    body = build(make_event(send_id=send_id), make_hook(send_content=send_content), content)
    assert "content" not in body
    assert set(body) == REQUIRED


def test_content_is_only_that_of_the_events_account() -> None:
    """Another account's content under the same send id is never attached, by either
    builder: content is stored per account (two accounts may use one send id, or a
    producer may name another account's)."""
    mine, theirs = make_event(send_id="s-1"), make_event(send_id="s-1", account_id=7)
    hook = make_hook(send_content=True)
    assert build(mine, hook, CONTENT)["content"] == CONTENT[161, "s-1"]
    assert "content" not in build(theirs, hook, CONTENT)
    rnd = Round([mine, theirs], CATALOGUE, NameCatalogue(), CONTENT)
    first, second = (json.loads(m) for m in
                     Assembler(hook, NameCatalogue(), CATALOGUE).assemble(rnd, [0, 1])[0])
    assert first["content"] == CONTENT[161, "s-1"] and "content" not in second


def test_content_is_never_in_a_historical_export() -> None:
    """An event of a deleted profile comes from a historical export: "message content
    is never included" (spec a), even with the option on and content stored."""
    event = make_event(send_id="s-1", profile_deleted=True)
    body = build(event, make_hook(send_content=True), CONTENT)
    assert "content" not in body and body["profile_id"] is None
    hook = make_hook(send_content=True)
    rnd = Round([event, make_event(send_id="s-1")], CATALOGUE, NameCatalogue(), CONTENT)
    historical, live = (json.loads(m) for m in
                        Assembler(hook, NameCatalogue(), CATALOGUE).assemble(rnd, [0, 1])[0])
    assert "content" not in historical and live["content"] == CONTENT[161, "s-1"]


def test_an_event_marked_historical_never_carries_content() -> None:
    """An export of a live profile's past events, marked ``historical``: no content,
    by either builder, and the mark itself is no message field."""
    event = make_event(send_id="s-1", historical=True, profile_id="p1")
    hook = make_hook(send_content=True)
    body = build(event, hook, CONTENT)
    assert "content" not in body and "historical" not in body and body["profile_id"] == "p1"
    rnd = Round([event, make_event(send_id="s-1")], CATALOGUE, NameCatalogue(), CONTENT)
    exported, live = (json.loads(m) for m in
                      Assembler(hook, NameCatalogue(), CATALOGUE).assemble(rnd, [0, 1])[0])
    assert exported == body and live["content"] == CONTENT[161, "s-1"]
    (decoded,) = decode_events(json.dumps([{"event_type": "deliv", "account_id": 1,
                                            "event_date": DATE, "historical": True}]))
    assert decoded.historical is True


# --- hook_message_id --------------------------------------------------------------------------


def test_message_id_stable() -> None:
    event = make_event(id="ev-1")
    first = build(event, make_hook(hook_id=1))["hook_message_id"]
    again = build(make_event(id="ev-1", is_test=True), make_hook(hook_id=1))["hook_message_id"]
    assert first == again == message_id(1, "ev-1")
    assert re.fullmatch(r"[0-9a-f]{24}-1", first)
    builder = MessageBuilder(make_hook(hook_id=1))
    assert {builder.build(event).hook_message_id for _ in range(3)} == {first}


def test_message_id_differs_by_hook_and_event() -> None:
    ids = {
        message_id(1, "ev-1"), message_id(2, "ev-1"), message_id(1, "ev-2"),
        message_id(2, "ev-2"), message_id(12, "ev-1"), message_id(1, "2:ev-1"),
    }
    assert len(ids) == 6
    assert build(make_event(id="ev-1"), make_hook(hook_id=2))["hook_message_id"] == message_id(
        2, "ev-1"
    )
    assert build(make_event(id="ev-2"))["hook_message_id"] == message_id(1, "ev-2")


@given(st.text(max_size=30), st.text(max_size=30))
def test_message_id_distinct_events_distinct_ids(a: str, b: str) -> None:
    assert (message_id(5, a) == message_id(5, b)) is (a == b)


# --- encodings --------------------------------------------------------------------------------


def test_http_body_is_a_json_array_of_the_parts() -> None:
    assert http_body([]) == b"[]"
    assert http_body([b'{"a":1}']) == b'[{"a":1}]'
    assert http_body([b'{"a":1}', b'{"b":2}']) == b'[{"a":1},{"b":2}]'
    builder = MessageBuilder(make_hook(custom_data={"pairs": {"d": "{{event_date_ymd}}"}}))
    events = [make_event(id=f"ev-{i}", list_id=i) for i in range(5)]
    parts = builder.encode(events)
    assert len(parts) == 5
    decoded = json.loads(http_body(parts))
    assert decoded == [json.loads(p) for p in parts]
    assert [m["list_id"] for m in decoded] == [0, 1, 2, 3, 4]
    assert [m["hook_message_id"] for m in decoded] == [message_id(1, f"ev-{i}") for i in range(5)]
    assert all(m["custom_data"] == {"d": "2016-11-15"} for m in decoded)


def test_encode_matches_build() -> None:
    builder = MessageBuilder(make_hook(send_content=True))
    events = [make_event(id="a", send_id="s-1"), make_event(id="b", event_type="click")]
    assert builder.encode(events, CONTENT) == [
        encode_message(builder.build(e, CONTENT)) for e in events
    ]
    assert json.loads(builder.encode(events, CONTENT)[0])["content"] == CONTENT[161, "s-1"]


def test_encode_message_is_compact_utf8_json() -> None:
    msg = Message(event_type="click", event_date=DATE, account_id=1, is_test=False,
                  event_data={"city": "Москва"}, hook_message_id="x")
    raw = encode_message(msg)
    assert raw == (
        '{"event_type":"click","event_date":"' + DATE + '","account_id":1,"is_test":false,'
        '"event_data":{"city":"Москва"},"hook_message_id":"x"}'
    ).encode()


@pytest.mark.parametrize(
    ("list_id", "event_type", "expected"),
    [(111, "click", "111.click"), (50, "deliv", "50.deliv"), (None, "deliv", "0.deliv"),
     (0, "import_api", "0.import_api")],
)
def test_routing_key(list_id: int | None, event_type: str, expected: str) -> None:
    assert routing_key(make_event(list_id=list_id, event_type=event_type)) == expected


def test_kafka_key() -> None:
    event = make_event(list_id=111, event_type="click", profile_id="abcdefgh12345678")
    assert kafka_key("list_event", event) == b"111.click"
    assert kafka_key("profile_id", event) == b"abcdefgh12345678"
    assert kafka_key("none", event) is None
    bare = make_event(event_type="click")
    assert kafka_key("list_event", bare) == b"0.click"
    assert kafka_key("profile_id", bare) is None
    assert kafka_key("none", bare) is None


# --- subscription ------------------------------------------------------------------------------


SPEC_SUBSCRIPTION = [{
    "resource_id": 123, "channel": "email", "email": "user@example.com",
    "phone": "+79991234567", "subscription_id": "abc123", "provider": "androidfirebase",
    "priority": 1, "status": "subscribed", "ccsub": {"custom_key": "custom_value"},
}]


def test_subscription_documented_example_round_trips() -> None:
    [event] = decode_events(json.dumps([{
        "event_type": "click", "event_date": DATE, "account_id": 1, "id": "e",
        "subscription": SPEC_SUBSCRIPTION,
    }]))
    assert build(event)["subscription"] == SPEC_SUBSCRIPTION


def test_subscription_items_encode_only_their_set_keys() -> None:
    items = [
        {"resource_id": 1, "channel": "sms", "phone": "+79991234567", "status": "subscribed"},
        {"resource_id": 2, "channel": "push", "subscription_id": "tok", "provider": "apns",
         "priority": 0},
        {"channel": "email", "email": "a@example.org", "ccsub": {}},
        {},
    ]
    [event] = decode_events(json.dumps([{
        "event_type": "deliv", "event_date": DATE, "account_id": 1, "id": "e",
        "subscription": items,
    }]))
    body = build(event)
    assert body["subscription"] == items
    assert nulls(body) == []
    # explicit nulls from the producer are dropped too
    [with_nulls] = decode_events(json.dumps([{
        "event_type": "deliv", "event_date": DATE, "account_id": 1,
        "subscription": [{"resource_id": 1, "email": None, "phone": None}],
    }]))
    assert build(with_nulls)["subscription"] == [{"resource_id": 1}]
    assert msgspec.json.encode(Subscription(channel="sms")) == b'{"channel":"sms"}'


# --- names and custom_data through the builder -------------------------------------------------


def test_builder_renders_custom_data_with_names() -> None:
    names = NameCatalogue()
    names.upsert(161, "campaigns", 130, name="Autumn")
    names.upsert(162, "campaigns", 130, name="not ours")
    hook = make_hook(custom_data={"pairs": {"c": "{{campaign_name}} ({{database_name}})"}})
    builder = MessageBuilder(hook, names)
    msg = builder.build(make_event(event_data={"campaign_id": 130}, list_id=50))
    assert msg.custom_data == {"c": "Autumn ()"}
    # a builder without names renders every name empty
    assert MessageBuilder(hook).build(make_event(campaign_id=130)).custom_data == {"c": " ()"}


# --- property: no null unless the profile is deleted -------------------------------------------


_opt_str = st.none() | st.text(min_size=1, max_size=8)
_opt_int = st.none() | st.integers(min_value=-3, max_value=1000)


@given(
    code=st.sampled_from(CATALOGUE.codes()),
    list_id=st.none() | st.integers(min_value=0, max_value=10**6),
    profile_id=_opt_str, xxh=_opt_str, md5=_opt_str, hash_id=_opt_str,
    tries=_opt_int, is_static=st.none() | st.booleans(), is_test=st.booleans(),
    campaign_id=st.none() | st.integers(min_value=0, max_value=99),
    deleted=st.booleans(),
)
def test_optional_keys_never_null(
    code: str, list_id: int | None, profile_id: str | None, xxh: str | None, md5: str | None,
    hash_id: str | None, tries: int | None, is_static: bool | None, is_test: bool,
    campaign_id: int | None, deleted: bool,
) -> None:
    event = make_event(
        event_type=code, list_id=list_id, profile_id=profile_id, xxh=xxh, md5=md5,
        subscription_hash_id=hash_id, sends_trying_num=tries, is_static=is_static,
        is_test=is_test, campaign_id=campaign_id, profile_deleted=deleted,
    )
    body = build(event)
    expected_keys = set(REQUIRED)
    for key, value in (("list_id", list_id), ("subscription_hash_id", hash_id),
                       ("is_static", is_static)):
        if value is not None:
            expected_keys.add(key)
            assert body[key] == value
    if tries is not None and tries > 0:
        expected_keys.add("sends_trying_num")
        assert body["sends_trying_num"] == tries
    if deleted:
        expected_keys |= {"profile_id", "_xxh", "_md5", "subscription"}
        assert sorted(nulls(body)) == ["$._md5", "$._xxh", "$.profile_id", "$.subscription"]
    else:
        for key, value in (("profile_id", profile_id), ("_xxh", xxh), ("_md5", md5)):
            if value is not None:
                expected_keys.add(key)
                assert body[key] == value
        assert nulls(body) == []
    assert set(body) == expected_keys
    assert body["is_test"] is is_test


@pytest.mark.parametrize(("event_type", "keys"), [
    ("click", {"email"}), ("click_sms", {"phone"}),
    ("click_push", {"subscription_id", "provider"})])
def test_a_test_event_subscription_has_its_channels_keys_only(event_type: str,
                                                              keys: set[str]) -> None:
    from engine.testevent import sample_event

    (sub,) = sample_event(make_hook(actions=[event_type]), event_type).subscription or []
    fields = {k for k, v in msgspec.structs.asdict(sub).items() if v is not None}
    assert fields == {"resource_id", "channel", "priority", "status", "ccsub"} | keys
    assert sub.channel == CATALOGUE.get(event_type).channel


@pytest.mark.parametrize("target, want", [
    ({"rabbitmq_exchange": {"host": "h", "exchange": "x"}}, ["4.click", "0.open"]),
    ({"kafka": {"bootstrap_servers": ["h:9092"], "topic": "t"}}, ["4.click", "0.open"]),
    ({"kafka": {"bootstrap_servers": ["h:9092"], "topic": "t", "key": "profile_id"}},
     ["p1", ""]),
    ({"kafka": {"bootstrap_servers": ["h:9092"], "topic": "t", "key": "none"}}, ["", ""]),
])
def test_a_batch_for_another_kind_of_target_gets_this_targets_keys(
        target: dict[str, Any], want: list[str]) -> None:
    """A batch built for an HTTP target (no keys) and re-sent after the hook's target
    changed: its keys are read back from its messages, as the new target makes them
    from the events (``routing_key``, ``kafka_key``)."""
    from engine.messages import for_target
    from engine.transports.base import Delivery

    events = [Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1,
                    list_id=4, id="a", profile_id="p1"),
              Event(event_type="open", event_date="2026-01-01T00:00:00Z", account_id=1,
                    id="b")]
    old = parse_hook({"id": 1, "name": "h", "account_id": 1, "actions": ["click", "open"],
                      "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
    builder = MessageBuilder(old)
    parts = [encode_message(builder.build(e)) for e in events]
    delivery = Delivery(id="d", hook_id=1, account_id=1, kind="http_batch", parts=parts,
                        message_ids=["m1", "m2"], resends=2)
    hook = parse_hook({**old.to_storage(), "target": target})
    moved = for_target(hook, delivery)
    assert moved.kind == hook.target.kind and moved.keys == want
    assert moved.parts == parts and moved.message_ids == ["m1", "m2"] and moved.resends == 2
    assert for_target(old, delivery) is delivery  # the same kind: as it was


def test_a_kafka_batch_gets_the_keys_of_the_hooks_current_key_choice() -> None:
    """A Kafka batch waiting for a re-send while the hook's ``key`` changed (from
    ``list_event`` to ``profile_id``, say) goes out with the new choice's keys; one
    whose keys still hold is passed on as it is."""
    from engine.messages import for_target
    from engine.transports.base import Delivery

    kafka = {"bootstrap_servers": ["h:9092"], "topic": "t"}
    old = parse_hook({"id": 1, "name": "h", "account_id": 1, "actions": ["click"],
                      "target": {"kafka": kafka}})
    events = [Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1,
                    list_id=4, id=f"e{i}", profile_id=f"p{i}") for i in range(2)]
    parts = [encode_message(MessageBuilder(old).build(e)) for e in events]
    delivery = Delivery(id="d", hook_id=1, account_id=1, kind="kafka", parts=parts,
                        keys=["4.click", "4.click"], message_ids=["m0", "m1"])
    assert for_target(old, delivery) is delivery
    by_profile = parse_hook({**old.to_storage(),
                             "target": {"kafka": {**kafka, "key": "profile_id"}}})
    moved = for_target(by_profile, delivery)
    assert moved.keys == ["p0", "p1"] and moved.kind == "kafka" and moved.parts == parts
    unkeyed = parse_hook({**old.to_storage(), "target": {"kafka": {**kafka, "key": "none"}}})
    assert for_target(unkeyed, delivery).keys == ["", ""]
