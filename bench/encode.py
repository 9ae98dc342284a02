"""Message build + custom_data rendering + encoding throughput.

    python -m bench.encode [--messages N] [--json PATH]

Two hookray paths: ``MessageBuilder`` one message at a time (the reference, used by
test events), and the partition's column-wise assembly (``engine.assembly``: a
round of 5,000 events, messages made in chunks of 1,000 as a partition does).
Baseline, in the same run: the same messages built as plain dicts with the
templates substituted by ``str.replace`` and encoded with the standard ``json``.
``ratio`` is the assembly's rate over the baseline's.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from bench.workload import CUSTOM_PAIRS, make_events, make_hook, make_names
from engine.assembly import Assembler, Round
from engine.catalogue import load_catalogue
from engine.customdata import format_event_date
from engine.events import Event
from engine.messages import MessageBuilder, http_body


def _baseline(events: list[Event], names: dict[int, str]) -> int:
    total = 0
    for e in events:
        cd = {"email": (e.profile or {}).get("email")}
        for key, tmpl in CUSTOM_PAIRS.items():
            cd[key] = (tmpl.replace("{{campaign_name}}", names.get(e.campaign_id or 0, ""))
                       .replace("{{uuid}}", str(uuid.uuid4()))
                       .replace("{{event_date_ymd}}", e.event_date[:10])
                       .replace("{{event_date_unix}}", str(e.date_ns // 1_000_000_000))
                       .replace("{{event_date}}", format_event_date(e.date_ns))
                       .replace("{{database_name}}", f"Database {e.list_id}"))
        msg = {"event_type": e.event_type, "event_date": e.event_date,
               "account_id": e.account_id, "is_test": e.is_test, "list_id": e.list_id,
               "profile_id": e.profile_id, "_xxh": e.xxh, "event_data": e.event_data,
               "custom_data": cd}
        total += len(json.dumps(msg))
    return total


def run(n: int) -> dict[str, float]:
    events = make_events(n)
    builder = MessageBuilder(make_hook(1), make_names())
    t0 = time.perf_counter()
    body = http_body(builder.encode(events))
    builder_s = time.perf_counter() - t0
    catalogue, names = load_catalogue(), make_names()
    assembler = Assembler(make_hook(1), names, catalogue)
    t0 = time.perf_counter()
    for start in range(0, n, 5_000):
        rnd = Round(events[start:start + 5_000], catalogue, names, {})
        size = len(rnd.events)
        for chunk in range(0, size, 1_000):
            assembler.assemble(rnd, list(range(chunk, min(chunk + 1_000, size))))
    engine_s = time.perf_counter() - t0
    plain_names = {cid: f"Campaign {cid}" for cid in range(1, 200)}
    t0 = time.perf_counter()
    _baseline(events, plain_names)
    base_s = time.perf_counter() - t0
    return {
        "messages": n,
        "messages_per_s": n / engine_s,
        "builder_messages_per_s": n / builder_s,
        "baseline_messages_per_s": n / base_s,
        "ratio": base_s / engine_s,
        "bytes_per_message": len(body) / n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    result = run(args.messages)
    print(f"{'path':<34}{'messages/s':>14}")
    print(f"{'hookray assembly (partition)':<34}{result['messages_per_s']:>14,.0f}")
    print(f"{'hookray MessageBuilder.build':<34}{result['builder_messages_per_s']:>14,.0f}")
    print(f"{'baseline dicts + json.dumps':<34}{result['baseline_messages_per_s']:>14,.0f}")
    print(f"ratio {result['ratio']:.2f}x  ({result['bytes_per_message']:.0f} bytes/message)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
