"""HTTP JSON-batch transport (spec e): one POST per delivery, body = JSON array.

Client: aiohttp, chosen by ``python -m bench.http_clients`` (see the README).

* Success: when the hook has a success regex, status 2xx **and** the regex found
  in the body; without one, status 200 exactly (the documented rule). Redirects
  are not followed: a 3xx is a failure naming the Location (301-303 would turn the
  POST into a GET without the batch).
* Auth: none, a static bearer token, or OAuth2 client credentials (the token is
  fetched from ``token_url`` and cached until shortly before it expires; a 401
  drops it so the next attempt fetches a fresh one).
* One slow or dead destination does not hold up others: requests to one
  destination (the URL without its query) are limited by a semaphore of its own, a
  request that waits for it longer than ``queue_sec`` goes back unsent (``Transport
  ._take``), and a circuit breaker fails fast after ``BREAKER_FAILURES`` consecutive
  connection errors or timeouts, for ``BREAKER_OPEN_SEC`` (any answer ends the run;
  a hook's own short ``request_timeout_sec`` or failing token endpoint does not
  count); failed deliveries go to the retry schedule, so nothing is lost.
* What is kept per destination, regex and OAuth2 token is bounded
  (``MAX_DESTINATIONS``, ``MAX_REGEXES``, ``MAX_TOKENS``).
* One hook cannot stall the others through its answers: at most ``MAX_ANSWER_BYTES``
  of an answer are read, and the success regex (the ``regex`` module, whose matching
  can be timed out, unlike the standard ``re``'s) gets ``REGEX_BUDGET_SEC`` per answer;
  a regex that runs out of it fails the batch, naming the regex. A regex is matched
  on the event loop for at most ``INLINE_REGEX_SEC``; one that needs longer (once)
  is matched in a thread from then on (the module releases the GIL), so the loop
  every hook of the transport shares never waits on it again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import regex

from engine.errors import ConnectError, Queued, Rejected, Timeout, TransportError
from engine.hooks import (
    MASK,
    Auth,
    HttpBatch,
    mask_url,
    scrub,
    secret_forms,
    sent_secrets,
    url_secrets,
)
from engine.messages import http_body
from engine.transports.base import EXCERPT_CHARS, Delivery, Outcome, Transport

BREAKER_FAILURES = 5  # consecutive connect errors/timeouts that open the breaker
BREAKER_OPEN_SEC = 5.0  # how long an open breaker fails fast
TOKEN_MARGIN_SEC = 30.0  # refresh an OAuth2 token this long before it expires
# per-destination state, compiled regexes and tokens kept by one transport: beyond
# these, idle destinations, all regexes, expired tokens are dropped (a hook changing
# its URL now and then must not grow the actor's memory for ever)
MAX_DESTINATIONS = 10_000
MAX_SECRET_SETS = 1024  # targets whose secrets are kept worked out
MATCH_MASKED_CHARS = 8  # secrets at least this long are masked before a success regex
MAX_REGEXES = 1_000
MAX_TOKENS = 10_000
DEFAULT_TIMEOUT_SEC = 10.0
MAX_ANSWER_BYTES = 1 << 20  # an answer's body is read up to this many bytes
MAX_HEADER_LINE = 64 * 1024  # longest header line of an answer read
REGEX_BUDGET_SEC = 0.1  # a success regex's matching time per answer
INLINE_REGEX_SEC = 0.005  # longest a regex is matched on the event loop itself
REGEX_THREADS = 2  # threads matching the regexes that needed longer
JSON_HEADERS = {"Content-Type": "application/json"}


def _scrub(text: str, url: str) -> str:
    """``text`` (a client error's) without the secrets of ``url`` in it (its password,
    credential query values)."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


@functools.lru_cache(maxsize=1024)
def _token_forms(token: str) -> tuple[str, ...]:
    """An OAuth2 access token's ``secret_forms``, made once per token (not per request:
    a token is used for many)."""
    return tuple(secret_forms(token))


def _pieces(parts: list[bytes], size: int, max_bytes: int | None) -> list[tuple[int, int]]:
    """(start, stop) of the requests a delivery's ``parts`` are posted in, in order: at
    most ``size`` messages each and, with ``max_bytes`` (MAX_BATCH_BYTES), at most that
    many bytes of messages, counted as a partition counts a batch's (the messages'
    own bytes, not the brackets and commas of the body), so a batch it made is never
    cut; a message larger than ``max_bytes`` goes alone."""
    count = len(parts)
    if max_bytes is None:
        return [(start, min(start + size, count)) for start in range(0, count, size)]
    pieces: list[tuple[int, int]] = []
    start = held = 0
    for i, length in enumerate(map(len, parts)):
        if i > start and (i - start >= size or held + length > max_bytes):
            pieces.append((start, i))
            start, held = i, 0
        held += length
    pieces.append((start, count))
    return pieces


@dataclass
class _Destination:
    semaphore: asyncio.Semaphore
    failures: int = 0
    open_until: float = 0.0
    last_error: str = ""
    users: int = 0  # posts waiting for or holding the semaphore


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class _Cache:
    regex: dict[str, regex.Pattern[str]] = field(default_factory=dict)
    slow: set[str] = field(default_factory=set)  # regexes matched in a thread
    tokens: dict[tuple[str, str, str, str], _Token] = field(default_factory=dict)
    # token requests under way, shared by the deliveries that wait for them
    fetching: dict[tuple[str, str, str, str], asyncio.Task[str]] = field(default_factory=dict)
    # per target (by identity: the transport actor keeps its targets): its secrets
    secrets: dict[int, tuple[HttpBatch, list[str]]] = field(default_factory=dict)


class HttpTransport(Transport):
    kind = "http_batch"

    def __init__(self, concurrency: int = 8, timeout_sec: float = DEFAULT_TIMEOUT_SEC,
                 max_batch: int | None = None, max_batch_bytes: int | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self.concurrency = concurrency
        self.timeout_sec = timeout_sec
        # the installation's MAX_HTTP_BATCH: no request carries more messages, whatever
        # a hook's own max_batch_size (None: only the hook's)
        self.max_batch = max_batch
        # the installation's MAX_BATCH_BYTES: no request carries more bytes of messages
        # (but one larger message, alone), counted as a partition counts a batch's
        # (None: no bound)
        self.max_batch_bytes = max_batch_bytes
        self._session: aiohttp.ClientSession | None = None
        # least recently used first: past MAX_DESTINATIONS, idle ones go from the front
        self._destinations: OrderedDict[str, _Destination] = OrderedDict()
        self._cache = _Cache()
        self._regex_threads: ThreadPoolExecutor | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no connector-level limits: concurrency is bounded per destination (URL) by
            # the semaphores below, so a hung endpoint never takes a healthy one's sockets
            # DESTINATION_DENY: each resolved address is checked as its socket is made
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=0,
                socket_factory=self.guard.socket_factory if self.guard else None)
            # no cookies: the session serves every hook of every account, and a cookie
            # one receiver (or token endpoint) sets must not go out with another's batches
            # answers' header lines up to 64 KiB (aiohttp's 8 KiB refused a 200 with a
            # large Content-Security-Policy as a failure, sent the batch again, and
            # opened the URL's breaker)
            self._session = aiohttp.ClientSession(connector=connector,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  max_line_size=MAX_HEADER_LINE,
                                                  max_field_size=MAX_HEADER_LINE)
        return self._session

    def _destination(self, url: str) -> tuple[str, _Destination]:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}{parts.path}"
        dest = self._destinations.get(key)
        if dest is None:
            self._forget_idle(MAX_DESTINATIONS - 1)
            dest = self._destinations[key] = _Destination(asyncio.Semaphore(self.concurrency))
        else:
            self._destinations.move_to_end(key)
        return key, dest

    def _forget_idle(self, keep: int) -> None:
        """Drop least recently used destinations until at most ``keep`` are left,
        skipping those in use (a request running or waiting: their semaphore) and
        those with an open breaker; at most a few looked at per call."""
        now = time.monotonic()
        looked = 0
        while len(self._destinations) > keep and looked < 64:
            looked += 1
            key, dest = next(iter(self._destinations.items()))
            if dest.users or dest.open_until > now:
                self._destinations.move_to_end(key)  # still needed: looked at later
            else:
                del self._destinations[key]

    async def _deliver(self, target: HttpBatch, delivery: Delivery) -> Outcome:
        size = target.max_batch_size
        if self.max_batch is not None and self.max_batch < size:
            size = self.max_batch
        if delivery.count <= size:
            body = http_body(delivery.parts)
            # one request: a single message, or messages whose own bytes (the body's
            # less its brackets and commas) are within MAX_BATCH_BYTES
            if self.max_batch_bytes is None or delivery.count <= 1 or \
                    len(body) - delivery.count - 1 <= self.max_batch_bytes:
                return await self.post(target, body)
        pieces = _pieces(delivery.parts, size, self.max_batch_bytes)
        # a batch larger than the hook's max_batch_size (or MAX_HTTP_BATCH), or than
        # MAX_BATCH_BYTES: made before it was lowered, or for another kind of target
        # (RabbitMQ, Kafka) before the hook changed to this one. Posted in pieces within
        # those limits, in order; only the messages of pieces that failed are sent
        # again. A refused piece (an answer) does not stop the others, so each message
        # has its attempt; an unreachable destination (ConnectError, Timeout) stops
        # them: the rest wait for the re-send
        outcome = Outcome(ok=True)
        failed: list[int] = []
        refused: TransportError | None = None
        for start, stop in pieces:
            try:
                outcome = await self.post(target, http_body(delivery.parts[start:stop]))
            except (ConnectError, Timeout) as exc:
                failed += range(start, delivery.count)
                halt: TransportError = exc
                if refused is not None and isinstance(exc, Queued):
                    # pieces answered and refused had their attempt: the delivery was
                    # sent, and uses up a re-send (Queued would not)
                    halt = refused
                halt.failed = failed if len(failed) < delivery.count else None
                raise halt from None
            except TransportError as exc:
                failed += range(start, stop)
                refused = exc
        if refused is not None:
            refused.failed = failed if len(failed) < delivery.count else None
            raise refused
        limits = f"{size}" if self.max_batch_bytes is None else \
            f"{size} messages and {self.max_batch_bytes} bytes of messages"
        return Outcome(ok=True, status=outcome.status,
                       detail=f"{delivery.count} messages in {len(pieces)} requests of at "
                              f"most {limits}; last answer: {outcome.detail}"[:EXCERPT_CHARS])

    async def post(self, target: HttpBatch, body: bytes) -> Outcome:
        key, dest = self._destination(target.url)
        if dest.open_until > time.monotonic():
            raise ConnectError(f"{mask_url(key)}: circuit open after {dest.failures} failures; "
                               f"last error: {dest.last_error}")
        dest.users += 1
        try:
            # an OAuth2 token endpoint's failure is the hook's own: not counted towards
            # the breaker of a URL other accounts' hooks may share, and fetched before
            # one of its sending slots is taken (a token endpoint that hangs held them)
            auth = await self._authorization(target)
            await self._take(dest.semaphore, f"POST {mask_url(key)}", self.concurrency)
            try:
                if dest.open_until > time.monotonic():  # opened while this one waited
                    raise ConnectError(f"{mask_url(key)}: circuit open after "
                                       f"{dest.failures} failures; last error: "
                                       f"{dest.last_error}")
                # a token that ran out while this delivery waited for the slot: anew
                # (else the cached one, at once)
                auth = await self._authorization(target)
                try:
                    outcome = await self._post(target, body, auth)
                except (ConnectError, Timeout) as exc:
                    # hooks of other accounts may share this breaker (the URL without
                    # its query): what it says later names the URL without the query;
                    # a timeout shorter than the installation's, the hook's own
                    # request_timeout_sec, says nothing of the destination to them
                    if not (isinstance(exc, Timeout) and target.request_timeout_sec
                            and target.request_timeout_sec < self.timeout_sec):
                        self._record_failure(dest, str(exc).replace(mask_url(target.url),
                                                                    mask_url(key)))
                    raise
                except TransportError as exc:
                    if exc.status is not None:  # answered: reachable, the run is over
                        dest.failures, dest.open_until = 0, 0.0
                    raise
            finally:
                dest.semaphore.release()
        finally:
            dest.users -= 1
        dest.failures, dest.open_until = 0, 0.0
        return outcome

    def _record_failure(self, dest: _Destination, error: str) -> None:
        dest.failures += 1
        dest.last_error = error
        if dest.failures >= BREAKER_FAILURES:
            dest.open_until = time.monotonic() + BREAKER_OPEN_SEC

    async def _post(self, target: HttpBatch, body: bytes, auth: str | None) -> Outcome:
        headers = {**JSON_HEADERS, **target.headers} if not _own_content_type(target) \
            else dict(target.headers)
        if auth:
            headers["Authorization"] = auth
        timeout = aiohttp.ClientTimeout(total=target.request_timeout_sec or self.timeout_sec)
        try:
            # redirects are not followed: a POST redirected by 301-303 arrives as a GET
            # without the batch, and its answer would count as delivered
            async with self._client().post(target.url, data=body, headers=headers,
                                           timeout=timeout, allow_redirects=False) as resp:
                status = resp.status
                location = resp.headers.get("Location", "")
                unread = None
                try:
                    text = await _answer(resp)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # the answer came: its status decides, as for any answer. Taken as
                    # the destination unreachable, a 200 with a body cut short (or
                    # compressed wrongly) was sent again until it died, and opened the
                    # breaker for every hook of its URL. (Cut once masked: _judge, or
                    # below.)
                    unread = f"no whole body within {timeout.total} s" \
                        if isinstance(exc, TimeoutError) else \
                        f"{type(exc).__name__}: {_scrub(str(exc), target.url)}"
                    text = f"(the answer's body could not be read: {unread})"
        except TimeoutError:
            raise Timeout(f"POST {mask_url(target.url)}: no answer within {timeout.total} s"
                          ) from None
        except (aiohttp.ClientResponseError, aiohttp.InvalidURL) as exc:
            # an answer that is no valid HTTP (the destination was reached: it is not
            # counted towards the breaker), or a URL the client refuses (a stored
            # hook's host written 127.1): failed, not unreachable
            raise Rejected(f"POST {mask_url(target.url)}: {type(exc).__name__}: "
                           f"{_scrub(str(exc), target.url)}") from None
        except aiohttp.ClientError as exc:
            raise ConnectError(f"POST {mask_url(target.url)}: {type(exc).__name__}: "
                               f"{_scrub(str(exc), target.url)}") from None
        except ValueError as exc:  # the request cannot be made (URL credentials that
            # Basic auth cannot carry, a stored hook from before they were checked)
            raise Rejected(f"POST {mask_url(target.url)}: the request cannot be made: "
                           f"{type(exc).__name__}: {_scrub(str(exc), target.url)}"
                           ) from None
        if status == 401 and target.auth.kind == "oauth2":  # that token, not a newer one
            key = _token_key(target.auth)
            held = self._cache.tokens.get(key)
            if held is not None and auth == f"Bearer {held.value}":
                del self._cache.tokens[key]
        secrets = self._secrets(target, auth)
        if unread is not None and target.success_regex and 200 <= status < 300:
            refused = Rejected(f"HTTP {status}: the answer's body could not be read, so "
                               f"success regex {target.success_regex!r} was not looked "
                               f"for in it: {scrub(unread, secrets)[:EXCERPT_CHARS]}")
            refused.status = status
            raise refused
        if 300 <= status < 400:
            shown = scrub(mask_url(location), secrets)[:300]
            redirect = Rejected(f"HTTP {status}: redirects are not followed (the batch was "
                                f"not delivered); Location: {shown}")
            redirect.status = status
            raise redirect
        return await self._judge(target, status, text, secrets)

    def _secrets(self, target: HttpBatch, auth: str | None) -> list[str]:
        """What a text about a delivery to ``target`` must not show: its settings'
        secrets, in each form a destination may echo them, and an OAuth2 access token
        sent (the engine's, got with the client secret)."""
        cache = self._cache.secrets
        cached = cache.get(id(target))
        if cached is None or cached[0] is not target:
            if len(cache) >= MAX_SECRET_SETS:
                cache.clear()
            dump = target.model_dump(mode="json", context={"reveal": True})
            cached = cache[id(target)] = (target, sent_secrets({"http_batch": dump}))
        if auth and target.auth.kind == "oauth2":
            return [*cached[1], *_token_forms(auth.removeprefix("Bearer "))]
        return cached[1]

    async def _judge(self, target: HttpBatch, status: int, text: str,
                     secrets: list[str]) -> Outcome:
        """The outcome of an answer. One echoing what was sent has its ``secrets``
        masked before it is cut to an excerpt (a secret cut in two would not be found
        whole afterwards), and those of MATCH_MASKED_CHARS or more before the success
        regex is matched (it would tell, guess by guess, what a secret holds; a
        shorter one, "ok" say, could hide the very text the regex looks for)."""
        excerpt = (scrub(text, secrets) if secrets else text)[:EXCERPT_CHARS]
        if target.success_regex:
            if not 200 <= status < 300:
                reason = "status is not 2xx"
            else:
                long = [secret for secret in secrets if len(secret) >= MATCH_MASKED_CHARS]
                try:
                    if await self._search(target.success_regex,
                                          scrub(text, long) if long else text):
                        return Outcome(ok=True, status=status, detail=excerpt)
                    reason = f"body does not match success regex {target.success_regex!r}"
                except TimeoutError:
                    reason = (f"success regex {target.success_regex!r} took more than "
                              f"{REGEX_BUDGET_SEC} s on the body: simplify it")
        elif status == 200:
            return Outcome(ok=True, status=status, detail=excerpt)
        else:
            reason = "status is not 200"
        refused = Rejected(f"HTTP {status}: {reason}; body: {excerpt}")
        refused.status = status
        raise refused

    async def _search(self, source: str, text: str) -> bool:
        """Whether the success regex ``source`` is found in ``text``, within
        REGEX_BUDGET_SEC (TimeoutError otherwise), holding the event loop at most
        INLINE_REGEX_SEC."""
        cache = self._cache
        pattern = cache.regex.get(source)
        if pattern is None:
            if len(cache.regex) >= MAX_REGEXES:
                cache.regex.clear()
                cache.slow.clear()
            pattern = cache.regex[source] = regex.compile(source)
        budget = REGEX_BUDGET_SEC
        if source not in cache.slow:
            try:
                return pattern.search(text, timeout=INLINE_REGEX_SEC) is not None
            except TimeoutError:
                cache.slow.add(source)
                budget -= INLINE_REGEX_SEC
        if self._regex_threads is None:  # its own: never the loop's (DNS) executor
            self._regex_threads = ThreadPoolExecutor(REGEX_THREADS, "success-regex")
        found = await asyncio.get_running_loop().run_in_executor(
            self._regex_threads, functools.partial(pattern.search, text, timeout=budget,
                                                   concurrent=True))
        return found is not None

    async def _authorization(self, target: HttpBatch) -> str | None:
        auth = target.auth
        if auth.kind == "bearer" and auth.token is not None:
            return f"Bearer {auth.token.get_secret_value()}"
        if auth.kind == "oauth2":
            timeout = target.request_timeout_sec or self.timeout_sec
            return f"Bearer {await self._oauth2_token(auth, timeout)}"
        return None

    async def _oauth2_token(self, auth: Auth, timeout: float) -> str:
        """The hook's token, cached until shortly before it expires; deliveries that
        need one at the same time share one request for it (each made its own: a
        provider that limits its token endpoint, or revokes a token as it issues the
        next, failed some of them)."""
        key = _token_key(auth)
        cached = self._cache.tokens.get(key)
        if cached and cached.expires_at > time.monotonic():
            return cached.value
        loop = asyncio.get_running_loop()
        fetch = self._cache.fetching.get(key)
        if fetch is None or fetch.done() or fetch.get_loop() is not loop:
            fetch = loop.create_task(self._fetch_token(auth, key, timeout),
                                     name="hookray OAuth2 token request")
            fetch.add_done_callback(_retrieved)
            self._cache.fetching[key] = fetch
        # shielded: a delivery given up on does not end the request the others wait for
        try:
            return await asyncio.shield(fetch)
        except TransportError as exc:  # each its own: a delivery notes its failed on it
            raise type(exc)(str(exc)) from None

    async def _fetch_token(self, auth: Auth, key: tuple[str, str, str, str],
                           timeout: float) -> str:
        url = auth.token_url or ""
        secret = auth.client_secret.get_secret_value() if auth.client_secret else ""
        form = {"grant_type": "client_credentials", "client_id": auth.client_id or "",
                "client_secret": secret}
        if auth.scope:
            form["scope"] = auth.scope
        try:
            # a redirect is not followed: it would post client_secret to its Location
            async with self._client().post(url, data=form,
                                           timeout=aiohttp.ClientTimeout(total=timeout),
                                           allow_redirects=False) as resp:
                # at most MAX_ANSWER_BYTES, as any answer (a token is a few hundred)
                text = await _answer(resp)
                status = resp.status
        except TimeoutError:
            raise ConnectError(f"OAuth2 token request to {mask_url(url)}: no answer within "
                               f"{timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise ConnectError(f"OAuth2 token request to {mask_url(url)} failed: "
                               f"{type(exc).__name__}: {_scrub(str(exc), url)}") from None
        except ValueError as exc:  # the request cannot be made (a stored token_url's
            # user:password@ that Basic auth cannot carry, say)
            raise Rejected(f"OAuth2 token request to {mask_url(url)}: the request cannot "
                           f"be made: {type(exc).__name__}: {_scrub(str(exc), url)}"
                           ) from None
        finally:
            if self._cache.fetching.get(key) is asyncio.current_task():
                del self._cache.fetching[key]
        try:
            payload = json.loads(text)
            said = "" if isinstance(payload, dict) else "the answer is no JSON object"
        except (ValueError, RecursionError) as exc:
            payload, said = None, f"the answer is no JSON: {type(exc).__name__}: {exc}"
        if status != 200 or not isinstance(payload, dict):
            if isinstance(payload, dict):  # what it says: RFC 6749 5.2's error fields
                said = scrub(_token_error(payload), secret_forms(secret) if secret else [])
            raise Rejected(f"OAuth2 token endpoint {mask_url(url)} answered HTTP {status} "
                           f"without an access_token ({said[:EXCERPT_CHARS]})")
        value = payload.get("access_token")
        if not isinstance(value, str) or not value or _CONTROL.search(value):
            raise Rejected(f"OAuth2 token endpoint {mask_url(url)} answered HTTP {status} "
                           "without an access_token that can be sent (a non-empty text "
                           "without control characters)")
        try:
            lifetime = float(payload.get("expires_in") or 3600)
        except (TypeError, ValueError):  # not a number of seconds: the usual hour
            lifetime = 3600.0
        token = _Token(value, time.monotonic() + max(lifetime - TOKEN_MARGIN_SEC, lifetime / 2))
        if len(self._cache.tokens) >= MAX_TOKENS:
            now = time.monotonic()
            live = {k: t for k, t in self._cache.tokens.items() if t.expires_at > now}
            self._cache.tokens = live if len(live) < MAX_TOKENS else {}
        self._cache.tokens[key] = token
        return token.value

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._regex_threads is not None:
            self._regex_threads.shutdown(wait=False)
            self._regex_threads = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A token request's error is its waiters' to say: none left waiting is no fault."""
    if not task.cancelled():
        task.exception()


def _token_error(payload: dict[str, Any]) -> str:
    """What a token endpoint's error answer says (RFC 6749 5.2: error, error_description)."""
    parts = [str(payload[k])[:200] for k in ("error", "error_description")
             if isinstance(payload.get(k), str | int)]
    return ": ".join(parts) or "no error named"


def _own_content_type(target: HttpBatch) -> bool:
    """Whether the hook gives its own Content-Type (application/json with parameters,
    as validation allows), which is then the request's only one."""
    return any(name.lower() == "content-type" for name in target.headers)


async def _answer(resp: aiohttp.ClientResponse) -> str:
    """The answer's body as text, at most MAX_ANSWER_BYTES of it (the rest is not read:
    the connection is then closed rather than reused)."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_ANSWER_BYTES:
        chunk = await resp.content.read(MAX_ANSWER_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    try:
        encoding = resp.get_encoding()
    except (RuntimeError, LookupError):
        encoding = "utf-8"
    try:
        return body.decode(encoding, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _token_key(auth: Auth) -> tuple[str, str, str, str]:
    """Cached tokens are per endpoint, client, scope and secret: a hook with a wrong
    or revoked secret does not ride on a token another hook's secret obtained."""
    secret = auth.client_secret.get_secret_value() if auth.client_secret else ""
    return (auth.token_url or "", auth.client_id or "", auth.scope or "",
            hashlib.sha256(secret.encode()).hexdigest())


TRANSPORTS = {"http_batch": HttpTransport}
