"""RaySender against real Ray actors: flow control per hook, grouping, outcomes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from actors.sender import RaySender
from engine.hooks import Hook
from engine.transports.base import Delivery, Outcome, unpack_deliveries

pytestmark = pytest.mark.integration


def make_hook(hook_id: int) -> Hook:
    return Hook.model_validate({
        "id": hook_id, "name": f"h{hook_id}", "active": True, "account_id": 1,
        "actions": ["click"], "target": {"http_batch": {"url": f"http://127.0.0.1:9/{hook_id}"}}})


def delivery(hook_id: int, n: int, size: int = 2) -> Delivery:
    return Delivery(id=f"{hook_id}-{n}", hook_id=hook_id, account_id=1, kind="http_batch",
                    parts=[b"{" + b" " * (size - 2) + b"}"])


@pytest.fixture
def recorder(ray_session: Any) -> Any:
    @ray_session.remote(num_cpus=0, max_concurrency=1000)
    class Recorder:
        """A transport actor stand-in: records calls per hook and how many overlap."""

        def __init__(self) -> None:
            self.open: dict[str, int] = {}
            self.peak: dict[str, int] = {}
            self.sizes: dict[str, list[int]] = {}

        async def deliver_many(self, kind: str, target: str, packed: bytes) -> list[Outcome]:
            deliveries = unpack_deliveries(packed)
            hook = str(deliveries[0].hook_id)
            self.open[hook] = self.open.get(hook, 0) + 1
            self.peak[hook] = max(self.peak.get(hook, 0), self.open[hook])
            self.sizes.setdefault(hook, []).append(len(deliveries))
            await asyncio.sleep(0.05 if hook == "1" else 0.0)  # hook 1: a slow destination
            self.open[hook] -= 1
            return [Outcome(ok=True, detail=d.id) for d in deliveries]

        def report(self) -> tuple[dict[str, int], dict[str, list[int]]]:
            return self.peak, self.sizes

    return Recorder.remote()


def drain(sender: RaySender, want: int, timeout: float = 30.0) -> list[tuple[Delivery, Outcome]]:
    out: list[tuple[Delivery, Outcome]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want:
        assert time.monotonic() < deadline, f"only {len(out)}/{want} outcomes"
        out += sender.poll(0.01)
    return out


def test_calls_per_hook_are_capped_and_every_batch_is_answered(
        ray_session: Any, recorder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("actors.sender.CALL_MAX_BYTES", 10_000)  # 10 batches of 1,000 bytes
    sender = RaySender({"http_batch": [recorder]}, calls_per_hook=2)
    slow, fast = make_hook(1), make_hook(2)
    for n in range(45):  # five calls' worth
        sender.submit(slow, delivery(1, n, size=1_000))
    sender.submit(slow, delivery(1, 45, size=20_000))  # larger than a call: goes alone
    for n in range(10):
        sender.submit(fast, delivery(2, n))
    assert sender.inflight() == 56
    out = sender.poll(0.0)
    # each hook has its calls in flight; the slow hook's third call waits its turn
    assert len(sender.refs) == 3 and sender.busy[1] == 2
    out += drain(sender, 56 - len(out))
    assert sender.inflight() == 0 and not sender.queued and not sender.busy
    assert sorted(d.id for d, _ in out) == sorted(
        [f"1-{n}" for n in range(46)] + [f"2-{n}" for n in range(10)])
    assert all(o.ok and o.detail == d.id for d, o in out)  # each outcome with its batch
    peak, sizes = ray_session.get(recorder.report.remote())
    assert peak["1"] <= 2 and sizes["1"] == [10, 10, 10, 10, 5, 1] and sizes["2"] == [10]


def test_batches_waiting_for_a_slot_leave_together(ray_session: Any, recorder: Any) -> None:
    sender = RaySender({"http_batch": [recorder]}, calls_per_hook=1)
    slow = make_hook(1)
    sender.submit(slow, delivery(1, 0))
    sender.poll(0.0)  # the first call is out
    for n in range(1, 6):
        sender.submit(slow, delivery(1, n))
        sender.poll(0.0)  # the slot is taken: these wait
    drain(sender, 6)
    _, sizes = ray_session.get(recorder.report.remote())
    assert sizes["1"] == [1, 5]


def test_a_kind_without_a_pool_fails_its_batches(ray_session: Any) -> None:
    sender = RaySender({})
    sender.submit(make_hook(3), delivery(3, 0))
    [(d, outcome)] = drain(sender, 1)
    assert d.id == "3-0" and not outcome.ok and outcome.error == "TransportUnavailable"
