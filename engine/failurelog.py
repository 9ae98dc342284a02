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
    def __init__(self, who: str) -> None:
        self.who = who  # "partition 3", "retry worker"
        self.hooks: dict[int, _Tally] = {}
        self.said = -EVERY_SEC

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
        self.say()

    def say(self, now: float | None = None) -> None:
        """Log what failed since the last summary, if one is due."""
        now = time.monotonic() if now is None else now
        if not self.hooks or now - self.said < EVERY_SEC:
            return
        worst = sorted(self.hooks.items(), key=lambda item: -item[1].failed)
        for hook_id, t in worst[:MAX_HOOKS]:
            dead = f", {t.dead} dead-lettered" if t.dead else ""
            log.warning("%s: hook %d (account %d, %s): %d message(s) failed%s since the "
                        "last such line; last error: %s", self.who, hook_id, t.account_id,
                        t.kind, t.failed, dead, t.last_error[:300])
        if len(worst) > MAX_HOOKS:
            rest = worst[MAX_HOOKS:]
            log.warning("%s: and %d more hook(s): %d message(s) failed, %d dead-lettered",
                        self.who, len(rest), sum(t.failed for _, t in rest),
                        sum(t.dead for _, t in rest))
        self.hooks.clear()
        self.said = now
