"""Transport pool member: an async actor owning one transport's connections."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from pydantic import BaseModel

from engine.hooks import HttpBatch, Kafka, RabbitExchange, RabbitQueue
from engine.settings import Settings
from engine.transports.base import Outcome, load_transport, unpack_deliveries

TARGET_MODELS: dict[str, type[BaseModel]] = {
    "http_batch": HttpBatch, "rabbitmq_queue": RabbitQueue,
    "rabbitmq_exchange": RabbitExchange, "kafka": Kafka,
}
TARGET_CACHE_MAX = 10_000


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=10_000)
class TransportActor:
    def __init__(self, kind: str, settings: dict[str, Any]) -> None:
        cfg = Settings(**settings)
        self.kind = kind
        self.transport = load_transport(kind, concurrency=cfg.DESTINATION_CONCURRENCY,
                                        timeout_sec=cfg.HTTP_REQUEST_TIMEOUT_SEC)
        self.targets: dict[str, BaseModel] = {}

    def _target(self, kind: str, target: str) -> BaseModel:
        model = self.targets.get(target)
        if model is None:
            if len(self.targets) > TARGET_CACHE_MAX:
                self.targets.clear()
            model = self.targets[target] = TARGET_MODELS[kind].model_validate_json(target)
        return model

    async def deliver_many(self, kind: str, target: str, packed: bytes) -> list[Outcome]:
        """One hook's batches of a round (``pack_deliveries``), sent concurrently;
        outcomes in order."""
        model = self._target(kind, target)
        deliveries = unpack_deliveries(packed)
        return list(await asyncio.gather(*(self.transport.send(model, d) for d in deliveries)))

    async def ping(self) -> str:
        return self.kind

    async def close(self) -> None:
        await self.transport.close()
