"""The driver's conditional hook changes (``expect=``, as the HTTP API's If-Match): a
change made on a hook read before another change is refused, not made over it."""

from __future__ import annotations

from typing import Any

import pytest

from actors.driver import Engine
from engine.errors import Stale
from engine.settings import Settings


def hook() -> dict[str, Any]:
    return {"name": "crm", "active": True, "account_id": 1, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/in",
                                      "auth": {"kind": "bearer", "token": "s3cr3t-token"}}}}


def test_an_update_made_on_a_hook_read_before_a_stop_does_not_undo_the_stop(
        settings: Settings) -> None:
    engine = Engine.connect(settings)
    try:
        created = engine.create_hook(hook())
        read = engine.get_hook(created.id or 0)  # a script reads it...
        engine.stop_hook(created.id or 0)  # ...an operator stops it meanwhile
        edited = {**read.display(), "name": "crm (edited)"}
        with pytest.raises(Stale, match=f"hook {created.id} changed since it was read"):
            engine.update_hook(created.id or 0, edited, expect=read)
        assert engine.get_hook(created.id or 0).active is False  # the stop stands
        now = engine.get_hook(created.id or 0)
        updated = engine.update_hook(created.id or 0, {**now.display(), "name": "crm 2"},
                                     expect=now)
        assert updated.name == "crm 2" and updated.active is False
        assert updated.target.http_batch.auth.token.get_secret_value() == "s3cr3t-token"  # type: ignore[union-attr]
        with pytest.raises(Stale):
            engine.activate_hook(created.id or 0, expect=now)  # read before the update
        assert engine.activate_hook(created.id or 0, expect=updated).active is True
        with pytest.raises(ValueError, match="expect must be the Hook as read"):
            engine.stop_hook(created.id or 0, expect="etag")  # type: ignore[arg-type]
        assert engine.update_hook(created.id or 0, {**now.display(), "name": "x"}).name == "x"
    finally:
        engine.redis.close()
