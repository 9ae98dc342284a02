"""End-to-end throughput of the engine on a generated workload.

    python -m bench.throughput [--events N] [--json PATH] [--chart PATH]
                               [--redis-url URL] [--partitions P] [--sinks S]

Workload (seeded, reproducible): N events (default 1,000,000) over 50 databases
of 5 accounts and every event category; 100 hooks with mixed scope, actions and
filters, HTTP batch targets (``max_batch_size`` 100, flush 0.2 s) on local counting
sinks (``bench.sink``, processes of their own). The engine (``Engine.start``: a local
Ray, a fresh Redis prefix, PARTITIONS=2, one HTTP transport actor) runs with
HOOK_RETRY_TIMES=0, so a failed delivery becomes a dead letter at once: the run
stops with its ``last_error`` instead of waiting for re-sends.

A warm-up of 2,000 other events goes through the engine first (not timed; the
sinks are cleared after it). Then the N events are published as fast as the
driver can, in chunks of 5,000, each chunk's ``event_date`` set just before it is
published. Reported:

* ``accepted_per_s`` — events/s from the first publish until the last chunk is in
  the intake.
* ``delivered_per_s`` — unique messages at the sinks / (time of the sinks' last
  request - first publish).
* ``p50_ms`` / ``p99_ms`` — publish→receiver latency of a burst of N events
  published as fast as possible: at the sink, now - the message's ``event_date``
  (taken just before its chunk was published), sampled on about four messages of
  every request; the higher of the sinks' percentiles. With the whole burst queued
  at once this mostly measures how long the burst takes to drain, not the latency
  of one event on an idle engine.
* ``ceiling_per_s`` and ``ratio`` — the raw HTTP ceiling: a bare aiohttp client (32
  requests in flight) sends the very messages the engine had to deliver (every
  matched (event, hook) pair, encoded by ``MessageBuilder`` for the real hooks and
  events, so the same bytes), in 100-message JSON-array bodies per hook (the hooks'
  ``max_batch_size``; the engine also sends partial batches at flush timeouts) to the
  same paths on fresh sinks, after a warm-up, timed from the first request to the
  last answer; every answer must be 200, and the sinks' ids are checked afterwards
  like the engine's. The client runs with the cyclic collector set as in the
  engine's transport actors (``actors.gc_policy``). It runs after the engine's run,
  once Ray's processes have exited and the generated events are released (the line
  before it says how busy the CPU was). ``ratio`` = delivered_per_s / ceiling_per_s.
* Checks by id: the engine's ``hook_message_id`` of every matched (event, hook) pair
  is computed per receiver path and compared with the set of ids that path's sink
  received: ``missing`` (expected, never received), ``unexpected`` (received, never
  expected) and ``duplicates`` (received again on the same path); ``lost`` =
  ``missing``. Engine totals over the benchmark's hooks for the timed run
  (``accepted``, ``delivered``, ``retried``, ``dead_lettered``) are printed and saved.
* Memory, the peak over samples every second during the timed run of each group's
  summed PSS (``Pss`` of ``/proc/PID/smaps_rollup``: shared pages divided among the
  processes sharing them, so nothing is counted twice; RSS when smaps_rollup is not
  readable, ``memory_metric`` says which): ``peak_rss_mb`` (the name is kept for
  compatibility; it is **not** RSS any more) = ``engine_pss_mb`` = the engine's actor
  processes (partitions, retry, every transport actor the engine starts — the idle
  RabbitMQ and Kafka ones too — and the API actor when started);
  reported apart from it: ``bench_pss_mb`` (this process: the driver, N generated
  events), ``sinks_pss_mb``, ``ray_pss_mb`` (Ray's own daemons and idle workers:
  every other process below this one) and ``redis_growth_mb`` (growth of Redis's
  ``used_memory`` over its value before the engine started; Redis is shared, so
  other clients' keys count too). Ray's daemons are sampled every 4 s only: reading
  smaps_rollup costs the kernel 1-5 ms per process, in this process's sampling
  thread (printed as "memory: N samples, X ms each").

* Where the CPU goes (``bench.cpu``, from ``/proc``): ``engine_cpu_us``, the CPU
  time per matched message over the timed run (from the first publish until the polls
  see the last message at the sinks, about 0.05 s after it) of each group — ``partitions``,
  ``transport`` (the HTTP transport actor), ``other_actors`` (retry worker, idle
  pools), ``bench`` (this process: it publishes), ``sinks``, ``redis`` — plus
  ``machine`` (every CPU's busy time) and ``other`` (Ray's daemons, the kernel...);
  ``ceiling_cpu_us`` the same for the ceiling (``bench`` is the bare client there);
  ``budget_us`` = cpus / (0.5 * ceiling_per_s): the CPU per message, everything on
  the machine included, that would let the engine reach the ratio 0.5 with every CPU
  busy. An engine run whose ``machine`` figure is above it cannot reach 0.5 here.

A run that stalls (no new message at the sinks for 60 s), dead-letters a delivery,
does not settle, misses, duplicates or adds a message, or whose ceiling fails its
checks reports the rates as null, says why under ``error`` / ``ceiling_error`` and
exits 1. ``--json PATH`` writes every figure above plus ``events``, ``matched``,
``delivered_unique``, ``totals``, ``engine_processes``, ``engine_bytes_per_message``,
``ceiling`` (its own checks) and ``bytes_per_message``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from itertools import zip_longest
from typing import Any

import numpy as np
import psutil
import redis

from actors.gc_policy import relaxed_gc
from bench.cpu import CpuMeter, budget_us, describe, redis_pid_at
from bench.sink import Sink
from engine.catalogue import load_catalogue
from engine.customdata import format_rfc3339_nano
from engine.events import Event
from engine.hooks import Hook
from engine.matching import EventColumns, HookIndex
from engine.messages import MessageBuilder, event_digests, http_body
from engine.settings import Settings
from engine.stores import STAT_FIELDS

ACCOUNTS, DATABASES, HOOKS = 5, 50, 100
PUBLISH_CHUNK = 5_000
WARMUP_EVENTS = 2_000
HTTP_BATCH = 100  # the hooks' max_batch_size and the ceiling's body size
CEILING_CONCURRENCY = 32
STALL_SEC = 60.0
SETTLE_SEC = 60.0
POLL_SEC = 1.0  # the sinks' counts are read this often: each read sorts their latency samples
END_POLL_SEC = 0.05  # and this often once the rest should arrive within POLL_SEC
SAMPLE_SEC = 1.0  # reading smaps_rollup takes the kernel 1-5 ms per process
RAY_EVERY = 4  # Ray's daemons (slow to change) are sampled every 4th time only
DEFAULT_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
MB = 2**20
TARGET_RATIO = 0.5  # delivered/ceiling, the target: budget_us is for it
CORES = os.cpu_count() or 1


class BenchError(Exception):
    """The run cannot give valid figures; the message says why."""


def say(text: str) -> None:
    print(text, flush=True)


# --- workload ------------------------------------------------------------------------------


def hook_path(i: int) -> str:
    return f"/h{i}"


def make_hooks(sinks: list[Sink], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    codes = load_catalogue().codes()
    hooks = []
    for i in range(HOOKS):
        list_id = rng.randrange(1, DATABASES + 1)
        account = 1 + list_id % ACCOUNTS
        filters: dict[str, list[int]] = {}
        if rng.random() < 0.3:
            filters["campaigns"] = rng.sample(range(1, 21), 8)
        if rng.random() < 0.2:
            filters["resources"] = rng.sample(range(1, 6), 3)
        if rng.random() < 0.1:
            filters["segments"] = rng.sample(range(1, 11), 5)
        if rng.random() < 0.1:
            filters["templates"] = rng.sample(range(1, 31), 15)
        if rng.random() < 0.05:
            filters["pixels"] = [1, 2]
        hooks.append({
            "name": f"bench {i}", "active": True, "account_id": account,
            "database": "all" if rng.random() < 0.4 else list_id,
            "actions": rng.sample(codes, rng.randrange(3, 12)), "filters": filters,
            "custom_data": {"fields": ["email"], "pairs": {"cname": "{{campaign_name}}",
                                                           "day": "{{event_date_ymd}}"}},
            "target": {"http_batch": {"url": sinks[i % len(sinks)].url(hook_path(i)),
                                      "max_batch_size": HTTP_BATCH,
                                      "flush_timeout_sec": 0.2}},
        })
    return hooks


def make_events(n: int, seed: int, tag: str = "b") -> list[Event]:
    """``n`` events with ids ``<tag><index>``."""
    rng = random.Random(seed)
    codes = load_catalogue().codes()
    date = "2026-11-29T00:00:00Z"
    events = []
    for i in range(n):
        list_id = rng.randrange(1, DATABASES + 1)
        events.append(Event(
            id=f"{tag}{i}", event_type=codes[rng.randrange(len(codes))], event_date=date,
            account_id=1 + list_id % ACCOUNTS, list_id=list_id, profile_id=f"p{i % 10_000}",
            event_data={"campaign_id": rng.randrange(1, 21), "message_id": rng.randrange(1, 31),
                        "segment_id": rng.randrange(0, 11), "resource_id": rng.randrange(1, 6),
                        "pixel_id": rng.randrange(1, 4)},
            profile={"email": f"user{i % 10_000}@example.org"},
        ))
    return events


def match(hooks: list[Hook], events: list[Event]) -> dict[int, np.ndarray]:
    """Hook id -> sorted indices of the events it matches (the engine's own matcher)."""
    catalogue = load_catalogue()
    index = HookIndex.compile(hooks, catalogue)
    found = index.match(EventColumns.from_events(events, catalogue))
    return {index.hooks[pos].id or 0: idx for pos, idx in found.items()}


def expected_ids(hook_id: int, idx: np.ndarray, tag: str) -> set[str]:
    """The engine's ``hook_message_id`` of (hook, event ``<tag><i>``) for each i."""
    return {f"{d}-{hook_id}" for d in event_digests([f"{tag}{i}" for i in idx.tolist()])}


@contextlib.contextmanager
def released(events: list[Event]) -> Iterator[None]:
    """Drop the events (and collect) when the block ends: a million live Event objects
    would slow the bare client down and inflate this process."""
    try:
        yield
    finally:
        events.clear()
        gc.collect()


# --- memory --------------------------------------------------------------------------------


HAVE_SMAPS = os.path.exists("/proc/self/smaps_rollup")  # Linux 4.14+


def _pss(pid: int) -> tuple[int, str] | None:
    """(bytes, "pss") from smaps_rollup, else (RSS bytes, "rss"); None once gone."""
    if not HAVE_SMAPS:
        try:
            return int(psutil.Process(pid).memory_info().rss), "rss"
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024, "pss"
        return 0, "pss"  # readable but empty: a zombie, or a process exiting
    except FileNotFoundError:
        return None  # gone
    except OSError:  # not ours to read: RSS at least
        try:
            return int(psutil.Process(pid).memory_info().rss), "rss"
        except psutil.Error:
            return None


class Memory:
    """Samples, in a thread of its own, the summed PSS of each group of processes and
    Redis's ``used_memory``, keeping each group's peak (see the module docstring)."""

    GROUPS = ("engine", "bench", "sinks", "ray")

    def __init__(self, redis_url: str) -> None:
        self.me = psutil.Process()
        self.engine_pids: set[int] = set()
        self.sink_pids: set[int] = set()
        self.peak = dict.fromkeys(self.GROUPS, 0)
        self.metric = "pss"
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.redis_base = self._redis_used()
        self.redis_peak = self.redis_base
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.samples, self.sampling_sec = 0, 0.0  # what sampling costs this process

    def _redis_used(self) -> int:
        try:
            return int(self.redis.info("memory")["used_memory"])
        except redis.RedisError:
            return 0

    def sample(self, everything: bool = False) -> None:
        began = time.perf_counter()
        groups = {"engine": self.engine_pids, "bench": {self.me.pid}, "sinks": self.sink_pids}
        if everything or self.samples % RAY_EVERY == 0:
            try:
                below = {p.pid for p in self.me.children(recursive=True)}
            except psutil.Error:
                below = set()
            groups["ray"] = below - self.engine_pids - self.sink_pids
        sums = {}
        for name, pids in groups.items():
            total = 0
            for pid in pids:
                got = _pss(pid)
                if got is not None:
                    total += got[0]
                    if got[1] != "pss":
                        self.metric = "rss"
            sums[name] = total
        used = self._redis_used()
        with self._lock:
            for name, total in sums.items():
                self.peak[name] = max(self.peak[name], total)
            self.redis_peak = max(self.redis_peak, used)
            self.samples += 1
            self.sampling_sec += time.perf_counter() - began

    def reset(self) -> None:
        """Forget the peaks (the timed run starts)."""
        with self._lock:
            self.peak = dict.fromkeys(self.GROUPS, 0)
            self.redis_peak = self.redis_base
            self.samples = 0  # Ray's daemons at the next sample

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(SAMPLE_SEC):
                self.sample()

        self._thread = threading.Thread(target=loop, daemon=True, name="bench: memory")
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)
            self._thread = None
        self.redis.close()
        say(f"memory: {self.samples} samples, {self.sampling_sec / max(self.samples, 1) * 1e3:.1f}"
            f" ms each in this process")

    def figures(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {f"{g}_pss_mb": self.peak[g] / MB for g in self.GROUPS}
            out["redis_growth_mb"] = (self.redis_peak - self.redis_base) / MB
        out["peak_rss_mb"] = out["engine_pss_mb"]  # the old key: the engine actors' PSS
        out["memory_metric"] = self.metric
        return out


def actor_pids(engine: Any) -> dict[str, int]:
    """The process id of each of the engine's actors (as bench.transports' Profiler)."""
    import ray

    actors = [(f"partition{n}", a) for n, a in enumerate(engine.actors["partitions"])]
    actors.append(("retry", engine.actors["retry"]))
    for kind, pool in engine.actors["pools"].items():
        actors += [(f"{kind}{n}", a) for n, a in enumerate(pool)]
    if engine.api is not None:
        actors.append(("api", engine.api))
    refs = [a.__ray_call__.remote(lambda self: os.getpid()) for _, a in actors]
    return {name: int(pid) for (name, _), pid in
            zip(actors, ray.get(refs, timeout=60), strict=True)}


def engine_groups(pids: dict[str, int], sinks: list[Sink], redis_url: str
                  ) -> dict[str, Sequence[int | None]]:
    """The processes of the engine's run by group, for ``bench.cpu``: the partition
    actors, the HTTP transport actor(s), the engine's other actors (retry worker, idle
    transport pools), this process (it publishes), the sinks and Redis."""
    partitions = [p for name, p in pids.items() if name.startswith("partition")]
    transport = [p for name, p in pids.items() if name.startswith("http_batch")]
    rest = [p for p in pids.values() if p not in partitions and p not in transport]
    return {"partitions": partitions, "transport": transport,
            "other_actors": rest, "bench": [os.getpid()],
            "sinks": [s.pid for s in sinks], "redis": [redis_pid_at(redis_url)]}


# --- checks --------------------------------------------------------------------------------


def sinks_total(sinks: list[Sink]) -> dict[str, Any]:
    stats = [s.stats() for s in sinks]
    return {"unique": sum(s["unique"] for s in stats),
            "messages": sum(s["messages"] for s in stats),
            "duplicates": sum(s["duplicates"] for s in stats),
            "bytes": sum(s["bytes"] for s in stats),
            "last": max(s["last"] for s in stats), "stats": stats}


def check_ids(sinks: list[Sink], paths: dict[int, tuple[int, str]],
              matches: dict[int, np.ndarray], tag: str) -> dict[str, int]:
    """Compare, path by path, the ids each sink received with the ids expected there:
    missing, unexpected and duplicates (one path's sets in memory at a time)."""
    out = {"missing": 0, "unexpected": 0, "duplicates": 0, "received": 0}
    expected_at: dict[tuple[int, str], int] = {where: hid for hid, where in paths.items()}
    seen_paths = [(n, p) for n, s in enumerate(sinks) for p in s.stats()["per_path"]]
    for where in [*expected_at, *(w for w in seen_paths if w not in expected_at)]:
        sink, path = where
        hook_id = expected_at.get(where)
        idx = matches.get(hook_id) if hook_id is not None else None
        want = expected_ids(hook_id, idx, tag) if hook_id is not None and idx is not None \
            else set()
        got = sinks[sink].ids(path)
        ids = set(got["ids"])
        out["missing"] += len(want - ids)
        out["unexpected"] += len(ids - want)
        out["duplicates"] += int(got["duplicates"])
        out["received"] += int(got["messages"])
    return out


def dead_letter_error(engine: Any) -> str | None:
    """The last error of a dead letter of this engine, if there is any."""
    if not int(engine.redis.zcard(engine.keys.dead)):
        return None
    letters = engine.dead_letters(limit=1)
    error = letters[0].last_error if letters else "(no dead letter found)"
    return f"the engine dead-lettered a delivery: {error}"


def wait_delivered(engine: Any, sinks: list[Sink], want: int, started: float, what: str,
                   mem: Memory | None = None) -> dict[str, Any]:
    """Poll until the sinks hold ``want`` unique messages; their totals. Once the rest
    should arrive within a poll (at the rate so far), the polls come every END_POLL_SEC,
    so that the caller sees the end, and stops its CPU meter, about that long after the
    last delivery rather than up to POLL_SEC. BenchError on a dead letter or after
    STALL_SEC without progress."""
    last_unique, last_move = -1, time.monotonic()
    next_report = time.monotonic()
    pause = POLL_SEC
    while True:
        time.sleep(pause)
        total = sinks_total(sinks)
        if (error := dead_letter_error(engine)) is not None:
            raise BenchError(f"{what}: {error}")
        mono = time.monotonic()
        if total["unique"] >= want:
            return total
        rate = total["unique"] / max(time.time() - started, 1e-9)
        pause = END_POLL_SEC if want - total["unique"] <= rate * POLL_SEC else POLL_SEC
        if total["unique"] != last_unique:
            last_unique, last_move = total["unique"], mono
        elif mono - last_move > STALL_SEC:
            raise BenchError(f"{what}: stalled at {total['unique']:,}/{want:,} unique messages "
                             f"at the sinks for {STALL_SEC:g} s (backlog "
                             f"{engine.backlog():,} intake entries)")
        if mono >= next_report:
            memory = (f", engine actors {mem.peak['engine'] / MB:,.0f} MB PSS at most"
                      if mem is not None else "")
            say(f"  {what}: delivered {total['unique']:,}/{want:,} ({rate:,.0f} msg/s){memory}")
            next_report = mono + 2.0


def settle(engine: Any, what: str) -> None:
    """BenchError when the engine does not settle within SETTLE_SEC or has dead-lettered
    a delivery."""
    if not engine.wait_idle(SETTLE_SEC):
        raise BenchError(f"{what}: the engine did not settle within {SETTLE_SEC:g} s "
                         f"(backlog {engine.backlog():,} intake entries)")
    if (error := dead_letter_error(engine)) is not None:
        raise BenchError(f"{what}: {error}")


def hook_totals(engine: Any, hook_ids: list[int]) -> dict[str, int]:
    stats = [engine.stats(h) for h in hook_ids]
    return {f: sum(s[f] for s in stats) for f in STAT_FIELDS}


# --- the engine run ------------------------------------------------------------------------


def run_engine(args: argparse.Namespace, sinks: list[Sink], mem: Memory,
               events: list[Event]) -> dict[str, Any]:
    """The engine part; fills ``result`` as far as it gets (``error`` on a failure)."""
    from actors.driver import Engine

    prefix = f"bench{os.getpid()}"
    settings = Settings.model_validate({
        "REDIS_URL": args.redis_url, "REDIS_PREFIX": prefix, "PARTITIONS": args.partitions,
        "HTTP_POOL_SIZE": args.http_pool, "HOOK_RETRY_TIMES": 0})
    warm = make_events(min(WARMUP_EVENTS, len(events)), args.seed + 1, tag="w")
    result: dict[str, Any] = {"events": len(events), "error": None}
    engine: Any = None
    try:
        say("starting the engine ...")
        engine = Engine.start(settings)
        hooks = [engine.create_hook(h) for h in make_hooks(sinks, args.seed)]
        paths = {h.id or 0: (i % len(sinks), hook_path(i)) for i, h in enumerate(hooks)}
        hook_ids = list(paths)
        pids = actor_pids(engine)
        mem.engine_pids = set(pids.values())
        result["engine_processes"] = pids
        matches = match(hooks, events)
        matched = sum(len(v) for v in matches.values())
        result.update(matched=matched, hooks=hooks, paths=paths, matches=matches)
        say(f"{matched:,} (event, hook) messages expected")

        warm_matched = sum(len(v) for v in match(hooks, warm).values())
        say(f"warm-up: {len(warm):,} events, {warm_matched:,} messages")
        engine.publish(warm)
        wait_delivered(engine, sinks, warm_matched, time.time(), "warm-up")
        settle(engine, "warm-up")
        before = hook_totals(engine, hook_ids)
        for sink in sinks:
            sink.reset()
        del warm

        say(f"publishing {len(events):,} events ...")
        result["timed"] = True  # from here on the sinks hold the timed run's messages only
        mem.reset()
        meter = CpuMeter(engine_groups(pids, sinks, args.redis_url))
        meter.start()
        started = time.time()
        published_at = started
        for start in range(0, len(events), PUBLISH_CHUNK):
            chunk = events[start:start + PUBLISH_CHUNK]
            stamp = format_rfc3339_nano(time.time_ns())
            for e in chunk:
                e.event_date = stamp
            engine.publish(chunk)
            published_at = time.time()
            if (start // PUBLISH_CHUNK) % 40 == 0:
                say(f"  published {start + len(chunk):,}/{len(events):,}")
        result["accepted_per_s"] = len(events) / max(published_at - started, 1e-9)
        try:
            wait_delivered(engine, sinks, matched, started, "run", mem)
            # the CPU window ends with the delivery window (as soon as the polls see the
            # last message), before the engine settles: not the idle tail after it
            result["engine_cpu_us"] = meter.stop(matched)
            say(f"  run: {describe(result['engine_cpu_us'])}")
            settle(engine, "run")
        finally:
            mem.sample(everything=True)
            after = hook_totals(engine, hook_ids)
            result["totals"] = {f: after[f] - before[f] for f in STAT_FIELDS}
            total = sinks_total(sinks)
            result.update(delivered_unique=total["unique"],
                          engine_bytes_per_message=total["bytes"] / max(total["messages"], 1),
                          p50_ms=max((s["p50_ms"] or 0) for s in total["stats"]),
                          p99_ms=max((s["p99_ms"] or 0) for s in total["stats"]))
        result["delivered_per_s"] = total["unique"] / max(total["last"] - started, 1e-9)
    except BenchError as exc:
        result["error"] = str(exc)
        say(f"FAILED: {exc}")
    finally:
        if engine is not None:
            engine.shutdown()
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        client.close()
    return result


def check_engine(result: dict[str, Any], sinks: list[Sink]) -> None:
    """Ids at the sinks against the expected ones, and the engine's totals."""
    if not result.get("timed"):
        return  # failed before the timed run: nothing to compare
    say("checking the ids the sinks received ...")
    started = time.perf_counter()
    checked = check_ids(sinks, result["paths"], result["matches"], "b")
    say(f"  checked {checked['received']:,} received messages in "
        f"{time.perf_counter() - started:.1f} s")
    result.update(missing=checked["missing"], unexpected=checked["unexpected"],
                  duplicates=checked["duplicates"], lost=checked["missing"])
    totals, matched = result.get("totals", {}), result["matched"]
    problems = []
    if checked["missing"] or checked["unexpected"] or checked["duplicates"]:
        problems.append(f"{checked['missing']:,} missing, {checked['unexpected']:,} "
                        f"unexpected, {checked['duplicates']:,} duplicate messages")
    if totals and (totals["accepted"] != matched or totals["delivered"] != matched
                   or totals["dead_lettered"] or totals["retried"]):
        problems.append(f"engine totals {totals} for {matched:,} expected messages")
    if problems and result["error"] is None:
        result["error"] = "; ".join(problems)


# --- the ceiling ---------------------------------------------------------------------------


def ceiling_bodies(hooks: list[Hook], paths: dict[int, tuple[int, str]],
                   matches: dict[int, np.ndarray], events: list[Event]
                   ) -> list[tuple[int, str, bytes]]:
    """(sink, path, body) of every message the engine had to send, encoded by
    MessageBuilder, HTTP_BATCH per body, hooks interleaved."""
    per_hook = []
    for hook in hooks:
        idx = matches.get(hook.id or 0)
        if idx is None:
            continue
        builder = MessageBuilder(hook)
        sink, path = paths[hook.id or 0]
        order = idx.tolist()
        per_hook.append([(sink, path, http_body(builder.encode(
            [events[i] for i in order[s:s + HTTP_BATCH]])))
            for s in range(0, len(order), HTTP_BATCH)])
    return [job for row in zip_longest(*per_hook) for job in row if job is not None]


async def send_bodies(sinks: list[Sink], jobs: list[tuple[int, str, bytes]]) -> float:
    """POST every body (CEILING_CONCURRENCY in flight); seconds from the first request
    to the last answer. BenchError on any answer but 200 "OK"."""
    import aiohttp

    urls = [s.url("") for s in sinks]
    todo = iter(jobs)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for sink, path, body in todo:  # shared: each body is taken by one worker
            async with session.post(urls[sink] + path, data=body, headers=headers) as resp:
                text = await resp.read()
                if resp.status != 200 or text != b"OK":
                    raise BenchError(f"ceiling: the sink answered HTTP {resp.status}: "
                                     f"{text[:200]!r}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(CEILING_CONCURRENCY)))
        return time.perf_counter() - started


def wait_quiet(timeout: float = 30.0) -> None:
    """Wait until Ray's processes below this one have exited (after the engine's
    shutdown they may still be stopping, taking CPU from the ceiling), and say how busy
    the machine is."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    left: list[psutil.Process] = []
    while time.monotonic() < deadline:
        left = []
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE \
                        and "resource_tracker" not in " ".join(p.cmdline()):
                    left.append(p)
        if not left:
            break
        time.sleep(0.5)
    busy = psutil.cpu_percent(interval=1.0)
    names = set()
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.add(p.name())
    still = f"{len(left)} processes of the engine's run left ({', '.join(sorted(names))})" \
        if left else "the engine's processes are gone"
    say(f"ceiling: {still}; CPU {busy:.0f}% busy over 1 s")


def run_ceiling(args: argparse.Namespace, result: dict[str, Any], events: list[Event]
                ) -> None:
    wait_quiet()
    with released(events):
        say(f"ceiling: encoding {result['matched']:,} messages ...")
        jobs = ceiling_bodies(result["hooks"], result["paths"], result["matches"], events)
    messages = result["matched"]
    sinks = [Sink().start() for _ in range(args.sinks)]  # fresh ones
    try:
        warm = [(n % len(sinks), "/warm-up", body) for n, (_, _, body) in enumerate(jobs[:20])]
        asyncio.run(send_bodies(sinks, warm))
        for sink in sinks:
            sink.reset()
        say(f"ceiling: sending {messages:,} messages in {len(jobs):,} requests ...")
        meter = CpuMeter({"bench": [os.getpid()], "sinks": [s.pid for s in sinks],
                          "redis": [redis_pid_at(args.redis_url)]})
        with relaxed_gc():  # the collector as in the engine's transport actors
            meter.start()
            elapsed = asyncio.run(send_bodies(sinks, jobs))
            result["ceiling_cpu_us"] = meter.stop(messages)
        say(f"ceiling: {describe(result['ceiling_cpu_us'])}")
        total = sinks_total(sinks)
        checked = check_ids(sinks, result["paths"], result["matches"], "b")
    finally:
        for sink in sinks:
            sink.stop()
    result["ceiling"] = {"messages": messages, "requests": len(jobs),
                         "received_unique": total["unique"], **checked}
    result["bytes_per_message"] = total["bytes"] / max(total["messages"], 1)
    if total["unique"] != messages or checked["missing"] or checked["unexpected"] \
            or checked["duplicates"]:
        raise BenchError(f"ceiling: the sinks hold {total['unique']:,} unique of {messages:,} "
                         f"messages ({checked['missing']:,} missing, {checked['unexpected']:,} "
                         f"unexpected, {checked['duplicates']:,} duplicates)")
    result["ceiling_per_s"] = messages / max(elapsed, 1e-9)


# --- main ----------------------------------------------------------------------------------

JSON_KEYS = ("accepted_per_s", "delivered_per_s", "ceiling_per_s", "ratio", "p50_ms", "p99_ms",
             "peak_rss_mb", "matched", "delivered_unique", "lost", "events", "missing",
             "unexpected", "duplicates", "engine_pss_mb", "bench_pss_mb", "sinks_pss_mb",
             "ray_pss_mb", "redis_growth_mb", "memory_metric", "totals", "engine_processes",
             "engine_bytes_per_message", "bytes_per_message", "ceiling", "engine_cpu_us",
             "ceiling_cpu_us", "budget_us", "error", "ceiling_error")
RATE_KEYS = ("accepted_per_s", "delivered_per_s", "ratio", "p50_ms", "p99_ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--http-pool", type=int, default=1)
    parser.add_argument("--sinks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--chart", metavar="PATH")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a plain kill too
    say(f"generating {args.events:,} events and {HOOKS} hooks ...")
    events = make_events(args.events, args.seed)
    mem = Memory(args.redis_url)
    sinks = [Sink().start() for _ in range(args.sinks)]
    mem.sink_pids = {s.pid for s in sinks if s.pid is not None}
    mem.start()
    try:
        try:
            result = run_engine(args, sinks, mem, events)
        finally:
            mem.stop()
        result.update(mem.figures())
        check_engine(result, sinks)
    finally:
        for sink in sinks:
            sink.stop()
    if result["error"] is None:
        try:
            run_ceiling(args, result, events)
        except BenchError as exc:
            result["ceiling_error"] = str(exc)
            say(f"FAILED: {exc}")
    else:
        result["ceiling_error"] = "not measured: the engine run failed"
    events.clear()
    if result["error"] is not None:
        for key in RATE_KEYS:
            result[key] = None
    if result.get("ceiling_per_s") is None or result.get("delivered_per_s") is None:
        result["ratio"] = None
    else:
        result["ratio"] = result["delivered_per_s"] / result["ceiling_per_s"]
        result["budget_us"] = round(budget_us(CORES, TARGET_RATIO * result["ceiling_per_s"]), 2)
    report(result, args)
    ok = result["error"] is None and result.get("ceiling_error") is None
    return 0 if ok else 1


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "null" if value is None else format(value, spec)


def _machine(cpu: dict[str, float] | None) -> float | None:
    return (cpu or {}).get("machine")


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    r = {k: result.get(k) for k in JSON_KEYS}
    rows = [
        ("events", _fmt(r["events"], ",")),
        ("matched messages", _fmt(r["matched"], ",")),
        ("accepted events/s", _fmt(r["accepted_per_s"])),
        ("delivered messages/s", _fmt(r["delivered_per_s"])),
        ("raw HTTP ceiling msg/s", _fmt(r["ceiling_per_s"])),
        ("ratio delivered/ceiling", _fmt(r["ratio"], ".2f")),
        ("burst latency p50/p99 ms", f"{_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])}"),
        ("bytes/message engine/ceil", f"{_fmt(r['engine_bytes_per_message'])} / "
                                      f"{_fmt(r['bytes_per_message'])}"),
        (f"peak {r['memory_metric'] or 'pss'} MB, engine actors",
         f"{_fmt(r['engine_pss_mb'])} ({len(r['engine_processes'] or {})} processes)"),
        ("  bench process", _fmt(r["bench_pss_mb"])),
        ("  sinks", _fmt(r["sinks_pss_mb"])),
        ("  Ray daemons, idle workers", _fmt(r["ray_pss_mb"])),
        ("  Redis used_memory growth", _fmt(r["redis_growth_mb"])),
        ("engine totals", " ".join(f"{k}={v:,}" for k, v in (r["totals"] or {}).items())),
        ("missing / unexpected / dup", f"{_fmt(r['missing'], ',')} / "
                                       f"{_fmt(r['unexpected'], ',')} / "
                                       f"{_fmt(r['duplicates'], ',')}"),
        ("lost", _fmt(r["lost"], ",")),
        ("CPU µs/message engine/ceil", f"{_fmt(_machine(r['engine_cpu_us']), '.2f')} / "
                                       f"{_fmt(_machine(r['ceiling_cpu_us']), '.2f')}"),
        (f"  budget at ratio {TARGET_RATIO}", _fmt(r["budget_us"], ".2f")),
    ]
    print()
    for label, value in rows:
        print(f"{label:<30}{value:>24}")
    if r["ceiling"]:
        c = r["ceiling"]
        print(f"{'ceiling check':<30}{c['received_unique']:>13,} received, {c['missing']:,} "
              f"missing, {c['unexpected']:,} unexpected, {c['duplicates']:,} duplicates")
    for key in ("error", "ceiling_error"):
        if r[key]:
            print(f"{key.replace('_', ' ')}: {r[key]}")
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)
            fh.write("\n")
    if args.chart and r["ratio"] is not None:
        _chart(r, args.chart)


def _chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["accepted events/s", "delivered msg/s", "raw HTTP ceiling msg/s"]
    values = [result["accepted_per_s"], result["delivered_per_s"], result["ceiling_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=["#4c72b0", "#55a868", "#c44e52"])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values])
    ax.set_title(f"hookray throughput: {result['events']:,} events, {HOOKS} hooks "
                 f"(ratio {result['ratio']:.2f})")
    ax.set_ylabel("per second")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
