"""The Locust harness runs headless against `hookray run` and writes its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from engine.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def api_url(run: subprocess.Popen[str], timeout: float) -> str:
    """The API URL `hookray run` prints once its API is up (its output so far on failure)."""
    assert run.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = run.stdout.readline()  # a line at least every --report-sec once running
        if not line:
            break  # exited
        seen.append(line)
        if line.startswith("hookray: HTTP API on "):
            return line.removeprefix("hookray: HTTP API on ").strip()
    raise AssertionError("the API did not come up:\n" + "".join(seen)[-3000:])


def test_locust_headless_reports_requests_and_delivered_messages(
        tmp_path: Path, settings: Settings) -> None:
    # Given `hookray run` with its HTTP API and a master token
    config = tmp_path / "main.json"
    config.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL,
                                  "REDIS_PREFIX": settings.REDIS_PREFIX, "PARTITIONS": 2,
                                  "HTTP_POOL_SIZE": 1}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # port 0: the API binds a free port and `hookray run` prints its URL (a port picked
    # here beforehand could be taken by one of Ray's own servers in the meantime)
    run = subprocess.Popen([sys.executable, "-m", "actors.cli", "-c", str(config), "run",
                            "--api-port", "0", "--report-sec", "5"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = api_url(run, timeout=120)
        token = json.loads(subprocess.run(
            [sys.executable, "-m", "actors.cli", "-c", str(config), "tokens", "create",
             "--account", "1", "--role", "master"], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True).stdout)["token"]
        # When Locust runs headless for a few seconds
        prefix = tmp_path / "locust"
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
             "-u", "4", "-r", "4", "-t", "8s", "--host", url,
             "--csv", str(prefix), "--only-summary"],
            cwd=ROOT, env={**env, "HOOKRAY_TOKEN": token, "HOOKRAY_BATCH": "200"},
            capture_output=True, text=True, timeout=180)
        assert locust.returncode == 0, locust.stdout + locust.stderr
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    # Then its report holds requests/s and the messages the receivers got
    report = json.loads((tmp_path / "locust_delivered.json").read_text())
    assert report["requests"] > 0 and report["failures"] == 0
    assert report["delivered_messages"] > 0 and report["delivered_messages_per_s"] > 0
    assert (tmp_path / "locust_stats.csv").exists()
    assert "hookray: delivered" in locust.stdout + locust.stderr
    assert "hookray: stopped" in out


def sinks(mark: str) -> set[int]:
    """Pids of this test's receivers (``python -m bench.sink`` started by its locust,
    whose environment holds ``HOOKRAY_TEST_MARK=mark``: other runs' are not this
    test's to wait for or kill)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"bench.sink" not in cmdline:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HOOKRAY_TEST_MARK={mark}".encode() in environ:
            found.add(int(proc.name))
    return found


def marked() -> dict[str, str]:
    """An environment for locust that marks its receivers as this test's."""
    import uuid

    return {**os.environ, "HOOKRAY_TEST_MARK": uuid.uuid4().hex}


def run_locust(url: str, env: dict[str, str], tmp_path: Path, seconds: str = "30s"
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
         "-u", "2", "-r", "2", "-t", seconds, "--host", url, "--csv",
         str(tmp_path / "locust"), "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def no_sink_left(mark: str) -> bool:
    deadline = time.monotonic() + 10
    while sinks(mark):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_locust_without_an_api_exits_1_and_leaves_no_receiver_running(
        tmp_path: Path) -> None:
    """A setup that exits (no API, no token) skipped Locust's stop: the receiver it had
    started ran on for ever, and `locust ... | tail` never ended."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = marked()
    done = run_locust(f"http://127.0.0.1:{port}", {
        **env, "HOOKRAY_TOKEN": "hr_x", "HOOKRAY_API_WAIT_SEC": "1"}, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "locustfile: no HTTP API at" in done.stderr
    assert no_sink_left(env["HOOKRAY_TEST_MARK"]), "the receiver was left running"


def test_locust_with_a_wrong_token_stops_at_once_naming_it(
        tmp_path: Path, settings: Settings) -> None:
    """A token the API refuses made a whole run of refused requests, ending with "the test
    ended before its hooks were created"; it ends at once and says why."""
    from actors.api import ApiServer

    server = ApiServer(settings, "127.0.0.1", 0)
    env = marked()
    try:
        started = time.monotonic()
        done = run_locust(f"http://127.0.0.1:{server.port}",
                          {**env, "HOOKRAY_TOKEN": "hr_not_a_token"}, tmp_path, seconds="60s")
        took = time.monotonic() - started
    finally:
        server.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "locustfile: creating hook 1 of 10 failed: HTTP 401: " in done.stderr, done.stderr
    assert "(HOOKRAY_TOKEN must be a master token of account 1)" in done.stderr
    assert took < 45, took  # not the whole -t 60s
    assert no_sink_left(env["HOOKRAY_TEST_MARK"]), "the receiver was left running"


def test_locust_whose_receivers_go_mid_run_still_reports_and_deletes_its_hooks(
        tmp_path: Path, settings: Settings, redis_client: redis.Redis) -> None:
    """The receivers gone before the report (reading them raised): no report, exit 2,
    and the file's hooks left active, re-sending to a dead port. The report says so
    (drained false, exit 1) and the hooks are deleted."""
    from actors.api import ApiServer
    from engine.auth import TokenStore
    from engine.keys import Keys
    from engine.stores import HookRegistry

    token, _ = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "master")
    server = ApiServer(settings, "127.0.0.1", 0)  # no workers: nothing settles
    env = marked()
    try:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless",
             "-u", "1", "-r", "1", "-t", "4s", "--host", f"http://127.0.0.1:{server.port}",
             "--csv", str(tmp_path / "locust"), "--only-summary"], cwd=ROOT,
            env={**env, "HOOKRAY_TOKEN": token, "HOOKRAY_DRAIN_SEC": "1",
                 "HOOKRAY_BATCH": "10"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        registry = HookRegistry(redis_client, Keys(settings.REDIS_PREFIX))
        deadline = time.monotonic() + 30
        while len(registry.listing(1)[0]) < 10:  # the run started, its hooks made
            assert time.monotonic() < deadline and locust.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # some requests made
        for pid in sinks(env["HOOKRAY_TEST_MARK"]):
            os.kill(pid, signal.SIGKILL)  # the receivers die mid-run
        out, _ = locust.communicate(timeout=60)
    finally:
        server.stop()
    assert locust.returncode == 1, out
    report = json.loads((tmp_path / "locust_delivered.json").read_text())
    assert report["drained"] is False and "reading the receivers: " in report["error"]
    assert report["requests"] > 0
    assert registry.listing(1) == ([], []), out
