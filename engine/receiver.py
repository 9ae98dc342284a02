"""A local HTTP receiver for hook batches: used by ``hookray demo``, tests and benches.

It records every POSTed JSON array per path and can be told, per path, to fail
the first N requests, fail always, answer slowly or never, or answer with a body.

    with Receiver() as rx:
        rx.behave("/flaky", fail_first=2)
        url = rx.url("/flaky")
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Behaviour:
    fail_first: int = 0  # answer fail_status to the first N requests
    always_fail: bool = False
    fail_status: int = 500
    hang: bool = False  # never answer
    delay_sec: float = 0.0
    body: str = "OK"
    status: int = 200  # answered (with body) when not failing
    location: str = ""  # a Location header to answer with (a redirect, with a 3xx status)
    answer_headers: dict[str, str] = field(default_factory=dict)  # more answer headers


@dataclass
class Request:
    path: str
    at: float  # time.time() when received
    messages: list[dict[str, Any]]
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""  # the body, when it was not a JSON array


@dataclass
class _State:
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: dict[str, list[Request]] = field(default_factory=lambda: defaultdict(list))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    hanging: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    arrived: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # requests
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse(raw: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """(messages, b"") for a JSON array body, ([], raw) for anything else."""
    try:
        data = json.loads(raw) if raw else []
    except ValueError:
        return [], raw
    return (data, b"") if isinstance(data, list) else ([], raw)


class Receiver:
    """An aiohttp server on 127.0.0.1 in a thread of its own."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep_bodies: bool = True) -> None:
        self.host, self.port = host, port
        self.keep_bodies = keep_bodies
        self.state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- control ----------------------------------------------------------------------

    def behave(self, path: str, **kwargs: Any) -> None:
        self.state.behaviours[path] = Behaviour(**kwargs)

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def requests(self, path: str | None = None) -> list[Request]:
        with self.state.lock:
            if path is not None:
                return list(self.state.requests.get(path, []))
            return [r for reqs in self.state.requests.values() for r in reqs]

    def messages(self, path: str | None = None, ok_only: bool = True) -> list[dict[str, Any]]:
        return [m for r in self.requests(path) if 200 <= r.status < 300 or not ok_only
                for m in r.messages]

    def hanging(self, path: str) -> int:
        """Requests to ``path`` held unanswered right now (behaviour ``hang``)."""
        with self.state.lock:
            return self.state.hanging.get(path, 0)

    def delivered_count(self, path: str | None = None) -> int:
        """Messages in requests not answered as failing (``fail_first``,
        ``always_fail``): with the behaviour's ``status`` (counts kept even when bodies
        are not)."""
        with self.state.lock:
            if path is not None:
                return self.state.counts.get(path, 0)
            return sum(self.state.counts.values())

    # --- server -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        behaviour = self.state.behaviours.get(path, Behaviour())
        raw = await request.read()
        with self.state.lock:  # counted as they arrive: delayed ones are recorded later
            self.state.arrived[path] += 1
            attempt = self.state.arrived[path]
        if behaviour.hang:
            with self.state.lock:
                self.state.hanging[path] += 1
            try:
                await asyncio.sleep(3600)
            finally:  # the receiver stops
                with self.state.lock:
                    self.state.hanging[path] -= 1
        if behaviour.delay_sec:
            await asyncio.sleep(behaviour.delay_sec)
        failing = behaviour.always_fail or attempt <= behaviour.fail_first
        status = behaviour.fail_status if failing else behaviour.status
        messages, other = _parse(raw) if self.keep_bodies or status == 200 else ([], b"")
        headers = dict(request.headers) if self.keep_bodies else {}
        with self.state.lock:
            self.state.requests[path].append(Request(
                path, time.time(), messages if self.keep_bodies else [], status, headers, other))
            if not failing:
                self.state.counts[path] += len(messages)
        headers_out = {**behaviour.answer_headers}
        if behaviour.location:
            headers_out["Location"] = behaviour.location
        return web.Response(status=status, text="ERROR" if failing else behaviour.body,
                            headers=headers_out or None)

    def start(self) -> Receiver:
        """Serve; the error that kept it from listening (the port taken, say) is
        raised here."""
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, failed), daemon=True,
                                        name="hookray-receiver")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("receiver did not start within 10 s")
        if failed:
            self._thread.join(5)
            self._loop = None
            raise failed[0]
        return self

    def _serve(self, ready: threading.Event, failed: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        app.router.add_get("/{tail:.*}", self._handle)  # what a followed redirect sends
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            loop.run_until_complete(site.start())
        except BaseException as exc:  # said by start()
            failed.append(exc)
            loop.run_until_complete(self._runner.cleanup())
            loop.close()
            ready.set()
            return
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # e.g. handlers told to hang
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending))
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
