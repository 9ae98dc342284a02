"""A counting HTTP sink in a process of its own, for benchmarks.

It answers 200 "OK" to every POST, decodes each JSON array with msgspec, keeps
the set of ``hook_message_id`` values received per path and counts per path the
messages whose id it had already received there (``duplicates``), and keeps
publish→receiver latency samples (now minus the message's ``event_date``, which
benchmarks set to the time just before they publish the event).

``GET /stats`` returns the counts (``messages``, ``unique``, ``duplicates``,
``requests``, ``bytes``, ``per_path`` unique counts, ``per_path_duplicates``, the
time of the first and last request, latency ``p50_ms``/``p99_ms``);
``GET /ids?path=P`` returns ``{"ids": [...], "messages", "duplicates"}`` of one path
(the ids received there, each once), so a benchmark can compare them with the ids
it expects; ``POST /reset`` clears everything.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from collections import defaultdict
from typing import Any

import msgspec

from engine.events import parse_rfc3339_ns


class _Msg(msgspec.Struct):
    hook_message_id: str
    event_date: str


_decoder = msgspec.json.Decoder(list[_Msg])


def _serve(port: int, ready: Any) -> None:
    from aiohttp import web

    ids: dict[str, set[str]] = defaultdict(set)
    dups: dict[str, int] = defaultdict(int)
    per_path_messages: dict[str, int] = defaultdict(int)
    state: dict[str, Any] = {"messages": 0, "requests": 0, "bytes": 0, "latencies_ns": [],
                             "first": 0.0, "last": 0.0}

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time_ns()
        msgs = _decoder.decode(body)
        seen = ids[request.path]
        before = len(seen)
        seen.update([m.hook_message_id for m in msgs])
        repeated = len(msgs) - (len(seen) - before)
        if repeated:
            dups[request.path] += repeated
        per_path_messages[request.path] += len(msgs)
        lat = state["latencies_ns"]
        if len(lat) < 2_000_000:
            sample = msgs[:: max(1, len(msgs) // 4)]
            lat.extend(now - parse_rfc3339_ns(m.event_date) for m in sample)
        state["messages"] += len(msgs)
        state["requests"] += 1
        state["bytes"] += len(body)
        state["first"] = state["first"] or time.time()
        state["last"] = time.time()
        return web.Response(text="OK")

    async def stats(request: web.Request) -> web.Response:
        lat = sorted(state["latencies_ns"])
        pct = {f"p{p}_ms": (lat[min(len(lat) - 1, len(lat) * p // 100)] / 1e6 if lat else None)
               for p in (50, 99)}
        return web.json_response({
            "messages": state["messages"], "requests": state["requests"],
            "bytes": state["bytes"], "unique": sum(len(s) for s in ids.values()),
            "duplicates": sum(dups.values()),
            "per_path": {k: len(v) for k, v in ids.items()},
            "per_path_duplicates": dict(dups), "first": state["first"],
            "last": state["last"], **pct})

    async def path_ids(request: web.Request) -> web.Response:
        path = request.query.get("path", "")
        body = msgspec.json.encode({"ids": list(ids.get(path, ())),
                                    "messages": per_path_messages.get(path, 0),
                                    "duplicates": dups.get(path, 0)})
        return web.Response(body=body, content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        ids.clear()
        dups.clear()
        per_path_messages.clear()
        state.update(messages=0, requests=0, bytes=0, latencies_ns=[], first=0.0, last=0.0)
        return web.Response(text="OK")

    app = web.Application(client_max_size=512 * 1024 * 1024)
    app.router.add_get("/stats", stats)
    app.router.add_get("/ids", path_ids)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", post)
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Sink:
    """Start with ``Sink().start()``; ``url(path)``, ``stats()``, ``ids(path)``,
    ``reset()``, ``stop()``; ``pid`` is the sink process's id once started."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        self._ready = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(self.port, self._ready), daemon=True)

    def start(self) -> Sink:
        self._proc.start()
        if not self._ready.wait(30):
            raise RuntimeError("sink did not start")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("sink did not open its port")

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url("/stats"), timeout=30) as resp:
            return msgspec.json.decode(resp.read())

    def ids(self, path: str) -> dict[str, Any]:
        """``{"ids": [...], "messages": n, "duplicates": n}`` received on ``path``."""
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode({"path": path})
        with urllib.request.urlopen(self.url(f"/ids?{query}"), timeout=60) as resp:
            return msgspec.json.decode(resp.read())

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.url("/reset"), method="POST"),
                               timeout=30).read()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.join(10)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    class _Now:
        def set(self) -> None:
            print(f"sink listening on http://127.0.0.1:{args.port}", flush=True)

    _serve(args.port, _Now())


if __name__ == "__main__":
    main()
