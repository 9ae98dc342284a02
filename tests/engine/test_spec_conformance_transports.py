"""Transports and retries against the specification's sections (e) and (f), no Ray, no
network: request bodies are captured where they would be posted."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import actors.transport as transport_actor
from engine.hooks import HttpBatch
from engine.settings import Settings
from engine.transports.base import Delivery, Outcome
from engine.transports.http import HttpTransport


def _delivery(n: int) -> Delivery:
    return Delivery(id="d", hook_id=1, account_id=1, kind="http_batch",
                    parts=[json.dumps({"n": i}).encode() for i in range(n)])


def _posted_sizes(transport: HttpTransport, target: HttpBatch, delivery: Delivery
                  ) -> tuple[Outcome, list[int]]:
    """The outcome of sending ``delivery`` and the message count of each request."""
    sizes: list[int] = []

    async def post(_: HttpBatch, body: bytes) -> Outcome:
        sizes.append(len(json.loads(body)))
        return Outcome(ok=True, status=200, detail="OK")

    transport.post = post  # type: ignore[method-assign]
    return asyncio.run(transport.send(target, delivery)), sizes


def test_no_http_request_carries_more_than_max_http_batch_messages() -> None:
    """A batch made under other limits (for a broker target, before MAX_HTTP_BATCH was
    lowered) and re-sent to an HTTP hook goes in requests of at most MAX_HTTP_BATCH
    messages, the installation's bound on any hook's batch size."""
    target = HttpBatch(url="http://127.0.0.1:9/x", max_batch_size=100)
    outcome, sizes = _posted_sizes(HttpTransport(max_batch=3), target, _delivery(7))
    assert outcome.ok, outcome
    assert sizes == [3, 3, 1]
    # a hook's own smaller max_batch_size still rules
    small = HttpBatch(url="http://127.0.0.1:9/x", max_batch_size=2)
    _, sizes = _posted_sizes(HttpTransport(max_batch=3), small, _delivery(5))
    assert sizes == [2, 2, 1]
    # no bound given: only the hook's
    _, sizes = _posted_sizes(HttpTransport(), target, _delivery(7))
    assert sizes == [7]


@pytest.mark.parametrize(("kind", "expected"), [("http_batch", (40, 65536)),
                                                 ("stub", (None, None))])
def test_the_http_transport_actor_is_bounded_by_the_installations_max_http_batch(
        monkeypatch: pytest.MonkeyPatch, kind: str,
        expected: tuple[int | None, int | None]) -> None:
    """MAX_HTTP_BATCH and MAX_BATCH_BYTES: no request carries more (a re-send made under
    larger limits is posted in pieces)."""
    made: dict[str, Any] = {}

    def load(kind: str, **options: Any) -> object:
        made.update(options, kind=kind)
        return object()

    monkeypatch.setattr(transport_actor, "load_transport", load)
    monkeypatch.setattr(transport_actor, "relax_gc", lambda: None)
    actor_class = transport_actor.TransportActor.__ray_metadata__.modified_class
    actor_class(kind, Settings(MAX_HTTP_BATCH=40, MAX_BATCH_BYTES=65536).model_dump())
    assert made["kind"] == kind
    assert (made.get("max_batch"), made.get("max_batch_bytes")) == expected
