"""A re-send or replayed dead letter made under a larger MAX_BATCH_BYTES (or before a
hook's limits were lowered) is posted by the HTTP transport in pieces within the
installation's MAX_BATCH_BYTES as well as its message counts: no request carries more
bytes of messages than a batch the partitions make now, one larger message alone.
Bytes are counted as the partitions count a batch's (its messages' own bytes), so a
batch they made is never cut."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import actors.transport as transport_actor
from engine.errors import ConnectError, Rejected, TransportError
from engine.hooks import HttpBatch
from engine.receiver import Receiver
from engine.settings import Settings
from engine.transports.base import Delivery, Outcome
from engine.transports.http import HttpTransport

TARGET = HttpBatch(url="http://127.0.0.1:9/x", max_batch_size=1000)


def _message(n: int, size: int) -> bytes:
    """A JSON message of exactly ``size`` bytes, numbered ``n``."""
    head = json.dumps({"n": n, "pad": ""}).encode()
    return json.dumps({"n": n, "pad": "x" * (size - len(head))}).encode()


def _delivery(sizes: list[int]) -> Delivery:
    return Delivery(id="d", hook_id=1, account_id=1, kind="http_batch",
                    parts=[_message(n, size) for n, size in enumerate(sizes)])


def _posted(transport: HttpTransport, delivery: Delivery, target: HttpBatch = TARGET,
            fail: dict[int, TransportError] | None = None
            ) -> tuple[Outcome, list[list[int]]]:
    """The outcome of sending ``delivery`` and the message numbers of each request
    (those ``fail`` numbers, from 1, fail with its error instead of being posted)."""
    requests: list[list[int]] = []

    async def post(_: HttpBatch, body: bytes) -> Outcome:
        requests.append([m["n"] for m in json.loads(body)])
        if fail and len(requests) in fail:
            raise fail[len(requests)]
        return Outcome(ok=True, status=200, detail="OK")

    transport.post = post  # type: ignore[method-assign]
    return asyncio.run(transport.send(target, delivery)), requests


def test_a_resend_over_max_batch_bytes_goes_in_pieces_of_at_most_that_many_bytes() -> None:
    """200 messages of 1,700 bytes (340,000 bytes, a re-send made under the default 8
    MiB) with MAX_BATCH_BYTES 64 KiB: pieces of 38 messages (64,600 bytes; 39 would be
    66,300), in order, each message once."""
    outcome, requests = _posted(HttpTransport(max_batch_bytes=65536), _delivery([1700] * 200))
    assert outcome.ok, outcome
    assert [len(r) for r in requests] == [38, 38, 38, 38, 38, 10]
    assert [n for r in requests for n in r] == list(range(200))
    assert outcome.detail.startswith("200 messages in 6 requests of at most 1000 messages "
                                     "and 65536 bytes of messages; last answer: OK")


def test_a_batch_the_partitions_could_make_is_one_request() -> None:
    """Messages of exactly MAX_BATCH_BYTES together (the most a partition puts in a
    batch: its messages' bytes, not the body's brackets and commas) and a single
    message larger than it (which a partition sends alone) are not cut."""
    outcome, requests = _posted(HttpTransport(max_batch_bytes=4096), _delivery([1024] * 4))
    assert outcome.ok and requests == [[0, 1, 2, 3]]
    assert outcome.detail == "OK"  # as any one-request delivery says
    outcome, requests = _posted(HttpTransport(max_batch_bytes=4096), _delivery([5000]))
    assert outcome.ok and requests == [[0]] and outcome.detail == "OK"
    # one byte more than the limit: cut
    _, requests = _posted(HttpTransport(max_batch_bytes=4095), _delivery([1024] * 4))
    assert requests == [[0, 1, 2], [3]]


def test_a_message_larger_than_max_batch_bytes_goes_alone_and_counts_still_rule() -> None:
    sizes = [600, 300, 5000, 100, 100, 100, 100, 100, 900]
    outcome, requests = _posted(HttpTransport(max_batch_bytes=1024), _delivery(sizes))
    assert outcome.ok
    assert requests == [[0, 1], [2], [3, 4, 5, 6, 7], [8]]
    # the smaller of the two bounds closes each piece: here MAX_HTTP_BATCH (3) ...
    _, requests = _posted(HttpTransport(max_batch=3, max_batch_bytes=1024), _delivery(sizes))
    assert requests == [[0, 1], [2], [3, 4, 5], [6, 7], [8]]
    # ... or the hook's own max_batch_size (2)
    small = HttpBatch(url="http://127.0.0.1:9/x", max_batch_size=2)
    _, requests = _posted(HttpTransport(max_batch_bytes=1024), _delivery(sizes), small)
    assert requests == [[0, 1], [2], [3, 4], [5, 6], [7, 8]]


def _refused() -> Rejected:
    exc = Rejected("HTTP 413: status is not 200; body: too large")
    exc.status = 413
    return exc


def test_a_refused_piece_fails_only_its_own_messages() -> None:
    """Pieces cut by bytes fail as pieces cut by count do: a refused one names its
    messages' positions and the others go on; an unreachable destination stops the
    pieces, naming every message from its piece on; all refused: the whole delivery."""
    transport = HttpTransport(max_batch_bytes=4096)
    sizes = [1500] * 10  # pieces [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]
    outcome, requests = _posted(transport, _delivery(sizes), fail={2: _refused()})
    assert not outcome.ok and outcome.status == 413 and outcome.error == "Rejected"
    assert outcome.failed == [2, 3]
    assert requests == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # every one had its attempt
    outcome, requests = _posted(transport, _delivery(sizes),
                                fail={2: _refused(), 3: ConnectError("connection refused")})
    assert not outcome.ok and outcome.error == "ConnectError"
    assert outcome.failed == [2, 3, 4, 5, 6, 7, 8, 9]
    assert len(requests) == 3  # the rest wait for the re-send
    outcome, _ = _posted(transport, _delivery(sizes), fail={n: _refused() for n in range(1, 6)})
    assert not outcome.ok and outcome.failed is None
@pytest.mark.integration
def test_the_http_transport_actor_posts_a_resend_within_max_batch_bytes(
        monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    """The transport actor gives its HTTP transport the installation's MAX_BATCH_BYTES
    (as MAX_HTTP_BATCH): a re-send made under 8 MiB reaches a receiver that takes 64 KiB
    in requests it takes, the messages in order."""
    monkeypatch.setattr(transport_actor, "relax_gc", lambda: None)
    actor_class = transport_actor.TransportActor.__ray_metadata__.modified_class
    settings = Settings(MAX_BATCH_BYTES=65536, DESTINATION_DENY="none")
    actor: Any = actor_class("http_batch", settings.model_dump())
    target = HttpBatch(url=receiver.url("/small"), max_batch_size=10_000)

    async def send() -> Outcome:
        try:
            return await actor.transport.send(target, _delivery([1700] * 200))
        finally:
            await actor.transport.close()

    outcome = asyncio.run(send())
    assert outcome.ok, outcome
    requests = receiver.requests("/small")
    assert [len(r.messages) for r in requests] == [38, 38, 38, 38, 38, 10]
    assert all(sum(len(json.dumps(m, separators=(",", ":"))) for m in r.messages) <= 65536
               for r in requests)
    assert [m["n"] for m in receiver.messages("/small")] == list(range(200))
