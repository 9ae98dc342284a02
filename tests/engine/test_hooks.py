"""Hook model: valid hooks of every target kind, defaults, every rejection, secret hygiene."""

from __future__ import annotations

import base64
import copy
import json
import re
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from engine.catalogue import EventCatalogue, builtin_catalogue
from engine.errors import HookError, HookrayError, quoted
from engine.hooks import (
    DEFAULT_FLUSH_TIMEOUT_SEC,
    DEFAULT_MAX_BATCH,
    FILTER_KINDS,
    TARGET_KINDS,
    Auth,
    Hook,
    HttpBatch,
    Kafka,
    RabbitExchange,
    RabbitQueue,
    hook_secrets,
    mask_url,
    masked_secrets,
    parse_hook,
    restore_secrets,
    url_secrets,
)

TOKEN = "tok-SECRET-bearer-1f2e"
CLIENT_SECRET = "cs-SECRET-oauth-9a8b"
DATABASE = 'database: expected "all" or a database id (an integer from 0 to ' \
    f"{2**63 - 1}), got "
RABBIT_PASSWORD = "rb-SECRET-pw-77"
KAFKA_PASSWORD = "kf-SECRET-pw-55"
HEADER_SECRET = "hd-SECRET-key-31"
URL_PASSWORD = "url-SECRET-pw-12"
SECRETS = (TOKEN, CLIENT_SECRET, RABBIT_PASSWORD, KAFKA_PASSWORD, HEADER_SECRET, URL_PASSWORD)

HTTP_NONE = {"http_batch": {"url": "https://receiver.example.com/hooks"}}
HTTP_BEARER = {
    "http_batch": {
        "url": "https://receiver.example.com:8443/hooks?src=altcraft",
        "auth": {"kind": "bearer", "token": TOKEN},
        "headers": {"X-Source": "hookray", "X-Tenant_ID.v2": "23"},
    }
}
HTTP_OAUTH2 = {
    "http_batch": {
        "url": "http://10.0.0.5:8080/in",
        "auth": {
            "kind": "oauth2",
            "token_url": "https://auth.example.com/oauth/token",
            "client_id": "hookray",
            "client_secret": CLIENT_SECRET,
            "scope": "events:write",
        },
        "headers": {"X-Extra": "1"},
    }
}
RABBIT_QUEUE = {
    "rabbitmq_queue": {
        "host": "rabbit.internal", "port": 5673, "user": "hooks", "password": RABBIT_PASSWORD,
        "vhost": "/marketing", "queue": "altcraft.events",
    }
}
RABBIT_EXCHANGE = {
    "rabbitmq_exchange": {
        "host": "rabbit.internal", "user": "hooks", "password": RABBIT_PASSWORD,
        "exchange": "altcraft", "type": "topic",
    }
}
KAFKA = {
    "kafka": {
        "bootstrap_servers": ["kafka-1:9092", "kafka-2.example.com:9093", "[::1]:9094"],
        "topic": "altcraft.events_v1",
        "key": "profile_id",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "hooks",
        "sasl_password": KAFKA_PASSWORD,
        "tls": True,
        "tls_cafile": "/etc/ssl/kafka-ca.pem",
    }
}
HTTP_HEADERS = {"http_batch": {"url": "https://receiver.example.com/hooks",
                                "headers": {"X-Api-Key": HEADER_SECRET, "X-Tenant": "acme"}}}
HTTP_URL_PASSWORD = {"http_batch": {"url": f"https://crm:{URL_PASSWORD}@receiver.example.com/h"}}
SECRET_TARGETS = {
    "http_header": (HTTP_HEADERS, HEADER_SECRET),
    "http_url_password": (HTTP_URL_PASSWORD, URL_PASSWORD),
    # a user name alone in the URL is a token (sent as Basic auth with no password)
    "http_url_user_token": ({"http_batch": {"url": "https://utok-SECRET@r.example.com/h"}},
                            "utok-SECRET"),
    "http_bearer": (HTTP_BEARER, TOKEN),
    "http_oauth2": (HTTP_OAUTH2, CLIENT_SECRET),
    "rabbitmq_queue": (RABBIT_QUEUE, RABBIT_PASSWORD),
    "rabbitmq_exchange": (RABBIT_EXCHANGE, RABBIT_PASSWORD),
    "kafka_sasl": (KAFKA, KAFKA_PASSWORD),
}


def hook_data(target: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "to CRM",
        "account_id": 23,
        "actions": ["deliv", "click"],
        "target": copy.deepcopy(target if target is not None else HTTP_NONE),
    }
    data.update(fields)
    return data


def hook_error(data: dict[str, Any], catalogue: EventCatalogue | None = None) -> str:
    with pytest.raises(HookError) as info:
        parse_hook(data, catalogue=catalogue)
    message = str(info.value)
    assert message.startswith("invalid hook: ")
    # the message lists each (field, reason) of the error's issues, in order
    assert message == "invalid hook: " + "; ".join(f"{f}: {r}" for f, r in info.value.issues)
    return message


def test_each_problem_is_an_issue_of_its_own_even_with_a_semicolon_in_its_reason() -> None:
    data = hook_data(name="", actions=["nope"])
    data["target"]["timeout"] = -1
    with pytest.raises(HookError) as info:
        parse_hook(data)
    fields = [field for field, _ in info.value.issues]
    assert fields == sorted(set(fields), key=fields.index) and len(fields) == 3, fields
    assert {"name", "actions"} <= set(fields) and any("timeout" in f for f in fields)
    assert "; known codes: " in dict(info.value.issues)["actions"]


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def drop_path(data: dict[str, Any], path: str) -> dict[str, Any]:
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    del node[last]
    return data


# --- valid hooks ---------------------------------------------------------------------------


def test_minimal_hook_defaults() -> None:
    hook = parse_hook(hook_data())
    assert hook.id is None
    assert hook.name == "to CRM"
    assert hook.account_id == 23
    assert hook.active is False
    assert hook.database == "all"
    assert hook.actions == ["deliv", "click"]
    assert hook.send_content is False
    assert hook.filters.kinds() == {kind: [] for kind in FILTER_KINDS}
    assert (hook.custom_data.fields, hook.custom_data.template, hook.custom_data.pairs) == (
        [], {}, {}
    )
    assert hook.target.kind == "http_batch"
    http = hook.target.settings
    assert isinstance(http, HttpBatch)
    assert http is hook.target.http_batch
    assert http.url == "https://receiver.example.com/hooks"
    assert http.max_batch_size == DEFAULT_MAX_BATCH == 100
    assert http.flush_timeout_sec == DEFAULT_FLUSH_TIMEOUT_SEC == 10.0
    assert http.success_regex == ""
    assert http.auth.kind == "none"
    assert http.auth.token is None
    assert http.headers == {}
    assert http.request_timeout_sec is None


def test_full_hook_fields() -> None:
    hook = parse_hook(
        hook_data(
            HTTP_NONE,
            id=7,
            active=True,
            database=111,
            actions=["click", "uclick", "click", "pixel"],
            filters={"resources": [3], "campaigns": [973, 974], "templates": [17],
                     "segments": [4, 5], "pixels": [9]},
            custom_data={"fields": ["email", "phone"], "template": {"src": "{{campaign_name}}"},
                         "pairs": {"id": "{{uuid}}", "eventTime": "{{event_date_ymd}}"}},
            send_content=True,
        )
    )
    assert hook.id == 7
    assert hook.active is True
    assert hook.database == 111
    assert hook.actions == ["click", "uclick", "pixel"]  # duplicates dropped, order kept
    assert hook.filters.kinds() == {
        "resources": [3], "campaigns": [973, 974], "templates": [17], "segments": [4, 5],
        "pixels": [9],
    }
    assert hook.custom_data.fields == ["email", "phone"]
    assert hook.custom_data.template == {"src": "{{campaign_name}}"}
    assert hook.custom_data.pairs["id"] == "{{uuid}}"
    assert hook.send_content is True


def test_http_batch_with_bearer_and_headers() -> None:
    http = parse_hook(hook_data(HTTP_BEARER)).target.http_batch
    assert http is not None
    assert http.auth.kind == "bearer"
    assert isinstance(http.auth.token, SecretStr)
    assert http.auth.token.get_secret_value() == TOKEN
    assert http.headers == {"X-Source": "hookray", "X-Tenant_ID.v2": "23"}
    assert http.url == "https://receiver.example.com:8443/hooks?src=altcraft"


def test_http_batch_with_oauth2() -> None:
    auth = parse_hook(hook_data(HTTP_OAUTH2)).target.settings.auth  # type: ignore[union-attr]
    assert isinstance(auth, Auth)
    assert auth.kind == "oauth2"
    assert auth.token_url == "https://auth.example.com/oauth/token"
    assert auth.client_id == "hookray"
    assert auth.client_secret is not None
    assert auth.client_secret.get_secret_value() == CLIENT_SECRET
    assert auth.scope == "events:write"


def test_http_batch_tuning() -> None:
    target = {"http_batch": {"url": "https://r.example/x", "max_batch_size": 10_000,
                             "flush_timeout_sec": 0.25, "success_regex": ".*OK.*",
                             "request_timeout_sec": 30}}
    http = parse_hook(hook_data(target)).target.http_batch
    assert http is not None
    assert (http.max_batch_size, http.flush_timeout_sec, http.request_timeout_sec) == (
        10_000, 0.25, 30.0
    )
    assert http.success_regex == ".*OK.*"


@pytest.mark.parametrize("url", [
    "https://u:p@r.example/x",  # user-info alone: the HTTP client's Basic authorization
    "https://ex\u00e4mple.com/x", "https://r.example./x", f"https://{'a' * 63}.example/x",
    "http://[::1]:8080/x", "http://10.0.0.5/x"])
def test_urls_the_http_client_can_send_to(url: str) -> None:
    assert parse_hook(hook_data({"http_batch": {"url": url}})).target.http_batch.url == url


def test_a_header_value_may_hold_a_tab_and_any_character_not_a_control() -> None:
    headers = {"X-A": "a\tb", "X-B": "caf\u00e9 \u2028 \x85",
               "Content-Type": "Application/JSON; charset=utf-8"}
    hook = parse_hook(hook_data({"http_batch": {"url": "https://r.example/x",
                                                "headers": headers}}))
    assert hook.target.http_batch.headers == headers


def test_rabbitmq_queue() -> None:
    hook = parse_hook(hook_data(RABBIT_QUEUE))
    assert hook.target.kind == "rabbitmq_queue"
    queue = hook.target.settings
    assert isinstance(queue, RabbitQueue)
    assert (queue.host, queue.port, queue.user, queue.vhost, queue.queue) == (
        "rabbit.internal", 5673, "hooks", "/marketing", "altcraft.events"
    )
    assert queue.password.get_secret_value() == RABBIT_PASSWORD


def test_rabbitmq_queue_defaults() -> None:
    queue = parse_hook(hook_data({"rabbitmq_queue": {"host": "r", "queue": "q"}})).target.settings
    assert isinstance(queue, RabbitQueue)
    assert (queue.port, queue.user, queue.vhost) == (5672, "guest", "/")
    assert queue.password.get_secret_value() == "guest"


@pytest.mark.parametrize("kind", ["rabbitmq_queue", "rabbitmq_exchange"])
def test_rabbitmq_tls_takes_the_amqps_port_unless_one_is_given(kind: str) -> None:
    name = {"queue": "q"} if kind == "rabbitmq_queue" else {"exchange": "x"}
    plain = parse_hook(hook_data({kind: {"host": "r", **name}})).target.settings
    tls = parse_hook(hook_data({kind: {"host": "r", "tls": True, **name}})).target.settings
    given = parse_hook(hook_data({kind: {"host": "r", "tls": True, "port": 5672,
                                         "tls_cafile": "/etc/ca.pem", **name}})).target.settings
    assert isinstance(plain, RabbitQueue | RabbitExchange)
    assert isinstance(tls, RabbitQueue | RabbitExchange)
    assert isinstance(given, RabbitQueue | RabbitExchange)
    assert (plain.tls, plain.port, plain.tls_cafile) == (False, 5672, None)
    assert (tls.tls, tls.port, tls.tls_cafile) == (True, 5671, None)
    assert (given.tls, given.port, given.tls_cafile) == (True, 5672, "/etc/ca.pem")
    stored = parse_hook(hook_data({kind: {"host": "r", "tls": True, **name}})).to_storage()
    assert stored["target"][kind]["port"] == 5671  # read back as it was made
    with pytest.raises(HookError) as err:
        parse_hook(hook_data({kind: {"host": "r", "tls_cafile": "/etc/ca.pem", **name}}))
    assert err.value.issues == [(f"target.{kind}.tls_cafile", "is only used with tls: true")]
    with pytest.raises(HookError) as err:  # a tls that is itself wrong: said once
        parse_hook(hook_data({kind: {"host": "r", "tls": "yes", "tls_cafile": "/ca.pem",
                                     **name}}))
    assert [field for field, _ in err.value.issues] == [f"target.{kind}.tls"]


@pytest.mark.parametrize("exchange_type", ["direct", "topic"])
def test_rabbitmq_exchange_types_and_defaults(exchange_type: str) -> None:
    target = {"rabbitmq_exchange": {"host": "r", "exchange": "ex", "type": exchange_type}}
    hook = parse_hook(hook_data(target))
    assert hook.target.kind == "rabbitmq_exchange"
    exchange = hook.target.settings
    assert isinstance(exchange, RabbitExchange)
    assert exchange.type == exchange_type
    assert exchange.durable is True
    assert exchange.auto_delete is False
    assert exchange.port == 5672


def test_rabbitmq_exchange_type_defaults_to_direct_and_flags_can_flip() -> None:
    target = {"rabbitmq_exchange": {"host": "r", "exchange": "ex", "durable": False,
                                    "auto_delete": True}}
    exchange = parse_hook(hook_data(target)).target.rabbitmq_exchange
    assert exchange is not None
    assert exchange.type == "direct"
    assert exchange.durable is False
    assert exchange.auto_delete is True


def test_kafka_full() -> None:
    hook = parse_hook(hook_data(KAFKA))
    assert hook.target.kind == "kafka"
    kafka = hook.target.settings
    assert isinstance(kafka, Kafka)
    assert kafka.bootstrap_servers == ["kafka-1:9092", "kafka-2.example.com:9093", "[::1]:9094"]
    assert kafka.topic == "altcraft.events_v1"
    assert kafka.key == "profile_id"
    assert kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.sasl_username == "hooks"
    assert kafka.sasl_password is not None
    assert kafka.sasl_password.get_secret_value() == KAFKA_PASSWORD
    assert kafka.tls is True
    assert kafka.tls_cafile == "/etc/ssl/kafka-ca.pem"


def test_kafka_defaults() -> None:
    kafka = parse_hook(
        hook_data({"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t"}})
    ).target.kafka
    assert kafka is not None
    assert kafka.key == "list_event"
    assert kafka.sasl_mechanism is None
    assert kafka.sasl_username is None
    assert kafka.sasl_password is None
    assert kafka.tls is False
    assert kafka.tls_cafile is None


@pytest.mark.parametrize("key", ["list_event", "profile_id", "none"])
def test_kafka_key_choice(key: str) -> None:
    target = {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", "key": key}}
    assert parse_hook(hook_data(target)).target.kafka.key == key  # type: ignore[union-attr]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("tls", [False, True])
def test_kafka_sasl_mechanisms_with_and_without_tls(mechanism: str, tls: bool) -> None:
    target = {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", "sasl_mechanism": mechanism,
                        "sasl_username": "u", "sasl_password": KAFKA_PASSWORD, "tls": tls}}
    kafka = parse_hook(hook_data(target)).target.kafka
    assert kafka is not None
    assert kafka.sasl_mechanism == mechanism
    assert kafka.tls is tls


@pytest.mark.parametrize("database", ["all", 0, 111])
def test_database_scope(database: Any) -> None:
    assert parse_hook(hook_data(database=database)).database == database


def test_target_kinds_constant() -> None:
    assert TARGET_KINDS == ("http_batch", "rabbitmq_queue", "rabbitmq_exchange", "kafka")
    assert FILTER_KINDS == ("resources", "campaigns", "templates", "segments", "pixels")


def test_hook_is_frozen() -> None:
    hook = parse_hook(hook_data())
    with pytest.raises(ValidationError, match="frozen"):
        hook.active = True  # type: ignore[misc]


def test_direct_construction_uses_the_builtin_catalogue() -> None:
    hook = Hook.model_validate(hook_data(actions=["pixel"]))
    assert hook.actions == ["pixel"]
    with pytest.raises(ValidationError, match="unknown event code"):
        Hook.model_validate(hook_data(actions=["promo_issued"]))


# --- rejections ----------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], dict[str, Any]]


def at(path: str, value: Any) -> Mutation:
    return lambda data: set_path(data, path, value)


def without(path: str) -> Mutation:
    return lambda data: drop_path(data, path)


REJECTIONS: list[tuple[str, Mutation, list[str]]] = [
    # event codes
    ("unknown event code", at("actions", ["click", "clik", "promo"]),
     ["actions: unknown event code(s) 'clik', 'promo'; known codes: send, reply, uopen",
      "undeliv_push, pixel"]),
    ("actions not a list", at("actions", "click"), ["actions: Input should be a valid list"]),
    # URL
    ("url scheme ftp", at("target.http_batch.url", "ftp://r.example/x"),
     ["target.http_batch.url: 'ftp://r.example/x' is not an http(s) URL with a host"]),
    ("url without scheme", at("target.http_batch.url", "r.example/x"),
     ["target.http_batch.url: 'r.example/x' is not an http(s) URL with a host"]),
    ("url without host", at("target.http_batch.url", "https:///x"),
     ["target.http_batch.url: 'https:///x' is not an http(s) URL with a host"]),
    ("url empty", at("target.http_batch.url", ""),
     ["target.http_batch.url: '' is not an http(s) URL with a host"]),
    ("url port too big", at("target.http_batch.url", "http://r.example:99999/x"),
     ["target.http_batch.url: 'http://r.example:99999/x' has an invalid port"]),
    ("url port not a number", at("target.http_batch.url", "http://r.example:http/x"),
     ["target.http_batch.url: 'http://r.example:http/x' has an invalid port"]),
    ("url port zero", at("target.http_batch.url", "http://r.example:0/x"),
     ["target.http_batch.url: 'http://r.example:0/x' has an invalid port"]),
    # a password holding "?", "/" or "#" cuts the URL short: it is never quoted
    ("url password with a question mark", at("target.http_batch.url",
                                              "http://crm:pw?SECRET@r.example/x"),
     ["target.http_batch.url: 'http://**********@r.example/x' has an invalid port"]),
    ("url password with a slash", at("target.http_batch.url",
                                     "https://crm:a/SECRET@r.example/x"),
     ["target.http_batch.url: 'https://**********@r.example/x' has an invalid port"]),
    # hosts the HTTP client can never send to (it resolves names IDNA-encoded)
    ("url host label over 63 characters",
     at("target.http_batch.url", f"https://{'a' * 64}.example.com/x"),
     [f"target.http_batch.url: 'https://{'a' * 64}.example.com/x': the host is not a valid "
      "domain name: each dot-separated label must be 1 to 63 characters long"]),
    ("url host with an empty label", at("target.http_batch.url", "https://r..example/x"),
     ["target.http_batch.url: 'https://r..example/x': the host is not a valid domain name"]),
    ("url host invalid once normalized", at("target.http_batch.url", "https://a\u2100.com/x"),
     ["target.http_batch.url: is not a valid URL: its host part cannot be parsed"]),
    ("url host with a zero-width space", at("target.http_batch.url", "https://a\u200b.com/x"),
     ["target.http_batch.url: 'https://a\\u200b.com/x': the host is not a valid domain name ("]),
    ("oauth2 token_url host label over 63 characters",
     at("target.http_batch.auth", {"kind": "oauth2", "token_url": f"https://{'t' * 64}.example/",
                                   "client_id": "c", "client_secret": "s"}),
     ["target.http_batch.auth: ", "the host is not a valid domain name"]),
    # HTTP tuning
    ("regex does not compile", at("target.http_batch.success_regex", "(OK"),
     ["target.http_batch.success_regex: regex '(OK' does not compile: missing ) at "
      "position 3"]),
    ("regex repeat count beyond 32 bits", at("target.http_batch.success_regex", "a{4294967295}"),
     ["target.http_batch.success_regex: regex 'a{4294967295}': its counted repeats ({n}, "
      "{n,}, {n,m}) write it out to about 4294967295 items when compiled: at most 10000"]),
    ("regex repeat count beyond 32 bits, least count 0",
     at("target.http_batch.success_regex", "a{0,4294967295}"),
     ["target.http_batch.success_regex: regex 'a{0,4294967295}' does not compile: repeat "
      "count too big"]),
    ("regex nested too deeply", at("target.http_batch.success_regex", "(" * 490 + ")" * 490),
     ["target.http_batch.success_regex: regex '((((", "does not compile: its groups nest "
      "too deeply"]),
    ("regex too long", at("target.http_batch.success_regex", "OK|" * 400),
     ["target.http_batch.success_regex: regex of 1200 characters: at most 1000"]),
    # 12 characters written out ten million times when compiled (2.6 GB)
    ("regex repeat written out too often", at("target.http_batch.success_regex", "a{10000000}"),
     ["target.http_batch.success_regex: regex 'a{10000000}': its counted repeats ({n}, {n,}, "
      "{n,m}) write it out to about 10000000 items when compiled: at most 10000; use a "
      "smaller least count, or * and +"]),
    ("regex nested repeats written out too often",
     at("target.http_batch.success_regex", "(?:(?:a{10}){100}){11}"),
     ["target.http_batch.success_regex: regex '(?:(?:a{10}){100}){11}': its counted repeats",
      "about 11000 items"]),
    ("regex repeat of an escape", at("target.http_batch.success_regex", r"\d{20000,}"),
     ["about 20000 items when compiled: at most 10000"]),
    ("regex repeat of nothing", at("target.http_batch.success_regex", "ok|{20000}"),
     ["target.http_batch.success_regex: regex 'ok|{20000}' does not compile: nothing to "
      "repeat"]),
    # custom_data: copied into, and filled in for, every message
    ("custom_data value of a megabyte", at("custom_data", {"pairs": {"k": "x" * 1_000_000}}),
     ["custom_data: template and pairs hold 1000001 characters of keys and "
      "values: at most 16384 in all (each is copied into every message)"]),
    ("custom_data with too many parameters",
     at("custom_data", {"template": {f"k{n}": "{{uuid}}" * 3 for n in range(100)}}),
     ["custom_data: template and pairs hold 300 {{parameters}}: at most 256 in "
      "all (each is filled in for every message)"]),
    ("custom_data with too many fields",
     at("custom_data", {"fields": [f"f{n}" for n in range(257)]}),
     ["custom_data: fields: 257 profile fields: at most 256"]),
    ("request timeout no request can meet", at("target.http_batch.request_timeout_sec", 5e-324),
     ["target.http_batch.request_timeout_sec: 4.94066e-324 s: at least 0.01 s (no request is "
      "answered sooner)"]),
    ("batch size zero", at("target.http_batch.max_batch_size", 0),
     ["target.http_batch.max_batch_size: Input should be greater than 0"]),
    ("batch size negative", at("target.http_batch.max_batch_size", -5),
     ["target.http_batch.max_batch_size: Input should be greater than 0"]),
    ("batch size too big", at("target.http_batch.max_batch_size", 10_001),
     ["target.http_batch.max_batch_size: Input should be less than or equal to 10000"]),
    ("flush timeout zero", at("target.http_batch.flush_timeout_sec", 0),
     ["target.http_batch.flush_timeout_sec: Input should be greater than 0"]),
    ("request timeout zero", at("target.http_batch.request_timeout_sec", 0),
     ["target.http_batch.request_timeout_sec: Input should be greater than 0"]),
    # headers
    ("header name with space", at("target.http_batch.headers", {"X Source": "a"}),
     ["target.http_batch.headers: header name 'X Source' is not a valid HTTP token"]),
    ("header name with colon", at("target.http_batch.headers", {"X-A:": "a"}),
     ["target.http_batch.headers: header name 'X-A:' is not a valid HTTP token"]),
    ("header name empty", at("target.http_batch.headers", {"": "a"}),
     ["target.http_batch.headers: header name '' is not a valid HTTP token"]),
    ("header value with line break", at("target.http_batch.headers", {"X-A": "a\r\nX-B: b"}),
     ["target.http_batch.headers: header 'X-A': value holds a line break"]),
    ("header value with NUL", at("target.http_batch.headers", {"X-A": "a\x00b"}),
     ["target.http_batch.headers: header 'X-A': value holds the control character '\\x00'; "
      "a header value may hold none but tab"]),
    ("header value with escape", at("target.http_batch.headers", {"X-A": "\x1b[0m"}),
     ["header 'X-A': value holds the control character '\\x1b'"]),
    ("header value with DEL", at("target.http_batch.headers", {"X-A": "a\x7f"}),
     ["header 'X-A': value holds the control character '\\x7f'"]),
    # headers the HTTP client sets: Content-Length 5 cut every body to 5 bytes
    *[(f"header {name}", at("target.http_batch.headers", {name: "5"}),
       [f"target.http_batch.headers: header {name!r} is set by the HTTP client for each "
        "request (it frames the body or runs the connection)"])
      for name in ("Content-Length", "transfer-encoding", "HOST", "Connection", "Keep-Alive",
                   "Upgrade", "TE", "Trailer", "Expect", "Content-Encoding")],
    *[(f"header {name}: {value}", at("target.http_batch.headers", {name: value}),
       [f"target.http_batch.headers: header {name!r}: every batch is JSON: the media type "
        f"must be application/json (parameters such as charset=utf-8 may follow), not "
        f"{value!r}"])
      for name, value in (("Content-Type", "text/plain"), ("content-type", ""),
                          ("CONTENT-TYPE", "application/jsonl"))],
    # auth
    ("bearer without token", at("target.http_batch.auth", {"kind": "bearer"}),
     ["target.http_batch.auth: bearer auth needs a token"]),
    ("bearer with empty token", at("target.http_batch.auth", {"kind": "bearer", "token": ""}),
     ["target.http_batch.auth: bearer auth needs a token"]),
    ("oauth2 without anything", at("target.http_batch.auth", {"kind": "oauth2"}),
     ["target.http_batch.auth: oauth2 auth needs token_url, client_id, client_secret"]),
    ("oauth2 without client_secret",
     at("target.http_batch.auth", {"kind": "oauth2", "token_url": "https://a.example/t",
                                   "client_id": "c"}),
     ["target.http_batch.auth: oauth2 auth needs client_secret"]),
    ("oauth2 without token_url",
     at("target.http_batch.auth", {"kind": "oauth2", "client_id": "c", "client_secret": "s"}),
     ["target.http_batch.auth: oauth2 auth needs token_url"]),
    ("oauth2 bad token_url",
     at("target.http_batch.auth", {"kind": "oauth2", "token_url": "auth.example/t",
                                   "client_id": "c", "client_secret": "s"}),
     ["target.http_batch.auth: token_url: 'auth.example/t' is not an http(s) URL with a host"]),
    ("token_url kept with another kind, not a URL",
     at("target.http_batch.auth", {"kind": "none", "token_url": "http://[x"}),
     ["target.http_batch.auth: token_url: is not a valid URL: its host part cannot be parsed"]),
    ("unknown auth kind", at("target.http_batch.auth", {"kind": "basic"}),
     ["target.http_batch.auth.kind: Input should be 'none', 'bearer' or 'oauth2'"]),
    ("bearer token with line break",
     at("target.http_batch.auth", {"kind": "bearer", "token": "a\r\nX-Evil: 1"}),
     ["target.http_batch.auth: token: holds the control character '\\r', which the "
      "Authorization header it is sent in may not hold"]),
    ("bearer token with NUL", at("target.http_batch.auth", {"kind": "bearer", "token": "a\x00"}),
     ["target.http_batch.auth: token: holds the control character '\\x00'"]),
    # one Authorization: the HTTP client refuses a request given two
    ("url user-info and bearer auth",
     lambda d: set_path(set_path(d, "target.http_batch.url", "https://u:p@r.example/x"),
                        "target.http_batch.auth", {"kind": "bearer", "token": "t"}),
     ["target.http_batch: authorization given twice (auth kind bearer and user:password@ "
      "in the URL): give one of them"]),
    ("url user-info and oauth2 auth",
     lambda d: set_path(set_path(d, "target.http_batch.url", "https://u@r.example/x"),
                        "target.http_batch.auth", {
                            "kind": "oauth2", "token_url": "https://a.example/t",
                            "client_id": "c", "client_secret": "s"}),
     ["authorization given twice (auth kind oauth2 and user:password@ in the URL)"]),
    ("url user-info and Authorization header",
     lambda d: set_path(set_path(d, "target.http_batch.url", "https://u:p@r.example/x"),
                        "target.http_batch.headers", {"authorization": "Basic eDp5"}),
     ["authorization given twice (user:password@ in the URL and an Authorization header)"]),
    ("bearer auth and Authorization header",
     lambda d: set_path(set_path(d, "target.http_batch.headers", {"Authorization": "x"}),
                        "target.http_batch.auth", {"kind": "bearer", "token": "t"}),
     ["authorization given twice (auth kind bearer and an Authorization header)"]),
    # target choice
    ("both targets", at("target.kafka", {"bootstrap_servers": ["k:9092"], "topic": "t"}),
     ["target: exactly one of http_batch, rabbitmq_queue, rabbitmq_exchange, kafka must be set "
      "(got http_batch, kafka)"]),
    ("neither target", at("target", {}),
     ["target: exactly one of http_batch, rabbitmq_queue, rabbitmq_exchange, kafka must be set "
      "(got none)"]),
    ("all targets null", at("target", dict.fromkeys(TARGET_KINDS)),
     ["(got none)"]),
    ("target missing", without("target"), ["target: Field required"]),
    ("unknown target kind", at("target", {"webhook": {"url": "https://r.example"}}),
     ["target.webhook: Extra inputs are not permitted"]),
    # kafka
    ("kafka server without port",
     at("target", {"kafka": {"bootstrap_servers": ["kafka-1"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'kafka-1' is not host:port"]),
    ("kafka server empty port",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092", "kafka-1:"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'kafka-1:' is not host:port"]),
    ("kafka server without host",
     at("target", {"kafka": {"bootstrap_servers": [":9092"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: ':9092' is not host:port"]),
    ("kafka server port text",
     at("target", {"kafka": {"bootstrap_servers": ["k:kafka"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'k:kafka' is not host:port"]),
    ("kafka server port zero",
     at("target", {"kafka": {"bootstrap_servers": ["k:0"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'k:0' is not host:port"]),
    ("kafka server port too big",
     at("target", {"kafka": {"bootstrap_servers": ["k:65536"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'k:65536' is not host:port"]),
    ("kafka server port of other digits",  # "²".isdigit(), and int("²") fails
     at("target", {"kafka": {"bootstrap_servers": ["k:\u00b2"], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: 'k:\u00b2' is not host:port (a port from 1 to 65535)"]),
    ("kafka server port of Arabic-Indic digits",
     at("target", {"kafka": {"bootstrap_servers": ["k:\u0669\u0660\u0669\u0662"], "topic": "t"}}),
     ["is not host:port (a port from 1 to 65535)"]),
    *[(f"kafka topic {topic!r}",
       at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": topic}}),
       [f"target.kafka.topic: {topic!r} is not a topic name Kafka allows"])
      for topic in (".", "..")],
    ("kafka no servers",
     at("target", {"kafka": {"bootstrap_servers": [], "topic": "t"}}),
     ["target.kafka.bootstrap_servers: List should have at least 1 item"]),
    ("kafka bad topic",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "a topic"}}),
     ["target.kafka.topic: String should match pattern"]),
    ("kafka bad key",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", "key": "id"}}),
     ["target.kafka.key: Input should be 'list_event', 'profile_id' or 'none'"]),
    ("kafka SASL without credentials",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t",
                             "sasl_mechanism": "PLAIN"}}),
     ["target.kafka: SASL PLAIN needs sasl_username and sasl_password"]),
    ("kafka SASL without password",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t",
                             "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u"}}),
     ["target.kafka: SASL SCRAM-SHA-256 needs sasl_username and sasl_password"]),
    ("kafka SASL with empty password",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t",
                             "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u",
                             "sasl_password": ""}}),
     ["target.kafka: SASL SCRAM-SHA-512 needs sasl_username and sasl_password"]),
    ("kafka unknown SASL mechanism",
     at("target", {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t",
                             "sasl_mechanism": "GSSAPI", "sasl_username": "u",
                             "sasl_password": "p"}}),
     ["target.kafka.sasl_mechanism: Input should be 'PLAIN', 'SCRAM-SHA-256' or "
      "'SCRAM-SHA-512'"]),
    # rabbitmq
    ("rabbit empty host", at("target", {"rabbitmq_queue": {"host": "", "queue": "q"}}),
     ["target.rabbitmq_queue.host: String should have at least 1 character"]),
    ("rabbit port zero", at("target", {"rabbitmq_queue": {"host": "r", "port": 0, "queue": "q"}}),
     ["target.rabbitmq_queue.port: Input should be greater than 0"]),
    ("rabbit port too big",
     at("target", {"rabbitmq_queue": {"host": "r", "port": 65536, "queue": "q"}}),
     ["target.rabbitmq_queue.port: Input should be less than 65536"]),
    ("rabbit queue missing", at("target", {"rabbitmq_queue": {"host": "r"}}),
     ["target.rabbitmq_queue.queue: Field required"]),
    ("rabbit exchange type", at("target", {"rabbitmq_exchange": {"host": "r", "exchange": "e",
                                                                 "type": "fanout"}}),
     ["target.rabbitmq_exchange.type: Input should be 'direct' or 'topic'"]),
    ("rabbit exchange name empty",
     at("target", {"rabbitmq_exchange": {"host": "r", "exchange": ""}}),
     ["target.rabbitmq_exchange.exchange: String should have at least 1 character"]),
    ("rabbit queue name over 255 bytes",  # 200 characters, 400 bytes in UTF-8
     at("target", {"rabbitmq_queue": {"host": "r", "queue": "é" * 200}}),
     ["target.rabbitmq_queue.queue: is 400 bytes long in UTF-8, AMQP allows "
      "at most 255"]),
    ("rabbit exchange name over 255 bytes",
     at("target", {"rabbitmq_exchange": {"host": "r", "exchange": "✓" * 86}}),
     ["target.rabbitmq_exchange.exchange: is 258 bytes long in UTF-8, AMQP "
      "allows at most 255"]),
    # negative ids
    ("negative id", at("id", -1), ["id: Input should be greater than or equal to 0"]),
    ("negative account", at("account_id", -23),
     ["account_id: Input should be greater than or equal to 0"]),
    ("negative database", at("database", -111),
     [DATABASE + "-111"]),
    # one reason, not one per member of the union (no "database.literal['all']")
    ("database text", at("database", "some"), [DATABASE + "'some'"]),
    ("negative resource filter", at("filters.resources", [3, -3]),
     ["filters.resources.1: Input should be greater than or equal to 0"]),
    ("negative campaign filter", at("filters.campaigns", [-973]),
     ["filters.campaigns.0: Input should be greater than or equal to 0"]),
    ("negative template filter", at("filters.templates", [-17]),
     ["filters.templates.0: Input should be greater than or equal to 0"]),
    ("negative segment filter", at("filters.segments", [-1]),
     ["filters.segments.0: Input should be greater than or equal to 0"]),
    ("negative pixel filter", at("filters.pixels", [-9]),
     ["filters.pixels.0: Input should be greater than or equal to 0"]),
    # unknown fields, at every level
    ("unknown top-level field", at("enabled", True), ["enabled: Extra inputs are not permitted"]),
    ("unknown target field", at("target.http_batch.method", "PUT"),
     ["target.http_batch.method: Extra inputs are not permitted"]),
    ("unknown auth field", at("target.http_batch.auth", {"kind": "none", "user": "u"}),
     ["target.http_batch.auth.user: Extra inputs are not permitted"]),
    ("unknown filter", at("filters.lists", [1]), ["filters.lists: Extra inputs are not permitted"]),
    ("unknown custom_data key", at("custom_data.profile", ["email"]),
     ["custom_data.profile: Extra inputs are not permitted"]),
    # other fields
    ("empty name", at("name", ""), ["name: String should have at least 1 character"]),
    ("name missing", without("name"), ["name: Field required"]),
    ("account missing", without("account_id"), ["account_id: Field required"]),
    ("empty profile field name", at("custom_data.fields", ["email", ""]),
     ["custom_data.fields.1: String should have at least 1 character"]),
]


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [pytest.param(m, f, id=name) for name, m, f in REJECTIONS],
)
def test_rejection(mutate: Mutation, fragments: list[str]) -> None:
    message = hook_error(mutate(hook_data()))
    for fragment in fragments:
        assert fragment in message


def test_every_problem_of_a_hook_is_reported() -> None:
    data = hook_data(name="", account_id=-1, actions=["nope"])
    set_path(data, "target.http_batch.max_batch_size", 0)
    message = hook_error(data)
    for fragment in (
        "name: String should have at least 1 character",
        "account_id: Input should be greater than or equal to 0",
        "actions: unknown event code(s) 'nope'",
        "target.http_batch.max_batch_size: Input should be greater than 0",
    ):
        assert fragment in message
    assert message.count("; ") >= 3


def test_not_a_mapping() -> None:
    with pytest.raises(HookError, match="invalid hook: hook: Input should be a valid dictionary"):
        parse_hook(["not", "a", "hook"])  # type: ignore[arg-type]


def test_hook_error_is_a_hookray_error() -> None:
    assert issubclass(HookError, HookrayError)


LONE = "\ud800"  # a lone UTF-16 surrogate, as JSON "\\ud800" decodes: not valid UTF-8


@pytest.mark.parametrize(("path", "value", "field", "reason"), [
    ("name", f"to {LONE}", "name", "not valid UTF-8"),
    ("actions", ["click", LONE], "actions", "item 1: not valid UTF-8"),
    ("custom_data.pairs", {"k": LONE}, "custom_data.pairs", "value of 'k': not valid UTF-8"),
    ("custom_data.pairs", {LONE: "v"}, "custom_data.pairs", "key '\\ud800': not valid UTF-8"),
    ("custom_data.template", {f"k{LONE}": "{{uuid}}"}, "custom_data.template",
     "key 'k\\ud800': not valid UTF-8"),
    ("custom_data.fields", ["email", LONE], "custom_data.fields.1", "not valid UTF-8"),
    ("target.http_batch.url", f"https://r.example/{LONE}", "target.http_batch.url",
     "not valid UTF-8"),
    ("target.http_batch.success_regex", LONE, "target.http_batch.success_regex",
     "not valid UTF-8"),
    ("target.http_batch.headers", {"X-Source": LONE}, "target.http_batch.headers",
     "value of 'X-Source': not valid UTF-8"),
    ("target.http_batch.auth", {"kind": "bearer", "token": f"{TOKEN}{LONE}"},
     "target.http_batch.auth.token", "not valid UTF-8 (a lone surrogate)"),
])
def test_strings_that_are_not_valid_utf8_are_refused_naming_the_field(
        path: str, value: Any, field: str, reason: str) -> None:
    """A lone surrogate cannot be written as UTF-8: a hook holding one could be neither
    stored nor turned into messages (every round of its partition would fail), so it is
    refused where it is built, naming the field; the message itself stays printable."""
    message = hook_error(set_path(hook_data(), path, value))
    assert f"{field}: {reason}" in message
    message.encode("utf-8")  # no surrogate in the error: it can be printed and logged
    assert TOKEN not in message
    with pytest.raises(ValidationError):
        Hook.model_validate(set_path(hook_data(), path, value))


@pytest.mark.parametrize("target", [
    {"rabbitmq_queue": {"host": "r", "queue": f"q{LONE}"}},
    {"rabbitmq_exchange": {"host": "r", "exchange": "e", "vhost": LONE}},
    {"rabbitmq_queue": {"host": "r", "queue": "q", "password": LONE}},
    {"kafka": {"bootstrap_servers": [f"k{LONE}:9092"], "topic": "t"}},
    {"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", "sasl_mechanism": "PLAIN",
               "sasl_username": LONE, "sasl_password": "p"}},
])
def test_no_target_kind_takes_a_string_that_is_not_valid_utf8(target: dict[str, Any]) -> None:
    assert "not valid UTF-8" in hook_error(hook_data(target))


# --- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "secret"), SECRET_TARGETS.values(), ids=SECRET_TARGETS)
def test_secret_never_shown(target: dict[str, Any], secret: str) -> None:
    hook = parse_hook(hook_data(target))
    shown = {
        "repr": repr(hook),
        "str": str(hook),
        "repr(target)": repr(hook.target),
        "display": json.dumps(hook.display()),
        "model_dump": str(hook.model_dump()),
        "model_dump(json)": json.dumps(hook.model_dump(mode="json")),
        "model_dump_json": hook.model_dump_json(),
    }
    for where, text in shown.items():
        assert secret not in text, where
        assert "**********" in text, where


@pytest.mark.parametrize(("target", "secret"), SECRET_TARGETS.values(), ids=SECRET_TARGETS)
def test_to_storage_carries_secret_and_round_trips(target: dict[str, Any], secret: str) -> None:
    hook = parse_hook(hook_data(target, id=4, active=True, database=111))
    stored = hook.to_storage()
    text = json.dumps(stored)  # JSON-ready
    assert secret in text
    assert "**********" not in text
    again = parse_hook(json.loads(text))
    assert again == hook
    assert again.to_storage() == stored
    # the display still masks after the round trip
    assert secret not in json.dumps(again.display())


def test_to_storage_round_trip_of_every_kind() -> None:
    for target in (HTTP_NONE, HTTP_BEARER, HTTP_OAUTH2, RABBIT_QUEUE, RABBIT_EXCHANGE, KAFKA):
        hook = parse_hook(hook_data(target))
        assert parse_hook(hook.to_storage()) == hook


def test_display_is_the_masked_storage_form() -> None:
    hook = parse_hook(hook_data(HTTP_OAUTH2))
    shown, stored = hook.display(), hook.to_storage()
    assert shown["target"]["http_batch"]["auth"]["client_secret"] == "**********"
    assert stored["target"]["http_batch"]["auth"]["client_secret"] == CLIENT_SECRET
    stored["target"]["http_batch"]["auth"]["client_secret"] = "**********"
    assert shown == stored


def test_credential_headers_and_url_passwords_are_masked_the_rest_shown() -> None:
    hook = parse_hook(hook_data({"http_batch": {
        "url": f"https://crm:{URL_PASSWORD}@receiver.example.com:8443/h?x=1",
        "headers": {"Proxy-Authorization": "Basic abc", "X-Auth-Token": "t", "Cookie": "c",
                    "X-Signature": "s", "x-api-key": "k", "X-Tenant": "acme"}}}))
    shown = hook.display()["target"]["http_batch"]
    assert shown["url"] == "https://crm:**********@receiver.example.com:8443/h?x=1"
    assert shown["headers"] == {"Proxy-Authorization": "**********",
                                "X-Auth-Token": "**********", "Cookie": "**********",
                                "X-Signature": "**********", "x-api-key": "**********",
                                "X-Tenant": "acme"}
    stored = hook.to_storage()["target"]["http_batch"]
    assert stored["url"].startswith(f"https://crm:{URL_PASSWORD}@")
    assert stored["headers"]["Proxy-Authorization"] == "Basic abc"
    oauth2 = parse_hook(hook_data({"http_batch": {
        "url": "https://receiver.example.com/h", "headers": {"X-Api-Key": "k"},
        "auth": {"kind": "oauth2", "token_url": "https://u:p@idp.example.com/token",
                 "client_id": "c", "client_secret": CLIENT_SECRET}}}))
    shown = oauth2.display()["target"]["http_batch"]
    assert shown["auth"]["token_url"] == "https://u:**********@idp.example.com/token"
    assert shown["headers"] == {"X-Api-Key": "**********"}
    # a URL without a password is shown as it is
    plain = parse_hook(hook_data(HTTP_NONE)).display()["target"]["http_batch"]["url"]
    assert plain == HTTP_NONE["http_batch"]["url"]


def test_a_url_user_name_without_password_is_masked_and_restored_when_sent_back() -> None:
    stored = parse_hook(hook_data({"http_batch": {
        "url": "https://utok-SECRET@r.example.com/h?x=1"}}, id=4))
    shown = stored.display()
    assert shown["target"]["http_batch"]["url"] == "https://**********@r.example.com/h?x=1"
    assert restore_secrets(shown, stored)["target"]["http_batch"]["url"] == \
        "https://utok-SECRET@r.example.com/h?x=1"
    # a new hook given the mask as its user name is refused, not stored with it
    assert masked_secrets(parse_hook(shown)) == ["target.http_batch.url"]
    basic = base64.b64encode(b"utok-SECRET:").decode()  # what the HTTP client sends
    assert {"utok-SECRET", basic} <= set(hook_secrets(stored))


def test_credential_query_values_are_masked_the_rest_of_the_url_kept() -> None:
    url = ("https://hooks.example.com/in?tenant=acme&token=tok-SECRET&Api_Key=k%2BSECRET"
           "&sig=sig-SECRET&page=2&access_token=&x=1#part")
    hook = parse_hook(hook_data({"http_batch": {"url": url}}))
    shown = hook.display()["target"]["http_batch"]["url"]
    assert shown == ("https://hooks.example.com/in?tenant=acme&token=**********"
                     "&Api_Key=**********&sig=**********&page=2&access_token=&x=1#part")
    assert "SECRET" not in repr(hook) and "SECRET" not in str(hook.display())
    assert hook.to_storage()["target"]["http_batch"]["url"] == url
    assert mask_url("https://h.example/x?a=1&b=2") == "https://h.example/x?a=1&b=2"
    assert sorted(set(url_secrets(url))) == ["k%2BSECRET", "k+SECRET", "sig-SECRET",
                                             "tok-SECRET"]


def test_bad_url_error_does_not_show_its_password() -> None:
    for url in (f"ftp://u:{URL_PASSWORD}@h/x", f"http://u:{URL_PASSWORD}@h:0/x"):
        message = hook_error(hook_data({"http_batch": {"url": url}}))
        assert URL_PASSWORD not in message and "u:**********@h" in message, message


def test_default_rabbit_password_is_masked_too() -> None:
    hook = parse_hook(hook_data({"rabbitmq_queue": {"host": "r", "queue": "q"}}))
    assert hook.display()["target"]["rabbitmq_queue"]["password"] == "**********"
    assert hook.to_storage()["target"]["rabbitmq_queue"]["password"] == "guest"


def add_second_target(data: dict[str, Any]) -> dict[str, Any]:
    if "http_batch" in data["target"]:
        data["target"]["kafka"] = {"bootstrap_servers": ["k:9092"], "topic": "t"}
    else:
        data["target"]["http_batch"] = {"url": "https://r.example"}
    return data


# A problem elsewhere in a hook that carries a secret: the message must not echo the secret.
FAILURES_ELSEWHERE: list[tuple[str, Mutation]] = [
    ("bad name", at("name", "")),
    ("unknown action", at("actions", ["nope"])),
    ("unknown field", at("extra", 1)),
    ("negative database", at("database", -1)),
    ("second target", add_second_target),
]


@pytest.mark.parametrize(("target", "secret"), SECRET_TARGETS.values(), ids=SECRET_TARGETS)
@pytest.mark.parametrize(
    "mutate", [m for _, m in FAILURES_ELSEWHERE], ids=[n for n, _ in FAILURES_ELSEWHERE]
)
def test_secret_not_in_hook_error(target: dict[str, Any], secret: str, mutate: Mutation) -> None:
    with pytest.raises(HookError) as info:
        parse_hook(mutate(hook_data(target)))
    assert secret not in str(info.value)
    assert secret not in repr(info.value)
    assert secret not in "".join(traceback.format_exception(info.value))
    # no chained pydantic ValidationError (its input_value reprs can hold the secret)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


@pytest.mark.parametrize(
    ("target", "bad_path", "bad_value"),
    [
        (HTTP_BEARER, "target.http_batch.max_batch_size", 0),
        (HTTP_BEARER, "target.http_batch.url", "ftp://x"),
        (HTTP_OAUTH2, "target.http_batch.auth.token_url", "not a url"),
        (HTTP_OAUTH2, "target.http_batch.auth.client_id", ""),
        (RABBIT_QUEUE, "target.rabbitmq_queue.port", 0),
        (RABBIT_EXCHANGE, "target.rabbitmq_exchange.type", "fanout"),
        (KAFKA, "target.kafka.bootstrap_servers", ["nope"]),
        (KAFKA, "target.kafka.sasl_username", None),
        (KAFKA, "target.kafka.sasl_username", ""),
    ],
)
def test_secret_not_in_hook_error_of_its_own_target(
    target: dict[str, Any], bad_path: str, bad_value: Any
) -> None:
    data = set_path(hook_data(target), bad_path, bad_value)
    with pytest.raises(HookError) as info:
        parse_hook(data)
    error = info.value
    text = str(error) + "".join(traceback.format_exception(error)) + repr(error.__context__)
    for secret in SECRETS:
        assert secret not in text


def test_secret_given_with_wrong_type_is_not_echoed() -> None:
    data = set_path(hook_data(HTTP_BEARER), "target.http_batch.auth.token", [TOKEN])
    message = hook_error(data)
    assert "target.http_batch.auth.token: Input should be a valid string" in message
    assert TOKEN not in message


# --- custom catalogue ----------------------------------------------------------------------


def test_extended_catalogue_accepts_custom_code() -> None:
    custom = builtin_catalogue().extended(
        [{"code": "promo_issued", "name": "Promo code issued", "category": "delivery",
          "channel": "promo"}]
    )
    data = hook_data(actions=["promo_issued", "click"])
    hook = parse_hook(data, catalogue=custom)
    assert hook.actions == ["promo_issued", "click"]
    # the built-in catalogue does not know it
    assert "actions: unknown event code(s) 'promo_issued'" in hook_error(data)
    # stored hooks with custom codes re-load with the same catalogue
    assert parse_hook(hook.to_storage(), catalogue=custom) == hook


def test_custom_catalogue_lists_its_own_codes_when_rejecting() -> None:
    small = EventCatalogue([{"code": "only_one", "category": "pixel", "channel": "web"}])
    message = hook_error(hook_data(actions=["click"]), catalogue=small)
    assert message == (
        "invalid hook: actions: unknown event code(s) 'click'; known codes: only_one"
    )


def test_empty_catalogue_knows_no_code() -> None:
    message = hook_error(hook_data(actions=["click"]), catalogue=EventCatalogue([]))
    assert "actions: unknown event code(s) 'click'; known codes: " in message


LAX = [  # values pydantic's lax mode took for another type
    ("active", "yes", "active: Input should be a valid boolean"),
    ("active", 1, "active: Input should be a valid boolean"),
    ("send_content", "true", "send_content: Input should be a valid boolean"),
    ("database", "5", DATABASE + "'5'"),
    ("database", 5.0, DATABASE + "5.0"),
    ("account_id", "23", "account_id: Input should be a valid integer"),
    ("account_id", 23.0, "account_id: Input should be a valid integer"),
    ("filters.campaigns", ["7"], "filters.campaigns.0: Input should be a valid integer"),
    ("name", 5, "name: Input should be a valid string"),
    ("target.http_batch.max_batch_size", True,
     "target.http_batch.max_batch_size: Input should be a valid integer"),
    ("target.http_batch.max_batch_size", "50",
     "target.http_batch.max_batch_size: Input should be a valid integer"),
    ("target.http_batch.max_batch_size", 50.0,
     "target.http_batch.max_batch_size: Input should be a valid integer"),
    ("target.http_batch.flush_timeout_sec", True,
     "target.http_batch.flush_timeout_sec: Input should be a valid number"),
    ("target.http_batch.flush_timeout_sec", "10",
     "target.http_batch.flush_timeout_sec: Input should be a valid number"),
    ("target.http_batch.headers", {"X-A": 1},
     "target.http_batch.headers.X-A: Input should be a valid string"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), LAX,
                         ids=[f"{p}={v!r}" for p, v, _ in LAX])
def test_a_value_of_the_wrong_json_type_is_refused_not_converted(
        path: str, value: Any, fragment: str) -> None:
    assert fragment in hook_error(set_path(hook_data(), path, value))


@pytest.mark.parametrize(("target", "fragment"), [
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "port": True}},
     "target.rabbitmq_queue.port: Input should be a valid integer"),
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "port": "5672"}},
     "target.rabbitmq_queue.port: Input should be a valid integer"),
    ({"rabbitmq_exchange": {"host": "r", "exchange": "e", "durable": "no"}},
     "target.rabbitmq_exchange.durable: Input should be a valid boolean"),
    ({"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", "tls": 1}},
     "target.kafka.tls: Input should be a valid boolean"),
])
def test_no_target_kind_converts_a_value_of_the_wrong_json_type(
        target: dict[str, Any], fragment: str) -> None:
    assert fragment in hook_error(hook_data(target))


def test_integers_are_numbers_and_hooks_stored_as_json_still_load() -> None:
    """Strict types refuse no value the model itself writes: a stored hook (JSON of
    ``to_storage()``, as every version wrote it) loads as it was."""
    data = hook_data(HTTP_BEARER, id=7, active=True, database=111,
                     filters={"campaigns": [973], "segments": [6]},
                     custom_data={"fields": ["email"], "pairs": {"k": "{{uuid}}"}})
    set_path(data, "target.http_batch.flush_timeout_sec", 3)  # an integer is a number
    set_path(data, "target.http_batch.request_timeout_sec", 2)
    hook = parse_hook(data)
    assert hook.target.http_batch is not None
    assert hook.target.http_batch.flush_timeout_sec == 3.0
    for target in (HTTP_OAUTH2, RABBIT_QUEUE, RABBIT_EXCHANGE, KAFKA, HTTP_URL_PASSWORD):
        stored = json.dumps(parse_hook(hook_data(target, id=3)).to_storage())
        assert parse_hook(json.loads(stored)).to_storage() == json.loads(stored)
    assert parse_hook(json.loads(json.dumps(hook.to_storage()))) == hook


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"account_id": True}, "account_id: expected an id (an integer), got a boolean"),
    ({"database": False}, DATABASE + "a boolean"),
    ({"filters": {"campaigns": [3, True]}},
     "filters.campaigns.1: expected an id (an integer), got a boolean"),
    ({"filters": {"pixels": [2**63]}},
     "filters.pixels.0: Input should be less than or equal to 9223372036854775807"),
])
def test_ids_are_integers_within_int64_not_booleans(fields: dict[str, Any], fragment: str
                                                    ) -> None:
    assert fragment in hook_error(hook_data(**fields))


@pytest.mark.parametrize(("target", "fragment"), [
    ({"http_batch": {"url": "http://exa\nmple.com/x"}},
     "target.http_batch.url: holds whitespace or a control character"),
    ({"http_batch": {"url": "http://example.com/a b"}},
     "target.http_batch.url: holds whitespace or a control character"),
    ({"rabbitmq_queue": {"host": "amqp://guest@r", "queue": "q"}},
     "target.rabbitmq_queue.host: expected a host name or an IP address"),
    ({"rabbitmq_queue": {"host": "r 1", "queue": "q"}},
     "target.rabbitmq_queue.host: expected a host name or an IP address"),
    ({"rabbitmq_exchange": {"host": "r:5672", "exchange": "e"}},
     "target.rabbitmq_exchange.host: expected a host name or an IP address"),
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "vhost": "v\x00"}},
     "target.rabbitmq_queue.vhost: holds a control character"),
])
def test_destinations_no_client_could_reach_as_written_are_refused(
        target: dict[str, Any], fragment: str) -> None:
    """urlsplit drops a newline inside a URL (the request would go to example.com);
    a broker host that is a URL, has a port or whitespace, or a vhost with a control
    character fails every delivery: all refused when the hook is made."""
    assert fragment in hook_error(hook_data(target))


@pytest.mark.parametrize("host", ["127.0.0.1", "rabbit.internal", "::1", "[::1]"])
def test_broker_hosts_as_names_or_addresses_are_accepted(host: str) -> None:
    hook = parse_hook(hook_data({"rabbitmq_queue": {"host": host, "queue": "q",
                                                    "vhost": "my vhost"}}))
    # an IPv6 address as a URL writes it is kept as the address: the transport puts
    # it in an amqp:// URL itself, which refused the brackets at every delivery
    assert hook.target.rabbitmq_queue is not None
    assert hook.target.rabbitmq_queue.host == host.strip("[]")


def test_a_hook_without_actions_is_valid_and_captures_no_type() -> None:
    """The platform's default for Actions is empty (a hook saved before any type was
    chosen); it is kept as saved, and matching gives it nothing."""
    data = hook_data()
    del data["actions"]
    assert parse_hook(data).actions == []
    assert parse_hook({**data, "actions": []}).actions == []


def test_rules_added_later_do_not_invalidate_a_stored_hook() -> None:
    """A hook saved before a rule existed still loads from the registry (one stored
    hook that no longer validates stops every partition); created or updated, it is
    refused, naming each rule."""
    data = hook_data({"http_batch": {
        "url": "https://r.example/x", "success_regex": "OK|" * 400,
        "headers": {"Content-Type": "text/plain"},
        "auth": {"kind": "none", "token_url": "auth.example/t"}}},
        custom_data={"pairs": {"k": "x" * 20_000}})
    stored = parse_hook(data, stored=True)
    assert stored.target.http_batch is not None
    assert stored.target.http_batch.headers == {"Content-Type": "text/plain"}
    assert len(stored.custom_data.pairs["k"]) == 20_000
    message = hook_error(data)
    for fragment in ("success_regex: regex of 1200 characters: at most 1000",
                     "auth: token_url: 'auth.example/t' is not an http(s) URL",
                     "header 'Content-Type': every batch is JSON",
                     "custom_data: template and pairs hold 20001 characters"):
        assert fragment in message
    # a regex written out more than new hooks may is kept (its size is an estimate)
    data = hook_data({"http_batch": {"url": "https://r.example/x",
                                     "success_regex": "a{20000}"}})
    assert "about 20000 items when compiled: at most 10000" in hook_error(data)
    assert parse_hook(data, stored=True).target.http_batch is not None


def test_a_filter_on_segment_zero_is_refused_but_a_stored_one_loads() -> None:
    """0 is "no segment", which no event is in: the filter would capture nothing."""
    data = hook_data(filters={"segments": [4, 0]})
    assert "filters.segments: 0 means no segment, which no event is in" in hook_error(data)
    assert parse_hook(data, stored=True).filters.segments == [4, 0]


@pytest.mark.parametrize(("vhost", "ok"), [
    ("/", True), ("shop", True), ("a/b", True), ("café", True), ("50%", True),
    ("a%2fb", True), ("..", False), (".", False), ("x/../y", False), ("a/./b", False),
    ("a%2Fb", False)])
def test_a_vhost_that_would_reach_the_broker_as_another_name_is_refused(
        vhost: str, ok: bool) -> None:
    """The connection URL's path drops "." and ".." segments (".." would be the
    default vhost "/"), and "%2F" is read back as "/": refused for new hooks, kept
    loading for stored ones (whose deliveries then fail, naming why)."""
    data = hook_data({"rabbitmq_queue": {"host": "mq", "queue": "q", "vhost": vhost}})
    if ok:
        assert parse_hook(data).target.rabbitmq_queue.vhost == vhost  # type: ignore[union-attr]
    else:
        assert "would reach the broker" in hook_error(data)
        stored = parse_hook(data, stored=True)
        assert stored.target.rabbitmq_queue.vhost == vhost  # type: ignore[union-attr]


# --- Kafka settings that would fail or go unused at every delivery -------------------------


@pytest.mark.parametrize(("server", "reason"), [
    ("PLAINTEXT://127.0.0.1:9092", "no scheme (the listener's protocol is set by tls"),
    ("k1:9092,k2:9092", "one server per list item"),
    ("k1 k2:9092", "expected a host name or an IP address before the port"),
    ("user@k1:9092", "expected a host name or an IP address before the port"),
    ("k1/x:9092", "expected a host name or an IP address before the port"),
])
def test_kafka_servers_in_forms_kafka_configs_use_are_refused(server: str, reason: str) -> None:
    data = hook_data({"kafka": {"bootstrap_servers": [server], "topic": "t"}})
    message = hook_error(data)
    assert f"target.kafka.bootstrap_servers: {server!r} is not host:port: {reason}" in message
    # a hook stored before the rule still loads (one that does not stops every partition)
    assert parse_hook(data, stored=True).target.kafka is not None


def test_kafka_servers_by_name_ipv4_and_ipv6_are_taken() -> None:
    servers = ["kafka-1.example.com:9092", "10.0.0.5:9093", "[::1]:9094", "[fe80::1]:9095"]
    hook = parse_hook(hook_data({"kafka": {"bootstrap_servers": servers, "topic": "t"}}))
    assert hook.target.kafka is not None and hook.target.kafka.bootstrap_servers == servers


@pytest.mark.parametrize(("settings", "reason"), [
    ({"tls_cafile": "/etc/ca.pem"}, "tls_cafile is only used with tls: true"),
    ({"sasl_username": "u", "sasl_password": "p"},
     "sasl_username and sasl_password are only used with a sasl_mechanism"),
    ({"sasl_password": "p"}, "sasl_username and sasl_password are only used with a"),
    ({"tls": True, "tls_cafile": ""}, "tls_cafile is empty: omit it to trust the system's CAs"),
])
def test_kafka_settings_that_would_go_unused_are_refused(settings: dict[str, Any],
                                                         reason: str) -> None:
    data = hook_data({"kafka": {"bootstrap_servers": ["k:9092"], "topic": "t", **settings}})
    assert f"target.kafka: {reason}" in hook_error(data)
    assert parse_hook(data, stored=True).target.kafka is not None


@pytest.mark.parametrize("field", ["flush_timeout_sec", "request_timeout_sec"])
def test_a_nan_timeout_is_named_as_not_finite(field: str) -> None:
    data = hook_data()
    data["target"]["http_batch"][field] = float("nan")
    assert f"target.http_batch.{field}: Input should be a finite number" in hook_error(data)


@pytest.mark.parametrize(("pattern", "items"), [
    ("OK", 2), ("a{10000}", 10000), ("a{0,100000}", 1), ("a{,9}", 1), ("a{3,}", 3),
    ("(?:a{100}){1000}", 100000), ("(?:ab){50000}", 100000), ("(a|b){7}", 14),
    (r"\d{100000}", 100000), (r"\p{L}{5}", 5), (r"\{100000}", 8),
    ("[ab]{100}", 100), ("[]a]{3}", 3), ("[^]]{4}", 4), ("[[a]b]{5}", 5), ("[{]{6}", 6),
    ("(?i)ok{3}", 4), ("(?P<x>ab){10}", 20), ("(?<=a)b{10}", 11), ("(?#c{99})x", 1),
    ("(?:(?:a{10}){10}){10}", 1000),
    # a verbose pattern's comments and spaces are nothing; \X is about five items
    ("(?x) ok  # retries: {1000001}\n", 2), ("(?x) a {10}", 10), (r"\X{100}", 500),
    ("ok|{20000}", 2),  # repeats nothing: the compile error is the one to say
])
def test_regex_size_counts_counted_repeats_as_the_module_writes_them_out(
        pattern: str, items: int) -> None:
    from engine.hooks import regex_size

    assert regex_size(pattern) == items


@pytest.mark.parametrize(("target", "message"), [
    # hosts the clients can never connect to: every delivery would fail, after retries
    ({"rabbitmq_queue": {"host": "a|b", "queue": "q"}},
     "target.rabbitmq_queue.host: not a valid host name (Host 'a|b' cannot contain '|'"),
    ({"rabbitmq_queue": {"host": "xn--zz", "queue": "q"}},
     "target.rabbitmq_queue.host: not a valid host name (decoding with 'idna' codec failed"),
    ({"rabbitmq_exchange": {"host": "r..example", "exchange": "e"}},
     "target.rabbitmq_exchange.host: not a valid host name: each dot-separated label must "
     "be 1 to 63 characters long"),
    ({"kafka": {"bootstrap_servers": [f"{'k' * 64}.example:9092"], "topic": "t"}},
     f"target.kafka.bootstrap_servers: '{'k' * 64}.example:9092': the host is not a valid "
     "host name: each dot-separated label"),
    # the Kafka client reads "::1:9092" as the address ::1:9092, on its default port
    ({"kafka": {"bootstrap_servers": ["2001:db8::1:9092"], "topic": "t"}},
     "target.kafka.bootstrap_servers: '2001:db8::1:9092' is not host:port: an IPv6 address "
     "is written in brackets, [2001:db8::1]:9092"),
    # the AMQP client logs in as guest, into "/", for empty ones
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "user": ""}},
     "target.rabbitmq_queue.user: empty: the client would log in as guest instead"),
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "password": ""}},
     "target.rabbitmq_queue.password: empty: the client would log in as guest instead"),
    ({"rabbitmq_queue": {"host": "r", "queue": "q", "vhost": ""}},
     "target.rabbitmq_queue.vhost: an empty vhost name would reach the broker as the "
     "default \"/\"; give \"/\""),
])
def test_broker_settings_no_client_can_use_as_written_are_refused_but_stored_ones_load(
        target: dict[str, Any], message: str) -> None:
    data = hook_data(target)
    assert message in hook_error(data)
    assert parse_hook(data, stored=True).target.kind in target


def test_broker_hosts_the_clients_take_are_accepted() -> None:
    for host in ("rabbit.internal", "rabbit_1.internal", "bücher.example", "10.0.0.7", "[::1]"):
        parse_hook(hook_data({"rabbitmq_queue": {"host": host, "queue": "q"}}))
    parse_hook(hook_data({"kafka": {"bootstrap_servers": [
        "kafka-1.internal:9092", "[2001:db8::1]:9093", "10.0.0.8:9092"], "topic": "t"}}))


def test_an_exchange_hooks_codes_fit_its_routing_keys() -> None:
    """"<list_id>.<code>" must fit AMQP's 255 bytes: a code over 235 bytes (an
    EVENT_TYPES_FILE may add one) would fail every delivery of an exchange hook, not of
    an HTTP or Kafka one; a stored exchange hook keeps loading."""
    fits, long = "é" * 117 + "x", "é" * 117 + "xy"  # 235 and 236 bytes
    catalogue = builtin_catalogue().extended(
        [{"code": code, "category": "delivery", "channel": "viber"} for code in (fits, long)])
    exchange = {"rabbitmq_exchange": {"host": "r", "exchange": "e"}}
    parse_hook(hook_data(exchange, actions=["click", fits]), catalogue)
    data = hook_data(exchange, actions=["click", long])
    assert hook_error(data, catalogue) == (
        f"invalid hook: target: rabbitmq_exchange: the action {quoted(long)} is 236 bytes "
        "long, and a routing key <list_id>.<code> fits AMQP's 255 bytes only with a code of "
        "at most 235 (UTF-8)")
    assert parse_hook(data, catalogue, stored=True).actions == ["click", long]
    for target in (HTTP_NONE, KAFKA):
        parse_hook(hook_data(target, actions=[long]), catalogue)


def test_only_parameters_filled_in_count_towards_the_custom_data_limit() -> None:
    """Braces that hold no parameter, and unknown parameters, are left as written and
    cost nothing: 300 of them are no "300 {{parameters}}"."""
    literal = {"template": {"doc": "{{" * 300, "unknown": "{{nope}}" * 300}}
    hook = Hook.model_validate(hook_data(custom_data=literal))
    assert hook.custom_data is not None and hook.custom_data.template["doc"] == "{{" * 300
    with pytest.raises(ValidationError, match=re.escape("hold 257 {{parameters}}: at most 256")):
        Hook.model_validate(hook_data(custom_data={
            "template": {"a": "{{ uuid }}" * 200, "b": "{{segment_name}}" * 57,
                         "c": "{{nope}}" * 100}}))


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1", "0x7f.1",
                                  "127.0.0.1.", "1.2.3.4.5", "4294967296", "1.2.3.256"])
def test_an_ipv4_address_not_written_as_four_decimals_is_refused_for_new_hooks(
        host: str) -> None:
    """The resolver reads them as addresses, the HTTP client refuses every request to
    them: each delivery failed as unreachable, then died. Stored hooks keep loading."""
    url = f"http://{host}:8080/in"
    with pytest.raises(ValidationError, match=f"the host '{re.escape(host)}' is an IPv4 "
                       "address the HTTP client does not take"):
        HttpBatch(url=url)
    with pytest.raises(ValidationError, match="token_url: the host"):
        HttpBatch(url="http://127.0.0.1/in", auth={
            "kind": "oauth2", "token_url": url, "client_id": "c", "client_secret": "s"})
    assert HttpBatch.model_validate({"url": url}, context={"stored": True}).url == url
