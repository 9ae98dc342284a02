"""The hot path's spliced encoding equals the plain Message encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.workload import make_events, make_names
from engine.catalogue import load_catalogue
from engine.customdata import EventContext
from engine.events import Event
from engine.hooks import parse_hook
from engine.messages import MessageBuilder, encode_message, encode_part


def _hook(**extra: Any) -> Any:
    return parse_hook({"id": 5, "name": "h", "account_id": 1, "actions": ["click"],
                       "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}, **extra})


HOOKS = [
    _hook(),
    _hook(send_content=True, custom_data={"fields": ["email"],
                                          "pairs": {"c": "{{campaign_name}} {{event_date}}"}}),
    _hook(custom_data={"template": {"t": "{{database_name}}"}}),
]


@pytest.mark.parametrize("hook", HOOKS)
def test_spliced_message_equals_the_encoded_message(hook: Any) -> None:
    catalogue, names = load_catalogue(), make_names()
    builder = MessageBuilder(hook, names, catalogue)
    events = make_events(300)
    events[0].profile_deleted = True
    events[1].custom_data = {"from": "request"}
    content = {e.send_id: {"subject": f"s{i}"} for i, e in enumerate(events[:100]) if e.send_id}
    for event in events:
        ctx = EventContext(event, names)
        spliced, mid = builder.encode_with_part(event, encode_part(event, catalogue), ctx,
                                                content)
        plain = encode_message(builder.build(event, content, EventContext(event, names)))
        assert json.loads(spliced) == json.loads(plain)
        assert mid == json.loads(plain)["hook_message_id"]


def test_a_message_without_custom_data_or_content_has_neither_key() -> None:
    event = Event(event_type="click", event_date="2026-01-01T00:00:00Z", account_id=1, id="e")
    catalogue = load_catalogue()
    spliced, _ = MessageBuilder(HOOKS[0]).encode_with_part(
        event, encode_part(event, catalogue), EventContext(event, make_names()))
    assert set(json.loads(spliced)) == {"event_type", "event_date", "account_id", "is_test",
                                        "event_data", "hook_message_id"}
