"""A Sender (see engine.dispatch) that hands deliveries to transport actors.

Bookkeeping around ``ray.wait`` only. A partition talks to each transport actor
with ``exchange`` calls (``actors.transport``): one call carries the new batches of
every hook routed to that actor (a hook always goes to the same pool member) and
collects the outcomes of batches handed over before. So a round costs one actor
call per transport actor, not one per hook: with 100 hooks, most of a round's
batches are one per hook, and a Ray call costs about 0.5 ms of CPU on each side.

* At most ``CALLS_PER_ACTOR`` calls are in flight per actor. The next batches wait
  here and leave together as soon as a call returns, up to ``CALL_MAX_BYTES`` of
  messages per call. A transport actor with a deep queue of calls spends markedly
  more CPU per message than one fed a call or two ahead (Kafka: 3.5 against
  2.2 µs per message measured here), and a deeper queue delivers no sooner.
* A call returns when every batch it carries or asks about is done, or after
  ``WAIT_SEC`` with those done by then: a slow destination delays other hooks'
  outcomes by at most that; its own batches are asked about again by the next call
  (one call per actor at a time asks about earlier batches).
* A call that fails (the actor died) fails all the batches it covered; batches an
  actor does not know (it restarted) fail too. Failed outcomes go to the retry
  schedule, as any delivery failure (``TransportRestarted``: using up no re-send).
* A call not answered within ``CALL_DEADLINE_SEC`` (it returns within ``WAIT_SEC``
  while the actor's event loop runs) means an actor alive but hung (a frozen
  process, a node cut off from this one but not from Ray): its batches fail as
  above, and the actor is killed for Ray to restart, or every partition would
  stop reading once its in-flight limit fills behind it, without an error.
"""

from __future__ import annotations

import logging
import time
import weakref
from contextlib import suppress
from typing import Any

import ray

from engine.hooks import Hook
from engine.partitioning import pool_member
from engine.transports.base import Delivery, Outcome, pack_deliveries

CALLS_PER_ACTOR = 2  # exchange calls in flight to one transport actor from one partition
CALL_MAX_BYTES = 4 * 1024 * 1024  # new message bytes per call (at least one batch)
WAIT_SEC = 0.2  # longest a call waits for batches that are not done
CALL_DEADLINE_SEC = 120.0  # a call unanswered this long: the actor hangs (see above)

log = logging.getLogger("hookray")

ActorKey = tuple[str, int]  # (target kind, pool member)


def target_json(hook: Hook) -> str:
    """The hook's target settings, secrets included, for the transport actor only."""
    return hook.target.settings.model_dump_json(context={"reveal": True})


class RaySender:
    def __init__(self, pools: dict[str, list[Any]], calls_per_actor: int = CALLS_PER_ACTOR,
                 wait_sec: float = WAIT_SEC) -> None:
        self.pools = pools
        self.calls_per_actor = calls_per_actor
        self.wait_sec = wait_sec
        self.queued: dict[ActorKey, list[tuple[Hook, Delivery]]] = {}  # not handed over
        self.outstanding: dict[str, Delivery] = {}  # handed over, no outcome yet
        self.uncovered: dict[ActorKey, list[str]] = {}  # outstanding, no call asks about them
        # ref -> actor, ids the call covers, ids among them it asks about (handed over before)
        self.calls: dict[Any, tuple[ActorKey, list[str], list[str]]] = {}
        self.made: dict[Any, float] = {}  # ref -> when the call was made (monotonic)
        self.killed: dict[ActorKey, float] = {}  # actor -> when _hung last killed it
        self.failed: list[tuple[Delivery, Outcome]] = []  # failed here, returned by poll
        # id(hook) -> its target JSON, for as long as that Hook object lives: a reload
        # of the hooks (any change of any hook) makes new ones, and the old ones' entries,
        # secrets included, go with them (kept, they had grown by every hook at each
        # change until a cap of 10,000, about 50 MiB in each worker)
        self._targets: dict[int, tuple[weakref.ref[Hook], str]] = {}

    def _target(self, hook: Hook) -> str:
        key = id(hook)
        cached = self._targets.get(key)
        if cached is None or cached[0]() is not hook:
            def gone(_ref: weakref.ref[Hook], targets: dict[int, Any] = self._targets,
                     key: int = key) -> None:
                entry = targets.get(key)
                if entry is not None and entry[0] is _ref:
                    del targets[key]
            cached = self._targets[key] = (weakref.ref(hook, gone), target_json(hook))
        return cached[1]

    def submit(self, hook: Hook, delivery: Delivery) -> None:
        """Queue ``delivery`` for the hook's transport actor. A delivery whose id is
        already here without an outcome (the retry worker claims one again when its
        lease ran out during a long send) is not queued twice: the outcome of the
        one here settles it."""
        if self.holds(delivery.id):
            return
        kind = hook.target.kind
        pool = self.pools.get(kind)
        if not pool:
            self.failed.append((delivery, Outcome(
                ok=False, error="TransportUnavailable",
                detail=f"no transport pool for {kind!r} in this engine")))
            return
        key = (kind, pool_member(hook.id or 0, len(pool)))
        self.queued.setdefault(key, []).append((hook, delivery))
        self.outstanding[delivery.id] = delivery

    def inflight(self) -> int:
        """Batches handed to ``submit`` and not yet answered by ``poll``."""
        return len(self.outstanding) + len(self.failed)

    def holds(self, delivery_id: str) -> bool:
        """Whether the delivery is handed over, or its outcome collected and not yet
        returned (a poll whose first call raised keeps it in ``failed``)."""
        return delivery_id in self.outstanding or (bool(self.failed) and any(
            delivery.id == delivery_id for delivery, _ in self.failed))

    def _send(self) -> None:
        """Calls for the actors with something to hand over or ask about, while they
        have a free slot."""
        for key in set(self.queued) | set(self.uncovered):
            while self._in_flight(key) < self.calls_per_actor and self._call(key):
                pass

    def _in_flight(self, key: ActorKey) -> int:
        return sum(1 for k, _, _ in self.calls.values() if k == key)

    def _call(self, key: ActorKey) -> bool:
        """One call to the actor ``key``; False when there was nothing to send. The
        bookkeeping changes only once the call is made: if making it raises, every
        batch stays where it was, for the next try."""
        waiting = self.queued.get(key, [])
        taken = _fitting(waiting)
        # batches not done at the last answer: asked about by one call at a time
        asking = any(k == key and collect for k, _, collect in self.calls.values())
        collect = [] if asking else list(self.uncovered.get(key, []))
        per_hook: dict[int, tuple[Hook, list[Delivery]]] = {}  # per settings version
        for hook, delivery in waiting[:taken]:
            per_hook.setdefault(id(hook), (hook, []))[1].append(delivery)
        if not per_hook and not collect:
            return False
        groups = [(hook.target.kind, self._target(hook), pack_deliveries(batch))
                  for hook, batch in per_hook.values()]
        actor = self.pools[key[0]][key[1]]
        ref = actor.exchange.remote(groups, collect, self.wait_sec)
        if taken < len(waiting):
            self.queued[key] = waiting[taken:]
        else:
            self.queued.pop(key, None)
        if collect:
            del self.uncovered[key]
        covered = collect + [delivery.id for _, delivery in waiting[:taken]]
        self.calls[ref] = (key, covered, collect)
        self.made[ref] = time.monotonic()
        return True

    def poll(self, timeout: float) -> list[tuple[Delivery, Outcome]]:
        """Outcomes come back once: collected ones wait in ``failed`` until returned, so
        an error here (a call that cannot be made, ``ray.wait`` failing) loses none;
        it is raised again by the next poll's first call, which returns them then."""
        self._send()
        if self.calls:
            self._collect(timeout)
        out, self.failed = self.failed, []
        return out

    def _collect(self, timeout: float) -> None:
        out = self.failed
        ready, _ = ray.wait(list(self.calls), num_returns=len(self.calls), timeout=timeout,
                            fetch_local=True)
        for ref in ready:
            key, covered, _ = self.calls.pop(ref)
            self.made.pop(ref, None)
            try:
                outcomes, unknown = ray.get(ref)
            except Exception as exc:
                # the actor died or restarts: no fault of the destination (a few in a
                # row use up no re-send: base.uncharged); a call that raised (a bug)
                # fails as itself, charged
                failed = Outcome(
                    ok=False, error="TransportRestarted" if isinstance(
                        exc, ray.exceptions.RayActorError) else type(exc).__name__,
                    detail=f"transport actor failed: {type(exc).__name__}: "
                           f"{str(exc)[:300]}")
                outcomes, unknown = {i: failed for i in covered}, []
            lost = Outcome(ok=False, error="TransportRestarted",
                           detail="the transport actor restarted; the outcome is unknown")
            outcomes.update((i, lost) for i in unknown)
            still: list[str] = []
            for i in covered:
                outcome = outcomes.get(i)
                if outcome is None:
                    still.append(i)  # not done yet: the next call asks again
                elif (delivery := self.outstanding.pop(i, None)) is not None:
                    out.append((delivery, outcome))
            if still:
                self.uncovered.setdefault(key, []).extend(still)
        self._hung(out)
        if ready:
            # freed slots: the next calls leave now, not next round; one that cannot be
            # made now is tried (and its error raised) by the next poll
            with suppress(Exception):
                self._send()


    def _hung(self, out: list[tuple[Delivery, Outcome]]) -> None:
        """Calls unanswered for CALL_DEADLINE_SEC: their batches fail (to be sent again:
        perhaps twice, should the actor come back and send them), and their actor is
        killed for Ray to restart, once per call."""
        now = time.monotonic()
        for ref in [r for r, made in self.made.items() if now - made >= CALL_DEADLINE_SEC]:
            key, covered, _ = self.calls.pop(ref)
            del self.made[ref]
            with suppress(Exception):
                ray.cancel(ref, force=False)
            log.warning("transport actor %s #%d answered no call within %.0f s: restarted, "
                        "its %d batch(es) of that call sent again later", key[0], key[1],
                        CALL_DEADLINE_SEC, len(covered))
            # once for all of its calls that hung (a second kill could hit the process
            # Ray is starting in its place)
            if now - self.killed.get(key, -CALL_DEADLINE_SEC) >= CALL_DEADLINE_SEC:
                self.killed[key] = now
                with suppress(Exception):
                    ray.kill(self.pools[key[0]][key[1]], no_restart=False)
            hung = Outcome(ok=False, error="TransportRestarted",
                           detail=f"the transport actor answered no call within "
                                  f"{CALL_DEADLINE_SEC:.0f} s; restarted")
            for i in covered:
                if (delivery := self.outstanding.pop(i, None)) is not None:
                    out.append((delivery, hung))


def _fitting(waiting: list[tuple[Hook, Delivery]]) -> int:
    """How many of the first ``waiting`` batches fit in one call (at least one)."""
    size = 0
    for n, (_, delivery) in enumerate(waiting):
        size += sum(map(len, delivery.parts))
        if size > CALL_MAX_BYTES:
            return max(n, 1)
    return len(waiting)
