"""JSON objects read with each key once: ``json.loads(text, object_pairs_hook=unique_keys)``.

Python's ``json`` keeps the last value of a key given twice, silently: a hook file
with ``"active"`` twice, or a settings file with two ``REDIS_URL``, would act on one
of them without a word. Files and API bodies of hooks, settings and event types are
read this way (events, decoded by msgspec, keep the last value, as documented)."""

from __future__ import annotations

from typing import Any


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of ``pairs``; ValueError naming a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out
