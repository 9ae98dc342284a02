"""What crosses from a partition to a transport actor."""

from __future__ import annotations

import pickle

import numpy as np

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
