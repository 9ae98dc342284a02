"""In-memory stub transport for unit tests and demos: records deliveries, no I/O.

``StubTransport(fail_first=N)`` fails the first N sends of every delivery id;
``always_fail=True`` fails every send.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from engine.errors import Rejected
from engine.transports.base import Delivery, Outcome, Transport


class StubTransport(Transport):
    kind = "stub"

    def __init__(self, fail_first: int = 0, always_fail: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.sent: list[Delivery] = []
        self.attempts: Counter[str] = Counter()

    async def _deliver(self, target: Any, delivery: Delivery) -> Outcome:
        self.attempts[delivery.id] += 1
        if self.always_fail or self.attempts[delivery.id] <= self.fail_first:
            raise Rejected(f"stub failure #{self.attempts[delivery.id]}")
        self.sent.append(delivery)
        return Outcome(ok=True, detail=f"stub accepted {delivery.count} message(s)")


TRANSPORTS = {"stub": StubTransport}
