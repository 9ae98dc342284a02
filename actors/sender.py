"""A Sender (see engine.dispatch) that hands deliveries to transport actors.

Bookkeeping around ``ray.wait`` only: one actor call per delivery (a batch),
routed to a stable member of the transport kind's pool. A transport actor that
dies mid-call yields a failed Outcome, which the caller schedules for retry.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayError

from engine.hooks import Hook
from engine.partitioning import pool_member
from engine.transports.base import Delivery, Outcome


def target_json(hook: Hook) -> str:
    """The hook's target settings, secrets included, for the transport actor only."""
    return hook.target.settings.model_dump_json(context={"reveal": True})


class RaySender:
    def __init__(self, pools: dict[str, list[Any]]) -> None:
        self.pools = pools
        self.refs: dict[Any, Delivery] = {}
        self._targets: dict[int, tuple[Hook, str]] = {}

    def _target(self, hook: Hook) -> str:
        cached = self._targets.get(id(hook))
        if cached is None or cached[0] is not hook:
            cached = self._targets[id(hook)] = (hook, target_json(hook))
            if len(self._targets) > 10_000:
                self._targets.clear()
        return cached[1]

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        pool = self.pools.get(hook.target.kind)
        if not pool:
            error = Outcome(ok=False, error="TransportUnavailable",
                            detail=f"no transport pool for {hook.target.kind!r} in this engine")
            self.refs[ray.put(error)] = delivery
            return
        actor = pool[pool_member(hook.id or 0, len(pool))]
        ref = actor.deliver.remote(hook.target.kind, self._target(hook), delivery)
        self.refs[ref] = delivery

    def inflight(self) -> int:
        return len(self.refs)

    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]:
        if not self.refs:
            return []
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout,
                            fetch_local=True)
        out = []
        for ref in ready:
            delivery = self.refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except RayError as exc:
                outcome = Outcome(ok=False, error=type(exc).__name__,
                                  detail=f"transport actor failed: {str(exc)[:300]}")
            out.append((delivery, outcome))
        return out
