"""Partition and retry actors: a worker loop (engine.dispatch / engine.retrying) in a
thread, started in ``__init__`` so that a restarted actor resumes by itself. ``owner``:
the id of the engine's claim on its prefix (engine/lease.py), which the workers check."""

from __future__ import annotations

import threading
from typing import Any

import ray
import redis

from actors import logs
from actors.sender import RaySender
from engine.dispatch import PartitionWorker
from engine.retrying import RetryWorker
from engine.settings import Settings, engine_redis


def _redis(settings: Settings) -> redis.Redis:
    return engine_redis(settings.REDIS_URL, socket_timeout=30, health_check_interval=30)


def _handles(pools: dict[str, list[str]]) -> dict[str, list[Any]]:
    """Transport actors by name: constructor arguments stay small and inline, so a
    restarted actor never depends on objects in the object store."""
    return {kind: [ray.get_actor(name) for name in names] for kind, names in pools.items()}


class _Looping:
    def _start(self, target: Any, name: str) -> None:
        self._stop = threading.Event()
        self._errors = 0
        self._thread = threading.Thread(target=target, args=(self._stop, self._on_error),
                                        daemon=True, name=name)
        self._thread.start()

    def _on_error(self, exc: Exception) -> None:
        """Count the failed round (``ping``). Not logged here: the worker's loop logs
        each error, its traceback once and the same again once a minute
        (``engine.health.RoundFailures``); said here too, each would be said twice."""
        self._errors += 1

    def ping(self) -> dict[str, Any]:
        return {"alive": self._thread.is_alive(), "errors": self._errors}

    def stop(self) -> dict[str, Any]:
        """Stop the loop (it drains first); whether it stopped, and what its drain left,
        as it said it (for the driver to say: Ray may end before this actor's log
        reaches it)."""
        self._stop.set()
        self._thread.join(10)
        return {"stopped": not self._thread.is_alive(),
                "said": list(self.worker.stop_said)}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=4)
class PartitionActor(_Looping):
    def __init__(self, settings: dict[str, Any], partition: int,
                 pools: dict[str, list[str]], owner: str | None = None) -> None:
        logs.configure()
        cfg = Settings(**settings)
        self.worker = PartitionWorker(cfg, _redis(cfg), partition, RaySender(_handles(pools)),
                                      owner=owner)
        self._start(self.worker.run, f"partition-{partition}")

    def backlog(self) -> dict[str, int]:
        return {"unsettled_entries": len(self.worker.entry_left),
                "open_messages": self.worker.dispatcher.open_messages(),
                "inflight": self.worker.sender.inflight()}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=4)
class RetryActor(_Looping):
    def __init__(self, settings: dict[str, Any], pools: dict[str, list[str]],
                 owner: str | None = None) -> None:
        logs.configure()
        cfg = Settings(**settings)
        self.worker = RetryWorker(cfg, _redis(cfg), RaySender(_handles(pools)), owner=owner)
        self._start(self.worker.run, "retry")
