"""Catalogue of an account's object names, looked up by the custom_data parameters.

Kinds and their fields:

==========  ==========================  =======================================
kind        fields                      parameters fed
==========  ==========================  =======================================
campaigns   name, subid                 {{campaign_name}}, {{campaign_subid}}
databases   name                        {{database_name}}
segments    name                        {{segment_name}}
templates   name, subject               {{message_name}}, {{message_subject}}
resources   name                        {{resource_name}}
==========  ==========================  =======================================

Ids are scoped by account: one account never sees another's names.
"""

from __future__ import annotations

from typing import Any

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "campaigns": ("name", "subid"),
    "databases": ("name",),
    "segments": ("name",),
    "templates": ("name", "subject"),
    "resources": ("name",),
}


class NameCatalogue:
    """Names by (account, kind, id). Plain dicts inside, so it pickles cheaply."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, int], dict[str, str]] = {}

    def upsert(self, account_id: int, kind: str, obj_id: int, **fields: str) -> None:
        """Add or update one object; unknown kinds or fields raise ValueError."""
        allowed = KIND_FIELDS.get(kind)
        if allowed is None:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KIND_FIELDS)}")
        unknown = set(fields) - set(allowed)
        if unknown:
            raise ValueError(
                f"{kind}: unknown field(s) {', '.join(sorted(unknown))}; accepted: "
                + ", ".join(allowed)
            )
        # a new dict, never the one held: a copy (``copy``) shares the others
        key = (account_id, kind, obj_id)
        self._entries[key] = {**self._entries.get(key, {}),
                              **{k: str(v) for k, v in fields.items()}}

    def remove(self, account_id: int, kind: str, obj_id: int) -> None:
        self._entries.pop((account_id, kind, obj_id), None)

    def copy(self) -> NameCatalogue:
        """Another catalogue of the same names (its entries its own to change)."""
        out = NameCatalogue()
        out._entries = dict(self._entries)  # the fields' dicts are replaced, never changed
        return out

    def get(self, account_id: int, kind: str, obj_id: int | None, field: str = "name") -> str:
        """The field's value, or "" when the object or field is unknown (spec g)."""
        if obj_id is None:
            return ""
        entry = self._entries.get((account_id, kind, obj_id))
        return entry.get(field, "") if entry else ""

    def to_records(self) -> list[dict[str, Any]]:
        return [
            {"account_id": a, "kind": k, "id": i, **fields}
            for (a, k, i), fields in self._entries.items()
        ]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> NameCatalogue:
        names = cls()
        for rec in records:
            fields = {k: v for k, v in rec.items() if k not in ("account_id", "kind", "id")}
            names.upsert(int(rec["account_id"]), rec["kind"], int(rec["id"]), **fields)
        return names

    def __len__(self) -> int:
        return len(self._entries)
