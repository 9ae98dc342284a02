"""End-to-end throughput of the engine on a generated workload.

    python -m bench.throughput [--events N] [--json PATH] [--chart PATH]

Workload (seeded, reproducible): N events (default 1,000,000) over 50 databases
of 5 accounts and every event category; 100 hooks with mixed scope, actions and
filters, HTTP batch targets on local counting sinks (separate processes).
Reported: accepted events/s (publish → in the intake), delivered messages/s
(first publish → last message at a sink), intake→receiver latency p50/p99, peak
RSS of every hookray process, and the raw HTTP ceiling: the same sinks fed the
same number of pre-encoded 100-message batches by a bare aiohttp client, in the
same run. ``lost`` counts matched messages never seen at a sink (by id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from typing import Any

import psutil
import redis

from bench.sink import Sink
from engine.catalogue import load_catalogue
from engine.customdata import format_rfc3339_nano
from engine.events import Event
from engine.matching import EventColumns, HookIndex
from engine.settings import Settings

ACCOUNTS, DATABASES, HOOKS = 5, 50, 100
PUBLISH_CHUNK = 5_000


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
            "target": {"http_batch": {"url": sinks[i % len(sinks)].url(f"/h{i}"),
                                      "max_batch_size": 100, "flush_timeout_sec": 0.2}},
        })
    return hooks


def make_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    codes = load_catalogue().codes()
    date = "2026-11-29T00:00:00Z"
    events = []
    for i in range(n):
        list_id = rng.randrange(1, DATABASES + 1)
        events.append(Event(
            id=f"b{i}", event_type=codes[rng.randrange(len(codes))], event_date=date,
            account_id=1 + list_id % ACCOUNTS, list_id=list_id, profile_id=f"p{i % 10_000}",
            event_data={"campaign_id": rng.randrange(1, 21), "message_id": rng.randrange(1, 31),
                        "segment_id": rng.randrange(0, 11), "resource_id": rng.randrange(1, 6),
                        "pixel_id": rng.randrange(1, 4)},
            profile={"email": f"user{i % 10_000}@example.org"},
        ))
    return events


def expected_matches(hooks: list[Any], events: list[Event]) -> int:
    catalogue = load_catalogue()
    index = HookIndex.compile(hooks, catalogue)
    return sum(len(v) for v in index.match(EventColumns.from_events(events, catalogue)).values())


class Memory:
    """Peak summed RSS of this process and its children (Ray workers, sinks)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.peak_mb = 0.0

    def sample(self) -> None:
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_mb = max(self.peak_mb, total / 2**20)


def _sinks_total(sinks: list[Sink]) -> dict[str, Any]:
    stats = [s.stats() for s in sinks]
    return {"unique": sum(s["unique"] for s in stats),
            "messages": sum(s["messages"] for s in stats),
            "last": max(s["last"] for s in stats), "stats": stats}


def run_engine(args: argparse.Namespace, sinks: list[Sink], mem: Memory) -> dict[str, Any]:
    from actors.driver import Engine

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    prefix = f"bench{os.getpid()}"
    settings = Settings(REDIS_URL=url, REDIS_PREFIX=prefix, PARTITIONS=args.partitions,
                        HTTP_POOL_SIZE=args.http_pool)
    print(f"generating {args.events:,} events and {HOOKS} hooks ...", flush=True)
    events = make_events(args.events, args.seed)
    engine = Engine.start(settings)
    try:
        hooks = [engine.create_hook(h) for h in make_hooks(sinks, args.seed)]
        matched = expected_matches(hooks, events)
        print(f"{matched:,} (event, hook) matches expected; publishing ...", flush=True)
        time.sleep(0.5)
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
                mem.sample()
                print(f"  published {start + len(chunk):,}/{len(events):,}", flush=True)
        accepted_s = published_at - started
        result = _wait_delivered(sinks, matched, started, mem)
        result.update(accepted_per_s=len(events) / accepted_s, matched=matched,
                      events=len(events), totals=engine.totals())
        return result
    finally:
        engine.shutdown()
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(f"{prefix}:*", count=1000):
            client.delete(key)


def _wait_delivered(sinks: list[Sink], matched: int, started: float, mem: Memory
                    ) -> dict[str, Any]:
    last_progress, last_unique = time.monotonic(), -1
    while True:
        time.sleep(1.0)
        mem.sample()
        total = _sinks_total(sinks)
        rate = total["unique"] / max(time.time() - started, 1e-9)
        print(f"  delivered {total['unique']:,}/{matched:,} ({rate:,.0f} msg/s), "
              f"peak RSS {mem.peak_mb:,.0f} MB", flush=True)
        if total["unique"] >= matched:
            break
        if total["unique"] != last_unique:
            last_progress, last_unique = time.monotonic(), total["unique"]
        elif time.monotonic() - last_progress > 60:
            print("  no progress for 60 s; stopping", flush=True)
            break
    p50 = max(s["p50_ms"] or 0 for s in total["stats"])
    p99 = max(s["p99_ms"] or 0 for s in total["stats"])
    return {"delivered_per_s": total["unique"] / max(total["last"] - started, 1e-9),
            "delivered_unique": total["unique"], "lost": max(matched - total["unique"], 0),
            "p50_ms": p50, "p99_ms": p99}


async def _ceiling(sinks: list[Sink], messages: int, concurrency: int = 32) -> float:
    import aiohttp

    part = json.dumps({"event_type": "click", "event_date": format_rfc3339_nano(time.time_ns()),
                       "account_id": 1, "is_test": False, "list_id": 3,
                       "event_data": {"campaign_id": 7, "message_id": 3, "segment_id": 0},
                       "custom_data": {"email": "user1@example.org", "cname": "Campaign 7",
                                       "day": "2026-11-29"}, "hook_message_id": "X" * 24})
    batches = max(1, messages // 100)
    bodies = [("[" + ",".join(part.replace("X" * 24, f"{b:012d}{i:012d}")
                              for i in range(100)) + "]").encode() for b in range(batches)]
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            async with session.post(sinks[i % len(sinks)].url(f"/c{i % 100}"), data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return batches * 100 / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--http-pool", type=int, default=1)
    parser.add_argument("--sinks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--chart", metavar="PATH")
    args = parser.parse_args(argv)
    mem = Memory()
    sinks = [Sink().start() for _ in range(args.sinks)]
    try:
        result = run_engine(args, sinks, mem)
        for sink in sinks:
            sink.reset()
        print("measuring the raw HTTP ceiling ...", flush=True)
        result["ceiling_per_s"] = asyncio.run(_ceiling(sinks, min(result["matched"], 500_000)))
    finally:
        for sink in sinks:
            sink.stop()
    result["ratio"] = result["delivered_per_s"] / result["ceiling_per_s"]
    result["peak_rss_mb"] = mem.peak_mb
    _report(result, args)
    return 0 if result["lost"] == 0 else 1


def _report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{'events':<28}{result['events']:>14,}")
    print(f"{'matched messages':<28}{result['matched']:>14,}")
    print(f"{'accepted events/s':<28}{result['accepted_per_s']:>14,.0f}")
    print(f"{'delivered messages/s':<28}{result['delivered_per_s']:>14,.0f}")
    print(f"{'raw HTTP ceiling msg/s':<28}{result['ceiling_per_s']:>14,.0f}")
    print(f"{'ratio delivered/ceiling':<28}{result['ratio']:>14.2f}")
    print(f"{'latency p50 / p99 ms':<28}{result['p50_ms']:>7,.0f} /{result['p99_ms']:>5,.0f}")
    print(f"{'peak RSS MB':<28}{result['peak_rss_mb']:>14,.0f}")
    print(f"{'lost':<28}{result['lost']:>14,}")
    keys = ("accepted_per_s", "delivered_per_s", "ceiling_per_s", "ratio", "p50_ms", "p99_ms",
            "peak_rss_mb", "matched", "delivered_unique", "lost")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: result[k] for k in keys}, fh, indent=2)
    if args.chart:
        _chart(result, args.chart)


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
