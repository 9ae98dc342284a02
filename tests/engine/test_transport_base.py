"""What crosses from a partition to a transport actor."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time

import numpy as np
import pytest

from engine.transports.base import Delivery, pack_deliveries, unpack_deliveries


def _deliveries() -> list[Delivery]:
    return [Delivery(id=f"d{n}", hook_id=n, account_id=7, kind="kafka",
                     parts=[b'{"a":%d}' % i for i in range(n)], keys=["1.click"] * n,
                     message_ids=[f"m{i}" for i in range(n)], created_ms=n)
            for n in (0, 1, 3)]


def test_packed_deliveries_read_back_equal() -> None:
    packed = pack_deliveries(_deliveries())
    assert unpack_deliveries(packed) == _deliveries()
    assert unpack_deliveries(packed.tobytes()) == _deliveries()  # bytes are read too


def test_packed_deliveries_travel_out_of_band() -> None:
    """Pickled with protocol 5 (as Ray does), the blob leaves as one out-of-band buffer,
    not copied into the pickle stream; read back from a read-only view of it."""
    packed = pack_deliveries(_deliveries())
    assert packed.dtype == np.uint8
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and buffers[0].raw().nbytes == packed.nbytes
    assert len(stream) < 200 < packed.nbytes
    view = np.frombuffer(bytes(buffers[0].raw()), np.uint8)  # read-only, like Ray's
    assert not view.flags.writeable
    assert unpack_deliveries(pickle.loads(stream, buffers=[view])) == _deliveries()


def test_only_the_messages_an_outcome_names_are_left_to_send() -> None:
    from engine.transports.base import Outcome, undelivered

    d = Delivery(id="d", hook_id=1, account_id=1, kind="rabbitmq_exchange",
                 parts=[b"0", b"1", b"2", b"3"], keys=["k0", "k1", "k2", "k3"],
                 message_ids=["m0", "m1", "m2", "m3"], resends=2, last_error="e")
    rest, done = undelivered(d, Outcome(ok=False, failed=[3, 1]))
    assert done == 2 and rest.id == "d" and rest.resends == 2 and rest.last_error == "e"
    assert (rest.parts, rest.keys, rest.message_ids) == ([b"1", b"3"], ["k1", "k3"],
                                                          ["m1", "m3"])
    assert d.count == 4  # the delivery itself is left as it was
    # every message failed, none named, or positions that cannot be read: all of it
    for failed in (None, [], [0, 1, 2, 3], [7, -1]):
        assert undelivered(d, Outcome(ok=False, failed=failed)) == (d, 0)
    # keys or ids that were not given per message are kept as they are
    bare = Delivery(id="b", hook_id=1, account_id=1, kind="http_batch", parts=[b"0", b"1"])
    rest, done = undelivered(bare, Outcome(ok=False, failed=[1]))
    assert (rest.parts, rest.keys, rest.message_ids, done) == ([b"1"], [], [], 1)


@dataclasses.dataclass
class _Cached:
    name: str
    users: int = 0
    used_at: float = dataclasses.field(default_factory=time.monotonic)


def test_make_room_closes_only_what_was_not_used_lately_and_warns_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """70 destinations in use by turns, 64 kept: closing the least recently used one
    made every delivery start its producer again. An entry used within ROOM_IDLE_SEC
    stays (the cache grows, said once a minute); older ones go, down to the limit."""
    from engine.transports import base

    monkeypatch.setattr(base, "_room_warned", {})  # none said before this test
    now = time.monotonic()
    entries = {n: _Cached(f"d{n}", used_at=now - 1) for n in range(3)}
    closed: list[str] = []

    def close(entry: _Cached, why: str) -> None:
        closed.append(entry.name)

    with caplog.at_level(logging.WARNING, logger="hookray"):
        for _ in range(3):
            base.make_room(entries, 2, 600.0, close, "Kafka producers")
    assert closed == [] and len(entries) == 3
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"4 Kafka producers in use within {base.ROOM_IDLE_SEC:g} s, more than "
                    "the 2 kept: all kept (closing one would open it again at its next "
                    "delivery)"]
    entries[0].used_at = entries[1].used_at = now - base.ROOM_IDLE_SEC - 1
    entries[1].users = 1  # held by a delivery: never closed under it
    base.make_room(entries, 2, 600.0, close)
    assert closed == ["d0"] and list(entries) == [1, 2]
    monkeypatch.setattr(base, "ROOM_IDLE_SEC", 0.0)
    entries[1].users = 0
    base.make_room(entries, 2, 600.0, close)  # down to room for the new one
    assert closed == ["d0", "d1"] and list(entries) == [2]
    monkeypatch.setattr(base, "ROOM_IDLE_SEC", 30.0)
    entries = {n: _Cached(f"e{n}") for n in range(9)}  # all used just now
    entries[0].users = 1
    base.make_room(entries, 2, 600.0, close)  # 4 times the limit at most, even so
    assert closed[2:] == ["e1", "e2"] and len(entries) == 7
