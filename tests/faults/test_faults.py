"""Faults: actors killed mid-run, a destination that never answers."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from engine.messages import message_id
from engine.receiver import Receiver
from tests.integration.test_runtime import events, http_hook
from tests.services import ray_get_when_up, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_killed_partition_and_transport_actors_lose_nothing(
        ray_session: Any, engine_factory: Any, receiver: Receiver) -> None:
    # Given a running engine delivering to one receiver
    engine = engine_factory(HTTP_POOL_SIZE=1, HOOK_RETRY_PERIOD_SEC=0.3, HOOK_RETRY_TIMES=10)
    receiver.keep_bodies = True
    hook = engine.create_hook(http_hook(receiver, "/k", actions=["click", "open"],
                                        max_batch_size=50, flush_timeout_sec=0.1))
    total, chunk = 24_000, 1_000
    accepted: list[int] = []
    matched: set[str] = set()

    def produce() -> None:
        for start in range(0, total, chunk):
            batch = events(chunk, types=("click", "open", "send"))
            for i, e in enumerate(batch):
                e["id"] = f"ev-{start + i}"
                e["list_id"] = 1 + (start + i) % 7
                if e["event_type"] != "send":
                    matched.add(message_id(hook.id, e["id"]))
            accepted.append(engine.publish(batch).accepted)
            time.sleep(0.05)

    def pid(actor: Any) -> int:
        return int(ray_get_when_up(lambda: actor.__ray_call__.remote(lambda _: os.getpid())))

    partition, transport = engine.actors["partitions"][0], engine.actors["pools"]["http_batch"][0]
    pids = (pid(partition), pid(transport))
    producer = threading.Thread(target=produce)
    producer.start()
    # When a partition actor and the transport actor are killed mid-run
    assert wait_for(lambda: len(receiver.messages("/k")) > 2_000, 30)
    ray_session.kill(partition, no_restart=False)
    assert wait_for(lambda: len(receiver.messages("/k")) > 6_000, 30)
    ray_session.kill(transport, no_restart=False)
    producer.join(60)
    # (both really died: Ray restarted them in new processes)
    assert pid(partition) != pids[0] and pid(transport) != pids[1]
    assert sum(accepted) == total
    # Then every accepted event still reaches the receiver (duplicates allowed)
    assert engine.wait_idle(120, include_retries=True)
    received = receiver.messages("/k")
    ids = {m["hook_message_id"] for m in received}
    assert not matched - ids, f"{len(matched - ids)} lost"
    assert ids == matched
    print(f"\nkills: {len(received)} messages received, {len(ids)} unique, "
          f"{len(received) - len(ids)} duplicates")


def test_dead_destination_does_not_hold_up_a_healthy_one(engine_factory: Any,
                                                        receiver: Receiver) -> None:
    # Given two hooks on the same events, served by one transport actor: one destination
    # answers, the other never does (its requests hang until the 10 s request timeout)
    engine = engine_factory(HTTP_POOL_SIZE=1, HOOK_RETRY_PERIOD_SEC=5.0, HOOK_RETRY_TIMES=0,
                            HTTP_REQUEST_TIMEOUT_SEC=10.0)
    receiver.keep_bodies = False
    receiver.behave("/dead", hang=True)
    healthy = engine.create_hook(http_hook(receiver, "/healthy", actions=["click"],
                                           flush_timeout_sec=0.1))
    dead = engine.create_hook(http_hook(receiver, "/dead", actions=["click"],
                                        flush_timeout_sec=0.1))
    n = 20_000
    # When n click events are published
    for _ in range(10):
        engine.publish(events(n // 10, types=("click",)))
    # Then the healthy destination gets every message while the dead one's first requests
    # still hang: nothing of the dead hook has settled yet, and it holds no more requests
    # open than the per-destination limit
    assert wait_for(lambda: receiver.delivered_count("/healthy") >= n, 60)
    hanging, stats = receiver.hanging("/dead"), engine.stats(dead.id)
    assert (stats["delivered"], stats["retried"], stats["dead_lettered"]) == (0, 0, 0), stats
    assert 0 < hanging <= engine.settings.DESTINATION_CONCURRENCY, hanging
    # and once its requests time out, every message of the dead hook ends as a dead letter
    # (the breaker fails the rest fast), while the healthy hook's stay delivered, once each
    assert wait_for(lambda: engine.stats(dead.id)["dead_lettered"] == n, 60), \
        engine.stats(dead.id)
    assert engine.wait_idle(30)
    assert receiver.delivered_count("/healthy") == n
    assert engine.stats(healthy.id) == {"accepted": n, "delivered": n, "retried": 0,
                                        "dead_lettered": 0, "discarded": 0}
    assert engine.stats(dead.id)["delivered"] == 0
