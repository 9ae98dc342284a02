"""Whether the engine's workers are running, seen from Redis alone.

Each partition worker and the retry worker mark ``{p}:alive:<worker>`` with the time
of a round at most every BEAT_SEC seconds, the mark expiring after ALIVE_SEC: a
worker whose mark is there ran a round lately. ``engine_health`` reads the marks of
the partitions the engine recorded (``{p}:config``) and of the retry worker, so the
HTTP API and the driver can say whether accepted events are being processed without
asking Ray.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from engine.keys import Keys

BEAT_SEC = 1.0  # a running worker marks itself at most this often
ALIVE_SEC = 15  # and counts as running for this long after


class Heartbeat:
    """One worker's mark; ``beat`` after each round (errors are the caller's)."""

    def __init__(self, r: redis.Redis, keys: Keys, worker: str) -> None:
        self.r = r
        self.key = keys.alive(worker)
        self.last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self.last >= BEAT_SEC:
            self.r.set(self.key, int(time.time() * 1000), ex=ALIVE_SEC)
            self.last = now


def engine_health(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """``{"partitions": {"expected", "running", "stopped": [n, ...]}, "retry_running"}``:
    ``expected`` is the engine's recorded PARTITIONS (None before an engine first
    started on this prefix); a worker runs when it marked itself in the last
    ALIVE_SEC seconds."""
    recorded = r.hget(keys.config, "partitions")
    expected = int(recorded) if recorded is not None else None
    names = [f"partition:{n}" for n in range(expected or 0)] + ["retry"]
    marks = r.mget([keys.alive(name) for name in names])
    stopped = [n for n, mark in enumerate(marks[:-1]) if mark is None]
    return {"partitions": {"expected": expected, "running": (expected or 0) - len(stopped),
                           "stopped": stopped},
            "retry_running": marks[-1] is not None}
