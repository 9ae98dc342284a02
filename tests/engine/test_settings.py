"""Installation settings: defaults, main.json, environment overrides, validation messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine import settings as settings_module
from engine.errors import ConfigError, HookrayError, quoted
from engine.settings import Settings, load_settings, with_overrides

DEFAULTS: dict[str, Any] = {
    # spec (f): documented platform defaults
    "HOOK_RETRY_TIMES": 4,
    "HOOK_RETRY_PERIOD_SEC": 15.0,
    "HOOK_CONTENT_CLEANUP_HOURS": 72.0,
    "DEAD_LETTER_RETENTION_HOURS": 0.0,
    # engine settings
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_PREFIX": "hookray",
    "ENGINE_LEASE_SEC": 15.0,
    "PARTITIONS": 4,
    "HTTP_POOL_SIZE": 2,
    "RABBITMQ_POOL_SIZE": 1,
    "KAFKA_POOL_SIZE": 1,
    "INTAKE_MAX_BATCH": 5_000,
    "INTAKE_MAX_ENTRIES": 100_000,
    "READ_MAX_ENTRIES": 4,
    "MAX_HTTP_BATCH": 10_000,
    "MAX_BATCH_BYTES": 8 * 2**20,
    "MAX_HOOKS_PER_ACCOUNT": 1_000,
    "DESTINATION_CONCURRENCY": 8,
    "DESTINATION_QUEUE_SEC": 60.0,
    "HTTP_REQUEST_TIMEOUT_SEC": 10.0,
    "DESTINATION_DENY": "link-local,metadata",
    "BROKER_TIMEOUT_SEC": 10.0,
    "EVENT_TYPES_FILE": None,
    "RAY_ADDRESS": None,
    "API_HOST": "127.0.0.1",
    "API_PORT": None,
    "API_MAX_BODY_BYTES": 16 * 1024 * 1024,
    "API_TLS_CA_DIR": "",
}

# A valid, non-default value for every setting: (value in main.json, same value as env text).
CUSTOM: dict[str, tuple[Any, str]] = {
    "HOOK_RETRY_TIMES": (2, "2"),
    "HOOK_RETRY_PERIOD_SEC": (0.5, "0.5"),
    "HOOK_CONTENT_CLEANUP_HOURS": (1.5, "1.5"),
    "DEAD_LETTER_RETENTION_HOURS": (720.0, "720"),
    "REDIS_URL": ("rediss://cache.internal:6380/2", "rediss://cache.internal:6380/2"),
    "REDIS_PREFIX": ("hr:test-1.a_b", "hr:test-1.a_b"),
    "ENGINE_LEASE_SEC": (2.5, "2.5"),
    "PARTITIONS": (64, "64"),
    "HTTP_POOL_SIZE": (8, "8"),
    "RABBITMQ_POOL_SIZE": (3, "3"),
    "KAFKA_POOL_SIZE": (4, "4"),
    "INTAKE_MAX_BATCH": (100, "100"),
    "INTAKE_MAX_ENTRIES": (0, "0"),
    "READ_MAX_ENTRIES": (1, "1"),
    "MAX_HTTP_BATCH": (500, "500"),
    "MAX_BATCH_BYTES": (2**20, "1048576"),
    "MAX_HOOKS_PER_ACCOUNT": (20, "20"),
    "DESTINATION_CONCURRENCY": (1024, "1024"),
    "DESTINATION_QUEUE_SEC": (2.5, "2.5"),
    "HTTP_REQUEST_TIMEOUT_SEC": (600, "600"),
    "DESTINATION_DENY": ("loopback, 10.0.0.0/8", "loopback, 10.0.0.0/8"),
    "BROKER_TIMEOUT_SEC": (2.5, "2.5"),
    "EVENT_TYPES_FILE": ("/etc/hookray/events.json", "/etc/hookray/events.json"),
    "RAY_ADDRESS": ("ray://head:10001", "ray://head:10001"),
    "API_HOST": ("0.0.0.0", "0.0.0.0"),
    "API_PORT": (8080, "8080"),
    "API_MAX_BODY_BYTES": (1_048_576, "1048576"),
    "API_TLS_CA_DIR": ("/etc/hookray/ca", "/etc/hookray/ca"),
}

BOUND_INT = "Input should be a valid integer"
BOUND_NUM = "Input should be a valid number"
BOOL = "expected a number, not a boolean"

# (key, bad value as env text, what the message must say is accepted)
BAD_ENV: list[tuple[str, str, str]] = [
    ("HOOK_RETRY_TIMES", "-1", "accepted: a number >= 0"),
    ("HOOK_RETRY_TIMES", "1001", "accepted: a number <= 1000"),
    ("HOOK_RETRY_TIMES", "four", BOUND_INT),
    ("HOOK_RETRY_TIMES", "1.5", BOUND_INT),
    ("HOOK_RETRY_TIMES", "", BOUND_INT),
    ("HOOK_RETRY_PERIOD_SEC", "0", "accepted: a number >= 0.001"),
    ("HOOK_RETRY_PERIOD_SEC", "0.0005", "accepted: a number >= 0.001"),
    ("HOOK_RETRY_PERIOD_SEC", "-15", "accepted: a number >= 0.001"),
    ("HOOK_RETRY_PERIOD_SEC", "86401", "accepted: a number <= 86400"),
    ("HOOK_RETRY_PERIOD_SEC", "inf", "finite number"),
    ("HOOK_RETRY_PERIOD_SEC", "nan", "finite number"),
    ("HOOK_RETRY_PERIOD_SEC", "15s", BOUND_NUM),
    # Python's digit separators: a typo such as "1_0" is not read as 10
    ("HOOK_RETRY_TIMES", "1_0", "expected a number, without '_'"),
    ("HOOK_RETRY_PERIOD_SEC", "1_5.0", "expected a number, without '_'"),
    ("HOOK_CONTENT_CLEANUP_HOURS", "0", "accepted: a number > 0"),
    ("HOOK_CONTENT_CLEANUP_HOURS", "8761", "accepted: a number <= 8760"),
    ("HOOK_CONTENT_CLEANUP_HOURS", "3d", BOUND_NUM),
    ("DEAD_LETTER_RETENTION_HOURS", "-1", "accepted: a number >= 0"),
    ("DEAD_LETTER_RETENTION_HOURS", "30d", BOUND_NUM),
    ("REDIS_URL", "http://127.0.0.1:6379", "not a Redis URL; accepted: redis://[[user]:"
                                           "password@]host[:port][/db], rediss:// (TLS) or "
                                           "unix:///path/to/redis.sock"),
    ("REDIS_URL", "127.0.0.1:6379", "not a Redis URL; accepted: redis://"),
    ("PARTITIONS", "four", "accepted: a whole number"),
    ("PARTITIONS", "1.5", "accepted: a whole number"),
    ("HOOK_RETRY_PERIOD_SEC", "soon", "accepted: a number"),
    # parsed as redis-py parses it: what it refuses when connecting is refused at load
    ("REDIS_URL", "redis://127.0.0.1:notaport/0",
     "not a URL redis-py can use: Port could not be cast to integer value as 'notaport'"),
    ("REDIS_URL", "redis://[::1", "not a URL redis-py can use: Invalid IPv6 URL"),
    ("REDIS_URL", "redis://127.0.0.1:99999/0", "not a URL redis-py can use: Port out of range"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc",
     "not a URL redis-py can use: Invalid value for 'socket_timeout'"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?foo=bar",
     "not a URL redis-py can use: unknown option 'foo'"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?protocol=9", "protocol must be either 2 or 3"),
    ("REDIS_URL", "unix:///run/redis.sock?db=one", "Invalid value for 'db'"),
    ("REDIS_URL", "unix:///run/redis.sock?db=-1", "the database must be a whole number >= 0"),
    # a path redis-py ignores (it would use database 0) or takes for an impossible one
    ("REDIS_URL", "redis://127.0.0.1:6379/abc",
     "the database, the path after HOST:PORT, must be a whole number >= 0 "
     "(e.g. redis://HOST:6379/0); redis-py would use database 0"),
    ("REDIS_URL", "redis://127.0.0.1:6379/9/x", "must be a whole number >= 0"),
    ("REDIS_URL", "redis://127.0.0.1:6379/-1", "must be a whole number >= 0"),
    # Redis refuses SELECT of any such number, with no word of the URL
    ("REDIS_URL", "redis://127.0.0.1:6379/99999999999999999999",
     "the database must be a whole number from 0 to 2147483647"),
    ("REDIS_URL", "unix:///run/redis.sock?db=2147483648",
     "the database must be a whole number from 0 to 2147483647"),
    # options redis-py passes on unchecked, failing every command or changing replies
    ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_type=abc",
     "option 'socket_type' is not taken here; accepted: client_name, db,"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?decode_responses=true",
     "option 'decode_responses' is not taken here"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?protocol=3",
     "protocol=3: the engine reads Redis' replies as protocol 2 (RESP2)"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?legacy_responses=false",
     "option 'legacy_responses' is not taken here"),
    # redis-py would send again a write Redis may have carried out (a count made twice)
    ("REDIS_URL", "redis://127.0.0.1:6379/0?retry_on_timeout=true",
     "option 'retry_on_timeout' is not taken here: redis-py would send a command again"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?retry_on_error=TimeoutError",
     "option 'retry_on_error' is not taken here: redis-py would send a command again"),
    ("EVENT_TYPES_FILE", "/tmp/a\x00b", "holds a NUL character"),
    ("EVENT_TYPES_FILE", "/tmp/\ud800.json",
     "not valid UTF-8: a lone surrogate '\\ud800' at character 5"),
    ("REDIS_PREFIX", "", "at least 1 character"),
    ("REDIS_PREFIX", "x" * 65, "at most 64 characters"),
    ("REDIS_PREFIX", "has space", "accepted: letters, digits and _ . : - (no spaces"),
    # x:stats:engine, its engine's claim, would be the engine stats of the prefix x
    ("REDIS_PREFIX", "x:stats", "'stats' as the last word after a ':': this prefix would "
     "share keys with the engine of the prefix before it"),
    ("REDIS_PREFIX", "app:content:7", "'content' after a ':': this prefix would share keys"),
    ("ENGINE_LEASE_SEC", "0", "accepted: a number >= 1"),
    ("ENGINE_LEASE_SEC", "15s", BOUND_NUM),
    ("PARTITIONS", "0", "accepted: a number >= 1"),
    ("PARTITIONS", "4097", "accepted: a number <= 4096"),
    ("PARTITIONS", "many", BOUND_INT),
    ("HTTP_POOL_SIZE", "0", "accepted: a number >= 1"),
    ("HTTP_POOL_SIZE", "257", "accepted: a number <= 256"),
    ("RABBITMQ_POOL_SIZE", "0", "accepted: a number >= 1"),
    ("RABBITMQ_POOL_SIZE", "257", "accepted: a number <= 256"),
    ("KAFKA_POOL_SIZE", "0", "accepted: a number >= 1"),
    ("KAFKA_POOL_SIZE", "257", "accepted: a number <= 256"),
    ("INTAKE_MAX_BATCH", "0", "accepted: a number >= 1"),
    ("INTAKE_MAX_BATCH", "1000001", "accepted: a number <= 1000000"),
    ("INTAKE_MAX_ENTRIES", "-1", "accepted: a number >= 0"),
    ("READ_MAX_ENTRIES", "0", "accepted: a number >= 1"),
    ("READ_MAX_ENTRIES", "10001", "accepted: a number <= 10000"),
    ("MAX_HTTP_BATCH", "0", "accepted: a number >= 1"),
    ("MAX_HTTP_BATCH", "10001", "accepted: a number <= 10000"),
    ("MAX_HOOKS_PER_ACCOUNT", "0", "accepted: a number >= 1"),
    ("MAX_BATCH_BYTES", "1023", "accepted: a number >= 1024"),
    ("MAX_BATCH_BYTES", "268435457", "accepted: a number <= 268435456"),
    ("DESTINATION_CONCURRENCY", "0", "accepted: a number >= 1"),
    ("DESTINATION_CONCURRENCY", "1025", "accepted: a number <= 1024"),
    ("DESTINATION_QUEUE_SEC", "0", "accepted: a number > 0"),
    ("DESTINATION_QUEUE_SEC", "3601", "accepted: a number <= 3600"),
    ("HTTP_REQUEST_TIMEOUT_SEC", "0", "accepted: a number > 0"),
    ("HTTP_REQUEST_TIMEOUT_SEC", "601", "accepted: a number <= 600"),
    ("HTTP_REQUEST_TIMEOUT_SEC", "ten", BOUND_NUM),
    ("BROKER_TIMEOUT_SEC", "0", "accepted: a number > 0"),
    ("BROKER_TIMEOUT_SEC", "601", "accepted: a number <= 600"),
    ("API_HOST", "", "at least 1 character"),
    ("API_HOST", "my host", "accepted: a host name or IP address"),
    ("API_HOST", "h" * 256, "at most 255 characters"),
    ("API_PORT", "-1", "accepted: a number >= 0"),
    ("API_PORT", "65536", "accepted: a number <= 65535"),
    ("API_PORT", "http", BOUND_INT),
    ("API_MAX_BODY_BYTES", "1023", "accepted: a number >= 1024"),
    ("API_MAX_BODY_BYTES", "1073741825", "accepted: a number <= 1073741824"),
    ("API_MAX_BODY_BYTES", "16MB", BOUND_INT),
    ("DESTINATION_DENY", "loopbak", "'loopbak' is neither a network"),
    ("DESTINATION_DENY", "10.0.0.0/33", "'10.0.0.0/33' is neither a network"),
    ("API_TLS_CA_DIR", "ca", "accepted: an absolute directory path, or empty"),
    ("API_TLS_CA_DIR", "/" + "d" * 4096, "at most 4096 characters"),
]

# (key, bad JSON value in main.json, what the message must say is accepted)
BAD_FILE: list[tuple[str, Any, str]] = [
    ("HOOK_RETRY_TIMES", -1, "accepted: a number >= 0"),
    ("HOOK_RETRY_TIMES", 2.5, "Input should be a valid integer"),
    ("HOOK_RETRY_TIMES", True, BOOL),
    ("HOOK_RETRY_TIMES", None, BOUND_INT),
    ("HOOK_RETRY_PERIOD_SEC", 0, "accepted: a number >= 0.001"),
    ("HOOK_RETRY_PERIOD_SEC", False, BOOL),
    ("HOOK_RETRY_PERIOD_SEC", [15], BOUND_NUM),
    ("HOOK_CONTENT_CLEANUP_HOURS", -72, "accepted: a number > 0"),
    ("HOOK_CONTENT_CLEANUP_HOURS", True, BOOL),
    ("DEAD_LETTER_RETENTION_HOURS", 87_601, "accepted: a number <= 87600"),
    ("REDIS_URL", "tcp://redis:6379", "not a Redis URL; accepted: redis://"),
    ("REDIS_URL", 6379, "Input should be a valid string"),
    ("REDIS_URL", "redis://redis:6379/db0", "the database, the path after HOST:PORT"),
    ("REDIS_PREFIX", "a/b", "accepted: letters, digits and _ . : -"),
    ("REDIS_PREFIX", None, "Input should be a valid string"),
    ("ENGINE_LEASE_SEC", 0.5, "accepted: a number >= 1"),
    ("ENGINE_LEASE_SEC", 3601, "accepted: a number <= 3600"),
    ("PARTITIONS", 0, "accepted: a number >= 1"),
    ("PARTITIONS", True, BOOL),
    ("HTTP_POOL_SIZE", 1000, "accepted: a number <= 256"),
    ("RABBITMQ_POOL_SIZE", -2, "accepted: a number >= 1"),
    ("KAFKA_POOL_SIZE", "two", BOUND_INT),
    ("INTAKE_MAX_BATCH", 0, "accepted: a number >= 1"),
    ("INTAKE_MAX_ENTRIES", 2.5, "Input should be a valid integer"),
    ("READ_MAX_ENTRIES", 0.5, "Input should be a valid integer"),
    ("MAX_HTTP_BATCH", 0, "accepted: a number >= 1"),
    ("MAX_HOOKS_PER_ACCOUNT", 1_000_001, "accepted: a number <= 1000000"),
    ("MAX_HTTP_BATCH", 1_000_000, "accepted: a number <= 10000"),
    ("MAX_BATCH_BYTES", 2**30, "accepted: a number <= 268435456"),
    ("DESTINATION_CONCURRENCY", {"n": 8}, BOUND_INT),
    ("DESTINATION_QUEUE_SEC", "soon", BOUND_NUM),
    ("HTTP_REQUEST_TIMEOUT_SEC", 0, "accepted: a number > 0"),
    ("HTTP_REQUEST_TIMEOUT_SEC", True, BOOL),
    ("BROKER_TIMEOUT_SEC", -1, "accepted: a number > 0"),
    ("BROKER_TIMEOUT_SEC", True, BOOL),
    ("EVENT_TYPES_FILE", 5, "Input should be a valid string"),
    ("EVENT_TYPES_FILE", ["a.json"], "Input should be a valid string"),
    ("RAY_ADDRESS", 10001, "Input should be a valid string"),
    ("RAY_ADDRESS", {"host": "head"}, "Input should be a valid string"),
    ("API_HOST", 8080, "Input should be a valid string"),
    ("API_HOST", None, "Input should be a valid string"),
    ("API_PORT", True, BOOL),
    ("API_PORT", 70000, "accepted: a number <= 65535"),
    ("API_PORT", "8080x", BOUND_INT),
    ("API_MAX_BODY_BYTES", 0, "accepted: a number >= 1024"),
    ("API_MAX_BODY_BYTES", True, BOOL),
    ("API_MAX_BODY_BYTES", 2.5, BOUND_INT),
    ("API_TLS_CA_DIR", 5, "Input should be a valid string"),
    ("DESTINATION_DENY", ["private", 10], "Input should be a valid string"),
    ("API_TLS_CA_DIR", "./ca", "accepted: an absolute directory path, or empty"),
]


def write_main(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "main.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def config_error(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ if environ is not None else {})
    return str(info.value)


# --- tables are complete -------------------------------------------------------------------


def test_tables_cover_every_setting() -> None:
    fields = set(Settings.model_fields)
    assert set(DEFAULTS) == fields
    assert set(CUSTOM) == fields
    assert {key for key, _, _ in BAD_FILE} == fields
    # every setting that can be wrong as environment text has an env case
    env_checkable = fields - {"RAY_ADDRESS"}
    assert {key for key, _, _ in BAD_ENV} == env_checkable


# --- defaults ------------------------------------------------------------------------------


def test_documented_default_constants() -> None:
    assert settings_module.DEFAULT_RETRY_TIMES == 4
    assert settings_module.DEFAULT_RETRY_PERIOD_SEC == 15
    assert settings_module.DEFAULT_CONTENT_CLEANUP_HOURS == 72


@pytest.mark.parametrize(("key", "expected"), DEFAULTS.items())
def test_default_of_every_setting(key: str, expected: Any) -> None:
    loaded = load_settings()  # no file, the (cleaned) process environment
    assert getattr(loaded, key) == expected
    assert type(getattr(loaded, key)) is type(expected)
    assert getattr(Settings(), key) == expected


def test_defaults_without_file_or_environment() -> None:
    assert load_settings(None, environ={}).model_dump() == DEFAULTS
    # a path given empty (a variable that was not set) is refused, not read as none
    with pytest.raises(ConfigError, match="settings file: the path given is empty"):
        load_settings("", environ={})


def test_empty_main_json_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write_main(tmp_path, {}), environ={}).model_dump() == DEFAULTS


def test_no_setting_in_the_environment() -> None:
    assert not set(Settings.model_fields) & set(os.environ)
    assert load_settings(None).model_dump() == DEFAULTS


def test_conftest_removes_settings_from_the_environment() -> None:
    """A setting in the shell that runs the tests (here HOOK_RETRY_TIMES=9) reaches no
    test: the check above passes all the same."""
    environ = {**os.environ, "HOOK_RETRY_TIMES": "9", "PYTEST_ADDOPTS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_no_setting_in_the_environment"],
        env=environ, cwd=Path(__file__).parents[2], capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


# --- main.json and environment -------------------------------------------------------------


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_every_setting_loads_from_main_json(tmp_path: Path, as_str: bool) -> None:
    path = write_main(tmp_path, {key: file_value for key, (file_value, _) in CUSTOM.items()})
    loaded = load_settings(str(path) if as_str else path, environ={})
    for key, (file_value, _) in CUSTOM.items():
        assert getattr(loaded, key) == file_value, key


def test_every_setting_loads_from_environment_text() -> None:
    loaded = load_settings(environ={key: text for key, (_, text) in CUSTOM.items()})
    for key, (file_value, _) in CUSTOM.items():
        assert getattr(loaded, key) == file_value, key
    assert isinstance(loaded.HOOK_RETRY_TIMES, int)
    assert isinstance(loaded.HOOK_RETRY_PERIOD_SEC, float)


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_RETRY_TIMES", "7")
    monkeypatch.setenv("REDIS_PREFIX", "other")
    loaded = load_settings()
    assert loaded.HOOK_RETRY_TIMES == 7
    assert loaded.REDIS_PREFIX == "other"


def test_explicit_environ_replaces_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_RETRY_TIMES", "7")
    assert load_settings(environ={}).HOOK_RETRY_TIMES == 4


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write_main(
        tmp_path,
        {"HOOK_RETRY_TIMES": 4, "HOOK_RETRY_PERIOD_SEC": 30, "REDIS_URL": "redis://file:1/0"},
    )
    loaded = load_settings(
        path, environ={"HOOK_RETRY_TIMES": "2", "REDIS_URL": "redis://env:2/0"}
    )
    assert loaded.HOOK_RETRY_TIMES == 2  # env wins
    assert loaded.REDIS_URL == "redis://env:2/0"  # env wins
    assert loaded.HOOK_RETRY_PERIOD_SEC == 30.0  # only in the file
    assert loaded.HOOK_CONTENT_CLEANUP_HOURS == 72.0  # nowhere: default


def test_empty_environment_value_overrides_file(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"RAY_ADDRESS": "ray://head:10001", "REDIS_URL": "redis://h/0"})
    loaded = load_settings(path, environ={"RAY_ADDRESS": "", "REDIS_URL": ""})
    assert loaded.RAY_ADDRESS == ""
    assert loaded.REDIS_URL == ""  # empty: `hookray demo` starts an embedded Redis


@pytest.mark.parametrize("text", ["", "null", " NULL "])
def test_environment_unsets_api_port_with_empty_or_null(tmp_path: Path, text: str) -> None:
    """The file starts the API; the environment turns it off again (a setting that
    may be null and is not text: "" or null mean null)."""
    path = write_main(tmp_path, {"API_PORT": 8081})
    assert load_settings(path, environ={}).API_PORT == 8081
    assert load_settings(path, environ={"API_PORT": text}).API_PORT is None
    with pytest.raises(ConfigError, match="API_PORT='none'"):
        load_settings(path, environ={"API_PORT": "none"})


def test_unrelated_environment_variables_are_ignored() -> None:
    loaded = load_settings(environ={"HOOK_RETRY": "x", "hook_retry_times": "9", "PATH": "/bin"})
    assert loaded.model_dump() == DEFAULTS


def test_settings_are_frozen() -> None:
    loaded = load_settings(environ={})
    with pytest.raises(ValidationError, match="frozen"):
        loaded.HOOK_RETRY_TIMES = 9  # type: ignore[misc]


# --- bad values ----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "accepted"), BAD_ENV)
def test_bad_environment_value_is_rejected_with_full_message(
    key: str, value: str, accepted: str
) -> None:
    message = config_error(environ={key: value})
    assert message.startswith("invalid settings:")
    assert f"{key}={quoted(value)} (from the environment): " in message  # cut if long
    assert accepted in message


def test_a_bad_value_is_quoted_short_however_large_or_deep() -> None:
    """A value of megabytes is not quoted back whole; one nested too deeply to be
    shown is named by its kind (its repr would fail), still a ConfigError."""
    settings = load_settings(None, environ={})
    deep: list[Any] = []
    for _ in range(3000):
        deep = [deep]
    with pytest.raises(ConfigError) as info:
        with_overrides(settings, {"PARTITIONS": deep, "REDIS_PREFIX": "p" * 1_000_000})
    message = str(info.value)
    assert "PARTITIONS=a list nested too deeply to be shown (given): " in message
    assert f"REDIS_PREFIX={quoted('p' * 1_000_000)} (given): String should have at most " \
        "64 characters" in message
    assert len(message) < 1000


@pytest.mark.parametrize(("key", "value", "accepted"), BAD_FILE)
def test_bad_file_value_is_rejected_with_full_message(
    tmp_path: Path, key: str, value: Any, accepted: str
) -> None:
    path = write_main(tmp_path, {key: value})
    message = config_error(path)
    assert message.startswith("invalid settings:")
    assert f"{key}={value!r} (in {path}): " in message
    assert accepted in message


def test_bad_environment_value_reported_not_the_file_value(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"PARTITIONS": 8})
    message = config_error(path, environ={"PARTITIONS": "0"})
    assert "PARTITIONS='0' (from the environment)" in message
    assert "8" not in message.split("PARTITIONS=", 1)[1].split(":", 1)[0]


def test_bad_file_value_is_not_reported_when_environment_overrides_it(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"PARTITIONS": 0})
    assert load_settings(path, environ={"PARTITIONS": "2"}).PARTITIONS == 2


def test_every_bad_value_of_a_load_is_reported(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"HOOK_RETRY_TIMES": -1, "REDIS_PREFIX": "a b"})
    message = config_error(path, environ={"HTTP_POOL_SIZE": "0"})
    lines = message.splitlines()
    assert lines[0] == "invalid settings:"
    assert len(lines) == 4
    assert any(line.strip().startswith(f"HOOK_RETRY_TIMES=-1 (in {path})") for line in lines)
    assert any(line.strip().startswith(f"REDIS_PREFIX='a b' (in {path})") for line in lines)
    assert any(
        line.strip().startswith("HTTP_POOL_SIZE='0' (from the environment)") for line in lines
    )


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"HOOK_RETRY_TIMEZ": 3})
    message = config_error(path)
    assert f"HOOK_RETRY_TIMEZ=3 (in {path}): unknown setting; accepted keys: " in message
    for key in Settings.model_fields:
        assert key in message


def test_unknown_key_direct_construction_is_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(NOT_A_SETTING=1)  # type: ignore[call-arg]


def test_config_error_is_a_hookray_error() -> None:
    assert issubclass(ConfigError, HookrayError)


# --- the file itself -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "main.json"
    assert config_error(path) == (
        f"settings file {path}: cannot be read (No such file or directory)"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert config_error(tmp_path) == f"settings file {tmp_path}: cannot be read (Is a directory)"


def test_a_setting_given_twice_in_a_file_is_refused(tmp_path: Path) -> None:
    """json keeps the last of two values, silently: which Redis would be meant?"""
    path = tmp_path / "main.json"
    path.write_text('{"REDIS_URL": "redis://a:6379/0", "REDIS_URL": "redis://b:6379/0"}',
                    encoding="utf-8")
    assert config_error(path) == (f"settings file {path}: not valid JSON (duplicate key "
                                  "'REDIS_URL')")


@pytest.mark.parametrize("text", ["{", '{"HOOK_RETRY_TIMES": 4,}', "", "HOOK_RETRY_TIMES=4"])
def test_invalid_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "main.json"
    path.write_text(text, encoding="utf-8")
    message = config_error(path)
    assert message.startswith(f"settings file {path}: not valid JSON (")
    assert "line 1 column" in message


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "main.json"
    path.write_bytes(b'{"REDIS_PREFIX": "\xff\xfe"}')
    assert config_error(path).startswith(f"settings file {path}: not valid JSON (")


@pytest.mark.parametrize("doc", [[], [{"HOOK_RETRY_TIMES": 4}], None, "text", 4, True])
def test_json_that_is_not_an_object(tmp_path: Path, doc: Any) -> None:
    path = write_main(tmp_path, doc)
    assert config_error(path) == f"settings file {path}: expected a JSON object of settings"


# --- redacted ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("redis://user:s3cret@redis.internal:6379/0", "redis://***@redis.internal:6379/0",
         ["user", "s3cret"]),
        ("redis://:s3cret@redis.internal/0", "redis://***@redis.internal/0", ["s3cret"]),
        ("rediss://user:p@ss%2Fword@h:6380/1", "rediss://***@h:6380/1", ["p@ss", "word"]),
        ("unix://user:s3cret@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1",
         ["s3cret"]),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***", ["s3cret"]),
        ("unix:///run/redis.sock?db=0&password=s3cret&socket_timeout=1",
         "unix:///run/redis.sock?db=0&password=***&socket_timeout=1", ["s3cret"]),
        # the passphrase of the TLS client key (redis-py reads names percent-decoded)
        ("rediss://h:6380/0?ssl_password=s3cret&socket_connect_timeout=2",
         "rediss://h:6380/0?ssl_password=***&socket_connect_timeout=2", ["s3cret"]),
        ("rediss://h:6380/0?ssl%5Fpassword=s3cret", "rediss://h:6380/0?ssl%5Fpassword=***",
         ["s3cret"]),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", []),
        ("redis://h/0?client_name=a@b", "redis://h/0?client_name=a@b", []),
        ("", "", []),
    ],
)
def test_redacted_masks_redis_credentials(url: str, shown: str, secrets: list[str]) -> None:
    loaded = load_settings(environ={"REDIS_URL": url, "HOOK_RETRY_TIMES": "3"})
    redacted = loaded.redacted()
    assert redacted["REDIS_URL"] == shown
    for secret in secrets:
        assert secret not in json.dumps(redacted)
    # everything else is shown as is
    assert {k: v for k, v in redacted.items() if k != "REDIS_URL"} == {
        **{k: v for k, v in DEFAULTS.items() if k != "REDIS_URL"}, "HOOK_RETRY_TIMES": 3
    }
    assert url == loaded.REDIS_URL  # the settings themselves keep the credentials


@pytest.mark.parametrize("url", [
    "redis://user:s3cret@127.0.0.1:notaport/0",
    "redis://:s3cret@127.0.0.1:6379/0?foo=bar",
    "redis://127.0.0.1:6379/abc?password=s3cret",
    "rediss://user:s3cret@h:6380/0?ssl_cert_reqs=bogus",
    "redis://user:s3cret/x@h:6379/0",  # a "/" in the password, not written %2F
    "redis://user:s3%2Fcret@h:6379/x",
    "rediss://h:6380/0?ssl%5Fpassword=s3cret&socket_timeout=abc",
    # the password's end would be taken as the socket's path, and quoted in errors
    "unix://:s3cret/x@/run/redis.sock", "unix://u:x/s3cret@/run/redis.sock",
])
def test_a_refused_redis_url_is_shown_without_its_password(url: str) -> None:
    message = config_error(environ={"REDIS_URL": url})
    assert "REDIS_URL='" in message and "***" in message
    assert "s3cret" not in message and "s3%2Fcret" not in message and "cret" not in message


@pytest.mark.parametrize(("url", "db"), [
    ("redis://no-such-host.invalid:6379/3", 3),  # checked without connecting
    ("redis://h", 0), ("redis://h/", 0), ("redis://h:6379/%31", 1),
    ("redis://user:p%40ss@h:6379/2", 2),
    ("redis://h/0?socket_timeout=2.5&health_check_interval=10", 0),
    ("rediss://h:6380/4?ssl_cert_reqs=none", 4),
    ("rediss://h:6380/1?ssl_ciphers=ECDHE-RSA-AES256-GCM-SHA384&client_name=hr", 1),
    ("redis://h/6?protocol=2", 6),
    ("unix:///run/redis.sock?db=5", 5), ("unix:///run/redis.sock", 0),
    ("unix:///run/redis@main/redis.sock", 0), ("redis://h/2147483647", 2147483647),
])
def test_redis_urls_redis_py_takes_are_accepted(url: str, db: int) -> None:
    import redis

    loaded = load_settings(environ={"REDIS_URL": url})
    assert url == loaded.REDIS_URL
    assert redis.ConnectionPool.from_url(url).connection_kwargs.get("db", 0) == db


@pytest.mark.parametrize(("url", "used"), [
    ("redis://h:6379/ 1", "database 1"),  # int(" 1"): redis-py takes it as 1, not 0
    ("redis://h:6379/1%20", "database 1"),
    ("redis://h:6379/1/2", "database 12"),  # the path without its "/"s
    ("redis://h:6379/abc", "database 0"),  # no number at all: redis-py's default
    ("redis://h:6379/9/x", "database 0"),
    ("redis://h:6379/abc?db=3", "database 3 (its db= option)"),  # the path is ignored
])
def test_a_refused_database_path_says_which_database_redis_py_would_use(
        url: str, used: str) -> None:
    import redis

    message = config_error(environ={"REDIS_URL": url})
    assert f"REDIS_URL={url!r} (from the environment): the database, the path after " \
           "HOST:PORT, must be a whole number >= 0" in message
    assert f"; redis-py would use {used}" in message
    really = redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0)
    assert used.split()[1] == str(really)


@pytest.mark.parametrize(("url", "path", "option"), [
    ("redis://h/0?db=5", "0", "5"), ("redis://h:6379/2?db=0", "2", "0"),
    ("rediss://h:6380/%31?db=2&ssl_cert_reqs=none", "1", "2"),
])
def test_a_db_option_that_disagrees_with_the_path_is_refused(
        url: str, path: str, option: str) -> None:
    """redis-py takes the db= option and ignores the path: the engine would use
    another database than the one written as the path."""
    import redis

    assert str(redis.Redis.from_url(url).connection_pool.connection_kwargs["db"]) == option
    message = config_error(environ={"REDIS_URL": url})
    assert f"REDIS_URL={url!r} (from the environment): the database is written twice, " \
           f"differently: {path} as the path and db={option} as an option, which " \
           "redis-py uses (ignoring the path); write it once" in message


@pytest.mark.parametrize(("url", "db"), [
    ("redis://h/4?db=4", 4), ("redis://h/?db=3", 3), ("redis://h?db=2", 2),
    ("redis://h/1?db=01", 1), ("redis://h/6?db=", 6),  # an empty db= is no option
])
def test_a_db_option_alone_or_agreeing_with_the_path_is_accepted(url: str, db: int) -> None:
    import redis

    assert url == load_settings(environ={"REDIS_URL": url}).REDIS_URL
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0) == db


def test_max_http_batch_is_bounded_like_a_hooks_max_batch_size() -> None:
    """A MAX_HTTP_BATCH above a hook's own bound could never take effect."""
    from engine.hooks import HttpBatch

    def bound(field: Any) -> int:
        return next(m.le for m in field.metadata if getattr(m, "le", None) is not None)

    hook_bound = bound(HttpBatch.model_fields["max_batch_size"])
    assert bound(Settings.model_fields["MAX_HTTP_BATCH"]) == hook_bound == 10_000
    assert load_settings(environ={"MAX_HTTP_BATCH": "10000"}).MAX_HTTP_BATCH == 10_000


@pytest.mark.parametrize("address", [
    None, "", "auto", "local", "127.0.0.1:6379", "head.internal:6379", "[::1]:6379",
    "ray://head:10001", "ray://head"])
def test_ray_addresses_of_a_cluster_are_accepted(address: str | None) -> None:
    assert settings_module.ray_address_problem(address) is None


@pytest.mark.parametrize(("address", "reason"), [
    ("http://127.0.0.1:8265", "the address of the Ray Jobs API"),
    ("https://ray.example.com", "the address of the Ray Jobs API"),
    ("HTTP://head:8265", "RAY_API_SERVER_ADDRESS, which `ray job submit` reads first"),
    ("garbage", "expected HOST:PORT with a port from 1 to 65535"),
    ("head:", "expected HOST:PORT"), (":6379", "expected HOST:PORT"),
    ("head:0", "expected HOST:PORT"), ("head:65536", "expected HOST:PORT"),
    ("head:gcs", "expected HOST:PORT"),
    ("redis://head:6379", "expected ray://HOST:PORT or no scheme"), ("ray://", "ray://HOST"),
])
def test_ray_addresses_that_name_no_cluster_are_explained(address: str, reason: str) -> None:
    problem = settings_module.ray_address_problem(address)
    assert problem is not None and reason in problem
    assert "accepted: auto, the cluster's HOST:PORT (its GCS, e.g. head:6379)" in problem


def test_ray_address_is_not_checked_by_commands_that_only_use_redis() -> None:
    """deploy/README.md has operators export the Jobs API's address as RAY_ADDRESS for
    `ray job submit`; `hookray publish` and the like in that shell never join Ray, so
    the setting is checked when the engine joins Ray (actors.driver), not at load."""
    loaded = load_settings(environ={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert loaded.RAY_ADDRESS == "http://127.0.0.1:8265"


def test_the_delivery_timeout_follows_the_target_kind() -> None:
    cfg = Settings(HTTP_REQUEST_TIMEOUT_SEC=3.0, BROKER_TIMEOUT_SEC=7.0)
    assert cfg.timeout_for("http_batch") == 3.0
    assert {cfg.timeout_for(k) for k in ("kafka", "rabbitmq_queue", "rabbitmq_exchange")} == {7.0}


@pytest.mark.parametrize(("hours", "seconds"), [(72, 259_200), (0.5, 1_800), (0.0001, 1)])
def test_content_is_kept_whole_seconds_and_never_zero(hours: float, seconds: int) -> None:
    assert Settings(HOOK_CONTENT_CLEANUP_HOURS=hours).content_ttl_sec == seconds


@pytest.mark.parametrize("ttl", [0, -5, 1.5])
def test_content_with_a_ttl_below_a_second_is_refused(ttl: Any) -> None:
    from engine.keys import Keys
    from engine.stores import ContentStore

    store = ContentStore(None, Keys("t"), 60)  # type: ignore[arg-type]  # refused first
    with pytest.raises(ValueError, match="ttl_sec: expected whole seconds from 1 to"):
        store.put(1, {"s1": {"subject": "x"}}, ttl_sec=ttl)


# --- files as editors write them, files no parser can read -----------------------------------


def test_a_settings_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "main.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"HOOK_RETRY_TIMES": 2}).encode())
    assert load_settings(path, environ={}).HOOK_RETRY_TIMES == 2


def test_a_settings_file_nested_too_deeply_is_named(tmp_path: Path) -> None:
    path = tmp_path / "main.json"
    path.write_text('{"HOOK_RETRY_TIMES": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert config_error(path) == f"settings file {path}: JSON nested too deeply to be read"


@pytest.mark.parametrize(("option", "value", "shown"), [
    ("socket_timeout", "-1", "-1.0"), ("socket_timeout", "0", "0.0"),
    ("socket_timeout", "1e400", "inf"), ("socket_connect_timeout", "nan", "nan"),
])
def test_redis_url_timeouts_a_socket_refuses_are_named(option: str, value: str,
                                                       shown: str) -> None:
    url = f"redis://127.0.0.1:6379/0?{option}={value}"
    message = config_error(environ={"REDIS_URL": url})
    assert f"{option}={shown}: expected a finite number of seconds > 0" in message
    for fine in ("2.5", "100000"):
        ok = load_settings(environ={"REDIS_URL": f"redis://127.0.0.1:6379/0?{option}={fine}"})
        assert ok.REDIS_URL.endswith(f"={fine}")


def test_destination_deny_takes_a_list_in_the_file(tmp_path: Path) -> None:
    path = write_main(tmp_path, {"DESTINATION_DENY": ["loopback", "192.0.2.0/24"]})
    loaded = load_settings(path, environ={})
    assert loaded.DESTINATION_DENY == "loopback,192.0.2.0/24"
    assert loaded.transport_options("kafka") == {"timeout_sec": 10.0,
                                                 "deny": "loopback,192.0.2.0/24",
                                                 "queue_sec": 60.0}
    assert load_settings(path, environ={"DESTINATION_DENY": "none"}).DESTINATION_DENY == "none"


@pytest.mark.parametrize("empty", ["", " ", ",", "\r", "\x0b", "\u00a0", []])
def test_an_empty_destination_deny_is_refused_none_opens_every_address(
        tmp_path: Path, empty: Any) -> None:
    """A variable left empty (``DESTINATION_DENY: ${UNSET}``) opened every address, the
    cloud's metadata service included, without a word: "none" says so."""
    from engine.transports.guard import guard_for

    if isinstance(empty, str):
        message = config_error(environ={"DESTINATION_DENY": empty})
    else:
        message = config_error(write_main(tmp_path, {"DESTINATION_DENY": empty}))
    assert "DESTINATION_DENY=" in message and "empty: write none to let deliveries " \
        "connect to any address" in message and "link-local,metadata" in message
    assert "'None' is neither a network" in config_error(environ={"DESTINATION_DENY": "None"})
    opened = load_settings(environ={"DESTINATION_DENY": " none\n"})
    assert guard_for(opened.DESTINATION_DENY).reason("169.254.169.254") is None
    assert guard_for(load_settings(environ={}).DESTINATION_DENY).reason("169.254.169.254")


def test_a_kubernetes_service_link_in_api_port_is_named() -> None:
    message = config_error(environ={"API_PORT": "tcp://10.96.0.12:80"})
    assert "API_PORT='tcp://10.96.0.12:80' (from the environment)" in message
    assert "Kubernetes sets API_PORT=tcp://... in the pods of a namespace with a Service " \
        "named api" in message


def _keys_of(prefix: str, send_ids: list[str]) -> set[str]:
    """Keys of an engine of ``prefix``: every fixed one, and samples of the others
    (account content under ``send_ids``, which accounts choose)."""
    from engine.auth import tokens_key
    from engine.keys import Keys

    k = Keys(prefix)
    found = {v for v in vars(k).values() if isinstance(v, str) and v != prefix}
    found |= {k.intake(0), k.last_ack(0, "partition-0"), k.processing(0, "partition-0"),
              k.booked("retry"),
              k.booked("partition:0:partition-0"), k.profiles(1), k.dead_of_account(1),
              k.dead_of_hook(1), k.alive("retry"), k.alive("partition:0"), k.stats(1),
              tokens_key(prefix), *(k.content(1, s) for s in send_ids)}
    return found


def test_a_prefix_sharing_keys_with_a_shorter_one_is_refused() -> None:
    """Every prefix ``x:W`` (and ``x:W:1``) whose keys include one of ``x``'s is
    refused; those that share none are taken, except ``content`` anywhere."""
    from engine.keys import PREFIX_CLASHES, PREFIX_LAST_CLASHES

    words = {key.split(":")[1] for key in _keys_of("x", ["s"])} | {"prod", "eu", "partition"}
    for longer in [f"x:{w}" for w in words] + [f"x:{w}:1" for w in words]:
        mine = _keys_of(longer, [])
        # an account of x may store content under any send id: those that are keys here
        theirs = _keys_of("x", [key.removeprefix("x:content:1:") for key in mine
                                if key.startswith("x:content:1:")])
        try:
            Settings(REDIS_PREFIX=longer)
            taken = True
        except ValidationError:
            taken = False
        if mine & theirs:
            assert not taken, (longer, mine & theirs)
        else:
            assert taken == (longer.split(":")[1] not in PREFIX_CLASHES), longer
    assert words >= PREFIX_LAST_CLASHES | PREFIX_CLASHES
