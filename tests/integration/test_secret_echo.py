"""Secrets a destination echoes in an escaping of its own (PHP's JSON, percent-encoding,
HTML), and URL credentials in the spellings APIs document (``https://KEY:@host``,
``?code=``): never shown by a test event's answer or a dead letter, never testable by a
success regex, and kept by a PUT of a hook as read (security review findings 1 and 2).

Runs ``engine.api.create_app`` on a real aiohttp server on 127.0.0.1 against real
Redis (the fixtures of ``test_api``), destinations on 127.0.0.1. No Ray.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from engine.api import MASK
from engine.keys import Keys
from engine.stores import HookRegistry, RetryStore
from engine.transports.base import Delivery, now_ms
from tests.integration import test_api
from tests.integration.test_api import Api
from tests.integration.test_api_security import serving

api = test_api.api  # the fixture: an API on 127.0.0.1, tokens of accounts 1 and 2

pytestmark = pytest.mark.integration

BASE64_TOKEN = "Zm9vYmFy/c2VjcmV0+dG9rZW4="  # base64 tokens hold "/", "+" and "="
API_KEY = "sk_live_51SECRETKEYvalue"


def body(target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "crm", "actions": ["click"], "target": {"http_batch": {
        "max_batch_size": 50, "flush_timeout_sec": 0.3, **target}}, **extra}


async def create(api: Api, target: dict[str, Any]) -> dict[str, Any]:
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=body(target))
    assert answer.status == 201, answer.body
    return dict(answer.body)


async def send_test(api: Api, hook_id: int) -> dict[str, Any]:
    answer = await api.call("POST", f"/v1/hooks/{hook_id}/test", api.master,
                            json_body={"event_type": "click"})
    assert answer.status == 200, answer.body
    return dict(answer.body)


@pytest.fixture
async def echo() -> AsyncIterator[tuple[TestServer, list[dict[str, str]]]]:
    """A destination echoing what it was sent, and the headers of each request it got:
    ``/php`` answers its headers as PHP's ``json_encode`` writes them ("/" as "\\/"),
    ``/html`` an HTML page of them, ``/url`` the path and query it was asked for,
    anything else its headers as JSON; 200 with ``?status=200``, else 401."""
    seen: list[dict[str, str]] = []

    async def reflect(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        headers = {k: v for k, v in request.headers.items() if k != "Content-Length"}
        if request.path == "/php":
            text = json.dumps(headers).replace("/", "\\/")
        elif request.path == "/html":
            text = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                           for k, v in headers.items())
        elif request.path == "/url":
            text = f"you asked for {request.raw_path}"
        else:
            text = json.dumps(headers)
        return web.Response(status=int(request.query.get("status", "401")), text=text)

    async with serving(reflect) as server:
        yield server, seen


# --- finding 1: escapings the scrub did not know ----------------------------------------


async def test_a_token_echoed_as_php_writes_json_is_masked_in_a_test_events_answer(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    server, _ = echo
    hook = await create(api, {"url": str(server.make_url("/php")),
                              "auth": {"kind": "bearer", "token": BASE64_TOKEN}})
    answer = await send_test(api, hook["id"])
    assert answer["status"] == 401 and f'"Authorization": "Bearer {MASK}"' in answer["detail"]
    assert "c2VjcmV0" not in json.dumps(answer)


async def test_a_success_regex_cannot_test_guesses_of_a_token_echoed_as_php_writes_it(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    """The regex is matched against the answer with the token masked in the form echoed:
    the right guess matches no more than a wrong one; the mask itself matches."""
    server, _ = echo
    outcomes = {}
    for regex in ("Bearer Zm9vYmFy\\\\/c2Vj", "Bearer Zm9vYmFy\\\\/XXXX",
                  "Bearer \\*{10}"):
        hook = await create(api, {"url": str(server.make_url("/php?status=200")),
                                  "success_regex": regex,
                                  "auth": {"kind": "bearer", "token": BASE64_TOKEN}})
        outcomes[regex] = (await send_test(api, hook["id"]))["delivered"]
    assert outcomes == {"Bearer Zm9vYmFy\\\\/c2Vj": False, "Bearer Zm9vYmFy\\\\/XXXX": False,
                        "Bearer \\*{10}": True}


async def test_a_token_echoed_html_escaped_is_masked(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    server, _ = echo
    token = "tok\"<&>'-SECRET"
    hook = await create(api, {"url": str(server.make_url("/html")),
                              "auth": {"kind": "bearer", "token": token}})
    answer = await send_test(api, hook["id"])
    assert f"<td>Bearer {MASK}</td>" in answer["detail"] and "SECRET" not in answer["detail"]


async def test_a_query_credential_echoed_as_the_client_percent_encoded_it_is_masked(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    """The HTTP client sends ``?token=tä"k`` as ``?token=t%C3%A4%22k``: a destination
    echoing its request URL shows that form."""
    server, _ = echo
    hook = await create(api, {"url": str(server.make_url("/url")) + '?token=tä"k-SECRET&x=1'})
    answer = await send_test(api, hook["id"])
    assert answer["detail"].endswith(f"you asked for /url?token={MASK}&x=1"), answer["detail"]


async def test_a_dead_letter_echoing_a_token_as_php_writes_it_is_listed_masked(
        api: Api) -> None:
    retry = RetryStore(api.r, Keys(api.settings.REDIS_PREFIX))
    hook = await create(api, {"url": "https://r.example.com/h",
                              "auth": {"kind": "bearer", "token": BASE64_TOKEN}})
    error = ('Rejected: HTTP 401: status is not 200; body: {"Authorization":"Bearer '
             + BASE64_TOKEN.replace("/", "\\/") + '"}')
    retry.kill(Delivery(id="d-php", hook_id=hook["id"], account_id=1, kind="http_batch",
                        parts=[b'{"m": 1}'], message_ids=["m1"], created_ms=now_ms()), error)
    answer = await api.call("GET", "/v1/dead-letters", api.master)
    [letter] = answer.body["dead_letters"]
    assert letter["last_error"] == ("Rejected: HTTP 401: status is not 200; body: "
                                    f'{{"Authorization":"Bearer {MASK}"}}')


# --- finding 2: a user name with an empty password, ?code= ----------------------------


async def test_an_api_key_as_user_name_with_an_empty_password_is_never_shown(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    """``https://KEY:@host`` (``curl -u KEY:``): masked in every read and in what the
    destination echoes (the Basic authorization of ``KEY:``), and still sent."""
    server, seen = echo
    url = str(server.make_url("/h")).replace("://", f"://{API_KEY}:@")
    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    hook = await create(api, {"url": url})
    assert hook["target"]["http_batch"]["url"] == url.replace(API_KEY, MASK)
    listed = await api.call("GET", "/v1/hooks", api.master)
    assert API_KEY not in json.dumps(listed.body)
    answer = await send_test(api, hook["id"])
    assert seen[-1]["Authorization"] == f"Basic {basic}"  # sent as it was
    assert f'"Authorization": "Basic {MASK}"' in answer["detail"]
    assert basic not in answer["detail"] and API_KEY not in answer["detail"]


async def test_a_put_of_a_hook_as_read_keeps_a_masked_user_name_and_query_code(
        api: Api, echo: tuple[TestServer, list[dict[str, str]]]) -> None:
    """The API and the registry (the driver's and the CLI's update) restore the key from
    the stored hook; the mask sent to another destination is refused."""
    server, seen = echo
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    url = (str(server.make_url("/h")).replace("://", f"://{API_KEY}:@")
           + "?tenant=acme&code=AzFn/Key+SECRET==")
    hook = await create(api, {"url": url})
    shown = hook["target"]["http_batch"]["url"]
    assert API_KEY not in shown and "SECRET" not in shown and f"code={MASK}" in shown
    read = (await api.call("GET", f"/v1/hooks/{hook['id']}", api.master)).body
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                            json_body={**read, "name": "renamed"})
    assert answer.status == 200, answer.body
    assert registry.get(hook["id"]).to_storage()["target"]["http_batch"]["url"] == url
    await send_test(api, hook["id"])
    assert seen[-1]["Authorization"] == "Basic " + base64.b64encode(
        f"{API_KEY}:".encode()).decode()
    registry.update(hook["id"], {**read, "name": "again"})
    assert registry.get(hook["id"]).to_storage()["target"]["http_batch"]["url"] == url
    # another destination: the masked key cannot be carried there
    moved = json.loads(json.dumps(read))
    moved["target"]["http_batch"]["url"] = shown.replace("127.0.0.1", "localhost")
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master, json_body=moved)
    assert answer.status == 422, answer.body
    assert answer.error["issues"][0]["field"] == "target.http_batch.url"
    assert API_KEY not in json.dumps(answer.body)
