"""Real-server fixtures shared by the integration and fault tests.

A missing server fails the run in CI (``CI=true``) and skips the test locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.keys import Keys
from engine.receiver import Receiver
from engine.settings import Settings

REDIS_URL = os.environ.get("HOOKRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI", pytrace=False)
    pytest.skip(f"{what} is not available")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def ray_get_when_up(call: Callable[[], Any], timeout: float = 60) -> Any:
    """``ray.get`` of ``call()`` (an actor call), made again while the actor is
    restarting: Ray answers a call to a restarting actor with ActorUnavailableError
    for a moment."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(call(), timeout=timeout)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError:
        missing(f"Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def drop_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test's own, removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    drop_prefix(redis_client, name)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    """Small, fast settings for tests: retry period 0.3 s, 2 partitions."""
    return Settings(REDIS_URL=redis_url, REDIS_PREFIX=prefix, PARTITIONS=2, HTTP_POOL_SIZE=2,
                    HOOK_RETRY_PERIOD_SEC=0.3, HOOK_RETRY_TIMES=3,
                    HTTP_REQUEST_TIMEOUT_SEC=2.0, BROKER_TIMEOUT_SEC=2.0)


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole test session (ray.init costs seconds here)."""
    import ray

    if not ray.is_initialized():
        ray.init(namespace="hookray-tests", include_dashboard=True, configure_logging=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def engine_factory(ray_session: Any, settings: Settings) -> Iterator[Callable[..., Any]]:
    """Start an engine (actors on the session's Ray) with test settings plus overrides."""
    from actors.driver import Engine

    started: list[Engine] = []

    def start(**overrides: Any) -> Engine:
        engine = Engine.start(settings.model_copy(update=overrides))
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.shutdown()


def run_bench_module(module: str, json_path: Path, args: Sequence[str], timeout: float
                     ) -> tuple[int, str, Any]:
    """Run ``python -m <module> --json <json_path> <args>`` from the repository root
    (without RAY_ADDRESS: the bench starts its own Ray): exit status, output, and the
    JSON it wrote (None if none). Past ``timeout`` it is stopped (SIGTERM first: the
    benches stop what they started) and the test fails with its output."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--json", str(json_path), *args],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"{module} did not finish within {timeout} s:\n{output[-3000:]}")
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    return proc.returncode, output, data


def processes_naming(folder: str) -> list[int]:
    """Processes whose command line or environment names ``folder`` (those of the
    run's cluster: its raylets, GCS, agents and workers)."""
    found = []
    needle = folder.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdecimal() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in text:
            found.append(int(entry.name))
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 bytes);
    whatever still runs from it at the end is killed, then it is removed."""
    folder = tempfile.mkdtemp(prefix="hrmn", dir="/tmp")
    yield folder
    kill(processes_naming(folder))
    shutil.rmtree(folder, ignore_errors=True)
