"""RabbitMQ client publish throughput (persistent messages + publisher confirms).

    python -m bench.rabbit_clients [--messages N] [--rounds R] [--batch B]
                                   [--url AMQP_URL] [--json PATH]

What it measures: each client publishes N hook messages (built by the engine's
``MessageBuilder``, ~500 bytes of JSON each) to a durable queue through the
default exchange, ``delivery_mode=2``, ``content_type=application/json``, a
``message_id`` per message, on one channel in publisher-confirm mode. Messages are
pipelined: B publishes are started at once (default B = N, all of them) and their
confirms awaited together — never one round trip per message. Time runs from the
first publish to the last confirm; the queue is checked to hold N messages, then
purged. Every client gets a warm-up batch first, and the clients take turns, R
rounds each; the figure reported is the median round.

Clients, on the same connection settings and the same bodies:

* ``aio-pika``        ``Exchange.publish(Message(...))`` — the baseline;
* ``aiormq``          ``Channel.basic_publish(...)`` with aiormq's default
                      ``wait=True`` (each publish waits for its frame to be drained
                      to the socket before the next one may be queued);
* ``aiormq-nowait``   ``Channel.basic_publish(..., wait=False)``: frames are queued
                      for the writer and only the confirm is awaited (aiormq's
                      fastest public way, one coroutine and socket write a message);
* ``aiormq-batch``    the frames of all B messages written at once on an aiormq
                      channel by ``engine.transports.amqp_batch.publish_all``, their
                      confirms settled by aiormq — the write path the transport uses,
                      with nothing of the transport around it;
* ``hookray``         the engine's ``RabbitQueueTransport.send`` with one
                      ``Delivery`` per B messages — the transport's own overhead
                      over the raw client it uses (``x aiormq-batch``).

How to read it: ``msg/s`` is wall-clock throughput; ``cpu us/msg`` is this
process's CPU time per message — the part the transport actor pays for. The broker
runs on the same machine, so on a small host it competes for the cores; compare
``cpu us/msg`` when ``msg/s`` is close. ``x aio-pika`` is each client's msg/s over
aio-pika's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aio_pika
import aiormq
from yarl import URL

from bench.workload import make_events, make_hook, make_names
from engine.hooks import RabbitQueue
from engine.messages import MessageBuilder, encode_message
from engine.transports.amqp_batch import publish_all
from engine.transports.base import Delivery
from engine.transports.rabbitmq import RabbitQueueTransport

DEFAULT_URL = os.environ.get("HOOKRAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BASELINE = "aio-pika"
RAW = "aiormq-batch"  # the raw client the transport is compared with
WARMUP = 500

Publish = Callable[[list[tuple[bytes, str]]], Awaitable[None]]


def make_bodies(n: int) -> list[tuple[bytes, str]]:
    """``n`` (encoded message, message id) pairs, ~500 bytes each."""
    builder = MessageBuilder(make_hook(1), make_names())
    events = make_events(min(n, 5_000))
    out = []
    for i in range(n):
        msg = builder.build(events[i % len(events)])
        out.append((encode_message(msg), f"{msg.hook_message_id}-{i}"))
    return out


async def _aio_pika(url: str, queue: str) -> tuple[Publish, Callable[[], Awaitable[Any]]]:
    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=True)
    exchange = channel.default_exchange

    async def publish(batch: list[tuple[bytes, str]]) -> None:
        await asyncio.gather(*(exchange.publish(
            aio_pika.Message(body, content_type="application/json", message_id=mid,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue, mandatory=True) for body, mid in batch))

    return publish, conn.close


async def _aiormq(url: str, queue: str, wait: bool) -> tuple[Publish,
                                                            Callable[[], Awaitable[Any]]]:
    conn = await aiormq.connect(url)
    channel = cast(aiormq.Channel, await conn.channel(publisher_confirms=True))

    async def publish(batch: list[tuple[bytes, str]]) -> None:
        await asyncio.gather(*(channel.basic_publish(
            body, exchange="", routing_key=queue, mandatory=True, wait=wait,
            properties=aiormq.spec.Basic.Properties(
                content_type="application/json", delivery_mode=2, message_id=mid))
            for body, mid in batch))

    return publish, conn.close


async def publish_confirmed(channel: aiormq.Channel, exchange: str, keys: list[str],
                            bodies: list[bytes], ids: list[str]) -> None:
    """``publish_all`` as the transports publish (persistent JSON; ``mandatory`` to a
    queue, not to an exchange); raises unless the broker confirmed every message."""
    results = await publish_all(channel, exchange, keys, bodies, ids,
                                content_type="application/json", delivery_mode=2,
                                mandatory=not exchange)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} message(s) not confirmed: {failed[0]!r}")


async def _aiormq_batch(url: str, queue: str) -> tuple[Publish,
                                                      Callable[[], Awaitable[Any]]]:
    conn = await aiormq.connect(url)
    channel = cast(aiormq.Channel, await conn.channel(publisher_confirms=True))

    async def publish(batch: list[tuple[bytes, str]]) -> None:
        await publish_confirmed(channel, "", [queue] * len(batch),
                                [body for body, _ in batch], [mid for _, mid in batch])

    return publish, conn.close


async def _hookray(url: str, queue: str) -> tuple[Publish, Callable[[], Awaitable[Any]]]:
    parsed = URL(url)
    transport = RabbitQueueTransport(timeout_sec=600)
    target = RabbitQueue.model_validate({
        "host": parsed.host or "127.0.0.1", "port": parsed.port or 5672,
        "user": parsed.user or "guest", "password": parsed.password or "guest",
        "vhost": parsed.path[1:] or "/", "queue": queue})

    async def publish(batch: list[tuple[bytes, str]]) -> None:
        delivery = Delivery(id="bench", hook_id=1, account_id=1, kind="rabbitmq_queue",
                            parts=[body for body, _ in batch],
                            message_ids=[mid for _, mid in batch])
        outcome = await transport.send(target, delivery)
        if not outcome.ok:
            raise SystemExit(f"hookray: {outcome.describe()}")

    return publish, transport.close


CLIENTS: dict[str, Callable[[str, str], Awaitable[tuple[Publish, Any]]]] = {
    "aio-pika": _aio_pika,
    "aiormq": lambda url, q: _aiormq(url, q, wait=True),
    "aiormq-nowait": lambda url, q: _aiormq(url, q, wait=False),
    "aiormq-batch": _aiormq_batch,
    "hookray": _hookray,
}


async def _run(name: str, url: str, queue: str, bodies: list[tuple[bytes, str]],
               batch: int, admin: aiormq.abc.AbstractChannel) -> tuple[float, float]:
    publish, close = await CLIENTS[name](url, queue)
    try:
        await publish(bodies[:WARMUP])
        await admin.queue_purge(queue)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for start in range(0, len(bodies), batch):
            await publish(bodies[start:start + batch])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await close()
    declared = await admin.queue_declare(queue, passive=True)
    if declared.message_count != len(bodies):
        raise SystemExit(f"{name}: queue holds {declared.message_count} messages, "
                         f"expected {len(bodies)}")
    await admin.queue_purge(queue)
    return len(bodies) / wall, cpu / len(bodies) * 1e6


async def bench(url: str, messages: int, rounds: int, batch: int) -> dict[str, Any]:
    bodies = make_bodies(messages)
    queue = f"bench-rabbit-clients-{uuid.uuid4().hex[:8]}"
    admin_conn = await aiormq.connect(url)
    admin = await admin_conn.channel()
    await admin.queue_declare(queue, durable=True)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    try:
        for _ in range(rounds):
            for name in CLIENTS:
                runs[name].append(await _run(name, url, queue, bodies, batch, admin))
    finally:
        await admin.queue_delete(queue)
        await admin_conn.close()
    summary: dict[str, Any] = {"messages": messages, "rounds": rounds, "batch": batch,
                               "bytes_per_message": round(
                                   sum(len(b) for b, _ in bodies) / len(bodies)),
                               "clients": {}}
    for name, results in runs.items():
        summary["clients"][name] = {
            "msg_per_s": round(statistics.median(r[0] for r in results)),
            "msg_per_s_runs": [round(r[0]) for r in results],
            "cpu_us_per_msg": round(statistics.median(r[1] for r in results), 1),
        }
    base = summary["clients"][BASELINE]["msg_per_s"]
    for result in summary["clients"].values():
        result["x_baseline"] = round(result["msg_per_s"] / base, 2)
    raw = summary["clients"][RAW]["msg_per_s"]
    summary["hookray_over_raw_client"] = round(summary["clients"]["hookray"]["msg_per_s"] / raw,
                                               2)
    return summary


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rabbit_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=_positive, default=10_000)
    parser.add_argument("--rounds", type=_positive, default=3)
    parser.add_argument("--batch", type=_positive, default=None,
                        help="publishes pipelined at once (default: all of them)")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    summary = asyncio.run(bench(args.url, args.messages, args.rounds,
                                args.batch or args.messages))
    print(f"{summary['messages']} persistent messages of ~{summary['bytes_per_message']} B, "
          f"publisher confirms, {summary['batch']} pipelined at once, median of "
          f"{summary['rounds']} rounds")
    print(f"{'client':<15} {'msg/s':>8} {'cpu us/msg':>11} {'x ' + BASELINE:>11}  runs")
    for name, r in summary["clients"].items():
        print(f"{name:<15} {r['msg_per_s']:>8} {r['cpu_us_per_msg']:>11} "
              f"{r['x_baseline']:>11}  {r['msg_per_s_runs']}")
    print(f"hookray transport / {RAW}: {summary['hookray_over_raw_client']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
