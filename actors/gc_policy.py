"""The cyclic garbage collector's settings in the engine's async actors.

An async server or client allocates dozens of container objects per request
(futures, tasks, header dicts) and decoding a batch of events allocates two or
three dicts per event; with Python's default of a young collection every 700 such
allocations, the collector took about a quarter of the HTTP transport actor's CPU
on ``bench.throughput`` (py-spy), and decoding a 5,000-event JSON body cost 2.6
against 1.35 µs per event with the settings below (measured here). ``relax_gc``,
called once an actor has started: what it allocated while starting (modules, Ray's
and the client's objects) is frozen out of every collection, and young collections
run every GC_YOUNG_THRESHOLD allocations. Garbage in reference cycles waits a little
longer (a few MB at most); nothing else changes. Partition actors need none of it:
they pause the collector during each round (``engine.collector``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

GC_YOUNG_THRESHOLD = 50_000  # container allocations between young collections (Python: 700)


def relax_gc() -> None:
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


@contextmanager
def relaxed_gc() -> Iterator[None]:
    """``relax_gc`` for the block, then the collector as it was (thresholds, nothing
    frozen): the benchmarks run their bare clients so, on the same footing as the
    engine's transport actors."""
    before = gc.get_threshold()
    relax_gc()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
