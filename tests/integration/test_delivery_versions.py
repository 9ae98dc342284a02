"""Re-sends and dead letters stored by another hookray version (real Redis, no Ray).

A newer version may store a ``Delivery`` with a field this one does not know; read
after a roll-back it is refused, not read without the field: a re-send is set aside
(``retry:unreadable``) and a dead letter is skipped by listings and refused by replay,
both kept as stored, until a version that reads them runs. An earlier version's
(fewer fields) is read with the later fields' defaults."""

from __future__ import annotations

import logging

import msgspec
import pytest
import redis

import engine.transports.base as base
from engine.errors import NotFound
from engine.keys import Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import (
    Delivery,
    pack_deliveries,
    pack_delivery,
    unpack_deliveries,
    unpack_delivery,
)
from tests.integration.test_workers import InProcessSender

pytestmark = pytest.mark.integration


class Newer(Delivery, forbid_unknown_fields=True):
    """A ``Delivery`` as a later version might have it."""

    headers: dict[str, str] = {}


def newer_payload(delivery_id: str, hook_id: int) -> bytes:
    return msgspec.msgpack.encode(Newer(id=delivery_id, hook_id=hook_id, account_id=1,
                                        kind="http_batch", parts=[b'{"a":1}'], resends=1,
                                        headers={"X-Tenant": "42"}))


def run_newer_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, payloads decode as the later version decodes them."""
    monkeypatch.setattr(base, "_unpacker", msgspec.msgpack.Decoder(Newer))




def a_hook(redis_client: redis.Redis, keys: Keys) -> int:
    created = HookRegistry(redis_client, keys).create({
        "name": "h", "active": True, "account_id": 1, "actions": ["click"],
        "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
    return created.id or 0


def test_a_resend_with_a_field_this_version_lacks_is_set_aside_not_sent_without_it(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    hook_id = a_hook(redis_client, keys)
    retry = RetryStore(redis_client, keys)
    for name in ("old", "new"):
        retry.schedule(Delivery(id=name, hook_id=hook_id, account_id=1, kind="http_batch",
                                parts=[b"{}"]), due_ms=0, error="HTTP 500")
    stored = newer_payload("new", hook_id)
    redis_client.hset(keys.retry_payload, "new", stored)
    sender = InProcessSender()
    with caplog.at_level(logging.WARNING, "hookray"):
        RetryWorker(settings, redis_client, sender).step()
    assert [d.id for d in sender.transport.sent] == ["old"]  # not sent without its field
    assert "retry payload new cannot be decoded, set aside" in caplog.text
    assert "unknown field `headers`" in caplog.text  # why
    assert redis_client.hget(keys.retry_unreadable, "new") == stored  # kept as stored
    assert redis_client.zscore(keys.retry, "new") is None
    assert Stats(redis_client, keys).engine()["retries_unreadable"] == 1
    (listed,) = retry.set_aside()
    assert listed["id"] == "new" and listed["hook_id"] == hook_id
    assert "unknown field `headers`" in listed["error"]
    with pytest.raises(ValueError, match="still cannot be decoded"):
        retry.requeue_set_aside(["new"])
    assert retry.requeue_set_aside() == 0  # none this version reads
    # the version that wrote it runs again: put back, and sent with its field
    run_newer_version(monkeypatch)
    assert retry.requeue_set_aside() == 1
    (claimed,) = retry.claim_due()
    assert isinstance(claimed, Newer) and claimed.headers == {"X-Tenant": "42"}


def test_a_dead_letter_with_a_field_this_version_lacks_is_reported_not_replayed_without_it(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    retry = RetryStore(redis_client, keys)
    for name in ("old", "new"):
        retry.kill(Delivery(id=name, hook_id=5, account_id=1, kind="http_batch",
                            parts=[b"{}"], resends=3), "HTTP 500")
    stored = newer_payload("new", 5)
    redis_client.hset(keys.dead_payload, "new", stored)
    with caplog.at_level(logging.WARNING, "hookray"):
        assert [d.id for d in retry.dead_letters()] == ["old"]
        assert [d.id for d in retry.dead_letters(account_id=1)] == ["old"]
        assert [d.id for d in retry.dead_letters(hook_id=5)] == ["old"]
    assert "dead letter new cannot be decoded" in caplog.text
    assert "unknown field `headers`" in caplog.text  # why
    with pytest.raises(NotFound, match="dead letter new cannot be decoded"):
        retry.replay(["new"])
    assert retry.replay_all(hook_id=5) == 1  # the other one
    assert redis_client.hget(keys.dead_payload, "new") == stored  # kept as stored
    assert redis_client.hget(keys.retry_payload, "new") is None
    # the version that wrote it runs again: listed and replayed with its field
    run_newer_version(monkeypatch)
    (letter,) = retry.dead_letters(account_id=1)
    assert isinstance(letter, Newer) and letter.headers == {"X-Tenant": "42"}
    assert retry.replay(["new"]) == 1
    replayed = msgspec.msgpack.decode(redis_client.hget(keys.retry_payload, "new"))
    assert replayed["headers"] == {"X-Tenant": "42"}


def test_deliveries_of_earlier_versions_and_between_actors_are_still_read(
        redis_client: redis.Redis, keys: Keys) -> None:
    """A payload without the fields added since (``restarts``, ``resends``...) takes
    their defaults; what a partition hands a transport actor decodes as it was."""
    earliest = msgspec.msgpack.encode({"id": "e", "hook_id": 1, "account_id": 1,
                                       "kind": "http_batch", "parts": [b"{}"]})
    redis_client.hset(keys.retry_payload, "e", earliest)
    redis_client.zadd(keys.retry, {"e": 0})
    (claimed,) = RetryStore(redis_client, keys).claim_due()
    assert claimed == Delivery(id="e", hook_id=1, account_id=1, kind="http_batch",
                               parts=[b"{}"])
    batches = [Delivery(id=f"b{n}", hook_id=n, account_id=1, kind="kafka",
                        parts=[b"{}", b"[]"], keys=["k1", "k2"], message_ids=["m1", "m2"],
                        resends=-1, restarts=2) for n in range(3)]
    assert unpack_deliveries(pack_deliveries(batches)) == batches
    assert unpack_delivery(pack_delivery(batches[0])) == batches[0]
