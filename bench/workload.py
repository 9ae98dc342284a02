"""Reproducible generated events and hooks shared by the benchmarks."""

from __future__ import annotations

import random
from typing import Any

from engine.catalogue import load_catalogue
from engine.events import Event
from engine.hooks import Hook, parse_hook
from engine.names import NameCatalogue

CUSTOM_PAIRS = {
    "cname": "{{campaign_name}}",
    "eventTime": "{{event_date_ymd}}",
    "eventTimeUnix": "{{event_date_unix}}",
    "id": "{{uuid}}",
    "when": "{{event_date}}",
    "db": "{{database_name}}",
}


def make_events(n: int, *, accounts: int = 5, databases: int = 50, seed: int = 1) -> list[Event]:
    """``n`` events over ``databases`` databases and every event category."""
    rng = random.Random(seed)
    codes = load_catalogue().codes()
    events = []
    for i in range(n):
        list_id = rng.randrange(1, databases + 1)
        events.append(Event(
            id=f"e{seed}-{i}",
            event_type=codes[i % len(codes)],
            event_date=f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:07.{i:09d}Z"[:37],
            account_id=1 + list_id % accounts,
            list_id=list_id,
            profile_id=f"p{rng.randrange(1_000_000):08d}",
            xxh=f"{rng.getrandbits(64):016x}",
            event_data={"message_id": rng.randrange(1, 40), "campaign_id": rng.randrange(1, 200),
                        "segment_id": rng.randrange(0, 20), "resource_id": rng.randrange(1, 10)},
            profile={"email": f"user{i}@example.org", "first_name": "Ann"},
            send_id=f"s{i}",
        ))
    return events


def make_names(accounts: int = 5) -> NameCatalogue:
    names = NameCatalogue()
    for account in range(1, accounts + 1):
        for cid in range(1, 200):
            names.upsert(account, "campaigns", cid, name=f"Campaign {cid}", subid=f"sub{cid}")
        for lid in range(1, 51):
            names.upsert(account, "databases", lid, name=f"Database {lid}")
    return names


def hook_data(i: int, *, account_id: int = 1, url: str = "http://127.0.0.1:9/hook",
              **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": i, "name": f"hook {i}", "active": True, "account_id": account_id,
        "actions": load_catalogue().codes(),
        "custom_data": {"fields": ["email"], "pairs": CUSTOM_PAIRS},
        "target": {"http_batch": {"url": url}},
    }
    data.update(extra)
    return data


def make_hook(i: int, **kwargs: Any) -> Hook:
    return parse_hook(hook_data(i, **kwargs))
