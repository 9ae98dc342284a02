"""`python -m bench.transports` runs end to end with tiny sizes: every kind reports an
engine and a ceiling rate in the documented JSON shape (no speed assertions)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KINDS = {"http", "rabbitmq_queue", "rabbitmq_exchange", "kafka"}
RUN_TIMEOUT_SEC = 480


@pytest.mark.timeout(RUN_TIMEOUT_SEC + 90)
def test_transports_bench_reports_engine_and_ceiling_rates_of_every_kind(
        redis_url: str, rabbit_url: str, tansu_bin: str, tmp_path: Path) -> None:
    # Given Redis, RabbitMQ and the tansu binary (the bench starts its own broker and sink)
    out = tmp_path / "transports.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # When the bench runs with a tiny message count
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.transports", "--messages", "1000", "--json", str(out),
         "--redis-url", redis_url, "--amqp-url", rabbit_url],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops what it started on SIGTERM
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the bench did not finish within {RUN_TIMEOUT_SEC} s:\n{output[-3000:]}")
    # Then it succeeds and reports every kind
    assert proc.returncode == 0, output[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == KINDS, results
    for kind, result in results.items():
        assert set(result) == {"engine_per_s", "ceiling_per_s", "ratio"}, (kind, result)
        assert all(isinstance(v, float) for v in result.values()), (kind, result)
        assert result["engine_per_s"] > 0 and result["ceiling_per_s"] > 0, (kind, result)
        assert result["ratio"] == pytest.approx(result["engine_per_s"]
                                                / result["ceiling_per_s"]), (kind, result)
    # and prints the table
    table = output[output.rindex("kind"):]
    for kind in KINDS:
        assert kind in table, table
