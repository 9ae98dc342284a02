"""A partition's sender keeps each hook's target settings (secrets included) only as
long as the hook itself: every change of any hook reloads all of them, and the old
copies, with a deleted hook's token, must not pile up in the worker."""

from __future__ import annotations

import gc
import json

from actors.sender import RaySender
from engine.hooks import Hook, parse_hook


def hooks(version: int, count: int = 50) -> list[Hook]:
    """The hooks as a reload after change ``version`` makes them: new objects."""
    return [parse_hook({
        "id": n, "name": f"h{n}", "account_id": 1, "actions": ["click"],
        "target": {"http_batch": {"url": f"http://127.0.0.1:9/{n}",
                                  "auth": {"kind": "bearer", "token": f"tok-{n}-{version}"}}},
    }) for n in range(1, count + 1)]


def test_the_target_of_a_hook_is_kept_no_longer_than_the_hook() -> None:
    sender = RaySender({})
    for version in range(20):
        current = hooks(version)
        for hook in current:
            shown = json.loads(sender._target(hook))
            # the transport actor gets the secret itself, of this version
            assert shown["auth"]["token"] == f"tok-{hook.id}-{version}"
            assert sender._target(hook) is sender._target(hook)  # made once per hook
    gc.collect()
    assert len(sender._targets) == 50  # the live hooks', not 20 versions' of them
    kept = "".join(text for _, text in sender._targets.values())
    assert "tok-1-19" in kept and "tok-1-18" not in kept
    del current, hook  # the last hooks deleted: nothing of theirs stays
    gc.collect()
    assert sender._targets == {}
