"""Transport pool member: an async actor owning one transport's connections.

Partitions talk to it with ``exchange`` calls (see ``actors.sender``): each call
hands over new batches of any number of hooks and collects the outcomes of batches
handed over before. Batches run concurrently, each on its own; a call returns once
every batch it asked about is done, or after ``wait_sec`` with those done by then,
so one slow destination delays nobody's outcomes by more than ``wait_sec``.

Ray runs an async actor's calls on one event loop of its own, which keeps running
between calls: the tasks the transport starts there (its sends, and the timer that
closes its idle connections, producers and channels, ``engine.transports.base.IdleSweep``)
go on while no call comes, until ``close``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import ray
from pydantic import BaseModel, ValidationError

from actors import logs
from actors.gc_policy import relax_gc
from engine.hooks import HttpBatch, Kafka, RabbitExchange, RabbitQueue, validation_problems
from engine.settings import Settings
from engine.transports.base import Delivery, Outcome, load_transport, unpack_deliveries

log = logging.getLogger("hookray")

TARGET_MODELS: dict[str, type[BaseModel]] = {
    "http_batch": HttpBatch, "rabbitmq_queue": RabbitQueue,
    "rabbitmq_exchange": RabbitExchange, "kafka": Kafka,
}
TARGET_CACHE_MAX = 10_000
UNCLAIMED_SEC = 600.0  # outcomes nobody collected (their partition restarted) are dropped


class _ConnectErrors(logging.Filter):
    """aiormq logs each connection it cannot open ("error when creating transport:
    ...") at ERROR, naming neither hook nor account: against a broker that is down,
    one line per delivery tried (broker batches go every round, and every re-send
    tries again). The delivery's outcome holds the same reason, with the broker and
    vhost, and is retried or dead-lettered with it: the line is dropped. aiormq's
    other lines (a broker closing a connection, blocking it for a resource alarm)
    are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith("error when creating transport"))


_connect_errors = _ConnectErrors()


def quiet_client_logs() -> None:
    """In a transport actor's process: the client libraries' lines that repeat what
    an outcome says are dropped (once: a filter added again is not added twice)."""
    logging.getLogger("aiormq.connection").addFilter(_connect_errors)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=10_000)
class TransportActor:
    def __init__(self, kind: str, settings: dict[str, Any]) -> None:
        logs.configure()
        quiet_client_logs()
        cfg = Settings(**settings)
        self.kind = kind
        # HTTP: no request carries more than MAX_HTTP_BATCH messages or MAX_BATCH_BYTES
        # bytes of messages (but one larger message), a re-sent batch or replayed dead
        # letter made under other limits included (it is posted in pieces)
        extra = {"max_batch": cfg.MAX_HTTP_BATCH, "max_batch_bytes": cfg.MAX_BATCH_BYTES} \
            if kind == "http_batch" else {}
        self.transport = load_transport(kind, concurrency=cfg.DESTINATION_CONCURRENCY,
                                        **cfg.transport_options(kind), **extra)
        self.targets: dict[str, BaseModel] = {}
        # batch ids handed over and not reported yet; a restarted actor knows none of them
        self.running: dict[str, asyncio.Task[None]] = {}  # batch id -> its send
        self.done: dict[str, tuple[Outcome, float]] = {}  # batch id -> outcome, finished at
        self._swept = time.monotonic()
        relax_gc()

    def _target(self, kind: str, target: str) -> BaseModel:
        model = self.targets.get(target)
        if model is None:
            if len(self.targets) > TARGET_CACHE_MAX:
                self.targets.clear()
            # settings of a stored hook, validated as such: a rule added after the hook
            # was saved must not fail its every batch here (engine.hooks._stored)
            try:
                model = TARGET_MODELS[kind].model_validate_json(target,
                                                                context={"stored": True})
            except ValidationError as exc:
                # named by field and reason only: a ValidationError quotes the input,
                # cut short, which may leave part of a secret no scrub recognises
                problems = "; ".join(f"{f}: {r}" for f, r in validation_problems(exc))
                raise ValueError(problems) from None
            self.targets[target] = model
        return model

    async def _run(self, model: BaseModel, delivery: Delivery) -> None:
        try:
            outcome = await self.transport.send(model, delivery)
        except Exception as exc:  # send never raises for a delivery failure; in case
            outcome = Outcome(ok=False, error=type(exc).__name__, detail=str(exc)[:1000])
        finally:  # cancelled: neither running nor done, so reported as unknown (retried)
            self.running.pop(delivery.id, None)
        self.done[delivery.id] = (outcome, time.monotonic())

    async def exchange(self, groups: list[tuple[str, str, np.ndarray]], collect: list[str],
                       wait_sec: float) -> tuple[dict[str, Outcome], list[str]]:
        """Start the batches of ``groups`` (per hook: kind, target settings JSON,
        ``pack_deliveries`` of its batches), then wait up to ``wait_sec`` for them and
        the batches ``collect`` to finish. Returns the outcomes of those finished (each
        reported once), and the ids of ``collect`` this actor does not know (it
        restarted since they were handed over)."""
        ids = list(collect)
        for kind, target, packed in groups:
            try:
                deliveries = unpack_deliveries(packed)
            except Exception:  # their ids unknown here: reported unknown later, retried
                log.exception("transport %s: a group of batches cannot be read", self.kind)
                continue
            try:
                model: BaseModel | None = self._target(kind, target)
            except Exception as exc:  # this group's batches fail; the others go on
                model, bad = None, Outcome(ok=False, error="BadTarget",
                                           detail=f"{kind} target settings: {exc}"[:1000])
            for delivery in deliveries:
                ids.append(delivery.id)
                if delivery.id in self.running or delivery.id in self.done:
                    continue
                if model is None:
                    self.done[delivery.id] = (bad, time.monotonic())
                else:
                    self.running[delivery.id] = asyncio.ensure_future(
                        self._run(model, delivery))
        pending = [task for i in ids if (task := self.running.get(i)) is not None]
        if pending:
            await asyncio.wait(pending, timeout=wait_sec)
        outcomes: dict[str, Outcome] = {}
        unknown: list[str] = []
        for i in ids:
            finished = self.done.pop(i, None)
            if finished is not None:
                outcomes[i] = finished[0]
            elif i not in self.running:
                unknown.append(i)
        self._sweep()
        return outcomes, unknown

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < UNCLAIMED_SEC / 10:
            return
        self._swept = now
        for i, (_, at) in list(self.done.items()):
            if now - at > UNCLAIMED_SEC:
                del self.done[i]

    async def ping(self) -> str:
        return self.kind

    async def close(self) -> None:
        await self.transport.close()
