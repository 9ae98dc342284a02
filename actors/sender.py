"""A Sender (see engine.dispatch) that hands deliveries to transport actors.

Bookkeeping around ``ray.wait`` only. Deliveries submitted in one round are
grouped per hook: one actor call carries all of a hook's batches of the round
(one hook = one destination, so a slow destination never holds back another's
outcomes), routed to a stable member of the transport kind's pool. A transport
actor that dies mid-call yields failed Outcomes, which the caller schedules for
retry.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayError

from engine.hooks import Hook
from engine.partitioning import pool_member
from engine.transports.base import Delivery, Outcome, pack_deliveries


def target_json(hook: Hook) -> str:
    """The hook's target settings, secrets included, for the transport actor only."""
    return hook.target.settings.model_dump_json(context={"reveal": True})


class RaySender:
    def __init__(self, pools: dict[str, list[Any]]) -> None:
        self.pools = pools
        self.refs: dict[Any, list[Delivery]] = {}
        self.queued: dict[int, tuple[Hook, list[Delivery]]] = {}  # hook id -> this round's
        self._targets: dict[int, tuple[Hook, str]] = {}

    def _target(self, hook: Hook) -> str:
        cached = self._targets.get(id(hook))
        if cached is None or cached[0] is not hook:
            cached = self._targets[id(hook)] = (hook, target_json(hook))
            if len(self._targets) > 10_000:
                self._targets.clear()
        return cached[1]

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        key = hook.id or 0
        queued = self.queued.get(key)
        if queued is None or queued[0] is not hook:
            if queued is not None:
                self._send(*queued)
            queued = self.queued[key] = (hook, [])
        queued[1].append(delivery)

    def _send(self, hook: Hook, deliveries: list[Delivery]) -> None:
        pool = self.pools.get(hook.target.kind)
        if not pool:
            error = Outcome(ok=False, error="TransportUnavailable",
                            detail=f"no transport pool for {hook.target.kind!r} in this engine")
            self.refs[ray.put([error] * len(deliveries))] = deliveries
            return
        actor = pool[pool_member(hook.id or 0, len(pool))]
        ref = actor.deliver_many.remote(hook.target.kind, self._target(hook),
                                        pack_deliveries(deliveries))
        self.refs[ref] = deliveries

    def inflight(self) -> int:
        return sum(map(len, self.refs.values())) + sum(len(q[1]) for q in self.queued.values())

    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]:
        for hook, deliveries in self.queued.values():
            self._send(hook, deliveries)
        self.queued.clear()
        if not self.refs:
            return []
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout,
                            fetch_local=True)
        out: list[tuple[Delivery, Outcome]] = []
        for ref in ready:
            deliveries = self.refs.pop(ref)
            try:
                outcomes = ray.get(ref)
            except RayError as exc:
                failed = Outcome(ok=False, error=type(exc).__name__,
                                 detail=f"transport actor failed: {str(exc)[:300]}")
                outcomes = [failed] * len(deliveries)
            out.extend(zip(deliveries, outcomes, strict=True))
        return out
