"""`python -m bench.dead_destination` runs end to end with tiny sizes and reports both
conditions' rates in the documented JSON shape, with its checks (no speed assertions):
requests hung in every dead round, every healthy message found by id."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.dead_destination import expected_ids, id_check
from bench.sink import Sink
from tests.services import run_bench_module

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_both_conditions_and_checks_the_hooks(tmp_path: Path) -> None:
    # When the bench runs with 2,000 messages per round and two rounds per condition
    # (the second dead round starts while the first one's breaker would still be open
    # on a shared dead path: its requests would fail at once instead of hanging)
    code, output, data = run_bench_module("bench.dead_destination", tmp_path / "dd.json",
                                          ["--messages", "2000", "--rounds", "2"], 300)
    # Then it succeeds and writes both medians, their ratio, the target and every round
    assert code == 0, output[-3000:]
    assert set(data) == {"baseline_per_s", "dead_per_s", "ratio", "target", "messages",
                         "rounds", "hung", "checked", "healthy", "other"}, data
    assert data["messages"] == 2000 and data["target"] == 0.8
    assert {k: len(v) for k, v in data["rounds"].items()} == {"baseline": 2, "dead": 2}
    assert all(rate > 0 for rates in data["rounds"].values() for rate in rates), data
    assert data["baseline_per_s"] == statistics.median(data["rounds"]["baseline"])
    assert data["dead_per_s"] == statistics.median(data["rounds"]["dead"])
    assert data["ratio"] == pytest.approx(data["dead_per_s"] / data["baseline_per_s"])
    # and requests hung on the dead path in every dead round
    assert len(data["hung"]) == 2 and all(n > 0 for n in data["hung"]), data["hung"]
    # and every healthy message of the five rounds (the warm-up too) was found by id
    assert data["checked"] == {"expected": 10_000, "received": 10_000, "missing": 0,
                               "unexpected": 0, "duplicates": 0}, data["checked"]
    # and the healthy hook delivered them all, nothing else, while the other hook's
    # dead rounds ended as dead letters
    assert data["healthy"] == {"accepted": 10_000, "delivered": 10_000, "retried": 0,
                               "dead_lettered": 0, "discarded": 0}
    other = data["other"]
    assert other["accepted"] == 10_000 and other["dead_lettered"] > 0
    assert other["delivered"] + other["dead_lettered"] == 10_000, other
    assert "beside a dead destination" in output and "ratio" in output
    assert "checked by id: 10,000 healthy messages received of 10,000" in output


def test_the_id_check_finds_missing_unexpected_and_duplicate_messages() -> None:
    # Given a sink that received round 3's messages for hook 7 but one, one message of
    # another round, and one message twice
    want = expected_ids(7, 50, 3)
    assert len(want) == 50 and all(i.endswith("-7") for i in want)
    ids = sorted(want)
    received = [*ids[1:], *expected_ids(7, 1, 4), ids[5]]
    sink = Sink().start()
    try:
        body = json.dumps([{"hook_message_id": i, "event_date": "2026-11-29T10:00:00Z"}
                           for i in received]).encode()
        urllib.request.urlopen(urllib.request.Request(sink.url("/healthy"), data=body,
                                                      method="POST"), timeout=30).read()
        # When the bench's check compares them with the ids expected
        check = id_check(want, sink.ids("/healthy"))
    finally:
        sink.stop()
    # Then it counts each fault
    assert check == {"expected": 50, "received": 51, "missing": 1, "unexpected": 1,
                     "duplicates": 1}, check


def test_bench_names_an_unreachable_redis(tmp_path: Path) -> None:
    # When the bench is pointed at a port where no Redis listens
    code, output, data = run_bench_module("bench.dead_destination", tmp_path / "dd.json",
                                          ["--redis-url", "redis://127.0.0.1:1/0"], 60)
    # Then it fails with exit status 1, naming the URL, and writes the error
    assert code == 1, output
    assert "redis://127.0.0.1:1/0 is unreachable" in output
    assert set(data) == {"error"} and "unreachable" in data["error"]


def test_bench_refuses_a_round_size_below_one() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.dead_destination", "--messages", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--messages: must be >= 1" in proc.stderr
