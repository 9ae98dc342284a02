"""How to serve the HTTP API on Ray: an aiohttp server inside an actor, or Ray Serve.

    python -m bench.api_server [--duration S] [--concurrency C] [--events-per-body E]
                               [--serve-replicas N ...] [--json PATH]

What it measures: POST /v1/events requests/s with E-event bodies (500 by default:
a JSON array of events built by ``bench.workload.make_events``, one account, a
master token), C concurrent requests from one aiohttp client in this process,
for S seconds after a short warm-up, against a local Ray and the Redis of
``REDIS_URL`` (default redis://127.0.0.1:6379/15, keys under a throw-away prefix,
intake streams unlinked every 0.25 s so Redis memory stays flat). Every server
does the same work per request: check the token in Redis, decode and validate
the events, append them to the intake (``engine.api.publish_events``), answer 202.

Servers, in the same run, on the same body:

* ``in-process``   ``publish_events`` called in a loop, no HTTP — the floor: what
                   the work itself costs on this machine;
* ``aiohttp-actor``  ``actors.api.ApiActor``: ``engine.api.create_app`` (the real
                   app, middleware and all) served by aiohttp in one Ray actor;
* ``serve-N``      a Ray Serve deployment with N replicas whose ``__call__``
                   (Starlette request) does the same token check and
                   ``publish_events``, behind Serve's HTTP proxy. Skipped, and said
                   so, when ``ray.serve`` does not import (it needs ``ray[serve]``:
                   starlette, fastapi, uvicorn, ...).

How to read it: ``req/s`` and ``events/s`` (req/s x E) are wall-clock throughput of
202 answers; ``p50``/``p99`` are per-request latencies under C-way concurrency;
``x aiohttp`` divides by the aiohttp actor's req/s. Everything shares the
machine's cores (client, Redis, Ray's own processes), so compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import redis

from bench.workload import make_events
from engine.api import Backend, publish_events
from engine.auth import TokenStore
from engine.settings import Settings

BASELINE = "aiohttp-actor"
WARMUP_SEC = 1.0


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self, events: int) -> dict[str, float]:
        ok = len(self.latencies)
        lat = sorted(self.latencies) or [0.0]
        rps = ok / self.seconds if self.seconds else 0.0
        return {"req_per_s": round(rps, 1), "events_per_s": round(rps * events),
                "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
                "requests": ok, "errors": sum(self.errors.values())}


# --- load -----------------------------------------------------------------------------


async def _load(url: str, body: bytes, token: str, concurrency: int, duration: float
                ) -> Result:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    result = Result()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def post() -> tuple[int, str]:
            async with session.post(url, data=body, headers=headers) as rsp:
                return rsp.status, await rsp.text()

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                try:
                    status, text = await post()
                except aiohttp.ClientError as exc:
                    status, text = 0, type(exc).__name__
                if not record:
                    continue
                if status == 202:
                    result.latencies.append(time.perf_counter() - t0)
                else:
                    key = f"{status} {text[:80]}"
                    result.errors[key] = result.errors.get(key, 0) + 1

        warm = time.perf_counter() + WARMUP_SEC
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + duration, True) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def load(url: str, body: bytes, token: str, concurrency: int, duration: float) -> Result:
    return asyncio.run(_load(url, body, token, concurrency, duration))


class Trimmer:
    """Unlinks the intake streams every 0.25 s, so a long run does not fill Redis."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r, self.settings = r, settings
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        streams = [f"{self.settings.REDIS_PREFIX}:intake:{n}"
                   for n in range(self.settings.PARTITIONS)]
        while not self.stop.wait(0.25):
            self.r.unlink(*streams)

    def __enter__(self) -> Trimmer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


# --- servers ----------------------------------------------------------------------------


def in_process(settings: Settings, body: bytes, duration: float) -> Result:
    backend = Backend.of(settings)
    result = Result()
    warm = time.perf_counter() + WARMUP_SEC
    while time.perf_counter() < warm:
        publish_events(backend, body, account_id=1, mode="array")
    start = time.perf_counter()
    while time.perf_counter() < start + duration:
        t0 = time.perf_counter()
        backend.tokens.authenticate("hr_0000000000000000_" + "x" * 43)
        status, _ = publish_events(backend, body, account_id=1, mode="array")
        if status == 202:
            result.latencies.append(time.perf_counter() - t0)
    result.seconds = time.perf_counter() - start
    backend.r.close()
    return result


def aiohttp_actor(ray: Any, settings: Settings) -> tuple[str, Any]:
    from actors.api import ApiActor

    actor = ApiActor.remote(settings.model_dump(), 0)
    host, port = ray.get(actor.address.remote())
    return f"http://{host}:{port}/v1/events", actor


def serve_available() -> str | None:
    """None when Ray Serve imports, else why not."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return str(exc).splitlines()[0]
    return None


def serve_app(settings: Settings, replicas: int, port: int) -> str:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from engine.api import ApiError

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=64)
    class Ingest:
        def __init__(self, cfg: dict[str, Any]) -> None:
            self.backend = Backend.of(Settings(**cfg))

        def _publish(self, token: str, body: bytes) -> tuple[int, dict[str, Any]]:
            info = self.backend.tokens.authenticate(token)
            if info is None:
                return 401, {"error": {"code": "unauthorized", "message": "bad token"}}
            try:
                return publish_events(self.backend, body, account_id=info.account_id,
                                      mode="array")
            except ApiError as exc:
                return exc.status, {"error": {"code": "x", "message": exc.message}}

        async def __call__(self, request: Request) -> JSONResponse:
            token = request.headers.get("authorization", "").partition(" ")[2]
            body = await request.body()
            status, answer = await asyncio.to_thread(self._publish, token, body)
            return JSONResponse(answer, status_code=status)

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Ingest.bind(settings.model_dump()), name=f"ingest{replicas}",
              route_prefix="/v1/events")
    return f"http://127.0.0.1:{port}/v1/events"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- run -------------------------------------------------------------------------------


def run(duration: float, concurrency: int, events: int, replicas: list[int]
        ) -> dict[str, Any]:
    import ray

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    settings = Settings(REDIS_URL=url, REDIS_PREFIX=f"bench-api-{uuid.uuid4().hex[:8]}",
                        PARTITIONS=4)
    r = redis.Redis.from_url(url)
    token, _ = TokenStore(r, settings.REDIS_PREFIX).create(1, "master", "bench")
    body = msgspec.json.encode(make_events(events, accounts=1))
    out: dict[str, Any] = {"events_per_body": events, "body_bytes": len(body),
                           "concurrency": concurrency, "duration_sec": duration,
                           "cpus": os.cpu_count(), "results": {}, "skipped": {}}
    results: dict[str, Result] = {}
    ray.init(namespace="bench-api", include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        with Trimmer(r, settings):
            results["in-process"] = in_process(settings, body, duration)
            api_url, actor = aiohttp_actor(ray, settings)
            results[BASELINE] = load(api_url, body, token, concurrency, duration)
            ray.get(actor.stop.remote())
            ray.kill(actor)
            why = serve_available()
            for n in replicas:
                if why is not None:
                    out["skipped"][f"serve-{n}"] = why
                    continue
                from ray import serve

                serve_url = serve_app(settings, n, _free_port())
                results[f"serve-{n}"] = load(serve_url, body, token, concurrency, duration)
                serve.shutdown()
    finally:
        ray.shutdown()
        keys = list(r.scan_iter(f"{settings.REDIS_PREFIX}:*"))
        if keys:
            r.unlink(*keys)
        r.close()
    base = results[BASELINE].summary(events)["req_per_s"] or 1.0
    for name, result in results.items():
        summary = result.summary(events)
        summary["x_aiohttp"] = round(summary["req_per_s"] / base, 2)
        out["results"][name] = summary
        if result.errors:
            out["results"][name]["error_kinds"] = result.errors
    return out


def print_table(out: dict[str, Any]) -> None:
    print(f"POST /v1/events, {out['events_per_body']} events/body ({out['body_bytes']:,} bytes),"
          f" concurrency {out['concurrency']}, {out['duration_sec']:.0f} s each, "
          f"{out['cpus']} cores")
    print(f"{'server':<15}{'req/s':>9}{'events/s':>12}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'x aiohttp':>11}")
    for name, s in out["results"].items():
        print(f"{name:<15}{s['req_per_s']:>9.1f}{s['events_per_s']:>12,}{s['p50_ms']:>9.2f}"
              f"{s['p99_ms']:>9.2f}{s['errors']:>8}{s['x_aiohttp']:>11.2f}")
    for name, why in out["skipped"].items():
        print(f"{name:<15}skipped: {why}")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per server")
    parser.add_argument("--concurrency", type=_positive, default=8)
    parser.add_argument("--events-per-body", type=_positive, default=500)
    parser.add_argument("--serve-replicas", type=_positive, nargs="*", default=[1, 2],
                        help="Serve variants to run (replica counts)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    out = run(args.duration, args.concurrency, args.events_per_body, args.serve_replicas)
    print_table(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
