"""custom_data rendering (spec g): parameters, sources, precedence, compile-once."""

from __future__ import annotations

import json
import re
import uuid
from calendar import timegm
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import engine.customdata as customdata
from engine.customdata import (
    PARAMETERS,
    CompiledCustomData,
    EventContext,
    compile_value,
    format_event_date,
    format_rfc3339_nano,
)
from engine.events import NS, Event, decode_events, parse_rfc3339_ns
from engine.hooks import CustomData, Hook, parse_hook
from engine.messages import MessageBuilder, encode_message
from engine.names import NameCatalogue

# When a hypothesis test fails, its pytest plugin imports libcst (to suggest a patch),
# which warns through mypy_extensions; with filterwarnings=error that warning would
# turn the failure report into an INTERNALERROR that aborts the whole run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

ACCOUNT = 1
OTHER_ACCOUNT = 2
DATE = "2018-03-04T13:13:19.034315796Z"
DATE_NS = 1_520_169_199_034_315_796


def make_hook(custom_data: dict[str, Any] | None = None, hook_id: int = 1) -> Hook:
    return parse_hook({
        "id": hook_id,
        "name": f"hook {hook_id}",
        "account_id": ACCOUNT,
        "actions": ["click", "deliv"],
        "custom_data": custom_data or {},
        "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}},
    })


def make_event(**kw: Any) -> Event:
    fields: dict[str, Any] = {"event_type": "click", "event_date": DATE, "account_id": ACCOUNT}
    fields.update(kw)
    return Event(**fields)


def full_event(**kw: Any) -> Event:
    """An event with every id a name parameter can look up."""
    fields: dict[str, Any] = {
        "list_id": 50, "campaign_id": 10, "message_id": 5, "segment_ids": [7, 8],
        "resource_id": 3,
    }
    fields.update(kw)
    return make_event(**fields)


@pytest.fixture
def names() -> NameCatalogue:
    cat = NameCatalogue()
    cat.upsert(ACCOUNT, "campaigns", 10, name="Black Friday", subid="bf-2023")
    cat.upsert(ACCOUNT, "databases", 50, name="Customers")
    cat.upsert(ACCOUNT, "segments", 7, name="VIP")
    cat.upsert(ACCOUNT, "segments", 8, name="Second segment")
    cat.upsert(ACCOUNT, "templates", 5, name="Welcome", subject="Hello there")
    cat.upsert(ACCOUNT, "resources", 3, name="Main site")
    return cat


def render(
    spec: dict[str, Any], event: Event, names: NameCatalogue | None = None
) -> dict[str, Any] | None:
    compiled = CompiledCustomData(CustomData(**spec))
    return compiled.render(EventContext(event, names or NameCatalogue()))


def render_value(value: str, event: Event, names: NameCatalogue | None = None) -> str:
    out = render({"pairs": {"v": value}}, event, names)
    assert out is not None
    return out["v"]


def assert_uuid4(text: str) -> None:
    parsed = uuid.UUID(text)
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122
    assert str(parsed) == text  # canonical lower-case, hyphenated form


# --- parameters: the full list --------------------------------------------------------------


def test_parameter_list_is_the_documented_one() -> None:
    assert set(PARAMETERS) == {
        "uuid", "event_date", "event_date_ymd", "event_date_rfc3339", "event_date_unix",
        "event_date_unixnano", "campaign_name", "campaign_subid", "database_name",
        "segment_name", "message_name", "message_subject", "resource_name",
    }


def test_every_parameter_rendered(names: NameCatalogue) -> None:
    pairs = {name: "{{" + name + "}}" for name in PARAMETERS}
    out = render({"pairs": pairs}, full_event(), names)
    assert out is not None
    assert_uuid4(out.pop("uuid"))
    assert out == {
        "event_date": "2018-03-04T13:13:19.034315Z",
        "event_date_ymd": "2018-03-04",
        "event_date_rfc3339": "2018-03-04T13:13:19Z",
        "event_date_unix": "1520169199",
        "event_date_unixnano": "1520169199034315796",
        "campaign_name": "Black Friday",
        "campaign_subid": "bf-2023",
        "database_name": "Customers",
        "segment_name": "VIP",
        "message_name": "Welcome",
        "message_subject": "Hello there",
        "resource_name": "Main site",
    }


# --- {{uuid}} -------------------------------------------------------------------------------


def test_uuid_is_a_valid_uuid4() -> None:
    assert_uuid4(render_value("{{uuid}}", make_event()))


def test_uuid_differs_for_every_message_of_the_same_event() -> None:
    event = make_event()
    compiled = CompiledCustomData(CustomData(pairs={"id": "{{uuid}}"}))
    ctx = EventContext(event, NameCatalogue())
    seen = set()
    for _ in range(50):
        out = compiled.render(ctx)
        assert out is not None
        assert_uuid4(out["id"])
        seen.add(out["id"])
    assert len(seen) == 50


def test_uuid_differs_within_one_message() -> None:
    out = render({"template": {"a": "{{uuid}}"}, "pairs": {"b": "{{uuid}}", "c": "{{uuid}}"}},
                 make_event())
    assert out is not None
    assert len({out["a"], out["b"], out["c"]}) == 3
    two = render_value("{{uuid}}|{{uuid}}", make_event()).split("|")
    assert len(two) == 2
    for part in two:
        assert_uuid4(part)
    assert two[0] != two[1]


def test_uuid_differs_between_hooks_and_rebuilds_of_one_event() -> None:
    event = make_event(id="ev-1")
    b1 = MessageBuilder(make_hook({"pairs": {"id": "{{uuid}}"}}, hook_id=1))
    b2 = MessageBuilder(make_hook({"pairs": {"id": "{{uuid}}"}}, hook_id=2))
    ids = [json.loads(encode_message(b.build(event)))["custom_data"]["id"]
           for b in (b1, b1, b2, b2)]
    for value in ids:
        assert_uuid4(value)
    assert len(set(ids)) == 4


# --- {{event_date}} (Go layout 2006-01-25T15:04:05.999999Z) -------------------------------


@pytest.mark.parametrize(
    ("event_date", "expected"),
    [
        # nanoseconds: truncated (never rounded) to microseconds
        ("2018-03-04T13:13:19.034315796Z", "2018-03-04T13:13:19.034315Z"),
        ("2018-03-04T13:13:19.999999999Z", "2018-03-04T13:13:19.999999Z"),
        ("2018-03-04T13:13:19.123456789Z", "2018-03-04T13:13:19.123456Z"),
        # trailing zeros trimmed
        ("2018-03-04T13:13:19.120000Z", "2018-03-04T13:13:19.12Z"),
        ("2018-03-04T13:13:19.5Z", "2018-03-04T13:13:19.5Z"),
        ("2018-03-04T13:13:00.100Z", "2018-03-04T13:13:00.1Z"),
        ("2018-03-04T13:13:19.000001Z", "2018-03-04T13:13:19.000001Z"),
        # zero fraction: the dot is dropped too
        ("2018-03-04T13:13:19Z", "2018-03-04T13:13:19Z"),
        ("2018-03-04T13:13:19.000000000Z", "2018-03-04T13:13:19Z"),
        ("2018-03-04T13:13:10.000000999Z", "2018-03-04T13:13:10Z"),  # below a microsecond
        ("2018-03-04T00:00:00Z", "2018-03-04T00:00:00Z"),
        # offsets converted to UTC
        ("2018-03-04T08:13:19.034315796-05:00", "2018-03-04T13:13:19.034315Z"),
        ("2018-03-05T02:13:19.5+03:30", "2018-03-04T22:43:19.5Z"),
        ("2018-03-04T13:13:19+00:00", "2018-03-04T13:13:19Z"),
        ("2018-12-31T23:30:00-01:00", "2019-01-01T00:30:00Z"),
        # lower-case t/z accepted, output upper-case
        ("2018-03-04t13:13:19.5z", "2018-03-04T13:13:19.5Z"),
        # four-digit years, before the epoch
        ("0999-01-02T03:04:05.25Z", "0999-01-02T03:04:05.25Z"),
        ("1969-12-31T23:59:59.5Z", "1969-12-31T23:59:59.5Z"),
    ],
)
def test_event_date(event_date: str, expected: str) -> None:
    assert render_value("{{event_date}}", make_event(event_date=event_date)) == expected
    assert format_event_date(parse_rfc3339_ns(event_date)) == expected


# --- other date forms -------------------------------------------------------------------------


DATE_FORMS = "{{event_date_ymd}}|{{event_date_rfc3339}}|{{event_date_unix}}|{{event_date_unixnano}}"


@pytest.mark.parametrize(
    ("event_date", "ymd", "rfc3339", "unix", "unixnano"),
    [
        (DATE, "2018-03-04", "2018-03-04T13:13:19Z", "1520169199", "1520169199034315796"),
        ("2018-03-04T13:13:19Z", "2018-03-04", "2018-03-04T13:13:19Z", "1520169199",
         "1520169199000000000"),
        # offset: the UTC date, which here is the previous day
        ("2018-03-05T00:30:00+03:00", "2018-03-04", "2018-03-04T21:30:00Z", "1520199000",
         "1520199000000000000"),
        ("2018-03-04T23:30:00.999999999-01:00", "2018-03-05", "2018-03-05T00:30:00Z",
         "1520209800", "1520209800999999999"),
        ("1970-01-01T00:00:00Z", "1970-01-01", "1970-01-01T00:00:00Z", "0", "0"),
        # before the epoch: unix seconds floor, like Go's Time.Unix
        ("1969-12-31T23:59:59.5Z", "1969-12-31", "1969-12-31T23:59:59Z", "-1", "-500000000"),
        ("0999-01-02T03:04:05Z", "0999-01-02", "0999-01-02T03:04:05Z", "-30641662555",
         "-30641662555000000000"),
    ],
)
def test_date_forms(event_date: str, ymd: str, rfc3339: str, unix: str, unixnano: str) -> None:
    rendered = render_value(DATE_FORMS, make_event(event_date=event_date))
    assert rendered.split("|") == [ymd, rfc3339, unix, unixnano]


def test_unix_values_are_strings() -> None:
    out = render({"pairs": {"s": "{{event_date_unix}}", "ns": "{{event_date_unixnano}}"}},
                 make_event())
    assert out == {"s": "1520169199", "ns": "1520169199034315796"}


def test_format_rfc3339_nano() -> None:
    assert format_rfc3339_nano(DATE_NS) == DATE
    assert format_rfc3339_nano(1_520_169_199_000_000_000) == "2018-03-04T13:13:19Z"
    assert format_rfc3339_nano(1_520_169_199_500_000_000) == "2018-03-04T13:13:19.5Z"
    assert format_rfc3339_nano(1_520_169_199_000_000_010) == "2018-03-04T13:13:19.00000001Z"
    assert format_rfc3339_nano(-1) == "1969-12-31T23:59:59.999999999Z"


_MIN_NS = timegm((1, 1, 1, 0, 0, 0, 0, 0, 0)) * NS
_MAX_NS = timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0)) * NS + NS - 1


@given(st.integers(min_value=_MIN_NS, max_value=_MAX_NS))
def test_date_formats_agree_with_datetime(ns: int) -> None:
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    iso = dt.replace(tzinfo=None).isoformat(timespec="microseconds")  # zero-padded year
    expected = iso.rstrip("0").rstrip(".") + "Z"
    assert format_event_date(ns) == expected
    # the formats parse back to the same instant (event_date at microsecond precision)
    assert parse_rfc3339_ns(format_event_date(ns)) == ns - ns % 1000
    assert parse_rfc3339_ns(format_rfc3339_nano(ns)) == ns
    event = make_event(event_date=format_rfc3339_nano(ns))
    ymd, rfc3339, unix, unixnano = render_value(DATE_FORMS, event).split("|")
    assert ymd == iso[:10]
    assert rfc3339 == iso[:19] + "Z"
    assert unix == str(ns // NS)
    assert unixnano == str(ns)


# --- names -------------------------------------------------------------------------------------


NAME_PARAMS = {
    "campaign_name": "{{campaign_name}}",
    "campaign_subid": "{{campaign_subid}}",
    "database_name": "{{database_name}}",
    "segment_name": "{{segment_name}}",
    "message_name": "{{message_name}}",
    "message_subject": "{{message_subject}}",
    "resource_name": "{{resource_name}}",
}
NO_NAMES = dict.fromkeys(NAME_PARAMS, "")


def test_names_looked_up(names: NameCatalogue) -> None:
    assert render({"pairs": NAME_PARAMS}, full_event(), names) == {
        "campaign_name": "Black Friday",
        "campaign_subid": "bf-2023",
        "database_name": "Customers",
        "segment_name": "VIP",  # the event's first segment
        "message_name": "Welcome",
        "message_subject": "Hello there",
        "resource_name": "Main site",
    }


def test_names_from_event_data_ids(names: NameCatalogue) -> None:
    event = make_event(list_id=50, event_data={
        "campaign_id": 10, "message_id": 5, "segment_id": 8, "resource_id": 3,
    })
    assert render({"pairs": NAME_PARAMS}, event, names) == {
        "campaign_name": "Black Friday",
        "campaign_subid": "bf-2023",
        "database_name": "Customers",
        "segment_name": "Second segment",
        "message_name": "Welcome",
        "message_subject": "Hello there",
        "resource_name": "Main site",
    }


def test_the_segment_named_is_the_one_the_message_shows(names: NameCatalogue) -> None:
    """An event of several segments (the profile's) whose ``event_data`` shows one
    (the send's): ``{{segment_name}}`` named the first of ``segment_ids`` beside a
    message showing another's id."""
    seg = {"pairs": {"seg": "{{segment_name}}"}}
    shown = make_event(segment_ids=[7, 8], event_data={"segment_id": 8})
    assert render(seg, shown, names) == {"seg": "Second segment"}
    # none shown (0: the send had no segment): the profile's first, as without it
    assert render(seg, make_event(segment_ids=[7, 8], event_data={"segment_id": 0}),
                  names) == {"seg": "VIP"}
    assert render(seg, make_event(segment_ids=[8, 7]), names) == {"seg": "Second segment"}


def test_names_empty_when_the_event_has_no_ids(names: NameCatalogue) -> None:
    assert render({"pairs": NAME_PARAMS}, make_event(), names) == NO_NAMES
    # segment_id 0 in event_data means "no segment"
    event = make_event(event_data={"segment_id": 0})
    assert render({"pairs": NAME_PARAMS}, event, names) == NO_NAMES
    assert render({"pairs": NAME_PARAMS}, make_event(segment_ids=[]), names) == NO_NAMES


def test_names_empty_when_unknown(names: NameCatalogue) -> None:
    event = full_event(list_id=51, campaign_id=11, message_id=6, segment_ids=[9], resource_id=4)
    assert render({"pairs": NAME_PARAMS}, event, names) == NO_NAMES
    assert render({"pairs": NAME_PARAMS}, full_event(), NameCatalogue()) == NO_NAMES


def test_name_fields_empty_when_not_set() -> None:
    cat = NameCatalogue()
    cat.upsert(ACCOUNT, "campaigns", 10, name="Black Friday")
    cat.upsert(ACCOUNT, "templates", 5, subject="Only a subject")
    out = render({"pairs": NAME_PARAMS}, full_event(), cat)
    assert out == {**NO_NAMES, "campaign_name": "Black Friday",
                   "message_subject": "Only a subject"}


def test_names_never_from_another_account(names: NameCatalogue) -> None:
    other = NameCatalogue()
    for kind, obj_id in (("campaigns", 10), ("databases", 50), ("segments", 7),
                         ("templates", 5), ("resources", 3)):
        fields = {"name": f"other {kind}"}
        if kind == "campaigns":
            fields["subid"] = "other subid"
        if kind == "templates":
            fields["subject"] = "other subject"
        other.upsert(OTHER_ACCOUNT, kind, obj_id, **fields)
    assert render({"pairs": NAME_PARAMS}, full_event(), other) == NO_NAMES
    # both accounts in one catalogue: each event sees its own account's names only
    for rec in other.to_records():
        names.upsert(rec.pop("account_id"), rec.pop("kind"), rec.pop("id"), **rec)
    assert render({"pairs": NAME_PARAMS}, full_event(), names)["campaign_name"] == "Black Friday"
    theirs = render({"pairs": NAME_PARAMS}, full_event(account_id=OTHER_ACCOUNT), names)
    assert theirs == {
        "campaign_name": "other campaigns",
        "campaign_subid": "other subid",
        "database_name": "other databases",
        "segment_name": "other segments",
        "message_name": "other templates",
        "message_subject": "other subject",
        "resource_name": "other resources",
    }
    assert render({"pairs": NAME_PARAMS}, full_event(account_id=3), names) == NO_NAMES


# --- composition, whitespace, unknown parameters -----------------------------------------------


def test_several_parameters_and_literals(names: NameCatalogue) -> None:
    value = "{{campaign_name}} / {{event_date_ymd}} ({{database_name}}){{resource_name}}!"
    assert render_value(value, full_event(), names) == (
        "Black Friday / 2018-03-04 (Customers)Main site!"
    )
    assert render_value("{{event_date_unix}}{{event_date_unix}}", make_event()) == (
        "15201691991520169199"
    )


def test_literals_only_and_empty_value() -> None:
    assert render({"pairs": {"a": "plain", "b": "", "c": "{ {uuid} }"}}, make_event()) == {
        "a": "plain", "b": "", "c": "{ {uuid} }",
    }


@pytest.mark.parametrize(
    "value",
    ["{{ campaign_name }}", "{{campaign_name }}", "{{  campaign_name}}", "{{\tcampaign_name\n}}"],
)
def test_whitespace_inside_braces(value: str, names: NameCatalogue) -> None:
    assert render_value(value, full_event(), names) == "Black Friday"


@pytest.mark.parametrize("space", ["\u00a0", "\x0b", "\x0c", "\x85", "\u2028", "\u3000"])
def test_only_the_spaces_of_a_go_template_action_are_taken(space: str,
                                                           names: NameCatalogue) -> None:
    """Another Unicode space makes no parameter: the value stays as written, as an
    unknown parameter's does."""
    value = f"{{{{{space}campaign_name}}}}"
    assert render_value(value, full_event(), names) == value


def test_whitespace_inside_braces_uuid() -> None:
    assert_uuid4(render_value("{{ uuid }}", make_event()))


@pytest.mark.parametrize(
    "value",
    [
        "{{nope}}",
        "{{ nope }}",
        "{{UUID}}",  # parameter names are case-sensitive
        "{{Campaign_Name}}",
        "{{campaign-name}}",
        "{{campaign name}}",
        "{{}}",
        "{uuid}",
        "{{uuid}",
        "{{ uuid ",
        "uuid",
    ],
)
def test_unknown_parameters_left_as_they_are(value: str) -> None:
    assert render_value(value, full_event()) == value


def test_unknown_parameters_among_known_ones(names: NameCatalogue) -> None:
    value = "x {{nope}} {{campaign_name}} {{ other }}{{database_name}} y"
    expected = "x {{nope}} Black Friday {{ other }}Customers y"
    assert render_value(value, full_event(), names) == expected
    wrapped = render_value("{{{campaign_name}}}", full_event(), names)
    assert wrapped == "{Black Friday}"


# --- profile fields -----------------------------------------------------------------------------


def test_profile_fields_present_and_missing() -> None:
    event = make_event(profile={"email": "a@example.org", "age": 31, "tags": ["x"],
                                "nickname": None, "city": "Oslo"})
    out = render({"fields": ["email", "age", "tags", "nickname", "phone"]}, event)
    # present values copied as they are (any JSON type, null included); missing ones omitted
    assert out == {"email": "a@example.org", "age": 31, "tags": ["x"], "nickname": None}


def test_profile_fields_without_profile() -> None:
    assert render({"fields": ["email"]}, make_event()) == {}
    assert render({"fields": ["email"]}, make_event(profile={})) == {}
    assert render({"fields": ["email"], "pairs": {"k": "v"}}, make_event()) == {"k": "v"}


def test_profile_fields_of_deleted_profile_are_null() -> None:
    event = make_event(profile={"email": "a@example.org"}, profile_deleted=True)
    assert render({"fields": ["email", "phone"]}, event) == {"email": None, "phone": None}
    # pairs still apply
    gone = make_event(profile_deleted=True)
    out = render({"fields": ["email"], "pairs": {"day": "{{event_date_ymd}}"}}, gone)
    assert out == {"email": None, "day": "2018-03-04"}


# --- sources and precedence -----------------------------------------------------------------------


def test_template_used_when_the_request_brought_no_custom_data(names: NameCatalogue) -> None:
    spec = {"template": {"cname": "{{campaign_name}}", "src": "template"}}
    assert render(spec, full_event(), names) == {"cname": "Black Friday", "src": "template"}


def test_request_custom_data_replaces_the_template(names: NameCatalogue) -> None:
    spec = {
        "fields": ["email"],
        "template": {"cname": "{{campaign_name}}", "only_in_template": "t"},
        "pairs": {"day": "{{event_date_ymd}}"},
    }
    event = full_event(profile={"email": "a@example.org"},
                       custom_data={"order": 42, "nested": {"k": [1, 2]}})
    assert render(spec, event, names) == {
        "email": "a@example.org",  # profile fields still apply
        "order": 42,
        "nested": {"k": [1, 2]},
        "day": "2018-03-04",  # pairs still apply
    }


def test_request_custom_data_is_not_template_rendered() -> None:
    event = make_event(custom_data={"id": "{{uuid}}"})
    assert render({"template": {"x": "y"}}, event) == {"id": "{{uuid}}"}


def test_empty_request_custom_data_still_replaces_the_template() -> None:
    assert render({"template": {"x": "y"}, "pairs": {"p": "1"}}, make_event(custom_data={})) == {
        "p": "1",
    }


def test_later_sources_win_on_a_key_clash() -> None:
    spec = {"fields": ["email"], "template": {"email": "from template", "k": "template"},
            "pairs": {"k": "from pairs"}}
    event = make_event(profile={"email": "profile@example.org"})
    assert render(spec, event) == {"email": "from template", "k": "from pairs"}
    with_request = make_event(profile={"email": "profile@example.org"},
                              custom_data={"email": "request@example.org", "k": "request"})
    assert render(spec, with_request) == {"email": "request@example.org", "k": "from pairs"}
    # profile fields of a deleted profile are null, but later sources still win
    deleted = make_event(profile_deleted=True, custom_data={"email": "request@example.org"})
    assert render({"fields": ["email", "phone"]}, deleted) == {
        "email": "request@example.org", "phone": None,
    }


def test_request_custom_data_not_mutated() -> None:
    request = {"a": 1}
    event = make_event(custom_data=request)
    out = render({"pairs": {"b": "2"}}, event)
    assert out == {"a": 1, "b": "2"}
    assert out is not request
    assert request == {"a": 1}


def test_no_custom_data_at_all_is_none() -> None:
    assert render({}, make_event()) is None
    assert render({}, make_event(profile={"email": "a@example.org"})) is None
    assert CompiledCustomData(CustomData()).empty is True
    # the message then carries no custom_data key
    body = json.loads(encode_message(MessageBuilder(make_hook()).build(make_event(id="e"))))
    assert "custom_data" not in body


def test_hook_without_custom_data_forwards_the_request_custom_data() -> None:
    assert render({}, make_event(custom_data={"a": 1})) == {"a": 1}
    body = json.loads(encode_message(
        MessageBuilder(make_hook()).build(make_event(id="e", custom_data={"a": 1}))
    ))
    assert body["custom_data"] == {"a": 1}


def test_spec_example() -> None:
    """Spec (g): cname/email/eventTime/eventTimeUnix/id.

    The spec's sample output pairs eventTime "2023-03-17" with eventTimeUnix "1615988820",
    which is 2021-03-17T13:47:00Z; the two cannot come from one event. The event here
    is the instant of the unix value, so eventTime is 2021-03-17.
    """
    names = NameCatalogue()
    names.upsert(161, "campaigns", 130, name="Black Friday")
    hook = parse_hook({
        "id": 9, "name": "spec g", "account_id": 161, "actions": ["deliv"],
        "custom_data": {
            "fields": ["email"],
            "pairs": {"cname": "{{campaign_name}}", "eventTime": "{{event_date_ymd}}",
                      "eventTimeUnix": "{{event_date_unix}}", "id": "{{uuid}}"},
        },
        "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}},
    })
    [event] = decode_events(json.dumps([{
        "event_type": "deliv", "event_date": "2021-03-17T13:47:00Z", "account_id": 161,
        "list_id": 50, "id": "ev-g", "event_data": {"campaign_id": 130, "message_id": 5},
        "profile": {"email": "test@example.com", "name": "Test"},
    }]))
    body = json.loads(encode_message(MessageBuilder(hook, names).build(event)))
    custom = body["custom_data"]
    assert_uuid4(custom.pop("id"))
    assert custom == {"cname": "Black Friday", "email": "test@example.com",
                      "eventTime": "2021-03-17", "eventTimeUnix": "1615988820"}


# --- compiled once -----------------------------------------------------------------------------


def test_compile_value_structure() -> None:
    uuid_getter = PARAMETERS["uuid"]
    assert compile_value("a {{uuid}} b") == ["a ", uuid_getter, " b"]
    assert compile_value("{{uuid}}") == [uuid_getter]
    assert compile_value("{{ uuid }}") == [uuid_getter]
    assert compile_value("{{campaign_name}}{{database_name}}") == [
        PARAMETERS["campaign_name"], PARAMETERS["database_name"],
    ]
    assert compile_value("x{{event_date}}") == ["x", PARAMETERS["event_date"]]
    assert compile_value("{{event_date}}x") == [PARAMETERS["event_date"], "x"]
    assert compile_value("plain") == ["plain"]
    assert compile_value("") == [""]
    # an unknown parameter stays inside the neighbouring literal
    assert compile_value("{{nope}}") == ["{{nope}}"]
    assert compile_value("a{{nope}}{{uuid}}{{ other }}z") == ["a{{nope}}", uuid_getter,
                                                              "{{ other }}z"]


def test_compiled_custom_data_keeps_compiled_parts() -> None:
    spec = CustomData(fields=["email", "phone"], template={"t": "{{uuid}}-x"},
                      pairs={"p": "lit", "d": "{{event_date_ymd}}"})
    compiled = CompiledCustomData(spec)
    assert compiled.fields == ("email", "phone")
    assert compiled.template == [("t", [PARAMETERS["uuid"], "-x"])]
    assert compiled.pairs == [("p", ["lit"]), ("d", [PARAMETERS["event_date_ymd"]])]
    assert compiled.empty is False
    assert CompiledCustomData(CustomData(fields=["email"])).empty is False
    assert CompiledCustomData(CustomData(pairs={"a": "b"})).empty is False
    assert CompiledCustomData(CustomData(template={"a": "b"})).empty is False


def test_render_does_not_compile(monkeypatch: pytest.MonkeyPatch, names: NameCatalogue) -> None:
    spec = CustomData(fields=["email"], template={"t": "{{campaign_name}}"},
                      pairs={"p": "{{ uuid }} {{event_date}} {{nope}}"})
    compiled = CompiledCustomData(spec)
    builder = MessageBuilder(make_hook(spec.model_dump()), names)

    def boom(template: str) -> list[Any]:
        raise AssertionError(f"compile_value called during render: {template!r}")

    monkeypatch.setattr(customdata, "compile_value", boom)
    event = full_event(profile={"email": "a@example.org"})
    for _ in range(3):
        out = compiled.render(EventContext(event, names))
        assert out is not None
        assert out["t"] == "Black Friday"
        assert out["email"] == "a@example.org"
        uid, date, rest = out["p"].split(" ")
        assert_uuid4(uid)
        assert (date, rest) == ("2018-03-04T13:13:19.034315Z", "{{nope}}")
        msg = builder.build(event)
        assert msg.custom_data["t"] == "Black Friday"  # type: ignore[index]


def test_event_date_parsed_once_per_context(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = customdata.parse_rfc3339_ns

    def counting(text: str) -> int:
        calls.append(text)
        return real(text)

    monkeypatch.setattr(customdata, "parse_rfc3339_ns", counting)
    event = make_event()
    ctx = EventContext(event, NameCatalogue())
    compiled = CompiledCustomData(CustomData(pairs={
        "a": "{{event_date}}", "b": "{{event_date_unix}}", "c": "{{event_date_ymd}}",
    }))
    compiled.render(ctx)
    compiled.render(ctx)
    assert calls == [DATE]
    assert ctx.ns == DATE_NS


def test_event_context_uses_a_given_date() -> None:
    ns = 1_000_000_000_123_000_000  # 2001-09-09T01:46:40.123Z, not the event's own date
    ctx = EventContext(make_event(), NameCatalogue(), date_ns=ns)
    compiled = CompiledCustomData(CustomData(pairs={"d": "{{event_date}}"}))
    assert compiled.render(ctx) == {"d": "2001-09-09T01:46:40.123Z"}


def test_one_context_shared_by_several_hooks(names: NameCatalogue) -> None:
    ctx = EventContext(full_event(), names)
    first = CompiledCustomData(CustomData(pairs={"c": "{{campaign_name}}"}))
    second = CompiledCustomData(CustomData(template={"d": "{{database_name}}"}))
    assert first.render(ctx) == {"c": "Black Friday"}
    assert second.render(ctx) == {"d": "Customers"}
    assert ctx.name("segments", 7) == "VIP"
    assert ctx.name("templates", 5, "subject") == "Hello there"
    assert ctx.name("templates", None) == ""


def test_uuids_come_from_the_systems_random_source() -> None:
    """``"order-{{uuid}}"`` took Python's own generator (predictable from enough of
    its output, and one partition's serves every account): seeded alike, it gave the
    same uuid twice."""
    import random

    from engine.customdata import _uuid4

    made = []
    for _ in range(2):
        random.seed(42)
        made.append(_uuid4())
    assert made[0] != made[1] and all(UUID_TEXT.match(u) for u in made)


UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
