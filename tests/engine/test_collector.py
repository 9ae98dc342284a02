"""engine.collector.paused_gc: the collector is off inside a block and on again after
it, also when blocks of several threads overlap."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator

import pytest

from engine.collector import paused_gc


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if was:  # as it was before the test, whatever the test did
        gc.enable()
    else:
        gc.disable()


def test_off_inside_on_after(collector_on: None) -> None:
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():  # nested: still off, and not turned on by the inner block
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_one_its_owner_turned_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_overlapping_blocks_of_threads_leave_it_on(collector_on: None) -> None:
    """Threads switching at every chance (the API's executor threads publish at once):
    a block that read the collector as off while another had it paused must not keep
    it off for good once both ended."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work() -> None:
        for _ in range(500):
            with paused_gc():
                pass

    try:
        left_off = 0
        for _ in range(60):
            gc.enable()
            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            left_off += not gc.isenabled()
    finally:
        sys.setswitchinterval(switch)
    assert left_off == 0
