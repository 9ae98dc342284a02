"""FailureLog: a worker's failed deliveries in its log, per hook, once a minute."""

from __future__ import annotations

import logging

import pytest

import engine.failurelog
from engine.failurelog import MAX_HOOKS, FailureLog


def test_each_hook_is_said_at_once_then_once_a_minute_and_many_are_summed(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(engine.failurelog.time, "monotonic", lambda: clock[0])
    failures = FailureLog("partition 0")

    def said() -> list[str]:
        lines = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return lines

    with caplog.at_level(logging.WARNING, logger="hookray"):
        failures.failed(1, 1, "http_batch", 5, "ConnectError: refused", dead=False)
        assert said() == ["partition 0: hook 1 (account 1, http_batch): 5 message(s) failed "
                          "since the last such line; last error: ConnectError: refused"]
        clock[0] += 10  # another hook's first failure: said at once too
        failures.failed(2, 7, "kafka", 3, "Timeout: no answer", dead=True)
        assert said() == ["partition 0: hook 2 (account 7, kafka): 3 message(s) failed, 3 "
                          "dead-lettered since the last such line; last error: Timeout: "
                          "no answer"]
        clock[0] += 10
        failures.failed(1, 1, "http_batch", 5, "ConnectError: refused", dead=False)
        failures.failed(1, 1, "http_batch", 5, "HTTP 500", dead=True)
        assert said() == []  # hook 1 was said 20 s ago
        clock[0] += 41
        failures.say()
        assert said() == ["partition 0: hook 1 (account 1, http_batch): 10 message(s) "
                          "failed, 5 dead-lettered since the last such line; last error: "
                          "HTTP 500"]
        clock[0] += 60  # many hooks at once: MAX_HOOKS lines, the others summed
        for hook_id in range(100, 100 + MAX_HOOKS + 5):
            failures.failed(hook_id, 1, "http_batch", 1, "HTTP 503", dead=False)
        lines = said()  # each at once, while the minute has room for them
        assert len(lines) == MAX_HOOKS, lines
        failures.say()  # the worker's round: the others summed
        assert said() == ["partition 0: and 5 more hook(s): 5 message(s) failed, "
                          "0 dead-lettered"]
        failures.say()
        assert said() == []  # nothing left to say
