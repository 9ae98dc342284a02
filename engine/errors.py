"""The one exception tree of hookray.

    HookrayError
    ├── ConfigError          a setting in main.json or the environment is invalid
    │   └── PrefixTaken      another engine runs with this REDIS_PREFIX
    ├── HookError            a hook's settings are invalid
    ├── EventError           an event (or a batch of events) is malformed
    ├── NotFound             a hook, dead letter, ... does not exist
    └── TransportError       a delivery failed
        ├── ConnectError     the destination could not be reached
        ├── Timeout          the destination did not answer in time
        └── Rejected         the destination answered, but not with success

Driver errors (aiohttp, aio-pika, aiokafka, redis) are wrapped into these at the
boundary, so retry logic reasons about hookray's types only.
"""

from __future__ import annotations

from typing import Any


class HookrayError(Exception):
    """Base of every error hookray raises on purpose."""


class ConfigError(HookrayError):
    """A setting is invalid: names the key, the value and what is accepted."""


class DamagedRecord(ConfigError):
    """A value the engine keeps in Redis holds what the engine never writes (written
    from outside it): the message names the key and how to mend it, for an operator;
    ``what`` says what is damaged naming no key, for answers anyone may read."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class HookError(HookrayError):
    """A hook's settings are invalid: names the field and the reason. ``issues``:
    (field, reason) of each problem, where the error is about fields of the hook."""

    def __init__(self, message: str, issues: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.issues = issues or []


class PrefixTaken(ConfigError):
    """Another engine holds this engine's claim on its REDIS_PREFIX (engine/lease.py):
    ``Engine.start`` is refused (a ConfigError too: the setting to change is
    REDIS_PREFIX), and a running engine's workers wait instead of reading the same
    intake."""


class Backlogged(HookrayError):
    """The intake holds more entries not yet processed than INTAKE_MAX_ENTRIES allows
    in a partition the events would go to: nothing was accepted; publish again later."""


class EventError(HookrayError):
    """Events are malformed; ``issues`` lists every bad event of the batch."""

    def __init__(self, message: str, issues: list | None = None) -> None:
        super().__init__(message)
        self.issues = issues or []


class NotFound(HookrayError):
    """The hook, dead letter or other object asked for does not exist."""


class Conflict(HookrayError):
    """A change raced others and could not be made; trying again may succeed."""


class Stale(HookrayError):
    """A change made on the condition that the hook is still as it was read (its ETag,
    HTTP If-Match) found it changed since: read it again, then change that."""


class TransportError(HookrayError):
    """A delivery failed; retried every HOOK_RETRY_PERIOD_SEC, then dead-lettered.
    ``failed``: when only some of its messages failed (the others were delivered),
    their positions in the delivery; only they are sent again. ``status``: the HTTP
    status of the answer that failed it, when there was one."""

    failed: list[int] | None = None
    status: int | None = None


class ConnectError(TransportError):
    """The destination could not be reached (refused, DNS, TLS, auth handshake)."""


class Timeout(TransportError):
    """The destination did not answer in time."""


class Queued(Timeout):
    """The delivery waited DESTINATION_QUEUE_SEC for its destination and was not sent:
    sent again later without using up one of its re-sends."""


class Rejected(TransportError):
    """The destination answered without success (status, success regex, broker nack)."""


def named(value: str, limit: int = 100) -> str:
    """``value`` (an id a caller gave) as an error names it: as it is when it is short,
    printable text without spaces, else its repr cut to ``limit`` characters; an
    empty or megabyte-long id stays readable in the message."""
    if value and len(value) <= limit and value.isprintable() and " " not in value:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


SHOWN_CHARS = 100  # most characters of a value sent that an error quotes back


def quoted(value: Any) -> str:
    """``value`` as an error quotes it back: its repr, at most SHOWN_CHARS characters
    (then "…"): a request may send megabytes where a name is expected; a value built
    in Python may nest deeper than its repr can go (then named by its kind)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to be shown"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"
