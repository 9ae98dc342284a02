"""RaySender with real transport actors (HTTP) and a local receiver: one call per
actor for many hooks, a slow destination, an actor restart, call sizes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from actors.sender import RaySender
from engine.hooks import Hook
from engine.receiver import Receiver
from engine.settings import Settings
from engine.transports.base import Delivery, Outcome
from tests.services import ray_get_when_up, wait_for

pytestmark = pytest.mark.integration


def make_hook(hook_id: int, url: str) -> Hook:
    return Hook.model_validate({
        "id": hook_id, "name": f"h{hook_id}", "active": True, "account_id": 1,
        "actions": ["click"], "target": {"http_batch": {"url": url}}})


def delivery(hook_id: int, n: int, size: int = 2) -> Delivery:
    body = json.dumps({"hook_message_id": f"{hook_id}-{n}", "pad": "x" * size}).encode()
    return Delivery(id=f"{hook_id}-{n}", hook_id=hook_id, account_id=1, kind="http_batch",
                    parts=[body], message_ids=[f"{hook_id}-{n}"])


@pytest.fixture
def pool(ray_session: Any) -> Any:
    """Two HTTP transport actors with a 2 s request timeout."""
    from actors.transport import TransportActor

    settings = Settings(HTTP_REQUEST_TIMEOUT_SEC=2.0).model_dump(mode="json")
    actors = [TransportActor.options(max_restarts=1).remote("http_batch", settings)
              for _ in range(2)]
    ray_session.get([a.ping.remote() for a in actors])
    yield actors
    for actor in actors:
        ray_session.kill(actor)


def drain(sender: RaySender, want: int, timeout: float = 30.0,
          seen: list[list[str]] | None = None) -> list[tuple[Delivery, Outcome]]:
    """Poll until ``want`` outcomes came back; ``seen`` gets the ids of each poll's."""
    out: list[tuple[Delivery, Outcome]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want:
        assert time.monotonic() < deadline, f"only {len(out)}/{want} outcomes"
        got = sender.poll(0.05)
        if got and seen is not None:
            seen.append([d.id for d, _ in got])
        out += got
    return out


def test_one_call_per_actor_carries_the_batches_of_many_hooks(
        pool: Any, receiver: Receiver) -> None:
    sender = RaySender({"http_batch": pool})
    hooks = [make_hook(i, receiver.url(f"/h{i}")) for i in range(1, 31)]
    for hook in hooks:
        for n in range(2):
            sender.submit(hook, delivery(hook.id or 0, n))
    assert sender.inflight() == 60
    out = sender.poll(0.0)
    assert len(sender.calls) + (1 if out else 0) <= 2  # one call per actor, not per hook
    out += drain(sender, 60 - len(out))
    assert sender.inflight() == 0 and not sender.outstanding and not sender.calls
    assert sorted(d.id for d, _ in out) == sorted(f"{h.id}-{n}" for h in hooks for n in range(2))
    assert all(o.ok and o.status == 200 for _, o in out)
    for hook in hooks:  # each batch went to its own hook's URL
        assert sorted(m["hook_message_id"] for m in receiver.messages(f"/h{hook.id}")) == [
            f"{hook.id}-0", f"{hook.id}-1"]


def test_a_slow_destination_does_not_hold_back_other_outcomes(
        pool: Any, receiver: Receiver) -> None:
    receiver.behave("/slow", hang=True)
    sender = RaySender({"http_batch": pool[:1]}, wait_sec=0.1)
    slow, fast = make_hook(1, receiver.url("/slow")), make_hook(2, receiver.url("/fast"))
    sender.submit(slow, delivery(1, 0))
    for n in range(5):
        sender.submit(fast, delivery(2, n))
    seen: list[list[str]] = []
    first = drain(sender, 5, seen=seen)
    # the healthy hook's outcomes came back while the slow batch was still outstanding
    assert sorted(d.id for d, _ in first) == [f"2-{n}" for n in range(5)]
    assert "1-0" in sender.outstanding
    more = sender.poll(0.0)
    for n in range(5, 8):  # and later batches of the healthy hook are not held either
        sender.submit(fast, delivery(2, n))
    more += drain(sender, 3 - len(more), seen=seen)
    assert sorted(d.id for d, _ in more) == ["2-5", "2-6", "2-7"]
    assert "1-0" in sender.outstanding
    [(d, outcome)] = drain(sender, 1)  # the request timeout (2 s)
    assert d.id == "1-0" and not outcome.ok and outcome.error == "Timeout"
    assert sender.inflight() == 0


def test_batches_of_a_restarted_actor_fail_and_are_not_lost(
        ray_session: Any, receiver: Receiver) -> None:
    from actors.transport import TransportActor

    receiver.behave("/slow", hang=True)
    # a request timeout far beyond the test's: the hung request still runs when asked
    # about, however slow a busy machine is to get there (the pool's 2 s may pass)
    settings = Settings(HTTP_REQUEST_TIMEOUT_SEC=300.0).model_dump(mode="json")
    actor = TransportActor.options(max_restarts=1).remote("http_batch", settings)
    try:
        ray_session.get(actor.ping.remote())
        sender = RaySender({"http_batch": [actor]}, wait_sec=0.05)
        sender.submit(make_hook(1, receiver.url("/slow")), delivery(1, 0))
        deadline = time.monotonic() + 10
        # handed over, not done at the first answer: a later call asks about it
        while not any(collect for _, _, collect in sender.calls.values()):
            assert time.monotonic() < deadline
            assert not sender.poll(0.02)
        assert ray_session.get(actor.exchange.remote([], ["1-0"], 0.0)) == ({}, [])  # running
        ray_session.kill(actor, no_restart=False)
        [(d, outcome)] = drain(sender, 1)
        assert d.id == "1-0" and not outcome.ok
        # no fault of the destination: a few such failures in a row use up no re-send
        assert outcome.error == "TransportRestarted", outcome
        assert sender.inflight() == 0 and not sender.outstanding
        # the restarted actor does not know the batch
        assert ray_get_when_up(lambda: actor.exchange.remote([], ["1-0"], 0.0)) == \
            ({}, ["1-0"])
    finally:
        ray_session.kill(actor)


def test_a_call_carries_at_most_the_byte_limit(
        pool: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("actors.sender.CALL_MAX_BYTES", 5_000)
    sender = RaySender({"http_batch": pool[:1]}, calls_per_actor=2)
    hook = make_hook(1, receiver.url("/big"))
    for n in range(4):
        sender.submit(hook, delivery(1, n, size=2_000))
    sender.submit(hook, delivery(1, 4, size=20_000))  # larger than a call: goes alone
    sender.poll(0.0)
    # two calls in flight at most: [2 batches] [2 batches]; the rest waits its turn
    assert sorted(len(covered) for _, covered, _ in sender.calls.values()) == [2, 2]
    assert [d.id for _, d in sender.queued[("http_batch", 0)]] == ["1-4"]
    out = drain(sender, 5)
    assert sorted(d.id for d, _ in out) == [f"1-{n}" for n in range(5)]
    assert all(o.ok for _, o in out)


def test_a_kind_without_a_pool_fails_its_batches(ray_session: Any) -> None:
    sender = RaySender({})
    sender.submit(make_hook(3, "http://127.0.0.1:9/x"), delivery(3, 0))
    assert sender.inflight() == 1
    [(d, outcome)] = drain(sender, 1)
    assert d.id == "3-0" and not outcome.ok and outcome.error == "TransportUnavailable"
    assert sender.inflight() == 0


def test_a_delivery_submitted_again_while_outstanding_gets_one_outcome(
        pool: Any, receiver: Receiver) -> None:
    """The retry worker claims a delivery again when its lease ran out during a long
    send: the second submit is not queued, and the one outcome settles it."""
    receiver.behave("/slow", hang=True)
    sender = RaySender({"http_batch": pool[:1]}, wait_sec=0.05)
    slow = make_hook(1, receiver.url("/slow"))
    sender.submit(slow, delivery(1, 0))
    assert not sender.poll(0.0)  # handed over, still running
    sender.submit(slow, delivery(1, 0))  # claimed again
    assert sender.inflight() == 1 and not sender.queued
    [(d, outcome)] = drain(sender, 1)  # the request timeout (2 s), and no KeyError
    assert d.id == "1-0" and outcome.error == "Timeout"
    assert sender.inflight() == 0 and not sender.poll(0.2)


def test_a_call_that_cannot_be_made_keeps_its_batches(
        pool: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sender = RaySender({"http_batch": pool[:1]})
    hook = make_hook(1, receiver.url("/ok"))
    for n in range(3):
        sender.submit(hook, delivery(1, n))

    def broken(deliveries: list[Delivery]) -> Any:
        raise OverflowError("cannot pack")

    monkeypatch.setattr("actors.sender.pack_deliveries", broken)
    with pytest.raises(OverflowError):
        sender.poll(0.0)
    assert sender.inflight() == 3 and not sender.calls
    assert [d.id for _, d in sender.queued[("http_batch", 0)]] == ["1-0", "1-1", "1-2"]
    monkeypatch.undo()
    out = drain(sender, 3)  # the next round hands them over
    assert sorted(d.id for d, _ in out) == ["1-0", "1-1", "1-2"] and all(o.ok for _, o in out)


def test_outcomes_collected_before_a_call_fails_are_returned(
        pool: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll that collects outcomes, then cannot make the next call (the arguments
    cannot be packed or put), returns those outcomes; the call's error comes from the
    next poll, and its batches are handed over once it can be made."""
    import actors.sender as sender_module

    monkeypatch.setattr(sender_module, "CALL_MAX_BYTES", 1)  # one batch per call
    sender = RaySender({"http_batch": pool[:1]}, calls_per_actor=1)
    hook = make_hook(1, receiver.url("/ok"))
    sender.submit(hook, delivery(1, 0))
    sender.submit(hook, delivery(1, 1))
    assert not sender.poll(0.0)  # 1-0 handed over; 1-1 waits for the free slot
    packed = sender_module.pack_deliveries

    def broken(deliveries: list[Delivery]) -> Any:
        raise OverflowError("cannot pack")

    monkeypatch.setattr(sender_module, "pack_deliveries", broken)
    got: list[tuple[Delivery, Outcome]] = []
    deadline = time.monotonic() + 30
    while not got:  # 1-0's outcome comes back; the call for 1-1 cannot be made
        assert time.monotonic() < deadline, "no outcome for 1-0"
        got += sender.poll(0.2)  # no error: the failed call is the next poll's
    assert [(d.id, o.ok) for d, o in got] == [("1-0", True)]
    assert sender.holds("1-1") and not sender.holds("1-0") and sender.inflight() == 1
    with pytest.raises(OverflowError):  # the next poll says why 1-1 does not leave
        sender.poll(0.0)
    monkeypatch.setattr(sender_module, "pack_deliveries", packed)
    out = drain(sender, 1)
    assert [(d.id, o.ok) for d, o in out] == [("1-1", True)]
    assert [m["hook_message_id"] for m in receiver.messages("/ok")] == ["1-0", "1-1"]


def test_a_bad_group_fails_alone_in_an_exchange_call(
        ray_session: Any, pool: Any, receiver: Receiver) -> None:
    """Target settings that do not validate fail their own batches (BadTarget); a blob
    that cannot be read is skipped (its batches are unknown to the actor, so retried);
    the other groups of the call are delivered."""
    from actors.sender import target_json
    from engine.transports.base import pack_deliveries

    actor = pool[0]
    good = make_hook(1, receiver.url("/good"))
    groups = [("http_batch", target_json(good), pack_deliveries([delivery(1, 0)])),
              ("http_batch", '{"url": "not a url"}', pack_deliveries([delivery(2, 0)])),
              ("http_batch", target_json(good), b"\xc1 not msgpack")]
    outcomes, unknown = ray_session.get(actor.exchange.remote(groups, ["3-0"], 5.0))
    assert outcomes["1-0"].ok
    assert outcomes["2-0"].error == "BadTarget" and "url" in outcomes["2-0"].detail
    assert unknown == ["3-0"] and set(outcomes) == {"1-0", "2-0"}
    assert [m["hook_message_id"] for m in receiver.messages("/good")] == ["1-0"]


def test_a_stored_hooks_settings_are_taken_as_stored_and_errors_quote_no_input(
        ray_session: Any, pool: Any, receiver: Receiver) -> None:
    """Settings a rule added later refuses (a Content-Type header other than JSON's)
    were stored under the old rules: the transport actor delivers them, as the
    registry loads them. Settings that do not validate at all name field and reason,
    never a piece of the input (a secret cut short, which no scrub recognises)."""
    import json

    from engine.transports.base import pack_deliveries

    actor = pool[0]
    secret = "sk_live_abcdefghijklmnopqrstuvwxyz0123456789"
    old = json.dumps({"url": receiver.url("/old"),
                      "headers": {"Content-Type": "text/plain", "X-Api-Key": secret}})
    bad = json.dumps({"url": receiver.url("/bad"),
                      "headers": {"X-Api-Key": secret, "X-Other": "a\nb"}})
    groups = [("http_batch", old, pack_deliveries([delivery(1, 0)])),
              ("http_batch", bad, pack_deliveries([delivery(2, 0)]))]
    outcomes, unknown = ray_session.get(actor.exchange.remote(groups, [], 5.0))
    assert outcomes["1-0"].ok, outcomes["1-0"]
    assert [m["hook_message_id"] for m in receiver.messages("/old")] == ["1-0"]
    assert outcomes["2-0"].error == "BadTarget" and not unknown
    assert "headers: header 'X-Other': value holds a line break" in outcomes["2-0"].detail
    assert "sk_live" not in outcomes["2-0"].detail, outcomes["2-0"].detail


def test_a_transport_actor_collects_cycles_less_often(pool: Any, ray_session: Any) -> None:
    """What the actor allocated while starting is frozen out of collections, and young
    collections run every GC_YOUNG_THRESHOLD allocations, not Python's 700."""
    import gc

    from actors.gc_policy import GC_YOUNG_THRESHOLD

    def collector(_: Any) -> tuple[tuple[int, int, int], int]:
        return gc.get_threshold(), gc.get_freeze_count()

    threshold, frozen = ray_session.get(pool[0].__ray_call__.remote(collector))
    assert threshold[0] == GC_YOUNG_THRESHOLD == 50_000
    assert threshold[1:] == (10, 10)  # the older generations as Python has them
    assert frozen > 10_000  # modules, Ray's and aiohttp's objects


def test_relaxed_gc_for_a_block_puts_the_collector_back() -> None:
    """The benchmarks' bare clients run with the transport actors' collector settings
    for the timed block only: thresholds and the frozen set as they were after it."""
    import gc

    from actors.gc_policy import GC_YOUNG_THRESHOLD, relaxed_gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with relaxed_gc():
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > frozen
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen


def test_an_outcome_not_yet_returned_is_held_and_not_taken_twice(
        pool: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery whose outcome waits to be returned (no pool for its kind, and the
    poll that would return it raised) is still held: the retry worker does not claim
    it again, and a second submit does not give it a second outcome."""
    import actors.sender as sender_module

    sender = RaySender({"http_batch": pool[:1]})
    no_pool = Hook.model_validate({
        "id": 2, "name": "q", "active": True, "account_id": 1, "actions": ["click"],
        "target": {"kafka": {"bootstrap_servers": ["127.0.0.1:9"], "topic": "t"}}})
    sender.submit(make_hook(1, receiver.url("/ok")), delivery(1, 0))
    sender.submit(no_pool, delivery(2, 0))
    assert sender.holds("2-0")

    def broken(deliveries: list[Delivery]) -> Any:
        raise OverflowError("cannot pack")

    monkeypatch.setattr(sender_module, "pack_deliveries", broken)
    with pytest.raises(OverflowError):
        sender.poll(0.0)
    assert sender.holds("2-0")  # collected, not returned
    sender.submit(no_pool, delivery(2, 0))  # claimed again: not queued twice
    monkeypatch.undo()
    out = drain(sender, 2)
    assert sorted((d.id, o.ok, o.error) for d, o in out) == [
        ("1-0", True, None), ("2-0", False, "TransportUnavailable")]
    assert not sender.holds("2-0") and sender.inflight() == 0


def test_a_hung_transport_actor_fails_its_calls_and_is_restarted(
        ray_session: Any, pool: Any, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport actor alive but not answering (its process frozen): its calls fail
    after CALL_DEADLINE_SEC, uncharged, instead of holding the partition's in-flight
    limit for ever without an error, and the actor is restarted."""
    import os
    import signal

    from ray.util.state import get_actor

    monkeypatch.setattr("actors.sender.CALL_DEADLINE_SEC", 2.0)
    actor = pool[0]
    pid = get_actor(actor._actor_id.hex()).pid
    os.kill(pid, signal.SIGSTOP)
    try:
        sender = RaySender({"http_batch": [actor]}, wait_sec=0.05)
        sender.submit(make_hook(1, receiver.url("/x")), delivery(1, 0))
        [(d, outcome)] = drain(sender, 1, timeout=30)
        assert d.id == "1-0" and outcome.error == "TransportRestarted", outcome
        assert "answered no call within 2 s" in outcome.detail
        assert sender.inflight() == 0 and not sender.calls
    finally:
        os.kill(pid, signal.SIGCONT)  # a process Ray has not killed yet goes on
    # a new process (the state Ray reports lags the restart a little)
    assert wait_for(lambda: (state := get_actor(actor._actor_id.hex())) is not None
                    and state.state == "ALIVE" and state.pid != pid, 30)
    assert ray_get_when_up(lambda: actor.ping.remote()) == "http_batch"


def test_a_call_that_raises_fails_its_batches_as_itself_not_as_a_restart(
        pool: Any, receiver: Receiver) -> None:
    """A call the transport actor raises from (a bug, not a restart) fails its batches
    under its own error, which uses up re-sends: only an actor that died or restarts is
    ``TransportRestarted`` (no fault of the destination)."""
    sender = RaySender({"http_batch": [pool[0]]}, wait_sec="not a number")  # type: ignore[arg-type]
    sender.submit(make_hook(1, receiver.url("/x")), delivery(1, 0))
    [(d, outcome)] = drain(sender, 1)
    assert d.id == "1-0" and not outcome.ok
    assert outcome.error != "TransportRestarted" and "RayTaskError" in outcome.error, outcome
    assert "transport actor failed" in outcome.detail
