"""One engine on a simulated three-node Ray cluster (``ray.cluster_utils.Cluster``),
a worker node removed while events are being delivered. Run by test_multinode.py in
a process of its own (the test process already runs the session's Ray; a driver
joins one cluster only), with RAY_TMPDIR set to a directory of the test's own, so
that this cluster's address file and sessions touch no other Ray on the machine.

    python tests/faults/multinode_run.py --redis-url URL --prefix P --out result.json

Writes what it saw as JSON to ``--out`` (the test asserts on it); every Ray process
started here is stopped before it exits, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from actors.driver import Engine  # noqa: E402
from engine.keys import Keys  # noqa: E402
from engine.messages import message_id  # noqa: E402
from engine.partitioning import pool_member  # noqa: E402
from engine.receiver import Receiver  # noqa: E402
from engine.settings import Settings  # noqa: E402
from tests.integration.test_runtime import events, http_hook  # noqa: E402
from tests.services import ray_get_when_up, wait_for  # noqa: E402

PARTITIONS = 4
HTTP_POOL = 2
NODE_MEMORY = 600 * 1024 * 1024
OBJECT_STORE = 80 * 1024 * 1024
# a worker node whose raylet stops answering (a crash) is declared dead after two to
# four seconds of missed health checks, not after Ray's much longer defaults
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
          "health_check_timeout_ms": 1000}


def _node_of(actor: Any) -> str:
    """The id of the node the actor runs on, or why it does not answer."""
    try:
        return str(ray_get_when_up(lambda: actor.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()), timeout=60))
    except ray.exceptions.RayError as exc:
        return f"unreachable: {type(exc).__name__}"


def _placement(engine: Any) -> dict[str, str]:
    actors = {f"partition:{n}": a for n, a in enumerate(engine.actors["partitions"])}
    actors["retry"] = engine.actors["retry"]
    for kind, pool in engine.actors["pools"].items():
        actors.update((f"{kind}:{i}", a) for i, a in enumerate(pool))
    return {name: _node_of(actor) for name, actor in actors.items()}


def _hooks_on_every_http_actor(engine: Engine, rx: Receiver) -> list[Any]:
    """One hook per member of the HTTP pool (a hook always goes to the same member):
    hooks are created until each member has one, the others deleted again."""
    kept: dict[int, Any] = {}
    for n in range(20):
        hook = engine.create_hook(http_hook(rx, f"/h{n}", actions=["click", "open"],
                                            max_batch_size=100, flush_timeout_sec=0.1))
        member = pool_member(hook.id or 0, HTTP_POOL)
        if member in kept:
            engine.delete_hook(hook.id or 0)
        else:
            kept[member] = hook
        if len(kept) == HTTP_POOL:
            return list(kept.values())
    raise AssertionError(f"20 hooks took only the HTTP pool members {sorted(kept)}")


def run(args: argparse.Namespace, out: dict[str, Any]) -> None:
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "memory": NODE_MEMORY, "object_store_memory": OBJECT_STORE,
        "include_dashboard": False, "_system_config": HEALTH})
    head: Any = cluster.head_node  # (typed None by Cluster)
    try:
        workers = [cluster.add_node(num_cpus=2, memory=NODE_MEMORY,
                                    object_store_memory=OBJECT_STORE) for _ in range(2)]
        cluster.wait_for_nodes()
        out["nodes"] = {"head": head.node_id,
                        "workers": [w.node_id for w in workers]}
        out["cluster_start_sec"] = round(time.monotonic() - t0, 1)
        with Receiver(keep_bodies=True) as rx:
            settings = Settings(REDIS_URL=args.redis_url, REDIS_PREFIX=args.prefix,
                                RAY_ADDRESS=cluster.address, PARTITIONS=PARTITIONS,
                                HTTP_POOL_SIZE=HTTP_POOL, HOOK_RETRY_PERIOD_SEC=0.3,
                                HOOK_RETRY_TIMES=20, HTTP_REQUEST_TIMEOUT_SEC=2.0)
            engine = Engine.start(settings)
            try:
                exercise(engine, cluster, workers, rx, args, out)
            finally:
                engine.shutdown()
    finally:  # the worker nodes left, then the head
        ray.shutdown()
        try:
            cluster.shutdown()
        finally:
            if cluster.head_node is not None:  # shutdown failed before it came to the head
                cluster.remove_node(cluster.head_node)


def exercise(engine: Engine, cluster: Cluster, workers: list[Any], rx: Receiver,
             args: argparse.Namespace, out: dict[str, Any]) -> None:
    keys = Keys(args.prefix)
    hooks = _hooks_on_every_http_actor(engine, rx)
    out["hooks"] = {h.id: f"http_batch:{pool_member(h.id or 0, HTTP_POOL)}" for h in hooks}
    placed = out["placement_before"] = _placement(engine)
    total, chunk = args.events, 1_000
    matched: set[str] = set()
    accepted: list[int] = []

    def produce() -> None:
        for start in range(0, total, chunk):
            batch = events(chunk, types=("click", "open", "send"))
            for i, e in enumerate(batch):
                e["id"] = f"ev-{start + i}"
                if e["event_type"] != "send":
                    matched.update(message_id(h.id, e["id"]) for h in hooks)
            accepted.append(engine.publish(batch).accepted)
            time.sleep(0.05)

    # the worker node hosting the most partition and (busy) transport actors goes
    busy = {name for name in placed if name.startswith("partition:")} | \
        set(out["hooks"].values())
    hosted = {w.node_id: sum(1 for name, node in placed.items()
                             if node == w.node_id and name in busy) for w in workers}
    victim = max(workers, key=lambda w: hosted[w.node_id])
    out["victim"] = victim.node_id
    out["victim_hosted"] = sorted(n for n, node in placed.items() if node == victim.node_id)
    out["victim_busy"] = sorted(n for n in out["victim_hosted"] if n in busy)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_for(lambda: len(rx.messages()) > 3_000, 60)
    out["received_at_removal"] = len(rx.messages())
    out["published_at_removal"] = sum(accepted)
    removed_at = time.time()
    t = time.monotonic()
    cluster.remove_node(victim, allow_graceful=not args.crash)
    out["remove_sec"] = round(time.monotonic() - t, 1)
    producer.join(120)
    out["published"] = sum(accepted)
    out["matched"] = len(matched)
    t = time.monotonic()
    out["idle"] = engine.wait_idle(float(args.settle_sec), include_retries=True)
    out["settle_sec"] = round(time.monotonic() - t, 1)
    received = rx.messages()
    ids = {m["hook_message_id"] for m in received}
    out["received"] = len(received)
    out["received_unique"] = len(ids)
    out["lost"] = len(matched - ids)
    out["lost_sample"] = sorted(matched - ids)[:5]
    out["unexpected"] = len(ids - matched)
    out["placement_after"] = _placement(engine)
    out["alive"] = {f"partition:{n}": ray_ping(a)
                    for n, a in enumerate(engine.actors["partitions"])}
    # each partition's own mark, written after the node went (marks expire after 15 s:
    # one from before the removal would still count as running in health())
    marks = engine.redis.mget([keys.alive(f"partition:{n}") for n in range(PARTITIONS)])
    out["marked_since_removal"] = [m is not None and int(m.split()[0]) / 1000 > removed_at
                                   for m in marks]
    out["health"] = engine.health()
    out["stats"] = {h.id: engine.stats(h.id) for h in hooks}
    out["backlog"] = engine.backlog()


def ray_ping(actor: Any) -> Any:
    try:
        return ray_get_when_up(lambda: actor.ping.remote(), timeout=60)
    except ray.exceptions.RayError as exc:
        return {"alive": False, "error": type(exc).__name__}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--settle-sec", type=float, default=60)
    parser.add_argument("--crash", action="store_true",
                        help="the node's processes are killed (SIGKILL), not stopped")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    started = time.monotonic()
    try:
        run(args, out)
    except BaseException:
        out["error"] = traceback.format_exc()
    out["wall_sec"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
