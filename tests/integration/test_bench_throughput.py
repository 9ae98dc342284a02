"""`python -m bench.throughput` runs end to end with a tiny workload and checks every
message by id; the counting sink reports duplicate ids (no speed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from bench.sink import Sink
from bench.throughput import wait_delivered
from tests.services import run_bench_module

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_SEC = 300
KEYS = {"accepted_per_s", "delivered_per_s", "ceiling_per_s", "ratio", "p50_ms", "p99_ms",
        "peak_rss_mb", "matched", "delivered_unique", "lost", "events", "missing",
        "unexpected", "duplicates", "engine_pss_mb", "bench_pss_mb", "sinks_pss_mb",
        "ray_pss_mb", "redis_growth_mb", "memory_metric", "totals", "engine_processes",
        "engine_bytes_per_message", "bytes_per_message", "ceiling", "engine_cpu_us",
        "ceiling_cpu_us", "budget_us", "error", "ceiling_error"}


def run_bench(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    """Run ``python -m bench.throughput`` with ``args``: exit status, output, JSON."""
    code, output, data = run_bench_module("bench.throughput", tmp_path / "throughput.json",
                                          args, RUN_TIMEOUT_SEC)
    assert data is not None, output[-3000:]
    return code, output, data


@pytest.mark.timeout(RUN_TIMEOUT_SEC + 90)
def test_throughput_bench_delivers_every_message_by_id(redis_url: str, tmp_path: Path) -> None:
    # Given Redis (the bench starts its own Ray, engine and sinks)
    # When the bench runs with 2,000 events
    code, output, result = run_bench(tmp_path, "--events", "2000", "--redis-url", redis_url)
    # Then it succeeds and reports every figure
    assert code == 0, output[-3000:]
    assert set(result) == KEYS, sorted(set(result) ^ KEYS)
    assert result["error"] is None and result["ceiling_error"] is None, result
    # and every expected message arrived once, nothing else did
    assert result["events"] == 2000 and result["matched"] > 0, result
    assert result["lost"] == result["missing"] == 0, result
    assert result["unexpected"] == 0 and result["duplicates"] == 0, result
    assert result["delivered_unique"] == result["matched"], result
    assert result["totals"] == {"accepted": result["matched"], "delivered": result["matched"],
                                "retried": 0, "dead_lettered": 0, "discarded": 0}, result
    ceiling = result["ceiling"]
    assert ceiling["messages"] == ceiling["received_unique"] == result["matched"], ceiling
    assert ceiling["missing"] == ceiling["unexpected"] == ceiling["duplicates"] == 0, ceiling
    # the ceiling sent the engine's own messages (the same bytes per message)
    assert result["bytes_per_message"] == pytest.approx(result["engine_bytes_per_message"],
                                                        rel=0.01), result
    for rate in ("accepted_per_s", "delivered_per_s", "ceiling_per_s", "ratio"):
        assert isinstance(result[rate], float) and result[rate] > 0, (rate, result)
    assert result["ratio"] == pytest.approx(result["delivered_per_s"] / result["ceiling_per_s"])
    # memory: the engine's actor processes, apart from the rest
    names = set(result["engine_processes"])
    assert {"partition0", "partition1", "retry", "http_batch0"} <= names, names
    assert result["peak_rss_mb"] == result["engine_pss_mb"] > 0, result
    for key in ("bench_pss_mb", "sinks_pss_mb", "ray_pss_mb"):
        assert result[key] > 0, (key, result)
    assert result["memory_metric"] in ("pss", "rss"), result
    assert "missing / unexpected / dup" in output and "ceiling check" in output, output[-3000:]
    # where the CPU went, per message, on both sides; the budget of the ratio 0.5
    assert set(result["engine_cpu_us"]) == {"partitions", "transport", "other_actors", "bench",
                                            "sinks", "redis", "machine", "other"}, result
    assert set(result["ceiling_cpu_us"]) == {"bench", "sinks", "redis", "machine", "other"}
    for cpu in (result["engine_cpu_us"], result["ceiling_cpu_us"]):
        assert all(v >= 0 for v in cpu.values()), cpu
    assert result["budget_us"] == round((os.cpu_count() or 1) * 1e6
                                        / (0.5 * result["ceiling_per_s"]), 2), result
    assert "CPU per message: " in output and "CPU µs/message engine/ceil" in output


FAILING_RUN = """
import sys

import bench.throughput as bench

make_hooks = bench.make_hooks


def one_hook_on_a_closed_port(sinks, seed):
    hooks = make_hooks(sinks, seed)
    hooks[0]["target"]["http_batch"]["url"] = "http://127.0.0.1:9/closed"
    return hooks


if __name__ == "__main__":  # the sinks are spawned processes
    bench.make_hooks = one_hook_on_a_closed_port
    sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.timeout(RUN_TIMEOUT_SEC + 90)
def test_a_dead_letter_fails_the_run_with_its_error_and_null_rates(
        redis_url: str, tmp_path: Path) -> None:
    # Given a hook whose receiver refuses connections (the engine runs without re-sends)
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    out = tmp_path / "throughput.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # When the bench runs
    proc = subprocess.run([sys.executable, str(script), "--events", "500", "--json", str(out),
                           "--redis-url", redis_url], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=RUN_TIMEOUT_SEC)
    # Then it fails, naming the dead letter's error, and reports no rates
    assert proc.returncode == 1, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert "dead-lettered" in result["error"] and "127.0.0.1:9" in result["error"], result
    for rate in ("accepted_per_s", "delivered_per_s", "ceiling_per_s", "ratio", "p50_ms",
                 "p99_ms"):
        assert result[rate] is None, (rate, result)
    assert result["ceiling_error"], result
    assert "127.0.0.1:9" in proc.stdout, proc.stdout[-3000:]


@pytest.fixture
def sink() -> Iterator[Sink]:
    started = Sink().start()
    yield started
    started.stop()


def post(sink: Sink, path: str, ids: list[str]) -> None:
    body = json.dumps([{"hook_message_id": i, "event_date": "2026-11-29T00:00:00Z"}
                       for i in ids]).encode()
    req = urllib.request.Request(sink.url(path), data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and resp.read() == b"OK"


def test_sink_reports_duplicate_ids_per_path(sink: Sink) -> None:
    # Given a sink receiving ids repeated within one body, across bodies, and on two paths
    post(sink, "/a", ["x-1", "x-2", "x-1"])
    post(sink, "/a", ["x-2", "x-3"])
    post(sink, "/b", ["x-1"])  # the same id on another path is no duplicate
    # Then its stats count each path's repeats
    stats = sink.stats()
    assert stats["messages"] == 6 and stats["unique"] == 4, stats
    assert stats["duplicates"] == 2, stats
    assert stats["per_path"] == {"/a": 3, "/b": 1}, stats
    assert stats["per_path_duplicates"] == {"/a": 2}, stats
    # and each path's ids come back once each
    a = sink.ids("/a")
    assert sorted(a["ids"]) == ["x-1", "x-2", "x-3"], a
    assert a["messages"] == 5 and a["duplicates"] == 2, a
    assert sink.ids("/b") == {"ids": ["x-1"], "messages": 1, "duplicates": 0}
    assert sink.ids("/never") == {"ids": [], "messages": 0, "duplicates": 0}
    # and a reset clears everything
    sink.reset()
    stats = sink.stats()
    assert stats["messages"] == stats["unique"] == stats["duplicates"] == 0, stats
    assert stats["per_path"] == {} and stats["per_path_duplicates"] == {}, stats


def test_the_wait_for_the_sinks_ends_soon_after_the_last_delivery(
        sink: Sink, redis_client: redis.Redis) -> None:
    """The engine's CPU window ends when ``wait_delivered`` returns: within a short poll
    of the last delivery, not a whole POLL_SEC (1 s) after it."""
    # Given an engine's stand-in with no dead letter (a key nobody writes), and 1,000
    # messages reaching the sink in 10 bodies: 9 at once, the last 1.3 s later (well
    # within a poll at the rate so far when the first poll comes, at 1 s; bodies spread
    # evenly put that poll on the switch, so that a POST's time decided it)
    engine = SimpleNamespace(redis=redis_client,
                             keys=SimpleNamespace(dead=f"bench-test-{uuid.uuid4().hex}:dead"))
    sent: list[float] = []

    def deliver() -> None:
        for n in range(10):
            if n == 9:
                time.sleep(1.3)
            post(sink, "/h0", [f"m{n}-{i}" for i in range(100)])
            sent.append(time.time())

    poster = threading.Thread(target=deliver)
    started = time.time()
    poster.start()
    # When the bench waits for them
    total = wait_delivered(engine, [sink], 1000, started, "test")
    seen = time.time()
    poster.join(10)
    # Then it returns with all of them, about when the last arrived (polls of 1 s from
    # the start would see it only about 0.5 s later, at 2 s)
    assert not poster.is_alive() and len(sent) == 10
    assert total["unique"] == 1000, total
    assert seen - total["last"] < 0.25, (seen, total["last"], sent[-1])
