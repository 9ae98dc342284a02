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
