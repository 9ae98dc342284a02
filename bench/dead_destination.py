"""A destination that never answers, beside a healthy one: how much it slows the healthy one.

    python -m bench.dead_destination [--messages N] [--rounds R] [--json PATH]
                                     [--redis-url URL]

One engine (``Engine.start``: a local Ray, a fresh Redis prefix in REDIS_URL —
default redis://127.0.0.1:6379/14 — PARTITIONS=2, HTTP_REQUEST_TIMEOUT_SEC=2,
HOOK_RETRY_TIMES=0), a counting sink (``bench.sink``, a process of its own) and a
local receiver (``engine.receiver.Receiver``, a thread of this process). Two hooks of
one account take the same click events:

* ``healthy`` — always pointed at the sink, which answers 200 and keeps the ids;
* ``other`` — switched, round by round, between a receiver path that answers 200
  (the baseline) and a receiver path that never answers (``dead``): its requests hang
  until the transport's timeout, its breaker opens, and its messages become dead
  letters. Each dead round has a path of its own (``/dead-<round>``): the transport
  keeps a breaker per URL open for 5 s, and on the path of an earlier round the
  requests would fail at once on it instead of hanging.

A round publishes N click events (default 50,000, in 10 chunks) and is timed from the
first publish until the sink's last request that brought the healthy path to N
messages. The two conditions alternate for R rounds each (default 5), so that load
swings of the machine hit both alike, after one untimed warm-up round (a baseline
round after a dead one starts once the dead requests have timed out). Reported: the
median healthy rate of each condition and ``ratio`` = dead / baseline, with every
round's rate. The target is a ratio ≥ 0.8 (the healthy destination loses no more than
20% of its rate).

Checks, each a failed run (exit status 1) when it fails: after every round, outside
its timed window, every healthy message by id at the sink (``missing``, ``unexpected``,
``duplicates`` against the engine's ``hook_message_id``s of the round's events); after
every dead round, that requests to its path came to hang during the round (``hung``:
the most held unanswered at once) and none was answered; after the rounds, that nothing more
reached the sink, that the healthy hook's stats show every message of every round
delivered and none retried or dead-lettered, and that the other hook's dead letters
show the dead destination really failed.

``--json PATH`` writes ``{"baseline_per_s", "dead_per_s", "ratio", "target",
"messages", "rounds": {"baseline": [...], "dead": [...]}, "hung": [...],
"checked": {"expected", "received", "missing", "unexpected", "duplicates"},
"healthy": {stats}, "other": {stats}}`` (``hung`` per dead round, ``checked`` over
every round, the warm-up's too; ``{"error"}`` when the run failed).
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
    CHECK_COUNTS,
    DEFAULT_REDIS_URL,
    BenchError,
    _late,
    _positive,
    _stop_ray,
    check_failure,
    check_redis,
    drop_prefix,
    say,
    start_ray,
)
from engine.messages import event_digests
from engine.receiver import Receiver
from engine.settings import Settings

TARGET = 0.8
CHUNKS = 10
SWITCH_SEC = 0.3  # after a hook update: hook changes reach partitions within 1 s, usually ms
ROUND_SEC = 120.0  # a round that does not finish in this long fails the run
TIMEOUT_SEC = 2.0  # the transport's request timeout: the dead requests end after it
# the sink's count is read this often; the round's end is the sink's time of its last
# request, so the polling only finds the end, it does not time it
POLL_SEC = 0.02
HEALTHY, BASELINE = "/healthy", "/other"
CONDITIONS = ("baseline", "dead")


def dead_path(round_no: int) -> str:
    """The dead round's own path: a fresh URL, so a fresh breaker in the transport."""
    return f"/dead-{round_no}"


def click_events(n: int, round_no: int) -> list[dict[str, Any]]:
    """n click events over 4 databases of account 1 (both partitions), ids unique per round."""
    return [{"id": event_id(round_no, i), "event_type": "click", "account_id": 1,
             "list_id": 1 + i % 4, "event_date": "2026-11-29T10:00:00Z",
             "event_data": {"campaign_id": 1 + i % 3, "message_id": 5}}
            for i in range(n)]


def event_id(round_no: int, i: int) -> str:
    return f"r{round_no}-{i}"


def expected_ids(hook_id: int, n: int, round_no: int) -> set[str]:
    """The engine's ``hook_message_id`` of (hook, each of the round's n events)."""
    return {f"{d}-{hook_id}" for d in event_digests([event_id(round_no, i) for i in range(n)])}


def id_check(want: set[str], got: dict[str, Any]) -> dict[str, int]:
    """The ids a sink path holds (``Sink.ids``) against those expected there."""
    ids = set(got["ids"])
    return {"expected": len(want), "received": int(got["messages"]),
            "missing": len(want - ids), "unexpected": len(ids - want),
            "duplicates": int(got["duplicates"])}


def hook_data(url: str) -> dict[str, Any]:
    return {"name": f"bench {url}", "active": True, "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": url, "max_batch_size": 100,
                                      "flush_timeout_sec": 0.1}}}


class Bench:
    def __init__(self, engine: Any, sink: Any, rx: Receiver, messages: int) -> None:
        self.engine, self.sink, self.rx, self.messages = engine, sink, rx, messages
        self.healthy = engine.create_hook(hook_data(sink.url(HEALTHY)))
        self.other = engine.create_hook(hook_data(rx.url(BASELINE)))
        self.rounds = 0
        self.checked = dict.fromkeys(CHECK_COUNTS, 0)

    def point_other_at(self, path: str) -> None:
        self.engine.update_hook(self.other.id, hook_data(self.rx.url(path)))
        # back from the dead path: its last requests wait out their timeout first, so
        # that a baseline round does not share the machine with the dead condition
        time.sleep(SWITCH_SEC + (TIMEOUT_SEC + 0.5 if path == BASELINE
                                 and self.rounds > 1 else 0))

    def healthy_rate(self, label: str, dead: str | None = None) -> tuple[float, int]:
        """Publish one round; messages/s until the healthy path holds all of them, and,
        beside the ``dead`` path, the most requests that came to hang there during the
        round held at once (above those hanging at its start: the receiver holds a hung
        request until it stops). Checks the round afterwards (``check_round``)."""
        self.rounds += 1
        batch = click_events(self.messages, self.rounds)
        step = -(-self.messages // CHUNKS)
        before = self.rx.hanging(dead) if dead is not None else 0
        started = time.time()
        for at in range(0, self.messages, step):
            self.engine.publish(batch[at:at + step])
        deadline = time.monotonic() + ROUND_SEC
        hung = 0
        while True:
            stats = self.sink.stats()
            got = stats["per_path"].get(HEALTHY, 0)
            if dead is not None:
                hung = max(hung, self.rx.hanging(dead) - before)
            if got >= self.messages:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{label}: the healthy destination got {got:,} of "
                                 f"{self.messages:,} messages in {ROUND_SEC:.0f} s")
            time.sleep(POLL_SEC)
        rate = self.messages / (stats["last"] - started)
        self.check_round(label, dead, hung)
        return rate, hung

    def check_round(self, label: str, dead: str | None, hung: int) -> None:
        """Every healthy message of the round by id (the sink then cleared for the next
        round), and that the dead path hung and never answered: a BenchError if not."""
        check = id_check(expected_ids(self.healthy.id, self.messages, self.rounds),
                         self.sink.ids(HEALTHY))
        self.sink.reset()
        for key in CHECK_COUNTS:
            self.checked[key] += check[key]
        if wrong := check_failure(check):
            raise BenchError(f"{label}: the healthy destination's messages by id: "
                             f"{wrong} ({check['received']:,} received of {self.messages:,})")
        if dead is None:
            return
        if not hung:
            raise BenchError(f"{label}: no request to {dead} hung during the round, so it "
                             "did not measure a destination that never answers")
        if answered := self.rx.requests(dead):
            raise BenchError(f"{label}: {dead} answered {len(answered)} requests; it must "
                             "never answer")

    def check(self) -> tuple[dict[str, int], dict[str, int]]:
        """Both hooks' stats once every event is settled; a BenchError if a check fails."""
        if not self.engine.wait_idle(60):
            raise BenchError("the engine did not settle its intake within 60 s")
        deadline = time.monotonic() + 30
        while not self.engine.stats(self.other.id)["dead_lettered"] \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        late = self.sink.ids(HEALTHY)["messages"]
        if late:
            raise BenchError(f"{late:,} healthy messages reached the sink after their round")
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
    try:
        sink = _late("bench.sink", "Sink")().start()
    except RuntimeError as exc:
        raise BenchError(f"the HTTP sink: {exc}") from None
    try:
        with Receiver(keep_bodies=False) as rx:
            for n in range(1, rounds + 1):
                rx.behave(dead_path(n), hang=True)
            try:
                say(f"starting the engine (prefix {prefix})")
                engine = engine_class.start(settings)
                bench = Bench(engine, sink, rx, messages)
                say(f"warm-up: {messages:,} messages")
                bench.healthy_rate("the warm-up")
                rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
                hung: list[int] = []
                for n in range(1, rounds + 1):
                    for condition in CONDITIONS:
                        path = dead_path(n) if condition == "dead" else BASELINE
                        bench.point_other_at(path)
                        if condition == "baseline":
                            rate, _ = bench.healthy_rate(f"baseline round {n}")
                            beside = "healthy destination"
                        else:
                            rate, held = bench.healthy_rate(f"dead round {n}", path)
                            hung.append(held)
                            beside = f"dead destination ({held} requests hanging at most)"
                        rates[condition].append(rate)
                        say(f"round {n}/{rounds}: healthy {rate:,.0f} msg/s beside a {beside}")
                healthy, other = bench.check()
            finally:
                if engine is not None:
                    engine.shutdown()
                drop_prefix(redis_url, prefix)
    finally:
        sink.stop()
    baseline, dead = (statistics.median(rates[c]) for c in CONDITIONS)
    checked = bench.checked
    say(f"checked by id: {checked['received']:,} healthy messages received of "
        f"{checked['expected']:,}: {checked['missing']:,} missing, {checked['unexpected']:,} "
        f"unexpected, {checked['duplicates']:,} duplicates")
    return {"baseline_per_s": baseline, "dead_per_s": dead, "ratio": dead / baseline,
            "target": TARGET, "messages": messages, "rounds": rates, "hung": hung,
            "checked": bench.checked, "healthy": healthy, "other": other}


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
