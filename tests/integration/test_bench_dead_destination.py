"""`python -m bench.dead_destination` runs end to end with tiny sizes and reports both
conditions' rates in the documented JSON shape, with its checks (no speed assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import run_bench_module

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_both_conditions_and_checks_the_hooks(tmp_path: Path) -> None:
    # When the bench runs with 2,000 messages per round and one round per condition
    code, output, data = run_bench_module("bench.dead_destination", tmp_path / "dd.json",
                                          ["--messages", "2000", "--rounds", "1"], 300)
    # Then it succeeds and writes both medians, their ratio, the target and every round
    assert code == 0, output[-3000:]
    assert set(data) == {"baseline_per_s", "dead_per_s", "ratio", "target", "messages",
                         "rounds", "healthy", "other"}, data
    assert data["messages"] == 2000 and data["target"] == 0.8
    assert {k: len(v) for k, v in data["rounds"].items()} == {"baseline": 1, "dead": 1}
    assert data["baseline_per_s"] == data["rounds"]["baseline"][0] > 0
    assert data["dead_per_s"] == data["rounds"]["dead"][0] > 0
    assert data["ratio"] == pytest.approx(data["dead_per_s"] / data["baseline_per_s"])
    # and the healthy hook delivered all three rounds (the warm-up too), nothing else,
    # while the other hook's dead round ended as dead letters
    assert data["healthy"] == {"accepted": 6000, "delivered": 6000, "retried": 0,
                               "dead_lettered": 0, "discarded": 0}
    other = data["other"]
    assert other["accepted"] == 6000 and other["dead_lettered"] > 0
    assert other["delivered"] + other["dead_lettered"] == 6000, other
    assert "beside a dead destination" in output and "ratio" in output


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
