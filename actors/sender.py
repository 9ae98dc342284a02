"""A Sender (see engine.dispatch) that hands deliveries to transport actors.

Bookkeeping around ``ray.wait`` only. Deliveries are grouped per hook: one actor
call carries a hook's waiting batches (one hook = one destination, so a slow
destination never holds back another's outcomes), routed to a stable member of the
transport kind's pool.

Flow control: at most ``CALLS_PER_HOOK`` calls of one hook are in flight; the
hook's next batches wait here and leave together as soon as a call returns. A
transport actor with a deep queue of calls spends markedly more CPU per message
than one fed a call or two ahead (``Kafka``: 3.5 against 2.2 µs per message measured
here), and a deeper queue does not deliver any sooner. A call carries all the
hook's waiting batches up to ``CALL_MAX_BYTES`` of messages, so a hook whose
destination is down and whose batches fail fast (the transport's circuit breaker)
clears its backlog in a call or two, instead of holding the partition's reading.

A transport actor that dies mid-call yields failed Outcomes, which the caller
schedules for retry.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray
from ray.exceptions import RayError

from engine.hooks import Hook
from engine.partitioning import pool_member
from engine.transports.base import Delivery, Outcome, pack_deliveries

CALLS_PER_HOOK = 2  # actor calls of one hook in flight from one partition
CALL_MAX_BYTES = 4 * 1024 * 1024  # message bytes per actor call (at least one batch)


def target_json(hook: Hook) -> str:
    """The hook's target settings, secrets included, for the transport actor only."""
    return hook.target.settings.model_dump_json(context={"reveal": True})


def _fitting(deliveries: list[Delivery]) -> int:
    """How many of the first ``deliveries`` fit in one call (at least one)."""
    size = 0
    for n, delivery in enumerate(deliveries):
        size += sum(map(len, delivery.parts))
        if size > CALL_MAX_BYTES:
            return max(n, 1)
    return len(deliveries)


class RaySender:
    def __init__(self, pools: dict[str, list[Any]], calls_per_hook: int = CALLS_PER_HOOK
                 ) -> None:
        self.pools = pools
        self.calls_per_hook = calls_per_hook
        self.refs: dict[Any, tuple[int, list[Delivery]]] = {}  # ref -> hook key, batches
        # hook key -> the hook's waiting batches, per version of its settings, in order
        self.queued: dict[int, list[tuple[Hook, list[Delivery]]]] = {}
        self.busy: Counter[int] = Counter()  # hook key -> calls in flight
        self._waiting = 0  # batches in self.queued
        self._sent = 0  # batches in self.refs
        self._targets: dict[int, tuple[Hook, str]] = {}

    def _target(self, hook: Hook) -> str:
        cached = self._targets.get(id(hook))
        if cached is None or cached[0] is not hook:
            cached = self._targets[id(hook)] = (hook, target_json(hook))
            if len(self._targets) > 10_000:
                self._targets.clear()
        return cached[1]

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        groups = self.queued.setdefault(hook.id or 0, [])
        if not groups or groups[-1][0] is not hook:  # changed settings: a group of its own
            groups.append((hook, []))
        groups[-1][1].append(delivery)
        self._waiting += 1

    def _send_waiting(self) -> None:
        """Calls for the hooks with waiting batches and a free call slot."""
        for key in list(self.queued):
            groups = self.queued[key]
            while groups and self.busy[key] < self.calls_per_hook:
                hook, deliveries = groups[0]
                batch = deliveries[:_fitting(deliveries)]
                del deliveries[:len(batch)]
                if not deliveries:
                    groups.pop(0)
                self._waiting -= len(batch)
                self._call(key, hook, batch)
            if not groups:
                del self.queued[key]

    def _call(self, key: int, hook: Hook, deliveries: list[Delivery]) -> None:
        pool = self.pools.get(hook.target.kind)
        if not pool:
            error = Outcome(ok=False, error="TransportUnavailable",
                            detail=f"no transport pool for {hook.target.kind!r} in this engine")
            ref = ray.put([error] * len(deliveries))
        else:
            actor = pool[pool_member(hook.id or 0, len(pool))]
            ref = actor.deliver_many.remote(hook.target.kind, self._target(hook),
                                            pack_deliveries(deliveries))
        self.refs[ref] = (key, deliveries)
        self.busy[key] += 1
        self._sent += len(deliveries)

    def inflight(self) -> int:
        """Batches handed to ``submit`` and not yet answered by ``poll``."""
        return self._sent + self._waiting

    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]:
        self._send_waiting()
        if not self.refs:
            return []
        ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout,
                            fetch_local=True)
        out: list[tuple[Delivery, Outcome]] = []
        for ref in ready:
            key, deliveries = self.refs.pop(ref)
            self._sent -= len(deliveries)
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]
            try:
                outcomes = ray.get(ref)
            except RayError as exc:
                failed = Outcome(ok=False, error=type(exc).__name__,
                                 detail=f"transport actor failed: {str(exc)[:300]}")
                outcomes = [failed] * len(deliveries)
            out.extend(zip(deliveries, outcomes, strict=True))
        if ready:
            self._send_waiting()  # freed slots: the next calls leave now, not next round
        return out
