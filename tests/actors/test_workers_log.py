"""The actors' loop error reporting: the same error is said once a minute, not every
round (a loop failing twice a second for one cause would flood the log)."""

from __future__ import annotations

import logging
import threading

import pytest

from actors import workers
from actors.workers import _Looping


def test_a_repeated_loop_error_is_logged_once_a_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    loop = _Looping()
    loop._thread = threading.Thread(name="partition-0")
    loop._errors, loop._last_said, loop._said_at = 0, "", 0.0
    with caplog.at_level(logging.WARNING, logger="hookray"):
        for _ in range(10):  # five seconds of a round failing twice a second
            loop._on_error(RuntimeError("stored hook 7 no longer validates"))
            clock[0] += 0.5
        loop._on_error(ValueError("another cause"))  # a new cause: said at once
        clock[0] += workers.REPEAT_SEC
        loop._on_error(ValueError("another cause"))  # a minute on: said again
    said = [r.getMessage() for r in caplog.records]
    assert said == ["partition-0: stored hook 7 no longer validates (retrying)",
                    "partition-0: another cause (retrying)",
                    "partition-0: another cause (retrying)"]
    assert loop._errors == 12  # every failed round is counted
