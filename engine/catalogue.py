"""Event catalogue: every event code with its category and channel, kept as data.

The built-in list lives in ``engine/data/event_types.json``; an installation adds
codes by pointing the ``EVENT_TYPES_FILE`` setting at a JSON file of the same shape
(``{"event_types": [{"code", "name", "category", "channel"}, ...]}``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

from engine.errors import ConfigError, quoted
from engine.jsonkeys import MAX_CONFIG_BYTES, read_whole, unique_keys

CATEGORIES = ("tracking", "delivery", "import", "pixel")
# a code's UTF-8 bytes at most for a RabbitMQ exchange hook (engine.hooks): its routing
# key "<list_id>.<code>" (a list id of up to 19 digits and a dot) must fit AMQP's 255
# bytes, or every delivery of it fails (HTTP and Kafka hooks take longer codes)
MAX_CODE_BYTES = 235


@dataclass(frozen=True, slots=True)
class EventType:
    code: str
    name: str
    category: str
    channel: str
    index: int


class EventCatalogue:
    """Event codes, each with a dense integer index (used as a column value in matching)."""

    def __init__(self, rows: list[dict]) -> None:
        self._types: dict[str, EventType] = {}
        for row in rows:
            self._add(row)

    def _add(self, row: dict) -> None:
        if not isinstance(row, dict):
            raise ConfigError(f"event type {_shown(row)}: expected an object (code, "
                              "category, channel)")
        missing = [k for k in ("code", "category", "channel")
                   if not row.get(k) or not isinstance(row[k], str)]
        if missing:
            raise ConfigError(f"event type {_shown(row)}: missing or not a string: "
                              f"{', '.join(missing)}")
        try:
            row["code"].encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"event type {quoted(row['code'])}: the code is not valid "
                              "UTF-8 (a lone surrogate): no event or hook could name it") from None
        if row["category"] not in CATEGORIES:
            raise ConfigError(
                f"event type {quoted(row['code'])}: category {quoted(row['category'])} is "
                "not one of "
                f"{', '.join(CATEGORIES)}"
            )
        old = self._types.get(row["code"])
        index = old.index if old else len(self._types)
        self._types[row["code"]] = EventType(
            row["code"], row.get("name", row["code"]), row["category"], row["channel"], index
        )

    def extended(self, rows: list[dict]) -> EventCatalogue:
        """A copy with ``rows`` added (a row with a known code replaces it). A bad row
        raises ConfigError naming its place, ``event_types[i]``."""
        copy = EventCatalogue([])
        copy._types = dict(self._types)
        for i, row in enumerate(rows):
            try:
                copy._add(row)
            except ConfigError as exc:
                raise ConfigError(f"event_types[{i}]: {exc}") from None
        return copy

    def __contains__(self, code: object) -> bool:
        return code in self._types

    def __len__(self) -> int:
        return len(self._types)

    def get(self, code: str) -> EventType:
        try:
            return self._types[code]
        except KeyError:
            raise KeyError(f"unknown event type {code!r}") from None

    def codes(self) -> list[str]:
        return list(self._types)

    def category(self, code: str) -> str:
        return self.get(code).category

    def index(self, code: str) -> int:
        return self.get(code).index

    def by_category(self, category: str) -> list[str]:
        return [t.code for t in self._types.values() if t.category == category]


def _read(path: Path | str) -> list[dict]:
    try:
        doc = json.loads(read_whole(path, MAX_CONFIG_BYTES).decode("utf-8-sig"),
                         object_pairs_hook=unique_keys)
        if not isinstance(doc, dict) or not isinstance(doc.get("event_types"), list):
            # a string would be read character by character, an object key by key
            raise ValueError("no list under \"event_types\"")
        return list(doc["event_types"])
    except RecursionError:
        raise ConfigError(f"EVENT_TYPES_FILE={path}: cannot read event types (JSON nested "
                          "too deeply to be read)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"EVENT_TYPES_FILE={path}: cannot read event types ({exc}); expected a JSON "
            'object {"event_types": [{"code", "name", "category", "channel"}, ...]}'
        ) from None


@cache
def builtin_catalogue() -> EventCatalogue:
    text = resources.files("engine").joinpath("data/event_types.json").read_text("utf-8")
    return EventCatalogue(json.loads(text)["event_types"])


def load_catalogue(extra_file: str | None = None) -> EventCatalogue:
    """The built-in catalogue, extended by ``extra_file`` when given: read again once
    the file changed (its modification time, size or inode), so an engine started
    again in the same process after the file was edited has its new codes."""
    if not extra_file:
        return builtin_catalogue()
    try:
        st = os.stat(extra_file)
        stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None  # _read names the file and why it cannot be read
    return _extended(extra_file, stamp)


@lru_cache(maxsize=64)
def _extended(extra_file: str, stamp: tuple[int, int, int] | None) -> EventCatalogue:
    rows = _read(extra_file)
    try:
        return builtin_catalogue().extended(rows)
    except ConfigError as exc:  # which file, as _read's errors say
        raise ConfigError(f"EVENT_TYPES_FILE={extra_file}: {exc}") from None


def _shown(row: object) -> str:
    """A row as an error shows it: by its code when it has one, else cut short (a name
    of 50,000 characters made an error line as long)."""
    code = row.get("code") if isinstance(row, dict) else None
    return quoted(code if isinstance(code, str) and code else row)


def engine_codes(recorded: bytes | str | None) -> list[str] | None:
    """The event codes ``Intake.keep_records`` recorded, or None (none recorded,
    or a record that cannot be read: nothing is refused for it)."""
    if recorded is None:
        return None
    try:
        codes = json.loads(recorded)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to read
        return None
    return codes if isinstance(codes, list) and all(isinstance(c, str) for c in codes) \
        else None
