"""The HTTP API against hostile or unlucky input: CA file paths an account names, a
lone surrogate in a URL's user-info, huge values quoted back, a hung Redis under
load, and answers checked against the published description."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from engine.api import HEALTH_TIMEOUT_SEC, OPENAPI_PATH, create_app
from engine.auth import TOKEN_PREFIX
from engine.hooks import SHOWN_CHARS
from engine.keys import Keys
from engine.settings import Settings
from engine.stores import HookRegistry
from tests.integration import test_api
from tests.integration.test_api import Api, hook_body, hung_redis, start_api

pytestmark = pytest.mark.integration
api = test_api.api  # the fixture: an API on 127.0.0.1, tokens of accounts 1 and 2


TOKEN = f"{TOKEN_PREFIX}_{'0' * 16}_{'x' * 43}"  # well-formed: looked up in Redis


def rabbit_body(**broker: Any) -> dict[str, Any]:
    return {"name": "mq", "actions": ["click"],
            "target": {"rabbitmq_queue": {"host": "127.0.0.1", "queue": "q", **broker}}}


def kafka_body(**kafka: Any) -> dict[str, Any]:
    return {"name": "k", "actions": ["click"],
            "target": {"kafka": {"bootstrap_servers": ["127.0.0.1:9092"], "topic": "t",
                                 **kafka}}}


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ca"
    folder.mkdir()
    (folder / "ca.pem").write_text("not checked when a hook is stored\n")
    return folder


@pytest.fixture
async def api_with_ca_dir(settings: Settings, redis_client: redis.Redis, ca_dir: Path
                          ) -> AsyncIterator[Api]:
    client, api = await start_api(
        settings.model_copy(update={"API_TLS_CA_DIR": str(ca_dir)}), redis_client)
    yield api
    await client.close()


# --- tls_cafile: a path on the engine's machines ------------------------------------------


async def test_tls_cafile_is_refused_while_no_ca_directory_is_set(api: Api) -> None:
    # Given an API whose operator set no API_TLS_CA_DIR
    for body, field in ((rabbit_body(tls=True, tls_cafile="/dev/kmsg"),
                         "target.rabbitmq_queue.tls_cafile"),
                        (kafka_body(tls=True, tls_cafile="/etc/ssl/certs/ca-certificates.crt"),
                         "target.kafka.tls_cafile")):
        # When an account creates a hook naming a CA file
        answer = await api.call("POST", "/v1/hooks", api.master, json_body=body)
        # Then it is refused, naming the field and the setting, and nothing is stored
        assert answer.status == 422, answer.body
        assert answer.error["issues"][0]["field"] == field
        assert "API_TLS_CA_DIR" in answer.error["issues"][0]["reason"]
    listed = await api.call("GET", "/v1/hooks", api.master)
    assert listed.body["hooks"] == []
    # (a broker hook without a CA file is taken: the system's CAs)
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=rabbit_body(tls=True))
    assert answer.status == 201, answer.body


async def test_tls_cafile_is_taken_only_under_the_ca_directory(
        api_with_ca_dir: Api, ca_dir: Path, tmp_path: Path) -> None:
    api = api_with_ca_dir
    inside = str(ca_dir / "ca.pem")
    (tmp_path / "outside.pem").write_text("x\n")
    (ca_dir / "escape.pem").symlink_to(tmp_path / "outside.pem")
    # When a hook names a file under API_TLS_CA_DIR, it is stored
    answer = await api.call("POST", "/v1/hooks", api.master,
                            json_body=rabbit_body(tls=True, tls_cafile=inside))
    assert answer.status == 201, answer.body
    assert answer.body["target"]["rabbitmq_queue"]["tls_cafile"] == inside
    # and a path outside it (also through "..", a symbolic link or a relative path) is not
    outside = f"must name a file under {ca_dir} (API_TLS_CA_DIR)"
    for path, reason in ((str(tmp_path / "outside.pem"), outside),
                         (f"{ca_dir}/../outside.pem", outside),
                         (str(ca_dir / "escape.pem"), outside),
                         (str(ca_dir), outside), (f"{ca_dir}/", outside),
                         (f"{ca_dir}/ca\x00.pem",
                          "holds a control character: no file of the engine's has such a name"),
                         ("ca.pem", f"must be an absolute path under {ca_dir}")):
        answer = await api.call("POST", "/v1/hooks", api.master,
                                json_body=kafka_body(tls=True, tls_cafile=path))
        assert answer.status == 422, (path, answer.body)
        assert answer.error["issues"] == [{"field": "target.kafka.tls_cafile",
                                           "reason": reason}], path


async def test_a_put_keeps_a_stored_ca_file_but_takes_no_new_one_outside_the_directory(
        api_with_ca_dir: Api, ca_dir: Path) -> None:
    # Given a hook whose CA file the operator gave outside API_TLS_CA_DIR (the CLI, say)
    api = api_with_ca_dir
    registry = HookRegistry(api.r, Keys(api.settings.REDIS_PREFIX))
    stored = registry.create({**rabbit_body(tls=True, tls_cafile="/opt/operator/ca.pem"),
                              "account_id": 1})
    path = f"/v1/hooks/{stored.id}"
    hook = (await api.call("GET", path, api.master)).body
    # When the account renames it, sending back what it read
    answer = await api.call("PUT", path, api.master, json_body={**hook, "name": "renamed"})
    # Then the stored CA file is kept
    assert answer.status == 200, answer.body
    assert answer.body["name"] == "renamed"
    assert answer.body["target"]["rabbitmq_queue"]["tls_cafile"] == "/opt/operator/ca.pem"
    # but another one outside the directory is refused, and one inside it is taken (another
    # CA file is another destination: the password is sent again)
    hook["target"]["rabbitmq_queue"]["password"] = "guest"
    hook["target"]["rabbitmq_queue"]["tls_cafile"] = "/opt/operator/other.pem"
    answer = await api.call("PUT", path, api.master, json_body=hook)
    assert answer.status == 422 and answer.error["issues"][0]["field"] == \
        "target.rabbitmq_queue.tls_cafile"
    hook["target"]["rabbitmq_queue"]["tls_cafile"] = str(ca_dir / "ca.pem")
    answer = await api.call("PUT", path, api.master, json_body=hook)
    assert answer.status == 200, answer.body
    assert registry.get(stored.id).target.settings.tls_cafile == str(ca_dir / "ca.pem")


# --- error texts ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://user:\ud800@example.com/",
                                 "https://\ud800@example.com/"])
async def test_a_lone_surrogate_in_a_url_user_info_is_422(api: Api, url: str) -> None:
    # (json.dumps writes the lone surrogate as the escape "\ud800")
    for method, path in (("POST", "/v1/hooks"), ("PUT", None)):
        if path is None:
            path = f"/v1/hooks/{(await api.create())['id']}"
        answer = await api.call(method, path, api.master, json_body=hook_body(url=url))
        assert answer.status == 422, (method, answer.body)
        issue = answer.error["issues"][0]
        assert issue["field"] == "target.http_batch.url"
        assert issue["reason"].startswith("not valid UTF-8: a lone surrogate"), issue


async def test_values_sent_are_quoted_back_100_characters_at_most(api: Api) -> None:
    huge = "a" * 20_000
    bodies = {
        "url": hook_body(url="ftp://" + huge),
        "actions": {**hook_body(), "actions": [huge, *(f"x{n}" for n in range(50))]},
        "header": {**hook_body(), "target": {"http_batch": {
            "url": "http://127.0.0.1:9/x", "headers": {huge: "v\n"}}}},
        "kafka server": kafka_body(bootstrap_servers=[huge]),
    }
    for what, body in bodies.items():
        answer = await api.call("POST", "/v1/hooks", api.master, json_body=body)
        assert answer.status == 422, (what, answer.body)
        # the value quoted back is cut to SHOWN_CHARS characters (then "…")
        assert "a" * (SHOWN_CHARS + 1) not in json.dumps(answer.body), what
        assert "a" * (SHOWN_CHARS - 10) in answer.error["message"], what
        assert "…" in answer.error["message"], what
    answer = await api.call("POST", "/v1/hooks", api.master, json_body=bodies["actions"])
    assert "and 41 more" in answer.error["message"]  # 51 unknown codes: 10 named
    hook = await api.create()
    answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                            json_body={**hook_body(), "id": huge})
    assert answer.status == 422 and len(answer.error["message"]) < 200, answer.body


# --- a hung Redis ----------------------------------------------------------------------


async def test_health_answers_while_requests_hang_on_a_hung_redis(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests blocked on a Redis that never answers take every one of the API's
    threads; the health probe has its own, and the blocked requests end as 503."""
    monkeypatch.setattr("engine.api.REDIS_TIMEOUT_SEC", 3.0)
    with hung_redis(settings) as hung:
        async with TestClient(TestServer(create_app(hung), host="127.0.0.1")) as client:
            async def post() -> int:
                rsp = await client.post("/v1/events", data=b"[]",
                                        headers={"Authorization": f"Bearer {TOKEN}"})
                return rsp.status

            # When more requests than the API has threads wait on the hung Redis
            blocked = [asyncio.create_task(post()) for _ in range(8)]
            await asyncio.sleep(0.5)
            # Then the health probe still answers 503 within its timeout
            began = time.monotonic()
            rsp = await client.get("/v1/health")
            took = time.monotonic() - began
            assert rsp.status == 503 and took < HEALTH_TIMEOUT_SEC * 3, took
            assert not all(t.done() for t in blocked)
            # and each blocked request ends as 503 once Redis does not answer in time
            done = await asyncio.wait_for(asyncio.gather(*blocked), 60)
    assert done == [503] * 8, done


# --- answers against the published description ---------------------------------------------


async def test_hooks_read_back_validate_against_the_published_schema(api: Api) -> None:
    document = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    schema = {"$ref": "#/components/schemas/Hook", "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    bodies = [hook_body(), {**hook_body(), "target": {"http_batch": {
        "url": "http://127.0.0.1:9/x"}}}, rabbit_body(), kafka_body(),
        kafka_body(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p", tls=True)]
    for body in bodies:
        created = await api.call("POST", "/v1/hooks", api.master, json_body=body)
        assert created.status == 201, created.body
        read = await api.call("GET", f"/v1/hooks/{created.body['id']}", api.master)
        for answer in (created.body, read.body):
            problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                        for e in validator.iter_errors(answer)]
            assert problems == [], (body, problems)
    listed = await api.call("GET", "/v1/hooks", api.master)
    assert len(listed.body["hooks"]) == len(bodies)
    problems = [e.message for e in jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Hook", "components": document["components"]}
    ).iter_errors(listed.body["hooks"][0])]
    assert problems == []


# --- many or huge bad values ------------------------------------------------------------


async def test_an_answer_lists_at_most_a_thousand_issues_and_counts_them_all(
        api: Api) -> None:
    """``1,`` is a bad event in two bytes: a body of megabytes would otherwise be
    answered with an issue each, hundreds of megabytes out of one request."""
    from engine.api import MAX_ISSUES_LISTED

    document = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    error = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Error", "components": document["components"]})
    good = test_api.events(1)[0]
    body = json.dumps([good] + [1] * 5000)
    refused = await api.call("POST", "/v1/events", api.ingest, data=body,
                             headers={"Content-Type": "application/json"})
    assert refused.status == 422
    assert refused.error["message"] == (f"5000 bad event(s), nothing accepted (the first "
                                        f"{MAX_ISSUES_LISTED} listed)")
    assert len(refused.error["issues"]) == MAX_ISSUES_LISTED
    assert refused.error["issues"][0] == {"index": 1, "field": "$",
                                          "reason": "Expected `object`, got `int`"}
    assert [e.message for e in error.iter_errors(refused.body)] == []
    partial = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                             headers={"Content-Type": "application/json"})
    assert partial.status == 207 and partial.body["accepted"] == 1
    assert partial.body["rejected"] == 5000
    assert len(partial.body["issues"]) == MAX_ISSUES_LISTED
    hook = await api.call("POST", "/v1/hooks", api.master,
                          json_body={**hook_body(), **{f"f{n}": 1 for n in range(3000)}})
    assert hook.status == 422 and len(hook.error["issues"]) == 1000
    assert hook.error["message"].endswith("; and 2980 more")
    assert hook.error["message"].count("Extra inputs are not permitted") == 20


@pytest.mark.parametrize(("event", "field"), [
    ({"event_type": "x" * 5000}, "event_type"),
    ({"event_date": "2026" * 2000}, "event_date"),
    ({"campaign_id": 1, "event_data": {"campaign_id": "9" * 5000}}, "event_data.campaign_id"),
    ({"k" * 5000: 1}, "k" * SHOWN_CHARS + "…"),
])
async def test_an_event_error_quotes_a_huge_value_or_key_by_its_start(
        api: Api, event: dict[str, Any], field: str) -> None:
    bad = {**test_api.events(1)[0], **event}
    answer = await api.call("POST", "/v1/events", api.ingest, json_body=[bad])
    assert answer.status == 422
    [issue] = answer.error["issues"]
    assert issue["field"] == field
    assert len(issue["reason"]) < 2 * SHOWN_CHARS + 100, issue["reason"]


# --- bodies answered before they were read, malformed requests ----------------------------


async def _raw(port: int, request: bytes) -> bytes:
    """``request`` sent as it is; the answer read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.parametrize(("head", "status"), [
    (b"POST /v1/hooks HTTP/1.1", b"401"),  # no token
    (b"POST /v1/nope HTTP/1.1", b"404"),
    (b"PATCH /v1/hooks HTTP/1.1", b"405"),
])
async def test_a_body_answered_before_it_was_read_logs_no_error_whatever_it_holds(
        api: Api, caplog: pytest.LogCaptureFixture, head: bytes, status: bytes) -> None:
    """The body is read to its end after the answer (a large one too, so the client
    sees the answer); one its Content-Encoding cannot decode closes the connection
    instead of being left to aiohttp, whose failed drain logged a traceback at ERROR
    for anyone to fill the log with."""
    port = api.client.server.port
    assert port is not None
    with caplog.at_level(logging.INFO):
        for extra, body in ((b"Content-Encoding: gzip\r\n", b"notgzip!!!"),
                            (b"", b"x" * 5_000_000)):
            answer = await _raw(port, head + b"\r\nHost: x\r\n" + extra +
                                b"Content-Length: " + str(len(body)).encode() +
                                b"\r\nConnection: close\r\n\r\n" + body)
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status, answer[:200]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_an_early_answer_goes_out_before_the_rest_of_the_body_arrives(api: Api) -> None:
    """A client still sending its body (slowly, or waiting) gets its 401 at once; the
    body is read to its end after the answer, not before it."""
    port = api.client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/hooks HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                 + b"x" * 10)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 3)  # DRAIN_SEC is 10
    writer.close()
    assert line.startswith(b"HTTP/1.1 401"), line


async def test_a_malformed_request_is_logged_in_one_line_at_info(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    port = api.client.server.port
    assert port is not None
    with caplog.at_level(logging.INFO):
        answer = await _raw(port, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 3"
                            b"\r\nTransfer-Encoding: chunked\r\n\r\n[]")
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
    [record] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage().startswith("Error handling request from 127.0.0.1: malformed "
                                          "HTTP request: Transfer-Encoding can't be present")


@pytest.mark.parametrize(("method", "path", "field", "takes"), [
    ("POST", "/v1/events?partail=true", "partail", "it takes partial"),
    ("GET", "/v1/dead-letters?hookid=5", "hookid", "it takes after, hook_id, limit"),
    ("GET", "/v1/hooks?account_id=2", "account_id", "it takes none"),
])
async def test_an_unknown_query_parameter_is_refused_not_ignored(
        api: Api, method: str, path: str, field: str, takes: str) -> None:
    """?partail=true would be all-or-nothing, ?hookid=5 every dead letter of the
    account: refused, naming it, as unknown body fields are."""
    answer = await api.call(method, path, api.master,
                            json_body=test_api.events(1) if method == "POST" else None)
    assert answer.status == 422, answer.body
    assert answer.error["issues"] == [{"field": field,
                                       "reason": f"unknown query parameter; {takes}"}]
    assert api.intake() == []


async def test_a_hook_id_beyond_int64_in_a_replay_body_is_a_422(api: Api) -> None:
    for verb in ("replay", "discard"):
        answer = await api.call("POST", f"/v1/dead-letters/{verb}", api.master,
                                json_body={"all": True, "hook_id": 2**70})
        assert answer.status == 422, answer.body
        assert answer.error["issues"] == [{"field": "hook_id", "reason": (
            "an integer from 0 to 9223372036854775807, only with \"all\"")}]
