"""Pure functions for routing and timing: partitions, pool members, retry due times."""

from __future__ import annotations

import zlib

import numpy as np


def partition_of(account_id: int, list_id: int | None, partitions: int) -> int:
    """Stable partition of a database: all events of one (account, list) go to one actor."""
    key = f"{account_id}:{list_id if list_id is not None else '-'}".encode()
    return zlib.crc32(key) % partitions


def pool_member(hook_id: int, pool_size: int) -> int:
    """Stable transport-pool member for a hook, so its connections are reused."""
    return zlib.crc32(str(hook_id).encode()) % pool_size


def retry_due_ms(now_ms: int, period_sec: float) -> int:
    """When a failed delivery is due again: a fixed period, as documented (spec f)."""
    return now_ms + int(period_sec * 1000)


def exhausted(resends_done: int, retry_times: int) -> bool:
    """True when a delivery has used all HOOK_RETRY_TIMES re-sends."""
    return resends_done >= retry_times


def positions_by_code(codes: np.ndarray) -> list[tuple[int, list[int]]]:
    """(code, positions) per distinct value of ``codes``, positions in their order:
    one stable sort, no Python step per position."""
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return [(int(codes[chunk[0]]), chunk.tolist()) for chunk in np.split(order, bounds)]
