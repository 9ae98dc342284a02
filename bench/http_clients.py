"""Async HTTP client throughput for the HTTP batch transport.

    python -m bench.http_clients [--requests N] [--concurrency C]
                                 [--events-per-body E] [--json PATH]

What it measures: each client POSTs the same pre-encoded body (a JSON array of
E hook messages built by the engine's ``MessageBuilder``, ~500 bytes each) N
times, with C concurrent tasks sharing one client, to a local aiohttp receiver
on 127.0.0.1. The receiver runs in its own process (multiprocessing, spawn) so
it does not share the client's event loop or core; it reads the whole body and
answers 200 "OK". Every client gets a short warm-up (opening its C connections)
before timing starts. Plain asyncio, no uvloop.

Clients, in the same run and on the same body:

* ``httpx``          httpx.AsyncClient, default transport (httpcore), limits
                     allowing C connections (all kept alive) — the baseline;
* ``aiohttp``        aiohttp.ClientSession with TCPConnector(limit=C);
* ``httpx-aiohttp``  httpx.AsyncClient API over the aiohttp transport of the
                     ``httpx-aiohttp`` package — skipped (and said so) when the
                     package is not importable.

How to read it: ``req/s`` and ``events/s`` (req/s x E) are wall-clock
throughput; ``p50``/``p99`` are per-request latencies (send to body read) under
C-way concurrency, so they include queueing inside the client; ``cpu us/req``
is the client process's CPU time per request — the part the dispatch engine
pays for, independent of the receiver. ``x httpx`` is each client's req/s
divided by httpx's (>1 is faster). On a small machine the receiver can become
the bottleneck; when two clients show the same req/s, compare ``cpu us/req``.
Run it more than once: numbers move by several percent between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import multiprocessing as mp
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import aiohttp
import httpx
from aiohttp import web

from bench.workload import make_events, make_hook, make_names
from engine.messages import MessageBuilder, http_body

HOST = "127.0.0.1"
PATH = "/hook"
HEADERS = {"Content-Type": "application/json"}
WARMUP_ROUNDS = 3  # warm-up requests per concurrent task
BASELINE = "httpx"

# One POST: returns the HTTP status after the response body has been read.
Post = Callable[[], Awaitable[int]]
# An opened client: its POST factory and its close coroutine function.
Opened = tuple[Post, Callable[[], Awaitable[None]]]


# --- receiver (separate process) -------------------------------------------


async def _hook(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="OK")


def _serve(conn: Connection) -> None:
    """Child-process entry point: bind a free port, report it, serve forever."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    conn.send(sock.getsockname()[1])
    conn.close()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(PATH, _hook)
    web.run_app(app, sock=sock, access_log=None, print=None, backlog=1024)


def start_receiver() -> tuple[BaseProcess, str]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(30):
        proc.terminate()
        raise RuntimeError("receiver did not start within 30 s")
    port = parent.recv()
    _wait_listening(port)
    return proc, f"http://{HOST}:{port}{PATH}"


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop_receiver(proc: BaseProcess) -> None:
    proc.terminate()
    proc.join(10)


# --- body -------------------------------------------------------------------


def make_body(events: int) -> bytes:
    """A realistic HTTP batch body: ``events`` engine-built messages as a JSON array."""
    builder = MessageBuilder(make_hook(1), make_names())
    return http_body(builder.encode(make_events(events)))


# --- clients ----------------------------------------------------------------


@dataclass
class Client:
    """A client under test: ``open(url, body, concurrency)`` builds it inside
    the running loop."""

    name: str
    open: Callable[[str, bytes, int], Opened]


def _httpx_limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


def _open_httpx(url: str, body: bytes, concurrency: int) -> Opened:
    client = httpx.AsyncClient(limits=_httpx_limits(concurrency), timeout=30.0)

    async def post() -> int:
        resp = await client.post(url, content=body, headers=HEADERS)
        return resp.status_code

    return post, client.aclose


def _open_aiohttp(url: str, body: bytes, concurrency: int) -> Opened:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=30.0),
    )

    async def post() -> int:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            await resp.read()
            return resp.status

    return post, session.close


def _open_httpx_aiohttp(url: str, body: bytes, concurrency: int) -> Opened:
    from httpx_aiohttp import AiohttpTransport

    transport = AiohttpTransport(limits=_httpx_limits(concurrency))
    client = httpx.AsyncClient(transport=transport, timeout=30.0)

    async def post() -> int:
        resp = await client.post(url, content=body, headers=HEADERS)
        return resp.status_code

    return post, client.aclose


def httpx_aiohttp_version() -> str | None:
    if importlib.util.find_spec("httpx_aiohttp") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("httpx-aiohttp")
    except PackageNotFoundError:
        return "unknown"


def available_clients() -> list[Client]:
    clients = [Client("httpx", _open_httpx), Client("aiohttp", _open_aiohttp)]
    if httpx_aiohttp_version() is not None:
        clients.append(Client("httpx-aiohttp", _open_httpx_aiohttp))
    return clients


# --- measurement --------------------------------------------------------------


@dataclass
class Result:
    requests: int
    elapsed_s: float
    cpu_s: float
    latencies_ms: list[float]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6

    def percentile(self, p: int) -> float:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0]
        cuts = statistics.quantiles(self.latencies_ms, n=100, method="inclusive")
        return cuts[p - 1]


async def _drive(post: Post, total: int, concurrency: int) -> list[float]:
    """Send ``total`` POSTs from ``concurrency`` tasks; return latencies in ms."""
    remaining = total
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status = await post()
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"receiver answered {status}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def _measure(client: Client, url: str, body: bytes, n: int, concurrency: int) -> Result:
    post, close = client.open(url, body, concurrency)
    try:
        await _drive(post, concurrency * WARMUP_ROUNDS, concurrency)
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        latencies = await _drive(post, n, concurrency)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await close()
    return Result(n, elapsed, cpu, latencies)


def measure(client: Client, url: str, body: bytes, n: int, concurrency: int) -> Result:
    """One client, in a fresh event loop."""
    return asyncio.run(_measure(client, url, body, n, concurrency))


# --- report -----------------------------------------------------------------


def summarize(results: dict[str, Result], events_per_body: int) -> dict[str, dict[str, float]]:
    base = results[BASELINE].requests_per_s
    return {
        name: {
            "requests_per_s": r.requests_per_s,
            "events_per_s": r.requests_per_s * events_per_body,
            "p50_ms": r.percentile(50),
            "p99_ms": r.percentile(99),
            "cpu_us_per_request": r.cpu_us_per_request,
            "ratio_vs_httpx": r.requests_per_s / base,
        }
        for name, r in results.items()
    }


def print_table(summary: dict[str, dict[str, float]]) -> None:
    print(f"{'client':<15}{'req/s':>9}{'events/s':>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'cpu us/req':>12}{'x httpx':>9}")
    for name, s in summary.items():
        print(f"{name:<15}{s['requests_per_s']:>9,.0f}{s['events_per_s']:>12,.0f}"
              f"{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['cpu_us_per_request']:>12,.0f}"
              f"{s['ratio_vs_httpx']:>9.2f}")


def run(n: int, concurrency: int, events_per_body: int) -> dict[str, dict[str, float]]:
    body = make_body(events_per_body)
    clients = available_clients()
    version = httpx_aiohttp_version()
    print(f"body: {events_per_body} events, {len(body):,} bytes; "
          f"{n:,} requests x {concurrency} concurrent per client")
    print(f"httpx {httpx.__version__}, aiohttp {aiohttp.__version__}, "
          + (f"httpx-aiohttp {version}" if version else
             "httpx-aiohttp not importable: skipped (pip install httpx-aiohttp)"))
    proc, url = start_receiver()
    try:
        results = {c.name: measure(c, url, body, n, concurrency) for c in clients}
    finally:
        stop_receiver(proc)
    return summarize(results, events_per_body)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=_positive, default=3_000)
    parser.add_argument("--concurrency", type=_positive, default=32)
    parser.add_argument("--events-per-body", type=_positive, default=100)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    summary = run(args.requests, args.concurrency, args.events_per_body)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
