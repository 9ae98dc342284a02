"""JSON objects read with each key once: ``json.loads(text, object_pairs_hook=unique_keys)``;
and JSON files read whole (``read_whole``), a device or an oversized file refused.

Python's ``json`` keeps the last value of a key given twice, silently: a hook file
with ``"active"`` twice, or a settings file with two ``REDIS_URL``, would act on one
of them without a word. Files and API bodies of hooks, settings and event types are
read this way (events, decoded by msgspec, keep the last value, as documented)."""

from __future__ import annotations

import os
import stat
from typing import Any

from engine.errors import quoted


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of ``pairs``; ValueError naming a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {quoted(key)}")
        out[key] = value
    return out


MAX_CONFIG_BYTES = 16 << 20  # the largest settings or event types file read


class NotAFile(OSError):
    """A path a JSON document cannot be read from whole: a device (/dev/zero would be
    read until memory ran out), or a file over the size a reader takes."""

    def __str__(self) -> str:
        return str(self.strerror)


def read_whole(path: str | os.PathLike[str], limit: int, advice: str = "") -> bytes:
    """The bytes of the file at ``path`` (pipes are read too); NotAFile for a device or
    for more than ``limit`` bytes (its message ends with ``advice``), OSError when it
    cannot be read."""
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise NotAFile(None, "a device, not a file of JSON")
        data = f.read(limit + 1)
    if len(data) > limit:
        size = f"{limit >> 30} GiB" if limit >= 1 << 30 else f"{limit >> 20} MiB"
        raise NotAFile(None, f"larger than {size}{advice}")
    return data
