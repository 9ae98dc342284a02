"""The test receiver (engine.receiver, used by the tests, the demo and the benchmarks):
``fail_first`` counts requests as they arrive, and a start that cannot listen says why."""

from __future__ import annotations

import concurrent.futures
import socket
import time
import urllib.error
import urllib.request

import pytest

from engine.receiver import Receiver


def post(url: str) -> int:
    request = urllib.request.Request(url, data=b'[{"a": 1}]', method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_fail_first_fails_the_first_requests_to_arrive_even_when_they_overlap() -> None:
    """The attempt was counted from the requests recorded, after their delay: six at
    once all counted as the first, and all failed."""
    with Receiver() as receiver:
        receiver.behave("/flaky", fail_first=2, delay_sec=0.3)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(post, [receiver.url("/flaky")] * 6))
        assert sorted(statuses) == [200] * 4 + [500] * 2
        assert receiver.delivered_count("/flaky") == 4


def test_a_receiver_that_cannot_listen_says_why_at_once() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="address already in use"):
            Receiver(port=taken.getsockname()[1]).start()
        assert time.monotonic() - started < 5  # not the 10 s wait, then a bare "did not start"
    finally:
        taken.close()
