"""Hooks changing between a failed round (or a refused hand-over) and the round that
takes its work up again."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.hooks import Hook
from engine.keys import Keys
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import Delivery
from tests.integration.test_workers import InProcessSender, clicks, hook, one_intake

pytestmark = pytest.mark.integration


class RefusesOnce(InProcessSender):
    """A sender whose first hand-over is refused (a transport actor gone, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = 1

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("hand-over refused")
        super().submit(hook, delivery)


def queue_hook(name: str, **kw: Any) -> dict[str, Any]:
    return hook(name=name, target={"rabbitmq_queue": {"host": "127.0.0.1", "queue": name}},
                **kw)


def refused_batch(redis_client: redis.Redis, settings: Settings, keys: Keys
                  ) -> tuple[HookRegistry, int, RefusesOnce, PartitionWorker]:
    """A hook (queue q1) whose batch of one click the sender refused: it waits in the
    partition's outbox for the next round."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    created = registry.create(queue_hook("q1"))
    one_intake(redis_client, keys, 10).publish(clicks(1))
    sender = RefusesOnce()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    errors = steps(worker, 3, until_error=True)
    assert [str(e) for e in errors] == ["hand-over refused"]
    assert [d.hook_id for d in worker.dispatcher.outbox] == [created.id]
    return registry, created.id or 0, sender, worker


def steps(worker: PartitionWorker, n: int, until_error: bool = False) -> list[Exception]:
    errors = []
    for _ in range(n):
        try:
            worker.step(block_ms=5)
        except Exception as exc:
            errors.append(exc)
            if until_error:
                break
    return errors


def test_a_batch_whose_hand_over_was_refused_is_not_sent_once_its_hook_is_deleted(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    """A batch closed but refused by the sender waits in the outbox for the next round;
    its hook deleted meanwhile, it went all the same (to the destination the hook was
    deleted to stop); now it is failed as a deleted hook's open batch is."""
    registry, hook_id, sender, worker = refused_batch(redis_client, settings, keys)
    registry.delete(hook_id)
    assert steps(worker, 3) == []
    assert sender.transport.sent == []
    worker.drain(5)
    assert sender.transport.sent == []
    # booked as a failed send of a deleted hook (the retry worker dead-letters it)
    (scheduled,) = RetryStore(redis_client, keys).claim_due(now=2**50)
    assert "was deleted before this batch was sent" in scheduled.last_error


def test_a_refused_batch_goes_to_its_hooks_destination_as_changed_meanwhile(
        redis_client: redis.Redis, settings: Settings, keys: Keys) -> None:
    registry, hook_id, sender, worker = refused_batch(redis_client, settings, keys)
    registry.update(hook_id, queue_hook("q2"))
    assert steps(worker, 3) == []
    worker.drain(5)
    # (the refused round's entry is processed again too: its message goes twice,
    # at-least-once, each time to the hook's destination as it is now)
    assert {h.target.settings.queue for h in sender.hooks} == {"q2"}  # type: ignore[union-attr]
    assert sender.transport.sent


def test_a_hook_made_between_a_failed_round_and_its_retry_counts_what_it_takes(
        redis_client: redis.Redis, settings: Settings, keys: Keys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round fails after counting its matches: processed again, its entries were not
    counted at all, and a hook made (or activated) in between took their events
    uncounted (accepted 0, delivered 3). Now only the hooks counted before are left
    out, and none is counted twice."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    registry = HookRegistry(redis_client, keys)
    first = registry.create(queue_hook("qa", custom_data={"fields": ["email"], "pairs": {}}))
    one_intake(redis_client, keys, 10).publish(
        [dict(e, profile_id="abcdefgh12345678") for e in clicks(3)])
    sender = InProcessSender()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    worker.step(block_ms=5)  # its own pending entries first: none
    real = worker.side.profiles.get_many

    def lost(*args: Any, **kw: Any) -> Any:  # Redis goes away in the middle of the round
        monkeypatch.setattr(worker.side.profiles, "get_many", real)
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(worker.side.profiles, "get_many", lost)
    assert [type(e) for e in steps(worker, 1)] == [redis.ConnectionError]
    second = registry.create(queue_hook("qb"))
    assert steps(worker, 4) == []
    worker.drain(5)
    stats = Stats(redis_client, keys)
    for made in (first, second):
        got = stats.get(made.id or 0)
        assert (got["accepted"], got["delivered"]) == (3, 3), made.name
