"""``bench.cpu``: CPU per message by group of processes, from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from bench.cpu import CpuMeter, budget_us, describe, pids_named, process_ticks, redis_pid

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux /proc only")

# each child says when its interpreter has started (that CPU is before the window: a
# start on a busy machine may take longer than any fixed wait); the busy one then waits
# for a line before it works
READY = "import sys, time\nprint('ready', flush=True)\n"
BUSY_THEN_IDLE = (READY + "sys.stdin.readline()\n"
                  "end = time.process_time() + 0.6\n"
                  "while time.process_time() < end: pass\n"
                  "print('idle', flush=True)\n"
                  "time.sleep(60)\n")


def test_a_busy_process_counts_its_cpu_and_an_idle_one_nothing() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert busy.stdin is not None and busy.stdout is not None
    idle = subprocess.Popen([sys.executable, "-c", READY + "time.sleep(60)"],
                            stdout=subprocess.PIPE)
    assert idle.stdout is not None
    try:
        assert busy.stdout.readline() == idle.stdout.readline() == b"ready\n"
        time.sleep(0.05)  # the idle one's print returned, and it sleeps
        meter = CpuMeter({"busy": [busy.pid], "idle": [idle.pid], "gone": [None]})
        meter.start()
        busy.stdin.write(b"go\n")
        busy.stdin.flush()
        assert busy.stdout.readline() == b"idle\n"
        cpu = meter.stop(1000)
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
        for pipe in (busy.stdin, busy.stdout, idle.stdout):
            pipe.close()
    # about 0.6 s of CPU over 1,000 messages (10 ms ticks, sampled apart)
    assert 500 <= cpu["busy"] <= 800, cpu
    assert cpu["idle"] <= 20 and cpu["gone"] == 0, cpu
    assert cpu["machine"] >= cpu["busy"] - 20, cpu  # 10 ms ticks, sampled apart
    assert cpu["other"] == round(max(cpu["machine"] - cpu["busy"] - cpu["idle"], 0), 2), cpu
    assert process_ticks(busy.pid) is None  # gone: no figure, no error


def test_nothing_measured_for_no_messages() -> None:
    meter = CpuMeter({"me": [None]})
    meter.start()
    assert meter.stop(0) == {}


def test_budget_and_description() -> None:
    assert budget_us(2, 500_000) == 4.0
    assert budget_us(2, 0) == float("inf")
    assert describe({"machine": 3.0, "a": 2.0, "other": 1.0}) == \
        "CPU per message: 3.00 µs of the machine's: a 2.00, other 1.00"
    assert describe({}).startswith("CPU per message: not measured")


def test_processes_found_by_name_and_the_local_redis(redis_client: redis.Redis) -> None:
    comm = Path("/proc/self/comm").read_text().strip()
    import os

    assert os.getpid() in pids_named(comm)
    pid = redis_pid(redis_client)
    assert pid == int(redis_client.info("server")["process_id"])
    assert Path(f"/proc/{pid}/comm").read_text().startswith("redis-server")
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    assert redis_pid(nowhere) is None
