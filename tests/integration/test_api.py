"""The HTTP API: every route, both roles, cross-account refusal, every error code.

Most tests run ``engine.api.create_app`` on a real aiohttp server on 127.0.0.1
against real Redis (no actors: an event is accepted once it is in the intake
stream); the last one starts the API actor on Ray and follows events through
the running engine to a receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import openapi_spec_validator
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from actors.cli import main as cli_main
from engine.api import ERROR_CODES, MASK, OPENAPI_PATH, create_app, routes
from engine.auth import TokenStore, tokens_key
from engine.errors import NotFound
from engine.health import Heartbeat
from engine.intake import decode_entry
from engine.keys import Keys
from engine.receiver import Receiver
from engine.settings import Settings
from engine.stores import HookRegistry, RetryStore, Stats
from engine.transports.base import Delivery, now_ms

pytestmark = pytest.mark.integration

DATE = "2026-11-29T10:00:00.123456789Z"
# bodies POST /v1/dead-letters/replay and /discard refuse (422): no ids and no "all",
# an empty or non-string id, "all" false, ids with "all", ids with a filter, an
# unknown key, not an object
BAD_MOVE_BODIES: list[Any] = [
    {}, {"ids": []}, {"ids": [1]}, {"all": False}, {"ids": ["x"], "all": True},
    {"ids": ["x"], "hook_id": 1}, {"all": True, "hook": 1}, ["x"]]


def events(n: int, account_id: int = 1, **extra: Any) -> list[dict[str, Any]]:
    types = ("click", "open", "deliv", "send")
    return [{"event_type": types[i % 4], "event_date": DATE, "account_id": account_id,
             "list_id": 1 + i % 3, "event_data": {"campaign_id": 7, "message_id": 5}, **extra}
            for i in range(n)]


def hook_body(url: str = "http://127.0.0.1:9/hook", **extra: Any) -> dict[str, Any]:
    return {"name": "crm", "actions": ["click", "open", "deliv"],
            "target": {"http_batch": {"url": url, "max_batch_size": 50, "flush_timeout_sec": 0.3,
                                      "auth": {"kind": "bearer", "token": "s3cr3t"}}},
            **extra}


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        assert set(self.body) == {"error"}, self.body
        return dict(self.body["error"])


@dataclass
class Api:
    client: TestClient[Any, Any]
    settings: Settings
    r: redis.Redis
    master: str  # account 1
    ingest: str  # account 1
    other: str  # master of account 2
    other_ingest: str  # account 2

    async def call(self, method: str, path: str, token: str | None = None, *,
                   json_body: Any = None, data: bytes | str | None = None,
                   headers: dict[str, str] | None = None) -> Answer:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body)
            headers.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=headers) as rsp:
            raw = await rsp.read()
            body = json.loads(raw) if raw else None
            return Answer(rsp.status, body, rsp.headers)

    def intake(self) -> list[dict[str, Any]]:
        """Every event in the intake streams."""
        keys = Keys(self.settings.REDIS_PREFIX)
        out = []
        for n in range(self.settings.PARTITIONS):
            entries: list[tuple[bytes, dict[bytes, bytes]]] = self.r.xrange(  # type: ignore[assignment]
                keys.intake(n))
            for _, fields in entries:
                out += msgspec.to_builtins(decode_entry(fields))
        return out

    async def create(self, token: str | None = None, **extra: Any) -> dict[str, Any]:
        answer = await self.call("POST", "/v1/hooks", token or self.master,
                                 json_body=hook_body(**extra))
        assert answer.status == 201, answer.body
        return dict(answer.body)


async def start_api(settings: Settings, r: redis.Redis) -> tuple[TestClient[Any, Any], Api]:
    tokens = TokenStore(r, settings.REDIS_PREFIX)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    api = Api(client, settings, r, tokens.create(1, "master", "m1")[0],
              tokens.create(1, "ingest", "i1")[0], tokens.create(2, "master", "m2")[0],
              tokens.create(2, "ingest", "i2")[0])
    return client, api


@pytest.fixture
async def api(settings: Settings, redis_client: redis.Redis) -> AsyncIterator[Api]:
    client, api = await start_api(settings, redis_client)
    yield api
    await client.close()


# every route with a valid request shape (ids are filled in by the tests)
ROUTES = [("POST", "/v1/events"), ("GET", "/v1/hooks"), ("POST", "/v1/hooks"),
          ("GET", "/v1/hooks/{id}"), ("PUT", "/v1/hooks/{id}"), ("DELETE", "/v1/hooks/{id}"),
          ("POST", "/v1/hooks/{id}/activate"), ("POST", "/v1/hooks/{id}/stop"),
          ("POST", "/v1/hooks/{id}/clone"), ("POST", "/v1/hooks/{id}/test"),
          ("GET", "/v1/hooks/{id}/stats"), ("GET", "/v1/stats"), ("GET", "/v1/dead-letters"),
          ("POST", "/v1/dead-letters/replay"), ("POST", "/v1/dead-letters/discard"),
          ("GET", "/v1/openapi.json"), ("GET", "/v1/health")]
MASTER_ROUTES = [r for r in ROUTES if r not in (("POST", "/v1/events"), ("GET", "/v1/health"),
                                                ("GET", "/v1/openapi.json"))]


# --- the description --------------------------------------------------------------------


async def test_openapi_is_served_equal_to_the_file_and_describes_every_route(
        api: Api) -> None:
    answer = await api.call("GET", "/v1/openapi.json")  # no token needed
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    served = answer.body
    assert served == json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    described = {(m.upper(), p) for p, item in served["paths"].items()
                 for m in item if m != "parameters"}
    assert set(routes(api.client.app)) == described == set(ROUTES)
    assert served["openapi"].startswith("3.1")
    # every error code the server answers with is in the description's enum, and back
    error = served["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == set(ERROR_CODES.values())
    # every route reads a body sent to it (400, 413, 415) and may fail (500)
    for path, item in served["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            documented = set(operation["responses"])
            assert {"400", "405", "413", "415", "500"} <= documented, (method, path)
            if (method.upper(), path) not in (("GET", "/v1/openapi.json"),
                                              ("GET", "/v1/health")):
                assert {"401", "403"} <= documented, (method, path)
            assert all(int(code) < 300 or int(code) in ERROR_CODES for code in documented)
    openapi_spec_validator.validate(served)


# --- tokens and roles -------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer nonsense",
                                    "Bearer hr_0123456789abcdef_" + "A" * 43])
async def test_every_route_but_the_description_needs_a_known_token(
        api: Api, header: str | None) -> None:
    hook = await api.create()
    for method, path in [*MASTER_ROUTES, ("POST", "/v1/events")]:
        headers = {"Authorization": header} if header else {}
        answer = await api.call(method, path.format(id=hook["id"]), headers=headers,
                                json_body={})
        assert answer.status == 401, (method, path)
        assert answer.error["code"] == "unauthorized"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


async def test_ingest_token_may_only_publish(api: Api) -> None:
    hook = await api.create()
    for method, path in MASTER_ROUTES:
        answer = await api.call(method, path.format(id=hook["id"]), api.ingest, json_body={})
        assert answer.status == 403, (method, path)
        assert answer.error["code"] == "forbidden"
        assert "master token" in answer.error["message"]
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=events(3))
    assert (answer.status, answer.body) == (202, {"accepted": 3})
    # the master token publishes too
    answer = await api.call("POST", "/v1/events", api.master, json_body=events(2))
    assert (answer.status, answer.body) == (202, {"accepted": 2})
    assert len(api.intake()) == 5


async def test_tokens_are_stored_hashed_listed_and_revoked_at_once(api: Api) -> None:
    store = TokenStore(api.r, api.settings.REDIS_PREFIX)
    token, info = store.create(7, "ingest", "pipeline")
    raw: dict[bytes, bytes] = api.r.hgetall(  # type: ignore[assignment]
        tokens_key(api.settings.REDIS_PREFIX))
    assert token.encode() not in b"".join([*raw, *raw.values()])
    record = json.loads(raw[info.id.encode()])
    assert set(record) == {"account_id", "role", "name", "hash", "created"}
    assert [i.id for i in store.list(7)] == [info.id]
    assert store.authenticate(token) == info
    assert store.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    answer = await api.call("POST", "/v1/events", token, json_body=events(1, account_id=7))
    assert answer.status == 202
    store.revoke(info.id)
    answer = await api.call("POST", "/v1/events", token, json_body=events(1, account_id=7))
    assert answer.status == 401
    assert answer.error == {"code": "unauthorized", "message": "unknown or revoked token"}
    with pytest.raises(NotFound):
        store.revoke(info.id)
    with pytest.raises(ValueError, match="role"):
        store.create(1, "admin")
    other, other_info = store.create(7, "master")
    store.revoke(other)  # the token itself names its id
    assert store.authenticate(other) is None and store.list(7) == []
    with pytest.raises(NotFound, match=f"token {other_info.id} does not exist"):
        store.revoke(other)


def test_cli_creates_lists_and_revokes_tokens(settings: Settings, redis_client: redis.Redis,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "main.json"
    config.write_text(json.dumps({"REDIS_URL": settings.REDIS_URL,
                                  "REDIS_PREFIX": settings.REDIS_PREFIX}))
    assert cli_main(["-c", str(config), "tokens", "create", "--account", "4", "--role",
                     "ingest", "--name", "shop"]) == 0
    out, err = capsys.readouterr()
    created = json.loads(out)
    assert created["role"] == "ingest" and created["account_id"] == 4
    assert "shown once" in err
    store = TokenStore(redis_client, settings.REDIS_PREFIX)
    assert store.authenticate(created["token"]) is not None
    assert cli_main(["-c", str(config), "tokens", "list", "--account", "4"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0] and "hash" not in listed[0]
    assert cli_main(["-c", str(config), "tokens", "revoke", created["id"]]) == 0
    capsys.readouterr()
    assert store.authenticate(created["token"]) is None
    assert cli_main(["-c", str(config), "tokens", "revoke", created["id"]]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- events ---------------------------------------------------------------------------


async def test_json_array_of_500_events_is_in_the_intake_on_202(api: Api) -> None:
    posted = events(500)
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=posted)
    assert (answer.status, answer.body) == (202, {"accepted": 500})
    stored = api.intake()
    assert len(stored) == 500
    assert all(e["id"] for e in stored)  # ids assigned at intake
    assert sorted(e["event_type"] for e in stored) == sorted(e["event_type"] for e in posted)


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl",
                                          "text/plain", None])
async def test_ndjson_by_content_type_or_by_sniffing(api: Api, content_type: str | None) -> None:
    body = "\n".join(json.dumps(e) for e in events(4)) + "\n\n"
    headers = {"Content-Type": content_type} if content_type else {}
    answer = await api.call("POST", "/v1/events", api.ingest, data=body.encode(),
                            headers=headers)
    assert (answer.status, answer.body) == (202, {"accepted": 4})
    # a JSON array without a Content-Type is sniffed too
    answer = await api.call("POST", "/v1/events", api.ingest,
                            data=json.dumps(events(2)).encode(), headers=headers)
    if content_type in (None, "text/plain"):
        assert (answer.status, answer.body) == (202, {"accepted": 2})
    else:
        assert answer.status == 400  # an NDJSON type with an array body
    assert len(api.intake()) == (6 if content_type in (None, "text/plain") else 4)


async def test_bad_events_are_422_with_index_field_and_reason_and_nothing_is_accepted(
        api: Api) -> None:
    batch = events(5)
    batch[1]["event_type"] = "clack"
    batch[3]["event_date"] = "yesterday"
    del batch[4]["account_id"]
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=batch)
    assert answer.status == 422
    error = answer.error
    assert error["code"] == "validation_failed"
    assert "nothing accepted" in error["message"]
    assert [(i["index"], i["field"]) for i in error["issues"]] == [
        (1, "event_type"), (3, "event_date"), (4, "account_id")]
    assert all(i["reason"] for i in error["issues"])
    assert api.intake() == []
    # NDJSON: a line that is not JSON is a bad event at its index
    body = "\n".join([json.dumps(events(1)[0]), "{nope", json.dumps(events(1)[0])])
    answer = await api.call("POST", "/v1/events", api.ingest, data=body,
                            headers={"Content-Type": "application/x-ndjson"})
    assert answer.status == 422
    assert [i["index"] for i in answer.error["issues"]] == [1]
    assert api.intake() == []


async def test_partial_true_accepts_the_good_events_and_lists_the_bad_with_207(
        api: Api) -> None:
    batch = events(4)
    batch[2]["event_type"] = "clack"
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, json_body=batch)
    assert answer.status == 207
    assert answer.body["accepted"] == 3 and answer.body["rejected"] == 1
    assert answer.body["issues"] == [{"index": 2, "field": "event_type",
                                      "reason": "unknown event type 'clack'"}]
    assert len(api.intake()) == 3
    # all good with partial: a plain 202
    answer = await api.call("POST", "/v1/events?partial=1", api.ingest, json_body=events(2))
    assert (answer.status, answer.body) == (202, {"accepted": 2})
    # none good: nothing to accept, 422
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest,
                            json_body=[{"event_type": "clack"}])
    assert answer.status == 422
    assert len(api.intake()) == 5
    # the engine counts the bad events it refused: one left out, one refused
    stats = Keys(api.settings.REDIS_PREFIX).engine_stats
    assert api.r.hmget(stats, "events_accepted", "events_rejected") == [b"5", b"2"]
    answer = await api.call("POST", "/v1/events?partial=maybe", api.ingest, json_body=events(1))
    # a bad query parameter is 422 naming it, as a bad limit is
    assert answer.status == 422 and answer.error["code"] == "validation_failed"
    assert answer.error["issues"] == [{"field": "partial", "reason": "expected true or false "
                                       "(1 or 0, yes or no)"}]


@pytest.mark.parametrize(("extra", "field"), [
    ({"event_data": {"campaign_id": 7, "x": 2**64}}, "event_data.x"),
    ({"profile": {"x": -2**63 - 1}}, "profile.x"),
    ({"custom_data": {"x": 2**70}}, "custom_data.x"),
    ({"sends_trying_num": 2**64}, "sends_trying_num"),
    ({"subscription": [{"priority": 2**64}]}, "subscription[0].priority"),
])
async def test_an_integer_beyond_64_bits_is_a_bad_event_not_a_500(
        api: Api, extra: dict[str, Any], field: str) -> None:
    """JSON has no integer bound; the intake's msgpack a 64-bit one."""
    body = [*events(2), {**events(1)[0], **extra}]
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=body)
    assert answer.status == 422
    assert [(i["index"], i["field"]) for i in answer.error["issues"]] == [(2, field)]
    assert "cannot be encoded" in answer.error["issues"][0]["reason"]
    assert api.intake() == []
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, json_body=body)
    assert answer.status == 207
    assert answer.body["accepted"] == 2 and answer.body["issues"][0]["field"] == field
    ndjson = "\n".join(json.dumps(e) for e in [{**events(1)[0], **extra}, *events(1)])
    answer = await api.call("POST", "/v1/events", api.ingest, data=ndjson,
                            headers={"Content-Type": "application/x-ndjson"})
    assert answer.status == 422 and answer.error["issues"][0]["index"] == 0
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest,
                            json_body=[{**events(1)[0], **extra}])
    assert answer.status == 422
    assert len(api.intake()) == 2  # the good events of the partial request only


async def test_json_nested_too_deeply_is_refused_on_every_route_and_nothing_accepted(
        api: Api) -> None:
    """Decoding gives up (RecursionError) on such JSON; once answered 500. Events that
    decode but nest too deeply for a partition to read back are bad events."""
    deep = "[" * 5000 + "]" * 5000
    event = json.dumps(events(1)[0])[:-1] + ', "profile": {"x": %s}}'
    answer = await api.call("POST", "/v1/events", api.ingest, data=f"[{event % deep}]",
                            headers={"Content-Type": "application/json"})
    assert answer.status == 400
    assert answer.error["message"] == ("JSON nested too deeply (objects and arrays within "
                                       "each other)")
    lines = "\n".join([json.dumps(events(1)[0]), event % deep, event % ("[" * 950 + "]" * 950)])
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, data=lines,
                            headers={"Content-Type": "application/x-ndjson"})
    assert answer.status == 207 and answer.body["accepted"] == 1
    assert [(i["index"], i["field"]) for i in answer.body["issues"]] == [(1, "$"), (2, "profile")]
    assert all("nested too deeply" in i["reason"] for i in answer.body["issues"])
    assert len(api.intake()) == 1
    hook = await api.create()
    for method, path, body in (("POST", "/v1/hooks", '{"name": %s}'),
                               ("PUT", f"/v1/hooks/{hook['id']}", '{"name": %s}'),
                               ("POST", f"/v1/hooks/{hook['id']}/test", '{"event_type": %s}'),
                               ("POST", "/v1/dead-letters/replay", '{"ids": %s}')):
        answer = await api.call(method, path, api.master, data=body % deep,
                                headers={"Content-Type": "application/json"})
        assert answer.status == 400, path
        assert "nested too deeply" in answer.error["message"]


@pytest.mark.parametrize("partial", ["false", "true"])
async def test_an_event_of_another_account_is_403_and_nothing_is_accepted(
        api: Api, partial: str) -> None:
    batch = events(3) + events(1, account_id=2)
    answer = await api.call("POST", f"/v1/events?partial={partial}", api.ingest, json_body=batch)
    assert answer.status == 403
    assert answer.error["code"] == "forbidden"
    assert answer.error["issues"] == [{"index": 3, "field": "account_id",
                                       "reason": "account 2 is not the token's account 1"}]
    assert api.intake() == []
    answer = await api.call("POST", "/v1/events", api.other_ingest, json_body=events(1))
    assert answer.status == 403
    answer = await api.call("POST", "/v1/events", api.other_ingest,
                            json_body=events(1, account_id=2))
    assert answer.status == 202


@pytest.mark.parametrize(("body", "content_type", "words"), [
    (b'[{"event_type": "click",', "application/json", "malformed JSON"),
    (b"[1, 2", None, "malformed JSON"),
    (b'{"event_type": "click"}', "application/json", "expected a JSON array"),
])
async def test_malformed_event_bodies_are_400(api: Api, body: bytes, content_type: str | None,
                                              words: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = await api.call("POST", "/v1/events", api.ingest, data=body, headers=headers)
    assert answer.status == 400
    assert answer.error["code"] == "bad_request"
    assert words in answer.error["message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_a_body_its_content_encoding_does_not_decode_is_400(
        api: Api, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp raises RequestPayloadError reading such a body: once answered 500."""
    for path, body in (("/v1/events", json.dumps(events(2))),
                       ("/v1/hooks", json.dumps(hook_body()))):
        answer = await api.call("POST", path, api.master, data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": encoding})
        assert answer.status == 400, path
        assert answer.error == {"code": "bad_request", "message": (
            f"the request body is not what its Content-Encoding {encoding!r} says: it cannot "
            "be decoded; send it encoded so, or without that header")}
    assert api.intake() == [] and (await api.call("GET", "/v1/hooks", api.master)).body == {
        "hooks": [], "invalid": []}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    answer = await api.call("POST", "/v1/events", api.master, data=gzip.compress(
        json.dumps(events(2)).encode()), headers={"Content-Type": "application/json",
                                                  "Content-Encoding": "gzip"})
    assert answer.status == 202 and len(api.intake()) == 2


async def test_a_client_gone_before_its_body_was_read_is_one_line_not_a_traceback(
        settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
        ) -> None:
    """As when Locust stops with requests on the way: the body is cut off. Served as
    actors/api.py serves it (aiohttp's test server cancels the handler instead)."""
    import asyncio
    import logging

    from aiohttp import web

    token = TokenStore(redis_client, settings.REDIS_PREFIX).create(1, "ingest", "i")[0]
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    with socket.create_server(("127.0.0.1", 0)) as sock:
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            body = json.dumps(events(50)).encode()
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + token.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + body[:100])
            await writer.drain()
            with caplog.at_level(logging.INFO, logger="hookray"):
                await asyncio.sleep(0.3)  # the handler is reading the body
                writer.close()
                await writer.wait_closed()
                for _ in range(40):
                    if "the client closed" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await runner.cleanup()
    assert "POST /v1/events: the client closed the connection before its body was read; " \
           "nothing of it accepted" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert not any(redis_client.xlen(Keys(settings.REDIS_PREFIX).intake(n))
                   for n in range(settings.PARTITIONS))


async def test_zstd_and_brotli_bodies_are_decoded(api: Api) -> None:
    import brotli
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:  # below Python 3.14
        from backports import zstd  # type: ignore[import-not-found,no-redef]
    for encoding, compress in (("zstd", zstd.compress), ("br", brotli.compress)):
        answer = await api.call("POST", "/v1/events", api.ingest, data=compress(
            json.dumps(events(3)).encode()), headers={"Content-Type": "application/json",
                                                      "Content-Encoding": encoding})
        assert answer.status == 202 and answer.body == {"accepted": 3}, encoding
    assert len(api.intake()) == 6


@pytest.mark.parametrize("encoding", ["compress", "x-custom", "gzip, br", "gzip,gzip",
                                      "g\u00fczip"])
async def test_a_content_encoding_the_api_does_not_decode_is_415(api: Api,
                                                                 encoding: str) -> None:
    """Such a body was read as it is: taken for JSON, or, in stacked codings, not decoded
    at all."""
    body = gzip.compress(json.dumps(events(2)).encode())
    for path in ("/v1/events", "/v1/hooks"):
        answer = await api.call("POST", path, api.master, data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": encoding})
        assert answer.status == 415, (path, answer.body)
        assert answer.error == {"code": "unsupported_media_type", "message": (
            f"Content-Encoding {encoding!r} is not supported: send the body encoded with one "
            "of gzip, deflate, br, zstd, or not encoded")}
        assert answer.headers["Accept-Encoding"] == "gzip, deflate, br, zstd, identity"
    assert api.intake() == []
    # no coding, or identity, is the body as it is
    for headers in ({"Content-Encoding": "identity"}, {"Content-Encoding": "IDENTITY"}, {}):
        answer = await api.call("POST", "/v1/events", api.ingest,
                                data=json.dumps(events(1)), headers=headers)
        assert answer.status == 202, headers
    # an ingest token is told it may not publish elsewhere before anything else
    answer = await api.call("POST", "/v1/hooks", api.ingest, data=body,
                            headers={"Content-Encoding": "x-custom"})
    assert answer.status == 403


async def test_bodies_over_the_limit_are_413(settings: Settings,
                                             redis_client: redis.Redis) -> None:
    client, api = await start_api(settings.model_copy(update={"API_MAX_BODY_BYTES": 2048}),
                                  redis_client)
    try:
        small = events(3)
        assert (await api.call("POST", "/v1/events", api.ingest, json_body=small)).status == 202
        for method, path, token in (("POST", "/v1/events", api.ingest),
                                    ("POST", "/v1/hooks", api.master)):
            answer = await api.call(method, path, token, json_body=events(40))
            assert answer.status == 413, path
            assert answer.error["code"] == "payload_too_large"
            assert "2048 bytes" in answer.error["message"]
        assert len(api.intake()) == 3
    finally:
        await client.close()


async def test_json_errors_for_unknown_routes_and_methods(api: Api) -> None:
    answer = await api.call("GET", "/v1/nothing-here", api.master)
    assert answer.status == 404 and answer.error["code"] == "not_found"
    answer = await api.call("GET", "/v1/hooks/abc", api.master)
    assert answer.status == 404 and answer.error["code"] == "not_found"
    for method, path, allowed in (("PATCH", "/v1/hooks/1", "DELETE, GET, PUT"),
                                  ("GET", "/v1/events", "POST"),
                                  ("DELETE", "/v1/hooks", "GET, POST"),
                                  ("GET", "/v1/hooks/1/activate", "POST")):
        answer = await api.call(method, path, api.master)
        assert answer.status == 405, (method, path)
        assert answer.error["code"] == "method_not_allowed"
        assert answer.headers["Allow"] == allowed


async def test_redis_unavailable_is_503(settings: Settings, redis_client: redis.Redis) -> None:
    down = settings.model_copy(update={"REDIS_URL": "redis://127.0.0.1:1/0"})
    async with TestClient(TestServer(create_app(down), host="127.0.0.1")) as client:
        rsp = await client.post("/v1/events", json=events(1),
                                headers={"Authorization": "Bearer hr_0123456789abcdef_"
                                         + "A" * 43})
        assert rsp.status == 503
        assert (await rsp.json())["error"]["code"] == "unavailable"


async def test_health_answers_without_a_token_while_redis_does(api: Api,
                                                                settings: Settings) -> None:
    answer = await api.call("GET", "/v1/health")
    assert (answer.status, answer.body) == (200, {
        "status": "ok", "partitions": {"expected": None, "running": 0, "waiting": [],
                                       "stopped": []},
        "retry_running": False, "retry_waiting": None, "redis_eviction": None,
        "redis_full": False})  # no engine on this prefix yet
    keys = Keys(settings.REDIS_PREFIX)
    api.r.hset(keys.config, "partitions", 3)  # an engine with two partitions running
    marks = {worker: Heartbeat(api.r, keys, worker) for worker in ("partition:0", "partition:2")}
    for mark in marks.values():
        mark.beat()
    Heartbeat(api.r, keys, "retry").beat("stored hook 4 no longer\nvalidates")
    answer = await api.call("GET", "/v1/health")
    assert (answer.status, answer.body) == (200, {
        "status": "ok", "partitions": {"expected": 3, "running": 2, "waiting": [],
                                       "stopped": [1]},
        "retry_running": True, "retry_waiting": "stored hook 4 no longer validates",
        "redis_eviction": None, "redis_full": False})
    marks["partition:2"].beat("stored hook 4 no longer validates")
    answer = await api.call("GET", "/v1/health")
    assert answer.body["partitions"] == {  # marked at once, though beaten just before
        "expected": 3, "running": 1, "stopped": [1],
        "waiting": [{"partition": 2, "reason": "stored hook 4 no longer validates"}]}
    down = settings.model_copy(update={"REDIS_URL": "redis://127.0.0.1:1/0"})
    async with TestClient(TestServer(create_app(down), host="127.0.0.1")) as client:
        rsp = await client.get("/v1/health")
        assert rsp.status == 503 and (await rsp.json())["status"] == "unavailable"


@contextlib.contextmanager
def hung_redis(settings: Settings) -> Iterator[Settings]:
    """``settings`` with a REDIS_URL whose server takes connections and never answers
    (the kernel accepts them; nobody reads)."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(64)
        yield settings.model_copy(update={
            "REDIS_URL": f"redis://127.0.0.1:{mute.getsockname()[1]}/0"})


async def test_health_of_a_hung_redis_is_503_within_its_timeout(settings: Settings) -> None:
    """A Redis that takes the connection and never answers: the probe gives up after
    HEALTH_TIMEOUT_SEC instead of holding a thread for ever."""
    from engine.api import HEALTH_TIMEOUT_SEC

    with hung_redis(settings) as hung:
        async with TestClient(TestServer(create_app(hung), host="127.0.0.1")) as client:
            started = time.monotonic()
            rsp = await client.get("/v1/health")
            took = time.monotonic() - started
    assert rsp.status == 503 and took < HEALTH_TIMEOUT_SEC * 3


# --- hooks ----------------------------------------------------------------------------


async def test_hooks_crud_with_write_only_secrets(api: Api) -> None:
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    answer = await api.call("POST", "/v1/hooks", api.master, json_body={**hook_body(), "id": 99})
    assert answer.status == 201
    hook = answer.body
    assert hook["id"] != 99 and answer.headers["Location"] == f"/v1/hooks/{hook['id']}"
    assert hook["account_id"] == 1 and hook["active"] is False
    assert hook["target"]["http_batch"]["auth"]["token"] == MASK
    second = await api.create(name="second")
    await api.create(api.other, name="theirs")
    listed = await api.call("GET", "/v1/hooks", api.master)
    assert listed.status == 200
    assert [h["id"] for h in listed.body["hooks"]] == [hook["id"], second["id"]]
    assert "s3cr3t" not in json.dumps(listed.body)
    got = await api.call("GET", f"/v1/hooks/{hook['id']}", api.master)
    assert (got.status, got.body) == (200, hook)
    # PUT the hook as read back (secret redacted), with a new name: the secret is kept
    changed = {**got.body, "name": "renamed"}
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master, json_body=changed)
    assert answer.status == 200 and answer.body["name"] == "renamed"
    assert answer.body["target"]["http_batch"]["auth"]["token"] == MASK
    stored = registry.get(hook["id"]).to_storage()
    assert stored["target"]["http_batch"]["auth"]["token"] == "s3cr3t"
    # a new secret value replaces it
    changed["target"]["http_batch"]["auth"]["token"] = "n3w"
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master, json_body=changed)
    assert answer.status == 200
    assert registry.get(hook["id"]).to_storage()["target"]["http_batch"]["auth"]["token"] == "n3w"
    # the mask where no secret is stored is refused, not stored
    kafka = {**changed, "target": {"kafka": {"bootstrap_servers": ["127.0.0.1:9092"],
                                             "topic": "t", "sasl_mechanism": "PLAIN",
                                             "sasl_username": "u", "sasl_password": MASK}}}
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master, json_body=kafka)
    assert answer.status == 422
    assert answer.error["issues"][0]["field"] == "target.kafka.sasl_password"
    answer = await api.call("DELETE", f"/v1/hooks/{hook['id']}", api.master)
    assert answer.status == 204 and answer.body is None
    answer = await api.call("GET", f"/v1/hooks/{hook['id']}", api.master)
    assert answer.status == 404
    assert answer.error == {"code": "not_found", "message": f"hook {hook['id']} does not exist"}
    answer = await api.call("DELETE", f"/v1/hooks/{hook['id']}", api.master)
    assert answer.status == 404


async def test_url_passwords_and_credential_headers_are_write_only(api: Api) -> None:
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    target = {"http_batch": {"url": "https://crm:pw-SECRET@receiver.example.com/h?"
                                    "tenant=acme&token=qt-SECRET",
                             "headers": {"X-Api-Key": "key-SECRET", "X-Tenant": "acme"}}}
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(target=target))
    assert answer.status == 201
    shown = answer.body["target"]["http_batch"]
    assert shown["url"] == ("https://crm:**********@receiver.example.com/h?"
                            "tenant=acme&token=**********")
    assert shown["headers"] == {"X-Api-Key": MASK, "X-Tenant": "acme"}
    assert "SECRET" not in json.dumps(answer.body)
    # PUT as read back, with a changed plain header: the credentials are kept
    changed = json.loads(json.dumps(answer.body))
    changed["target"]["http_batch"]["headers"]["X-Tenant"] = "beta"
    hook_id = answer.body["id"]
    answer = await api.call("PUT", f"/v1/hooks/{hook_id}", api.master, json_body=changed)
    assert answer.status == 200, answer.body
    stored = registry.get(hook_id).to_storage()["target"]["http_batch"]
    assert stored["url"] == "https://crm:pw-SECRET@receiver.example.com/h?tenant=acme&token=qt-SECRET"
    assert stored["headers"] == {"X-Api-Key": "key-SECRET", "X-Tenant": "beta"}
    # the mask as a new credential is refused, naming the field
    for bad, field in (({"url": "https://crm:**********@r.example.com/h"},
                        "target.http_batch.url"),
                       ({"url": "https://r.example.com/h?token=**********"},
                        "target.http_batch.url"),
                       ({"url": "https://r.example.com/h", "headers": {"Authorization": MASK}},
                        "target.http_batch.headers.Authorization")):
        answer = await api.call("POST", "/v1/hooks", api.master,
                                json_body=hook_body(target={"http_batch": bad}))
        assert answer.status == 422 and answer.error["issues"][0]["field"] == field


async def test_a_put_racing_a_token_rotation_keeps_the_rotated_token(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PUT of the settings as read (the token redacted) and an update rotating the
    token land together: the PUT keeps the rotated token, not the one it first read."""
    import engine.api

    created = await api.create()
    hook_id = created["id"]
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    restore = engine.api.restore_secrets

    def read_then_rotated(sent: dict[str, Any], stored: Any) -> dict[str, Any]:
        restored = restore(sent, stored)
        rotated = registry.get(hook_id).to_storage()
        rotated["target"]["http_batch"]["auth"]["token"] = "rotated"
        registry.update(hook_id, rotated)  # lands after the PUT read the hook
        return restored

    monkeypatch.setattr(engine.api, "restore_secrets", read_then_rotated)
    answer = await api.call("PUT", f"/v1/hooks/{hook_id}", api.master,
                            json_body={**created, "name": "renamed"})
    assert answer.status == 200, answer.body
    stored = registry.get(hook_id)
    assert stored.name == "renamed"
    assert stored.target.http_batch.auth.token.get_secret_value() == "rotated"  # type: ignore


@pytest.mark.parametrize(("target", "change", "field"), [
    ({"http_batch": {"url": "https://crm.example.com/h",
                     "auth": {"kind": "bearer", "token": "tok-SECRET"}}},
     {"url": "https://evil.example.net/h"}, "target.http_batch.auth.token"),
    ({"http_batch": {"url": "https://crm.example.com/h",
                     "headers": {"X-Api-Key": "key-SECRET"}}},
     {"url": "https://crm.example.com:8443/h"}, "target.http_batch.headers.X-Api-Key"),
    ({"http_batch": {"url": "https://crm.example.com/h",
                     "auth": {"kind": "oauth2", "token_url": "https://idp.example.com/t",
                              "client_id": "c", "client_secret": "cs-SECRET"}}},
     {"auth": {"token_url": "https://evil.example.net/t"}},
     "target.http_batch.auth.client_secret"),
    ({"rabbitmq_queue": {"host": "mq.example.com", "queue": "q", "password": "pw-SECRET"}},
     {"host": "evil.example.net"}, "target.rabbitmq_queue.password"),
    ({"kafka": {"bootstrap_servers": ["k1.example.com:9092"], "topic": "t",
                "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "pw-SECRET"}},
     {"bootstrap_servers": ["evil.example.net:9092"]}, "target.kafka.sasl_password"),
    ({"kafka": {"bootstrap_servers": ["k1.example.com:9092"], "topic": "t", "tls": True,
                "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u",
                "sasl_password": "pw-SECRET"}},
     {"tls": False, "sasl_mechanism": "PLAIN"}, "target.kafka.sasl_password"),
    ({"rabbitmq_exchange": {"host": "mq.example.com", "exchange": "x", "tls": True,
                            "password": "pw-SECRET"}},
     {"tls": False}, "target.rabbitmq_exchange.password"),
])
async def test_a_stored_secret_is_not_carried_to_a_new_destination(
        api: Api, target: dict[str, Any], change: dict[str, Any], field: str) -> None:
    """PUT with the redacted value keeps a stored secret only while the destination
    (URL or token URL origin, broker host and port, Kafka servers) stays the same: a
    master token alone must not be able to send the secret to another server."""
    created = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(target=target))
    assert created.status == 201, created.body
    hook_id, kind = created.body["id"], next(iter(target))
    same = json.loads(json.dumps(created.body))
    same["name"] = "renamed"  # same destination: the secret is kept
    assert (await api.call("PUT", f"/v1/hooks/{hook_id}", api.master,
                           json_body=same)).status == 200
    def move(hook: dict[str, Any]) -> dict[str, Any]:
        hook = json.loads(json.dumps(hook))
        for key, value in change.items():
            if isinstance(value, dict):
                hook["target"][kind][key].update(value)
            else:
                hook["target"][kind][key] = value
        return hook

    moved = move(same)
    answer = await api.call("PUT", f"/v1/hooks/{hook_id}", api.master, json_body=moved)
    assert answer.status == 422, answer.body
    assert [i["field"] for i in answer.error["issues"]] == [field]
    assert "the destination changed" in answer.error["message"]
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    assert registry.get(hook_id).name == "renamed"  # nothing changed
    assert "SECRET" in json.dumps(registry.get(hook_id).to_storage())
    # with the secret itself, the move is fine
    moved = move(registry.get(hook_id).to_storage())
    answer = await api.call("PUT", f"/v1/hooks/{hook_id}", api.master, json_body=moved)
    assert answer.status == 200, answer.body


async def test_invalid_hooks_are_422_naming_each_field_and_reason(api: Api) -> None:
    bad = hook_body(url="ftp://example.org/x", actions=["click", "clack"], database="some")
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=bad)
    assert answer.status == 422
    error = answer.error
    assert error["code"] == "validation_failed"
    fields = {i["field"]: i["reason"] for i in error["issues"]}
    assert set(fields) >= {"actions", "target.http_batch.url"}
    assert {f.split(".")[0] for f in fields} == {"actions", "target", "database"}
    assert "clack" in fields["actions"] and "not an http(s) URL" in fields["target.http_batch.url"]
    assert error["message"].startswith("invalid hook: ")
    assert "s3cr3t" not in json.dumps(answer.body)
    two = hook_body()
    two["target"]["rabbitmq_queue"] = {"host": "h", "queue": "q", "password": "pw"}
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=two)
    assert answer.status == 422
    assert answer.error["issues"] == [{"field": "target", "reason": "exactly one of http_batch, "
                                       "rabbitmq_queue, rabbitmq_exchange, kafka must be set "
                                       "(got http_batch, rabbitmq_queue)"}]
    answer = await api.call("POST", "/v1/hooks", api.master, json_body={"name": ""})
    assert {i["field"] for i in answer.error["issues"]} == {"name", "target"}
    # the redacted value cannot be a new secret
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(
        target={"http_batch": {"url": "http://127.0.0.1:9/x",
                               "auth": {"kind": "bearer", "token": MASK}}}))
    assert answer.status == 422
    assert answer.error["issues"][0]["field"] == "target.http_batch.auth.token"
    for body in ([hook_body()], "text", 5):
        answer = await api.call("POST", "/v1/hooks", api.master, json_body=body)
        assert answer.status == 422, body
    answer = await api.call("POST", "/v1/hooks", api.master,
                            json_body=hook_body(account_id="one"))
    assert answer.status == 422 and answer.error["issues"][0]["field"] == "account_id"
    hook = await api.create()
    for wrong in (hook["id"] + 1, float(hook["id"]), True, str(hook["id"])):
        answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                                json_body={**hook_body(), "id": wrong})
        assert answer.status == 422 and answer.error["issues"][0]["field"] == "id", wrong
    body = b'{"name": "h", "account_id": 1' + b"1" * 5000 + b"}"
    answer = await api.call("POST", "/v1/hooks", api.master, data=body,
                            headers={"Content-Type": "application/json"})
    assert answer.status == 400 and answer.error["message"] == \
        "malformed JSON: an integer of more than 4,300 digits"
    # a field given twice: which one was meant? (json would keep the last, silently)
    answer = await api.call("POST", "/v1/hooks", api.master, data=json.dumps(hook_body())[:-1]
                            + ', "active": true, "active": false}',
                            headers={"Content-Type": "application/json"})
    assert answer.status == 400 and answer.error["message"] == \
        "malformed JSON: duplicate key 'active'"
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                            json_body={**hook_body(), "actions": ["clik"]})
    assert answer.status == 422 and answer.error["issues"][0]["field"] == "actions"
    for method, path in (("POST", "/v1/hooks"), ("PUT", f"/v1/hooks/{hook['id']}"),
                         ("POST", f"/v1/hooks/{hook['id']}/test"),
                         ("POST", "/v1/dead-letters/replay")):
        answer = await api.call(method, path, api.master, data=b'{"name": ',
                                headers={"Content-Type": "application/json"})
        assert answer.status == 400, path
        assert answer.error["code"] == "bad_request" and "malformed JSON" in answer.error["message"]
    answer = await api.call("POST", "/v1/hooks", api.master)
    assert answer.status == 400 and "empty" in answer.error["message"]


@pytest.mark.parametrize(("extra", "field"), [
    ({"active": "yes"}, "active"), ({"active": 1}, "active"), ({"database": "5"}, "database"),
    ({"filters": {"campaigns": ["7"]}}, "filters.campaigns.0"),
    ({"target": {"http_batch": {"url": "http://127.0.0.1:9/", "max_batch_size": True}}},
     "target.http_batch.max_batch_size"),
    ({"target": {"http_batch": {"url": "http://127.0.0.1:9/", "flush_timeout_sec": True}}},
     "target.http_batch.flush_timeout_sec"),
    ({"target": {"rabbitmq_queue": {"host": "h", "queue": "q", "port": True}}},
     "target.rabbitmq_queue.port"),
    ({"target": {"rabbitmq_exchange": {"host": "h", "exchange": "e", "durable": "no"}}},
     "target.rabbitmq_exchange.durable"),
])
async def test_hook_values_of_the_wrong_json_type_are_422_not_converted(
        api: Api, extra: dict[str, Any], field: str) -> None:
    """As for account_id ("23", 23.0): "yes" is no boolean, true no batch size."""
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(**extra))
    assert answer.status == 422, answer.body
    assert field in {i["field"] for i in answer.error["issues"]}


@pytest.mark.parametrize("value", ["+1", "1_0", " 1", "1 ", "\u0661", "\uff11", "0x1"])
async def test_ids_and_numbers_in_paths_and_queries_are_ascii_digits_only(
        api: Api, value: str) -> None:
    """int() takes all of these (but 0x1) as numbers, and the path pattern \\d other
    scripts' digits: "\u0661" (Arabic-Indic one) named hook 1."""
    hook = await api.create()
    assert hook["id"] == 1
    answer = await api.call("GET", f"/v1/hooks/{quote(value)}", api.master)
    assert answer.status == 404 and answer.error["message"].startswith("no route"), value
    for name in ("hook_id", "limit"):
        answer = await api.call("GET", f"/v1/dead-letters?{name}={quote(value)}", api.master)
        assert answer.status == 422, (name, value)
        assert answer.error["issues"][0]["field"] == name
    answer = await api.call("GET", "/v1/dead-letters?hook_id=1&limit=2", api.master)
    assert answer.status == 200


LONE = "\ud800"  # a lone UTF-16 surrogate: JSON "\\ud800", not valid UTF-8


@pytest.mark.parametrize(("extra", "field"), [
    ({"custom_data": {"pairs": {"k": LONE}}}, "custom_data.pairs"),
    ({"custom_data": {"pairs": {LONE: "v"}}}, "custom_data.pairs"),
    ({"custom_data": {"template": {LONE: "v"}}}, "custom_data.template"),
    ({"name": LONE}, "name"),
    ({"target": {"http_batch": {"url": "http://127.0.0.1:9/", "headers": {"X-A": LONE}}}},
     "target.http_batch.headers"),
    ({"target": {"http_batch": {"url": "http://127.0.0.1:9/",
                                "auth": {"kind": "bearer", "token": LONE}}}},
     "target.http_batch.auth.token"),
])
async def test_hook_strings_that_are_not_valid_utf8_are_422_and_never_stored(
        api: Api, extra: dict[str, Any], field: str) -> None:
    """JSON lets a lone surrogate through ("\\ud800"); a hook holding one would make
    every round of its partition fail, setting aside the events of the account."""
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(**extra))
    assert answer.status == 422, answer.body
    [issue] = answer.error["issues"]
    assert issue["field"] == field and "not valid UTF-8" in issue["reason"]
    hook = await api.create()
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                            json_body=hook_body(**extra))
    assert answer.status == 422 and answer.error["issues"][0]["field"] == field
    assert [h["id"] for h in (await api.call("GET", "/v1/hooks", api.master)).body["hooks"]] \
        == [hook["id"]]
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                            json_body={"name": LONE})
    assert answer.status == 422 and "not valid UTF-8" in answer.error["message"]
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": LONE})
    assert answer.status == 422 and answer.error["issues"][0]["field"] == "event_type"
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"ids": [LONE]})
    assert answer.status == 422 and answer.error["issues"][0]["field"] == "ids"


async def test_another_accounts_hook_is_404_on_every_route_and_cannot_be_claimed(
        api: Api) -> None:
    theirs = await api.create(api.other)
    mine = await api.create()
    for method, path in MASTER_ROUTES:
        if "{id}" not in path:
            continue
        body = hook_body() if method == "PUT" else {"name": "copy"} \
            if path.endswith("/clone") else {"event_type": "click"}
        answer = await api.call(method, path.format(id=theirs["id"]), api.master, json_body=body)
        assert answer.status == 404, (method, path)
        assert answer.error == {"code": "not_found",
                                "message": f"hook {theirs['id']} does not exist"}
    unknown = await api.call("GET", "/v1/hooks/999999", api.master)
    assert unknown.status == 404  # the same answer as for another account's hook
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={theirs['id']}", api.master)
    assert answer.status == 404
    # a body naming another account: 403
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(account_id=2))
    assert answer.status == 403 and answer.error["code"] == "forbidden"
    answer = await api.call("PUT", f"/v1/hooks/{mine['id']}", api.master,
                            json_body=hook_body(account_id=2))
    assert answer.status == 403
    # an account_id that is not a JSON integer ("2" or 2.0 would validate as 2): 422
    for given in ("2", 2.0, "1", True, None):
        for method, path in (("POST", "/v1/hooks"), ("PUT", f"/v1/hooks/{mine['id']}")):
            answer = await api.call(method, path, api.master,
                                    json_body=hook_body(account_id=given))
            assert answer.status == 422, (given, method, answer.body)
            assert answer.error["issues"] == [{"field": "account_id",
                                                "reason": "expected an integer"}]
    # an id too long for any hook: 404 like any unknown hook, not a server error
    answer = await api.call("GET", "/v1/hooks/" + "9" * 5000, api.master)
    assert answer.status == 404
    # theirs is untouched, and no hook of account 2 was made or moved
    answer = await api.call("GET", f"/v1/hooks/{mine['id']}", api.master)
    assert answer.status == 200 and answer.body == mine
    answer = await api.call("GET", f"/v1/hooks/{theirs['id']}", api.other)
    assert answer.status == 200 and answer.body == theirs
    listed = await api.call("GET", "/v1/hooks", api.other)
    assert [h["id"] for h in listed.body["hooks"]] == [theirs["id"]]


async def test_activate_stop_and_clone(api: Api) -> None:
    hook = await api.create()
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/activate", api.master)
    assert answer.status == 200 and answer.body["active"] is True
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master)
    assert answer.status == 201
    copy = answer.body
    assert copy["id"] != hook["id"] and copy["name"] == "crm (copy)" and copy["active"] is False
    assert answer.headers["Location"] == f"/v1/hooks/{copy['id']}"
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    assert registry.get(copy["id"]).to_storage()["target"]["http_batch"]["auth"]["token"] \
        == "s3cr3t"  # the copy keeps the secret
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                            json_body={"name": "named copy"})
    assert answer.status == 201 and answer.body["name"] == "named copy"
    for body in ({"name": ""}, {"name": 5}, {"name": "x" * 256}, {"name": None}):
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                                json_body=body)
        assert answer.status == 422, body
        assert answer.error["issues"][0]["field"] == "name"
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                            json_body=["x"])
    assert answer.status == 422
    assert answer.error["issues"] == [{"field": "body", "reason": "expected a JSON object"}]
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/stop", api.master)
    assert answer.status == 200 and answer.body["active"] is False
    for action in ("activate", "stop", "clone"):
        answer = await api.call("POST", f"/v1/hooks/424242/{action}", api.master)
        assert answer.status == 404


async def test_test_event_is_sent_through_the_hooks_target(api: Api,
                                                           receiver: Receiver) -> None:
    hook = await api.create(url=receiver.url("/test-target"))
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "deliv"})
    assert answer.status == 200
    assert answer.body == {"delivered": True, "status": 200, "detail": "OK", "error": None}
    (message,) = receiver.messages("/test-target")
    assert message["event_type"] == "deliv" and message["is_test"] is True
    assert receiver.requests("/test-target")[0].headers["Authorization"] == "Bearer s3cr3t"
    receiver.behave("/test-target", always_fail=True, fail_status=503)
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "click"})
    assert answer.status == 200
    assert answer.body["delivered"] is False and answer.body["error"] == "Rejected"
    assert "HTTP 503" in answer.body["detail"]
    for body, reason in (({"event_type": "clack"}, "unknown event type 'clack'"),
                         ({}, "required: an event code"), ([], "required: an event code")):
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body=body)
        assert answer.status == 422
        assert answer.error["issues"] == [{"field": "event_type", "reason": reason}]
    # a field meant to shape the test is refused, not ignored
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "click", "link_url": "https://x.test/"})
    assert answer.status == 422
    assert answer.error["issues"] == [{"field": "link_url", "reason": "unknown field"}]
    assert len(receiver.requests("/test-target")) == 2  # nothing sent


async def test_a_test_event_of_a_code_from_event_types_file(
        settings: Settings, redis_client: redis.Redis, receiver: Receiver,
        tmp_path: Path) -> None:
    """An engine whose EVENT_TYPES_FILE adds a code sends that code's test event."""
    types = tmp_path / "types.json"
    types.write_text(json.dumps({"event_types": [{
        "code": "send_viber", "name": "Send Viber", "category": "delivery",
        "channel": "viber"}]}))
    client, api = await start_api(
        settings.model_copy(update={"EVENT_TYPES_FILE": str(types)}), redis_client)
    try:
        hook = await api.create(url=receiver.url("/viber"), actions=["send_viber"])
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": "send_viber"})
        assert answer.status == 200 and answer.body["delivered"] is True, answer.body
        (message,) = receiver.messages("/viber")
        assert message["event_type"] == "send_viber" and message["is_test"] is True
    finally:
        await client.close()


async def test_a_test_event_the_transport_fails_to_send_is_an_outcome_not_a_500(
        api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A transport raising something else than a delivery failure (an HTTP client
    refusing the request it was asked to make) still answers with the outcome, without
    the hook's secrets; the error goes to the log."""
    from engine.transports.http import HttpTransport

    async def refuse(self: HttpTransport, target: Any, body: bytes, auth: Any) -> Any:
        token = target.auth.token.get_secret_value()
        raise ValueError(f"cannot send Authorization: Bearer {token}")

    monkeypatch.setattr(HttpTransport, "_post", refuse)
    hook = await api.create()
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "click"})
    assert answer.status == 200
    assert answer.body == {
        "delivered": False, "status": None, "error": "ValueError",
        "detail": "the test event could not be sent: ValueError: cannot send Authorization: "
                  f"Bearer {MASK}"}
    assert f"test event of hook {hook['id']}: the http_batch transport failed" in caplog.text


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"headers": {"Content-Length": "5"}}, "target.http_batch.headers",
     "'Content-Length' is set by the HTTP client"),
    ({"headers": {"transfer-encoding": "chunked"}}, "target.http_batch.headers",
     "'transfer-encoding' is set by the HTTP client"),
    ({"headers": {"X-A": "a\x00b"}}, "target.http_batch.headers",
     "control character '\\x00'"),
    ({"auth": {"kind": "bearer", "token": "a\r\nX-Evil: 1"}}, "target.http_batch.auth",
     "control character '\\r'"),
    ({"url": f"http://{'a' * 64}.example.com/"}, "target.http_batch.url",
     "not a valid domain name"),
    ({"url": "http://user:pw-SECRET@127.0.0.1:9/hook"}, "target.http_batch",
     "authorization given twice"),
])
async def test_http_settings_no_request_could_be_sent_with_are_422(
        api: Api, change: dict[str, Any], field: str, words: str) -> None:
    """Each was accepted, then cut every body (Content-Length) or made every send fail
    in the HTTP client (the test route answered 500)."""
    body = hook_body()
    body["target"]["http_batch"].update(change)
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=body)
    assert answer.status == 422, answer.body
    [issue] = answer.error["issues"]
    assert issue["field"] == field and words in issue["reason"]
    assert "s3cr3t" not in json.dumps(answer.body) and "SECRET" not in json.dumps(answer.body)


# --- stats and dead letters -------------------------------------------------------------


async def test_stats_show_only_the_accounts_hooks(api: Api) -> None:
    keys = Keys(api.settings.REDIS_PREFIX)
    a, b = await api.create(), await api.create(name="b")
    theirs = await api.create(api.other)
    api.r.hset(keys.stats(a["id"]), mapping={"accepted": 10, "delivered": 8, "retried": 3})
    api.r.hset(keys.stats(b["id"]), mapping={"accepted": 5, "dead_lettered": 5})
    api.r.hset(keys.stats(theirs["id"]), mapping={"accepted": 1000})
    answer = await api.call("GET", "/v1/stats", api.master)
    assert answer.status == 200
    assert answer.body == {
        "hooks": {str(a["id"]): {"accepted": 10, "delivered": 8, "retried": 3,
                                 "dead_lettered": 0, "discarded": 0},
                  str(b["id"]): {"accepted": 5, "delivered": 0, "retried": 0,
                                 "dead_lettered": 5, "discarded": 0}},
        "totals": {"accepted": 15, "delivered": 8, "retried": 3, "dead_lettered": 5,
                   "discarded": 0}}
    answer = await api.call("GET", f"/v1/hooks/{a['id']}/stats", api.master)
    assert answer.body == {"accepted": 10, "delivered": 8, "retried": 3, "dead_lettered": 0,
                           "discarded": 0}
    answer = await api.call("GET", f"/v1/hooks/{theirs['id']}/stats", api.master)
    assert answer.status == 404
    answer = await api.call("GET", "/v1/stats", api.other)
    assert answer.body["totals"]["accepted"] == 1000


def dead_letter(retry: RetryStore, hook: dict[str, Any], n: int) -> str:
    delivery = Delivery(id=f"d-{hook['id']}-{n}", hook_id=hook["id"],
                        account_id=hook["account_id"], kind="http_batch",
                        parts=[b'{"m": 1}', b'{"m": 2}'], message_ids=["m1", "m2"],
                        created_ms=now_ms())
    retry.kill(delivery, "Rejected: HTTP 503: down")
    return delivery.id


async def test_dead_letters_are_listed_and_replayed_per_account(api: Api) -> None:
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    a, b = await api.create(), await api.create(name="b")
    theirs = await api.create(api.other)
    mine = [dead_letter(retry, a, 1), dead_letter(retry, a, 2), dead_letter(retry, b, 1)]
    foreign = dead_letter(retry, theirs, 1)
    answer = await api.call("GET", "/v1/dead-letters", api.master)
    assert answer.status == 200
    letters = answer.body["dead_letters"]
    assert [d["id"] for d in letters] == mine
    assert letters[0]["messages"] == 2 and letters[0]["last_error"] == "Rejected: HTTP 503: down"
    assert letters[0]["message_ids"] == ["m1", "m2"] and letters[0]["account_id"] == 1
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={b['id']}", api.master)
    assert [d["id"] for d in answer.body["dead_letters"]] == [mine[2]]
    answer = await api.call("GET", "/v1/dead-letters?limit=1", api.master)
    assert [d["id"] for d in answer.body["dead_letters"]] == mine[:1]
    assert answer.body["next"] == answer.body["dead_letters"][0]["cursor"]
    answer = await api.call("GET", "/v1/dead-letters?limit=5&after="
                            + answer.body["next"], api.master)
    assert [d["id"] for d in answer.body["dead_letters"]] == mine[1:]
    assert answer.body["next"] is None  # not a full page: no more
    for query in ("limit=0", "limit=1001", "limit=x", "hook_id=-1", "after=x", "after=1:"):
        answer = await api.call("GET", f"/v1/dead-letters?{query}", api.master)
        assert answer.status == 422, query
    # replaying another account's id: 404, nothing replayed
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"ids": [mine[0], foreign]})
    assert answer.status == 404
    assert answer.error == {"code": "not_found", "message": f"dead letter {foreign} does not exist"}
    assert retry.pending() == 0
    api.r.hset(retry.k.dead_payload, "damaged", b"\xc1")  # undecodable: nobody's, 404
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"ids": ["damaged"]})
    assert answer.status == 404 and answer.error["message"] == "dead letter damaged does not exist"
    api.r.hdel(retry.k.dead_payload, "damaged")
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"ids": [mine[0], mine[0]]})
    assert (answer.status, answer.body) == (200, {"replayed": 1})
    assert retry.pending() == 1
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"all": True, "hook_id": b["id"]})
    assert answer.body == {"replayed": 1}
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"all": True})
    assert answer.body == {"replayed": 1}
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"all": True})
    assert answer.body == {"replayed": 0}
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"ids": None, "all": True})  # a null ids is no ids
    assert (answer.status, answer.body) == (200, {"replayed": 0})
    assert retry.pending() == 3
    assert [d.id for d in retry.dead_letters()] == [foreign]  # theirs stays dead
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"all": True, "hook_id": theirs["id"]})
    assert answer.status == 404
    for body in BAD_MOVE_BODIES:
        answer = await api.call("POST", "/v1/dead-letters/replay", api.master, json_body=body)
        assert answer.status == 422, body
        assert answer.error["code"] == "validation_failed" and answer.error["issues"]


async def test_dead_letters_are_discarded_per_account_and_counted(api: Api) -> None:
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    stats = Stats(api.r, Keys(api.settings.REDIS_PREFIX))
    a, b = await api.create(), await api.create(name="b")
    theirs = await api.create(api.other)
    mine = [dead_letter(retry, a, 1), dead_letter(retry, a, 2), dead_letter(retry, b, 1)]
    foreign = dead_letter(retry, theirs, 1)
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"ids": [mine[0], foreign]})
    assert answer.status == 404  # another account's id: nothing discarded
    assert answer.error == {"code": "not_found", "message": f"dead letter {foreign} does not exist"}
    assert [d.id for d in retry.dead_letters()] == [*mine, foreign]
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"ids": [mine[0], mine[0]]})
    assert (answer.status, answer.body) == (200, {"discarded": 1})
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"ids": [mine[0]]})
    assert answer.status == 404  # gone for good
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"all": True, "hook_id": theirs["id"]})
    assert answer.status == 404
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"all": True, "hook_id": b["id"]})
    assert (answer.status, answer.body) == (200, {"discarded": 1})
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"all": True})
    assert (answer.status, answer.body) == (200, {"discarded": 1})
    assert [d.id for d in retry.dead_letters()] == [foreign]  # theirs stays
    assert retry.pending() == 0 and not api.r.hexists(retry.k.dead_payload, mine[1])
    assert not api.r.exists(retry.k.dead_of_account(1), retry.k.dead_of_hook(a["id"]),
                            retry.k.dead_of_hook(b["id"]))
    # two messages per dead letter
    assert [stats.get(h["id"])["discarded"] for h in (a, b, theirs)] == [4, 2, 0]
    answer = await api.call("GET", f"/v1/hooks/{a['id']}/stats", api.master)
    assert answer.body["discarded"] == 4 and answer.body["dead_lettered"] == 4
    for body in BAD_MOVE_BODIES:
        answer = await api.call("POST", "/v1/dead-letters/discard", api.master, json_body=body)
        assert answer.status == 422, body
        assert answer.error["code"] == "validation_failed" and answer.error["issues"]


# --- on Ray -------------------------------------------------------------------------------


def test_api_actor_on_ray_takes_events_to_a_receiver(engine_factory: Callable[..., Any],
                                                     receiver: Receiver) -> None:
    # Given an engine started with the API on any free port (the API_PORT setting), and
    # a request timeout long enough that a busy machine's slow answer is not re-sent
    engine = engine_factory(API_PORT=0, HTTP_REQUEST_TIMEOUT_SEC=30.0)
    assert engine.api_url and engine.api_url.startswith("http://127.0.0.1:")
    tokens = TokenStore(engine.redis, engine.settings.REDIS_PREFIX)
    master, _ = tokens.create(5, "master")
    ingest, _ = tokens.create(5, "ingest")
    with httpx.Client(base_url=engine.api_url, timeout=30) as http:
        rsp = http.post("/v1/hooks", headers={"Authorization": f"Bearer {master}"},
                        json={**hook_body(url=receiver.url("/via-api")), "active": True})
        assert rsp.status_code == 201, rsp.text
        hook_id = rsp.json()["id"]
        # When 300 events (200 of them matching) are posted through the API
        posted = events(300, account_id=5)
        rsp = http.post("/v1/events", headers={"Authorization": f"Bearer {ingest}"},
                        json=posted)
        assert (rsp.status_code, rsp.json()) == (202, {"accepted": 300})
        expected = sum(e["event_type"] != "send" for e in posted)
        # Then each matching one reaches the receiver once, and the stats say so
        deadline = time.monotonic() + 60
        while len(receiver.messages("/via-api")) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        ids = [m["hook_message_id"] for m in receiver.messages("/via-api")]
        assert len(ids) == len(set(ids)) == expected
        assert {m["account_id"] for m in receiver.messages("/via-api")} == {5}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = http.get(f"/v1/hooks/{hook_id}/stats",
                             headers={"Authorization": f"Bearer {master}"}).json()
            if stats["delivered"] == expected:
                break
            time.sleep(0.05)
        assert stats == {"accepted": expected, "delivered": expected, "retried": 0,
                         "dead_lettered": 0, "discarded": 0}
    # the API actor collects cycles as the other async actors do (actors.gc_policy)
    import gc

    import ray

    from actors.gc_policy import GC_YOUNG_THRESHOLD

    threshold = ray.get(engine.api.__ray_call__.remote(lambda _: gc.get_threshold()), timeout=60)
    assert threshold[0] == GC_YOUNG_THRESHOLD
    url = engine.api_url
    engine.shutdown()  # stops the API actor too
    assert engine.api is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/openapi.json", timeout=2)



async def test_a_stored_hook_that_no_longer_validates_is_listed_apart_and_can_be_deleted(
        api: Api) -> None:
    """After the event types file lost an action a hook uses: its account sees it
    listed under "invalid" with the reason, its routes answer 409 naming it, and it
    can be deleted; other accounts see nothing of it and their hooks and stats are
    unaffected."""
    keys = Keys(api.settings.REDIS_PREFIX)
    broken = await api.create()
    fine = await api.create()
    theirs = await api.create(api.other)
    stored = json.loads(api.r.hget(keys.hooks, str(broken["id"])) or b"{}")
    stored["actions"] = ["no_such_event"]
    api.r.hset(keys.hooks, str(broken["id"]), json.dumps(stored))
    answer = await api.call("GET", "/v1/hooks", api.master)
    assert answer.status == 200 and [h["id"] for h in answer.body["hooks"]] == [fine["id"]]
    (invalid,) = answer.body["invalid"]
    assert invalid["id"] == broken["id"]
    assert f"stored hook {broken['id']} no longer validates" in invalid["error"]
    assert "no_such_event" in invalid["error"]
    answer = await api.call("GET", "/v1/stats", api.master)
    assert answer.status == 200
    assert set(answer.body["hooks"]) == {str(broken["id"]), str(fine["id"])}
    answer = await api.call("GET", f"/v1/hooks/{broken['id']}", api.master)
    assert answer.status == 409 and answer.error["code"] == "conflict"
    assert "delete it and create it again" in answer.error["message"]
    # another account: as if it did not exist, its own hooks and stats as before
    answer = await api.call("GET", "/v1/hooks", api.other)
    assert answer.status == 200 and answer.body["invalid"] == []
    assert [h["id"] for h in answer.body["hooks"]] == [theirs["id"]]
    answer = await api.call("GET", "/v1/stats", api.other)
    assert answer.status == 200 and list(answer.body["hooks"]) == [str(theirs["id"])]
    assert answer.body["hooks"][str(theirs["id"])] == {
        "accepted": 0, "delivered": 0, "retried": 0, "dead_lettered": 0, "discarded": 0}
    answer = await api.call("GET", f"/v1/hooks/{broken['id']}", api.other)
    assert answer.status == 404
    answer = await api.call("DELETE", f"/v1/hooks/{broken['id']}", api.other)
    assert answer.status == 404  # not theirs
    answer = await api.call("DELETE", f"/v1/hooks/{broken['id']}", api.master)
    assert answer.status == 204
    answer = await api.call("GET", "/v1/hooks", api.master)
    assert answer.status == 200 and answer.body["invalid"] == []
    assert [h["id"] for h in answer.body["hooks"]] == [fine["id"]]


@pytest.mark.parametrize("verb", ["replay", "discard"])
async def test_a_replay_or_discard_that_keeps_conflicting_is_409(
        api: Api, monkeypatch: pytest.MonkeyPatch, verb: str) -> None:
    """The dead letter is dead-lettered again (a new payload) between every read of the
    replay (discard) and its compare-and-set: after its 5 attempts it gives up, 409,
    and moves nothing."""
    from engine.stores import REPLAY_TRIES

    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    hook = await api.create()
    letter = dead_letter(retry, hook, 1)
    (delivery,) = retry.dead_letters()
    real = RetryStore._move_args
    attempts: list[int] = []

    def racing(self: RetryStore, mode: str, letters: list[Any], latest: Any = None) -> Any:
        out = real(self, mode, letters, latest)  # built from the payloads read ...
        attempts.append(1)
        retry.kill(delivery, f"Rejected: HTTP 503: again {len(attempts)}")  # ... now stale
        return out

    monkeypatch.setattr(RetryStore, "_move_args", racing)
    answer = await api.call("POST", f"/v1/dead-letters/{verb}", api.master,
                            json_body={"ids": [letter]})
    assert answer.status == 409 and len(attempts) == REPLAY_TRIES
    assert answer.error["code"] == "conflict"
    assert answer.error["message"].startswith(
        f"dead letters changed during {REPLAY_TRIES} {verb} attempts")
    assert [d.id for d in retry.dead_letters()] == [letter] and retry.pending() == 0
    assert retry.dead_letters()[0].last_error == f"Rejected: HTTP 503: again {REPLAY_TRIES}"
    assert Stats(api.r, Keys(api.settings.REDIS_PREFIX)).get(hook["id"])["discarded"] == 0


# --- the reviewer's findings: races, damaged records, bodies, the description ------------


async def test_a_deleted_hooks_dead_letters_can_be_filtered_replayed_and_discarded(
        api: Api) -> None:
    """?hook_id= and {"all": true, "hook_id"} name a deleted hook whose dead letters are
    the account's; another account's deleted hook is 404 like one that never was."""
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    gone, kept = await api.create(), await api.create(name="kept")
    theirs = await api.create(api.other)
    mine = [dead_letter(retry, gone, 1), dead_letter(retry, gone, 2)]
    dead_letter(retry, kept, 1)
    dead_letter(retry, theirs, 1)
    for hook, token in ((gone, api.master), (theirs, api.other)):
        answer = await api.call("DELETE", f"/v1/hooks/{hook['id']}", token)
        assert answer.status == 204
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={gone['id']}", api.master)
    assert answer.status == 200, answer.body
    assert [d["id"] for d in answer.body["dead_letters"]] == mine
    for hook_id in (theirs["id"], 999999):  # theirs: as unknown as one that never was
        answer = await api.call("GET", f"/v1/dead-letters?hook_id={hook_id}", api.master)
        assert answer.error == {"code": "not_found", "message": f"hook {hook_id} does not exist"}
        for verb in ("replay", "discard"):
            answer = await api.call("POST", f"/v1/dead-letters/{verb}", api.master,
                                    json_body={"all": True, "hook_id": hook_id})
            assert answer.status == 404, (verb, hook_id)
    answer = await api.call("POST", "/v1/dead-letters/discard", api.master,
                            json_body={"all": True, "hook_id": gone["id"]})
    assert (answer.status, answer.body) == (200, {"discarded": 2})
    # a deleted hook is known by its dead letters only: with none left, it is as
    # unknown as one that never was
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={gone['id']}", api.master)
    assert answer.status == 404
    answer = await api.call("POST", "/v1/dead-letters/replay", api.master,
                            json_body={"all": True, "hook_id": gone["id"]})
    assert answer.status == 404
    # deleted behind the API's back (the CLI, the driver): known by its dead letters
    HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX)).delete(kept["id"])
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={kept['id']}", api.master)
    assert answer.status == 200 and len(answer.body["dead_letters"]) == 1
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={kept['id']}", api.other)
    assert answer.status == 404
    answer = await api.call("GET", "/v1/dead-letters", api.other)
    assert [d["hook_id"] for d in answer.body["dead_letters"]] == [theirs["id"]]


async def test_concurrent_deletes_and_stops_of_one_hook_are_never_a_500(api: Api) -> None:
    """Each route checks the hook is the account's, then changes it: another request
    deleting it in between answers as if it came first."""
    for _ in range(5):
        hook = await api.create()
        path = f"/v1/hooks/{hook['id']}"
        answers = await asyncio.gather(
            *[api.call("DELETE", path, api.master) for _ in range(4)],
            *[api.call("POST", f"{path}/{action}", api.master)
              for action in ("stop", "activate", "stop", "clone")],
            api.call("PUT", path, api.master, json_body=hook_body(name="renamed")))
        deletes, others = answers[:4], answers[4:]
        assert sorted(a.status for a in deletes) == [204, 404, 404, 404], deletes
        for answer in others:
            assert answer.status in (200, 201, 404), answer
            if answer.status == 404:
                assert answer.error == {"code": "not_found",
                                        "message": f"hook {hook['id']} does not exist"}


async def test_a_hook_deleted_or_damaged_between_check_and_change_is_404_or_409(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministically: the hook goes (or its record is damaged) right after the
    route found it the account's."""
    from engine.api import Backend

    keys = Keys(api.settings.REDIS_PREFIX)
    real_owned, real_owner = Backend.owned_hook, HookRegistry.owner
    then: dict[str, Any] = {}

    def meanwhile(hook_id: int) -> None:
        if then.get("record") is None:
            api.r.hdel(keys.hooks, str(hook_id))
        else:
            api.r.hset(keys.hooks, str(hook_id), then["record"])

    def owned(self: Backend, account_id: int, hook_id: int) -> Any:
        found = real_owned(self, account_id, hook_id)
        meanwhile(hook_id)
        return found

    def owner(self: HookRegistry, hook_id: int) -> Any:
        found = real_owner(self, hook_id)
        meanwhile(hook_id)
        return found

    monkeypatch.setattr(Backend, "owned_hook", owned)
    monkeypatch.setattr(HookRegistry, "owner", owner)
    routes_ = [("DELETE", ""), ("POST", "/stop"), ("POST", "/activate"), ("POST", "/clone"),
               ("PUT", "")]
    for record, status in ((None, 404), (b'{"id": 1, "account_id": 1, "na', 409)):
        then["record"] = record
        for method, path in routes_:
            hook = await api.create()
            body = hook_body(name="renamed") if method == "PUT" else None
            answer = await api.call(method, f"/v1/hooks/{hook['id']}{path}", api.master,
                                    json_body=body)
            # a damaged record of the account is deleted all the same
            want = 204 if method == "DELETE" and record is not None else status
            assert answer.status == want, (record, method, path, answer.body)
            if want == 404:
                assert answer.error == {"code": "not_found",
                                        "message": f"hook {hook['id']} does not exist"}
            if want == 409:
                assert answer.error["code"] == "conflict"
                assert answer.error["message"].startswith(
                    f"stored hook {hook['id']} is not valid JSON: its record is damaged")
                assert answer.error["issues"][0]["field"] == "hook"


async def test_engine_errors_no_route_expects_are_mapped_not_500(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware's safety net: NotFound 404, Conflict 409, HookError 409 (a stored
    hook) or 422 (naming each field), ConfigError 503."""
    from engine.errors import ConfigError, Conflict, HookError

    hook = await api.create()
    raised: list[Exception] = []

    def stats_of(self: Stats, hook_id: int) -> Any:
        raise raised[0]

    monkeypatch.setattr(Stats, "get", stats_of)
    for exc, status, issues in (
            (NotFound("hook 5 does not exist"), 404, None),
            (Conflict("changed meanwhile; try again"), 409, None),
            (HookError(f"stored hook {hook['id']} no longer validates: x"), 409,
             [{"field": "hook", "reason": f"stored hook {hook['id']} no longer validates: x"}]),
            (HookError("invalid hook: name: too long; actions: empty",
                       [("name", "too long"), ("actions", "empty")]), 422,
             [{"field": "name", "reason": "too long"}, {"field": "actions", "reason": "empty"}]),
            (HookError("invalid hook: url: x"), 422, [{"field": "hook", "reason": "url: x"}]),
            (ConfigError("PARTITIONS differ; nothing was accepted"), 503, None)):
        raised[:] = [exc]
        answer = await api.call("GET", f"/v1/hooks/{hook['id']}/stats", api.master)
        assert answer.status == status, (exc, answer.body)
        assert answer.error.get("issues") == issues


async def test_events_for_an_engine_with_other_partitions_are_503_nothing_accepted(
        api: Api) -> None:
    keys = Keys(api.settings.REDIS_PREFIX)
    api.r.hset(keys.config, "partitions", api.settings.PARTITIONS + 1)
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=events(3))
    assert answer.status == 503 and answer.error["code"] == "unavailable"
    assert "PARTITIONS" in answer.error["message"]
    assert "nothing was accepted" in answer.error["message"]
    assert api.intake() == []


async def test_events_for_an_intake_too_far_behind_are_503_nothing_accepted(
        settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition stream holding INTAKE_MAX_ENTRIES entries not yet processed: a
    request with events for it is 503 with Retry-After, nothing accepted; once the
    partitions caught up, it is accepted."""
    from engine import intake as intake_module

    monkeypatch.setattr(intake_module, "BACKLOG_CHECK_SEC", 0.0)  # lengths read each time
    client, api = await start_api(settings.model_copy(update={"INTAKE_MAX_ENTRIES": 2}),
                                  redis_client)
    try:
        one = events(1)  # one event per request: one entry in its partition
        for _ in range(2):
            assert (await api.call("POST", "/v1/events", api.ingest, json_body=one)).status == 202
        answer = await api.call("POST", "/v1/events", api.ingest, json_body=one)
        assert answer.status == 503 and answer.error["code"] == "unavailable"
        assert answer.headers["Retry-After"] == "1"
        message = answer.error["message"]
        assert "holds 2 entries not yet processed (INTAKE_MAX_ENTRIES is 2)" in message
        assert "nothing was accepted" in message
        assert len(api.intake()) == 2
        # processed (acknowledged and deleted, as a partition does): accepted again
        keys = Keys(settings.REDIS_PREFIX)
        for n in range(settings.PARTITIONS):
            ids = [eid for eid, _ in redis_client.xrange(keys.intake(n))]  # type: ignore[union-attr]
            if ids:
                redis_client.xdel(keys.intake(n), *ids)
        assert (await api.call("POST", "/v1/events", api.ingest, json_body=one)).status == 202
        assert len(api.intake()) == 1
    finally:
        await client.close()


async def test_a_connection_lost_during_the_append_says_the_events_may_be_in(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.intake import Intake

    def lost(self: Intake, encoded: Any, fresh: Any = ()) -> None:
        raise redis.ConnectionError("Redis connection lost while appending: reset")

    monkeypatch.setattr(Intake, "write", lost)
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=events(2))
    assert answer.status == 503 and answer.error["code"] == "unavailable"
    message = answer.error["message"]
    assert "may have been accepted" in message and "try again" not in message
    assert '"id"' in message and "hook_message_id" in message


@pytest.mark.parametrize("partial", ["false", "true"])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson", None])
async def test_a_bad_event_naming_another_account_is_403_with_or_without_partial(
        api: Api, partial: str, content_type: str | None) -> None:
    """The account of an event that does not decode (unknown type, bad field, a lone
    surrogate) is read as far as it can be: another account's refuses the request."""
    for bad in ({"account_id": 2, "event_type": "nope"},
                {**events(1, account_id=2)[0], "list_id": "x"},
                {**events(1, account_id=2)[0], "event_data": {"s": LONE}}):
        batch = [*events(1), bad]
        data = json.dumps(batch).encode() if content_type != "application/x-ndjson" \
            else b"\n".join(json.dumps(e).encode() for e in batch)
        headers = {"Content-Type": content_type} if content_type else {}
        answer = await api.call("POST", f"/v1/events?partial={partial}", api.ingest,
                                data=data, headers=headers)
        assert answer.status == 403, (bad, answer.body)
        assert answer.error["issues"] == [{"index": 1, "field": "account_id",
                                           "reason": "account 2 is not the token's account 1"}]
    assert api.intake() == []
    # an account_id that is no id is a bad event, not another account's
    batch = [*events(1), {**events(1)[0], "account_id": "2"}]
    answer = await api.call("POST", f"/v1/events?partial={partial}", api.ingest,
                            json_body=batch)
    assert answer.status == (207 if partial == "true" else 422)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson",
                                          "text/plain"])
async def test_a_leading_bom_is_dropped_and_a_body_of_no_events_accepts_none(
        api: Api, content_type: str) -> None:
    bom = b"\xef\xbb\xbf"
    batch = events(2)
    body = json.dumps(batch).encode() if content_type != "application/x-ndjson" \
        else b"\n".join(json.dumps(e).encode() for e in batch)
    answer = await api.call("POST", "/v1/events", api.ingest, data=bom + body,
                            headers={"Content-Type": content_type})
    assert (answer.status, answer.body) == (202, {"accepted": 2})
    for empty in (b"", b"  \n", bom, b"[]", bom + b" [ ] "):
        if content_type == "application/x-ndjson" and b"[" in empty:
            continue
        answer = await api.call("POST", "/v1/events", api.ingest, data=empty,
                                headers={"Content-Type": content_type})
        assert (answer.status, answer.body) == (202, {"accepted": 0}), empty
    assert len(api.intake()) == 2
    # a hook body too
    answer = await api.call("POST", "/v1/hooks", api.master,
                            data=bom + json.dumps(hook_body()).encode(),
                            headers={"Content-Type": "application/json"})
    assert answer.status == 201, answer.body


async def test_an_event_with_a_lone_surrogate_is_a_bad_event_named_by_index(api: Api) -> None:
    batch = events(3)
    batch[1]["event_data"] = {"campaign_id": 7, "title": "a" + LONE}
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=batch)
    assert answer.status == 422, answer.body
    [issue] = answer.error["issues"]
    assert issue["index"] == 1 and issue["field"] == "event_data.title"
    assert "not valid UTF-8" in issue["reason"]
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, json_body=batch)
    assert answer.status == 207 and answer.body["accepted"] == 2
    assert [i["index"] for i in answer.body["issues"]] == [1]
    assert len(api.intake()) == 2
    batch[2]["event_type"] = "clack"  # other bad events keep their index
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, json_body=batch)
    assert answer.status == 207 and answer.body["accepted"] == 1
    assert [(i["index"], i["field"]) for i in answer.body["issues"]] == [
        (1, "event_data.title"), (2, "event_type")]
    # NDJSON: each line is read alone; the issue names the field, not a byte offset
    ndjson = b"\n".join(json.dumps(e).encode() for e in batch)
    answer = await api.call("POST", "/v1/events", api.ingest, data=ndjson,
                            headers={"Content-Type": "application/x-ndjson"})
    assert answer.status == 422
    assert [(i["index"], i["field"]) for i in answer.error["issues"]] == [
        (1, "event_data.title"), (2, "event_type")]
    assert "not valid UTF-8" in answer.error["issues"][0]["reason"]


async def test_a_lone_surrogate_beside_a_number_out_of_range_keeps_both_events_bad_alone(
        api: Api) -> None:
    """The array read by Python for the surrogate reads 1e400 as inf: that event is bad
    (as msgspec finds it alone), not the whole body a 400 naming a hex escape."""
    batch = events(3)
    batch[0]["profile_id"] = "SURROGATE"
    batch[2]["event_data"] = {"x": [1, "OUT_OF_RANGE"]}
    body = json.dumps(batch).encode().replace(b'"SURROGATE"', b'"\\ud800"').replace(
        b'"OUT_OF_RANGE"', b"1e400")
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                            headers={"Content-Type": "application/json"})
    assert answer.status == 207, answer.body
    assert [(i["index"], i["field"], i["reason"][:21]) for i in answer.body["issues"]] == [
        (0, "profile_id", "not valid UTF-8: a lo"), (2, "event_data.x[1]", "Number out of range")]
    assert answer.body["accepted"] == 1
    # NaN is no JSON at all: the body is refused whole, as without the surrogate
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest,
                            data=body.replace(b"1e400", b"NaN"),
                            headers={"Content-Type": "application/json"})
    assert answer.status == 400, answer.body


async def test_a_damaged_hook_record_is_its_accounts_to_see_and_delete(api: Api) -> None:
    """Not JSON (cut short, edited by hand) or not an object: reported like a hook that
    no longer validates to the account it names (listed under "invalid", 409 naming it,
    DELETE removes it); 404 to the others, and to all when it names no account."""
    keys = Keys(api.settings.REDIS_PREFIX)
    retry = RetryStore(api.r, keys)
    cut, nameless = await api.create(), await api.create()
    letter = dead_letter(retry, cut, 1)
    record = api.r.hget(keys.hooks, str(cut["id"])) or b""
    api.r.hset(keys.hooks, str(cut["id"]), record[:record.index(b'"account_id"') + 30])
    api.r.hset(keys.hooks, str(nameless["id"]), b"[1, 2]")
    answer = await api.call("GET", "/v1/hooks", api.master)
    assert answer.status == 200 and answer.body["hooks"] == []
    [invalid] = answer.body["invalid"]
    assert invalid["id"] == cut["id"]
    assert invalid["error"].startswith(f"stored hook {cut['id']} is not valid JSON: its "
                                       "record is damaged")
    for method, path in (("GET", ""), ("POST", "/stop"), ("GET", "/stats")):
        answer = await api.call(method, f"/v1/hooks/{cut['id']}{path}", api.master)
        assert answer.status == 409, (method, path, answer.body)
        assert "is damaged" in answer.error["message"]
        assert f"stored hook {cut['id']}" in answer.error["message"]
        answer = await api.call(method, f"/v1/hooks/{cut['id']}{path}", api.other)
        assert answer.status == 404
        for token in (api.master, api.other):
            answer = await api.call(method, f"/v1/hooks/{nameless['id']}{path}", token)
            assert answer.status == 404, (method, path, answer.body)
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={cut['id']}", api.master)
    assert [d["id"] for d in answer.body["dead_letters"]] == [letter]
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={cut['id']}", api.other)
    assert answer.status == 404
    assert (await api.call("GET", "/v1/hooks", api.other)).body == {"hooks": [], "invalid": []}
    assert (await api.call("DELETE", f"/v1/hooks/{cut['id']}", api.other)).status == 404
    assert (await api.call("DELETE", f"/v1/hooks/{nameless['id']}", api.master)).status == 404
    assert (await api.call("DELETE", f"/v1/hooks/{cut['id']}", api.master)).status == 204
    assert (await api.call("GET", "/v1/hooks", api.master)).body == {"hooks": [], "invalid": []}


async def test_query_parameter_errors_are_422_naming_the_parameter(api: Api) -> None:
    for path, name in (("/v1/events?partial=maybe", "partial"),
                       ("/v1/dead-letters?limit=x", "limit"),
                       ("/v1/dead-letters?hook_id=-1", "hook_id"),
                       ("/v1/dead-letters?after=x", "after")):
        method = "POST" if path.startswith("/v1/events") else "GET"
        answer = await api.call(method, path, api.master, json_body=events(1))
        assert answer.status == 422, path
        assert answer.error["code"] == "validation_failed"
        assert [i["field"] for i in answer.error["issues"]] == [name]
    answer = await api.call("POST", "/v1/events?partial=" + "x" * 5000, api.master,
                            json_body=events(1))
    assert answer.status == 422 and len(answer.error["message"]) < 300


@pytest.mark.parametrize("after", ["1_0:x", "\uff11:x", "\u0661:x", " 1:x", "1 :x", "inf:x",
                                   "nan:x", "+1:x", "-1:x", "1:", "x:1"])
async def test_a_cursor_is_ascii_digits_as_the_description_says(api: Api, after: str) -> None:
    """float() takes "1_0", full-width and other scripts' digits: the description's
    pattern, and now the server, take ASCII digits only."""
    pattern = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))["paths"][
        "/v1/dead-letters"]["get"]["parameters"][2]["schema"]["pattern"]
    assert re.search(pattern, after) is None
    answer = await api.call("GET", f"/v1/dead-letters?after={quote(after)}", api.master)
    assert answer.status == 422, answer.body
    assert answer.error["issues"][0]["field"] == "after"


async def test_every_cursor_the_server_gives_matches_the_description(api: Api) -> None:
    from engine.stores import cursor_of

    pattern = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))["paths"][
        "/v1/dead-letters"]["get"]["parameters"][2]["schema"]["pattern"]
    for score in (0.0, 1.0, 1764000000123.0, 1.5, 1e300, 1.5e-7, 2.0**70):
        cursor = cursor_of(score, b"d-1")
        assert re.search(pattern, cursor), cursor
        answer = await api.call("GET", f"/v1/dead-letters?after={quote(cursor)}", api.master)
        assert answer.status == 200, (cursor, answer.body)
    # the cursors the server gives, for dead letters that died at those odd times: each
    # matches the description, and the page after it holds the next dead letter
    keys, hook = Keys(api.settings.REDIS_PREFIX), await api.create()
    retry = RetryStore(api.r, keys)
    scores = (0.0, 1.5e-7, 1.5, 1764000000123.0, 2.0**70, 1e300)
    ids = [dead_letter(retry, hook, n) for n in range(len(scores))]
    for zset in (keys.dead, keys.dead_of_account(hook["account_id"]),
                 keys.dead_of_hook(hook["id"])):
        api.r.zadd(zset, dict(zip(ids, scores, strict=True)))
    seen, after = [], ""
    while True:
        answer = await api.call("GET", f"/v1/dead-letters?limit=1{after}", api.master)
        assert answer.status == 200, answer.body
        for letter in answer.body["dead_letters"]:
            assert re.search(pattern, letter["cursor"]), letter["cursor"]
            seen.append(letter["id"])
        if answer.body["next"] is None:
            break
        assert re.search(pattern, answer.body["next"]), answer.body["next"]
        after = f"&after={quote(answer.body['next'])}"
    assert seen == ids  # in the order they died, none skipped or repeated


async def test_clone_refuses_unknown_fields_and_names_each_issue_once(api: Api) -> None:
    hook = await api.create()
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                            json_body={"name": "a", "x": 1})
    assert answer.status == 422
    assert answer.error["issues"] == [{"field": "x", "reason": "unknown field"}]
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/clone", api.master,
                            json_body={"name": "a" + LONE})
    assert answer.status == 422
    [issue] = answer.error["issues"]
    assert issue["field"] == "name" and issue["reason"].startswith("not valid UTF-8")
    assert "invalid hook" not in issue["reason"]
    assert [h["id"] for h in (await api.call("GET", "/v1/hooks", api.master)).body["hooks"]] \
        == [hook["id"]]


async def test_error_texts_quote_at_most_a_little_of_a_value_in_json_terms(api: Api) -> None:
    hook = await api.create()
    for event_type, reason in (
            ("x" * 10_000, "unknown event type '" + "x" * 80),
            (["x" * 10_000], "expected an event code (a string), got array"),
            (5, "expected an event code (a string), got number")):
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": event_type})
        assert answer.status == 422
        [issue] = answer.error["issues"]
        assert issue["reason"].startswith(reason) and len(issue["reason"]) < 200
        assert len(answer.error["message"]) < 200
    for given, name in ((None, "null"), ("2", "string"), (2.0, "number"), (True, "boolean"),
                        ([1], "array"), ({}, "object")):
        answer = await api.call("POST", "/v1/hooks", api.master,
                                json_body=hook_body(account_id=given))
        assert answer.status == 422
        assert answer.error["message"].endswith(f"expected an integer, got {name}")


@pytest.mark.parametrize("verb", ["replay", "discard"])
async def test_a_replay_or_discard_names_at_most_1000_ids(api: Api, verb: str) -> None:
    from engine.api import MAX_MOVE_IDS

    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    hook = await api.create()
    letter = dead_letter(retry, hook, 1)
    answer = await api.call("POST", f"/v1/dead-letters/{verb}", api.master,
                            json_body={"ids": [letter] * (MAX_MOVE_IDS + 1)})
    assert answer.status == 422
    [issue] = answer.error["issues"]
    assert issue["field"] == "ids" and "at most 1,000 ids" in issue["reason"]
    assert "1,001" in issue["reason"]
    answer = await api.call("POST", f"/v1/dead-letters/{verb}", api.master,
                            json_body={"ids": [letter] * MAX_MOVE_IDS})
    assert answer.status == 200 and answer.body == {
        {"replay": "replayed", "discard": "discarded"}[verb]: 1}
    spec = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    body = spec["paths"][f"/v1/dead-letters/{verb}"]["post"]["requestBody"]
    ids = body["content"]["application/json"]["schema"]["oneOf"][0]["properties"]["ids"]
    assert ids["maxItems"] == MAX_MOVE_IDS


async def test_a_body_sent_to_a_route_that_takes_none_is_read_as_any(
        settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """_refuse_coding applies to any request with a body, and the body is read: 415 for
    a coding the API does not decode, 400 for one its coding does not decode (once left
    for aiohttp to drain: an unhandled error logged, the connection broken), 413 too
    large. As the description says of every route."""
    client, api = await start_api(settings.model_copy(update={"API_MAX_BODY_BYTES": 2048}),
                                  redis_client)
    try:
        hook = await api.create()
        for method, path in (("GET", "/v1/hooks"), ("GET", f"/v1/hooks/{hook['id']}"),
                             ("POST", f"/v1/hooks/{hook['id']}/stop"), ("GET", "/v1/health"),
                             ("GET", "/v1/dead-letters")):
            for headers, data, status in (({"Content-Encoding": "foo"}, b"x", 415),
                                          ({"Content-Encoding": "gzip"}, b"garbage", 400),
                                          ({}, b"x" * 3000, 413)):
                answer = await api.call(method, path, api.master, data=data, headers=headers)
                assert answer.status == status, (method, path, headers, answer.body)
            answer = await api.call(method, path, api.master, data=b"ignored")
            assert answer.status == 200, (method, path)
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        await client.close()


@pytest.mark.parametrize("depth", [800, 5_000])
async def test_a_hook_body_nested_deeply_is_refused_not_a_500(api: Api, depth: int) -> None:
    """Secrets are looked for without recursion and validation refuses the shape: a
    body nested hundreds (or thousands) of levels deep is a 4xx naming the problem."""
    nested = '{"a": ' * depth + "1" + "}" * depth
    body = ('{"name": "deep", "actions": ["click"], "custom_data": ' + nested
            + ', "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}').encode()
    hook = await api.create()
    for method, path in (("POST", "/v1/hooks"), ("PUT", f"/v1/hooks/{hook['id']}")):
        answer = await api.call(method, path, api.master, data=body,
                                headers={"Content-Type": "application/json"})
        assert answer.status in (400, 422), (method, answer.status, answer.body)
        assert answer.error["message"]


async def test_a_change_with_if_match_is_made_only_on_the_hook_as_read(api: Api) -> None:
    """Every answer with a hook carries its ETag; a PUT, activate or stop sending it as
    If-Match is made only if the hook is still as read: a PUT built from an older GET
    no longer undoes a stop made meanwhile (412, nothing changed)."""
    created = await api.create(active=True)
    path = f"/v1/hooks/{created['id']}"
    read = await api.call("GET", path, api.master)
    etag = read.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    stopped = await api.call("POST", f"{path}/stop", api.master)  # someone else stops it
    assert stopped.status == 200 and stopped.headers["ETag"] != etag
    renamed = {**read.body, "name": "crm renamed"}
    answer = await api.call("PUT", path, api.master, json_body=renamed,
                            headers={"If-Match": etag})
    assert answer.status == 412, answer.body
    assert answer.error["code"] == "precondition_failed"
    assert f"hook {created['id']} changed since it was read" in answer.error["message"]
    assert (await api.call("GET", path, api.master)).body["active"] is False  # kept stopped
    for method, route in (("POST", f"{path}/activate"), ("POST", f"{path}/stop")):
        answer = await api.call(method, route, api.master, headers={"If-Match": etag})
        assert answer.status == 412, (route, answer.body)
    # as read now, or among the ETags given, or "*": made
    now = stopped.headers["ETag"]
    answer = await api.call("PUT", path, api.master, json_body={**renamed, "active": False},
                            headers={"If-Match": f'{etag}, {now}'})
    assert answer.status == 200 and answer.body["name"] == "crm renamed", answer.body
    # the secret was sent back redacted: kept, and the ETag shows no secret
    stored = json.loads(api.r.hget(Keys(api.settings.REDIS_PREFIX).hooks,
                                   str(created["id"])) or b"{}")
    assert stored["target"]["http_batch"]["auth"]["token"] == "s3cr3t"
    answer = await api.call("POST", f"{path}/activate", api.master,
                            headers={"If-Match": answer.headers["ETag"]})
    assert answer.status == 200 and answer.body["active"] is True
    answer = await api.call("POST", f"{path}/stop", api.master, headers={"If-Match": "*"})
    assert answer.status == 200
    # a weak ETag (a proxy may make one) never matches: as a hook changed since
    weak = f"W/{answer.headers['ETag']}"
    answer = await api.call("POST", f"{path}/stop", api.master, headers={"If-Match": weak})
    assert answer.status == 412, answer.body
    # an If-Match that is no ETag list: 400 naming it
    answer = await api.call("POST", f"{path}/stop", api.master, headers={"If-Match": "abc"})
    assert answer.status == 400 and answer.error["issues"][0]["field"] == "If-Match"
