"""The HTTP API's secrets and boundaries: nothing an account configured as a secret is
shown back by any answer or written to the log, whatever a destination or a
malformed setting makes of it.

Runs ``engine.api.create_app`` on a real aiohttp server on 127.0.0.1 against real
Redis (the fixtures of ``test_api``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.api import MASK
from engine.errors import HookError
from engine.health import Heartbeat
from engine.keys import Keys
from engine.stores import HookRegistry, RetryStore
from engine.transports.base import Delivery, now_ms
from tests.integration import test_api
from tests.integration.test_api import Api, hook_body

api = test_api.api  # the fixture: an API on 127.0.0.1, tokens of accounts 1 and 2

pytestmark = pytest.mark.integration


@pytest.fixture
async def echo() -> AsyncIterator[TestServer]:
    """A destination that answers 401 with every request header in its body, as many
    debugging endpoints and error pages do."""

    async def reflect(request: web.Request) -> web.Response:
        return web.Response(status=401, text=json.dumps(dict(request.headers)))

    async with serving(reflect) as server:
        yield server


@asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[TestServer]:
    """A server on 127.0.0.1 answering every method and path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


# --- 4xx answers ----------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://crm:pw?SECRET@127.0.0.1:9/hook",  # '?' ends the host part for a URL parser
    "http://crm:pw/SECRET@127.0.0.1:9/hook",
    "http://crm:pw#SECRET@127.0.0.1:9/hook",
])
async def test_a_url_password_that_breaks_the_url_is_not_echoed_by_the_422(
        api: Api, url: str) -> None:
    """A password holding an unencoded ``?``, ``/`` or ``#`` makes the URL invalid (the
    parser takes the part before it for a port); the 422 names the URL without it."""
    for target in ({"http_batch": {"url": url}},
                   {"http_batch": {"url": "https://crm.example.com/h", "auth": {
                       "kind": "oauth2", "token_url": url, "client_id": "c",
                       "client_secret": "cs"}}}):
        answer = await api.call("POST", "/v1/hooks", api.master,
                                json_body=hook_body(target=target))
        assert answer.status == 422, answer.body
        assert answer.error["issues"][0]["field"] in ("target.http_batch.url",
                                                      "target.http_batch.auth")
        assert "invalid port" in answer.error["message"]
        assert "SECRET" not in json.dumps(answer.body)
        assert MASK in answer.error["message"]
    # on PUT too
    hook = await api.create()
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                            json_body=hook_body(url))
    assert answer.status == 422 and "SECRET" not in json.dumps(answer.body)


# --- test events ------------------------------------------------------------------------


async def test_a_test_event_answer_never_shows_secrets_a_destination_echoes(
        api: Api, echo: TestServer) -> None:
    """The hook's bearer token and credential header, echoed back by the destination in
    its answer, read as the mask in the test event's outcome."""
    url = str(echo.make_url("/h"))
    basic = base64.b64encode(b"crm:pw-SECRET").decode()  # the URL's credentials, sent
    for target in ({"http_batch": {"url": url, "headers": {"X-Api-Key": "key-SECRET",
                                                           "X-Tenant": "acme"}}},
                   {"http_batch": {"url": url, "auth": {"kind": "bearer",
                                                        "token": "tok-SECRET"}}},
                   {"http_batch": {"url": url.replace("://", "://crm:pw-SECRET@")}}):
        hook = await api.create(target=target)
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": "click"})
        assert answer.status == 200
        assert answer.body["delivered"] is False and answer.body["status"] == 401
        assert answer.body["error"] == "Rejected"
        assert "HTTP 401" in answer.body["detail"] and MASK in answer.body["detail"]
        assert "SECRET" not in json.dumps(answer.body) and basic not in answer.body["detail"]
        if "crm:" in target["http_batch"]["url"]:
            assert f"Basic {MASK}" in answer.body["detail"]


@pytest.fixture
async def echo_shaped() -> AsyncIterator[TestServer]:
    """A destination that answers ``?status=`` (401 if not given) with ``?pad=``
    characters then the Authorization header it was sent; ``/token`` is an OAuth2
    token endpoint."""

    async def reflect(request: web.Request) -> web.Response:
        if request.path == "/token":
            return web.json_response({"access_token": "ACCESS-live-SECRET"})
        pad = "x" * int(request.query.get("pad", "0"))
        return web.Response(status=int(request.query.get("status", "401")),
                            text=f"{pad}you sent: {request.headers.get('Authorization')}")

    async with serving(reflect) as server:
        yield server


async def test_a_secret_echoed_across_the_cut_of_an_answer_is_not_shown_in_part(
        api: Api, echo_shaped: TestServer) -> None:
    """The answer is cut to an excerpt: masked before, a secret falling across the cut
    would not be found whole after it, and its first part would be shown. The stored
    token is kept by a PUT that only changes the query, so a master token could try
    every place of the cut."""
    token = "tok-A1b2C3d4A1b2C3d4A1b2C3d4A1b2C3d4A1b2C3d4A1b2C3d4"
    hook = await api.create(target={"http_batch": {
        "url": str(echo_shaped.make_url("/h")), "auth": {"kind": "bearer", "token": token}}})
    for pad in range(230, 300, 7):
        target = {"http_batch": {"url": str(echo_shaped.make_url(f"/h?pad={pad}")),
                                 "auth": {"kind": "bearer", "token": MASK}}}
        changed = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                                 json_body=hook_body(target=target))
        assert changed.status == 200, changed.body
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": "click"})
        assert answer.body["status"] == 401, answer.body
        assert "tok-A1b2" not in answer.body["detail"], (pad, answer.body["detail"])


async def test_a_success_regex_cannot_tell_what_a_secret_holds(
        api: Api, echo_shaped: TestServer) -> None:
    """A destination echoing the request in a 2xx answer: a success_regex naming a guess
    of the stored token would say, by delivered, whether the guess is right. It is
    matched against the answer with the hook's secrets masked."""
    url = str(echo_shaped.make_url("/h?status=200"))
    outcomes = {}
    for regex in ("you sent: Bearer t", "you sent: Bearer \\*{10}"):
        hook = await api.create(target={"http_batch": {
            "url": url, "success_regex": regex, "auth": {"kind": "bearer",
                                                         "token": "tok-SECRET"}}})
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": "click"})
        outcomes[regex] = answer.body["delivered"]
    assert outcomes == {"you sent: Bearer t": False, "you sent: Bearer \\*{10}": True}


async def test_an_oauth2_access_token_a_destination_echoes_is_masked(
        api: Api, echo_shaped: TestServer) -> None:
    """The access token the engine got with the hook's client secret is as secret."""
    hook = await api.create(target={"http_batch": {
        "url": str(echo_shaped.make_url("/h")), "auth": {
            "kind": "oauth2", "token_url": str(echo_shaped.make_url("/token")),
            "client_id": "c", "client_secret": "cs-SECRET"}}})
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "click"})
    assert answer.body["status"] == 401 and f"you sent: Bearer {MASK}" in answer.body["detail"]
    assert "SECRET" not in json.dumps(answer.body)


async def test_the_log_of_a_test_event_that_could_not_be_sent_holds_no_secret(
        api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from engine.transports.http import HttpTransport

    async def refuse(self: HttpTransport, target: Any, body: bytes, auth: Any) -> Any:
        token = target.auth.token.get_secret_value()
        raise ValueError(f"cannot send Authorization: Bearer {token}")

    monkeypatch.setattr(HttpTransport, "_post", refuse)
    caplog.set_level(logging.INFO)
    hook = await api.create()  # bearer token s3cr3t
    answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                            json_body={"event_type": "click"})
    assert answer.status == 200 and answer.body["error"] == "ValueError"
    assert f"test event of hook {hook['id']}: the http_batch transport failed" in caplog.text
    assert f"ValueError: cannot send Authorization: Bearer {MASK}" in caplog.text
    assert "refuse" in caplog.text  # the traceback is kept
    assert "s3cr3t" not in caplog.text


# --- dead letters -----------------------------------------------------------------------


async def test_dead_letter_errors_never_show_the_hooks_secrets(api: Api) -> None:
    """A failed delivery's error text (a destination's answer echoing the credentials it
    was sent) reads with each of the hook's secrets masked."""
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    target = {"http_batch": {"url": "https://crm:pw-SECRET@r.example.com/h?token=qt-SECRET",
                             "headers": {"X-Api-Key": "key-SECRET"}}}
    hook = await api.create(target=target)
    error = ("Rejected: HTTP 401: status is not 200; body: {\"X-Api-Key\": \"key-SECRET\", "
             "\"url\": \"https://crm:pw-SECRET@r.example.com/h?token=qt-SECRET\"}")
    delivery = Delivery(id="d-1", hook_id=hook["id"], account_id=1, kind="http_batch",
                        parts=[b'{"m": 1}'], message_ids=["m1"], created_ms=now_ms())
    retry.kill(delivery, error)
    answer = await api.call("GET", "/v1/dead-letters", api.master)
    assert answer.status == 200
    [letter] = answer.body["dead_letters"]
    assert letter["last_error"] == (
        f"Rejected: HTTP 401: status is not 200; body: {{\"X-Api-Key\": \"{MASK}\", "
        f"\"url\": \"https://crm:{MASK}@r.example.com/h?token={MASK}\"}}")
    answer = await api.call("GET", f"/v1/dead-letters?hook_id={hook['id']}", api.master)
    assert "SECRET" not in json.dumps(answer.body)


# --- stored hooks that no longer validate -----------------------------------------------


async def test_why_a_stored_hook_no_longer_validates_never_shows_its_secrets(
        api: Api) -> None:
    """A stored URL whose password the URL parser cannot read as one (an unencoded "?"),
    written by an earlier version or by hand: the reason it no longer validates, in the
    list and in the 409 of its routes, shows the password masked."""
    keys = Keys(api.settings.REDIS_PREFIX)
    broken = await api.create()
    stored = json.loads(api.r.hget(keys.hooks, str(broken["id"])) or b"{}")
    stored["target"]["http_batch"].update(url="http://crm:pw?SECRET@127.0.0.1:9/hook",
                                          auth={"kind": "none"})
    api.r.hset(keys.hooks, str(broken["id"]), json.dumps(stored))
    answer = await api.call("GET", "/v1/hooks", api.master)
    assert answer.status == 200
    [invalid] = answer.body["invalid"]
    assert "invalid port" in invalid["error"] and MASK in invalid["error"]
    answer_json = json.dumps(answer.body)
    for method, path in (("GET", ""), ("POST", "/activate"), ("POST", "/clone")):
        answer = await api.call(method, f"/v1/hooks/{broken['id']}{path}", api.master)
        assert answer.status == 409, answer.body
        assert "invalid port" in answer.error["message"] and MASK in answer.error["message"]
        answer_json += json.dumps(answer.body)
    assert "SECRET" not in answer_json


async def test_the_health_answer_without_a_token_shows_nothing_of_an_accounts_hook(
        api: Api) -> None:
    """A worker waits on a stored hook that no longer validates: GET /v1/health, which
    anyone may call, says which hook, not its settings (the validator's reason quotes
    its URL: host, path, a password the parser could not read as one)."""
    keys = Keys(api.settings.REDIS_PREFIX)
    broken = await api.create()
    stored = json.loads(api.r.hget(keys.hooks, str(broken["id"])) or b"{}")
    stored["target"]["http_batch"].update(
        url="http://crm:pw?SECRET@crm.internal.example/private-path", auth={"kind": "none"})
    api.r.hset(keys.hooks, str(broken["id"]), json.dumps(stored))
    with pytest.raises(HookError) as caught:  # what a worker's round meets, and marks
        HookRegistry(api.r, keys).load()
    # the reason names the host and path (the password is masked by the validator)
    assert "SECRET" not in str(caught.value) and "crm.internal" in str(caught.value)
    api.r.hset(keys.config, "partitions", 1)
    Heartbeat(api.r, keys, "partition:0").beat(str(caught.value))
    Heartbeat(api.r, keys, "retry").beat(str(caught.value))
    answer = await api.call("GET", "/v1/health")
    assert answer.status == 200
    reason = f"stored hook {broken['id']} no longer validates"
    assert answer.body["partitions"]["waiting"] == [{"partition": 0, "reason": reason}]
    assert answer.body["retry_waiting"] == reason


async def test_a_secret_quoted_in_json_by_a_destination_is_masked_too(api: Api) -> None:
    """A destination answering JSON escapes a secret's quotes, backslashes and non-ASCII
    characters: the dead letter's error shows the mask in place of each form."""
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    token = 'tök"\\-SECRET'
    hook = await api.create(target={"http_batch": {
        "url": "https://r.example.com/h", "auth": {"kind": "bearer", "token": token}}})
    error = ("Rejected: HTTP 401: status is not 200; body: "
             + json.dumps({"a": f"Bearer {token}"}) + " "
             + json.dumps({"b": f"Bearer {token}"}, ensure_ascii=False))
    delivery = Delivery(id="d-json", hook_id=hook["id"], account_id=1, kind="http_batch",
                        parts=[b'{"m": 1}'], message_ids=["m1"], created_ms=now_ms())
    retry.kill(delivery, error)
    answer = await api.call("GET", "/v1/dead-letters", api.master)
    [letter] = answer.body["dead_letters"]
    assert letter["last_error"] == ("Rejected: HTTP 401: status is not 200; body: "
                                    f'{{"a": "Bearer {MASK}"}} {{"b": "Bearer {MASK}"}}')


async def test_a_hook_error_no_route_expected_is_masked_too(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware's answer to a HookError a route did not map (a race) masks the
    secrets of the route's hook, as a route's own answer does."""
    from engine.stores import Stats

    hook = await api.create()  # bearer token s3cr3t

    def failing(self: Stats, hook_id: int) -> Any:
        raise HookError(f"stored hook {hook_id} no longer validates: token s3cr3t")

    monkeypatch.setattr(Stats, "get", failing)
    answer = await api.call("GET", f"/v1/hooks/{hook['id']}/stats", api.master)
    assert answer.status == 409 and answer.error["code"] == "conflict"
    assert "s3cr3t" not in json.dumps(answer.body) and MASK in answer.error["message"]
