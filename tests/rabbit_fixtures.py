"""RabbitMQ fixtures (see tests/integration/test_rabbitmq.py).

* ``rabbit_url`` — the shared broker (``HOOKRAY_TEST_RABBITMQ_URL``, default
  guest/guest on 127.0.0.1:5672); unreachable fails the run in CI (``CI=true``)
  and skips the test locally, like the other services.
* ``rabbit`` — a ``Rabbit`` admin on that broker's ``/`` vhost, handing out unique
  queue/exchange names and deleting them after the test.
* ``rabbit_vhost`` — a vhost and a user of the test's own (``rabbitmqctl``),
  deleted afterwards with everything in them.
* ``rabbit_node`` — a RabbitMQ node of the test's own on a free port (its own node
  name, data and log directories), which the test may stop and start again; the
  shared broker is never stopped. The node is killed by its pid and its directory
  removed afterwards.

Helpers are synchronous (each call runs its own event loop), like the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiormq
import pytest
from yarl import URL

from tests.services import free_port, missing, port_open

RABBIT_URL = os.environ.get("HOOKRAY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NODE_START_TIMEOUT_SEC = 60.0
T = TypeVar("T")


@dataclass
class Received:
    """One consumed message."""

    body: bytes
    message_id: str | None
    content_type: str | None
    delivery_mode: int | None
    exchange: str
    routing_key: str


def _run(make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    async def go() -> T:
        async with asyncio.timeout(timeout):
            return await make()
    return asyncio.run(go())


def reachable(url: str, timeout: float = 3.0) -> bool:
    async def probe() -> bool:
        conn = await aiormq.connect(url)
        await conn.close()
        return True
    try:
        return _run(probe, timeout)
    except Exception:
        return False


@dataclass
class Rabbit:
    """Admin on one broker/vhost: declares, binds, inspects, consumes; cleans up."""

    url: URL
    prefix: str = field(default_factory=lambda: f"hr-{uuid.uuid4().hex[:8]}")
    queues: set[str] = field(default_factory=set)
    exchanges: set[str] = field(default_factory=set)

    @property
    def host(self) -> str:
        return self.url.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return self.url.port or 5672

    @property
    def vhost(self) -> str:
        return self.url.path[1:] or "/"

    def broker(self, **overrides: Any) -> dict[str, Any]:
        """Connection settings of a hook target on this broker."""
        return {"host": self.host, "port": self.port, "user": self.url.user or "guest",
                "password": self.url.password or "guest", "vhost": self.vhost, **overrides}

    def name(self, label: str) -> str:
        """A unique name, deleted after the test as a queue and as an exchange."""
        name = f"{self.prefix}-{label}"
        self.queues.add(name)
        self.exchanges.add(name)
        return name

    def call(self, op: Callable[[Any], Awaitable[T]], timeout: float = 30.0) -> T:
        """``op(channel)`` on a fresh connection; broker errors propagate."""
        async def go() -> T:
            conn = await aiormq.connect(self.url)
            try:
                return await op(await conn.channel())
            finally:
                await conn.close()
        return _run(go, timeout)

    def declare_queue(self, label: str, bind: tuple[str, ...] = (), exchange: str = "",
                      arguments: dict[str, Any] | None = None) -> str:
        name = self.name(label)

        async def op(ch: Any) -> None:
            await ch.queue_declare(name, durable=True, arguments=arguments)
            for key in bind:
                await ch.queue_bind(name, exchange, routing_key=key)
        self.call(op)
        return name

    def declare_exchange(self, label: str, type_: str, durable: bool = True,
                         auto_delete: bool = False) -> str:
        name = self.name(label)
        self.call(lambda ch: ch.exchange_declare(name, exchange_type=type_, durable=durable,
                                                 auto_delete=auto_delete))
        return name

    def bind(self, queue: str, exchange: str, key: str) -> None:
        self.call(lambda ch: ch.queue_bind(queue, exchange, routing_key=key))

    def delete_queue(self, name: str) -> None:
        self.call(lambda ch: ch.queue_delete(name))

    def message_count(self, queue: str) -> int | None:
        """Ready messages in ``queue`` (passive declare), None when it does not exist."""
        async def op(ch: Any) -> int:
            return int((await ch.queue_declare(queue, passive=True)).message_count)
        try:
            return self.call(op)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None

    def exchange_exists(self, name: str) -> bool:
        try:
            self.call(lambda ch: ch.exchange_declare(name, passive=True))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    def consume(self, queue: str, expect: int = 0, timeout: float = 30.0,
                settle: float = 0.3) -> list[Received]:
        """Take every message from ``queue``: wait until ``expect`` arrived (at most
        ``timeout``), then ``settle`` seconds more, so extra messages are seen too."""
        got: list[Received] = []

        async def on_message(msg: Any) -> None:
            props = msg.header.properties
            got.append(Received(msg.body, props.message_id, props.content_type,
                                props.delivery_mode, msg.delivery.exchange,
                                msg.delivery.routing_key))

        async def op(ch: Any) -> list[Received]:
            ok = await ch.basic_consume(queue, on_message, no_ack=True)
            deadline = time.monotonic() + timeout
            while len(got) < expect and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            last = -1
            while last != len(got):  # until nothing new for ``settle`` seconds
                last = len(got)
                await asyncio.sleep(settle)
            await ch.basic_cancel(ok.consumer_tag)
            return list(got)
        return self.call(op, timeout + 60)

    def cleanup(self) -> None:
        async def op(ch: Any) -> None:
            for name in sorted(self.queues):
                await ch.queue_delete(name)
            for name in sorted(self.exchanges):
                await ch.exchange_delete(name)
        with contextlib.suppress(Exception):  # a test's own node may be gone already
            self.call(op)


@pytest.fixture(scope="session")
def rabbit_url() -> str:
    if not reachable(RABBIT_URL):
        missing(f"RabbitMQ at {URL(RABBIT_URL).with_password(None)}")
    return RABBIT_URL


@pytest.fixture
def rabbit(rabbit_url: str) -> Iterator[Rabbit]:
    admin = Rabbit(URL(rabbit_url))
    yield admin
    admin.cleanup()


# --- rabbitmqctl: vhosts and users of a test's own --------------------------------------


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl -q ARGS`` against the shared broker's node."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        missing("rabbitmqctl")
    return subprocess.run([str(exe), "-q", *args], capture_output=True, text=True, timeout=60,
                          check=check)


def listing(*args: str) -> list[list[str]]:
    """Rows of a ``rabbitmqctl list_*`` command (tab-separated, header dropped)."""
    out = rabbitmqctl(*args, "--no-table-headers").stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


@dataclass
class VhostScope:
    name: str
    user: str
    password: str
    admin: Rabbit  # guest on this vhost

    def grant(self, configure: str = ".*", write: str = ".*", read: str = ".*") -> None:
        rabbitmqctl("set_permissions", "-p", self.name, self.user, configure, write, read)

    def revoke(self) -> None:
        rabbitmqctl("clear_permissions", "-p", self.name, self.user)

    def close_connections(self) -> None:
        rabbitmqctl("close_all_connections", "-p", self.name, "closed by a hookray test")


@pytest.fixture
def rabbit_vhost(rabbit_url: str) -> Iterator[VhostScope]:
    """A vhost and a user of this test's own; guest (the admin) may use the vhost too.
    The user has no permissions until ``grant``."""
    tag = uuid.uuid4().hex[:8]
    vhost = VhostScope(f"hr-test-{tag}", f"hr-user-{tag}", f"pw-{tag}",
                      Rabbit(URL(rabbit_url).with_path(f"/hr-test-{tag}")))
    rabbitmqctl("add_vhost", vhost.name)
    try:
        rabbitmqctl("add_user", vhost.user, vhost.password)
        rabbitmqctl("set_permissions", "-p", vhost.name, URL(rabbit_url).user or "guest",
                    ".*", ".*", ".*")
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost.name, check=False)
        rabbitmqctl("delete_user", vhost.user, check=False)


# --- a RabbitMQ node of the test's own ---------------------------------------------------


def _server_binary() -> str | None:
    # the packaged /usr/sbin wrapper switches to the rabbitmq user; the real script
    # runs as whoever starts it
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server",
                      shutil.which("rabbitmq-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class RabbitNode:
    """A broker node in a temporary directory; ``stop`` and ``start`` it at will."""

    home: Path
    port: int
    binary: str
    nodename: str = ""
    pid: int | None = None
    # a TLS (amqps) listener too: on this port, with the certificate and key files in
    # home ("ca.pem", "server.pem", "server.key")
    tls_port: int | None = None
    extra_conf: str = ""  # rabbitmq.conf lines of the test's own (limits, say)

    def __post_init__(self) -> None:
        self.nodename = f"hookraytest{self.port}@localhost"
        conf = f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n" + \
            self.extra_conf
        if self.tls_port is not None:
            conf += (f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                     f"ssl_options.cacertfile = {self.home / 'ca.pem'}\n"
                     f"ssl_options.certfile = {self.home / 'server.pem'}\n"
                     f"ssl_options.keyfile = {self.home / 'server.key'}\n"
                     "ssl_options.verify = verify_none\n"
                     "ssl_options.fail_if_no_peer_cert = false\n")
        (self.home / "rabbitmq.conf").write_text(conf)
        (self.home / "enabled_plugins").write_text("[].\n")
        (self.home / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ, "HOME": str(self.home), "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.home / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
        }

    @property
    def url(self) -> URL:
        return URL.build(scheme="amqp", user="guest", password="guest", host="127.0.0.1",
                         port=self.port, path="/")

    def start(self) -> None:
        pid_file = self.home / "pid"
        pid_file.unlink(missing_ok=True)
        subprocess.run([self.binary, "-detached"], env=self.env, cwd=self.home, check=True,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + NODE_START_TIMEOUT_SEC
        while time.monotonic() < deadline:
            if self.pid is None:
                self.pid = self._pid_file()
            if self.pid is not None and reachable(str(self.url), 1.0) and (
                    self.tls_port is None or port_open("127.0.0.1", self.tls_port)):
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in (self.home / "log").glob("*.log"))
        raise RuntimeError(f"RabbitMQ node {self.nodename} did not start within "
                           f"{NODE_START_TIMEOUT_SEC:g} s; log tail:\n{logs}")

    def _pid_file(self) -> int | None:
        text = (self.home / "pid").read_text().strip() if (self.home / "pid").exists() else ""
        return int(text) if text.isdigit() else None

    def stop(self, timeout: float = 30.0) -> None:
        """A graceful stop (SIGTERM); SIGKILL when it takes longer than ``timeout``."""
        pid, self.pid = self.pid or self._pid_file(), None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _own_node(tls: bool, extra_conf: str = "") -> Iterator[RabbitNode]:
    binary = _server_binary()
    if binary is None:
        missing("a rabbitmq-server executable (to start a test-owned RabbitMQ node)")
    home = Path(tempfile.mkdtemp(prefix="hookray-rabbit-"))
    tls_port = None
    if tls:
        import trustme

        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(home / "ca.pem"))
        server.cert_chain_pems[0].write_to_path(str(home / "server.pem"))
        server.private_key_pem.write_to_path(str(home / "server.key"))
        tls_port = free_port()
    node = RabbitNode(home, free_port(), str(binary), tls_port=tls_port,
                      extra_conf=extra_conf)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def rabbit_node(rabbit_url: str) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own (the shared broker is never stopped)."""
    yield from _own_node(tls=False)


@pytest.fixture
def rabbit_limited_node(rabbit_url: str) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own that allows 8 channels per connection and
    messages of 200,000 bytes at most."""
    yield from _own_node(tls=False, extra_conf="channel_max = 8\nmax_message_size = 200000\n")


@pytest.fixture
def rabbit_tls_node(rabbit_url: str) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own with a TLS listener (``tls_port``) whose
    certificate, for localhost and 127.0.0.1, a test CA (``home / "ca.pem"``) signed."""
    yield from _own_node(tls=True)
