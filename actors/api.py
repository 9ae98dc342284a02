"""The HTTP API on Ray: one actor serving ``engine.api.create_app`` with aiohttp.

The server runs on an event loop of its own, in a thread started by ``__init__``,
so a restarted actor serves again by itself (on the same port when one was set).
Why an actor and not Ray Serve: ``python -m bench.api_server`` (README, "HTTP
API"): the aiohttp actor answered POST /v1/events with 500-event bodies 1.8-4x
faster than a Serve deployment doing the same work behind Serve's proxy, which
also needs packages (``ray[serve]``) this project does not otherwise install.

    api = ApiActor.options(name="hookray:api").remote(settings.model_dump(), port)
    host, port = ray.get(api.address.remote())  # raises the OSError if it could not start

A port that is taken or a host that is not this node's does not fail ``__init__``
(Ray printed the actor's traceback, some 50 lines, and aborted its worker): the
error is kept and ``address()`` raises it, which the driver reports as one line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import ray
from aiohttp import web

from actors import logs
from actors.gc_policy import relax_gc
from engine.api import create_app
from engine.settings import Settings
from engine.transports.guard import internal_open

log = logging.getLogger("hookray")


class ApiServer:
    """``create_app`` served on ``host:port`` (0: any free port) in a thread of its own."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings, self.host = settings, host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.port = int(self.sock.getsockname()[1])
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="hookray-api")
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._runner = web.AppRunner(create_app(self.settings), access_log=None)
            self.loop.run_until_complete(self._runner.setup())
            site = web.SockSite(self._runner, self.sock, backlog=1024)
            self.loop.run_until_complete(site.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(15)
        self.sock.close()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=2)
class ApiActor:
    def __init__(self, settings: dict[str, Any], port: int | None = None) -> None:
        logs.configure()
        cfg = Settings(**settings)
        self.server: ApiServer | None = None
        self.error: OSError | None = None  # why the server could not start
        try:
            self.server = ApiServer(cfg, cfg.API_HOST,
                                    (cfg.API_PORT or 0) if port is None else port)
        except OSError as exc:  # the port is taken, the address not this node's...
            self.error = exc
            return
        log.info("hookray API on http://%s:%d", self.server.host, self.server.port)
        open_groups = internal_open(cfg.DESTINATION_DENY)
        if open_groups:
            log.warning(
                "DESTINATION_DENY (%s) does not deny %s: hooks created through this API "
                "may deliver to, and test events read answers of, services on this "
                "engine's own network (Redis, Ray's dashboard...); set DESTINATION_DENY "
                "to include %s unless every account is trusted", cfg.DESTINATION_DENY,
                " or ".join(open_groups), ",".join(open_groups))
        relax_gc()

    def address(self) -> tuple[str, int]:
        """(host, port) the API listens on; host is this node's IP when bound to all.
        Raises the OSError that kept the server from starting."""
        if self.server is None:
            raise self.error or OSError("the HTTP API did not start")
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        return host, self.server.port

    def ping(self) -> dict[str, Any]:
        if self.server is None:
            return {"alive": False, "port": None, "error": str(self.error)}
        return {"alive": self.server.alive(), "port": self.server.port}

    def stop(self) -> bool:
        if self.server is not None:
            self.server.stop()
        return True
