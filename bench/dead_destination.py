"""A destination that never answers, beside a healthy one: how much it slows the healthy one.

    python -m bench.dead_destination [--messages N] [--rounds R] [--json PATH]
                                     [--redis-url URL]

One engine (``Engine.start``: a local Ray, a fresh Redis prefix in REDIS_URL —
default redis://127.0.0.1:6379/14 — PARTITIONS=2, HTTP_REQUEST_TIMEOUT_SEC=2,
HOOK_RETRY_TIMES=0) and a local receiver (``engine.receiver.Receiver``, a thread of
this process). Two hooks of one account take the same click events:

* ``healthy`` — always pointed at a path that answers 200;
* ``other`` — switched, round by round, between another path that answers 200
  (the baseline) and a path that never answers (``dead``): its requests hang until
  the transport's timeout, its breaker opens, and its messages become dead letters.

A round publishes N click events (default 50,000, in 10 chunks) and is timed from the
first publish until the healthy path holds all N more messages. The two conditions
alternate for R rounds each (default 5), so that load swings of the machine hit both
alike, after one untimed warm-up round (a baseline round after a dead one starts once
the dead requests have timed out). Reported: the median healthy rate of each
condition and ``ratio`` = dead / baseline, with every round's rate. The target is a
ratio ≥ 0.8 (the healthy destination loses no more than 20% of its rate).

Checks, after the rounds: the healthy hook's stats show every message of every round
delivered and none retried or dead-lettered, and the other hook's dead letters show
the dead destination really failed. A failed check is an error (exit status 1).

``--json PATH`` writes ``{"baseline_per_s", "dead_per_s", "ratio", "target",
"messages", "rounds": {"baseline": [...], "dead": [...]}, "healthy": {stats},
"other": {stats}}`` (``{"error"}`` when the run failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.transports import (
    DEFAULT_REDIS_URL,
    BenchError,
    _late,
    _positive,
    _stop_ray,
    check_redis,
    drop_prefix,
    say,
    start_ray,
)
from engine.receiver import Receiver
from engine.settings import Settings

TARGET = 0.8
CHUNKS = 10
SWITCH_SEC = 0.3  # after a hook update: hook changes reach partitions within 1 s, usually ms
ROUND_SEC = 120.0  # a round that does not finish in this long fails the run
TIMEOUT_SEC = 2.0  # the transport's request timeout: the dead requests end after it
PATHS = {"baseline": "/other", "dead": "/dead"}


def click_events(n: int, round_no: int) -> list[dict[str, Any]]:
    """n click events over 4 databases of account 1 (both partitions), ids unique per round."""
    return [{"id": f"r{round_no}-{i}", "event_type": "click", "account_id": 1,
             "list_id": 1 + i % 4, "event_date": "2026-11-29T10:00:00Z",
             "event_data": {"campaign_id": 1 + i % 3, "message_id": 5}}
            for i in range(n)]


def hook_data(rx: Receiver, path: str) -> dict[str, Any]:
    return {"name": f"bench {path}", "active": True, "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": rx.url(path), "max_batch_size": 100,
                                      "flush_timeout_sec": 0.1}}}


class Bench:
    def __init__(self, engine: Any, rx: Receiver, messages: int) -> None:
        self.engine, self.rx, self.messages = engine, rx, messages
        self.healthy = engine.create_hook(hook_data(rx, "/healthy"))
        self.other = engine.create_hook(hook_data(rx, PATHS["baseline"]))
        self.rounds = 0

    def point_other_at(self, path: str) -> None:
        self.engine.update_hook(self.other.id, hook_data(self.rx, path))
        # back from the dead path: its last requests wait out their timeout first, so
        # that a baseline round does not share the machine with the dead condition
        time.sleep(SWITCH_SEC + (TIMEOUT_SEC + 0.5 if path == PATHS["baseline"]
                                 and self.rounds > 1 else 0))

    def healthy_rate(self) -> float:
        """Publish one round; messages/s until the healthy path holds all of them."""
        self.rounds += 1
        before = self.rx.delivered_count("/healthy")
        batch = click_events(self.messages, self.rounds)
        step = -(-self.messages // CHUNKS)
        started = time.monotonic()
        for at in range(0, self.messages, step):
            self.engine.publish(batch[at:at + step])
        deadline = started + ROUND_SEC
        while self.rx.delivered_count("/healthy") - before < self.messages:
            if time.monotonic() > deadline:
                got = self.rx.delivered_count("/healthy") - before
                raise BenchError(f"round {self.rounds}: the healthy destination got {got:,} "
                                 f"of {self.messages:,} messages in {ROUND_SEC:.0f} s")
            time.sleep(0.005)
        return self.messages / (time.monotonic() - started)

    def check(self) -> tuple[dict[str, int], dict[str, int]]:
        """Both hooks' stats once every event is settled; a BenchError if a check fails."""
        if not self.engine.wait_idle(60):
            raise BenchError("the engine did not settle its intake within 60 s")
        deadline = time.monotonic() + 30
        while not self.engine.stats(self.other.id)["dead_lettered"] \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        healthy, other = (dict(self.engine.stats(h.id)) for h in (self.healthy, self.other))
        want = self.rounds * self.messages
        if (healthy["delivered"], healthy["retried"], healthy["dead_lettered"]) != (want, 0, 0):
            raise BenchError(f"the healthy hook's stats: {healthy}; expected {want:,} "
                             "delivered, none retried or dead-lettered")
        if not other["dead_lettered"]:
            raise BenchError(f"the dead destination never failed: the other hook's stats: {other}")
        return healthy, other


def run(messages: int, rounds: int, redis_url: str) -> dict[str, Any]:
    engine_class = _late("actors.driver", "Engine")
    prefix = f"bench-dead-{uuid.uuid4().hex[:8]}"
    settings = Settings.model_validate({
        "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PARTITIONS": 2,
        "HOOK_RETRY_TIMES": 0, "HOOK_RETRY_PERIOD_SEC": 5.0,
        "HTTP_REQUEST_TIMEOUT_SEC": TIMEOUT_SEC})
    engine: Any = None
    with Receiver(keep_bodies=False) as rx:
        rx.behave(PATHS["dead"], hang=True)
        try:
            say(f"starting the engine (prefix {prefix})")
            engine = engine_class.start(settings)
            bench = Bench(engine, rx, messages)
            say(f"warm-up: {messages:,} messages")
            bench.healthy_rate()
            rates: dict[str, list[float]] = {"baseline": [], "dead": []}
            for n in range(1, rounds + 1):
                for condition, path in PATHS.items():
                    bench.point_other_at(path)
                    rate = bench.healthy_rate()
                    rates[condition].append(rate)
                    say(f"round {n}/{rounds}: healthy {rate:,.0f} msg/s beside a "
                        f"{'dead' if condition == 'dead' else 'healthy'} destination")
            healthy, other = bench.check()
        finally:
            if engine is not None:
                engine.shutdown()
            drop_prefix(redis_url, prefix)
    baseline, dead = (statistics.median(rates[c]) for c in PATHS)
    return {"baseline_per_s": baseline, "dead_per_s": dead, "ratio": dead / baseline,
            "target": TARGET, "messages": messages, "rounds": rates,
            "healthy": healthy, "other": other}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dead_destination",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=_positive, default=50_000,
                        help="click events per round (default 50,000)")
    parser.add_argument("--rounds", type=_positive, default=5,
                        help="rounds per condition; the medians are compared (default 5)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a plain kill too
    with contextlib.ExitStack() as stack:
        try:
            check_redis(args.redis_url)
            say("starting Ray ...")
            start_ray()
            stack.callback(_stop_ray)
            result = run(args.messages, args.rounds, args.redis_url)
        except BenchError as exc:
            say(f"FAILED: {exc}")
            result = {"error": str(exc)}
    if "error" not in result:
        print(f"\nhealthy destination, {args.messages:,} messages per round, medians of "
              f"{args.rounds} rounds:\n"
              f"  beside a healthy destination {result['baseline_per_s']:>10,.0f} msg/s\n"
              f"  beside a dead destination    {result['dead_per_s']:>10,.0f} msg/s\n"
              f"  ratio {result['ratio']:.2f} (target >= {TARGET}: "
              f"{'met' if result['ratio'] >= TARGET else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
