"""What a request body may cost the API, and what it holds meanwhile.

``POST /v1/events``: a bad event can be two bytes (``{}``), so a body of 16 MiB held
millions, each given an issue object although an answer lists 1,000: issues are now
built for those listed only (the others counted), and a request takes at most
MAX_EVENTS_PER_REQUEST events, refused (413) before they are decoded one by one.
The hook routes (create, update, clone, test, replay, discard) read and check their
body in the API's threads, not on its event loop, which answers GET /v1/health
meanwhile, and take at most MAX_OBJECT_BODY_BYTES. The API of ``create_app`` on
127.0.0.1 and real Redis; no Ray.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

import engine.api
from engine.api import MAX_ISSUES_LISTED
from engine.bodies import decode_body
from engine.catalogue import load_catalogue
from engine.events import EventIssue
from engine.keys import Keys
from tests.integration import test_api
from tests.integration.test_api import Api, hook_body

pytestmark = pytest.mark.integration
api = test_api.api  # the fixture: an API on 127.0.0.1, tokens of accounts 1 and 2

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
# what the API takes at most in one request; the values this fix chose (in engine.api:
# absent before it, when a test of the limit posts these)
MAX_EVENTS = 100_000
MAX_OBJECT_BYTES = 1 << 20


def good(n: int = 0) -> bytes:
    """A good event of account 1, told apart by its id."""
    return json.dumps({**test_api.events(1)[0], "id": f"good-{n}"}).encode()


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many EventIssue objects are built for an event (index 0 or more; not the
    body's own, index -1), whoever builds them."""
    count = [0]
    init = EventIssue.__init__

    def counting(self: EventIssue, index: int, *args: Any, **kwargs: Any) -> None:
        count[0] += index >= 0
        init(self, index, *args, **kwargs)

    monkeypatch.setattr(EventIssue, "__init__", counting)
    return count


async def post_large(api: Api, method: str, path: str, token: str, body: bytes,
                     headers: dict[str, str]) -> test_api.Answer:
    """``api.call`` of a body of more than 1 MiB (aiohttp's client warns about one
    given as bytes)."""
    async with api.client.request(method, path, data=io.BytesIO(body), headers={
            **headers, "Authorization": f"Bearer {token}"}) as rsp:
        return test_api.Answer(rsp.status, json.loads(await rsp.read()), rsp.headers)


def rejected(api: Api) -> int:
    raw = api.r.hget(Keys(api.settings.REDIS_PREFIX).engine_stats, "events_rejected")
    return int(raw or 0)  # type: ignore[arg-type]


# --- issues built for those listed only --------------------------------------------------


async def test_only_the_listed_issues_are_built_and_every_bad_event_is_counted(
        api: Api, built: list[int]) -> None:
    # Given one good event and 20,000 bad ones ("{}": 3 bytes each)
    body = b"[" + good() + b"," + b",".join([b"{}"] * 20_000) + b"]"
    # When it is posted all-or-nothing
    refused = await api.call("POST", "/v1/events", api.ingest, data=body, headers=JSON)
    # Then the answer counts every bad event and lists the first 1,000
    assert refused.status == 422
    assert refused.error["message"] == (f"20000 bad event(s), nothing accepted (the first "
                                        f"{MAX_ISSUES_LISTED} listed)")
    issues = refused.error["issues"]
    assert [i["index"] for i in issues] == list(range(1, MAX_ISSUES_LISTED + 1))
    assert issues[0] == {"index": 1, "field": "event_type",
                         "reason": "Object missing required field `event_type`"}
    # but builds issue objects for about those listed, not one per bad event
    assert built[0] <= 2 * MAX_ISSUES_LISTED, built[0]
    assert rejected(api) == 20_000 and api.intake() == []
    # When it is posted with partial=true
    built[0] = 0
    partial = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                             headers=JSON)
    # Then exactly the good event is accepted, every bad one counted
    assert partial.status == 207
    assert (partial.body["accepted"], partial.body["rejected"]) == (1, 20_000)
    assert len(partial.body["issues"]) == MAX_ISSUES_LISTED
    assert [e["id"] for e in api.intake()] == ["good-0"]
    assert built[0] <= 2 * MAX_ISSUES_LISTED, built[0]
    assert rejected(api) == 40_000


async def test_bad_events_of_every_kind_are_listed_in_order_beyond_the_cap(
        api: Api, built: list[int]) -> None:
    # Given 3,000 bad events alternating between one that does not decode (1) and one of
    # an unknown code (found after decoding), and 500 good ones among them
    unknown = json.dumps({**test_api.events(1)[0], "event_type": "nope"}).encode()
    items, goods = [], []
    for n in range(3_500):
        if n % 7 == 6:
            items.append(good(n))
            goods.append(f"good-{n}")
        else:
            items.append(b"1" if n % 2 else unknown)
    body = b"[" + b",".join(items) + b"]"
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                            headers=JSON)
    # Then the first 1,000 bad ones are listed in index order, both kinds among them
    assert answer.status == 207
    assert (answer.body["accepted"], answer.body["rejected"]) == (500, 3_000)
    listed = answer.body["issues"]
    bad = [n for n in range(3_500) if n % 7 != 6]
    assert [i["index"] for i in listed] == bad[:MAX_ISSUES_LISTED]
    assert {i["field"] for i in listed} == {"$", "event_type"}
    assert listed[0] == {"index": 0, "field": "event_type",
                         "reason": "unknown event type 'nope'"}
    # and the good ones are accepted, exactly
    assert sorted(e["id"] for e in api.intake()) == sorted(goods)
    assert built[0] <= 3 * MAX_ISSUES_LISTED, built[0]


async def test_an_unlisted_bad_event_of_another_account_still_refuses_the_body(
        api: Api) -> None:
    # Given 1,500 bad events, then a bad one naming account 2 (no event_type), not listed
    body = b"[" + b",".join([b"{}"] * 1_500 + [b'{"account_id": 2}', good()]) + b"]"
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                            headers=JSON)
    # Then the whole request is refused as a misrouted producer's, naming that event
    assert answer.status == 403
    assert answer.error["message"] == "1 event(s) of another account, nothing accepted"
    assert answer.error["issues"] == [{"index": 1_500, "field": "account_id",
                                       "reason": "account 2 is not the token's account 1"}]
    assert api.intake() == []


@pytest.mark.parametrize("shape", ["ndjson", "lone surrogate"])
async def test_ndjson_and_python_read_bodies_build_only_the_listed_issues(
        api: Api, built: list[int], shape: str) -> None:
    if shape == "ndjson":  # blank lines are no events
        body, headers = b"{}\n\n" * 5_000 + good() + b"\n", NDJSON
    else:  # msgspec refuses the array whole: Python's json reads it, event by event
        body = b"[" + b"{}," * 5_000 + b'{"a": "\\ud800"},' + good() + b"]"
        headers = JSON
    bad = 5_000 if shape == "ndjson" else 5_001
    refused = await api.call("POST", "/v1/events", api.ingest, data=body, headers=headers)
    assert refused.status == 422
    assert refused.error["message"].startswith(f"{bad} bad event(s), nothing accepted")
    assert len(refused.error["issues"]) == MAX_ISSUES_LISTED
    assert built[0] <= 3 * MAX_ISSUES_LISTED, built[0]
    built[0] = 0
    partial = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                             headers=headers)
    assert (partial.status, partial.body["accepted"], partial.body["rejected"]) == (
        207, 1, bad)
    assert [e["id"] for e in api.intake()] == ["good-0"]
    assert built[0] <= 3 * MAX_ISSUES_LISTED, built[0]


def test_without_limits_every_issue_is_built_as_before() -> None:
    """``Intake.publish`` (the driver, ``hookray publish``) decodes bodies without
    limits: its EventError and PublishResult list every issue."""
    body = b"[" + b"{}," * 2_999 + b"{}]"
    batch, _ = decode_body(body, load_catalogue())
    assert len(batch.issues) == 3_000 and batch.unlisted == []
    capped, _ = decode_body(body, load_catalogue(), max_issues=10)
    assert [i.index for i in capped.issues] == list(range(10))
    assert capped.unlisted == list(range(10, 3_000))


# --- at most MAX_EVENTS_PER_REQUEST events ------------------------------------------------


@pytest.mark.parametrize(("body", "headers"), [
    (b"[" + b"{}," * MAX_EVENTS + b"{}]", JSON),
    (b"{}\n" * (MAX_EVENTS + 1), NDJSON),
    (b"[" + b"{}," * MAX_EVENTS + b'{"a": "\\ud800"}]', JSON),  # read by Python's json
], ids=["array", "ndjson", "lone surrogate"])
async def test_more_events_than_a_request_takes_are_refused_before_each_is_decoded(
        api: Api, built: list[int], body: bytes, headers: dict[str, str]) -> None:
    # When a body holds one event more than a request takes (all bad, 300 KB)
    answer = await api.call("POST", "/v1/events?partial=true", api.ingest, data=body,
                            headers=headers)
    # Then it is refused whole, naming the limit, before any event is decoded alone
    assert answer.status == 413
    assert answer.error == {"code": "payload_too_large", "message": (
        f"the body holds more than {MAX_EVENTS:,} events, the most one request takes: "
        "nothing accepted; send them in several requests")}
    assert built[0] == 0
    assert api.intake() == [] and rejected(api) == 0


@pytest.fixture
def fifty(monkeypatch: pytest.MonkeyPatch) -> int:
    """A request takes at most 50 events."""
    monkeypatch.setattr(engine.api, "MAX_EVENTS_PER_REQUEST", 50, raising=False)
    return 50


async def test_the_limit_counts_events_good_or_bad_and_not_blank_lines(
        api: Api, fifty: int) -> None:
    events = [good(n) for n in range(fifty + 1)]
    # good events: as many as the limit are taken, one more is refused whole
    exact = await api.call("POST", "/v1/events", api.ingest,
                           data=b"[" + b",".join(events[:fifty]) + b"]", headers=JSON)
    assert (exact.status, exact.body) == (202, {"accepted": fifty})
    over = await api.call("POST", "/v1/events", api.ingest,
                          data=b"[" + b",".join(events) + b"]", headers=JSON)
    assert over.status == 413 and f"more than {fifty:,} events" in over.error["message"]
    # NDJSON: blank lines are not events
    lines = b"\n \r\n".join(events[:fifty]) + b"\n\n\n"
    ndjson = await api.call("POST", "/v1/events", api.ingest, data=lines, headers=NDJSON)
    assert (ndjson.status, ndjson.body) == (202, {"accepted": fifty})
    over = await api.call("POST", "/v1/events", api.ingest, data=lines + events[fifty],
                          headers=NDJSON)
    assert over.status == 413
    assert len(api.intake()) == 2 * fifty


# --- the hook routes: read and checked in the API's threads -----------------------------


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Gate]:
    """Makes the API's ``name`` (engine.api.unique_keys: every JSON body of the hook
    routes is read with it; validate_hook) wait, its first call, until the test opens
    the gate (at most 10 s: if it runs on the event loop, the test cannot open it)."""
    def close(name: str) -> Gate:
        g = Gate()
        original = getattr(engine.api, name)

        def waiting(*args: Any, **kwargs: Any) -> Any:
            if not g.entered.is_set():
                g.entered.set()
                if not g.opened.wait(10):
                    g.timed_out = True
            return original(*args, **kwargs)

        monkeypatch.setattr(engine.api, name, waiting)
        return g
    return close


class Gate:
    def __init__(self) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self.timed_out = False


async def _entered(event: threading.Event) -> None:
    while not event.is_set():  # the event loop is free meanwhile
        await asyncio.sleep(0.01)


ROUTES: list[tuple[str, str, str, Any, int]] = [
    ("unique_keys", "POST", "/v1/hooks", hook_body(), 201),
    ("validate_hook", "POST", "/v1/hooks", hook_body(), 201),
    ("unique_keys", "PUT", "/v1/hooks/{id}", hook_body(name="renamed"), 200),
    ("validate_hook", "PUT", "/v1/hooks/{id}", hook_body(name="renamed"), 200),
    ("unique_keys", "POST", "/v1/hooks/{id}/clone", {"name": "copy"}, 201),
    ("unique_keys", "POST", "/v1/hooks/{id}/test", {"event_type": "click"}, 200),
    ("unique_keys", "POST", "/v1/dead-letters/replay", {"ids": ["nope"]}, 404),
    ("unique_keys", "POST", "/v1/dead-letters/discard", {"ids": ["nope"]}, 404),
]


@pytest.mark.parametrize(("waits", "method", "path", "body", "status"), ROUTES,
                         ids=[f"{m} {p} {w}" for w, m, p, _, _ in ROUTES])
async def test_health_is_answered_while_a_hook_body_is_read_and_checked(
        api: Api, gate: Callable[[str], Gate], waits: str, method: str, path: str,
        body: Any, status: int) -> None:
    hook = await api.create()
    # Given the reading (or validating) of a body that waits until the test says
    g = gate(waits)
    request = asyncio.create_task(api.call(method, path.format(id=hook["id"]), api.master,
                                           json_body=body))
    await _entered(g.entered)
    # When the health probe and another account's request come meanwhile
    health = await api.call("GET", "/v1/health")
    other = await api.call("GET", "/v1/hooks", api.other)
    # Then both are answered while that body is still being checked
    still_checked = not request.done()
    g.opened.set()
    answer = await request
    assert not g.timed_out, "the body was checked on the event loop: it held every request"
    assert still_checked
    assert health.status == 200 and health.body["status"] == "ok"
    assert (other.status, other.body["hooks"]) == (200, [])
    # and the request is answered as before
    assert answer.status == status, answer.body


async def test_a_hook_route_takes_a_body_of_a_mebibyte_at_most(api: Api) -> None:
    # Given a hook body of 1 MiB and one byte more (unknown keys, padded to the size)
    filler = {f"k{n}": 0 for n in range(70_000)}
    small = json.dumps({**hook_body(), **filler}).encode()
    assert len(small) < MAX_OBJECT_BYTES
    at_most = small[:-1] + b" " * (MAX_OBJECT_BYTES - len(small)) + b"}"
    too_large = at_most[:-1] + b" }"
    # When each is posted
    taken = await api.call("POST", "/v1/hooks", api.master, data=at_most, headers=JSON)
    refused = await post_large(api, "POST", "/v1/hooks", api.master, too_large, JSON)
    # Then the first is validated (its unknown keys named), the second refused unread
    assert len(at_most) == MAX_OBJECT_BYTES
    assert taken.status == 422 and taken.error["message"].endswith("; and 69980 more")
    assert refused.status == 413
    assert refused.error == {"code": "payload_too_large", "message": (
        f"the request body is larger than {MAX_OBJECT_BYTES} bytes, the most this route "
        "takes (only POST /v1/events takes up to API_MAX_BODY_BYTES)")}
    for path in ("/v1/hooks/1", "/v1/hooks/1/clone", "/v1/hooks/1/test",
                 "/v1/dead-letters/replay", "/v1/dead-letters/discard"):
        method = "PUT" if path == "/v1/hooks/1" else "POST"
        answer = await post_large(api, method, path, api.master, too_large, JSON)
        assert answer.status == 413, path
    # events are not bound so
    events = b"[" + b",".join(good(n) for n in range(8_000)) + b"]"
    assert len(events) > MAX_OBJECT_BYTES
    posted = await post_large(api, "POST", "/v1/events", api.ingest, events, JSON)
    assert (posted.status, posted.body) == (202, {"accepted": 8_000})
