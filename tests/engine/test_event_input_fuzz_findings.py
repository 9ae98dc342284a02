"""Regressions of the input fuzz review (/work/reviews/fuzz/REPORT.md, findings 3, 7
and 9): events built in Python with fields of the wrong type, a key that is no string,
keys JSON writes as the same text, and bodies holding bytes that are not UTF-8. Each
bad event is refused naming its field, never with a bare TypeError."""

from __future__ import annotations

import enum
import re
import uuid
from typing import Any

import msgspec
import pytest

from engine.catalogue import load_catalogue
from engine.errors import EventError
from engine.events import Event, Subscription
from engine.intake import Intake, decode_entry
from engine.keys import Keys

DATE = "2018-03-04T13:13:19Z"


def event(**fields: Any) -> Event:
    return Event(**{"event_type": "click", "event_date": DATE, "account_id": 1, **fields})


def triples(issues: list[Any]) -> list[tuple[int, str, str]]:
    return [(i.index, i.field, i.reason) for i in issues]


@pytest.fixture
def intake(redis_client: Any, prefix: str) -> Intake:
    made = Intake(redis_client, Keys(prefix), 1, 10)
    made.ensure_groups()
    return made


# --- finding 3: an event_type that is no string, built in Python ------------------------


@pytest.mark.parametrize(("value", "got"), [(["click"], "array"), ({"a": 1}, "object"),
                                            (5, "int")])
def test_an_event_type_of_another_type_is_a_bad_event_naming_it(
        value: Any, got: str, intake: Intake, redis_client: Any, prefix: str) -> None:
    """An unhashable code (a list, a dict) raised TypeError: unhashable type from the
    intake's catalogue check, in validate and in publish (partial too)."""
    bad = event(event_type=value)
    events = [event(id="a"), bad, event(id="c")]
    want = [(1, "event_type", f"Expected `str`, got `{got}`")]
    good, issues = intake.validate(events)
    assert (good, triples(issues)) == ([events[0], events[2]], want)
    with pytest.raises(EventError) as info:
        intake.publish(events)
    assert str(info.value) == (f"1 bad event(s), nothing accepted: event 1: event_type: "
                               f"Expected `str`, got `{got}`")
    assert redis_client.xlen(Keys(prefix).intake(0)) == 0
    result = intake.publish(events, partial=True)
    assert (result.accepted, result.ids, triples(result.issues)) == (2, ["a", "c"], want)
    with pytest.raises(EventError, match="event 0: event_type: Expected `str`"):
        intake.publish([bad])
    assert intake.publish([bad], partial=True).accepted == 0


def test_an_event_type_written_as_text_but_no_string_is_still_an_unknown_code(
        intake: Intake) -> None:
    """msgpack writes an Enum member or a UUID as text, which reads back: such a code
    is still refused as unknown (only one of another JSON type is named by its type)."""
    class Code(enum.Enum):
        CLICK = "click"

    events = [event(event_type=Code.CLICK), event(event_type=uuid.UUID(int=1))]
    good, issues = intake.validate(events)
    assert good == [] and triples(issues) == [
        (0, "event_type", "unknown event type <Code.CLICK: 'click'>"),
        (1, "event_type", "unknown event type UUID('00000000-0000-0000-0000-000000000001')")]


def test_a_refusal_counts_bad_events_not_issues(intake: Intake) -> None:
    """One event with two issues (a field of the wrong type and an unknown code) is one
    bad event, as events_rejected counts it."""
    bad = event(event_type="nope")
    bad.list_id = "5"  # type: ignore[assignment]  # changed after it was built
    with pytest.raises(EventError) as info:
        intake.publish([event(), bad])
    assert str(info.value) == (
        "1 bad event(s), nothing accepted: event 1: list_id: Expected `int | null`, got "
        "`str`; event 1: event_type: unknown event type 'nope'")
    assert len(info.value.issues) == 2


# --- finding 3: fields of the wrong type when an Event is built ------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"event_date": 20180304},
     "event_date: expected a string (an RFC 3339 time), got 20180304"),
    ({"event_date": [DATE]},
     "event_date: expected a string (an RFC 3339 time), got ['2018-03-04T13:13:19Z']"),
    ({"account_id": "23"}, "account_id: expected an integer, got '23'"),
    ({"account_id": None}, "account_id: expected an integer, got None"),
    ({"segment_ids": "4"}, "segment_ids: expected an array of ids, got '4'"),
    ({"segment_ids": 5}, "segment_ids: expected an array of ids, got 5"),
    ({"event_data": ["campaign_id"]}, "event_data: expected an object, got ['campaign_id']"),
    ({"event_data": "campaign_id"}, "event_data: expected an object, got 'campaign_id'"),
])
def test_an_event_built_with_a_field_of_the_wrong_type_is_refused_naming_it(
        fields: dict[str, Any], message: str) -> None:
    """README: "a field of the wrong type is refused, naming it". __post_init__ used
    these fields as they came and raised a bare TypeError naming none."""
    with pytest.raises(ValueError) as info:
        event(**fields)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:  # replace runs the checks again
        msgspec.structs.replace(event(), **fields)
    assert str(info.value) == message


def test_a_wrong_type_the_checks_can_use_is_named_when_published(intake: Intake) -> None:
    """A float account id compares as a number, so building the event lets it pass (a
    check of every field's type there cost every decoded event 80 ns); the intake's
    type check names it before anything is accepted."""
    built = event(account_id=1.0)
    assert triples(intake.validate([built])[1]) == [
        (0, "account_id", "Expected `int`, got `float`")]
    with pytest.raises(EventError, match="1 bad event"):
        intake.publish([built])


def deep_list(levels: int = 5000) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(("fields", "message"), [
    ({"event_date": deep_list()},
     "event_date: expected a string (an RFC 3339 time), got a list nested too deeply "
     "to be shown"),
    ({"event_data": {"pixel_id": deep_list()}},
     "event_data.pixel_id: expected an integer, got a list nested too deeply to be shown"),
])
def test_a_value_too_deep_to_show_is_refused_naming_its_field(
        fields: dict[str, Any], message: str) -> None:
    """Quoting it back raised RecursionError, naming nothing."""
    with pytest.raises(ValueError) as info:
        event(**fields)
    assert str(info.value) == message


def test_fields_of_other_usable_types_are_still_taken_when_built() -> None:
    """An array of ids given as a tuple or a set is written as an array (as msgspec
    writes them); a 0 in it is still dropped."""
    assert event(segment_ids=(4, 0)).segment_ids == [4]
    assert event(segment_ids={4}).segment_ids == {4}
    assert event(event_data={"segment_id": 4}, segment_ids=(4,)).segment_ids == (4,)


def test_decoded_events_are_checked_by_msgspec_as_before() -> None:
    """JSON gives exact types: the same errors as before, field named by msgspec."""
    from engine.events import decode_batch

    batch = decode_batch(b'[{"event_type": "click", "event_date": 20180304, "account_id": 1},'
                         b' {"event_type": "click", "event_date": "x", "account_id": 1}]',
                         load_catalogue())
    assert triples(batch.issues) == [
        (0, "event_date", "Expected `str`, got `int`"),
        (1, "event_date", "'x' is not an RFC 3339 time like 2018-03-04T13:13:19.034315796Z")]


# --- finding 3: a key that is no string, directly in a dict field ------------------------


@pytest.mark.parametrize(("fields", "field"), [
    ({"event_data": {1: "x"}}, "event_data"),
    ({"profile": {"a": 1, 2: "x"}}, "profile"),
    ({"custom_data": {3: 4}}, "custom_data"),
    ({"subscription": [Subscription(ccsub={1: "x"})]},  # type: ignore[dict-item]
     "subscription[0].ccsub"),
])
def test_a_key_that_is_no_string_directly_in_a_dict_field_names_that_field(
        fields: dict[str, Any], field: str, intake: Intake) -> None:
    """msgspec says "- at `key` in `$.event_data`", which was read as no path ("$")."""
    good, issues = intake.validate([event(), event(**fields)])
    assert len(good) == 1
    assert triples(issues) == [(1, field, "a key: Expected `str`, got `int`")]


# --- finding 9: keys JSON writes as the same text --------------------------------------


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"event_data": {"lat": {1: "a", "1": "b"}}}, "event_data.lat",
     "duplicate key: 1 and '1' are both written as '1' in JSON"),
    ({"profile": {"a": [{"1": 1, 1: 2}]}}, "profile.a[0]",
     "duplicate key: '1' and 1 are both written as '1' in JSON"),
    ({"custom_data": {"k": {"x": {-7: 1, "-7": 2}}}}, "custom_data.k.x",
     "duplicate key: -7 and '-7' are both written as '-7' in JSON"),
    ({"subscription": [Subscription(ccsub={"k": {1.5: 1, "1.5": 2}})]},
     "subscription[0].ccsub.k", "duplicate key: 1.5 and '1.5' are both written as '1.5' in JSON"),
])
def test_keys_written_as_the_same_json_text_are_a_bad_event_naming_the_object(
        fields: dict[str, Any], field: str, reason: str, intake: Intake,
        redis_client: Any, prefix: str) -> None:
    """msgpack keeps 1 and "1" apart, and each message then carried the key twice."""
    events = [event(id="a"), event(id="b", **fields), event(id="c")]
    good, issues = intake.validate(events)
    assert (good, triples(issues)) == ([events[0], events[2]], [(1, field, reason)])
    with pytest.raises(EventError, match=re.escape(f"1 bad event(s), nothing accepted: "
                                                   f"event 1: {field}: {reason}")):
        intake.publish(events)
    keys = Keys(prefix)
    assert redis_client.xlen(keys.intake(0)) == 0
    result = intake.publish(events, partial=True)
    assert (result.accepted, result.ids, triples(result.issues)) == (
        2, ["a", "c"], [(1, field, reason)])
    written = [e for _, f in redis_client.xrange(keys.intake(0)) for e in decode_entry(f)]
    assert [e.id for e in written] == ["a", "c"]


def test_number_keys_that_collide_with_nothing_are_still_accepted(
        intake: Intake, redis_client: Any, prefix: str) -> None:
    """README: given in Python, a number key is written as text."""
    events = [event(id="a", event_data={"lat": {1: "a", "2": "b", 3.5: "c"}}),
              event(id="b", profile={"p": [{7: 1}]})]
    assert intake.validate(events) == (events, [])
    result = intake.publish(events)
    assert (result.accepted, result.issues) == (2, [])
    written = [e for _, f in redis_client.xrange(Keys(prefix).intake(0)) for e in decode_entry(f)]
    assert [msgspec.json.decode(msgspec.json.encode(e.event_data or e.profile))
            for e in written] == [{"lat": {"1": "a", "2": "b", "3.5": "c"}}, {"p": [{"7": 1}]}]


# --- finding 7: bytes that are not UTF-8 inside an event ------------------------------


GOOD = b'{"event_type":"click","event_date":"%s","account_id":23}' % DATE.encode()


def bad_line(value: bytes, field: bytes = b"profile_id") -> bytes:
    return (b'{"event_type":"click","event_date":"%s","account_id":23,"%s":"p%s"}'
            % (DATE.encode(), field, value))


def as_array(*items: bytes) -> bytes:
    return b"[" + b",".join(items) + b"]"


def as_ndjson(*items: bytes) -> bytes:
    return b"\n".join(items) + b"\n"


@pytest.mark.parametrize(("junk", "reason"), [
    (b"\xff", "not valid UTF-8: the byte 0xff at character 1"),
    (b"\xc0\xaf", "not valid UTF-8: the bytes 0xc0 0xaf at character 1"),  # overlong
    (b"\xe2\x82", "not valid UTF-8: the bytes 0xe2 0x82 at character 1"),  # truncated
])
@pytest.mark.parametrize("body", [as_array, as_ndjson], ids=["array", "ndjson"])
def test_bytes_that_are_not_utf8_name_their_field(
        junk: bytes, reason: str, body: Any, intake: Intake) -> None:
    """A lone surrogate named its field; a raw byte that is not UTF-8 was "$"."""
    from engine.bodies import decode_body

    data = body(GOOD, bad_line(junk))
    good, issues = intake.validate(data)
    assert len(good) == 1 and triples(issues) == [(1, "profile_id", reason)]
    batch, _ = decode_body(data, load_catalogue())  # as POST /v1/events decodes it
    assert len(batch.events) == 1 and triples(batch.issues) == [(1, "profile_id", reason)]
    with pytest.raises(EventError, match=re.escape(f"event 1: profile_id: {reason}")):
        intake.publish(data)  # still refused


@pytest.mark.parametrize("body", [as_array, as_ndjson], ids=["array", "ndjson"])
def test_bytes_that_are_not_utf8_in_a_key_or_deep_down_name_where(
        body: Any, intake: Intake) -> None:
    head = b'{"event_type":"click","event_date":"%s","account_id":23,' % DATE.encode()
    data = body(GOOD, head + b'"event_data":{"a\xffb":1}}',
                head + b'"event_data":{"x":[1,{"y":"ab\xff\xfe"}]}}')
    good, issues = intake.validate(data)
    assert len(good) == 1 and triples(issues) == [
        (1, "event_data", "a key is not valid UTF-8: the byte 0xff at character 1"),
        (2, "event_data.x[1].y", "not valid UTF-8: the bytes 0xff 0xfe at character 2")]


@pytest.mark.parametrize("body", [as_array, as_ndjson], ids=["array", "ndjson"])
def test_a_lone_surrogate_and_a_byte_that_is_not_utf8_in_one_body(
        body: Any, intake: Intake) -> None:
    """An array with both was refused whole as malformed JSON ("unexpected end of hex
    escape"): each is its own bad event, named."""
    data = body(GOOD, bad_line(b"\\ud800"), bad_line(b"\xff", b"send_id"), GOOD)
    good, issues = intake.validate(data)
    assert len(good) == 2 and triples(issues) == [
        (1, "profile_id", "not valid UTF-8: a lone surrogate '\\ud800' at character 1"),
        (2, "send_id", "not valid UTF-8: the byte 0xff at character 1")]
