"""MAX_HOOKS_PER_ACCOUNT: an account's hooks are bounded (each matching hook holds a
copy of its messages in a partition's round; every hook change reloads them all)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from engine.errors import HookError
from engine.keys import Keys
from engine.stores import HookRegistry


def hook(account: int, name: str) -> dict[str, Any]:
    return {"name": name, "account_id": account, "actions": ["click"],
            "target": {"http_batch": {"url": "http://127.0.0.1:9/in"}}}


def test_an_account_at_its_bound_can_create_and_clone_no_more_hooks(
        redis_client: redis.Redis, keys: Keys) -> None:
    registry = HookRegistry(redis_client, keys, max_per_account=3)
    first = registry.create(hook(1, "a"))
    registry.create(hook(1, "b"))
    registry.create(hook(2, "other account"))  # counted for its own account only
    registry.create(hook(1, "c"))
    with pytest.raises(HookError) as refused:
        registry.create(hook(1, "d"))
    reason = "the account has 3 hooks, the most MAX_HOOKS_PER_ACCOUNT (3) allows: " \
        "delete one first"
    assert refused.value.issues == [("account_id", reason)]
    with pytest.raises(HookError, match="MAX_HOOKS_PER_ACCOUNT"):
        registry.clone(first.id or 0)
    assert sorted(h.name for h in registry.all(1)) == ["a", "b", "c"]
    registry.delete(first.id or 0)  # room again
    assert registry.create(hook(1, "d")).name == "d"
    assert HookRegistry(redis_client, keys).create(hook(1, "e")).name == "e"  # no bound


async def test_the_api_refuses_a_hook_past_the_bound_with_422_naming_account_id(
        redis_client: redis.Redis, keys: Keys) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from engine.api import create_app
    from engine.auth import TokenStore
    from engine.settings import Settings

    url = redis_client.connection_pool.connection_kwargs
    settings = Settings(REDIS_URL=f"redis://127.0.0.1:{url['port']}/{url['db']}",
                        REDIS_PREFIX=keys.p, MAX_HOOKS_PER_ACCOUNT=1)
    token, _ = TokenStore(redis_client, keys.p).create(1, "master")
    body = {k: v for k, v in hook(1, "a").items() if k != "account_id"}
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.post("/v1/hooks", json=body, headers=headers) as rsp:
            assert rsp.status == 201
        async with client.post("/v1/hooks", json={**body, "name": "b"},
                               headers=headers) as rsp:
            answer = await rsp.json()
    assert rsp.status == 422, answer
    assert [i["field"] for i in answer["error"]["issues"]] == ["account_id"], answer


def test_a_hooks_file_past_the_bound_is_refused_before_anything_is_created(
        redis_client: redis.Redis, keys: Keys, tmp_path: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`hooks create FILE` stays all or none, and `run --hooks` is refused before it
    starts, when the file's new hooks would take an account past the bound."""
    import json

    from actors.cli import _check_run_hooks, main
    from engine.catalogue import load_catalogue

    url = redis_client.connection_pool.connection_kwargs
    config = tmp_path / "main.json"
    config.write_text(json.dumps({
        "REDIS_URL": f"redis://127.0.0.1:{url['port']}/{url['db']}",
        "REDIS_PREFIX": keys.p, "MAX_HOOKS_PER_ACCOUNT": 2}))
    HookRegistry(redis_client, keys).create(hook(1, "stored"))
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([hook(1, "a"), hook(1, "b"), hook(2, "c")]))
    assert main(["-c", str(config), "hooks", "create", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing created; account 1: 1 hook(s) stored and 2 new in the file, more than " \
        "MAX_HOOKS_PER_ACCOUNT (2) allows" in err, err
    assert [h.name for h in HookRegistry(redis_client, keys).all()] == ["stored"]
    listed = [(str(path), n, data) for n, data in enumerate(json.loads(path.read_text()))]
    with pytest.raises(HookError, match=r"nothing started; account 1: 1 hook\(s\) stored"):
        _check_run_hooks(load_catalogue(None), listed, "", {(1, "stored")}, {1: 1}, 2)
    # a hook of the file stored already is not new: no more than the bound
    _check_run_hooks(load_catalogue(None), listed[:1] + listed[2:], "",
                     {(1, "stored")}, {1: 1}, 2)
