"""What an operator sees when the engine cannot start: one ``hookray: error: ...`` line
naming the setting or option and the reason, exit status 2, no traceback and no wait
of minutes. Each case runs ``hookray`` (or ``deploy/job.py``) as its own process, as
an operator would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.driver import RAY_CONNECT_TIMEOUT_SEC
from engine.settings import Settings
from tests.services import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def hookray(*args: str, env: dict[str, str], timeout: float = 120
            ) -> tuple[int, str, str, float]:
    """``hookray ARGS`` with only ``env`` as settings: status, stdout, stderr, seconds."""
    clean = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "actors.cli", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def assert_one_clean_error(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hookray: error: "), err
    for text in expected:
        assert text in err, err


@pytest.fixture
def env(redis_url: str, prefix: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PARTITIONS": "1",
            "HTTP_POOL_SIZE": "1"}


# --- REDIS_URL -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("redis://127.0.0.1:notaport/0", "Port could not be cast to integer value as 'notaport'"),
    ("redis://[::1", "Invalid IPv6 URL"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ("redis://127.0.0.1:6379/0?foo=bar", "unknown option 'foo'"),
    ("redis://127.0.0.1:6379/abc", "the database, the path after HOST:PORT"),
    ("redis://127.0.0.1:6379/9/x", "the database, the path after HOST:PORT"),
])
def test_a_redis_url_redis_py_cannot_use_fails_every_command_cleanly(
        url: str, reason: str) -> None:
    code, out, err, _ = hookray("stats", env={"REDIS_URL": url})
    assert code == 2 and "Traceback" not in out + err, out + err
    assert err.startswith("hookray: error: invalid settings:\n"), err
    assert f"REDIS_URL={url!r} (from the environment): " in err and reason in err


def test_a_redis_url_error_masks_the_password() -> None:
    code, out, err, _ = hookray("stats", env={"REDIS_URL": "redis://u:s3cret@127.0.0.1:x/0"})
    assert code == 2 and "REDIS_URL='redis://***@127.0.0.1:x/0'" in err, err
    assert "s3cret" not in out + err


# --- RAY_ADDRESS ---------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "reason"), [
    # deploy/README.md exports this for `ray job submit`
    ("http://127.0.0.1:8265", "this is the address of the Ray Jobs API"),
    ("https://head:8265", "RAY_API_SERVER_ADDRESS"),
    ("garbage", "expected HOST:PORT with a port from 1 to 65535"),
    ("ftp://head:21", "expected ray://HOST:PORT or no scheme"),
])
def test_a_ray_address_that_names_no_cluster_is_refused_before_ray_starts(
        env: dict[str, str], address: str, reason: str) -> None:
    code, out, err, _ = hookray("run", "--duration", "1", env={**env, "RAY_ADDRESS": address})
    assert_one_clean_error(code, out, err, f"hookray: error: RAY_ADDRESS={address!r}: ",
                           reason, "accepted: auto, the cluster's HOST:PORT")
    assert "hookray: running" not in out


def test_a_ray_address_where_nothing_listens_fails_at_once(env: dict[str, str]) -> None:
    # Given an address where no Ray runs (ray.init would try again for many minutes)
    port = free_port()
    # When the engine is started there, Then it says so within the bound
    code, out, err, took = hookray("run", "--duration", "1",
                                   env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_one_clean_error(code, out, err, f"RAY_ADDRESS='127.0.0.1:{port}': no Ray cluster at ",
                           f":{port}: Connection refused", "`ray start --head`")
    assert took < 60, took


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port on every interface that takes connections and never says a word."""
    server = socket.create_server(("0.0.0.0", 0))
    yield server.getsockname()[1]
    server.close()


def test_a_ray_address_where_something_else_listens_fails_in_bounded_time(
        env: dict[str, str], silent_listener: int) -> None:
    code, out, err, took = hookray("run", "--duration", "1",
                                   env={**env, "RAY_ADDRESS": f"127.0.0.1:{silent_listener}"})
    assert_one_clean_error(code, out, err, f"RAY_ADDRESS='127.0.0.1:{silent_listener}': ",
                           "answers, but not as a Ray cluster (no gRPC within")
    assert took < RAY_CONNECT_TIMEOUT_SEC + 60, took


# --- the HTTP API's port -------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_an_api_port_in_use_is_one_line_not_the_actors_traceback(
        env: dict[str, str], taken_port: int) -> None:
    """The API actor's __init__ does not die on the taken port (Ray printed its
    traceback and a SIGABRT): the driver reports the reason, once."""
    code, out, err, _ = hookray("run", "--duration", "1", "--api-port", str(taken_port),
                                env=env, timeout=240)
    assert_one_clean_error(
        code, out, err,
        f"hookray: error: the HTTP API could not start on 127.0.0.1:{taken_port}: "
        "[Errno 98] Address already in use")
    assert "SIGABRT" not in out + err and "ApiActor" not in out + err, out + err
    assert "hookray: running" not in out
