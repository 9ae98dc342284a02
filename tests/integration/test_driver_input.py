"""The Python driver refuses input it would otherwise take wrongly (an id as a string
selecting nothing, one dead letter id split into characters) or fail on with a
traceback that names nothing; each error names the call, the argument and why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from actors.driver import Engine
from engine.errors import ConfigError
from engine.receiver import Receiver
from engine.settings import Settings


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = Engine.connect(settings)
    yield engine
    engine.redis.close()


@pytest.mark.parametrize(("call", "message"), [
    (lambda e: e.list_hooks("23"), "list_hooks: account_id must be an integer"),
    (lambda e: e.list_hooks(-1), "list_hooks: account_id must be an integer"),
    (lambda e: e.stats("5"), "stats: hook_id must be an integer"),
    (lambda e: e.dead_letters(account_id="23"), "dead_letters: account_id must be"),
    (lambda e: e.dead_letters(hook_id=True), "dead_letters: hook_id must be"),
    (lambda e: e.dead_letters(after=5), "dead_letters: after must be a cursor"),
    (lambda e: e.replay("d-1"), "replay: ids must be a list of dead letter ids, got str"),
    (lambda e: e.replay([1, 2]), "replay: each dead letter id is a string, got 1"),
    (lambda e: e.replay(hook_id="5"), "replay: hook_id must be an integer"),
    (lambda e: e.discard("d-1"), "discard: ids must be a list of dead letter ids, got str"),
    (lambda e: e.discard(everything=True, account_id=2.0), "discard: account_id must be"),
    (lambda e: e.wait_idle("x"), "wait_idle: timeout must be a number of seconds"),
    # flags are True or False: "no" would be taken as true
    (lambda e: e.discard(everything="no"), "discard: everything must be True or False"),
    (lambda e: e.publish([], partial="no"), "publish: partial must be True or False"),
    (lambda e: e.wait_idle(1, include_retries=1), "wait_idle: include_retries must be"),
    (lambda e: e.wait_idle(float("nan")), "wait_idle: timeout must be a number of seconds"),
    (lambda e: e.upsert_names({"account_id": 1}), "records must be a list of records"),
    (lambda e: e.upsert_names(None), "records must be a list of records"),
    (lambda e: e.totals(None), "totals: also must be a list of hook ids"),
    (lambda e: e.delete_profiles(1, "p1"), "delete_profiles: profile_ids must be a list"),
    (lambda e: e.delete_profiles(1, [1]), "delete_profiles: profile_ids must be a list"),
    (lambda e: e.delete_profiles("1", ["p1"]), "delete_profiles: account_id '1' is not"),
    (lambda e: e.delete_profiles(1, ["\ud800"]), "delete_profiles: profile_ids: item 0: not"),
    (lambda e: e.totals(["3"]), "totals: also must be a list of hook ids"),
    (lambda e: e.replay(["\ud800"]), "replay: dead letter id '\\ud800': not valid UTF-8"),
    (lambda e: e.discard(["\ud800"]), "discard: dead letter id '\\ud800': not valid UTF-8"),
    (lambda e: e.upsert_names([{"kind": "campaigns", "id": 1, "name": "x"}]),
     "upsert_names: record 0: account_id is missing; nothing stored"),
    (lambda e: e.upsert_names([{"account_id": 1, "kind": "campaigns", "id": 1, "name": "a"},
                               {"account_id": 1, "kind": "campaigns", "id": 2, "name": None}]),
     "upsert_names: record 1: name: expected a string, got None; nothing stored"),
    (lambda e: e.upsert_names([{"account_id": 23.9, "kind": "segments", "id": 1}]),
     "upsert_names: record 0: account_id: expected an integer from 0 to"),
    (lambda e: e.upsert_names([{"account_id": "-1", "kind": "segments", "id": 1}]),
     "upsert_names: record 0: account_id: expected an integer from 0 to"),
    (lambda e: e.delete_names(1, {"kind": "campaigns", "id": 1}),
     "delete_names: objects must be a list of"),
    (lambda e: e.delete_names("1", [{"kind": "campaigns", "id": 1}]),
     "delete_names: account_id '1' is not an integer"),
    (lambda e: e.delete_names(1, [{"kind": "campaigns", "id": 1, "name": "x"}]),
     "delete_names: record 0: expected {\"kind\", \"id\"}"),
    (lambda e: e.delete_names(1, [{"kind": "campaigns", "id": 1}, {"kind": "lists", "id": 2}]),
     "delete_names: record 1: kind 'lists' is not one of campaigns,"),
    (lambda e: e.delete_names(1, [{"kind": "campaigns", "id": -2}]),
     "delete_names: record 0: id: expected an integer from 0 to"),
    (lambda e: e.requeue_set_aside("1-0"),
     "requeue_set_aside: ids must be a list of set-aside entry ids, got str"),
    (lambda e: e.requeue_set_aside(["soon"]),
     "requeue_set_aside: 'soon' is no set-aside entry's id"),
    (lambda e: e.set_aside(limit=0), "set_aside: limit must be a whole number from 1"),
    (lambda e: e.set_aside(limit=2**70), "set_aside: limit must be a whole number from 1"),
    (lambda e: e.store_content(1, {"s": {}}, ttl_sec=2**70),
     "ttl_sec: expected whole seconds from 1 to"),
    # a stream id's parts are 64-bit: Redis would refuse these with its own error
    (lambda e: e.requeue_set_aside(["18446744073709551616-0"]),
     "requeue_set_aside: '18446744073709551616-0' is no set-aside entry's id"),
    (lambda e: e.set_aside(after="1-99999999999999999999"),
     "set_aside: after: expected a set-aside entry's id"),
    (lambda e: e.upsert_profiles(1, {"p1": {"email": "a@b"}, "p2": {"tags": {"x"}}}),
     "upsert_profiles: the fields of profile 'p2': not JSON"),
    (lambda e: e.upsert_profiles(1, {"p1": {"score": float("nan")}}),
     "upsert_profiles: the fields of profile 'p1': not JSON"),
    # text no message could carry: refused here, not failing every round that uses it
    (lambda e: e.upsert_profiles(1, {"p1": {"email": "a@b"}, "p2": {"email": "a\udfffb"}}),
     "upsert_profiles: the fields of profile 'p2': value of 'email': not valid UTF-8: a "
     "lone surrogate '\\udfff' at character 1; nothing stored"),
    (lambda e: e.upsert_profiles(1, {"p\ud800": {"email": "a@b"}}),
     "upsert_profiles: the fields of profile 'p\\ud800': the id is not valid UTF-8"),
    (lambda e: e.upsert_names([{"account_id": 7, "kind": "campaigns", "id": 1,
                                "name": "Black \ud800 Friday"}]),
     "upsert_names: 7:campaigns:1: value of 'name': not valid UTF-8"),
    (lambda e: e.store_content(1, {"s1": {"subject": "\ud83d"}}),
     "store_content: content of send id 's1': value of 'subject': not valid UTF-8"),
    (lambda e: e.store_content(1, {"s1": {"tags": ("a", "\ud83d")}}),
     "store_content: content of send id 's1': value of 'tags': item 1: not valid UTF-8"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_are_refused_naming_the_call_and_argument(
        engine: Engine, redis_client: Any, keys: Any, call: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        call(engine)
    assert str(info.value).startswith(message) or message in str(info.value), info.value
    # nothing of a refused call is stored
    assert redis_client.hlen(keys.names) == 0
    assert redis_client.hlen(keys.profiles(1)) == 0


def test_good_arguments_still_work(engine: Engine) -> None:
    hook = engine.create_hook({"name": "crm", "account_id": 23, "actions": ["click"],
                               "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}})
    assert [h.id for h in engine.list_hooks(23)] == [hook.id]
    assert engine.dead_letters(account_id=23, hook_id=hook.id) == []
    assert engine.replay([]) == 0 and engine.replay(hook_id=hook.id) == 0
    assert engine.upsert_names([{"account_id": 23, "kind": "campaigns", "id": 9,
                                 "name": "Black Friday", "subid": 7}]) == 1
    # ids as a CSV file or JSON of strings holds them
    assert engine.upsert_names([{"account_id": "23", "kind": "segments", "id": "4",
                                 "name": "VIP"}]) == 1
    assert engine._names.load().get(23, "segments", 4) == "VIP"
    # the same names again change nothing: every partition reloads every name when
    # their version moves, so it does not
    version = engine._names.version()
    assert engine.upsert_names([{"account_id": 23, "kind": "segments", "id": 4,
                                 "name": "VIP"}]) == 1
    assert engine._names.version() == version
    assert engine.upsert_names([{"account_id": 23, "kind": "segments", "id": 4,
                                 "name": "VIPs"}]) == 1
    assert engine._names.version() == version + 1
    # names of objects deleted on the platform are forgotten (ids as strings too)
    assert engine.delete_names(23, [{"kind": "segments", "id": "4"},
                                    {"kind": "campaigns", "id": 9},
                                    {"kind": "campaigns", "id": 10}]) == 2
    assert engine._names.version() == version + 2 and len(engine._names.load()) == 0
    assert engine.delete_names(23, [{"kind": "segments", "id": 4}]) == 0
    assert engine._names.version() == version + 2
    # thousands at once (a script per thousand): the version moves with each script
    # that changed something (in it, so a call tried again after a lost reply still
    # moves it)
    many = [{"account_id": 23, "kind": "campaigns", "id": n, "name": f"c{n}"}
            for n in range(2500)]
    assert engine.upsert_names(many) == 2500
    assert engine._names.version() == version + 5 and len(engine._names.load()) == 2500
    assert engine.delete_names(23, [{"kind": "campaigns", "id": n}
                                    for n in range(2600)]) == 2500
    assert engine._names.version() == version + 8 and len(engine._names.load()) == 0
    assert engine.upsert_profiles(23, {"p1": {"email": "a@example.org"}}) == 1
    assert engine.wait_idle(0.1)


def test_settings_must_be_settings_and_not_beside_a_config(settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"settings: expected an engine\.settings\.Settings"):
        Engine.connect({"REDIS_URL": settings.REDIS_URL})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="give settings= or config=, not both"):
        Engine.connect(settings, config="deploy/main.json")
    for wrong in (123, b"deploy/main.json"):  # a TypeError named neither call nor argument
        with pytest.raises(ConfigError, match=r"config: expected the path of a main\.json"):
            Engine.connect(config=wrong)  # type: ignore[arg-type]


def test_a_test_event_can_be_sent_from_inside_a_running_event_loop(
        engine: Engine, receiver: Receiver) -> None:
    hook = engine.create_hook({"name": "crm", "account_id": 23, "actions": ["click"],
                               "target": {"http_batch": {"url": receiver.url("/t")}}})

    async def from_a_coroutine() -> Any:
        return engine.test_event(hook.id, "click")

    outcome = asyncio.run(from_a_coroutine())
    assert outcome.ok, outcome
    assert [m["event_type"] for m in receiver.messages("/t")] == ["click"]


def test_a_test_event_the_transport_fails_to_send_is_an_outcome_not_a_traceback(
        engine: Engine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A transport raising something else than a delivery failure was an outcome through
    the API only: the driver raised it, and `hookray hooks test` printed its traceback,
    the hook's secret in it. Now it is the same outcome, masked, everywhere."""
    import logging

    from engine.transports.http import HttpTransport

    async def refuse(self: HttpTransport, target: Any, body: bytes, auth: Any) -> Any:
        raise ValueError(f"cannot send Authorization: {auth}")

    monkeypatch.setattr(HttpTransport, "_post", refuse)
    hook = engine.create_hook({
        "name": "crm", "account_id": 23, "actions": ["click"], "target": {"http_batch": {
            "url": "http://127.0.0.1:9/t", "auth": {"kind": "bearer", "token": "s3cr3t-tok"}}}})
    with caplog.at_level(logging.ERROR, logger="hookray"):
        outcome = engine.test_event(hook.id, "click")
    assert not outcome.ok and outcome.error == "ValueError" and outcome.status is None
    assert outcome.detail.startswith("the test event could not be sent: ValueError: cannot "
                                     "send Authorization: Bearer "), outcome.detail
    assert "s3cr3t" not in outcome.detail and "s3cr3t" not in caplog.text
    assert f"test event of hook {hook.id}: the http_batch transport failed" in caplog.text

    async def refuse_late(self: HttpTransport, target: Any, body: bytes, auth: Any) -> Any:
        raise ValueError(f"{'x' * 915} cannot send Authorization: {auth}")

    # the text is cut to 1,000 characters inside the token ("s3cr"): masked before it is cut
    monkeypatch.setattr(HttpTransport, "_post", refuse_late)
    outcome = engine.test_event(hook.id, "click")
    assert len(outcome.detail) <= 1000 and "s3cr" not in outcome.detail, outcome.detail


def test_the_drivers_redis_calls_time_out_as_the_workers_do(settings: Settings) -> None:
    """A Redis gone from the network without a reset fails a driver's call (shutdown,
    stats, the claim's renewal) after 30 s, not after the kernel's ~15 minutes; a
    REDIS_URL's own socket_timeout wins."""
    engine = Engine.connect(settings)
    assert engine.redis.connection_pool.connection_kwargs["socket_timeout"] == 30
    given = settings.model_copy(update={"REDIS_URL": settings.REDIS_URL + "?socket_timeout=5"})
    engine = Engine.connect(given)
    assert engine.redis.connection_pool.connection_kwargs["socket_timeout"] == 5


def test_dead_letters_are_shown_with_their_hooks_secrets_masked(engine: Engine) -> None:
    """The API masks a dead letter's error again with its hook's stored secrets (a
    destination's answer may echo them; one written before they were masked at write
    time, say); the driver and `hookray dead-letters` showed it as stored."""
    from engine.transports.base import Delivery

    hook = engine.create_hook({
        "name": "crm", "account_id": 23, "actions": ["click"], "target": {"http_batch": {
            "url": "http://127.0.0.1:9/t", "headers": {"Authorization": "Basic HDRSECRET3"}}}})
    engine.retry.kill(Delivery(id="d1", hook_id=hook.id or 0, account_id=23,
                               kind="http_batch", parts=[b"{}"]),
                      "HTTP 401: server said: bad credentials 'Basic HDRSECRET3'")
    (letter,) = engine.dead_letters(hook_id=hook.id)
    assert "HDRSECRET3" not in letter.last_error, letter.last_error
    assert letter.last_error.startswith("HTTP 401: server said: bad credentials '")
