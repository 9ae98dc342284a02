"""The retry worker: re-sends due deliveries, dead-letters exhausted ones.

A failed delivery is sent again every ``HOOK_RETRY_PERIOD_SEC``, at most
``HOOK_RETRY_TIMES`` times; after the last failed re-send it becomes a dead letter
holding its last error. A claimed delivery stays in the schedule under a lease
(``engine.keys.RETRY_LEASE_MS``), so a worker that dies mid-send loses nothing.
A delivery handed over ``MAX_UNANSWERED`` times without any outcome (the worker
died during each send: a delivery that makes it crash, say) becomes a dead letter
instead of being claimed for ever; a worker that is stopped takes its unanswered
hand-overs back, so stops and redeployments never count.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import suppress

import msgspec
import redis

from engine import dispatch
from engine.catalogue import EventCatalogue, load_catalogue
from engine.dispatch import MAX_INFLIGHT, Sender, Side, drain_at_stop
from engine.failurelog import FailureLog
from engine.health import EvictionWatch, Heartbeat, RoundFailures
from engine.hooks import Hook, hook_secrets, scrub
from engine.lease import Holding
from engine.messages import for_target
from engine.partitioning import exhausted, retry_due_ms
from engine.settings import Settings
from engine.stores import CLAIM_BYTES, DataLost, Once, other_account
from engine.transports.base import (
    Delivery,
    Outcome,
    now_ms,
    restarts_after,
    uncharged,
    undelivered,
)

log = logging.getLogger("hookray")

CLAIM_LIMIT = 200
# a deleted hook's counters stay this long after its deletion, or the last delivery
# of it killed since, and as long as it has dead letters: outcomes of its last sends
# (a request timeout of 10 min at most, a minute's wait for a slot) count there
STATS_GONE_SEC = 15 * 60.0
EXPIRE_EVERY_SEC = 60.0  # how often dead letters past DEAD_LETTER_RETENTION_HOURS go
# the longest one step spends on them: a backlog of a million goes over many steps,
# re-sends going on between them
EXPIRE_BUDGET_SEC = 0.25
MAX_UNANSWERED = 3  # re-sends handed over without an outcome before a dead letter
# payloads of the re-sends handed over and waiting for an outcome, at most (a claim
# goes beyond it by one re-send larger than what is left, as claim_due does)
INFLIGHT_BYTES = 64 * 1024 * 1024


class RetryWorker:
    def __init__(self, settings: Settings, r: redis.Redis, sender: Sender,
                 catalogue: EventCatalogue | None = None, owner: str | None = None) -> None:
        """``owner``: as for PartitionWorker (waits while another engine holds the
        prefix)."""
        self.settings = settings
        self.r = r
        self.sender = sender
        if catalogue is None:
            catalogue = load_catalogue(settings.EVENT_TYPES_FILE)
        self.side = Side(r, settings, catalogue)
        self.holding = Holding(r, self.side.keys, owner) if owner else None
        self.hooks: dict[int, Hook] = {}
        self.hooks_version = -1
        self.epoch: bytes | None = None  # of the data the version is of (Keys.epoch)
        # handed to the sender, no outcome yet: delivery id -> bytes of its payloads
        self.handed: dict[str, int] = {}
        self.sent_with: dict[str, Hook] = {}  # delivery id -> the hook it was sent for
        self.settling: deque[tuple[Delivery, Outcome]] = deque()  # outcomes to book
        self.booking: str | None = None  # the token of settling[0], kept until booked
        self.failure_log = FailureLog("retry worker")
        self.stop_said: list[str] = []  # what the last stop left, as it said it
        self.booked = self.side.keys.booked("retry")
        self.expired_at = -float("inf")  # when dead letters were last expired
        self.gone_at = -float("inf")  # when deleted hooks' counters were last looked at
        self.expired_unsaid, self.expired_said = 0, -float("inf")  # logged every 10 s
        self.evictions = EvictionWatch(r)  # one worker of the engine says them

    def _refresh(self) -> None:
        version, epoch = self.side.registry.version_and_epoch()
        if self.epoch is not None and epoch != self.epoch:
            self._data_lost()
        if version != self.hooks_version or epoch != self.epoch:
            # (another epoch: Redis lost the data, and the versions start again from 0)
            self.hooks_version, hooks = self.side.registry.load()
            self.hooks = {h.id: h for h in hooks if h.id is not None}
            self.epoch = epoch

    def _data_lost(self) -> None:
        """Redis lost the engine's data (another epoch, found by a refresh or a booking
        refused): the re-sends handed over were of it, and of hooks whose ids new hooks
        may take; their outcomes are not booked (nor their hand-overs taken back: their
        counts went with the data)."""
        dropped = set(self.handed) | {d.id for d, _ in self.settling}  # (some in both)
        if dropped:
            log.warning("retry worker: Redis lost the engine's data; the outcomes of %d "
                        "re-send(s) handed over before are dropped with it", len(dropped))
        self.handed.clear()
        self.sent_with.clear()
        self.settling.clear()
        self.booking = None

    def step(self) -> int:
        """Claim and send what is due, settle what came back. Returns deliveries sent.
        PrefixTaken, touching nothing, while another engine holds the prefix."""
        if self.holding is not None:
            self.holding.check(lambda: self.sender.poll(0.0), self.settling.extend,
                               self._drop_work)
        try:
            due = self._hand_over()
        except DataLost:
            # a kill judged by hooks of the data Redis lost since: the re-sends claimed
            # are claimed again once their leases run out, judged by the hooks then
            self._data_lost()
            due = 0
        except Exception:
            # outcomes are still collected (booked by a later step) while Redis is
            # down: left uncollected through a long outage, a transport actor would
            # drop them and their deliveries would be sent again
            with suppress(Exception):
                self.settling.extend(self.sender.poll(0.0))
            raise
        self.settling.extend(self.sender.poll(0.0 if due else 0.05))
        self._book()
        self._expire()
        self._forget_gone_stats()
        self.evictions.check()
        self.failure_log.say()
        return due

    def _book(self) -> None:
        """Book the outcomes in ``settling``: one leaves it only once booked, so a Redis
        error half-way keeps the rest for the next step. A booking refused as of data
        Redis lost since (DataLost: a stop's drain books without a refresh before)
        drops them all with it."""
        while self.settling:
            if self.settling[0][0].id not in self.handed:
                # a send from before another engine took the claim (_drop_work)
                self.settling.popleft()
                continue
            # a booking sent again after its reply was lost counts once
            self.booking = self.booking or uuid.uuid4().hex
            try:
                self.settle(*self.settling[0], once=(self.booked, self.booking))
            except DataLost:
                self._data_lost()
                return
            self.settling.popleft()
            self.booking = None

    def drain(self, seconds: float | None = None) -> int:
        """Stopping: nothing more is claimed; the outcomes of the re-sends handed over
        are booked as they come, for ``seconds`` at most, so that one delivered is not
        sent again. Returns how many are left without an outcome (``run`` hands them
        back: their leases run out and they are sent again)."""
        deadline = time.monotonic() + (dispatch.DRAIN_SEC if seconds is None else seconds)
        while self.handed or self.settling:
            if self.holding is not None:  # PrefixTaken: nothing of it is this engine's
                self.holding.check(lambda: self.sender.poll(0.0), self.settling.extend,
                                   self._drop_work)
            left = deadline - time.monotonic()
            self.settling.extend(self.sender.poll(min(max(left, 0.0), 0.05)))
            self._book()
            if left <= 0 or not self.sender.inflight():
                break
        self.failure_log.say()
        return len(self.handed)

    def _stopping(self) -> None:
        """Drain (``drain``), saying what is left."""
        said = drain_at_stop(self.drain, "retry worker", "re-sends", "re-send(s)",
                             "they are sent again once their leases run out")
        self.stop_said = [said] if said else []

    def _kill(self, delivery: Delivery, error: str, hook_gone: bool = False) -> None:
        """Make a claimed re-send a dead letter without sending it."""
        self.side.retry.kill(delivery, error, hook_gone=hook_gone, epoch=self.epoch)
        self.failure_log.failed(delivery.hook_id, delivery.account_id, delivery.kind,
                                delivery.count, error, dead=True)

    def _drop_work(self) -> None:
        """Another engine took the claim: the re-sends handed over and their outcomes
        are its now (their leases run out, and it claims them), and an outcome booked
        later, when the claim is this engine's again, would undo what it booked
        meanwhile (send a delivered batch again, or make it a dead letter). Their
        hand-overs are taken back, as at a stop; outcomes still to come are dropped."""
        if self.handed or self.settling:
            log.warning("retry worker: another engine took this engine's REDIS_PREFIX "
                        "claim; %d re-send(s) handed over and %d outcome(s) not booked are "
                        "left to it (sent again once their leases run out)",
                        len(self.handed), len(self.settling))
        self._hand_back(sorted(self.handed), "another engine took the claim")
        self.handed.clear()
        self.sent_with.clear()
        self.settling.clear()
        self.booking = None

    def _hand_back(self, delivery_ids: list[str], why: str) -> None:
        """Take back the hand-over counts of re-sends not answered because ``why`` (no
        crash: they use up nothing); a failure is logged: each count stays, and three
        make the re-send a dead letter saying the worker stopped during each send."""
        if not delivery_ids:
            return
        try:
            self.side.retry.handed_back(delivery_ids)
        except Exception as exc:
            log.warning("retry worker: %d re-send(s) not answered (%s) could not be taken "
                        "back as handed over (%s: %s); each counts as a send the worker "
                        "stopped during (3 such make it a dead letter)", len(delivery_ids),
                        why, type(exc).__name__, exc)

    def _forget_gone_stats(self) -> None:
        """Every EXPIRE_EVERY_SEC: the counters of hooks deleted STATS_GONE_SEC and a
        re-send's wait (HOOK_RETRY_PERIOD_SEC) ago or more, their last re-send killed
        since, that have no dead letter left go (a failure is logged, tried again)."""
        if time.monotonic() - self.gone_at < EXPIRE_EVERY_SEC:
            return
        self.gone_at = time.monotonic()
        try:
            self.side.retry.forget_gone_stats(
                round((STATS_GONE_SEC + self.settings.HOOK_RETRY_PERIOD_SEC) * 1000))
        except Exception as exc:
            log.warning("forgetting deleted hooks' counters failed (%s: %s); tried again "
                        "in %g s", type(exc).__name__, exc, EXPIRE_EVERY_SEC)

    def _expire(self) -> None:
        """Every EXPIRE_EVERY_SEC, with DEAD_LETTER_RETENTION_HOURS set: discard the
        dead letters older than that, for EXPIRE_BUDGET_SEC a step at most (the next
        step goes on where one stopped). A failure is logged, and tried again at the
        next interval: re-sends are not held up by it."""
        hours = self.settings.DEAD_LETTER_RETENTION_HOURS
        if not hours or time.monotonic() - self.expired_at < EXPIRE_EVERY_SEC:
            return
        finished = True
        try:
            gone, finished = self.side.retry.expire(round(hours * 3_600_000),
                                                    EXPIRE_BUDGET_SEC)
        except Exception as exc:  # Redis down, or a damaged record: not this step's fault
            log.warning("discarding dead letters past DEAD_LETTER_RETENTION_HOURS failed "
                        "(%s: %s); tried again in %g s", type(exc).__name__, exc,
                        EXPIRE_EVERY_SEC)
            gone = 0
        finally:
            # more left: the next step goes on; else the next interval
            self.expired_at = time.monotonic() if finished else -float("inf")
        self.expired_unsaid += gone
        if self.expired_unsaid and (finished or time.monotonic() - self.expired_said >= 10):
            log.warning("discarded %d dead letter(s) older than DEAD_LETTER_RETENTION_HOURS "
                        "(%g h)%s; counted as discarded in their hooks' stats",
                        self.expired_unsaid, hours, "" if finished else ", more to go")
            self.expired_unsaid, self.expired_said = 0, time.monotonic()

    def _hand_over(self) -> int:
        """Claim what is due and hand it to the sender; returns how many were claimed."""
        self._refresh()
        due: list[Delivery] = []
        inflight, held = self.sender.inflight(), sum(self.handed.values())
        if inflight < MAX_INFLIGHT and held < INFLIGHT_BYTES:
            # one claimed again when its lease ran out during a long send is still
            # being sent: its outcome settles it (not killed now if its hook is gone);
            # one whose outcome is here, not booked yet (Redis failed the booking for
            # longer than the lease), is settled by that outcome, not sent again
            waiting = {d.id for d, _ in self.settling}
            # claimed up to the limits of what waits for an outcome: deliveries and
            # bytes (re-sends of a destination slower than its traffic wait long in
            # the sender; 2,000 of 8 MiB would be 16 GiB)
            claimed = self.side.retry.claim_due(
                min(CLAIM_LIMIT, MAX_INFLIGHT - inflight),
                max_bytes=min(CLAIM_BYTES, INFLIGHT_BYTES - held), epoch=self.epoch)
            due = [d for d in claimed if d.id not in waiting and not self.sender.holds(d.id)]
        sendable = []
        for delivery in due:
            hook = self.hooks.get(delivery.hook_id)
            if hook is None:
                self._kill(delivery, f"hook {delivery.hook_id} was deleted; last error: "
                           f"{delivery.last_error}", hook_gone=True)
            elif hook.account_id != delivery.account_id:
                # its id was given to another account's hook (the hook id counter lost
                # or restored, or a record written from outside): never sent there
                self._kill(delivery, f"{other_account(hook, delivery)}; last error: "
                           f"{delivery.last_error}")
            else:
                sendable.append((hook, delivery))
        done = 0
        try:
            # inside: a count whose reply was lost is taken back with the others (one
            # Redis never carried out takes back an earlier hand-over's instead: a
            # kill then comes one hand-over later, never one too soon)
            counts = self.side.retry.handed_over([d.id for _, d in sendable])
            for (hook, delivery), count in zip(sendable, counts, strict=True):
                if count > MAX_UNANSWERED:
                    self._kill(delivery, (
                        f"handed over {count - 1} times without an outcome (the retry "
                        f"worker stopped during each send); last error: "
                        f"{delivery.last_error}"))
                    done += 1
                    continue
                try:
                    ready = for_target(hook, delivery)
                except Exception as exc:  # its parts cannot be made for the target now
                    # (a hook changed to a kind whose keys a part cannot give): this one
                    # never can, the others go on
                    self._kill(delivery, (
                        f"cannot be made for the hook's {hook.target.kind} target: "
                        f"{type(exc).__name__}: {exc}; last error: {delivery.last_error}"))
                    done += 1
                    continue
                self.sender.submit(hook, ready)
                self.handed[delivery.id] = sum(map(len, ready.parts))
                self.sent_with[delivery.id] = hook
                done += 1
        except Exception:
            # those counted and not handed over (Redis failing a kill, the sender
            # refusing) were not sent: counted, after 3 such failures they would become
            # dead letters saying the worker stopped during each send
            self._hand_back([d.id for _, d in sendable[done:]], "they were not sent")
            raise
        return len(due)

    def settle(self, delivery: Delivery, outcome: Outcome, once: Once | None = None) -> None:
        """Book one outcome; ``delivery`` itself is left as it was, so booking it
        again after a Redis error counts its attempt once; ``once``: the booking's
        token (RetryStore.schedule), so that its stats are counted once too. Booked
        into the data of the epoch the re-send was handed over under (DataLost if Redis
        lost it since)."""
        if outcome.ok:
            self.side.retry.complete(delivery, once=once, epoch=self.epoch)
            self.handed.pop(delivery.id, None)
            self.sent_with.pop(delivery.id, None)
            return
        # only the messages that failed are kept (the others were delivered)
        rest, done = undelivered(delivery, outcome)
        # one that waited for its destination and was never sent uses up no re-send
        free = uncharged(delivery, outcome)
        rest = msgspec.structs.replace(rest, resends=delivery.resends + (not free),
                                       restarts=restarts_after(delivery, outcome),
                                       last_attempt_ms=now_ms())
        # a destination's answer may echo the secrets it was sent: never kept, masked
        # with those of the hook as it was sent (deleted or changed meanwhile, say) and
        # as it is now
        error = outcome.describe()
        for hook in (self.sent_with.get(delivery.id), self.hooks.get(delivery.hook_id)):
            if hook is not None:
                error = scrub(error, hook_secrets(hook))
        dead = not free and exhausted(rest.resends, self.settings.HOOK_RETRY_TIMES)
        if dead:
            self.side.retry.kill(rest, error, delivered=done, once=once, epoch=self.epoch)
        else:
            # by Redis' clock, which the claim goes by (this machine's may differ)
            due = retry_due_ms(self.side.retry.clock.now_ms(),
                               self.settings.HOOK_RETRY_PERIOD_SEC)
            self.side.retry.schedule(rest, due, error, delivered=done, once=once,
                                     epoch=self.epoch)
        self.failure_log.failed(delivery.hook_id, delivery.account_id, delivery.kind,
                                rest.count, error, dead)
        self.handed.pop(delivery.id, None)
        self.sent_with.pop(delivery.id, None)

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None
            ) -> None:
        alive = Heartbeat(self.r, self.side.keys, "retry")
        try:
            self._loop(stop, on_error, alive)
            self._stopping()
        finally:
            # a stop is no crash: the sends it interrupts do not count as unanswered
            # (their leases run out and they are sent again, by this or the next worker)
            self._hand_back(sorted(self.handed), "the worker stops")
            self.handed.clear()
            self.sent_with.clear()
            with suppress(redis.RedisError):  # stopped: no longer running, at once
                self.r.delete(alive.key)

    def _loop(self, stop: threading.Event, on_error: Callable[[Exception], None] | None,
              alive: Heartbeat) -> None:
        failures = RoundFailures("retry worker", "nothing is re-sent")
        while not stop.is_set():
            try:
                if not self.step() and not self.sender.inflight():
                    time.sleep(0.05)
                failures.passed()
            except Exception as exc:  # Redis down, or a bug: reported, and the loop lives on
                failures.failed(exc)
                if on_error:
                    on_error(exc)
                time.sleep(0.5)
            with suppress(redis.RedisError):
                alive.beat(failures.waiting)
