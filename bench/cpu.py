"""CPU time per message over a timed window, by group of processes, from ``/proc``.

A benchmark names groups of process ids (the engine's partition actors, its transport
actor, the broker, Redis, the benchmark process itself...), calls ``start`` when its
timed window opens and ``stop(messages)`` when it closes, and gets the CPU each group
spent per message in microseconds (user + system time of every thread, 10 ms
resolution), plus ``machine``: the busy time of every CPU of the machine per message
(``/proc/stat``: all but idle, iowait and steal), and ``other``: ``machine`` minus the
groups (Ray's daemons, the kernel, anything else running).

On a machine with ``cores`` CPUs, a pipeline that keeps them all busy delivers at
most ``cores / machine`` messages per microsecond: ``budget_us`` turns a target rate
into the CPU per message it allows, the yardstick for a ratio target (the engine at
half the bare client's rate may spend ``budget_us(cores, ceiling / 2)`` per message,
everything included). Linux only: elsewhere ``available`` is False and ``stop``
returns an empty dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

TICK_SEC = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
_PROC = Path("/proc")


def process_ticks(pid: int) -> int | None:
    """User + system clock ticks of ``pid`` so far (all its threads); None once gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its end
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far: busy excludes idle, iowait and
    steal (time the hypervisor gave to other guests is not ours)."""
    with (_PROC / "stat").open() as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    steal = values[7] if len(values) > 7 else 0
    total = sum(values[:8])
    return total - idle - steal, total


def budget_us(cores: int, rate_per_s: float) -> float:
    """CPU microseconds per message that ``cores`` busy CPUs can spend at
    ``rate_per_s`` messages per second."""
    return cores * 1e6 / rate_per_s if rate_per_s > 0 else float("inf")


class CpuMeter:
    def __init__(self, groups: Mapping[str, Iterable[int | None]]) -> None:
        self.groups = {name: sorted({p for p in pids if p}) for name, pids in groups.items()}
        self.available = (_PROC / "stat").exists()
        self._start: dict[int, int] = {}
        self._machine = (0, 0)
        self._began = 0.0

    def start(self) -> None:
        if not self.available:
            return
        self._start = {pid: ticks for pids in self.groups.values() for pid in pids
                       if (ticks := process_ticks(pid)) is not None}
        self._machine = machine_ticks()
        self._began = time.monotonic()

    def stop(self, messages: int) -> dict[str, float]:
        """Microseconds of CPU per message of each group, ``machine`` and ``other``
        since ``start`` (a process gone meanwhile counts up to its last sample: 0)."""
        if not self.available or messages <= 0:
            return {}
        busy, _ = machine_ticks()
        per = TICK_SEC * 1e6 / messages
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            ticks = 0
            for pid in pids:
                now = process_ticks(pid)
                if now is not None and pid in self._start:
                    ticks += now - self._start[pid]
            out[name] = round(ticks * per, 2)
        out["machine"] = round((busy - self._machine[0]) * per, 2)
        out["other"] = round(max(out["machine"] - sum(out[n] for n in self.groups), 0.0), 2)
        return out


def describe(cpu: Mapping[str, float]) -> str:
    """``machine 12.1 µs/message: partitions 4.8, transport 2.5, ...`` (largest first)."""
    if not cpu:
        return "CPU per message: not measured (no /proc)"
    parts = sorted(((v, k) for k, v in cpu.items() if k != "machine"), reverse=True)
    return (f"CPU per message: {cpu['machine']:.2f} µs of the machine's: "
            + ", ".join(f"{k} {v:.2f}" for v, k in parts))


def redis_pid(client: object) -> int | None:
    """The local Redis server's pid (INFO server), None when it is not this machine's
    or cannot be asked."""
    try:
        info = client.info("server")  # type: ignore[attr-defined]
        pid = int(info["process_id"])
        comm = (_PROC / str(pid) / "comm").read_text()
    except Exception:  # another machine's, or not answering: not measured
        return None
    return pid if comm.startswith("redis-server") else None


def redis_pid_at(url: str) -> int | None:
    """``redis_pid`` of the Redis at ``url``."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return redis_pid(client)
    finally:
        client.close()


def pids_named(name: str) -> list[int]:
    """Ids of the processes whose command name (``comm``) is ``name``."""
    out = []
    for entry in _PROC.iterdir() if _PROC.exists() else ():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out
