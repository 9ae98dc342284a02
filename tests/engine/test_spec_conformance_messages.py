"""Messages, keys and test events against the spec's rules (sections a, d, e, h)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from engine.assembly import Round
from engine.catalogue import load_catalogue
from engine.events import Event
from engine.hooks import Hook, parse_hook
from engine.messages import MessageBuilder, encode_message, kafka_key, keys_from_parts
from engine.names import NameCatalogue
from tests.engine.test_events import TRACKING_DATA

CATALOGUE = load_catalogue()
DATE = "2016-11-15T09:12:28.514388956Z"


def kafka_hook(key: str = "profile_id") -> Hook:
    return parse_hook({"id": 1, "name": "h", "account_id": 1, "actions": ["deliv"],
                       "target": {"kafka": {"bootstrap_servers": ["h:9092"], "topic": "t",
                                            "key": key}}})


def event(**kw: Any) -> Event:
    fields: dict[str, Any] = {"event_type": "deliv", "event_date": DATE, "account_id": 1,
                              "id": "ev-1", "list_id": 4}
    fields.update(kw)
    return Event(**fields)


# --- a deleted profile's event: its message's profile_id is null (spec a, d) ----------------


def test_a_deleted_profiles_record_has_no_profile_id_key() -> None:
    """Keyed by ``profile_id``, the record of a deleted profile's event has no key: its
    message carries ``"profile_id": null``, and a key holding the id would send what
    the message withholds (and differ from the key read back from that message)."""
    hook = kafka_hook()
    deleted = event(profile_id="p1", profile_deleted=True)
    live = event(id="ev-2", profile_id="p2")
    message = json.loads(encode_message(MessageBuilder(hook).build(deleted)))
    assert message["profile_id"] is None
    assert kafka_key("profile_id", deleted) is None
    assert kafka_key("profile_id", live) == b"p2"
    rnd = Round([deleted, live], CATALOGUE, NameCatalogue(), {})
    assert list(rnd.kafka_keys([0, 1], "profile_id")) == ["", "p2"]
    assert list(rnd.kafka_keys([1, 0], "profile_id")) == ["p2", ""]
    parts = [encode_message(MessageBuilder(hook).build(e)) for e in (deleted, live)]
    assert keys_from_parts(hook, parts) == ["", "p2"]


def test_the_list_event_key_of_a_deleted_profiles_event_is_kept() -> None:
    """The database and event type are no profile data: that key stays."""
    deleted = event(profile_id="p1", profile_deleted=True)
    assert kafka_key("list_event", deleted) == b"4.deliv"
    rnd = Round([deleted], CATALOGUE, NameCatalogue(), {})
    assert list(rnd.kafka_keys([0], "list_event")) == ["4.deliv"]


@pytest.mark.parametrize("profile_id", [None, ""])
def test_an_event_without_a_profile_id_has_no_record_key(profile_id: str | None) -> None:
    plain = event(profile_id=profile_id)
    assert kafka_key("profile_id", plain) is None
    rnd = Round([plain, event(id="ev-2", profile_id="p2")], CATALOGUE, NameCatalogue(), {})
    assert list(rnd.kafka_keys([0, 1], "profile_id")) == ["", "p2"]
    assert msgspec.json.decode(encode_message(MessageBuilder(kafka_hook()).build(plain))
                               ).get("profile_id") == profile_id


# --- test event (spec h): the section (d) shapes and example values ------------------------

# spec d, tracking variant of event_data: field -> example value (extra_uid: push only;
# its documented example is cut short)
SPEC_TRACKING_EXAMPLE: dict[str, Any] = {k: v for k, v in TRACKING_DATA.items()
                                         if k != "extra_uid"}


def http_hook() -> Hook:
    return parse_hook({"id": 2, "name": "h", "account_id": 23, "actions": ["deliv"],
                       "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})


def test_message(event_type: str, catalogue: Any = None) -> dict[str, Any]:
    from engine.testevent import build_test_delivery

    # a test event is sent whatever the hook's actions (it bypasses the filters)
    delivery = build_test_delivery(http_hook(), event_type, catalogue=catalogue)
    (part,) = delivery.parts
    message: dict[str, Any] = json.loads(part)
    return message


test_message.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


# spec d: link_url is the clicked URL, "click-type events": those spec c describes as a
# click on a link (confirmsub: "the confirmation link", unsub: "opt-out through a link")
CLICK_TYPES = ["click", "uclick", "confirm", "confirmsub", "unsub", "click_sms", "uclick_sms",
               "unsub_sms", "click_push", "uclick_push"]


def tracking_example(code: str) -> dict[str, Any]:
    if code in CLICK_TYPES:
        return SPEC_TRACKING_EXAMPLE
    return {k: v for k, v in SPEC_TRACKING_EXAMPLE.items() if k != "link_url"}


@pytest.mark.parametrize("code", [c for c in CATALOGUE.by_category("tracking")
                                  if CATALOGUE.get(c).channel != "push"])
def test_a_tracking_test_event_has_every_documented_field(code: str) -> None:
    assert test_message(code)["event_data"] == tracking_example(code)


@pytest.mark.parametrize("code", [c for c in CATALOGUE.by_category("tracking")
                                  if CATALOGUE.get(c).channel == "push"])
def test_a_push_tracking_test_event_also_has_extra_uid(code: str) -> None:
    data = test_message(code)["event_data"]
    assert isinstance(data.pop("extra_uid"), str)
    assert data == tracking_example(code)


def test_only_click_type_test_events_carry_link_url() -> None:
    with_link = {c for c in CATALOGUE.by_category("tracking")
                 if "link_url" in test_message(c)["event_data"]}
    assert with_link == set(CLICK_TYPES)


@pytest.mark.parametrize("code", ["sbounce", "hbounce", "undeliv", "undeliv_sms",
                                  "undeliv_push"])
def test_a_bounce_or_undelivered_test_event_carries_the_providers_response(code: str) -> None:
    data = test_message(code)["event_data"]
    assert isinstance(data["response_code"], int) and data["response_text"]
    assert "response_code" not in test_message("deliv")["event_data"]


def test_codes_added_by_configuration_get_the_shape_their_code_says() -> None:
    catalogue = CATALOGUE.extended([
        {"code": "undeliv_viber", "category": "delivery", "channel": "viber"},
        {"code": "soft_bounce_x", "category": "delivery", "channel": "email"},
        {"code": "deliv_viber", "category": "delivery", "channel": "viber"},
        {"code": "click_viber", "category": "tracking", "channel": "viber"},
        {"code": "open_viber", "category": "tracking", "channel": "viber"}])
    data = {code: test_message(code, catalogue)["event_data"] for code in (
        "undeliv_viber", "soft_bounce_x", "deliv_viber", "click_viber", "open_viber")}
    assert [c for c, d in data.items() if "response_code" in d] == ["undeliv_viber",
                                                                    "soft_bounce_x"]
    assert [c for c, d in data.items() if "link_url" in d] == ["click_viber"]


def test_a_pixel_test_event_carries_the_tracking_variants_geo_and_user_agent() -> None:
    data = test_message("pixel")["event_data"]
    geo_ua = ("ip", "country", "city", "postal_code", "region", "tz", "lat", "lon",
              "user_agent", "os", "browser", "device")
    assert {k: data[k] for k in geo_ua} == {k: SPEC_TRACKING_EXAMPLE[k] for k in geo_ua}


@pytest.mark.parametrize(("code", "content"), [
    ("click", {"subject", "html", "text", "from_name", "from_email"}),
    ("deliv", {"subject", "html", "text", "from_name", "from_email"}),
    ("send_sms", {"text"}),
    ("open_push", {"title", "body"}),
    ("import_api", None),
    ("pixel", None),
])
def test_a_test_event_of_a_hook_with_send_content_carries_sample_content(
        code: str, content: set[str] | None) -> None:
    from engine.testevent import build_test_delivery

    hook = parse_hook({"id": 2, "name": "h", "account_id": 23, "actions": ["deliv"],
                       "send_content": True,
                       "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
    (part,) = build_test_delivery(hook, code).parts
    message = json.loads(part)
    assert (set(message["content"]) if "content" in message else None) == content
    assert "content" not in test_message(code)  # not without send_content


@pytest.mark.parametrize("code", ["send_push", "deliv_push", "import_api", "pixel"])
def test_extra_uid_only_in_tracking_events_of_the_push_channel(code: str) -> None:
    assert "extra_uid" not in test_message(code)["event_data"]


@pytest.mark.parametrize(("channel", "keys"), [
    ("viber", {"phone": "+79991234567"}),
    ("whatsapp", {"phone": "+79991234567"}),
    ("sms", {"phone": "+79991234567"}),
    ("notify", {}),
    ("telegram_bot", {}),
    ("email", {"email": "alice@example.org"}),
])
def test_a_test_event_subscription_is_of_its_events_channel(channel: str,
                                                            keys: dict[str, str]) -> None:
    """An event code of another channel (added by EVENT_TYPES_FILE): the synthetic
    subscription is of that channel, with its address key (phone for phone-based
    channels), not an email subscription."""
    catalogue = CATALOGUE.extended([{"code": f"deliv_{channel}x", "category": "delivery",
                                     "channel": channel}])
    (sub,) = test_message(f"deliv_{channel}x", catalogue)["subscription"]
    assert sub == {"resource_id": 3, "channel": channel, "status": "subscribed",
                   "priority": 1, "ccsub": {"custom_key": "custom_value"}, **keys}


@pytest.mark.parametrize("code", ["click", "deliv", "open_push", "send_sms"])
def test_a_test_event_of_a_sent_message_carries_every_optional_top_level_key(
        code: str) -> None:
    """Spec h: the synthetic message has section (d)'s shapes and example values; a
    receiver testing its parser should meet every key live traffic may carry."""
    message = test_message(code)
    assert message["sends_trying_num"] == 2 and message["is_static"] is False
    assert message["subscription_hash_id"] == "0a4b910312345"
    (sub,) = message["subscription"]
    assert sub["priority"] == 1 and sub["ccsub"] == {"custom_key": "custom_value"}


@pytest.mark.parametrize("code", ["import_api", "pixel"])
def test_a_test_event_no_sent_message_is_behind_has_no_sending_attempts(code: str) -> None:
    message = test_message(code)
    assert "sends_trying_num" not in message and "is_static" not in message
    assert message["subscription_hash_id"] == "0a4b910312345"
