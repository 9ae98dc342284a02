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
