"""The HTTP batch transport against a real local receiver."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import parse_qs

import pytest

from engine.errors import Rejected
from engine.hooks import HttpBatch
from engine.receiver import Receiver
from engine.transports.base import Delivery
from engine.transports.http import (
    BREAKER_FAILURES,
    MAX_ANSWER_BYTES,
    REGEX_BUDGET_SEC,
    HttpTransport,
)

pytestmark = pytest.mark.integration


def delivery(n: int = 3) -> Delivery:
    return Delivery(id="d", hook_id=1, account_id=1, kind="http_batch",
                    parts=[json.dumps({"n": i}).encode() for i in range(n)])


def send(target: dict[str, Any], transport: HttpTransport | None = None, n: int = 3) -> Any:
    async def go() -> Any:
        t = transport or HttpTransport(timeout_sec=2.0)
        try:
            return await t.send(HttpBatch(**target), delivery(n))
        finally:
            if transport is None:
                await t.close()
    return asyncio.run(go())


def test_body_is_a_json_array_with_content_type_and_extra_headers(receiver: Receiver) -> None:
    outcome = send({"url": receiver.url("/h"), "headers": {"X-Tenant": "acme"}})
    assert outcome.ok and outcome.status == 200
    (req,) = receiver.requests("/h")
    assert req.messages == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-Tenant"] == "acme"
    assert "Authorization" not in req.headers


@pytest.mark.parametrize(("status", "body", "regex", "ok", "reason"), [
    (200, "OK", "", True, ""),
    (201, "OK", "", False, "HTTP 201: status is not 200"),
    (500, "ERROR", "", False, "HTTP 500: status is not 200"),
    (200, "result: OK", r"\bOK\b", True, ""),
    (202, "accepted OK", "OK", True, ""),
    (200, "FAIL", "OK", False, "body does not match success regex 'OK'"),
])
def test_success_rules(receiver: Receiver, status: int, body: str, regex: str, ok: bool,
                       reason: str) -> None:
    receiver.behave("/r", status=status, body=body)
    outcome = send({"url": receiver.url("/r"), "success_regex": regex})
    assert outcome.ok is ok
    if not ok:
        assert outcome.error == "Rejected" and reason in outcome.detail


@pytest.mark.parametrize("given", ["content-type", "Content-Type"])
def test_a_hooks_own_json_content_type_is_the_only_one_sent(receiver: Receiver,
                                                           given: str) -> None:
    value = "application/json; charset=utf-8"
    assert send({"url": receiver.url("/ct"), "headers": {given: value}}).ok
    (req,) = receiver.requests("/ct")
    sent = {name: v for name, v in req.headers.items() if name.lower() == "content-type"}
    assert list(sent.values()) == [value], req.headers


def test_a_success_regex_that_runs_too_long_fails_the_batch_and_stalls_nothing(
        receiver: Receiver) -> None:
    """A regex that backtracks without end on the answer (its time doubles with each
    character) gets REGEX_BUDGET_SEC: the batch fails naming it (retried, then a dead
    letter), and the transport's loop, shared by every hook, goes on."""
    receiver.behave("/slow", body="x" * 5_000)
    target = HttpBatch(url=receiver.url("/slow"), success_regex="(x+x+)+y")
    other = HttpBatch(url=receiver.url("/other"))
    done: list[str] = []

    async def one(t: HttpTransport, name: str, to: HttpBatch) -> Any:
        outcome = await t.send(to, delivery())
        done.append(name)
        return outcome

    async def all_of_them() -> list[Any]:
        t = HttpTransport(timeout_sec=5.0)
        try:
            first = await one(t, "first slow", target)  # matched on the loop, then in a thread
            return [first, *await asyncio.gather(
                *[one(t, f"slow {n}", target) for n in range(6)], one(t, "fine", other))]
        finally:
            await t.close()

    outcomes = asyncio.run(all_of_them())
    for slow in outcomes[:-1]:
        assert not slow.ok and slow.error == "Rejected"
        assert f"success regex '(x+x+)+y' took more than {REGEX_BUDGET_SEC} s on the body" \
            in slow.detail
    assert outcomes[-1].ok
    # six slow answers take 3 x 0.1 s in the regex threads; the loop answered the
    # other hook meanwhile (matched on the loop, it would have waited for most of them)
    assert done.index("fine") < 4, done


def test_only_the_first_mebibyte_of_an_answer_is_read(receiver: Receiver) -> None:
    receiver.behave("/big-ok", body="OK" + "." * (2 * MAX_ANSWER_BYTES))
    assert send({"url": receiver.url("/big-ok"), "success_regex": "^OK"}).ok
    receiver.behave("/big-late", body="." * MAX_ANSWER_BYTES + "OK")
    outcome = send({"url": receiver.url("/big-late"), "success_regex": "OK"})
    assert not outcome.ok and "body does not match success regex 'OK'" in outcome.detail


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_nor_taken_for_delivered(receiver: Receiver,
                                                            status: int) -> None:
    """Followed, a 301-303 turns the POST into a GET without the batch, whose 200 would
    count as delivered: a redirect is a failure naming where it points."""
    receiver.behave("/old", status=status, location=receiver.url("/new"))
    outcome = send({"url": receiver.url("/old")})
    assert not outcome.ok and outcome.error == "Rejected" and outcome.status == status
    assert f"HTTP {status}: redirects are not followed" in outcome.detail
    assert outcome.describe().startswith(f"Rejected: HTTP {status}: redirects")  # said once
    assert receiver.url("/new") in outcome.detail
    assert receiver.requests("/new") == []


def test_oauth2_tokens_are_not_shared_between_different_secrets(receiver: Receiver) -> None:
    receiver.behave("/token", body=json.dumps({"access_token": "abc", "expires_in": "1h"}))

    def target(secret: str) -> dict[str, Any]:
        return {"url": receiver.url("/o"), "auth": {
            "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "cid",
            "client_secret": secret}}

    async def both() -> list[Any]:
        t = HttpTransport(timeout_sec=2.0)
        try:
            return [await t.send(HttpBatch(**target(s)), delivery()) for s in ("a", "b", "a")]
        finally:
            await t.close()

    assert all(o.ok for o in asyncio.run(both()))  # an expires_in that is no number: 1 h
    secrets = [parse_qs(r.raw.decode())["client_secret"] for r in receiver.requests("/token")]
    assert secrets == [["a"], ["b"]]  # each secret fetched its own token, once


def test_bearer_token_is_sent(receiver: Receiver) -> None:
    send({"url": receiver.url("/b"), "auth": {"kind": "bearer", "token": "t0k"}})
    assert receiver.requests("/b")[0].headers["Authorization"] == "Bearer t0k"


def test_oauth2_token_is_fetched_once_and_cached_until_expiry(receiver: Receiver) -> None:
    receiver.behave("/token", body=json.dumps({"access_token": "abc", "expires_in": 3600}))
    target = {"url": receiver.url("/o"), "auth": {
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "cid",
        "client_secret": "shh", "scope": "hooks"}}

    async def twice() -> list[Any]:
        t = HttpTransport(timeout_sec=2.0)
        try:
            return [await t.send(HttpBatch(**target), delivery()) for _ in range(2)]
        finally:
            await t.close()

    assert all(o.ok for o in asyncio.run(twice()))
    (token_req,) = receiver.requests("/token")
    form = parse_qs(token_req.raw.decode())
    assert form == {"grant_type": ["client_credentials"], "client_id": ["cid"],
                    "client_secret": ["shh"], "scope": ["hooks"]}
    assert [r.headers["Authorization"] for r in receiver.requests("/o")] == ["Bearer abc"] * 2


def test_oauth2_token_endpoint_failure_is_a_clear_error(receiver: Receiver) -> None:
    receiver.behave("/token", always_fail=True, fail_status=401)
    outcome = send({"url": receiver.url("/o"), "auth": {
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "c",
        "client_secret": "s"}})
    assert not outcome.ok and outcome.error == "Rejected"
    assert "answered HTTP 401 without an access_token" in outcome.detail
    assert receiver.requests("/o") == []


@pytest.mark.parametrize(("body", "says"), [
    ("[" * 200_000 + "]" * 200_000, "maximum recursion depth exceeded"),
    ('{"access_token": "' + "t" * MAX_ANSWER_BYTES + '"}', "Unterminated string"),
    ("not json", "Expecting value"),
])
def test_an_oauth2_token_answer_that_is_no_token_is_a_clear_error(
        receiver: Receiver, body: str, says: str) -> None:
    """Read as any answer, at most MAX_ANSWER_BYTES: a huge or deeply nested body ends
    as the token request's failure, with nothing sent to the hook's URL."""
    receiver.behave("/token", body=body)
    outcome = send({"url": receiver.url("/o"), "auth": {
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "c",
        "client_secret": "s"}})
    assert not outcome.ok and outcome.error == "Rejected"
    assert outcome.detail.startswith(f"OAuth2 token endpoint {receiver.url('/token')} "
                                     "answered HTTP 200 without an access_token (the answer "
                                     "is no JSON: ")
    assert says in outcome.detail
    assert receiver.requests("/o") == []


def test_timeout_and_unreachable_destination(receiver: Receiver) -> None:
    receiver.behave("/hang", hang=True)
    outcome = send({"url": receiver.url("/hang"), "request_timeout_sec": 0.3})
    assert not outcome.ok and outcome.error == "Timeout" and "0.3 s" in outcome.detail
    outcome = send({"url": "http://127.0.0.1:9/none"})
    assert not outcome.ok and outcome.error == "ConnectError"
    # a password in the URL never shows in what is reported (and dead-lettered)
    for url in ("http://crm:pw-SECRET-9@127.0.0.1:9/none?token=qt-SECRET-9",
                receiver.url("/hang").replace("http://", "http://crm:pw-SECRET-9@")
                + "?api_key=qt-SECRET-9"):
        outcome = send({"url": url, "request_timeout_sec": 0.3})
        assert not outcome.ok and outcome.error in ("ConnectError", "Timeout")
        assert "pw-SECRET-9" not in outcome.describe() and "crm:**********@" in outcome.detail
        assert "qt-SECRET-9" not in outcome.describe()


def test_a_cookie_one_receiver_sets_goes_to_no_other_request(receiver: Receiver) -> None:
    """One session serves every hook of every account: a Set-Cookie of one receiver
    (or token endpoint) is not sent back with any request, its own or another's. By
    host name: a client's cookie jar keeps none for an IP address anyway."""
    receiver.behave("/a", answer_headers={"Set-Cookie": "session=tenant-a; Path=/"})

    async def go() -> list[Any]:
        t = HttpTransport(timeout_sec=2.0)
        try:
            return [await t.send(HttpBatch(url=receiver.url(path).replace(
                "127.0.0.1", "localhost")), delivery())
                    for path in ("/a", "/b", "/a")]
        finally:
            await t.close()

    assert all(o.ok for o in asyncio.run(go()))
    assert [r.headers.get("Cookie") for r in receiver.requests()] == [None, None, None]


def test_an_oauth2_token_endpoint_redirect_is_not_followed(receiver: Receiver) -> None:
    """Followed, a 307 would post client_secret again to its Location."""
    receiver.behave("/token", status=307, location=receiver.url("/elsewhere"))
    outcome = send({"url": receiver.url("/o"), "auth": {
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "c",
        "client_secret": "s3cret"}})
    assert not outcome.ok and outcome.error == "Rejected"
    assert "answered HTTP 307 without an access_token" in outcome.detail
    assert receiver.requests("/elsewhere") == [] and receiver.requests("/o") == []


def test_url_credentials_basic_auth_cannot_carry_fail_with_a_clear_outcome(
        receiver: Receiver) -> None:
    """Refused for new hooks; a stored one (loaded as stored) fails each request with
    an outcome naming the URL, its password masked, not with an exception."""
    url = receiver.url("/o").replace("http://", "http://crm:p%E2%82%ACss@")
    with pytest.raises(ValueError, match="sent as Basic authorization, in Latin-1"):
        HttpBatch(url=url)
    stored = HttpBatch.model_validate({"url": url}, context={"stored": True})

    async def go() -> Any:
        t = HttpTransport(timeout_sec=2.0)
        try:
            return await t.send(stored, delivery())
        finally:
            await t.close()

    outcome = asyncio.run(go())
    assert not outcome.ok and outcome.error == "Rejected", outcome
    assert "crm:**********@" in outcome.detail and "the request cannot be made" in outcome.detail
    assert "%E2%82%AC" not in outcome.detail and receiver.requests("/o") == []


def test_requests_queued_behind_a_dead_destination_fail_fast_once_its_breaker_opens(
        receiver: Receiver) -> None:
    """One request at a time to the destination: those waiting for the slot while the
    breaker opened fail at once, not after a full timeout each."""
    receiver.behave("/hang", hang=True)

    async def go() -> list[Any]:
        t = HttpTransport(concurrency=1, timeout_sec=0.3)
        try:
            target = HttpBatch(url=receiver.url("/hang"))
            return list(await asyncio.gather(*(t.send(target, delivery())
                                               for _ in range(BREAKER_FAILURES + 3))))
        finally:
            await t.close()

    outcomes = asyncio.run(go())
    assert [o.error for o in outcomes[:BREAKER_FAILURES]] == ["Timeout"] * BREAKER_FAILURES
    assert all(o.error == "ConnectError" and "circuit open" in o.detail
               for o in outcomes[BREAKER_FAILURES:])


def test_deliveries_waiting_too_long_for_a_slow_destination_fail_as_timeouts(
        receiver: Receiver) -> None:
    """A destination that answers, slowly: deliveries that wait DESTINATION_QUEUE_SEC
    for one of its connections fail as Queued timeouts (retried later), and do not open its
    breaker; another destination of the same transport is not held up."""
    receiver.behave("/slow", delay_sec=1.0)

    async def go() -> tuple[list[Any], Any, bool]:
        t = HttpTransport(concurrency=1, timeout_sec=5.0, queue_sec=0.25)
        try:
            slow = HttpBatch(url=receiver.url("/slow"))
            sends = [asyncio.ensure_future(t.send(slow, delivery())) for _ in range(4)]
            await asyncio.sleep(0.05)  # all four waiting or sent
            fast = await t.send(HttpBatch(url=receiver.url("/fast")), delivery())
            # answered while the slow destination's one slot still waits for its answer
            slow_pending = not sends[0].done()
            outcomes = list(await asyncio.gather(*sends))
            outcomes.append(await t.send(slow, delivery()))  # its breaker stayed closed
            return outcomes, fast, slow_pending
        finally:
            await t.close()

    outcomes, fast, slow_pending = asyncio.run(go())
    assert fast.ok and slow_pending
    assert outcomes[0].ok and outcomes[-1].ok
    assert [o.error for o in outcomes[1:-1]] == ["Queued"] * 3
    assert all(f"POST {receiver.url('/slow')}: waited 0.25 s (DESTINATION_QUEUE_SEC) for one "
               "of its 1 sending slot(s)" in o.detail for o in outcomes[1:-1])
    assert len(receiver.requests("/slow")) == 2  # the timed-out ones were never sent


def test_circuit_breaker_fails_fast_after_repeated_failures(receiver: Receiver) -> None:
    async def run() -> list[Any]:
        t = HttpTransport(timeout_sec=1.0)
        try:
            target = HttpBatch(url="http://127.0.0.1:9/none")
            return [await t.send(target, delivery()) for _ in range(BREAKER_FAILURES + 1)]
        finally:
            await t.close()

    outcomes = asyncio.run(run())
    assert all(not o.ok for o in outcomes)
    assert "circuit open after 5 failures" in outcomes[-1].detail
    assert "circuit open" not in outcomes[-2].detail


def test_a_hooks_own_failures_do_not_open_the_breaker_other_hooks_share(
        receiver: Receiver) -> None:
    """Hooks of other accounts posting to one URL (their queries differ) share its
    breaker: a timeout shorter than the installation's (a hook's own
    request_timeout_sec) and a failing OAuth2 token endpoint say nothing of the
    destination, and must not make the others' batches fail unsent."""
    receiver.behave("/shared", delay_sec=0.3)

    async def go() -> tuple[list[Any], list[Any], Any]:
        t = HttpTransport(timeout_sec=2.0)
        try:
            short = HttpBatch(url=receiver.url("/shared?acct=A"), request_timeout_sec=0.05)
            token = HttpBatch(url=receiver.url("/shared?acct=C"), auth={
                "kind": "oauth2", "token_url": "http://127.0.0.1:9/token",
                "client_id": "c", "client_secret": "s"})
            timeouts = [await t.send(short, delivery()) for _ in range(BREAKER_FAILURES + 1)]
            tokens = [await t.send(token, delivery()) for _ in range(BREAKER_FAILURES + 1)]
            other = await t.send(HttpBatch(url=receiver.url("/shared?acct=B")), delivery())
            return timeouts, tokens, other
        finally:
            await t.close()

    timeouts, tokens, other = asyncio.run(go())
    assert [o.error for o in timeouts] == ["Timeout"] * (BREAKER_FAILURES + 1), timeouts
    assert all("OAuth2 token request" in o.detail for o in tokens), tokens
    assert other.ok, other


def test_an_answer_closes_a_breaker_that_opened_while_it_was_awaited(
        receiver: Receiver) -> None:
    """A request under way when the breaker opened, answered: the destination is
    reachable, and the next request is sent, not failed as "circuit open after 0
    failures"."""
    receiver.behave("/b", delay_sec=0.6)

    async def go() -> tuple[Any, list[Any], Any]:
        t = HttpTransport(concurrency=8, timeout_sec=0.3)
        try:
            patient = asyncio.ensure_future(t.send(
                HttpBatch(url=receiver.url("/b?p=1"), request_timeout_sec=5), delivery()))
            quick = await asyncio.gather(*(t.send(HttpBatch(url=receiver.url("/b")),
                                                  delivery()) for _ in range(BREAKER_FAILURES)))
            answered = await patient
            return answered, list(quick), await t.send(HttpBatch(url=receiver.url("/b")),
                                                       delivery())
        finally:
            await t.close()

    answered, quick, after = asyncio.run(go())
    assert [o.error for o in quick] == ["Timeout"] * BREAKER_FAILURES
    assert answered.ok
    assert after.error == "Timeout" and "circuit open" not in after.detail, after


def test_a_short_secret_does_not_hide_what_the_success_regex_looks_for(
        receiver: Receiver) -> None:
    """Secrets are masked in an answer before the success regex is matched (it would
    otherwise tell what they hold), but not one shorter than MATCH_MASKED_CHARS: a key
    "ok" would mask the very "ok" the regex looks for, and every accepted batch would
    be sent again."""
    receiver.behave("/short", body='{"status": "ok"}')
    outcome = send({"url": receiver.url("/short?api_key=ok"), "success_regex": '"ok"'})
    assert outcome.ok, outcome
    receiver.behave("/long", body='{"status": "ok-long-secret"}')
    outcome = send({"url": receiver.url("/long?api_key=ok-long-secret"),
                    "success_regex": "ok-long"})
    assert not outcome.ok and outcome.detail.endswith('{"status": "**********"}'), outcome


def test_an_answer_resets_the_breakers_count_of_consecutive_failures(
        receiver: Receiver) -> None:
    """An answer that fails the batch (HTTP 500) shows the destination reachable: the
    failures before it and after it are not consecutive."""
    async def go() -> list[Any]:
        t = HttpTransport(timeout_sec=0.3)
        target = HttpBatch(url=receiver.url("/flaky"))
        outcomes = []
        try:
            for behaviour, times in ([{"hang": True}, BREAKER_FAILURES - 1],
                                     [{"status": 500}, 1], [{"hang": True}, 1],
                                     [{"status": 200}, 1]):
                receiver.behave("/flaky", **behaviour)
                outcomes += [await t.send(target, delivery()) for _ in range(times)]
            return outcomes
        finally:
            await t.close()

    outcomes = asyncio.run(go())
    assert [o.error for o in outcomes] == ["Timeout"] * (BREAKER_FAILURES - 1) + [
        "Rejected", "Timeout", None], outcomes
    assert outcomes[-1].ok


def test_an_open_breaker_does_not_show_another_hooks_query(receiver: Receiver) -> None:
    """Hooks (of other accounts, say) posting to one path with other query strings share
    its breaker: the fast failure of one must not quote the URL the other failed with."""
    async def run() -> Any:
        t = HttpTransport(timeout_sec=1.0)
        try:
            other = HttpBatch(url="http://127.0.0.1:9/in?tenant=acme-of-account-1")
            for _ in range(BREAKER_FAILURES):
                assert not (await t.send(other, delivery())).ok
            return await t.send(HttpBatch(url="http://127.0.0.1:9/in?tenant=mine"), delivery())
        finally:
            await t.close()

    outcome = asyncio.run(run())
    assert not outcome.ok and "circuit open after 5 failures" in outcome.detail
    assert "acme-of-account-1" not in outcome.describe()
    assert "POST http://127.0.0.1:9/in:" in outcome.detail  # what failed, without a query


def test_per_destination_state_is_bounded_and_idle_destinations_go_first(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_DESTINATIONS, destinations with nothing running and no failures are
    forgotten; a broken one keeps its breaker (still fails fast), a busy one its
    semaphore."""
    from engine.transports import http

    monkeypatch.setattr(http, "MAX_DESTINATIONS", 4)
    monkeypatch.setattr(http, "MAX_REGEXES", 2)
    receiver.behave("/slow", delay_sec=0.5)

    async def run() -> tuple[list[str], Any, Any, int]:
        t = HttpTransport(timeout_sec=1.0)
        try:
            dead = HttpBatch(url="http://127.0.0.1:9/none")
            for _ in range(BREAKER_FAILURES):
                await t.send(dead, delivery())
            await t.send(HttpBatch(url="http://127.0.0.1:9/once"), delivery())  # 1 failure
            slow = asyncio.ensure_future(t.send(HttpBatch(url=receiver.url("/slow")),
                                                delivery()))
            await asyncio.sleep(0.1)
            for n in range(6):
                target = HttpBatch(url=receiver.url(f"/p{n}"), success_regex=f"O{'K' * n}|OK")
                assert (await t.send(target, delivery())).ok
                assert len(t._destinations) <= 4 and len(t._cache.regex) <= 2
            kept = sorted(t._destinations)
            return kept, await t.send(dead, delivery()), await slow, len(t._cache.regex)
        finally:
            await t.close()

    kept, dead_again, slow, regexes = asyncio.run(run())
    assert "http://127.0.0.1:9/none" in kept
    assert "http://127.0.0.1:9/once" not in kept  # failed once, breaker closed: idle
    assert "circuit open" in dead_again.detail  # the breaker survived the pruning
    assert slow.ok and receiver.url("/p5") in kept and regexes <= 2


def test_a_batch_larger_than_max_batch_size_is_posted_in_pieces(receiver: Receiver) -> None:
    """A batch made before the hook's max_batch_size was lowered, or for a broker target
    before the hook changed to HTTP: posted in pieces of max_batch_size, in order; a
    refused piece fails the delivery, which names its messages, and does not stop the
    pieces after it: every message has its attempt."""
    outcome = send({"url": receiver.url("/pieces"), "max_batch_size": 10}, n=25)
    assert outcome.ok and outcome.status == 200
    assert "25 messages in 3 requests of at most 10" in outcome.detail
    assert [len(r.messages) for r in receiver.requests("/pieces")] == [10, 10, 5]
    assert [m["n"] for m in receiver.messages("/pieces")] == list(range(25))
    receiver.behave("/second", fail_first=2)  # the first two requests fail
    failed = send({"url": receiver.url("/second"), "max_batch_size": 10}, n=25)
    assert not failed.ok and "HTTP 500" in failed.detail and failed.status == 500
    assert failed.failed == list(range(20))  # the last piece was delivered
    assert [(len(r.messages), r.status) for r in receiver.requests("/second")] == [
        (10, 500), (10, 500), (5, 200)]
    receiver.behave("/all", always_fail=True)
    every = send({"url": receiver.url("/all"), "max_batch_size": 10}, n=25)
    assert not every.ok and every.failed is None  # all of it, as a whole
    assert [len(r.messages) for r in receiver.requests("/all")] == [10, 10, 5]


def send_in_pieces(receiver: Receiver, path: str, failures: dict[int, Exception]) -> Any:
    """25 messages to ``path`` in pieces of 10, the piece of each call ``failures``
    numbers (from 1) failing with its error instead of being posted."""
    class Failing(HttpTransport):
        calls = 0

        async def post(self, target: HttpBatch, body: bytes) -> Any:
            self.calls += 1
            if self.calls in failures:
                raise failures[self.calls]
            return await super().post(target, body)

    async def go() -> Any:
        transport = Failing(timeout_sec=2.0)
        try:
            return await transport.send(
                HttpBatch(url=receiver.url(path), max_batch_size=10), delivery(25))
        finally:
            await transport.close()

    return asyncio.run(go())


def test_a_failed_piece_leaves_only_the_pieces_from_it_on_to_send(receiver: Receiver) -> None:
    from engine.errors import Timeout

    outcome = send_in_pieces(receiver, "/mid", {2: Timeout("no answer within 2 s")})
    assert not outcome.ok and outcome.error == "Timeout"
    assert outcome.failed == list(range(10, 25))  # the first piece was delivered
    assert [len(r.messages) for r in receiver.requests("/mid")] == [10]


def test_pieces_refused_before_one_waits_too_long_use_up_a_re_send(receiver: Receiver) -> None:
    """A piece answered and refused had its attempt: when a later piece then waits too
    long for a slot (Queued), the delivery is a refused one (a re-send used up), not
    one that was never sent (Queued re-sends never die)."""
    from engine.errors import Queued, Rejected
    from engine.transports.base import queued

    refused = Rejected("HTTP 500: status is not 200")
    refused.status = 500
    outcome = send_in_pieces(receiver, "/pq", {2: refused,
                                               3: Queued("waited 60 s for a slot")})
    assert not outcome.ok and outcome.error == "Rejected" and not queued(outcome), outcome
    assert outcome.failed == list(range(10, 25))
    assert [len(r.messages) for r in receiver.requests("/pq")] == [10]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",  # cut short
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnot-g",
])
def test_an_answer_whose_body_cannot_be_read_is_judged_by_its_status(answer: bytes) -> None:
    """A receiver's 200 whose body was cut short or compressed wrongly was taken as the
    destination unreachable (ConnectError): the batch it took was sent again until it
    died, and five such answers opened the breaker for every hook of its URL. The
    status decides, as for any answer; a success regex is not looked for in such a
    body (a refusal with its status, which the breaker does not count)."""
    taken = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal taken
        head = await reader.readuntil(b"\r\n\r\n")
        size = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length"))
        await reader.readexactly(size)
        taken += 1
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def go() -> list[Any]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = HttpTransport(timeout_sec=30.0, deny="none")  # (a busy machine)
        try:
            plain = [await transport.send(HttpBatch(url=f"http://127.0.0.1:{port}/x"),
                                          delivery()) for _ in range(BREAKER_FAILURES + 2)]
            regex = await transport.send(HttpBatch(url=f"http://127.0.0.1:{port}/x",
                                                   success_regex="ok"), delivery())
            return [*plain, regex]
        finally:
            await transport.close()
            server.close()

    *plain, regex = asyncio.run(go())
    assert taken == BREAKER_FAILURES + 3  # the breaker never opened
    assert all(o.ok and o.status == 200 for o in plain), [o.detail for o in plain]
    assert "the answer's body could not be read: ClientPayloadError" in plain[0].detail
    assert not regex.ok and regex.error == "Rejected" and regex.status == 200
    assert regex.detail.startswith("HTTP 200: the answer's body could not be read, so "
                                   "success regex 'ok' was not looked for in it: "
                                   "ClientPayloadError"), regex.detail


def _oauth(url: str, token_url: str, **auth: Any) -> HttpBatch:
    return HttpBatch(url=url, auth={"kind": "oauth2", "token_url": token_url,
                                    "client_id": "c", "client_secret": "s3cret", **auth})


def test_a_hanging_token_endpoint_holds_none_of_its_urls_sending_slots(
        receiver: Receiver) -> None:
    """The token was fetched while a delivery held one of the URL's slots, which other
    accounts' hooks posting to that URL (with another query) share: theirs ended
    Queued behind a token endpoint that never answered."""
    receiver.behave("/token", hang=True)

    async def go() -> list[Any]:
        transport = HttpTransport(concurrency=2, timeout_sec=3.0, queue_sec=1.0)
        slow = _oauth(receiver.url("/shared?account=1"), receiver.url("/token"))
        healthy = HttpBatch(url=receiver.url("/shared?account=2"))

        async def later() -> Any:
            await asyncio.sleep(0.2)
            return await transport.send(healthy, delivery())
        try:
            return list(await asyncio.gather(transport.send(slow, delivery()),
                                             transport.send(slow, delivery()), later()))
        finally:
            await transport.close()

    first, second, other = asyncio.run(go())
    assert other.ok, other
    assert [(o.error, o.detail) for o in (first, second)] == [(
        "ConnectError", f"OAuth2 token request to {receiver.url('/token')}: no answer "
        "within 3 s")] * 2


def test_deliveries_needing_a_token_at_once_share_one_request_for_it(
        receiver: Receiver) -> None:
    receiver.behave("/token", body='{"access_token": "tok", "expires_in": 3600}',
                    delay_sec=0.2)
    target = _oauth(receiver.url("/o"), receiver.url("/token"))

    async def go() -> list[Any]:
        transport = HttpTransport(timeout_sec=5.0)
        try:
            return list(await asyncio.gather(*[transport.send(target, delivery())
                                               for _ in range(8)]))
        finally:
            await transport.close()

    assert all(o.ok for o in asyncio.run(go()))
    assert len(receiver.requests("/token")) == 1
    assert {r.headers["Authorization"] for r in receiver.requests("/o")} == {"Bearer tok"}


@pytest.mark.parametrize(("body", "status", "says"), [
    ('{"access_token": {"nested": 1}}', 200, "without an access_token that can be sent"),
    ('{"access_token": "abc\\r\\nX-Injected: 1"}', 200,
     "without an access_token that can be sent"),
    ('{"error": "invalid_client", "error_description": "client s3cret unknown"}', 401,
     "without an access_token (invalid_client: client ********** unknown)"),
])
def test_a_token_answer_that_cannot_be_used_is_refused_saying_why(
        receiver: Receiver, body: str, status: int, says: str) -> None:
    """A token that is no text was sent as its Python repr; one holding CR/LF was kept
    for an hour, every delivery failing on it naming the hook's URL; an endpoint's
    error answer lost its reason."""
    receiver.behave("/token", body=body, status=status)
    outcome = send({"url": receiver.url("/o"), "auth": {
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "c",
        "client_secret": "s3cret"}})
    assert not outcome.ok and outcome.error == "Rejected"
    assert outcome.detail.startswith(f"OAuth2 token endpoint {receiver.url('/token')} "
                                     f"answered HTTP {status} "), outcome.detail
    assert says in outcome.detail, outcome.detail
    assert "s3cret" not in outcome.detail and receiver.requests("/o") == []


def test_an_answer_with_a_long_header_line_is_read(receiver: Receiver) -> None:
    """aiohttp refuses header lines over 8 KiB: a 200 with a large
    Content-Security-Policy was taken for an unreachable destination, sent again, and
    opened the URL's breaker."""
    receiver.behave("/csp", answer_headers={"Content-Security-Policy": "x" * 9000})
    outcome = send({"url": receiver.url("/csp")})
    assert outcome.ok and outcome.status == 200, outcome


def test_a_stored_hooks_url_the_client_refuses_fails_without_opening_the_breaker() -> None:
    """A hook stored before such hosts were refused (127.1): each delivery counted as
    the destination unreachable, and opened the breaker of the URL for every hook."""
    target = HttpBatch.model_validate({"url": "http://127.1:9/x"}, context={"stored": True})

    async def go() -> list[Any]:
        transport = HttpTransport(timeout_sec=2.0)
        try:
            return [await transport.send(target, delivery()) for _ in range(BREAKER_FAILURES + 1)]
        finally:
            await transport.close()

    outcomes = asyncio.run(go())
    assert {o.error for o in outcomes} == {"Rejected"}
    assert "circuit open" not in outcomes[-1].detail
    assert "127.1" in outcomes[-1].detail


def test_a_token_that_runs_out_while_its_delivery_waits_for_a_slot_is_got_anew() -> None:
    """Got before the slot is waited for, the token ran out meanwhile (cached until
    shortly before it expires): the request went with it, and the 401 cost a re-send."""
    from aiohttp import web

    issued: dict[str, float] = {}

    async def token(request: web.Request) -> web.Response:
        name = f"tok-{len(issued) + 1}"
        issued[name] = time.monotonic()
        return web.json_response({"access_token": name, "expires_in": 1})

    async def hook(request: web.Request) -> web.Response:
        name = request.headers["Authorization"].removeprefix("Bearer ")
        if time.monotonic() - issued[name] > 1:
            return web.Response(status=401, text="token expired")
        await asyncio.sleep(1.5 if request.query.get("slow") else 0)
        return web.Response(text="ok")

    async def go() -> list[Any]:
        app = web.Application()
        app.router.add_post("/token", token)
        app.router.add_post("/o", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        auth = {"kind": "oauth2", "token_url": f"http://127.0.0.1:{port}/token",
                "client_id": "c", "client_secret": "s"}
        transport = HttpTransport(concurrency=1, timeout_sec=5.0, queue_sec=10.0)

        async def later() -> Any:
            await asyncio.sleep(0.1)
            return await transport.send(HttpBatch(url=f"http://127.0.0.1:{port}/o",
                                                  auth=auth), delivery())
        try:
            return list(await asyncio.gather(transport.send(HttpBatch(
                url=f"http://127.0.0.1:{port}/o?slow=1", auth=auth), delivery()), later()))
        finally:
            await transport.close()
            await runner.cleanup()

    first, second = asyncio.run(go())
    assert first.ok and second.ok, (first, second)


def test_deliveries_waiting_on_one_failed_token_request_each_get_their_own_error(
        receiver: Receiver) -> None:
    """They shared the exception object: a delivery in pieces noted its failed
    positions on it, and another reported them as its own (its unsent messages counted
    delivered)."""
    receiver.behave("/token", always_fail=True, fail_status=500, delay_sec=0.2)
    auth = HttpBatch(url=receiver.url("/o"), auth={
        "kind": "oauth2", "token_url": receiver.url("/token"), "client_id": "c",
        "client_secret": "s"}).auth

    async def go() -> list[BaseException]:
        transport = HttpTransport(timeout_sec=5.0)
        try:
            return list(await asyncio.gather(
                *[transport._oauth2_token(auth, 5.0) for _ in range(2)],
                return_exceptions=True))
        finally:
            await transport.close()

    first, second = asyncio.run(go())
    assert isinstance(first, Rejected) and isinstance(second, Rejected)
    assert first is not second and str(first) == str(second)
    assert len(receiver.requests("/token")) == 1
