"""The retry schedule goes by Redis' clock: partitions and retry workers on machines
whose clocks differ (or step) write due times and leases one claim compares."""

from __future__ import annotations

from collections import Counter

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.keys import RETRY_LEASE_MS, Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore
from engine.transports.base import Delivery, Outcome
from tests.integration.test_workers import InProcessSender, hook

pytestmark = pytest.mark.integration

FIVE_MINUTES_MS = 300_000


def redis_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()  # type: ignore[misc]
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's wall clock five minutes behind (now_ms wherever it is read)."""
    import time

    import engine.dispatch
    import engine.retrying
    import engine.transports.base

    behind = time.time

    def late_ms() -> int:
        return int(behind() * 1000) - FIVE_MINUTES_MS

    for module in (engine.dispatch, engine.retrying, engine.transports.base):
        monkeypatch.setattr(module, "now_ms", late_ms)
    import engine.stores
    monkeypatch.setattr(engine.stores, "now_ms", late_ms, raising=False)


def test_a_re_send_is_due_a_retry_period_after_its_failure_by_redis_clock(
        redis_client: redis.Redis, settings: Settings, keys: Keys, skewed: None) -> None:
    """A partition five minutes behind wrote its re-sends due five minutes early (sent
    at once by a retry worker elsewhere); one ahead, minutes late."""
    settings = settings.model_copy(update={"PARTITIONS": 1, "HOOK_RETRY_PERIOD_SEC": 15})
    created = HookRegistry(redis_client, keys).create(hook())
    worker = PartitionWorker(settings, redis_client, 0, InProcessSender())
    delivery = Delivery(id="d1", hook_id=created.id or 0, account_id=1, kind="http_batch",
                        parts=[b"{}"], message_ids=["m1"])
    worker.dispatcher.pending_hooks["d1"] = (created, Counter())
    before = redis_ms(redis_client)
    worker._settle([(delivery, Outcome(ok=False, error="Rejected", detail="HTTP 500"))])
    due = redis_client.zscore(keys.retry, "d1")
    assert due is not None and before + 15_000 <= due <= redis_ms(redis_client) + 15_000
    retry = RetryStore(redis_client, keys)
    assert retry.claim_due() == []  # not due yet, by anyone's reckoning
    # the retry worker's own failure too
    (claimed,) = retry.claim_due(now=int(due))
    retry_worker = RetryWorker(settings, redis_client, InProcessSender())
    retry_worker._refresh()
    before = redis_ms(redis_client)
    retry_worker.settle(claimed, Outcome(ok=False, error="Rejected", detail="HTTP 500"))
    due = redis_client.zscore(keys.retry, "d1")
    assert due is not None and before + 15_000 <= due <= redis_ms(redis_client) + 15_000


def test_a_claim_leases_by_redis_clock(redis_client: redis.Redis, keys: Keys,
                                       skewed: None) -> None:
    """Due at once, claimed by a worker five minutes behind: claimed (not five minutes
    later), and leased RETRY_LEASE_MS by Redis' clock (not already over for a worker
    whose clock is right)."""
    retry = RetryStore(redis_client, keys)
    retry.schedule(Delivery(id="d2", hook_id=1, account_id=1, kind="http_batch",
                            parts=[b"{}"]), redis_ms(redis_client), "HTTP 500")
    before = redis_ms(redis_client)
    assert [d.id for d in retry.claim_due()] == ["d2"]
    lease = redis_client.zscore(keys.retry, "d2")
    assert lease is not None and lease >= before + RETRY_LEASE_MS
