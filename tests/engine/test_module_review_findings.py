"""Regressions of a review of the smaller engine modules: a key given twice quoted
back whole, values in Redis nested too deep to read, a key holding a backtick named
wrongly, and a worker's heartbeat refused for a lone surrogate in its reason."""

from __future__ import annotations

import json

import pytest
import redis

from engine.catalogue import engine_codes
from engine.errors import SHOWN_CHARS
from engine.events import decode_batch
from engine.health import Heartbeat
from engine.jsonkeys import unique_keys
from engine.keys import Keys
from engine.lease import Holder


def test_a_key_given_twice_is_quoted_back_as_errors_quote_values() -> None:
    key = "k" * 500_000
    with pytest.raises(ValueError) as refused:
        json.loads(f'{{"{key}": 1, "{key}": 2}}', object_pairs_hook=unique_keys)
    said = str(refused.value)
    assert said.startswith("duplicate key 'kkk") and len(said) < SHOWN_CHARS + 40


def test_values_nested_too_deep_to_read_are_ignored_as_damaged_ones_are() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert engine_codes(deep) is None
    holder = Holder.of(f"token {deep}".encode(), 5_000)
    assert holder.about == {} and holder.expires_ms == 5_000


@pytest.mark.parametrize("key", ["a`b", "x - at `$.account_id`", "`"])
def test_an_unknown_key_holding_backticks_is_named_whole(key: str) -> None:
    event = {"event_type": "click", "event_date": "2026-11-29T10:00:00Z", "account_id": 1,
             key: 1}
    (issue,) = decode_batch(json.dumps([event])).issues
    assert issue.field == key, issue


@pytest.mark.integration
def test_a_heartbeat_whose_reason_holds_a_lone_surrogate_is_marked(
        redis_client: redis.Redis, prefix: str) -> None:
    beat = Heartbeat(redis_client, Keys(prefix), "partition:0")
    beat.beat("Redis said: '\ud800' refused")
    mark = redis_client.get(beat.key)
    assert mark is not None and mark.decode().endswith("Redis said: '\\ud800' refused")
