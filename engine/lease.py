"""One engine per REDIS_PREFIX: the running engine's claim on ``{p}:engine``.

Two engines on one prefix would read the same intake streams in the same consumer
group under the same consumer names, and re-send the same retries: messages would go
out twice. A second engine on the same Ray cluster is refused by its actor names; one
on another Ray cluster (or another machine) is refused by this claim.

An engine claims the key when it starts (``claim``), before it changes anything of
the prefix and before any of its workers runs; the key expires ``ENGINE_LEASE_SEC``
after its last renewal, and the driver that started the engine renews it every fifth
of that (``Renewer``): its actors are not detached, so they live as long as it does.
A stopped engine deletes it (``release``); a crashed one leaves it to expire, and an
engine started on the prefix in that time waits for it to lapse. The workers look at
it at most every CHECK_SEC (``Holding``): should the claim lapse while they run (the
driver cut off from Redis longer than the TTL, a Redis that lost its data) and
another engine take it, they wait, saying why in their health marks, instead of
reading the intake the other engine reads.

The value is the holder's id (32 hex digits), a space, and JSON describing it (host,
pid, Ray cluster, start time) for the error that refuses another engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis

from engine.errors import ConfigError, PrefixTaken
from engine.keys import Keys, recorded_partitions

log = logging.getLogger("hookray")

# nobody's: set with the TTL; ours: the TTL renewed (what it says of us kept); either
# way nil. Someone else's: {value, pttl}
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
elseif string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  return {cur, redis.call('PTTL', KEYS[1])}
end
return false
"""
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
POLL_SEC = 0.25  # how often a waiting start looks again
CHECK_SEC = 1.0  # how often a worker looks whether its engine still holds the prefix


@dataclass(frozen=True)
class Holder:
    """Another engine's claim: what it said of itself, and how long it has left."""

    about: dict[str, Any]
    expires_ms: int

    @classmethod
    def of(cls, raw: bytes | str, expires_ms: int) -> Holder:
        """From the key's value (what cannot be read describes as unknown)."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        try:
            about = json.loads(text.partition(" ")[2])
        except (ValueError, RecursionError):  # RecursionError: nested too deep to read
            about = {}
        about = about if isinstance(about, dict) else {}
        about.pop("claim", None)  # which taking of the claim: see EngineLease.claim
        return cls(about, expires_ms)

    def describe(self) -> str:
        a = self.about
        parts = [f"host {a.get('host', '?')}", f"pid {a.get('pid', '?')}"]
        if a.get("ray"):
            parts.append(f"Ray cluster {a['ray']}")
        if a.get("started"):
            parts.append(f"started {a['started']}")
        return ", ".join(parts)


class EngineLease:
    """This engine's claim on its prefix (``owner``: its id, 32 hex digits)."""

    def __init__(self, r: redis.Redis, keys: Keys, ttl_sec: float,
                 owner: str | None = None, about: dict[str, Any] | None = None) -> None:
        self.r = r
        self.key = keys.engine
        self.owner = owner or uuid.uuid4().hex
        self.ttl_ms = max(1, int(ttl_sec * 1000))
        self.about = about or {}
        self._claim = r.register_script(_CLAIM)
        self._release = r.register_script(_RELEASE)

    @staticmethod
    def describe_here(ray_address: str | None) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "ray": ray_address or "",
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def claim(self) -> Holder | None:
        """Take or renew the claim: None when it is ours now, else who holds it. Each
        taking of it (the key absent: at the start, or after it lapsed) writes a new
        ``claim`` id beside what it says of the engine, which renewals keep: a worker
        that finds its engine's claim taken again (``Holding``) knows another engine
        may have held it meanwhile, though it never saw it."""
        about = {**self.about, "claim": uuid.uuid4().hex[:16]}
        value = f"{self.owner} {json.dumps(about, separators=(',', ':'))}"
        held = self._claim(keys=[self.key], args=[self.owner, value, self.ttl_ms])
        if not held:
            return None
        raw, pttl = held
        return Holder.of(raw, int(pttl))

    renew = claim

    def release(self, client: redis.Redis | None = None) -> bool:
        """Give the claim up (only ours: a lapsed one another engine took stays);
        ``client``: another client of the same Redis to do it with (one of a shorter
        timeout, at a stop)."""
        return bool(self._release(keys=[self.key], args=[self.owner], client=client))

    def claim_or_wait(self, prefix: str, same_cluster: Any = None) -> None:
        """Claim the prefix for a starting engine. Held by another engine: wait for
        its claim to lapse (the engine may have crashed); renewed before it does, the
        engine runs: PrefixTaken naming it.
        ``same_cluster(holder)``: an error to raise at once instead (the holder
        runs on this Ray cluster, so nothing will lapse), or None."""
        holder = self.claim()
        if holder is None:
            return
        if same_cluster is not None and (clash := same_cluster(holder)) is not None:
            raise clash
        if holder.expires_ms < 0:  # no engine sets it so: written by hand, or restored
            raise ConfigError(
                f"{self.key} holds a claim on REDIS_PREFIX {prefix!r} that never expires "
                f"({holder.describe()}); no engine writes it so: delete the key if no "
                f"engine of this prefix runs")
        deadline = time.monotonic() + holder.expires_ms / 1000 + 2 * POLL_SEC
        log.warning("REDIS_PREFIX %r is held by another engine (%s); waiting up to %.0f s "
                    "for its claim to lapse, in case that engine has stopped", prefix,
                    holder.describe(), deadline - time.monotonic())
        while time.monotonic() < deadline:
            time.sleep(POLL_SEC)
            holder = self.claim()
            if holder is None:
                return
        raise PrefixTaken(
            f"an engine with REDIS_PREFIX {prefix!r} already runs on this Redis "
            f"({holder.describe()}): it renewed its claim on {self.key} while this one "
            f"waited for it to lapse; stop that engine first, or give this engine another "
            f"REDIS_PREFIX (two engines on one prefix would send every message twice)")


class Renewer:
    """A thread renewing a running engine's claim every fifth of its TTL (the driver
    runs one while its actors do). Errors are retried; a claim another engine took
    after ours lapsed is logged as the error it is, once a minute, and taken back when
    free (the workers wait meanwhile: ``Holding``); what that engine recorded is then
    replaced by this engine's records (``also``)."""

    def __init__(self, lease: EngineLease) -> None:
        self.lease = lease
        # run after each renewal while the claim is ours (set once the engine started):
        # what the engine recorded beside its claim, written again if Redis lost it or
        # another engine replaced it while it held the claim (``Intake.record_again``).
        # A ConfigError (its PARTITIONS cannot be recorded again while the other count's
        # streams hold events) is logged once a minute; the workers wait meanwhile
        self.also: Callable[[], None] | None = None
        self.stop_event = threading.Event()
        self.lost_said = -float("inf")  # when the lost claim was last logged
        self.refused_said = -float("inf")  # when a ConfigError of ``also`` was last logged
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-lease")
        self.thread.start()

    def _run(self) -> None:
        every = max(0.05, self.lease.ttl_ms / 5000)
        while True:
            try:
                holder = self.lease.renew()
                if holder is None and self.also is not None:
                    self.also()
            except ConfigError as exc:  # the records cannot be written again (yet)
                holder = None
                if time.monotonic() - self.refused_said >= 60:
                    log.error("this engine holds its REDIS_PREFIX claim %s but cannot write "
                              "its records again, its workers wait: %s", self.lease.key, exc)
                    self.refused_said = time.monotonic()
            except redis.RedisError:
                holder = None  # said by the workers, who need Redis as much
            except Exception:  # a bug: said, and the thread lives on (else it lapses)
                log.exception("renewing %s (or writing the engine's records again) failed",
                              self.lease.key)
                holder = None
            if holder is not None and time.monotonic() - self.lost_said >= 60:
                log.error("another engine holds this engine's REDIS_PREFIX claim %s (%s): "
                          "both now read the same intake; stop one of them",
                          self.lease.key, holder.describe())
                self.lost_said = time.monotonic()
            if self.stop_event.wait(every):
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


class Holding:
    """A worker's look at its engine's claim: ``check`` raises PrefixTaken while
    another engine holds it (looked up at most every CHECK_SEC; a claim that is
    missing, as after a Redis restart, is no reason to wait: the driver sets it again).
    Given ``partitions`` (a partition worker's PARTITIONS), also while the engine's
    recorded count is another: an engine with that count held the claim meanwhile (its
    producers write to that count's streams), until the driver's ``Renewer`` records
    this engine's again."""

    def __init__(self, r: redis.Redis, keys: Keys, owner: str,
                 partitions: int | None = None) -> None:
        self.r, self.key, self.owner = r, keys.engine, owner.encode()
        self.config, self.prefix, self.partitions = keys.config, keys.p, partitions
        self.unlike = ""  # why the worker waits, from the last look: another count recorded
        self.looked = -CHECK_SEC
        self.taken = ""  # why the worker waits, from the last look ("" it does not)
        # the claim as the last look found it, this engine's: a later look finding it
        # taken again (another ``claim`` id) counts as a loss too (another engine may
        # have held it while this worker could not look: Redis unreachable)
        self.held: bytes | None = None
        # how often a look found another engine's claim after one that did not: the
        # worker drops the work it holds each time, as that engine takes it up
        self.losses = 0
        self.dropped = 0  # ``losses`` when the worker last dropped its work

    def check(self, poll: Callable[[], list[Any]], keep: Callable[[list[Any]], Any],
              lost: Callable[[], None]) -> None:
        """PrefixTaken while another engine holds the claim (a Redis error while the
        claim cannot be read). The worker's outcomes (``poll()``) are still collected
        then, as a transport actor drops those left uncollected through a long outage
        (their deliveries would be sent again): ``keep(outcomes)`` to be booked by a
        later round while Redis fails, dropped while another engine holds the claim.
        ``lost()``, once each time another engine took the claim since (``losses``),
        drops the work the worker holds: the other engine takes up the unacknowledged
        entries and the re-sends whose leases ran out, and outcomes booked over its
        bookings would send again, or dead-letter, what it delivered."""
        try:
            self._check()
        except Exception:
            with contextlib.suppress(Exception):
                outcomes = poll()
                if not self.taken:
                    keep(outcomes)
            raise
        finally:
            if self.losses != self.dropped:
                self.dropped = self.losses
                lost()

    def _check(self) -> None:
        now = time.monotonic()
        if now - self.looked >= CHECK_SEC:
            raw = self.r.get(self.key)
            recorded = None if self.partitions is None else \
                cast(bytes | None, self.r.hget(self.config, "partitions"))
            self.looked = now
            self.unlike = self._unlike(recorded)
            if isinstance(raw, str):
                raw = raw.encode()
            if raw is None:
                self.taken = ""
            elif raw.startswith(self.owner + b" "):
                if self.held is not None and raw != self.held and not self.taken:
                    self.losses += 1  # lapsed and taken again since the last look
                self.taken, self.held = "", raw
            else:
                if not self.taken:
                    self.losses += 1
                self.held = None
                # what waits before the first ": ", who holds it after: only the
                # former is shown without a token (engine.api.public_reason)
                self.taken = (f"another engine holds this engine's REDIS_PREFIX claim, the "
                              f"workers wait: {self.key} is held by "
                              f"{Holder.of(raw, 0).describe()}; stop one of the two engines")
        if self.taken:
            raise PrefixTaken(self.taken)
        if self.unlike:
            raise PrefixTaken(self.unlike)

    def _unlike(self, recorded: bytes | None) -> str:
        """Why the worker waits when the engine's ``recorded`` PARTITIONS is not its
        own, else "" (also for none recorded, or a damaged record: producers are refused
        for that, and the backlog is still read)."""
        if self.partitions is None:
            return ""
        try:
            count = recorded_partitions(recorded, self.config)
        except ConfigError:
            return ""
        if count is None or count == self.partitions:
            return ""
        # what waits before the first ": " (shown without a token), why after
        return (f"the engine's recorded PARTITIONS is {count}, not this engine's "
                f"{self.partitions}, the workers wait: another engine ran on REDIS_PREFIX "
                f"{self.prefix!r} with {count} while this engine's claim had lapsed; this "
                f"engine records {self.partitions} again at its claim's next renewal once "
                f"the intake streams of {count} are empty (else its log names those holding "
                f"events: stop this engine, and run one with PARTITIONS={count} until they "
                "are delivered)")
