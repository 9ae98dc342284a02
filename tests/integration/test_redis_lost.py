"""Redis losing the engine's data while it runs (a restart without persistence, a
flush, keys evicted): said as the loss it is, and no worker keeps hooks from before."""

from __future__ import annotations

import logging

import pytest
import redis

from engine.dispatch import PartitionWorker
from engine.keys import Keys
from engine.retrying import RetryWorker
from engine.settings import Settings
from engine.stores import HookRegistry
from tests.integration.test_workers import InProcessSender, clicks, hook, one_intake
from tests.services import drop_prefix

pytestmark = pytest.mark.integration


def http_hook(url: str) -> dict[str, object]:
    return hook(target={"http_batch": {"url": url, "max_batch_size": 10,
                                       "flush_timeout_sec": 0.05}})


def test_hooks_made_again_after_redis_lost_its_data_are_loaded_though_versions_repeat(
        redis_client: redis.Redis, settings: Settings, keys: Keys, prefix: str) -> None:
    """The versions start from 0 again: hooks made again as many times before a
    worker's next look gave the same version number, and the workers kept the hooks
    from before for good (new events sent to the old URLs, a new hook sent nothing).
    The data's epoch, written again with the engine's records, tells them apart."""
    settings = settings.model_copy(update={"PARTITIONS": 1})
    HookRegistry(redis_client, keys).create(http_hook("http://127.0.0.1:9/old"))
    intake = one_intake(redis_client, keys, 10)
    intake.keep_records()
    sender = InProcessSender()
    worker = PartitionWorker(settings, redis_client, 0, sender)
    retry_worker = RetryWorker(settings, redis_client, InProcessSender())
    worker.step(block_ms=5)
    retry_worker._refresh()
    drop_prefix(redis_client, prefix)  # Redis back empty
    made = HookRegistry(redis_client, keys).create(http_hook("http://127.0.0.1:9/new"))
    assert made.id == 1 and HookRegistry(redis_client, keys).version() == 1  # as before
    intake.ensure_groups()
    intake.keep_records()  # the driver's claim renewer, after Redis came back
    intake.publish(clicks(3))
    for _ in range(5):
        worker.step(block_ms=5)
    worker.drain(5)
    assert {str(h.target.http_batch.url) for h in sender.hooks  # type: ignore[union-attr]
            } == {"http://127.0.0.1:9/new"}
    assert sum(d.count for d in sender.transport.sent) == 3
    retry_worker._refresh()
    assert str(retry_worker.hooks[1].target.http_batch.url  # type: ignore[union-attr]
               ) == "http://127.0.0.1:9/new"


def test_redis_losing_the_engines_data_while_it_runs_is_said_as_the_loss_it_is(
        redis_client: redis.Redis, keys: Keys, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    intake = one_intake(redis_client, keys, 10)
    with caplog.at_level(logging.ERROR, logger="hookray"):
        intake.keep_records()  # the start
        intake.keep_records()  # a renewal: nothing lost
        assert not caplog.records
        drop_prefix(redis_client, prefix)
        intake.keep_records()
        intake.keep_records()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(
        f"Redis lost the engine's data under REDIS_PREFIX {prefix!r} while it ran")
    assert "accepted events not yet delivered" in said[0]
    assert redis_client.exists(keys.epoch) and redis_client.hexists(keys.config, "partitions")
