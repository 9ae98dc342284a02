"""Faults on a Ray cluster of several nodes: a worker node removed mid-run, its
processes stopped or killed outright (a crash).

The engine runs on a three-node cluster simulated on this machine
(``ray.cluster_utils.Cluster``: a head and two worker nodes, each its own raylet and
object store). That takes a driver process of its own, since this test process
already runs the session's Ray: tests/faults/multinode_run.py does the run and
writes what it saw as JSON. It runs with RAY_TMPDIR set to a directory of this
test's own, so its cluster's address file, sessions and sockets are apart from
any other Ray on the machine; every process that names that directory is stopped
afterwards, the test failing if any outlived the script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.services import processes_naming, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SCRIPT = Path(__file__).with_name("multinode_run.py")
ROOT = SCRIPT.parents[2]
RUN_TIMEOUT_SEC = 180
PARTITIONS = 4
EVENTS = 20_000


def _run(redis_url: str, prefix: str, folder: str, crash: bool) -> tuple[dict[str, Any], str]:
    out = Path(folder) / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = folder
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--redis-url", redis_url, "--prefix", prefix,
         "--out", str(out), "--events", str(EVENTS), *(["--crash"] if crash else [])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"the multi-node run did not end within {RUN_TIMEOUT_SEC} s:\n"
                    f"{output[-4000:]}")
    if not out.exists():
        pytest.fail(f"the multi-node run wrote no result (exit {proc.returncode}):\n"
                    f"{output[-4000:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    if "error" in result:
        pytest.fail(f"the multi-node run failed:\n{result['error']}\n{output[-3000:]}")
    return result, output


@pytest.mark.parametrize("how", ["stopped", "crashed"])
def test_removed_worker_node_loses_nothing_and_partitions_run_again_elsewhere(
        how: str, redis_url: str, prefix: str, ray_tmpdir: str) -> None:
    # Given an engine on a head and two worker nodes, its actors spread over them, and
    # two hooks of clicks and opens, one on each HTTP transport actor;
    # When 20,000 events are published and, while they are being delivered, the worker
    # node hosting most partition and transport actors is removed: its processes
    # stopped (SIGTERM first), or killed outright as in a crash of the machine
    started = time.monotonic()
    r, output = _run(redis_url, prefix, ray_tmpdir, crash=how == "crashed")
    print(f"\nmulti-node ({how}): {time.monotonic() - started:.1f} s; cluster up in "
          f"{r['cluster_start_sec']} s, hooks on {sorted(r['hooks'].values())}, removed node "
          f"hosted {r['victim_hosted']} after "
          f"{r['received_at_removal']} messages ({r['published_at_removal']} events "
          f"published); settled {r['settle_sec']} s after publishing; {r['received']} "
          f"messages received, {r['received_unique']} unique")
    nodes = r["nodes"]
    live = {nodes["head"], *nodes["workers"]} - {r["victim"]}
    before, after = r["placement_before"], r["placement_after"]
    assert len(set(before.values())) > 1, f"every actor on one node: {before}"
    assert r["victim"] in nodes["workers"]
    assert r["victim_busy"], f"the removed node hosted no partition nor busy transport actor: " \
        f"{before}, hooks on {r['hooks']}"
    assert 0 < r["received_at_removal"] < r["matched"], "not removed mid-delivery"
    # Then every matched event's message arrives at least once, and no other
    assert r["published"] == EVENTS
    # clicks and opens (2 in 3 of each 1,000 events), for each of the two hooks
    assert r["matched"] == 2 * EVENTS // 1_000 * 667
    assert r["lost"] == 0, f"{r['lost']} of {r['matched']} lost, e.g. {r['lost_sample']}; " \
        f"health {r['health']}, placement after {after}"
    assert r["idle"], f"intake backlog or retries left after {r['settle_sec']} s: " \
        f"backlog {r['backlog']}, stats {r['stats']}, health {r['health']}"
    assert r["unexpected"] == 0 and r["received_unique"] == r["matched"]
    assert all(s["dead_lettered"] == 0 for s in r["stats"].values()), r["stats"]
    assert r["backlog"] == 0
    # and the actors of the removed node run again on the nodes left, each partition
    # working (its own liveness mark written since the removal)
    assert set(after) == set(before)
    assert set(after.values()) <= live, after
    assert all(a["alive"] for a in r["alive"].values()), r["alive"]
    assert r["marked_since_removal"] == [True] * PARTITIONS
    assert r["health"] == {"partitions": {"expected": PARTITIONS, "running": PARTITIONS,
                                          "waiting": [], "stopped": []},
                           "retry_running": True, "retry_waiting": None}
    # and the run stopped every Ray process it started
    assert wait_for(lambda: not processes_naming(ray_tmpdir), 10)
    left = processes_naming(ray_tmpdir)
    assert not left, f"processes of the cluster outlived the run: {left}\n{output[-2000:]}"
