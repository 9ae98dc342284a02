"""Listings and moves of dead letters and set-aside re-sends read their payloads (each
a whole batch: up to MAX_BATCH_BYTES) DEAD_MOVE_BYTES at a time, and no more of them
than the answer needs: one command copying hundreds of them held Redis for seconds,
every other client waiting."""

from __future__ import annotations

from typing import Any

import pytest
import redis

import engine.stores
from engine.keys import Keys
from engine.stores import RetryStore
from engine.transports.base import Delivery, pack_delivery

pytestmark = pytest.mark.integration

PART = b"x" * 600  # one payload: a little over 600 bytes


class Reads:
    """The payload bytes each HMGET of the client returned."""

    def __init__(self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        hmget = r.hmget

        def counted(name: Any, keys: Any, *args: Any) -> Any:
            values = hmget(name, keys, *args)
            self.sizes.append(sum(len(v) for v in values if v is not None))
            return values

        monkeypatch.setattr(r, "hmget", counted)


def letter(n: int) -> Delivery:
    return Delivery(id=f"d{n:02}", hook_id=7, account_id=1, kind="http_batch",
                    parts=[PART], message_ids=[f"m{n}"])


def test_a_dead_letter_page_reads_what_it_shows_a_chunk_at_a_time(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.stores, "DEAD_MOVE_BYTES", 1_000)
    store = RetryStore(redis_client, keys)
    for n in range(20):
        store.kill(letter(n), "HTTP 500")
    store.dead_page(1, None, 1)  # the process's first read indexes what it finds
    reads = Reads(redis_client, monkeypatch)
    page = store.dead_page(1, None, 3)
    assert [d.id for d, _ in page] == ["d00", "d01", "d02"]
    # one payload per read (two do not fit in 1,000 bytes), three in all: not the 20
    # (a page of 50 at least) in one read
    assert len(reads.sizes) == 3 and all(0 < size <= 1_000 for size in reads.sizes)
    reads.sizes.clear()
    rest = store.dead_page(1, None, 100, page[-1][1])
    assert [d.id for d, _ in rest] == [f"d{n:02}" for n in range(3, 20)]
    assert max(reads.sizes) <= 1_000


def test_set_aside_re_sends_are_listed_and_put_back_a_chunk_at_a_time(
        redis_client: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.stores, "DEAD_MOVE_BYTES", 1_000)
    store = RetryStore(redis_client, keys)
    for n in range(6):
        redis_client.hset(keys.retry_unreadable, f"d{n:02}", pack_delivery(letter(n)))
    redis_client.hset(keys.retry_unreadable, "d99", b"\xc1")  # undecodable: stays
    evals: list[int] = []
    run = redis_client.eval

    def counted(script: str, numkeys: int, *keys_and_args: Any) -> Any:
        evals.append(len(keys_and_args) - numkeys)
        return run(script, numkeys, *keys_and_args)

    reads = Reads(redis_client, monkeypatch)
    listed = store.set_aside(100)
    assert [e["id"] for e in listed] == [*(f"d{n:02}" for n in range(6)), "d99"]
    assert len(reads.sizes) >= 6 and max(reads.sizes) <= 1_000
    reads.sizes.clear()
    monkeypatch.setattr(redis_client, "eval", counted)
    assert store.requeue_set_aside(["d00", "d01"]) == 2
    assert evals == [1, 1] and max(reads.sizes) <= 1_000
    evals.clear()
    assert store.requeue_set_aside(None) == 4  # every one this version decodes
    assert evals == [1, 1, 1, 1] and max(reads.sizes) <= 1_000
    assert redis_client.hkeys(keys.retry_unreadable) == [b"d99"]
    with pytest.raises(ValueError, match=r"re-send.s. d42 do not exist; nothing discarded"):
        store.discard_set_aside(["d99", "d42"])
    redis_client.hset(keys.retry_unreadable, "d98", b"")  # damaged to nothing: still one
    assert store.discard_set_aside(["d99", "d98"]) == 2
