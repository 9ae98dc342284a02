"""Benchmark: vectorized hook matching (engine.matching.HookIndex) vs the reference loop.

    python -m bench.match [--events N] [--hooks H] [--json PATH] [--seed S]
                          [--reference-events R] [--sparse-ids]

The workload is reproducible (numpy RNG seeded): ~20 accounts with skewed
traffic, ~50 databases, every catalogue event type, hooks scoped to "all" or
one database with 1-5 actions and 0-3 filter kinds. Event columns are built
directly as arrays; the first R events are also turned into ``Event`` objects
and back (``EventColumns.from_events``) to check the arrays are real events.

Exits non-zero when the reference loop disagrees with ``HookIndex.match`` on
the first R events.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

from engine.catalogue import EventCatalogue, load_catalogue
from engine.events import Event
from engine.hooks import FILTER_KINDS, Hook, parse_hook
from engine.matching import EventColumns, HookIndex, reference_match

T = TypeVar("T")

N_ACCOUNTS = 20
N_DATABASES = 50
# distinct ids per account, per dimension
DOMAIN = {"resources": 3, "campaigns": 20, "templates": 30, "segments": 15, "pixels": 3}
CATEGORY_SHARE = {"delivery": 0.55, "tracking": 0.35, "import": 0.05, "pixel": 0.05}
FILTER_KIND_COUNT_P = [0.45, 0.35, 0.15, 0.05]  # P(a hook has 0, 1, 2, 3 filter kinds)
SEGMENTS_PER_EVENT_P = [0.4, 0.35, 0.2, 0.05]  # P(an event is in 0, 1, 2, 3 segments)
SINK = {"http_batch": {"url": "http://127.0.0.1:9/hook"}}


@dataclass
class World:
    """Accounts, their databases and their id domains."""

    accounts: np.ndarray  # account ids
    weights: np.ndarray  # share of traffic (and of hooks) per account
    db_ids: np.ndarray  # database ids, grouped by account
    db_start: np.ndarray  # first database of each account in db_ids
    db_count: np.ndarray  # number of databases of each account
    domains: dict[str, np.ndarray]  # kind -> (accounts x DOMAIN[kind]) ids


def make_world(rng: np.random.Generator, sparse_ids: bool = False) -> World:
    """Auto-increment-like ids shared by all accounts, or ids spread over 2**40 (sparse)."""
    accounts = _ids(rng, N_ACCOUNTS, sparse_ids)
    weights = 1.0 / np.arange(1, N_ACCOUNTS + 1) ** 0.8
    owner = np.r_[np.arange(N_ACCOUNTS), rng.integers(0, N_ACCOUNTS, N_DATABASES - N_ACCOUNTS)]
    owner.sort()
    db_ids = _ids(rng, N_DATABASES, sparse_ids)
    db_count = np.bincount(owner, minlength=N_ACCOUNTS)
    db_start = np.r_[0, np.cumsum(db_count)[:-1]]
    domains = {kind: _ids(rng, N_ACCOUNTS * size, sparse_ids).reshape(N_ACCOUNTS, size)
               for kind, size in DOMAIN.items()}
    return World(accounts, weights / weights.sum(), db_ids, db_start, db_count, domains)


def _ids(rng: np.random.Generator, n: int, sparse: bool) -> np.ndarray:
    """``n`` distinct ids in random order: from 1..2n (some ids deleted) or from 1..2**40."""
    high = 2**40 if sparse else 2 * n + 1
    ids = np.unique(rng.integers(1, high, 4 * n)) if sparse else np.arange(1, high)
    return rng.permutation(ids)[:n].astype(np.int64)


# ---------------------------------------------------------------------------
# hooks


def make_hooks(
    rng: np.random.Generator, world: World, n: int, catalogue: EventCatalogue
) -> list[Hook]:
    codes = catalogue.codes()
    acct = rng.choice(N_ACCOUNTS, n, p=world.weights)
    hooks = []
    for i in range(n):
        a = int(acct[i])
        n_actions = int(rng.integers(1, 6))
        actions = [codes[j] for j in rng.choice(len(codes), n_actions, replace=False)]
        hooks.append(parse_hook({
            "id": i,
            "name": f"hook-{i}",
            "active": bool(rng.random() < 0.9),
            "account_id": int(world.accounts[a]),
            "database": _hook_database(rng, world, a),
            "actions": actions,
            "filters": _hook_filters(rng, world, a),
            "target": SINK,
        }, catalogue))
    return hooks


def _hook_database(rng: np.random.Generator, world: World, a: int) -> str | int:
    if rng.random() < 0.4:
        return "all"
    return int(world.db_ids[world.db_start[a] + rng.integers(world.db_count[a])])


def _hook_filters(rng: np.random.Generator, world: World, a: int) -> dict[str, list[int]]:
    n_kinds = rng.choice(len(FILTER_KIND_COUNT_P), p=FILTER_KIND_COUNT_P)
    kinds = rng.choice(FILTER_KINDS, n_kinds, replace=False)
    filters = {}
    for kind in kinds:
        domain = world.domains[str(kind)][a]
        size = int(rng.integers(1, min(4, len(domain)) + 1))
        filters[str(kind)] = sorted(int(v) for v in rng.choice(domain, size, replace=False))
    return filters


# ---------------------------------------------------------------------------
# events


def make_events(
    rng: np.random.Generator, world: World, n: int, catalogue: EventCatalogue
) -> EventColumns:
    acct = rng.choice(N_ACCOUNTS, n, p=world.weights)
    category = rng.choice(list(CATEGORY_SHARE), n, p=list(CATEGORY_SHARE.values()))
    event_type = np.empty(n, np.int32)
    for cat in CATEGORY_SHARE:
        where = np.flatnonzero(category == cat)
        type_ids = np.array([catalogue.index(c) for c in catalogue.by_category(cat)], np.int32)
        event_type[where] = rng.choice(type_ids, len(where))
    messaging = np.isin(category, ["delivery", "tracking"])
    db = world.db_start[acct] + (rng.random(n) * world.db_count[acct]).astype(np.int64)
    list_id = np.where(rng.random(n) < 0.95, world.db_ids[db], -1)
    resource = np.where(messaging | (rng.random(n) < 0.5), _pick(rng, world, "resources", acct), -1)
    seg_counts = rng.choice(len(SEGMENTS_PER_EVENT_P), n, p=SEGMENTS_PER_EVENT_P)
    return EventColumns(
        account_id=world.accounts[acct].astype(np.int64),
        list_id=list_id.astype(np.int64),
        event_type=event_type,
        resource_id=resource.astype(np.int64),
        campaign_id=np.where(messaging, _pick(rng, world, "campaigns", acct), -1),
        template_id=np.where(messaging, _pick(rng, world, "templates", acct), -1),
        pixel_id=np.where(category == "pixel", _pick(rng, world, "pixels", acct), -1),
        segment_values=_pick(rng, world, "segments", np.repeat(acct, seg_counts)),
        segment_offsets=np.r_[0, np.cumsum(seg_counts)].astype(np.int64),
    )


def _pick(rng: np.random.Generator, world: World, kind: str, acct: np.ndarray) -> np.ndarray:
    domain = world.domains[kind]
    return domain[acct, rng.integers(0, domain.shape[1], len(acct))].astype(np.int64)


def to_events(cols: EventColumns, catalogue: EventCatalogue) -> list[Event]:
    codes = catalogue.codes()
    events = []
    for i in range(len(cols)):
        def opt(column: np.ndarray, i: int = i) -> int | None:
            value = int(column[i])
            return None if value < 0 else value

        segments = cols.segments_of(i).tolist()
        events.append(Event(
            event_type=codes[int(cols.event_type[i])],
            event_date="2024-01-01T00:00:00Z",
            account_id=int(cols.account_id[i]),
            list_id=opt(cols.list_id),
            resource_id=opt(cols.resource_id),
            campaign_id=opt(cols.campaign_id),
            message_id=opt(cols.template_id),
            pixel_id=opt(cols.pixel_id),
            segment_ids=segments or None,
        ))
    return events


# ---------------------------------------------------------------------------
# checks and timing


def same_columns(a: EventColumns, b: EventColumns) -> bool:
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def restrict(result: dict[int, np.ndarray], n_events: int) -> dict[int, np.ndarray]:
    """The matches of ``result`` among the first ``n_events`` events."""
    out = {h: ev[ev < n_events] for h, ev in result.items()}
    return {h: ev for h, ev in out.items() if len(ev)}


def same_result(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[h], b[h]) for h in a)


def best_of(repeat: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Shortest wall time of ``repeat`` calls, and the last call's result."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    catalogue = load_catalogue()
    rng = np.random.default_rng(args.seed)
    world = make_world(rng, args.sparse_ids)
    hooks = make_hooks(rng, world, args.hooks, catalogue)
    cols = make_events(rng, world, args.events, catalogue)
    n_ref = min(args.reference_events, args.events)
    problems = []
    prefix = cols.slice(0, n_ref)
    if not same_columns(EventColumns.from_events(to_events(prefix, catalogue), catalogue), prefix):
        problems.append("EventColumns.from_events does not reproduce the generated columns")

    compile_s, index = best_of(3, lambda: HookIndex.compile(hooks, catalogue))
    match_s, result = best_of(3, lambda: index.match(cols))
    ref_s, expected = best_of(1, lambda: reference_match(hooks, prefix, catalogue))
    if not same_result(restrict(result, n_ref), expected):
        problems.append(f"reference_match disagrees with HookIndex.match on {n_ref} events")

    events_per_s = args.events / match_s
    ref_per_s = n_ref / ref_s
    figures = {
        "events_per_s": events_per_s,
        "reference_events_per_s": ref_per_s,
        "ratio": events_per_s / ref_per_s,
        "events": args.events,
        "hooks": args.hooks,
        "active_hooks": len(index.hooks),
        "reference_events": n_ref,
        "matches": int(sum(len(v) for v in result.values())),
        "reference_matches": int(sum(len(v) for v in expected.values())),
        "compile_s": compile_s,
    }
    return figures, problems


def table(f: dict[str, Any]) -> str:
    rows = [
        ("HookIndex.match", f"{f['events']:,}", f"{f['events_per_s']:,.0f}", f"{f['matches']:,}"),
        ("reference_match", f"{f['reference_events']:,}", f"{f['reference_events_per_s']:,.0f}",
         f"{f['reference_matches']:,}"),
    ]
    head = ("", "events", "events/s", "matches")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
             strict=True))) for r in [head, *rows]]
    lines.append(f"ratio {f['ratio']:,.0f}x   hooks {f['hooks']:,} ({f['active_hooks']:,} active)"
                 f"   compile {f['compile_s'] * 1e3:,.1f} ms")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.match",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=_positive, default=200_000)
    parser.add_argument("--hooks", type=_positive, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-events", type=_positive, default=2_000, metavar="R",
                        help="events the reference loop runs on (a prefix)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    parser.add_argument("--sparse-ids", action="store_true",
                        help="ids spread over 2**40 (hash-table lookups instead of tables)")
    args = parser.parse_args(argv)
    figures, problems = run(args)
    print(table(figures))
    if args.json:
        keys = ("events_per_s", "reference_events_per_s", "ratio", "events", "hooks",
                "reference_events", "matches", "compile_s")
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({k: figures[k] for k in keys}, fh, indent=2)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
