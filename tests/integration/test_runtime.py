"""The runtime end to end: real Redis, real local HTTP receivers, actors on a local Ray."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine.receiver import Receiver
from tests.services import wait_for

pytestmark = pytest.mark.integration


def http_hook(rx: Receiver, path: str, **kwargs: Any) -> dict[str, Any]:
    target = {"url": rx.url(path), "max_batch_size": kwargs.pop("max_batch_size", 100),
              "flush_timeout_sec": kwargs.pop("flush_timeout_sec", 0.3)}
    target.update(kwargs.pop("target", {}))
    return {"name": f"hook {path}", "active": True, "account_id": kwargs.pop("account_id", 1),
            "actions": kwargs.pop("actions", ["click", "open", "deliv"]),
            "target": {"http_batch": target}, **kwargs}


def events(n: int, account_id: int = 1, types: tuple[str, ...] = ("click", "open", "deliv",
                                                                    "send"), **extra: Any
           ) -> list[dict[str, Any]]:
    return [{"event_type": types[i % len(types)], "account_id": account_id,
             "list_id": 1 + (i // len(types)) % 4, "event_date": "2026-11-29T10:00:00.123456789Z",
             "event_data": {"campaign_id": 1 + i % 3, "message_id": 5}, **extra}
            for i in range(n)]




def test_fault_free_run_delivers_each_matched_pair_once_in_bounded_batches(
        engine_factory: Any, receiver: Receiver) -> None:
    # Given two hooks of one account with different batch sizes and one of another account
    # (a request timeout long enough that a busy machine's slow answer is not re-sent:
    # fault-free means no duplicate)
    engine = engine_factory(HTTP_REQUEST_TIMEOUT_SEC=30.0)
    small = engine.create_hook(http_hook(receiver, "/small", max_batch_size=7))
    big = engine.create_hook(http_hook(receiver, "/big", max_batch_size=100,
                                       actions=["click"], database=2))
    other = engine.create_hook(http_hook(receiver, "/other", account_id=2))
    # When 3,000 events of account 1 and 500 of account 2 are published
    published = events(3000) + events(500, account_id=2)
    result = engine.publish(published)
    assert result.accepted == 3500
    expected_small = sum(1 for e in published if e["account_id"] == 1
                         and e["event_type"] in ("click", "open", "deliv"))
    expected_big = sum(1 for e in published if e["account_id"] == 1
                       and e["event_type"] == "click" and e["list_id"] == 2)
    expected_other = sum(1 for e in published if e["account_id"] == 2
                         and e["event_type"] in ("click", "open", "deliv"))
    # Then every matched (event, hook) pair arrives exactly once
    assert engine.wait_idle(60)
    for path, n in (("/small", expected_small), ("/big", expected_big),
                    ("/other", expected_other)):
        ids = [m["hook_message_id"] for m in receiver.messages(path)]
        assert len(ids) == n, path
        assert len(set(ids)) == n, f"{path}: duplicates in a fault-free run"
    # and no batch is larger than its hook's max batch size
    assert max(len(r.messages) for r in receiver.requests("/small")) == 7
    assert max(len(r.messages) for r in receiver.requests("/big")) <= 100
    assert {m["account_id"] for m in receiver.messages("/other")} == {2}
    assert {m["list_id"] for m in receiver.messages("/big")} == {2}
    assert engine.stats(small.id) == {"accepted": expected_small, "delivered": expected_small,
                                      "retried": 0, "dead_lettered": 0, "discarded": 0}
    assert engine.stats(big.id)["delivered"] == expected_big
    assert engine.stats(other.id)["delivered"] == expected_other


def test_partial_batch_is_flushed_after_the_timeout(engine_factory: Any,
                                                    receiver: Receiver) -> None:
    engine = engine_factory()
    engine.create_hook(http_hook(receiver, "/slow-fill", max_batch_size=1000,
                                 flush_timeout_sec=1.0))
    started = time.time()
    engine.publish(events(9, types=("click",), list_id=3))  # one partition, one batch
    assert wait_for(lambda: receiver.requests("/slow-fill"), 20)
    (request,) = receiver.requests("/slow-fill")
    assert len(request.messages) == 9
    assert request.at - started >= 1.0, "flushed before the timeout"
    # (an upper bound with room for a busy machine: a batch left open waits for ever)
    assert request.at - started < 10.0, "not flushed soon after the timeout"


def test_failing_receiver_gets_the_batch_after_n_spaced_resends(
        engine_factory: Any, receiver: Receiver) -> None:
    # Given a receiver that fails its first 2 requests, retry period 0.5 s
    engine = engine_factory(HOOK_RETRY_PERIOD_SEC=0.5, HOOK_RETRY_TIMES=4)
    receiver.behave("/flaky", fail_first=2)
    hook = engine.create_hook(http_hook(receiver, "/flaky", max_batch_size=50))
    engine.publish(events(50, types=("click",), list_id=3))
    assert wait_for(lambda: receiver.messages("/flaky"), 20)
    requests = receiver.requests("/flaky")
    # Then the same batch arrives after exactly 2 re-sends, spaced >= the period
    assert [r.status for r in requests] == [500, 500, 200]
    assert all(r.messages == requests[0].messages for r in requests)
    gaps = [b.at - a.at for a, b in itertools.pairwise(requests)]
    assert all(gap >= 0.5 for gap in gaps), gaps
    assert wait_for(lambda: engine.stats(hook.id)["delivered"] == 50, 5)
    assert engine.stats(hook.id)["retried"] == 100  # 50 messages scheduled twice


def test_always_failing_receiver_yields_a_dead_letter_then_replay_delivers(
        engine_factory: Any, receiver: Receiver) -> None:
    engine = engine_factory(HOOK_RETRY_PERIOD_SEC=0.3, HOOK_RETRY_TIMES=3)
    receiver.behave("/down", always_fail=True, fail_status=503)
    hook = engine.create_hook(http_hook(receiver, "/down", max_batch_size=20))
    engine.publish(events(20, types=("open",), list_id=3))
    assert wait_for(lambda: engine.dead_letters(hook_id=hook.id), 20)
    # exactly HOOK_RETRY_TIMES re-sends after the first attempt
    assert len(receiver.requests("/down")) == 1 + 3
    (letter,) = engine.dead_letters(hook_id=hook.id)
    assert letter.resends == 3 and letter.messages == 20
    assert "HTTP 503" in letter.last_error
    assert engine.stats(hook.id)["dead_lettered"] == 20
    # When the receiver recovers and the dead letter is replayed
    receiver.behave("/down")
    assert engine.replay(hook_id=hook.id) == 1
    assert wait_for(lambda: len(receiver.messages("/down")) == 20, 10)
    assert engine.dead_letters(hook_id=hook.id) == []
    # counted once the retry worker has the outcome (a moment after the receiver)
    assert wait_for(lambda: engine.stats(hook.id)["delivered"] == 20, 10)


def test_content_attached_when_present_and_omitted_when_expired(
        engine_factory: Any, receiver: Receiver) -> None:
    engine = engine_factory()
    engine.create_hook(http_hook(receiver, "/content", send_content=True, actions=["send"]))
    engine.create_hook(http_hook(receiver, "/plain", actions=["send"]))
    engine.store_content(1, {"s-kept": {"subject": "Hello", "html": "<p>Hi</p>"}})
    engine.store_content(1, {"s-expired": {"subject": "Gone"}}, ttl_sec=1)
    # another account's content: under a send id of its own and under account 1's
    engine.store_content(2, {"s-theirs": {"subject": "Theirs"}, "s-kept": {"subject": "2"}})
    time.sleep(1.5)
    sids = ("s-kept", "s-expired", "s-never", "s-theirs")
    engine.publish([{**events(1, types=("send",))[0], "send_id": sid, "id": sid}
                    for sid in sids])
    assert wait_for(lambda: len(receiver.messages("/content")) == 4, 10)
    by_id = {m["hook_message_id"]: m for m in receiver.messages("/content")}
    content = {m.get("content", {}).get("subject") for m in by_id.values()}
    assert content == {"Hello", None}
    assert sum("content" in m for m in by_id.values()) == 1
    assert wait_for(lambda: len(receiver.messages("/plain")) == 4, 10)
    assert all("content" not in m for m in receiver.messages("/plain"))


def test_hook_changes_reach_a_running_engine(engine_factory: Any, receiver: Receiver) -> None:
    """Update, stop, activate, clone, delete and create, each on the running engine:
    the next events follow the change (stopped or deleted hooks send nothing)."""
    engine = engine_factory()
    hook = engine.create_hook(http_hook(receiver, "/a", actions=["click"],
                                        flush_timeout_sec=0.05))

    def arrives_after(change: Any, *paths: str) -> None:
        change()
        before = {p: len(receiver.messages(p)) for p in paths}
        engine.publish(events(1, types=("click",)))
        for path in paths:
            assert wait_for(lambda: len(receiver.messages(path)) > before[path], 10), path  # noqa: B023

    def nothing_arrives(*paths: str) -> None:
        before = {p: len(receiver.messages(p)) for p in paths}  # before publishing
        engine.publish(events(5, types=("click",)))
        assert engine.wait_idle(10)  # every event settled: matched ones delivered
        time.sleep(0.3)
        assert {p: len(receiver.messages(p)) for p in paths} == before

    # update: point the hook at another path
    data = hook.to_storage()
    data["target"]["http_batch"]["url"] = receiver.url("/b")
    arrives_after(lambda: engine.update_hook(hook.id, data), "/b")
    nothing_arrives("/a")
    # stop: nothing more arrives
    engine.stop_hook(hook.id)
    nothing_arrives("/b")
    accepted = engine.stats(hook.id)["accepted"]
    # activate again
    arrives_after(lambda: engine.activate_hook(hook.id), "/b")
    assert engine.stats(hook.id)["accepted"] == accepted + 1
    # a clone is stopped until activated; then both receive (the clone at its own path)
    clone = engine.clone_hook(hook.id)
    assert clone.active is False and clone.name.endswith("(copy)")
    moved = clone.to_storage()
    moved["target"]["http_batch"]["url"] = receiver.url("/clone")
    engine.update_hook(clone.id, moved)
    nothing_arrives("/clone")
    arrives_after(lambda: engine.activate_hook(clone.id), "/b", "/clone")
    # delete both: nothing more arrives
    engine.delete_hook(hook.id)
    engine.delete_hook(clone.id)
    nothing_arrives("/b", "/clone")
    # a new hook created on the running engine
    arrives_after(lambda: engine.create_hook(http_hook(receiver, "/c", actions=["click"],
                                                       flush_timeout_sec=0.05)), "/c")


def test_names_and_profiles_reach_custom_data(engine_factory: Any, receiver: Receiver) -> None:
    engine = engine_factory()
    engine.create_hook(http_hook(receiver, "/cd", actions=["click"], custom_data={
        "fields": ["email"], "pairs": {"cname": "{{campaign_name}}", "db": "{{database_name}}"}}))
    engine.upsert_names([{"account_id": 1, "kind": "campaigns", "id": 2, "name": "Spring"},
                         {"account_id": 1, "kind": "databases", "id": 1, "name": "Main"}])
    engine.upsert_profiles(1, {"p1": {"email": "ann@example.org"}})
    event = {**events(1, types=("click",))[0], "profile_id": "p1"}
    event["event_data"]["campaign_id"] = 2
    engine.publish([event])
    assert wait_for(lambda: receiver.messages("/cd"), 10)
    (msg,) = receiver.messages("/cd")
    assert msg["custom_data"] == {"email": "ann@example.org", "cname": "Spring", "db": "Main"}
    # a renamed campaign reaches the running engine
    engine.upsert_names([{"account_id": 1, "kind": "campaigns", "id": 2, "name": "Summer"}])
    engine.publish([event])
    assert wait_for(lambda: len(receiver.messages("/cd")) == 2, 10)
    assert receiver.messages("/cd")[1]["custom_data"]["cname"] == "Summer"


def test_test_event_reports_the_outcome(engine_factory: Any, receiver: Receiver) -> None:
    engine = engine_factory()
    ok = engine.create_hook(http_hook(receiver, "/t", filters={"campaigns": [999]},
                                      target={"success_regex": "^OK$"}))
    outcome = engine.test_event(ok.id, "deliv")
    assert outcome.ok and outcome.status == 200 and outcome.detail == "OK"
    (msg,) = receiver.messages("/t")  # a one-element array, filters bypassed
    assert msg["event_type"] == "deliv" and msg["is_test"] is True
    receiver.behave("/bad", always_fail=True, fail_status=502)
    bad = engine.create_hook(http_hook(receiver, "/bad"))
    outcome = engine.test_event(bad.id, "click")
    assert not outcome.ok and outcome.status == 502 and "HTTP 502" in outcome.detail
    dead = engine.create_hook({**http_hook(receiver, "/x"), "target": {"http_batch": {
        "url": "http://127.0.0.1:9/nothing-listens"}}})
    outcome = engine.test_event(dead.id, "open")
    assert not outcome.ok and outcome.error == "ConnectError"
    assert "127.0.0.1:9" in outcome.detail


def test_stats_count_every_message_of_every_hook(engine_factory: Any,
                                                 receiver: Receiver) -> None:
    engine = engine_factory()
    hooks = [engine.create_hook(http_hook(receiver, f"/s{i}", actions=["click"]))
             for i in range(3)]
    engine.publish(events(40, types=("click", "open")))
    assert engine.wait_idle(20)
    stats = engine.stats()
    assert stats["engine"]["events_accepted"] == 40
    assert [stats[h.id]["delivered"] for h in hooks] == [20, 20, 20]
    assert Counter(m["event_type"] for m in receiver.messages("/s0")) == {"click": 20}


def test_a_start_failing_half_way_leaves_no_actor_behind(
        ray_session: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport actors were up when the partitions could not be made: they are
    killed again, so their names are free for the next start."""
    from actors import workers
    from actors.driver import Engine
    from engine.transports.base import available_kinds

    def no_room(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no room for partitions")

    monkeypatch.setattr(workers.PartitionActor, "options", no_room)
    with pytest.raises(RuntimeError, match="no room for partitions"):
        Engine.start(settings)
    names = [f"{settings.REDIS_PREFIX}:{kind}:0" for kind in available_kinds()]

    def gone(name: str) -> bool:
        try:
            ray_session.get_actor(name, namespace="hookray-tests")
        except ValueError:
            return True
        return False

    assert wait_for(lambda: all(map(gone, names)), timeout=30), names
    monkeypatch.undo()
    engine = Engine.start(settings)  # the same names again
    engine.shutdown()


def test_a_second_engine_with_the_same_prefix_is_refused_and_the_first_runs_on(
        engine_factory: Any, settings: Any, ray_session: Any) -> None:
    from actors.driver import Engine
    from engine.errors import PrefixTaken

    # Given an engine running on the session's Ray
    first = engine_factory()
    # When another one of the same REDIS_PREFIX starts on the same cluster
    with pytest.raises(PrefixTaken) as info:
        Engine.start(settings)
    # Then it is refused, naming the prefix and the namespace its actors are in
    assert str(info.value) == (
        f"an engine with REDIS_PREFIX {settings.REDIS_PREFIX!r} already runs on this Ray "
        f"cluster (its actors {settings.REDIS_PREFIX}:... in namespace 'hookray-tests'); "
        f"stop it first, or give this engine another REDIS_PREFIX")
    # and the first engine's actors were left alone
    assert ray_session.get(first.actors["retry"].ping.remote(), timeout=30)
    assert ray_session.get([a.ping.remote() for a in first.actors["pools"]["http_batch"]],
                           timeout=30)


def test_an_engine_of_the_same_prefix_on_another_ray_cluster_is_refused(
        engine_factory: Any, settings: Any, receiver: Receiver, ray_session: Any,
        redis_client: Any, tmp_path: Path, ray_tmpdir: str) -> None:
    # Given an engine running on the session's Ray, its claim on the prefix renewed
    # every 0.4 s
    first = engine_factory(ENGINE_LEASE_SEC=2)
    hook = first.create_hook(http_hook(receiver, "/first", actions=["click"]))
    claim = first.redis.get(first.keys.engine)
    assert claim is not None and claim.startswith(first.lease.owner.encode() + b" ")
    # When `hookray run` starts an engine on the same Redis and prefix, with a Ray of
    # its own (its actor names cannot clash with the first engine's)
    config = tmp_path / "main.json"
    config.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL, "ENGINE_LEASE_SEC": 2,
                                  "REDIS_PREFIX": settings.REDIS_PREFIX}))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmpdir  # none of the session Ray's address files
    proc = subprocess.run(
        [sys.executable, "-m", "actors.cli", "-c", str(config), "run", "--duration", "30"],
        env=env, capture_output=True, text=True, timeout=240,
        cwd=Path(__file__).resolve().parents[2])
    # Then it is refused once the first engine renewed its claim, naming that engine
    assert proc.returncode == 2, proc.stdout + proc.stderr
    gcs = ray_session.get_runtime_context().gcs_address
    assert (f"an engine with REDIS_PREFIX {settings.REDIS_PREFIX!r} already runs on this "
            f"Redis (host {socket.gethostname()}, pid {os.getpid()}, Ray cluster {gcs}, "
            "started ") in proc.stderr, proc.stderr
    assert "is held by another engine" in proc.stderr  # it said why it waited
    # and the first engine runs on, the only one reading the intake, its PARTITIONS
    # (2) still the recorded count
    assert first.redis.hget(first.keys.config, "partitions") == b"2"
    assert first.redis.get(first.keys.engine).startswith(first.lease.owner.encode())
    assert first.publish(events(40, types=("click",))).accepted == 40
    assert first.wait_idle(60)
    ids = [m["hook_message_id"] for m in receiver.messages("/first")]
    assert len(ids) == len(set(ids)) == 40
    assert first.stats(hook.id)["delivered"] == 40
    # and a stopped engine gives the prefix up at once
    first.shutdown()
    assert redis_client.exists(first.keys.engine) == 0


def test_an_engine_started_after_a_crash_waits_for_the_old_claim_to_lapse(
        engine_factory: Any, settings: Any, redis_client: Any, keys: Any) -> None:
    from engine.lease import EngineLease

    # Given the claim of an engine that crashed (nothing renews it; 1.5 s left)
    crashed = EngineLease(redis_client, keys, 1.5, about={"host": "gone", "pid": 7})
    assert crashed.claim() is None
    # When an engine starts on the prefix
    began = time.monotonic()
    engine = engine_factory(ENGINE_LEASE_SEC=2)
    # Then it waited for that claim to lapse, and holds the prefix now
    assert time.monotonic() - began > 1.0
    claim = redis_client.get(keys.engine)
    assert claim is not None and claim.startswith(engine.lease.owner.encode())
    # and gives it up when it stops
    engine.shutdown()
    assert redis_client.exists(keys.engine) == 0


def test_a_shutdown_cut_short_still_gives_the_prefix_up(
        engine_factory: Any, redis_client: Any, keys: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    engine = engine_factory(ENGINE_LEASE_SEC=1)
    renewer = engine._renewer
    assert renewer is not None and redis_client.exists(keys.engine)
    # When Ctrl-C cuts the shutdown short while it waits for the workers to stop
    real_get = ray.get

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(ray, "get", real_get)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.shutdown()
    # Then the renewal ended and the claim is given up anyway
    assert not renewer.thread.is_alive() and engine.lease is None
    time.sleep(1.5)  # a renewal would have set it again by now
    assert redis_client.exists(keys.engine) == 0
    # (the actors it did not get to stop are stopped by the factory's shutdown)


def test_a_shutdown_waits_for_every_worker_however_many_fail(
        ray_session: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker whose stop fails at once (dead, or restarting) does not cut the wait for
    the others short: the retry worker still takes its hand-overs back before the
    actors are killed; the failure and the calls left running are logged."""
    import logging

    from actors.driver import finish_all

    @ray_session.remote
    def dead() -> None:
        raise RuntimeError("the actor died")

    @ray_session.remote
    def stopping(path: str, sec: float) -> bool:
        time.sleep(sec)
        Path(path).write_text("stopped")
        return True

    mark = tmp_path / "stopped"
    with caplog.at_level(logging.WARNING, logger="hookray"):
        assert finish_all([dead.remote(), stopping.remote(str(mark), 1.0),
                           stopping.remote(str(tmp_path / "late"), 60)], 8,
                          "stopping workers") == 1
    assert mark.read_text() == "stopped"
    said = [r.getMessage() for r in caplog.records]
    assert any("stopping workers: " in m and "the actor died" in m for m in said), said
    assert "stopping workers: 1 of 3 did not finish within 8 s" in said


def test_a_start_whose_actors_never_answer_ends_with_a_clear_error(
        ray_session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Actors whose processes Ray cannot start (or that never answer) end the start
    with an error saying so, instead of holding it, and the prefix, for ever."""
    import actors.driver
    from engine.errors import ConfigError

    @ray_session.remote(num_cpus=0)
    class Silent:
        def ping(self) -> None:
            time.sleep(60)

    monkeypatch.setattr(actors.driver, "START_SEC", 0.5)
    silent = Silent.remote()
    try:
        with pytest.raises(ConfigError, match="the engine's actors did not all answer "
                                              "within 2 s of their start"):
            actors.driver._started([silent])
    finally:
        ray_session.kill(silent)


def test_a_second_http_api_of_the_same_prefix_is_refused(
        engine_factory: Any, settings: Any) -> None:
    from actors.driver import Engine
    from engine.errors import ConfigError, PrefixTaken

    engine = engine_factory(API_PORT=0)
    assert engine.api_url
    with pytest.raises(ConfigError, match="the HTTP API of this engine runs already, on "
                       + engine.api_url):
        engine.start_api(0)
    other = Engine.connect(settings)  # another handle, say another process
    try:
        with pytest.raises(PrefixTaken) as info:
            other.start_api(0)
        assert str(info.value).startswith(
            f"an engine with REDIS_PREFIX {settings.REDIS_PREFIX!r} already runs on this "
            "Ray cluster with its HTTP API (its actors")
    finally:
        other.shutdown()
    assert engine.api is not None and engine.api_url  # the first API serves on


def test_an_api_port_in_use_is_a_config_error_and_frees_the_actor_name(
        engine_factory: Any) -> None:
    import socket

    from engine.errors import ConfigError

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            engine_factory(API_PORT=port)
    assert str(info.value) == (f"the HTTP API could not start on 127.0.0.1:{port}: "
                               "[Errno 98] Address already in use")
    engine = engine_factory(API_PORT=0)  # the same actor names, the API's too
    assert engine.api_url


def test_the_engine_records_its_event_codes_at_start(engine_factory: Any,
                                                     redis_client: Any) -> None:
    # When an engine starts
    engine = engine_factory()
    # Then its event codes are recorded beside its PARTITIONS, for other producers
    from engine.catalogue import builtin_catalogue
    from engine.keys import Keys

    config = Keys(engine.settings.REDIS_PREFIX).config
    recorded = json.loads(redis_client.hget(config, "event_types"))
    assert recorded == sorted(builtin_catalogue().codes())
    assert int(redis_client.hget(config, "partitions")) == engine.settings.PARTITIONS


def test_the_records_are_written_again_when_redis_loses_them(engine_factory: Any,
                                                              redis_client: Any) -> None:
    # Given a running engine whose Redis lost its config record (restarted empty)
    engine = engine_factory(ENGINE_LEASE_SEC=1.0)
    from engine.catalogue import builtin_catalogue
    from engine.keys import Keys

    config = Keys(engine.settings.REDIS_PREFIX).config
    codes = json.dumps(sorted(builtin_catalogue().codes())).encode()
    redis_client.delete(config)
    # Then its claim renewer writes PARTITIONS and the event codes again, PARTITIONS
    # marked unchecked (the next start checks the streams of other counts)
    assert wait_for(lambda: redis_client.hget(config, "event_types") is not None, 10)
    assert redis_client.hgetall(config) == {
        b"partitions": str(engine.settings.PARTITIONS).encode(), b"checking": b"restored",
        b"event_types": codes}
    # and event codes of older data are replaced; another PARTITIONS (an engine that
    # held the claim meanwhile, say) is put back to the engine's own, its streams empty
    try:
        redis_client.hset(config, mapping={"partitions": 99, "event_types": '["click"]'})
        assert wait_for(lambda: redis_client.hget(config, "event_types") == codes, 10)
        assert wait_for(lambda: int(redis_client.hget(config, "partitions"))
                        == engine.settings.PARTITIONS, 10)
    finally:
        redis_client.hset(config, "partitions", engine.settings.PARTITIONS)


def test_a_stop_says_in_the_drivers_output_what_its_drain_left(
        engine_factory: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """A partition's stop line went only to its actor's log, which Ray, shut down right
    after, often never forwarded: the driver says it, from the workers' answers."""
    import logging

    receiver.behave("/hangs", hang=True)
    engine = engine_factory(HTTP_REQUEST_TIMEOUT_SEC=120.0)
    engine.create_hook(http_hook(receiver, "/hangs", max_batch_size=100))
    engine.publish(events(8, types=("click",), list_id=3))  # one partition, one batch
    time.sleep(3)  # sent after its 0.3 s window; the answer never comes
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hookray"):
        engine.shutdown()
    took = time.monotonic() - started
    said = [r.getMessage() for r in caplog.records
            if "stopped with 8 message(s) in 1 batch(es) whose outcome did not come within "
            "5 s; scheduled as re-sends of their own hooks" in r.getMessage()]
    assert said and said[0].startswith("partition "), [r.getMessage() for r in caplog.records]
    assert took < 20, took  # the drain's 5 s, within the driver's STOP_SEC
