"""Hook model: what an account's master user configures (spec section b).

A hook has a scope (one database or all of the account's), the event codes it
captures, filters, the custom_data set, the content option and exactly one target:
``http_batch``, ``rabbitmq_queue``, ``rabbitmq_exchange`` or ``kafka``.

Secrets (passwords, tokens, client secrets) are ``SecretStr``: masked in ``repr``,
in ``model_dump()`` and in ``display()``. ``to_storage()`` is the only way out in
clear text, for the hook registry. More values are shown masked the same way: the
password inside an http(s) URL (``https://user:**********@host/``), the value of a
URL's query parameter and of an extra HTTP header whose name says it carries a
credential (``?token=**********``; ``Authorization``, ``Cookie``, ``X-Api-Key``,
``X-Auth-Token``... see ``SENSITIVE_HEADER`` and ``sensitive_param``); a user name
without a password, or with an empty one (``https://KEY@host/``, ``https://KEY:@host/``),
masked itself.
"""

from __future__ import annotations

import base64
import contextlib
import html
import ipaddress
import json
import re
import socket
from typing import Annotated, Any, Literal
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

import regex
from aiohttp.helpers import is_canonical_ipv4_address
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from yarl import URL

from engine.catalogue import MAX_CODE_BYTES, EventCatalogue, load_catalogue
from engine.errors import SHOWN_CHARS, HookError, quoted

DEFAULT_MAX_BATCH = 100  # events per HTTP request (spec e)
DEFAULT_FLUSH_TIMEOUT_SEC = 10.0  # accumulation window (spec e)
TARGET_KINDS = ("http_batch", "rabbitmq_queue", "rabbitmq_exchange", "kafka")

def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would take True for 1
        raise ValueError("expected an id (an integer), got a boolean")
    return value


# an id: matched as int64, so 0 .. 2^63-1; a boolean is not one
Id = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=2**63 - 1)]


MASK = "**********"  # how every secret reads
# extra HTTP headers and URL query parameters whose values are credentials, by name
# (case-insensitive)
SENSITIVE_HEADER = re.compile(
    r"authorization|cookie|key|token|secret|passw|signature|\bsig\b|session|credential|auth",
    re.IGNORECASE)
# and, of URL query parameters, these too: "code" as the whole name (Azure Functions'
# function keys: ?code=), "pwd" and "passcode" anywhere, "pass" as the last word of the
# name (pass, user_pass, db-pass, userPass; not bypass, passenger or pass_through).
# Narrower than the header names: a query value taken for a credential is masked
# wherever an error text holds it, so ?country_code=US would mask every "US".
_SENSITIVE_PARAM = re.compile(
    r"(?i:^code$|pwd|passcode)|(?:(?<![A-Za-z0-9])(?i:pass)|(?<=[a-z0-9])(?:Pass|PASS))$")
URL_FIELDS = ("url", "token_url")  # fields holding a URL that may carry credentials


def sensitive_param(name: str) -> bool:
    """Whether a URL query parameter named ``name`` (as written: read percent-decoded)
    carries a credential: a name ``SENSITIVE_HEADER`` finds, or ``code``, ``pwd``,
    ``pass``... (``_SENSITIVE_PARAM``)."""
    name = unquote(name)
    return bool(SENSITIVE_HEADER.search(name) or _SENSITIVE_PARAM.search(name))


def mask_url(url: str) -> str:
    """``url`` with the password of its user-info (if any; a user name without a
    password or with an empty one, an API key as ``curl -u KEY:`` sends it, is a
    credential too: masked itself) and the value of each query parameter whose name
    says it carries a credential (``token``, ``api_key``, ``code``, ``pwd``...: see
    ``sensitive_param``) shown as ``MASK``."""
    parts = urlsplit(url)
    if parts.username and not parts.password:
        # a user name alone (https://TOKEN@host) or with an empty password
        # (https://KEY:@host) is sent as Basic auth with an empty password
        userinfo, _, host = parts.netloc.rpartition("@")
        colon = ":" if ":" in userinfo else ""
        parts = parts._replace(netloc=f"{MASK}{colon}@{host}")
    elif parts.password is not None:
        user = parts.netloc.rpartition("@")[0].partition(":")[0]
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:{MASK}@{host}")
    if parts.query:
        parts = parts._replace(query="&".join(map(_mask_param, parts.query.split("&"))))
    return parts.geturl()


def _mask_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}={MASK}" if eq and value and sensitive_param(name) else param


def url_secrets(url: str) -> list[str]:
    """The secrets ``mask_url`` hides in ``url``: its password (or a user name without
    one, or with an empty one), sensitive query values (as written, decoded, and as
    the HTTP client sends them: yarl percent-encodes what the URL holds unencoded)."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else [parts.username] if parts.username \
        else []
    params = (param.partition("=") for param in parts.query.split("&")) if parts.query \
        else ()
    in_query = [value for name, eq, value in params if eq and value and sensitive_param(name)]
    if in_query:
        found += [*in_query, *map(unquote_plus, in_query), *_sent_query_secrets(url)]
    return [s for s in found if s]


def _sent_query_secrets(url: str) -> list[str]:
    """The credential query values of ``url`` as the HTTP client sends them."""
    try:
        query = URL(url).raw_query_string
    except ValueError:  # the client cannot send it either
        return []
    return [value for name, eq, value in (p.partition("=") for p in query.split("&"))
            if eq and value and sensitive_param(name)]


SHOWN_CODES = 10  # most unknown event codes an error names


def mask_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` with the value of each credential-carrying header shown as ``MASK``."""
    return {k: MASK if SENSITIVE_HEADER.search(k) else v for k, v in headers.items()}


# what the escaped forms of a secret hold (``secret_forms``): JSON's "\", the percent
# sign, HTML's "&"
_ESCAPE_MARKS = ("\\", "%", "&")


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` in it shown as ``MASK`` (longest first). A
    secret holding a character ``text`` lacks cannot be in it and is not searched for:
    the escaped forms of a secret cost a search only in a text holding that escaping's
    mark ("\\", "%", "&"; ``MASK`` holds none of them)."""
    absent = [mark for mark in _ESCAPE_MARKS if mark not in text]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        if not any(mark in secret for mark in absent):
            text = text.replace(secret, MASK)
    return text


def not_utf8(value: Any) -> str | None:
    """Why ``value`` (a setting: a string, a secret, a list or dict of them) cannot be
    written as UTF-8, or None. It cannot when it holds a lone UTF-16 surrogate (JSON
    ``"\\ud800"``): a hook with one could be neither stored nor turned into messages.
    Secrets are not shown."""
    if isinstance(value, SecretStr):
        return "not valid UTF-8 (a lone surrogate)" if not_utf8(value.get_secret_value()) \
            else None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"not valid UTF-8: a lone surrogate {value[exc.start]!r} at character "
                    f"{exc.start}")
        return None
    if isinstance(value, list | tuple):
        return next((f"item {n}: {problem}" for n, item in enumerate(value)
                     if (problem := not_utf8(item))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if problem := not_utf8(key):
                return f"key {quoted(key)}: {problem}"
            if problem := not_utf8(item):
                return f"value of {quoted(key)}: {problem}"
    return None


class _Model(BaseModel):
    # strict: a value of the wrong JSON type is refused, never converted ("5" is no
    # database, 1 or "yes" no boolean, true no batch size); floats take integers
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        # runs before the fields' own validators: those need not care
        problem = not_utf8(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_serializer("*", when_used="always")
    def _serialize(self, value: Any, info: Any) -> Any:
        if (info.context or {}).get("reveal"):
            return value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(value, SecretStr):
            return MASK
        if info.field_name in URL_FIELDS and isinstance(value, str):
            return mask_url(value)
        if info.field_name == "headers" and isinstance(value, dict):
            return mask_headers(value)
        return value

    def __repr_args__(self) -> Any:  # repr and str mask what display() masks
        for name, value in super().__repr_args__():
            if name in URL_FIELDS and isinstance(value, str):
                yield name, mask_url(value)
            elif name == "headers" and isinstance(value, dict):
                yield name, mask_headers(value)
            else:
                yield name, value


class Filters(_Model):
    """AND across kinds, OR within a kind; an empty list means no restriction."""

    resources: list[Id] = []
    campaigns: list[Id] = []
    templates: list[Id] = []
    segments: list[Id] = []
    pixels: list[Id] = []

    @field_validator("segments")
    @classmethod
    def _no_segment_zero(cls, value: list[int], info: ValidationInfo) -> list[int]:
        # 0 is "no segment" (spec d): no event has it among its segments, so a filter
        # on it would capture nothing (kept in a hook stored before this rule)
        if 0 in value and not _stored(info):
            raise ValueError("0 means no segment, which no event is in: a filter on it "
                             "would capture nothing")
        return value

    def kinds(self) -> dict[str, list[int]]:
        return {k: getattr(self, k) for k in FILTER_KINDS}


FILTER_KINDS = ("resources", "campaigns", "templates", "segments", "pixels")


class CustomData(_Model):
    """The custom_data set (spec g).

    * ``fields``: profile fields copied from the event's profile;
    * ``template``: key/value pairs used only when the triggering request brought
      no custom_data of its own (the request's custom_data wins);
    * ``pairs``: key/value pairs added to every message.
    Values of ``template`` and ``pairs`` may hold ``{{parameters}}``.
    """

    fields: list[Annotated[str, Field(min_length=1, max_length=256)]] = []
    template: dict[str, str] = {}
    pairs: dict[str, str] = {}

    @model_validator(mode="after")
    def _bounded(self, info: ValidationInfo) -> CustomData:
        """What one hook adds to each of its messages is bounded: a partition builds
        a whole round's messages (up to 20,000 events) before batching them, for every
        account it serves, so a megabyte value or thousands of parameters in one hook
        would exhaust or stall it for everyone (stored hooks keep loading)."""
        if _stored(info):
            return self
        if len(self.fields) > CUSTOM_DATA_MAX_FIELDS:
            raise ValueError(f"fields: {len(self.fields)} profile fields: at most "
                             f"{CUSTOM_DATA_MAX_FIELDS}")
        texts = [t for part in (self.template, self.pairs) for kv in part.items() for t in kv]
        chars = sum(map(len, texts))
        if chars > CUSTOM_DATA_MAX_CHARS:
            raise ValueError(f"template and pairs hold {chars} characters of keys and "
                             f"values: at most {CUSTOM_DATA_MAX_CHARS} in all (each is "
                             "copied into every message)")
        # (the parameters filled in; an unknown one, or braces no parameter is in, is
        # left as written and costs nothing)
        params = sum(known_parameters(text) for text in texts)
        if params > CUSTOM_DATA_MAX_PARAMS:
            raise ValueError(f"template and pairs hold {params} {{{{parameters}}}}: at most "
                             f"{CUSTOM_DATA_MAX_PARAMS} in all (each is filled in for every "
                             "message)")
        return self


# the {{parameters}} a custom_data value may hold, filled in by engine.customdata
# (its PARAMETERS); the spaces a Go template action allows inside its braces: space,
# tab, CR, LF (not Unicode's other spaces: "{{\u00a0uuid}}" is no parameter, and stays
# as written)
PARAMETER_NAMES = frozenset({
    "uuid", "event_date", "event_date_ymd", "event_date_rfc3339", "event_date_unix",
    "event_date_unixnano", "campaign_name", "campaign_subid", "database_name",
    "segment_name", "message_name", "message_subject", "resource_name"})
PARAMETER = re.compile(r"\{\{[ \t\r\n]*([A-Za-z0-9_]+)[ \t\r\n]*\}\}")


def known_parameters(text: str) -> int:
    """How many parameters ``text`` holds that are filled in."""
    if "{{" not in text:
        return 0
    return sum(1 for m in PARAMETER.finditer(text) if m.group(1) in PARAMETER_NAMES)


CUSTOM_DATA_MAX_FIELDS = 256  # profile fields one hook copies
CUSTOM_DATA_MAX_CHARS = 16_384  # keys and values of template and pairs together
CUSTOM_DATA_MAX_PARAMS = 256  # {{parameters}} in template and pairs together


class Auth(_Model):
    kind: Literal["none", "bearer", "oauth2"] = "none"
    token: SecretStr | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    scope: str | None = None

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> Auth:
        if self.kind == "bearer" and not self.token:
            raise ValueError("bearer auth needs a token")
        char = _control_char(self.token.get_secret_value()) if self.token else None
        if self.kind == "bearer" and char:
            raise ValueError(f"token: holds the control character {char}, which the "
                             "Authorization header it is sent in may not hold")
        if self.kind == "oauth2":
            needed = ("token_url", "client_id", "client_secret")
            missing = [k for k in needed if not getattr(self, k)]
            if missing:
                raise ValueError(f"oauth2 auth needs {', '.join(missing)}")
        # kept with another kind too: shown masked, so valid (unless stored before this
        # rule: see ``_stored``)
        if self.token_url is not None and (self.kind == "oauth2" or not _stored(info)):
            try:
                _check_http_url(self.token_url)
            except ValueError as exc:
                raise ValueError(f"token_url: {exc}") from None
            if not _stored(info) and (problem := noncanonical_ipv4(self.token_url)):
                raise ValueError(f"token_url: {problem}")
        return self


def _stored(info: ValidationInfo) -> bool:
    """Whether a hook read back from the registry is being validated. Rules added
    after hooks were saved (a Content-Type header other than JSON's, a token_url
    kept with another auth kind, a success regex over MAX_REGEX_CHARS) apply to
    hooks created or updated, never to stored ones: one stored hook that no longer
    validates stops every partition until it is fixed."""
    return bool((info.context or {}).get("stored"))


_WHITESPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f]")


def _shown(url: str) -> str:
    """``url`` as an error may quote it: ``mask_url``, and, when an ``@`` follows the
    host part urlsplit found (a password holding ``/``, ``?`` or ``#``, which it takes
    for the path, query or fragment: no password to mask), all from the scheme to the
    last ``@`` masked."""
    masked = mask_url(url)
    scheme, sep, rest = masked.partition("://")
    if sep and "@" in rest and "@" not in urlsplit(url).netloc:
        return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"
    return masked


def _check_http_url(url: str) -> str:
    # urlsplit drops tabs and newlines anywhere ("http://exa\nmple.com" goes to
    # example.com): a URL that holds one is not the URL the client would use
    if _WHITESPACE_OR_CONTROL.search(url):
        raise ValueError("holds whitespace or a control character (encode a space as %20)")
    try:
        parts = urlsplit(url)
    except ValueError:  # its message would show the host part, a password with it
        raise ValueError("is not a valid URL: its host part cannot be parsed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{quoted(_shown(url))} is not an http(s) URL with a host")
    try:
        port = parts.port  # raises on a bad port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{quoted(_shown(url))} has an invalid port")
    problem = _host_problem(url)
    if problem:
        raise ValueError(f"{quoted(_shown(url))}: {problem}")
    return url


def _host_problem(url: str) -> str | None:
    """Why the HTTP client could never send to ``url``'s host, or None: it parses URLs
    with yarl and resolves names encoded with the ``idna`` codec (labels of 1 to 63
    characters), so either failing would fail every attempt."""
    try:
        host = URL(url).raw_host or ""
    except ValueError as exc:  # UnicodeError too
        return f"the host is not a valid domain name ({exc})"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    return f"the host is not a valid domain name: {LABELS}" if _no_idna(host) else None


LABELS = "each dot-separated label must be 1 to 63 characters long"


def noncanonical_ipv4(url: str) -> str | None:
    """Why ``url``'s host, an IPv4 address written other than as four decimal numbers
    (``127.1``, ``2130706433``, ``0177.0.0.1``), cannot be sent to, or None: the
    resolver reads it as an address, the HTTP client refuses every request to it."""
    host = urlsplit(url).hostname or ""
    if not host or ":" in host:
        return None
    if host.replace(".", "").isdigit():  # an address to the HTTP client (aiohttp's rule)
        canonical = _canonical_ipv4(host)
    else:
        try:
            socket.inet_aton(host)  # 0x7f.1: an address to the resolver
        except OSError:
            return None  # a name
        canonical = False
    if canonical:
        return None
    return (f"the host {quoted(host)} is an IPv4 address the HTTP client does not take: "
            "write it as four decimal numbers from 0 to 255 (such as 127.0.0.1)")


def _canonical_ipv4(host: str) -> bool:
    """Whether the HTTP client takes ``host``, all digits and dots, as an address."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return is_canonical_ipv4_address(host)


def _no_idna(host: str) -> bool:
    """Whether the ``idna`` codec, which names are resolved in, refuses ``host``."""
    try:
        host.encode("idna")
    except UnicodeError:
        return True
    return False


def url_has_credentials(url: str) -> bool:
    """Whether ``url`` carries user-info (``user:password@``), which the HTTP client
    sends as Basic authorization."""
    try:
        parsed = URL(url)
    except ValueError:
        return False
    return parsed.user is not None or parsed.password is not None


# what a header value may not hold (as the HTTP client refuses: RFC 9110 section 5.5)
FORBIDDEN_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# headers the HTTP client sets itself: they frame the body or run the connection, and one
# given by a hook (Content-Length: 5) would cut or break every request
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "content-encoding", "connection",
    "keep-alive", "proxy-connection", "upgrade", "te", "trailer", "expect"})
# a success regex is at most this long (it is compiled by every transport that sends)
MAX_REGEX_CHARS = 1_000
MIN_REQUEST_TIMEOUT_SEC = 0.01
MAX_REGEX_SIZE = 10_000  # items a new success_regex compiles to (regex_size): ~2.6 MB

_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_VERBOSE = re.compile(r"\(\?[a-wyzA-Z]*x")  # the verbose flag, inline


def _after_item(pattern: str, i: int) -> int:
    """Where the escape or set starting at ``i`` ends (each one item)."""
    n = len(pattern)
    if pattern[i] == "\\":
        i += 2
        if i < n and pattern[i - 1] in "pPNx" and pattern[i] == "{":  # \p{L}
            end = pattern.find("}", i)
            i = n if end < 0 else end + 1
        return i
    depth, i = 1, i + 1  # a set, nested ones too (regex's V1)
    if i < n and pattern[i] == "^":
        i += 1
    if i < n and pattern[i] == "]":
        i += 1
    while i < n and depth:
        if pattern[i] == "\\":
            i += 1
        elif pattern[i] in "[]":
            depth += 1 if pattern[i] == "[" else -1
        i += 1
    return i


def _group_opens(pattern: str, i: int) -> tuple[int, bool]:
    """Past the "(" at ``i`` and its (?:, (?=, (?P<name>... (no items): where its
    parts begin, and whether it is a group ((?i) is not)."""
    if not pattern.startswith("?", i + 1):
        return i + 1, True
    j = i + 2
    while j < len(pattern) and pattern[j] not in ":=!>)":
        j += 1
    return j + 1, not pattern.startswith(")", j)


def regex_size(pattern: str) -> int:
    """About how many items the ``regex`` module compiles ``pattern`` to: each atom
    one, a group the sum of its parts (alternatives added up), and an atom or group
    followed by a counted repeat written out its least count times ({0,m} and {,m}
    once: the module loops over those). Escapes and sets are one item each. An
    estimate from above, to refuse patterns whose compiled form would take gigabytes
    (a{10000000}: 12 characters)."""
    levels: list[int] = [0]  # items of each open group so far
    last = 0  # items of the atom or group just before
    verbose = _VERBOSE.search(pattern) is not None  # (?x): spaces and # comments
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if verbose and ch.isspace():
            i += 1
            continue
        if verbose and ch == "#":  # a comment, to the end of its line
            end = pattern.find("\n", i)
            i = len(pattern) if end < 0 else end + 1
            continue
        if ch in "\\[":
            # \X (a grapheme) compiles to about five items
            last = 5 if pattern.startswith("\\X", i) else 1
            i = _after_item(pattern, i)
            levels[-1] += last
            continue
        if ch == "(":
            i, group = _group_opens(pattern, i)
            if group:
                levels.append(0)
                last = 0
            continue
        if ch == ")" and len(levels) > 1:
            last = max(1, levels.pop())
            levels[-1] += last
        elif ch == "{" and (m := _REPEAT.match(pattern, i)) and (m.group(1) or m.group(2)):
            least = max(1, int(m.group(1) or 0))
            levels[-1] += last * (least - 1)
            last *= least
            i = m.end()
            continue
        elif ch == "|":  # a repeat right after it repeats nothing (a compile error)
            last = 0
        elif ch not in "?*+":
            last = 1
            levels[-1] += 1
        i += 1
    return sum(levels)


def _control_char(value: str) -> str | None:
    """The first character of ``value`` a header value may not hold, shown, or None."""
    found = FORBIDDEN_HEADER_CHARS.search(value)
    return repr(found.group()) if found else None


class HttpBatch(_Model):
    url: str
    max_batch_size: int = Field(DEFAULT_MAX_BATCH, gt=0, le=10_000)
    flush_timeout_sec: float = Field(DEFAULT_FLUSH_TIMEOUT_SEC, gt=0, le=3_600)
    success_regex: str = ""
    auth: Auth = Auth()
    headers: dict[str, str] = {}
    request_timeout_sec: float | None = Field(None, gt=0, le=600)

    _check_url = field_validator("url")(classmethod(lambda cls, v: _check_http_url(v)))

    @field_validator("url")
    @classmethod
    def _canonical_address(cls, value: str, info: ValidationInfo) -> str:
        if not _stored(info) and (problem := noncanonical_ipv4(value)):
            raise ValueError(problem)
        return value

    @field_validator("request_timeout_sec")
    @classmethod
    def _timeout_can_pass(cls, value: float | None, info: ValidationInfo) -> float | None:
        # 5e-324 is above 0, and every request would time out before it was sent
        if value is not None and value < MIN_REQUEST_TIMEOUT_SEC and not _stored(info):
            raise ValueError(f"{value:g} s: at least {MIN_REQUEST_TIMEOUT_SEC:g} s (no "
                             "request is answered sooner)")
        return value

    @field_validator("url")
    @classmethod
    def _basic_credentials(cls, value: str, info: ValidationInfo) -> str:
        """User-info the HTTP client can send as Basic authorization: a user name
        without ":", both in Latin-1 (what the client encodes them in); else every
        request fails. Neither is quoted back. Stored hooks keep loading (``_stored``):
        their requests fail, each naming why."""
        if _stored(info) or not url_has_credentials(value):
            return value
        parsed = URL(value)
        user, password = parsed.user or "", parsed.password or ""
        if ":" in user:
            raise ValueError("the user name of the URL's user-info may not hold ':' (Basic "
                             "authorization separates user and password by it)")
        try:
            f"{user}:{password}".encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("the URL's user name and password are sent as Basic "
                             "authorization, in Latin-1: a character beyond it (percent-"
                             "encoded UTF-8 such as %E2%82%AC) cannot be sent; use auth "
                             "with kind bearer, or an Authorization header") from None
        return value

    @field_validator("success_regex")
    @classmethod
    def _regex_compiles(cls, value: str, info: ValidationInfo) -> str:
        """The ``regex`` module's syntax (a superset of ``re``'s), as the HTTP transport
        matches it (with a time budget, see ``engine.transports.http``)."""
        if len(value) > MAX_REGEX_CHARS and not _stored(info):
            raise ValueError(f"regex of {len(value)} characters: at most {MAX_REGEX_CHARS}")
        # compiled, a counted repeat is written out its least number of times (about
        # 260 bytes each): a{10000000} took 2.6 GB in every process that loads the hook
        # (an estimate: a stored hook is not refused on it, since one stored hook that
        # no longer validates stops every partition)
        if not _stored(info) and (size := regex_size(value)) > MAX_REGEX_SIZE:
            raise ValueError(f"regex {value[:100]!r}: its counted repeats ({{n}}, {{n,}}, "
                             f"{{n,m}}) write it out to about {size} items when compiled: at "
                             f"most {MAX_REGEX_SIZE}; use a smaller least count, or * and +")
        try:
            regex.compile(value)
        except MemoryError:
            raise ValueError(f"regex {value[:100]!r} is too large once compiled") from None
        except (regex.error, OverflowError, ValueError) as exc:
            raise ValueError(f"regex {value[:100]!r} does not compile: {exc}") from None
        except RecursionError:
            raise ValueError(f"regex {value[:100]!r} does not compile: its groups nest too "
                             "deeply") from None
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name, val in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"header name {quoted(name)} is not a valid HTTP token")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {quoted(name)} is set by the HTTP client for each "
                                 "request (it frames the body or runs the connection)")
            if name.lower() == "content-type" and not _stored(info) \
                    and val.partition(";")[0].strip().lower() != "application/json":
                raise ValueError(f"header {quoted(name)}: every batch is JSON: the media type "
                                 f"must be application/json (parameters such as "
                                 f"charset=utf-8 may follow), not {val[:100]!r}")
            if "\n" in val or "\r" in val:
                raise ValueError(f"header {quoted(name)}: value holds a line break")
            char = _control_char(val)
            if char:
                raise ValueError(f"header {quoted(name)}: value holds the control character "
                                 f"{char}; a header value may hold none but tab")
        return value

    @model_validator(mode="after")
    def _one_authorization(self) -> HttpBatch:
        """The HTTP client sends one Authorization: from ``auth``, from the URL's
        user-info or from ``headers``; given two ways, it refuses every request."""
        ways = [way for way, given in (
            (f"auth kind {self.auth.kind}", self.auth.kind != "none"),
            ("user:password@ in the URL", url_has_credentials(self.url)),
            ("an Authorization header", any(k.lower() == "authorization"
                                            for k in self.headers))) if given]
        if len(ways) > 1:
            raise ValueError(f"authorization given twice ({' and '.join(ways)}): give "
                             "one of them")
        return self


AMQPS_PORT = 5671  # a TLS broker's port when the hook names none


class _Broker(_Model):
    host: str = Field(min_length=1)
    port: int = Field(5672, gt=0, lt=65536)  # AMQPS_PORT with tls
    user: str = "guest"
    password: SecretStr = SecretStr("guest")
    vhost: str = "/"
    # amqps: TLS, the broker's certificate checked against the system's CAs (or
    # tls_cafile's) and its name against host; the port is AMQPS_PORT only when the
    # hook gives none (a hook read back shows its port: turning tls on there keeps it)
    tls: bool = False
    tls_cafile: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tls") is True and "port" not in data:
            return {**data, "port": AMQPS_PORT}
        return data

    @field_validator("tls_cafile")
    @classmethod
    def _cafile_with_tls(cls, value: str | None, info: ValidationInfo) -> str | None:
        # (a tls that is itself invalid is reported on its own)
        if value is not None and "tls" in info.data and info.data["tls"] is not True:
            raise ValueError("is only used with tls: true")
        return value

    # a host that is no name or address, a vhost with a control character: either
    # would fail every delivery, and only at delivery, after every retry
    @field_validator("host")
    @classmethod
    def _broker_host(cls, value: str, info: ValidationInfo) -> str:
        try:
            ipaddress.ip_address(value.strip("[]"))
            return value.strip("[]")  # an IPv6 address as a URL writes it: the address
        except ValueError:
            pass
        if _WHITESPACE_OR_CONTROL.search(value) or any(c in value for c in "/:@?#[]"):
            raise ValueError("expected a host name or an IP address (no port, no amqp:// "
                             "URL, no whitespace or control characters)")
        if not _stored(info) and (problem := broker_name_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("user", "password")
    @classmethod
    def _not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        # the client logs an empty user or password in as guest (its default)
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text == "" and not _stored(info):
            raise ValueError("empty: the client would log in as guest instead; leave it "
                             "out for guest")
        return value

    @field_validator("vhost")
    @classmethod
    def _vhost(cls, value: str, info: ValidationInfo) -> str:
        if re.search(r"[\x00-\x1f\x7f]", value):
            raise ValueError("holds a control character")
        if not _stored(info) and (problem := vhost_problem(value)):
            raise ValueError(problem)
        if not _stored(info) and value == "":  # (a stored one goes on reaching "/")
            raise ValueError("an empty vhost name would reach the broker as the default "
                             "\"/\"; give \"/\"")
        return value


def vhost_problem(vhost: str) -> str | None:
    """Why ``vhost`` would reach the broker as another name, or None: the connection
    URL's path normalises "." and ".." segments away (``x/../y`` is ``y``, ``..`` the
    default ``/``), and the client reads "%2F" back as "/"."""
    if any(segment in (".", "..") for segment in vhost.split("/")):
        return "a vhost name with a \".\" or \"..\" segment would reach the broker as another name"
    if "%2F" in vhost:
        return "a vhost name holding \"%2F\" would reach the broker with \"/\" for it"
    return None


def broker_name_problem(host: str) -> str | None:
    """Why a broker client could never connect to the host name ``host`` (no IP
    address), or None: the AMQP client builds a URL of it with yarl, and names are
    resolved IDNA-encoded (labels of 1 to 63 characters), so either failing would
    fail every delivery, and only at delivery, after every retry."""
    try:
        URL.build(scheme="amqp", host=host).host  # noqa: B018 (decoded: may fail)
    except ValueError as exc:  # UnicodeError too
        return f"not a valid host name ({exc})"
    return f"not a valid host name: {LABELS}" if _no_idna(host) else None


def _amqp_name(value: str) -> str:
    """An AMQP short string: at most 255 bytes once UTF-8 encoded."""
    size = len(value.encode("utf-8"))
    if size > 255:
        raise ValueError(f"is {size} bytes long in UTF-8, AMQP allows at most 255")
    return value


AmqpName = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_amqp_name)]


class RabbitQueue(_Broker):
    queue: AmqpName


class RabbitExchange(_Broker):
    exchange: AmqpName
    type: Literal["direct", "topic"] = "direct"
    durable: bool = True
    auto_delete: bool = False


class Kafka(_Model):
    bootstrap_servers: list[str] = Field(min_length=1)
    topic: str = Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    # list_event -> "<list_id>.<event_type>"; profile_id; none -> no key
    key: Literal["list_event", "profile_id", "none"] = "list_event"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    tls: bool = False
    tls_cafile: str | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for server in value:
            host, _, port = server.rpartition(":")
            # ASCII digits: str.isdigit() takes "²", which int() does not
            if not host or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
                raise ValueError(f"{quoted(server)} is not host:port (a port from 1 to 65535)")
            if _stored(info):
                continue
            # a listener URL or a comma-separated bootstrap.servers, as Kafka configs
            # write them, would fail every delivery (a host named "PLAINTEXT://h")
            if "://" in server:
                raise ValueError(f"{quoted(server)} is not host:port: no scheme (the "
                                 "listener's protocol is set by tls and sasl_mechanism)")
            if "," in server:
                raise ValueError(f"{quoted(server)} is not host:port: one server per list "
                                 "item")
            bracketed = host.startswith("[") and host.endswith("]")
            bare = host[1:-1] if bracketed else host
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                if _WHITESPACE_OR_CONTROL.search(host) or any(c in host for c in "/:@?#[]"):
                    raise ValueError(f"{quoted(server)} is not host:port: expected a host "
                                     "name or an IP address before the port") from None
                if problem := broker_name_problem(host):
                    raise ValueError(f"{quoted(server)}: the host is {problem}") from None
            else:
                if ":" in bare and not bracketed:  # the client reads it all as the address
                    raise ValueError(f"{quoted(server)} is not host:port: an IPv6 address "
                                     f"is written in brackets, [{bare}]:{port}")
        return value

    @field_validator("topic")
    @classmethod
    def _topic_name(cls, value: str) -> str:
        if value in (".", ".."):
            raise ValueError(f"{value!r} is not a topic name Kafka allows")
        return value

    @model_validator(mode="after")
    def _sasl_complete(self, info: ValidationInfo) -> Kafka:
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"SASL {self.sasl_mechanism} needs sasl_username and sasl_password")
        if _stored(info):
            return self
        # settings that would be stored and never used: the connection would go
        # without the TLS or the login the hook's author meant
        if self.tls_cafile == "":
            raise ValueError("tls_cafile is empty: omit it to trust the system's CAs")
        if self.tls_cafile is not None and not self.tls:
            raise ValueError("tls_cafile is only used with tls: true")
        if not self.sasl_mechanism and (self.sasl_username or self.sasl_password):
            raise ValueError("sasl_username and sasl_password are only used with a "
                             "sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        return self


class Target(_Model):
    """Exactly one of the four transports."""

    http_batch: HttpBatch | None = None
    rabbitmq_queue: RabbitQueue | None = None
    rabbitmq_exchange: RabbitExchange | None = None
    kafka: Kafka | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        chosen = [k for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"exactly one of {', '.join(TARGET_KINDS)} must be set (got {got})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in TARGET_KINDS if getattr(self, k) is not None)

    @property
    def settings(self) -> HttpBatch | RabbitQueue | RabbitExchange | Kafka:
        return getattr(self, self.kind)


class Hook(_Model):
    id: Id | None = None
    name: str = Field(min_length=1, max_length=255)
    active: bool = False
    account_id: Id
    database: Literal["all"] | Id = "all"
    # the event codes captured; none (the platform's default) captures nothing
    actions: list[str] = []
    filters: Filters = Filters()
    custom_data: CustomData = CustomData()
    send_content: bool = False
    target: Target

    @field_validator("target")
    @classmethod
    def _routable(cls, value: Target, info: ValidationInfo) -> Target:
        """An exchange hook's codes fit its routing keys (stored ones keep loading)."""
        actions = info.data.get("actions") or []
        if value.rabbitmq_exchange is not None and not _stored(info):
            long = [c for c in actions if len(c.encode("utf-8")) > MAX_CODE_BYTES]
            if long:
                raise ValueError(f"rabbitmq_exchange: the action {quoted(long[0])} is "
                                 f"{len(long[0].encode())} bytes long, and a routing key "
                                 f"<list_id>.<code> fits AMQP's 255 bytes only with a code "
                                 f"of at most {MAX_CODE_BYTES} (UTF-8)")
        return value

    @field_validator("database", mode="before")
    @classmethod
    def _one_database(cls, value: Any) -> Any:
        # one reason for the field, not one per member of the union (whose names,
        # such as "literal['all']", would show in the field's path)
        if value == "all" or (type(value) is int and 0 <= value <= 2**63 - 1):
            return value
        raise ValueError(f'expected "all" or a database id (an integer from 0 to '
                         f'{2**63 - 1}), got {_shown_value(value)}')

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, value: list[str], info: Any) -> list[str]:
        catalogue: EventCatalogue | None = (info.context or {}).get("catalogue")
        if catalogue is None:  # not `or`: an empty catalogue is falsy
            catalogue = load_catalogue()
        unknown = list(dict.fromkeys(code for code in value if code not in catalogue))
        if unknown:
            named = ", ".join(map(quoted, unknown[:SHOWN_CODES]))
            more = len(unknown) - SHOWN_CODES
            raise ValueError(
                f"unknown event code(s) {named}{f' and {more} more' if more > 0 else ''}; "
                "known codes: " + ", ".join(catalogue.codes())
            )
        return list(dict.fromkeys(value))

    def display(self) -> dict[str, Any]:
        """JSON-ready dict with every secret masked."""
        return self.model_dump(mode="json")

    def to_storage(self) -> dict[str, Any]:
        """JSON-ready dict with secrets in clear text, for the hook registry only."""
        return self.model_dump(mode="json", context={"reveal": True})

    def secrets(self) -> list[str]:
        """Every value ``display()`` masks, in clear: what a text about this hook shown
        to anyone must not hold (see ``scrub``)."""
        return _revealed(self.to_storage(), self.display())


def _revealed(clear: Any, shown: Any, name: str = "") -> list[str]:
    if isinstance(clear, dict) and isinstance(shown, dict):
        return [s for key, value in clear.items() for s in _revealed(value, shown.get(key), key)]
    if not isinstance(clear, str) or clear == shown:
        return []
    return url_secrets(clear) if name in URL_FIELDS else [clear]


def field_path(loc: tuple[Any, ...]) -> str:
    """The dotted path of a validation error's location (``target.http_batch.url``),
    printable: a dict key that is not valid UTF-8 shows its lone surrogate escaped; a
    key longer than SHOWN_CHARS is cut (then "…")."""
    return ".".join(_key_shown(str(p)) for p in loc
                    if not str(p).startswith("function-")) or "hook"


def _key_shown(key: str) -> str:
    key = key if len(key) <= SHOWN_CHARS else key[:SHOWN_CHARS] + "…"
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _shown_value(value: Any) -> str:
    """A wrong value, shown short: text quoted (cut), a number as written (a long one
    by its kind), anything else by its JSON kind."""
    if isinstance(value, str):
        return quoted(value)
    if type(value) in (int, float) and len(repr(value)) <= 30:
        return repr(value)
    return {bool: "a boolean", list: "an array", dict: "an object", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """(field path, reason) of each error of a hook's validation: locations and messages
    only, never the input values (one may be a secret)."""
    return [(field_path(e["loc"]), "not valid UTF-8 (a lone surrogate)"
             if e["type"] == "string_unicode" else e["msg"].removeprefix("Value error, "))
            for e in exc.errors(include_url=False, include_input=False)]


# --- secrets sent back as read ----------------------------------------------------


def masked_secrets(model: BaseModel, path: str = "") -> list[str]:
    """Fields where a new hook holds the mask itself as a secret: a secret, a URL
    password or credential query value, a credential header's value."""
    found = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        secret = value.get_secret_value() if isinstance(value, SecretStr) else None
        in_url = url_secrets(value) if name in URL_FIELDS and isinstance(value, str) else []
        if secret == MASK or MASK in in_url:
            found.append(path + name)
        elif name == "headers" and isinstance(value, dict):
            found += [f"{path}{name}.{k}" for k, v in value.items()
                      if v == MASK and SENSITIVE_HEADER.search(k)]
        elif isinstance(value, BaseModel):
            found += masked_secrets(value, f"{path}{name}.")
    return found


def restore_secrets(new: dict[str, Any], stored: Hook) -> dict[str, Any]:
    """``new`` with every value that is exactly what a read of ``stored`` shows in
    place of a secret (``**********``, a URL with its password masked, headers with
    credential values masked) replaced by the stored value (the rest unchanged)."""
    return _restore(new, stored.display(), stored.to_storage())


def _restore(new: Any, shown: Any, clear: Any) -> Any:
    if not isinstance(new, dict) or not isinstance(shown, dict) or not isinstance(clear, dict):
        return new
    out = {}
    for key, value in new.items():
        if key in clear and key in shown and value == shown[key] != clear[key]:
            out[key] = clear[key]  # sent back as read: a redacted value, kept
        else:
            out[key] = _restore(value, shown.get(key), clear.get(key))
    return out


def destination(hook: Hook) -> tuple[Any, ...]:
    """Where a hook's secrets go: the target kind and, by kind, the origin (scheme,
    host, port) of the URL and of the OAuth2 token URL, the broker's host and port
    with its TLS settings, or the Kafka bootstrap servers with the TLS and SASL
    mechanism settings."""
    target = hook.target
    if target.http_batch is not None:
        http = target.http_batch
        return ("http_batch", _origin(http.url), _origin(http.auth.token_url or ""))
    broker = target.rabbitmq_queue or target.rabbitmq_exchange
    if broker is not None:  # turning TLS off would send the password in clear
        return (target.kind, broker.host.lower(), broker.port, broker.tls, broker.tls_cafile)
    kafka = target.kafka
    assert kafka is not None
    # and how the password travels: turning TLS off or SCRAM into PLAIN would send it
    # in clear to the same servers
    return ("kafka", tuple(sorted(s.lower() for s in kafka.bootstrap_servers)), kafka.tls,
            kafka.tls_cafile, kafka.sasl_mechanism)


def destination_hosts(hook: Hook) -> list[tuple[str, str]]:
    """(field, host) of each host the hook's target connects to, as written."""
    kind, target = hook.target.kind, hook.target.settings
    base = f"target.{kind}"
    if isinstance(target, HttpBatch):
        hosts = [(f"{base}.url", urlsplit(target.url).hostname or "")]
        if target.auth.kind == "oauth2" and target.auth.token_url:
            hosts.append((f"{base}.auth.token_url",
                          urlsplit(target.auth.token_url).hostname or ""))
        return hosts
    if isinstance(target, Kafka):
        return [(f"{base}.bootstrap_servers[{n}]", server.rpartition(":")[0].strip("[]"))
                for n, server in enumerate(target.bootstrap_servers)]
    return [(f"{base}.host", str(getattr(target, "host", "")))]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def changed_paths(before: Any, after: Any, path: str = "") -> list[str]:
    """Dotted paths where ``after`` differs from ``before`` (nested dicts)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [p for key in after for p in changed_paths(
            before.get(key), after[key], f"{path}.{key}" if path else str(key))]
    return [] if before == after else [path]


SHOWN_PROBLEMS = 20  # most problems of a hook its error's message names
MAX_PROBLEMS = 1000  # most problems of a hook its error lists


def parse_hook(data: dict[str, Any], catalogue: EventCatalogue | None = None,
               stored: bool = False) -> Hook:
    """Validate ``data`` into a Hook, or raise HookError naming each field and reason.
    ``stored``: a hook read back from the registry, which a rule added after it was
    saved must not make invalid (see ``_stored``)."""
    try:
        return Hook.model_validate(data, context={"catalogue": catalogue, "stored": stored})
    except ValidationError as exc:
        found = validation_problems(exc)
    # raised outside the except block: no __context__ holding the ValidationError, whose
    # input_value reprs can carry passwords and tokens in clear text
    raise HookError(problems_message(found), found[:MAX_PROBLEMS])


def problems_message(found: list[tuple[str, str]], total: int | None = None) -> str:
    """The message of a hook's validation problems (``total`` of them: those ``found``
    unless given): a body of many unknown keys names the first SHOWN_PROBLEMS of them
    (its issues the first MAX_PROBLEMS)."""
    total = len(found) if total is None else total
    more = f"; and {total - SHOWN_PROBLEMS} more" if total > SHOWN_PROBLEMS else ""
    return "invalid hook: " + "; ".join(f"{field}: {reason}" for field, reason
                                        in found[:SHOWN_PROBLEMS]) + more



# --- secrets in texts shown ------------------------------------------------------------

SECRET_FIELDS = frozenset({"token", "client_secret", "password", "sasl_password"})


def sent_secrets(data: Any, name: str = "") -> list[str]:
    """Every value of ``data`` (hook settings as JSON, valid or not) that a read would
    mask, in each form a text about it may hold (``secret_forms``), and for a URL's
    credentials also percent-decoded and as the Basic authorization the HTTP client
    makes of them. A URL is read leniently (its user-info is whatever precedes its
    last "@"), so a password that breaks the URL counts too. Walked without recursion:
    a body nested however deeply is searched (and refused by validation afterwards),
    never a RecursionError."""
    found: list[str] = []
    stack: list[tuple[Any, str]] = [(data, name)]
    while stack:
        value, key = stack.pop()
        if isinstance(value, dict):
            stack += [(v, str(k)) for k, v in reversed(value.items())]
            if key == "headers":
                found += [v for k, v in value.items()
                          if isinstance(v, str) and SENSITIVE_HEADER.search(str(k))]
        elif isinstance(value, list):
            stack += [(item, key) for item in reversed(value)]
        elif not isinstance(value, str):
            continue
        elif key in URL_FIELDS:
            found += _url_credentials(value)
        elif key in SECRET_FIELDS:
            found.append(value)
    return list(dict.fromkeys(f for s in dict.fromkeys(found) if s for f in secret_forms(s)))


# what HTML escapers write for the quotes: html.escape (&quot; &#x27;), markupsafe and
# Go (&#34; &#39;), PHP's htmlspecialchars (&quot; &#039;)
_HTML_QUOTES = (("&quot;", "&#x27;"), ("&#34;", "&#39;"), ("&quot;", "&#039;"))
# what Go's encoding/json escapes besides JSON's own (HTML-safe output, its default)
_GO_JSON = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                          "\u2028": "\\u2028", "\u2029": "\\u2029"})


def secret_forms(secret: str) -> list[str]:
    """``secret`` in each form a destination may echo it (its answer is shown in test
    event answers and dead letters, and matched by a success regex): as given;
    JSON-escaped with and without \\u escapes, each also with "/" written "\\/" (PHP's
    json_encode), and as Go's encoding/json writes it (<, >, & as \\u003c...);
    percent-encoded (every reserved character, "+" for a space, and as JavaScript's
    encodeURIComponent); HTML-escaped (&, <, > only, and with each common spelling of
    the quotes). At most 13 forms, and one alone for a secret of letters, digits and
    ``- . _ ~`` (the others are the same, dropped): masking costs a small multiple of
    what it cost with the secrets as given."""
    forms = [secret]
    for ensure_ascii in (False, True):
        escaped = json.dumps(secret, ensure_ascii=ensure_ascii)[1:-1]
        forms += [escaped, escaped.replace("/", "\\/")]
    forms.append(forms[1].translate(_GO_JSON))
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate: no UTF-8 to encode
        forms += [quote(secret, safe=""), quote_plus(secret, safe=""),
                  quote(secret, safe="!'()*")]
    amp = html.escape(secret, quote=False)
    forms.append(amp)
    if '"' in secret or "'" in secret:
        forms += [amp.replace('"', dq).replace("'", sq) for dq, sq in _HTML_QUOTES]
    return list(dict.fromkeys(forms))


def _url_credentials(url: str) -> list[str]:
    found: list[str] = []
    with contextlib.suppress(ValueError):  # urlsplit refuses its host part
        found += url_secrets(url)
    authority = url.partition("://")[2] or url
    user, colon, password = authority.rpartition("@")[0].partition(":")
    if colon and password:
        clear = unquote(password)
        found += [password, clear, _basic(f"{unquote(user)}:{clear}")]
    elif user:  # a user name alone or with an empty password: sent as Basic "user:"
        found += [user, unquote(user), _basic(f"{unquote(user)}:")]
    return found


def _basic(credentials: str) -> str:
    """The Basic authorization form of ``user:password``. A lone surrogate in it (a
    hook refused for it, whose error texts are still masked) is kept as its bytes."""
    return base64.b64encode(credentials.encode("utf-8", "surrogatepass")).decode()


def hook_secrets(hook: Hook) -> list[str]:
    """``hook.secrets()`` in every form ``sent_secrets`` finds."""
    return list(dict.fromkeys([*hook.secrets(), *sent_secrets(hook.to_storage())]))
