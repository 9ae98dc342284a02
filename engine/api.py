"""The HTTP API: event ingest and hook administration, per-account tokens (aiohttp).

``create_app(settings)`` builds the application; ``actors/api.py`` serves it from
a Ray actor and ``engine/openapi.json`` (served at ``GET /v1/openapi.json``)
describes every route. No Ray here: the app talks to the engine's Redis through
the same stores as the driver API.

Decisions (README, "HTTP API"):

* ``Authorization: Bearer <token>`` on every route but the OpenAPI description
  and ``GET /v1/health`` (for probes: 200 while Redis answers, else 503);
  missing, malformed, unknown or revoked token -> 401. An ``ingest`` token may
  only ``POST /v1/events``; any other route -> 403.
* An account sees only its own objects: another account's hook or dead letter
  answers 404 exactly like a missing one, so ids do not leak.
* ``POST /v1/events``: all-or-nothing by default (any bad event -> 422 listing
  index, field and reason of each, nothing accepted); ``?partial=true`` accepts the
  good ones and answers 207 listing the bad ones (422 when none is good). An event
  whose ``account_id`` is not the token's -> 403 for the whole request, nothing
  accepted, with or without ``partial``, a bad event's too when its ``account_id``
  can be read (a wrong-account event means a misrouted producer, not a bad event).
  202 means the events are in the intake streams; a body of no events (empty,
  blank, ``[]``) is 202 ``{"accepted": 0}``.
* Secrets in hook settings are write-only: every read shows ``**********`` (also as
  the password of a URL and as the value of a credential header, see
  ``engine.hooks``); on PUT a value sent back as it was read keeps the stored one.
  The mask is never stored as a secret itself (422).
* Errors are JSON everywhere: ``{"error": {"code", "message", "issues"?}}``; a 422
  names each field (or query parameter) and reason. A hook deleted (or damaged) by a
  request racing this one answers as if that came first (404, 409), never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import redis
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from pydantic import ValidationError

from engine.auth import TokenInfo, TokenStore
from engine.bodies import decode_body, split_items
from engine.catalogue import EventCatalogue, load_catalogue
from engine.collector import paused_gc
from engine.dispatch import redis_unavailable
from engine.errors import (
    SHOWN_CHARS,
    Backlogged,
    ConfigError,
    Conflict,
    DamagedRecord,
    HookError,
    NotFound,
    Stale,
)
from engine.errors import quoted as shown
from engine.events import (
    MAX_ID,
    NESTED_TOO_DEEPLY,
    DecodedBatch,
    EventIssue,
    TooManyEvents,
    cap_issues,
    ensure_ids,
)
from engine.health import (
    Repeats,
    engine_health,
    eviction_policy,
    quick_client,
    redis_full,
    repeated,
)
from engine.hooks import (
    MASK,
    MAX_PROBLEMS,
    Hook,
    changed_paths,
    destination,
    destination_hosts,
    hook_secrets,
    masked_secrets,
    not_utf8,
    problems_message,
    restore_secrets,
    scrub,
    sent_secrets,
    validation_problems,
)
from engine.intake import Intake
from engine.jsonkeys import unique_keys
from engine.keys import Keys
from engine.settings import Settings, engine_redis, without_retries
from engine.stores import (
    STAT_FIELDS,
    HookRegistry,
    NameStore,
    RetryStore,
    Stats,
    hook_etag,
    parse_cursor,
)
from engine.testevent import send_test_event
from engine.transports.base import Delivery, unpack_delivery
from engine.transports.guard import guard_for

log = logging.getLogger("hookray.api")


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (malformed HTTP framing: a bad chunk
    size, both Content-Length and Transfer-Encoding) at ERROR with a traceback, and
    anyone can send one: logged at INFO in one line, what was wrong and from where."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            said = record.getMessage().replace("%", "%%")  # "Error handling request ..."
            record.msg = f"{said}: malformed HTTP request: %s"
            record.args = (" ".join(str(exc.message).split())[:200],)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                          "application/x-jsonlines", "application/jsonlines"})
MAX_DEAD_LETTERS = 1000  # most dead letters one GET returns
MAX_MOVE_IDS = 1000  # most dead letter ids one replay or discard names
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark: written by some editors, not content
HEALTH_TIMEOUT_SEC = 2.0  # longest GET /v1/health waits for Redis
REDIS_TIMEOUT_SEC = 30.0  # longest any other request waits for one Redis reply
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 412: "precondition_failed",
               413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_failed",
               500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An error answer: status, message and optional issues."""

    def __init__(self, status: int, message: str, issues: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.issues, self.headers = status, message, issues, headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.issues, self.headers)


def error_response(status: int, message: str, issues: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": ERROR_CODES.get(status, f"http_{status}"),
                             "message": message}
    if issues is not None:
        error["issues"] = issues
    return web.json_response({"error": error}, status=status, headers=headers)


# --- backend: the stores, shared by every request ------------------------------------


@dataclass
class Backend:
    settings: Settings
    r: redis.Redis
    catalogue: EventCatalogue
    hooks: HookRegistry
    intake: Intake
    stats: Stats
    retry: RetryStore
    names: NameStore
    tokens: TokenStore
    # the log lines said lately: a Redis down, or a damaged key, fails every request
    # alike, hundreds a second, and each is said once a minute (with how often it came)
    said: Repeats = field(default_factory=Repeats)

    def warn(self, key: str, line: str, level: int = logging.WARNING) -> None:
        """Log ``line`` unless a line of the same ``key`` was said less than a minute
        ago (then it is counted, and the next one says how often it came)."""
        times = self.said.due(key)
        if times is not None:
            log.log(level, "%s%s", line, repeated(times))

    @classmethod
    def of(cls, settings: Settings, r: redis.Redis | None = None) -> Backend:
        # a Redis that stops answering fails a request with 503 after REDIS_TIMEOUT_SEC
        # instead of holding one of the API's threads (and every request queued
        # behind them) for ever
        r = without_retries(r) if r is not None else engine_redis(
            settings.REDIS_URL, health_check_interval=30, socket_timeout=REDIS_TIMEOUT_SEC,
            socket_connect_timeout=REDIS_TIMEOUT_SEC)
        keys = Keys(settings.REDIS_PREFIX)
        catalogue = load_catalogue(settings.EVENT_TYPES_FILE)
        return cls(settings, r, catalogue,
                   HookRegistry(r, keys, catalogue,
                                max_per_account=settings.MAX_HOOKS_PER_ACCOUNT),
                   Intake(r, keys, settings.PARTITIONS, settings.INTAKE_MAX_BATCH, catalogue,
                          settings.INTAKE_MAX_ENTRIES),
                   Stats(r, keys), RetryStore(r, keys), NameStore(r, keys),
                   TokenStore(r, settings.REDIS_PREFIX))

    def owned_hook(self, account_id: int, hook_id: int) -> Hook:
        """The hook if it exists and is the account's; 404 otherwise (ids do not leak).
        One stored that no longer validates, or whose record is damaged: 409 for its
        account (naming it and why), 404 for the others."""
        try:
            hook = self.hooks.get(hook_id)
        except NotFound:
            hook = None
        except HookError as exc:  # stored, and no longer valid: only its account knows
            if self.hooks.owner(hook_id) != account_id:
                raise ApiError(404, f"hook {hook_id} does not exist") from None
            raise self.hook_error(account_id, hook_id, exc) from None
        if hook is None or hook.account_id != account_id:
            raise ApiError(404, f"hook {hook_id} does not exist")
        return hook

    def hook_error(self, account_id: int, hook_id: int, exc: HookError) -> ApiError:
        """The answer to a HookError about the account's hook ``hook_id``, its secrets
        masked: 409 when the stored hook no longer validates or is damaged (it can
        only be deleted), else 422 naming each field."""
        return hook_api_error(exc, stored_secrets(self, account_id, hook_id))

    def dead_letter_hook(self, account_id: int, hook_id: int) -> None:
        """Whether ``hook_id`` may filter the account's dead letters: a stored hook of
        the account (valid or not), or a deleted one whose dead letters are the
        account's; 404 otherwise, as for a hook that never existed."""
        owner = self.hooks.owner(hook_id)
        if owner == account_id:
            return
        if owner is None:  # not stored (or a damaged record naming no account)
            # every dead letter of a hook is of the hook's account: the first says whose
            first = self.retry.dead_page(None, hook_id, 1)
            if first and first[0][0].account_id == account_id:
                return
        raise ApiError(404, f"hook {hook_id} does not exist")

    def owned_dead_letters(self, account_id: int, ids: list[str]) -> list[Delivery]:
        raw: list[bytes | None] = self.r.hmget(self.retry.k.dead_payload, ids)  # type: ignore[assignment]
        found = []
        for delivery_id, payload in zip(ids, raw, strict=True):
            try:
                d = unpack_delivery(payload) if payload is not None else None
            except (msgspec.DecodeError, ValueError):  # damaged: nobody's to replay
                d = None
            if d is None or d.account_id != account_id:
                raise ApiError(404, f"dead letter {delivery_id} does not exist")
            found.append(d)
        return found


REDIS_DOWN = "the engine's Redis is unavailable; try again"
# a key of the engine's that Redis will not use as asked (a counter that is no number,
# a hash that is a string...) fails every request that needs it: no "try again". Which
# key is for the engine's log to say, not an answer (some answers need no token)
REDIS_DAMAGED = ("data the engine keeps in Redis is damaged: {what}. Sending this again "
                 "will not help until an operator repairs it (the engine's log says what "
                 "Redis refused)")
# the same found by the engine itself (DamagedRecord): Redis refused nothing
FOUND_DAMAGED = ("data the engine keeps in Redis is damaged: {what}. Sending this again "
                 "will not help until an operator repairs it (the engine's log names the "
                 "key and how)")
REDIS_REFUSED = ("the engine's Redis refused a command, and not for being down, loading or "
                 "out of memory: sending this again will not help until an operator acts "
                 "(the engine's log says what Redis refused)")


def redis_error(backend: Backend, what: str, exc: redis.RedisError) -> ApiError:
    """The answer to a Redis error of a request (``what``: "POST /v1/hooks"), logged
    once a minute per error (a Redis down fails every request): 503 while Redis cannot
    serve (down, timing out, loading, out of memory, read-only...: that passes); 500
    for any other error Redis answered (WRONGTYPE, a counter that is no integer, a
    command an ACL forbids), which only an operator can end."""
    said = f"{type(exc).__name__}: {exc}"
    if redis_unavailable(exc) or not isinstance(exc, redis.ResponseError):
        backend.warn(said, f"{what}: Redis: {exc}")
        return ApiError(503, REDIS_DOWN)
    damage = damaged_data(exc)
    backend.warn(said, f"{what}: Redis refused a command ({said}): "
                 + ("data the engine keeps in Redis is damaged" if damage else
                    "an operator must act"), logging.ERROR)
    return ApiError(500, REDIS_DAMAGED.format(what=damage) if damage else REDIS_REFUSED)


def damaged_data(exc: redis.ResponseError) -> str | None:
    """What is damaged, when Redis refused a command for what a key holds, in words that
    name no key; else None."""
    # in a pipeline, redis-py puts "Command # N (COMMAND key args) of pipeline caused
    # error: " first (naming the key)
    text = str(exc).rpartition(" of pipeline caused error: ")[2]
    if text.startswith("WRONGTYPE"):
        return "a key holds another kind of value than the engine's"
    if any(reason in text for reason in ("not an integer", "not a valid float",
                                          "overflow", "out of range")):
        return "a counter holds something other than a number in range"
    return None


# --- events ----------------------------------------------------------------------------


MAX_ISSUES_LISTED = 1000  # most issues an answer lists (its counts are whole)
# most events one POST /v1/events takes (413 beyond, found before they are decoded one
# by one): a bad event can be two bytes ("{}" or "1,"), and each costs what decoding
# it and finding why it is bad take, so a body of API_MAX_BODY_BYTES would otherwise
# hold millions of them. 16 MiB of small good events are about 200,000
MAX_EVENTS_PER_REQUEST = 100_000
TOO_MANY_EVENTS = ("the body holds more than {limit:,} events, the most one request takes: "
                   "nothing accepted; send them in several requests")


def _issue(issue: EventIssue) -> dict[str, Any]:
    return {"index": issue.index, "field": issue.field, "reason": issue.reason}


def _listed(issues: list[EventIssue]) -> list[dict[str, Any]]:
    """The first MAX_ISSUES_LISTED of ``issues``: a body holds up to
    MAX_EVENTS_PER_REQUEST bad events (``1,`` is one), and listing each would make an
    answer of megabytes out of one request (only these are built: ``decode_body``'s
    ``max_issues``, the others counted)."""
    return [_issue(i) for i in issues[:MAX_ISSUES_LISTED]]


def _first_listed(count: int) -> str:
    return f" (the first {MAX_ISSUES_LISTED} listed)" if count > MAX_ISSUES_LISTED else ""


def body_mode(content_type: str) -> str:
    """"array" (application/json), "ndjson" (NDJSON types) or "sniff" (anything else)."""
    if content_type == "application/json":
        return "array"
    return "ndjson" if content_type in NDJSON_TYPES else "sniff"


def publish_events(backend: Backend, body: bytes, *, account_id: int, partial: bool = False,
                   mode: str = "sniff") -> tuple[int, dict[str, Any]]:
    """Validate events posted under a token of ``account_id`` and append the accepted
    ones to the intake: (HTTP status, answer), or ApiError. Blocking (Redis). The
    cyclic collector is paused meanwhile (``engine.collector``)."""
    with paused_gc():
        return _publish_events(backend, body, account_id, partial, mode)


WRITE_LOST = ("the engine's Redis connection was lost while the events were appended: "
              "they may have been accepted. Sending them again is safe for events that "
              "carry an \"id\" (their messages keep the same hook_message_id, by which "
              "receivers de-duplicate); an event without one gets a new id, so it may be "
              "delivered twice")


def _publish_events(backend: Backend, body: bytes, account_id: int, partial: bool,
                    mode: str) -> tuple[int, dict[str, Any]]:
    body = body.removeprefix(BOM)  # as decode_batch reads it, whatever the Content-Type
    first = body.lstrip()[:1]
    if not first:  # no events, as "[]" or an NDJSON body of no line
        return 202, {"accepted": 0}
    if mode == "array" and first != b"[":
        raise ApiError(400, "Content-Type application/json: expected a JSON array of events")
    if mode == "ndjson" and first != b"{":
        raise ApiError(400, "NDJSON body: expected one JSON object per line")
    batch, items = _decode(body, backend.catalogue)
    foreign, others = _foreign(body, batch, items, account_id)
    if others:
        raise ApiError(403, f"{others} event(s) of another account, nothing accepted"
                       f"{_first_listed(others)}", _listed(foreign))
    if batch.issues and not (partial and batch.events):
        _count_rejected(backend, batch.issues, batch.unlisted)
        raise _bad_events(batch.issues, len(batch.unlisted))
    ensure_ids(batch.events)
    # events that decoded but cannot be written (an integer beyond 64 bits in event_data)
    # are found by the one encoding that writes the others
    encoded = backend.intake.encode(batch.events, batch.indices)
    found, unlisted = cap_issues(batch.issues + encoded.issues, batch.unlisted,
                                 MAX_ISSUES_LISTED)
    if encoded.issues and not (partial and encoded.events):
        _count_rejected(backend, found, unlisted)
        raise _bad_events(found, len(unlisted))
    try:
        backend.intake.write(encoded)
    except DamagedRecord as exc:  # {p}:config damaged: nothing written, no key named
        backend.warn(str(exc), f"POST /v1/events: {exc}", logging.ERROR)
        raise ApiError(500, FOUND_DAMAGED.format(what=exc.what)) from None
    except ConfigError as exc:  # the engine runs with other PARTITIONS: nothing written
        raise ApiError(503, str(exc)) from None
    except Backlogged as exc:  # the intake is INTAKE_MAX_ENTRIES behind: nothing written
        raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None
    except redis.RedisError as exc:  # perhaps after the append went through
        answer = redis_error(backend, "POST /v1/events", exc)
        # a MULTI carries out its commands but the refused one: the others were written
        raise ApiError(answer.status, WRITE_LOST if answer.status == 503 else
                       f"{answer.message}. Some of the events may have been accepted"
                       ) from None
    if not found:
        return 202, {"accepted": len(encoded.events)}
    _count_rejected(backend, found, unlisted)
    return 207, {"accepted": len(encoded.events), "rejected": len(found) + len(unlisted),
                 "issues": _listed(found)}


def _count_rejected(backend: Backend, issues: list[EventIssue], unlisted: list[int]) -> None:
    """``Intake.count_rejected`` of ``issues``, and the bad events ``unlisted`` (no issue
    built for them) counted too; a count Redis does not take is left out."""
    backend.intake.count_rejected(issues)
    if unlisted:
        with contextlib.suppress(redis.RedisError):
            backend.r.hincrby(backend.intake.k.engine_stats, "events_rejected", len(unlisted))


def _decode(body: bytes, catalogue: EventCatalogue) -> tuple[DecodedBatch, list[Any] | None]:
    """The body's events, and the events as Python read them if it had to (a lone
    surrogate in an array); 400 when the body as a whole is not JSON, 413 when it holds
    more than MAX_EVENTS_PER_REQUEST events. Issues are built for the first
    MAX_ISSUES_LISTED bad events, the others counted (``DecodedBatch.unlisted``)."""
    try:
        batch, items = decode_body(body, catalogue, max_events=MAX_EVENTS_PER_REQUEST,
                                   max_issues=MAX_ISSUES_LISTED)
    except TooManyEvents as exc:
        raise ApiError(413, TOO_MANY_EVENTS.format(limit=exc.limit)) from None
    if batch.issues and batch.issues[0].index < 0:
        reason = batch.issues[0].reason
        raise ApiError(400, f"JSON {reason}" if reason == NESTED_TOO_DEEPLY
                       else f"malformed JSON: {reason}")
    return batch, items


class _AccountOf(msgspec.Struct):
    account_id: Any = None


_account_of_decoder = msgspec.json.Decoder(_AccountOf)


def _foreign(body: bytes, batch: DecodedBatch, items: list[Any] | None,
             account_id: int) -> tuple[list[EventIssue], int]:
    """The first MAX_ISSUES_LISTED events naming another account than ``account_id``
    (an issue each), and how many there are: those decoded, and the bad ones (listed
    or not) whose ``account_id`` can still be read (an integer id)."""
    found = [(i, e.account_id) for e, i in zip(batch.events, batch.indices, strict=True)
             if e.account_id != account_id]
    bad = sorted({i.index for i in batch.issues if i.index >= 0}.union(batch.unlisted))
    if bad:
        accounts = _accounts(body, bad) if items is None else \
            {i: items[i].get("account_id") if isinstance(items[i], dict) else None
             for i in bad if i < len(items)}
        found += [(i, other) for i, other in accounts.items()
                  if isinstance(other, int) and not isinstance(other, bool)
                  and 0 <= other <= MAX_ID and other != account_id]
    found.sort(key=itemgetter(0))
    return [EventIssue(index, "account_id",
                       f"account {other} is not the token's account {account_id}")
            for index, other in found[:MAX_ISSUES_LISTED]], len(found)


def _accounts(body: bytes, indices: list[int]) -> dict[int, Any]:
    """The ``account_id`` of each event of ``indices`` (those that did not decode) as far
    as it can be read."""
    items = split_items(body)
    found = {}
    for i in indices:
        if i < len(items):
            try:
                found[i] = _account_of_decoder.decode(items[i]).account_id
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                try:  # a lone surrogate elsewhere in it: Python reads it
                    data = json.loads(bytes(items[i]))
                except (ValueError, RecursionError):
                    continue
                found[i] = data.get("account_id") if isinstance(data, dict) else None
    return found


def _bad_events(issues: list[EventIssue], unlisted: int = 0) -> ApiError:
    """422 for the bad events: ``issues`` (the first ones), and ``unlisted`` more."""
    count = len(issues) + unlisted
    return ApiError(422, f"{count} bad event(s), nothing accepted{_first_listed(count)}",
                    _listed(issues))


# --- hooks -----------------------------------------------------------------------------


def validate_hook(data: dict[str, Any], catalogue: EventCatalogue) -> Hook:
    """A Hook, or ApiError 422 naming each bad field and its reason."""
    try:
        hook = Hook.model_validate(data, context={"catalogue": catalogue})
        problems = []
    except ValidationError as exc:  # only loc and msg: an input value may be a secret
        problems = validation_problems(exc)
    if problems:
        # a validator names a URL it refuses with its password masked, but a password
        # that breaks the URL (an unencoded "?", "/" or "#" in it) is no password to
        # the parser: the secrets are masked here as the body gave them
        secrets = sent_secrets(data)
        found = [(field, scrub(reason, secrets)) for field, reason in problems[:MAX_PROBLEMS]]
        raise ApiError(422, problems_message(found, len(problems)),
                       [{"field": field, "reason": reason} for field, reason in found])
    masked = masked_secrets(hook)
    if masked:
        raise ApiError(422, "invalid hook: a secret cannot be the redacted value " + MASK,
                       [{"field": f, "reason": f"the redacted value {MASK} keeps a stored "
                         "secret only on PUT of the same hook; send the secret itself"}
                        for f in masked])
    return hook


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is below ``folder`` (both resolved), not ``folder`` itself."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_cafile(hook: Hook, settings: Settings, stored: Hook | None = None) -> None:
    """ApiError 422 unless the hook's ``tls_cafile`` (if any) is a file under
    API_TLS_CA_DIR, or the one ``stored`` already has: a path names a file on the
    engine's machines, which the engine reads at each connect; an account may name
    only the CA files its operator put there."""
    path = getattr(hook.target.settings, "tls_cafile", None)
    if path is None or (stored is not None and stored.target.kind == hook.target.kind
                        and getattr(stored.target.settings, "tls_cafile", None) == path):
        return
    ca_dir = settings.API_TLS_CA_DIR
    if not ca_dir:
        reason = ("names a file on the engine's machines, which this API takes only under "
                  "API_TLS_CA_DIR, and that is not set: ask the operator to set it, or to "
                  "give the hook its CA file")
    elif _CONTROL.search(path):
        reason = "holds a control character: no file of the engine's has such a name"
    elif not os.path.isabs(path):
        reason = f"must be an absolute path under {ca_dir}"
    elif not _inside(os.path.realpath(path), os.path.realpath(ca_dir)):
        reason = f"must name a file under {ca_dir} (API_TLS_CA_DIR)"
    else:
        return
    field = f"target.{hook.target.kind}.tls_cafile"
    raise ApiError(422, f"invalid hook: {field}: {reason}", [{"field": field, "reason": reason}])


def check_destinations(hook: Hook, settings: Settings) -> None:
    """ApiError 422 when the hook's target names an address DESTINATION_DENY refuses
    (an IP address written as the host): it could deliver nothing. A name is judged
    by the addresses it resolves to when a delivery connects."""
    guard = guard_for(settings.DESTINATION_DENY)
    if not guard:
        return
    issues = [{"field": field, "reason": reason} for field, host in destination_hosts(hook)
              if (reason := guard.reason(host)) is not None]
    if issues:
        raise ApiError(422, f"invalid hook: {issues[0]['field']}: {issues[0]['reason']}: "
                       "no delivery may connect there", issues)


def _with_account(data: Any, account_id: int, what: str = "hook") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(422, f"expected a JSON object ({what})",
                       [{"field": what, "reason": "expected a JSON object"}])
    given = data.get("account_id", account_id)
    if not isinstance(given, int) or isinstance(given, bool):
        # not taken as a number: "5" or 5.0 would otherwise validate as account 5
        raise ApiError(422, f"{what} field account_id: expected an integer, "
                       f"got {json_type(given)}",
                       [{"field": "account_id", "reason": "expected an integer"}])
    if given != account_id:
        raise ApiError(403, f"account_id {given} is not the token's account {account_id}")
    return {**data, "account_id": given}


# --- secrets in texts shown ------------------------------------------------------------

def stored_secrets(backend: Backend, account_id: int, hook_id: int) -> list[str]:
    """The secrets of the account's stored hook ``hook_id`` (HookRegistry.stored_secrets).
    (Errors are masked when dead letters are written, with the secrets of the hook that
    was sent; this masks again.)"""
    return backend.hooks.stored_secrets(hook_id, account_id)


def hook_api_error(exc: HookError, secrets: list[str]) -> ApiError:
    """The answer to ``exc``, ``secrets`` masked: 409 when it is about a stored hook
    that no longer validates or is damaged (it can only be deleted), else 422 with an
    issue per field the error names."""
    message = scrub(str(exc), secrets)
    if message.startswith("stored hook "):
        return ApiError(409, f"{message}; delete it and create it again",
                        [{"field": "hook", "reason": message}])
    issues = [{"field": field, "reason": scrub(reason, secrets)} for field, reason in exc.issues] \
        or [{"field": "hook", "reason": message.removeprefix("invalid hook: ")}]
    return ApiError(422, message, issues)


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def field_name(name: str) -> str:
    """A field name of a body as an error names it: at most SHOWN_CHARS characters."""
    return name if len(name) <= SHOWN_CHARS else name[:SHOWN_CHARS] + "…"


# --- dead letters and stats ------------------------------------------------------------


def dead_letter_json(d: Delivery) -> dict[str, Any]:
    return {"id": d.id, "hook_id": d.hook_id, "account_id": d.account_id, "kind": d.kind,
            "messages": d.count, "resends": d.resends, "last_error": d.last_error,
            "created_ms": d.created_ms, "last_attempt_ms": d.last_attempt_ms,
            "message_ids": list(d.message_ids)}


def account_stats(backend: Backend, account_id: int) -> dict[str, Any]:
    hooks, invalid = backend.hooks.listing(account_id)
    ids = sorted([h.id or 0 for h in hooks] + [hook_id for hook_id, _ in invalid])
    per_hook = dict(zip(map(str, ids), backend.stats.get_many(ids), strict=True))  # one trip
    totals = {f: sum(s[f] for s in per_hook.values()) for f in STAT_FIELDS}
    return {"hooks": per_hook, "totals": totals}


# --- request helpers -------------------------------------------------------------------

BACKEND = web.AppKey("backend", Backend)
EXECUTOR: web.AppKey[ThreadPoolExecutor | None] = web.AppKey("executor")
OPENAPI = web.AppKey("openapi", bytes)
PROBER = web.AppKey("prober", redis.Redis)
# GET /v1/health's own threads: requests blocked on a hung Redis must not hold it up
PROBE_EXECUTOR: web.AppKey[ThreadPoolExecutor | None] = web.AppKey("probe_executor")
TOKEN = web.RequestKey("token", TokenInfo)


async def _run(request: web.Request, fn: Callable[..., T], *args: Any,
               _executor: ThreadPoolExecutor | None = None, **kwargs: Any) -> T:
    """Run a blocking call (Redis, or reading and checking a body) off the event loop
    (on ``_executor``, else the app's threads)."""
    executor = _executor or request.app[EXECUTOR]
    if executor is None:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


# most bytes a body of a route other than POST /v1/events may have (413 beyond): a hook,
# a test, clone, replay or discard request. What a body of megabytes costs to read and
# validate runs in the API's threads, but parts of it hold the interpreter's lock
# throughout (json's parser; pydantic listing the errors of 700,000 unknown keys, 2.4 s),
# and nothing else of the API runs meanwhile, GET /v1/health included. 1 MiB holds a
# hook of about 90,000 ten-digit campaign ids
MAX_OBJECT_BODY_BYTES = 1 << 20


async def _object_body(request: web.Request) -> bytes:
    """The body of a route that takes one JSON object (not events): 413 beyond
    MAX_OBJECT_BODY_BYTES (decoded size)."""
    body = await request.read()
    if len(body) > MAX_OBJECT_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_OBJECT_BODY_BYTES} bytes, "
                       "the most this route takes (only POST /v1/events takes up to "
                       "API_MAX_BODY_BYTES)")
    return body


def _json(body: bytes, default: Any = None) -> Any:
    """A request body read as JSON, each key once (``default`` for an empty one, else
    400). Blocking: a body of megabytes takes seconds to read, so it is run in the
    API's threads (``_run``), with whatever checks the body then, never on the event
    loop, which would hold every other request meanwhile (GET /v1/health too)."""
    body = body.removeprefix(BOM)
    if not body.strip():
        if default is not None:
            return default
        raise ApiError(400, "the request body is empty; expected JSON")
    try:
        return json.loads(body, object_pairs_hook=unique_keys)
    except ValueError as exc:
        reason = str(exc)
        if "integer string conversion" in reason:  # Python's advice is not the client's
            reason = f"an integer of more than {sys.get_int_max_str_digits():,} digits"
        raise ApiError(400, f"malformed JSON: {reason}") from None
    except RecursionError:
        raise ApiError(400, f"JSON {NESTED_TOO_DEEPLY}") from None


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    value = raw.lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        reason = "expected true or false (1 or 0, yes or no)"
        raise ApiError(422, f"query parameter {name}={shown(raw)}: {reason}",
                       [{"field": name, "reason": reason}])
    return value in ("true", "1", "yes")


def _int_query(request: web.Request, name: str, default: int | None, low: int,
               high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() also takes "+2", "2_0", " 2" and other scripts' digits
    value = int(raw) if re.fullmatch(r"[0-9]{1,20}", raw) else low - 1
    if not low <= value <= high:
        raise ApiError(422, f"query parameter {name}={shown(raw)}: expected an integer from "
                       f"{low} to {high}", [{"field": name, "reason": "expected an integer "
                                             f"from {low} to {high}"}])
    return value


def _hook_id(request: web.Request) -> int:
    return int(request.match_info["id"])


@dataclass(frozen=True)
class _Shown:
    """A hook as an answer shows it: its id, its JSON and its ETag."""

    id: int | None
    text: str
    etag: str


def _shown(hook: Hook) -> _Shown:
    """``hook`` as an answer shows it. Blocking (run with the route's store call, in the
    API's threads): a hook of a million campaign ids takes seconds to show."""
    return _Shown(hook.id, json.dumps(hook.display()), hook_etag(hook))


async def _hook_answer(request: web.Request, fn: Callable[..., Hook], *args: Any,
                       status: int = 200) -> web.Response:
    """The hook ``fn(*args)`` returns (run in the API's threads, and shown there) as a
    read shows it, with its ETag: sent back as If-Match, a change is made only if the
    hook is still as read (412 otherwise). A hook created (201) says where it is."""
    shown = await _run(request, lambda: _shown(fn(*args)))
    response = web.json_response(text=shown.text, status=status, headers={"ETag": shown.etag})
    if status == 201:
        response.headers["Location"] = f"/v1/hooks/{shown.id}"
    return response


def _if_match(request: web.Request) -> list[str] | None:
    """The ETags a change is conditional on (If-Match), None for no condition (none
    given, or ``*``: any hook there is, as without one)."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip() == "*":
        return None
    tags = [tag.strip() for tag in raw.split(",") if tag.strip()]
    if not tags or any(not re.fullmatch(r'(W/)?"[^"]*"', tag) for tag in tags):
        reason = 'expected "*" or one or more ETags as a read sent them (quoted)'
        raise ApiError(400, f"If-Match: {shown(raw)}: {reason}",
                       [{"field": "If-Match", "reason": reason}])
    # a weak one (W/"...", as a proxy may have made it) never matches: If-Match compares
    # strongly (RFC 9110), so the change is refused as for a hook changed since
    return [tag for tag in tags if not tag.startswith("W/")]


# --- handlers --------------------------------------------------------------------------


async def post_events(request: web.Request) -> web.Response:
    token = request[TOKEN]
    partial = _flag(request, "partial")
    body = await request.read()
    status, answer = await _run(request, publish_events, request.app[BACKEND], body,
                                account_id=token.account_id, partial=partial,
                                mode=body_mode(request.content_type))
    return web.json_response(answer, status=status)


def _listing(backend: Backend, account_id: int) -> dict[str, Any]:
    hooks, invalid = backend.hooks.listing(account_id)
    # why a stored hook no longer validates may quote a setting the validator could not
    # read as a URL, a password in it
    return {"hooks": [h.display() for h in hooks],
            "invalid": [{"id": i, "error": scrub(e, stored_secrets(backend, account_id, i))}
                        for i, e in invalid]}


async def list_hooks(request: web.Request) -> web.Response:
    # shown in the API's threads: an account's hooks may be large (see _shown)
    return web.json_response(text=await _run(request, lambda: json.dumps(_listing(
        request.app[BACKEND], request[TOKEN].account_id))))


def _create_hook(backend: Backend, account_id: int, body: bytes) -> Hook:
    data = _with_account(_json(body), account_id)
    data.pop("id", None)  # assigned by the server
    valid = validate_hook({**data, "id": 0}, backend.catalogue)
    check_cafile(valid, backend.settings)
    check_destinations(valid, backend.settings)
    return backend.hooks.create(data)


async def create_hook(request: web.Request) -> web.Response:
    body = await _object_body(request)
    return await _hook_answer(request, _create_hook, request.app[BACKEND],
                              request[TOKEN].account_id, body, status=201)


async def get_hook(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    return await _hook_answer(request, backend.owned_hook, request[TOKEN].account_id,
                              _hook_id(request))


def _replace_hook(backend: Backend, account_id: int, hook_id: int, data: dict[str, Any],
                  expect: list[str] | None = None) -> Hook:
    stored = backend.owned_hook(account_id, hook_id)
    given = data.get("id", hook_id)
    if type(given) is not int or given != hook_id:  # 1.0 and true are no id
        raise ApiError(422, f"id {shown(data['id'])} differs from the hook's id {hook_id}",
                       [{"field": "id", "reason": f"must be {hook_id} (or absent)"}])
    sent = {**data, "id": hook_id}
    data = restore_secrets(sent, stored)
    hook = validate_hook(data, backend.catalogue)
    check_cafile(hook, backend.settings, stored)
    if destination_hosts(hook) != destination_hosts(stored):  # kept: still editable
        check_destinations(hook, backend.settings)
    kept = changed_paths(sent, data)
    if kept and destination(hook) != destination(stored):
        # a stored secret goes only where it went: whoever holds a master token must
        # not be able to redirect it to a server of their own
        raise ApiError(422, "invalid hook: the destination changed, so the redacted "
                       f"value {MASK} cannot keep a stored secret; send the secret itself",
                       [{"field": f, "reason": f"the destination changed: {MASK} keeps the "
                         "stored secret only for the same destination"} for f in kept])
    # the settings as sent: the registry restores the redacted secrets from the record
    # it changes, so an update landing since the read above (a token rotated) is not
    # undone; a racing delete: see _engine_error
    return backend.hooks.update(hook_id, sent, expect)


def _put_hook(backend: Backend, account_id: int, hook_id: int, body: bytes,
              expect: list[str] | None) -> Hook:
    data = _with_account(_json(body), account_id)
    return _replace_hook(backend, account_id, hook_id, data, expect)


async def put_hook(request: web.Request) -> web.Response:
    expect = _if_match(request)
    body = await _object_body(request)
    return await _hook_answer(request, _put_hook, request.app[BACKEND],
                              request[TOKEN].account_id, _hook_id(request), body, expect)


def _delete_hook(backend: Backend, account_id: int, hook_id: int) -> None:
    # ownership from the stored JSON: a hook that no longer validates (or whose record
    # is damaged, as far as it names its account) can be deleted
    if backend.hooks.owner(hook_id) != account_id:
        raise ApiError(404, f"hook {hook_id} does not exist")
    backend.hooks.delete(hook_id)  # a racing delete: see _engine_error


async def delete_hook(request: web.Request) -> web.Response:
    await _run(request, _delete_hook, request.app[BACKEND], request[TOKEN].account_id,
               _hook_id(request))
    return web.Response(status=204)


def _set_active(backend: Backend, account_id: int, hook_id: int, active: bool,
                expect: list[str] | None = None) -> Hook:
    backend.owned_hook(account_id, hook_id)
    # a racing delete: see _engine_error
    return backend.hooks.set_active(hook_id, active, expect)


async def activate_hook(request: web.Request) -> web.Response:
    return await _hook_answer(request, _set_active, request.app[BACKEND],
                              request[TOKEN].account_id, _hook_id(request), True,
                              _if_match(request))


async def stop_hook(request: web.Request) -> web.Response:
    return await _hook_answer(request, _set_active, request.app[BACKEND],
                              request[TOKEN].account_id, _hook_id(request), False,
                              _if_match(request))


def _clone(backend: Backend, account_id: int, hook_id: int, body: bytes) -> Hook:
    name = _clone_name(_json(body, default={}))
    backend.owned_hook(account_id, hook_id)
    return backend.hooks.clone(hook_id, name)  # a racing delete: see _engine_error


CLONE_SHAPE = "expected {\"name\": string of 1 to 255 characters} or no body"


def _clone_name(body: Any) -> str | None:
    """The name a clone body gives (None: the default), or 422 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(422, CLONE_SHAPE, [{"field": "body", "reason": "expected a JSON object"}])
    problems = [{"field": field_name(field), "reason": "unknown field"}
                for field in body if field != "name"]
    name = body.get("name")
    if "name" in body and not (isinstance(name, str) and 0 < len(name) <= 255):
        problems.append({"field": "name", "reason": "expected a string of 1 to 255 characters"})
    elif isinstance(name, str) and (problem := not_utf8(name)):
        problems.append({"field": "name", "reason": problem})
    if problems:
        raise ApiError(422, f"{CLONE_SHAPE}: " + "; ".join(
            f"{p['field']}: {p['reason']}" for p in problems), problems)
    return name


async def clone_hook(request: web.Request) -> web.Response:
    body = await _object_body(request)
    return await _hook_answer(request, _clone, request.app[BACKEND], request[TOKEN].account_id,
                              _hook_id(request), body, status=201)


def _test_event_type(catalogue: EventCatalogue, body: bytes) -> str:
    """The event code a test body names, or 400/422."""
    data = _json(body)
    if isinstance(data, dict) and (problems := [
            {"field": field_name(field), "reason": "unknown field"}
            for field in data if field != "event_type"]):
        # as clone's: a field meant to change the test is not ignored unsaid
        raise ApiError(422, "expected {\"event_type\": event code}: " + "; ".join(
            f"{p['field']}: {p['reason']}" for p in problems), problems)
    event_type = data.get("event_type") if isinstance(data, dict) else None
    if not isinstance(event_type, str) or event_type not in catalogue:
        reason = ("required: an event code" if event_type is None
                  else f"unknown event type {shown(event_type)}" if isinstance(event_type, str)
                  else f"expected an event code (a string), got {json_type(event_type)}")
        raise ApiError(422, f"event_type: {reason}", [{"field": "event_type", "reason": reason}])
    return event_type


async def test_hook(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    body = await _object_body(request)
    event_type = await _run(request, _test_event_type, backend.catalogue, body)
    hook = await _run(request, backend.owned_hook, request[TOKEN].account_id, _hook_id(request))
    names = await _run(request, backend.names.load)
    secrets = hook_secrets(hook)
    # a transport failing otherwise than a delivery does is an outcome too (logged)
    outcome = await send_test_event(hook, event_type, names, catalogue=backend.catalogue,
                                    **backend.settings.transport_options(hook.target.kind))
    # the detail may quote the destination's answer, which may echo the credentials
    # it was sent
    outcome = msgspec.structs.replace(outcome, detail=scrub(outcome.detail, secrets),
                                      error=outcome.error and scrub(outcome.error, secrets))
    return web.json_response({"delivered": outcome.ok, "status": outcome.status,
                              "detail": outcome.detail, "error": outcome.error})


def _hook_stats(backend: Backend, account_id: int, hook_id: int) -> dict[str, int]:
    backend.owned_hook(account_id, hook_id)
    return backend.stats.get(hook_id)


async def hook_stats(request: web.Request) -> web.Response:
    return web.json_response(await _run(request, _hook_stats, request.app[BACKEND],
                                        request[TOKEN].account_id, _hook_id(request)))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await _run(request, account_stats, request.app[BACKEND],
                                        request[TOKEN].account_id))


def _dead_letters(backend: Backend, account_id: int, hook_id: int | None, limit: int,
                  after: str | None) -> list[tuple[Delivery, str]]:
    if hook_id is not None:
        backend.dead_letter_hook(account_id, hook_id)
    return backend.hooks.shown_dead_letters(
        backend.retry.dead_page(account_id, hook_id, limit, after))


async def dead_letters(request: web.Request) -> web.Response:
    hook_id = _int_query(request, "hook_id", None, 0, 2**63 - 1)
    limit = _int_query(request, "limit", 100, 1, MAX_DEAD_LETTERS) or 100
    after = request.query.get("after")
    if after is not None:
        try:
            parse_cursor(after)
        except ValueError as exc:
            raise ApiError(422, f"query parameter after: {exc}",
                           [{"field": "after", "reason": str(exc)}]) from None
    page = await _run(request, _dead_letters, request.app[BACKEND],
                      request[TOKEN].account_id, hook_id, limit, after)
    return web.json_response({
        "dead_letters": [{**dead_letter_json(d), "cursor": cursor} for d, cursor in page],
        "next": page[-1][1] if len(page) == limit else None})


def _move(backend: Backend, account_id: int, body: dict[str, Any], mode: str) -> int:
    """Replay or discard (``mode``) the account's dead letters named in ``body``."""
    if body.get("ids") is not None:
        ids = list(dict.fromkeys(body["ids"]))  # each once
        backend.owned_dead_letters(account_id, ids)
        move = backend.retry.replay if mode == "replay" else backend.retry.discard
        try:
            return move(ids)
        except NotFound as exc:  # replayed or discarded by someone else meanwhile
            raise ApiError(404, str(exc)) from None
        except Conflict as exc:  # dead-lettered again and again meanwhile
            raise ApiError(409, str(exc)) from None
    hook_id = body.get("hook_id")
    if hook_id is not None:
        backend.dead_letter_hook(account_id, hook_id)
    move_all = backend.retry.replay_all if mode == "replay" else backend.retry.discard_all
    try:
        return move_all(account_id, hook_id)
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None


MOVE_SHAPE = (f'expected {{"ids": [dead letter id, ...]}} (at most {MAX_MOVE_IDS:,} ids) '
              'or {"all": true} (optionally with "hook_id")')


def _move_body(body: Any) -> dict[str, Any]:
    """The body of a replay or discard, checked: ``{"ids": [...]}`` or ``{"all": true}``
    (with an optional ``hook_id``)."""
    if not isinstance(body, dict):
        raise ApiError(422, MOVE_SHAPE, [{"field": "body", "reason": MOVE_SHAPE}])
    ids, everything, hook_id = body.get("ids"), body.get("all"), body.get("hook_id")
    problems = []
    problems += [{"field": field_name(field), "reason": "unknown field"}
                 for field in body if field not in ("ids", "all", "hook_id")]
    if (ids is None) == (everything is not True):
        problems.append({"field": "ids", "reason": "give either ids or \"all\": true"})
    if ids is not None and not (isinstance(ids, list) and ids
                                and all(isinstance(i, str) and i for i in ids)):
        problems.append({"field": "ids", "reason": "expected a non-empty list of ids"})
    elif isinstance(ids, list) and len(ids) > MAX_MOVE_IDS:
        problems.append({"field": "ids", "reason": f"at most {MAX_MOVE_IDS:,} ids per request, "
                         f"got {len(ids):,}: send them in several requests, or use "
                         "\"all\" (with \"hook_id\")"})
    elif ids is not None and (problem := not_utf8(ids)):  # Redis could not look it up
        problems.append({"field": "ids", "reason": problem})
    if everything not in (None, True):
        problems.append({"field": "all", "reason": "expected true"})
    if hook_id is not None and (ids is not None or isinstance(hook_id, bool)
                                or not isinstance(hook_id, int) or not 0 <= hook_id <= MAX_ID):
        problems.append({"field": "hook_id", "reason": f"an integer from 0 to {MAX_ID}, only "
                         "with \"all\""})
    if problems:
        raise ApiError(422, MOVE_SHAPE, problems)
    return body


def _move_request(backend: Backend, account_id: int, body: bytes, mode: str) -> int:
    return _move(backend, account_id, _move_body(_json(body)), mode)


async def replay(request: web.Request) -> web.Response:
    body = await _object_body(request)
    n = await _run(request, _move_request, request.app[BACKEND], request[TOKEN].account_id,
                   body, "replay")
    return web.json_response({"replayed": n})


async def discard(request: web.Request) -> web.Response:
    body = await _object_body(request)
    n = await _run(request, _move_request, request.app[BACKEND], request[TOKEN].account_id,
                   body, "discard")
    return web.json_response({"discarded": n})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def _prober(r: redis.Redis) -> redis.Redis:
    """A client of the same Redis as ``r`` whose calls give up after
    HEALTH_TIMEOUT_SEC: a probe of a hung Redis must not hold a thread for ever."""
    return quick_client(r, HEALTH_TIMEOUT_SEC)


async def health(request: web.Request) -> web.Response:
    """For load balancers and probes, without a token: 200 while the engine's Redis
    answers (events are accepted), with which of the engine's workers run (whether
    accepted events are being processed); else 503 (the API can take nothing)."""
    prober, backend = request.app[PROBER], request.app[BACKEND]
    try:
        workers = await _run(request, _probe, prober, backend.retry.k,
                             _executor=request.app[PROBE_EXECUTOR])
    except redis.RedisError as exc:
        if redis_unavailable(exc) or not isinstance(exc, redis.ResponseError):
            return web.json_response({"status": "unavailable",
                                      "reason": "the engine's Redis does not answer"},
                                     status=503)
        # WRONGTYPE: {p}:config is no hash (the marks are read by MGET, which takes
        # any); else a refusal that does not pass (an ACL): not the data's fault
        backend.warn(f"{type(exc).__name__}: {exc}", f"GET /v1/health: Redis refused a "
                     f"command ({exc})", logging.ERROR)
        return web.json_response({"status": "unavailable", "reason": (
            HEALTH_DAMAGED if damaged_data(exc) else "the engine's Redis refused a command "
            "(the engine's log says which)")}, status=503)
    except ConfigError as exc:  # {p}:config holds no partition count the engine wrote
        # the probe's shape still; which key, and how to repair it, are for the log to
        # say (this answer needs no token), once a minute (a probe asks every few seconds)
        backend.warn(str(exc), f"GET /v1/health: {exc}")
        return web.json_response({"status": "unavailable", "reason": HEALTH_DAMAGED},
                                 status=503)
    partitions = workers["partitions"]
    partitions["waiting"] = [{**w, "reason": public_reason(w["reason"])}
                             for w in partitions["waiting"]]
    if workers["retry_waiting"]:
        workers["retry_waiting"] = public_reason(workers["retry_waiting"])
    return web.json_response({"status": "ok", **workers})


HEALTH_DAMAGED = "the engine's configuration in Redis is damaged (the engine's log names it)"


def _probe(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """``engine_health``, ``redis_eviction``: Redis' maxmemory-policy when it may evict
    keys (any other than noeviction), and ``redis_full``: whether Redis is at its maxmemory, asked
    only when a worker seems stopped (Redis then refuses the marks of workers that may
    well run)."""
    workers = engine_health(r, keys)
    workers["redis_eviction"] = eviction_policy(r)
    workers["redis_full"] = bool(
        (workers["partitions"]["stopped"] or not workers["retry_running"])
        and workers["partitions"]["expected"] is not None and redis_full(r))
    return workers


def public_reason(reason: str) -> str:
    """A waiting worker's reason as an answer without a token shows it: what waits
    ("stored hook 4 no longer validates (...)"), not why (the validator's words quote
    an account's hook settings: a URL, a password the parser could not read as one).
    The engine's log and ``hookray health`` have the whole reason."""
    return reason.partition(": ")[0]


# --- middleware and the app ------------------------------------------------------------

INGEST_HANDLERS = frozenset({post_events})
PUBLIC_HANDLERS = frozenset({openapi, health})
# the query parameters of the routes that take any; the others take none (public
# routes aside): a misspelt one (?partail=true) is refused, not ignored unsaid
QUERY_PARAMETERS: dict[Any, frozenset[str]] = {
    post_events: frozenset({"partial"}), dead_letters: frozenset({"hook_id", "limit", "after"})}
# the routes that read a body; the others read one sent anyway, and drop it
BODY_HANDLERS = frozenset({post_events, create_hook, put_hook, clone_hook, test_hook, replay,
                           discard})


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(401, "missing Authorization: Bearer <token>",
                       headers={"WWW-Authenticate": 'Bearer realm="hookray"'})
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "expected Authorization: Bearer <token>",
                       headers={"WWW-Authenticate": 'Bearer realm="hookray"'})
    return token.strip()


async def _authorize(request: web.Request, handler: Handler) -> None:
    token = _bearer(request)
    info = await _run(request, request.app[BACKEND].tokens.authenticate, token)
    if info is None:
        raise ApiError(401, "unknown or revoked token", headers={
            "WWW-Authenticate": 'Bearer realm="hookray", error="invalid_token"'})
    if info.role != "master" and handler not in INGEST_HANDLERS:
        raise ApiError(403, f"an {info.role} token may only publish events; this route "
                       "needs a master token")
    request[TOKEN] = info


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await _answer(request, handler)
    if request.body_exists and not request.content.at_eof() and \
            response.keep_alive is not False:  # (closed after it: nothing to read)
        # answered before its body was read (no token, no such route, a bad query):
        # the answer goes out first, then the body is read to its end, or, when it
        # cannot be (its Content-Encoding does not decode it), the connection is
        # closed. Left to aiohttp, that drain would fail, logging an unhandled error
        # with a traceback, for anyone to fill the log with
        await response.prepare(request)
        await response.write_eof()
        if not await _drained(request.content):
            response.force_close()
            request.content.feed_eof()
    return response


DRAIN_SEC = 10.0  # longest a body answered before it was read is read to its end


async def _drained(content: Any) -> bool:
    """Whether the rest of a request body could be read (and dropped) to its end, in
    chunks, within DRAIN_SEC."""
    try:
        async with asyncio.timeout(DRAIN_SEC):
            while await content.readany():
                pass
    except (web.RequestPayloadError, TimeoutError, ConnectionError):
        return False
    return True


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        route_error = request.match_info.http_exception
        if route_error is not None:
            raise route_error
        target = getattr(request.match_info, "handler", handler)
        if target not in PUBLIC_HANDLERS:
            await _authorize(request, target)
            _refuse_parameters(request, QUERY_PARAMETERS.get(target, frozenset()))
        _refuse_coding(request)
        if target not in BODY_HANDLERS and request.body_exists:
            # read as any route reads one: a body that cannot be decoded is 400, one too
            # large 413, never left for aiohttp to drain (an unhandled error, logged)
            await request.read()
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except (NotFound, Conflict, Stale, HookError, ConfigError) as exc:
        return (await _engine_error(request, exc)).response()
    except web.HTTPException as exc:
        return _http_error(request, exc)
    except web.RequestPayloadError as exc:  # the body could not be read as sent
        response = error_response(400, _unreadable_body(request, exc))
        # the rest of the body cannot be read either: the connection is closed after this
        # answer, not drained first (which would fail again, logged as unhandled)
        response.force_close()
        request.content.feed_eof()
        return response
    except redis.RedisError as exc:
        return redis_error(request.app[BACKEND], f"{request.method} {request.path}",
                           exc).response()
    except ConnectionResetError:  # reading the body: the client is gone (a load test
        # stopping, a timeout), no fault of the engine's; nothing of it was accepted
        log.info("%s %s: the client closed the connection before its body was read; "
                 "nothing of it accepted", request.method, request.path)
        response = error_response(400, "the connection closed before the body was read")
        response.force_close()  # nobody reads it; aiohttp drops it without a word
        return response
    except Exception as exc:
        # one fault fails every request that meets it: said once a minute per cause
        # (the route and the error), with its traceback and how often it came since
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        cause = f"{request.method} {route}: {type(exc).__name__}: {exc}"[:300]
        times = request.app[BACKEND].said.due("500 " + cause)
        if times is not None:
            log.error("%s %s failed%s", request.method, request.path, repeated(times),
                      exc_info=exc)
        return error_response(500, "internal error")


async def _engine_error(request: web.Request,
                        exc: NotFound | Conflict | Stale | HookError | ConfigError
                        ) -> ApiError:
    """The answer to an engine error a route lets through: the hook routes check the
    hook is the account's, then call the store, so a hook deleted, changed or damaged
    in between answers as if that came first (404, 409 or 422, a HookError with the
    secrets of the route's hook masked); settings of the engine other than this API's,
    503."""
    if isinstance(exc, NotFound):
        return ApiError(404, str(exc))
    if isinstance(exc, Stale):
        return ApiError(412, str(exc))
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc))
    if isinstance(exc, DamagedRecord):  # no "try again", and no key named
        request.app[BACKEND].warn(str(exc), f"{request.method} {request.path}: {exc}",
                                  logging.ERROR)
        return ApiError(500, FOUND_DAMAGED.format(what=exc.what))
    if isinstance(exc, ConfigError):
        request.app[BACKEND].warn(str(exc), f"{request.method} {request.path}: {exc}")
        return ApiError(503, str(exc))
    token, hook_id = request.get(TOKEN), request.match_info.get("id")
    secrets: list[str] = []
    if token is not None and hook_id is not None:
        try:
            secrets = await _run(request, stored_secrets, request.app[BACKEND],
                                 token.account_id, int(hook_id))
        except redis.RedisError as redis_exc:
            return redis_error(request.app[BACKEND], f"{request.method} {request.path}",
                               redis_exc)
    return hook_api_error(exc, secrets)


# the content codings aiohttp decodes (brotli and backports.zstd are dependencies);
# "identity", or no Content-Encoding: the body as it is
BODY_CODINGS = ("gzip", "deflate", "br", "zstd")


def _refuse_parameters(request: web.Request, known: frozenset[str]) -> None:
    unknown = [name for name in request.query if name not in known]
    if unknown:
        takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
        raise ApiError(422, f"query parameter {shown(unknown[0])} is not known here ({takes})",
                       [{"field": field_name(name), "reason": f"unknown query parameter; {takes}"}
                        for name in dict.fromkeys(unknown)])


def _refuse_coding(request: web.Request) -> None:
    """A body in a content coding the API does not decode is refused (415, naming the
    codings it decodes in Accept-Encoding, as RFC 9110 asks): read as it is, it would be
    taken for JSON, or a stacked coding such as "gzip, br" half decoded."""
    coding = request.headers.get("Content-Encoding")
    if coding is None or not request.body_exists:
        return
    name = coding.lower() if coding.isascii() else coding  # as aiohttp compares it
    if name in BODY_CODINGS or name in ("", "identity"):
        return
    accepted = ", ".join((*BODY_CODINGS, "identity"))
    raise ApiError(415, f"Content-Encoding {coding!r} is not supported: send the body "
                   f"encoded with one of {', '.join(BODY_CODINGS)}, or not encoded",
                   headers={"Accept-Encoding": accepted})


def _unreadable_body(request: web.Request, exc: web.RequestPayloadError) -> str:
    encoding = request.headers.get("Content-Encoding", "")
    if isinstance(exc.__cause__, ContentEncodingError):
        return (f"the request body is not what its Content-Encoding {encoding!r} says: it "
                "cannot be decoded; send it encoded so, or without that header")
    return f"the request body could not be read: {exc.__cause__ or exc}"


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    headers = {}
    if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        message = f"method {request.method} is not allowed here; allowed: {headers['Allow']}"
    elif exc.status == 404:
        message = f"no route {request.path}"
    elif exc.status == 413:
        limit = request.app[BACKEND].settings.API_MAX_BODY_BYTES
        message = f"the request body is larger than {limit} bytes (API_MAX_BODY_BYTES)"
    else:
        message = exc.reason or exc.text or "error"
    return error_response(exc.status, message, headers=headers or None)


def create_app(settings: Settings, r: redis.Redis | None = None, *,
               threads: int = 4) -> web.Application:
    """The API application on the engine of ``settings`` (its Redis: ``r`` or a new
    client, closed with the app). Blocking Redis calls run on ``threads`` threads
    (0: on the event loop itself)."""
    backend = Backend.of(settings, r)
    app = web.Application(middlewares=[api_middleware],
                          client_max_size=settings.API_MAX_BODY_BYTES)
    app[BACKEND] = backend
    app[EXECUTOR] = (ThreadPoolExecutor(threads, thread_name_prefix="hookray-api")
                     if threads else None)
    app[OPENAPI] = OPENAPI_PATH.read_bytes()
    app[PROBE_EXECUTOR] = (ThreadPoolExecutor(2, thread_name_prefix="hookray-api-health")
                           if threads else None)
    app[PROBER] = _prober(backend.r)
    add = app.router.add_route
    add("POST", "/v1/events", post_events)
    add("GET", "/v1/hooks", list_hooks)
    add("POST", "/v1/hooks", create_hook)
    add("GET", r"/v1/hooks/{id:[0-9]{1,19}}", get_hook)
    add("PUT", r"/v1/hooks/{id:[0-9]{1,19}}", put_hook)
    add("DELETE", r"/v1/hooks/{id:[0-9]{1,19}}", delete_hook)
    add("POST", r"/v1/hooks/{id:[0-9]{1,19}}/activate", activate_hook)
    add("POST", r"/v1/hooks/{id:[0-9]{1,19}}/stop", stop_hook)
    add("POST", r"/v1/hooks/{id:[0-9]{1,19}}/clone", clone_hook)
    add("POST", r"/v1/hooks/{id:[0-9]{1,19}}/test", test_hook)
    add("GET", r"/v1/hooks/{id:[0-9]{1,19}}/stats", hook_stats)
    add("GET", "/v1/stats", stats)
    add("GET", "/v1/dead-letters", dead_letters)
    add("POST", "/v1/dead-letters/replay", replay)
    add("POST", "/v1/dead-letters/discard", discard)
    add("GET", "/v1/openapi.json", openapi)
    add("GET", "/v1/health", health)

    async def close(app: web.Application) -> None:
        for executor in (app[EXECUTOR], app[PROBE_EXECUTOR]):
            if executor is not None:
                executor.shutdown(wait=True)
        app[PROBER].close()
        app[PROBER].connection_pool.disconnect()
        if r is None:
            backend.r.close()

    app.on_cleanup.append(close)
    return app


def routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every route, e.g. ("GET", "/v1/hooks/{id}")."""
    out = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("formatter") or info.get("path") or ""
        if route.method != "HEAD":
            out.append((route.method, path))
    return out

