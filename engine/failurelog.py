"""Failed deliveries in the engine's log: a worker's failures and dead letters, one
line per hook, at once for the first and then at most once a minute (a destination
down fails every batch of its hooks; the log says which hooks fail, how much and why,
without a line per batch). The hooks' stats count the same, per hook."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("hookray")

EVERY_SEC = 60.0
MAX_HOOKS = 10  # hooks named in one summary; the rest are counted


@dataclass(slots=True)
class _Tally:
    account_id: int
    kind: str
    failed: int = 0  # messages whose delivery failed (to be sent again, or dead)
    dead: int = 0  # of which dead-lettered
    last_error: str = ""


class FailureLog:
    """A worker's failed deliveries, logged per hook: a hook's first at once, then one
    line a minute at most while they go on; at most MAX_HOOKS hook lines a minute in
    all, the other hooks then summed in one line a minute."""

    def __init__(self, who: str) -> None:
        self.who = who  # "partition 3", "retry worker"
        self.hooks: dict[int, _Tally] = {}  # failures not said yet, by hook
        self.said_at: dict[int, float] = {}  # when each hook was last said
        self.window = (-EVERY_SEC, 0)  # (start of the minute, hook lines said in it)
        self.rest_said = -EVERY_SEC  # when the other hooks were last summed
        self.looked_at = -EVERY_SEC  # when say() last looked at every hook waiting

    def failed(self, hook_id: int, account_id: int, kind: str, messages: int, error: str,
               dead: bool) -> None:
        """``messages`` of a hook's delivery failed (``error``, secrets already
        scrubbed); ``dead``: they became dead letters."""
        tally = self.hooks.get(hook_id)
        if tally is None:
            tally = self.hooks[hook_id] = _Tally(account_id, kind)
        tally.failed += messages
        tally.dead += messages if dead else 0
        tally.last_error = error
        # this hook alone, at once if due (a look at every hook waiting to be said, at
        # each failure, would cost as much as hooks times failures)
        now = time.monotonic()
        if now - self.said_at.get(hook_id, -EVERY_SEC) >= EVERY_SEC:
            start, lines = self._window(now)
            if lines < MAX_HOOKS:
                self._say(hook_id, now)
                self.window = (start, lines + 1)

    def _window(self, now: float) -> tuple[float, int]:
        """(start of the current minute, hook lines said in it)."""
        start, lines = self.window
        return (now, 0) if now - start >= EVERY_SEC else (start, lines)

    def _say(self, hook_id: int, now: float) -> None:
        t = self.hooks.pop(hook_id)
        dead = f", {t.dead} dead-lettered" if t.dead else ""
        log.warning("%s: hook %d (account %d, %s): %d message(s) failed%s since the last "
                    "such line; last error: %s", self.who, hook_id, t.account_id, t.kind,
                    t.failed, dead, t.last_error[:300])
        self.said_at[hook_id] = now

    def say(self, now: float | None = None) -> None:
        """Log the failures of the hooks not said in the last minute (a look at every
        hook waiting: once a second at most)."""
        if not self.hooks:
            return
        now = time.monotonic() if now is None else now
        if now - self.looked_at < 1.0:
            return
        self.looked_at = now
        due = [h for h in self.hooks if now - self.said_at.get(h, -EVERY_SEC) >= EVERY_SEC]
        if not due:
            return
        start, lines = self._window(now)
        due.sort(key=lambda h: -self.hooks[h].failed)
        room = max(0, MAX_HOOKS - lines)
        for hook_id in due[:room]:
            self._say(hook_id, now)
        self.window = (start, lines + len(due[:room]))
        rest = due[room:]
        if rest and now - self.rest_said >= EVERY_SEC:
            tallies = [self.hooks.pop(h) for h in rest]
            log.warning("%s: and %d more hook(s): %d message(s) failed, %d dead-lettered",
                        self.who, len(rest), sum(t.failed for t in tallies),
                        sum(t.dead for t in tallies))
            self.rest_said = now
        if len(self.said_at) > 4 * MAX_HOOKS:  # hooks said over a minute ago: forgotten
            self.said_at = {h: at for h, at in self.said_at.items()
                            if now - at < EVERY_SEC}
