"""NameCatalogue: names of an account's objects, looked up by custom_data parameters."""

from __future__ import annotations

import pickle

import pytest

from engine.names import KIND_FIELDS, NameCatalogue


@pytest.fixture
def names() -> NameCatalogue:
    cat = NameCatalogue()
    cat.upsert(1, "campaigns", 10, name="Black Friday", subid="bf-2023")
    cat.upsert(1, "databases", 50, name="Customers")
    cat.upsert(1, "segments", 7, name="VIP")
    cat.upsert(1, "templates", 5, name="Welcome", subject="Hello there")
    cat.upsert(1, "resources", 3, name="Main site")
    cat.upsert(2, "campaigns", 10, name="Other account's campaign", subid="other")
    return cat


def test_kind_fields_are_the_documented_ones() -> None:
    assert KIND_FIELDS == {
        "campaigns": ("name", "subid"),
        "databases": ("name",),
        "segments": ("name",),
        "templates": ("name", "subject"),
        "resources": ("name",),
    }


def test_get_every_kind_and_field(names: NameCatalogue) -> None:
    assert names.get(1, "campaigns", 10) == "Black Friday"
    assert names.get(1, "campaigns", 10, "name") == "Black Friday"
    assert names.get(1, "campaigns", 10, "subid") == "bf-2023"
    assert names.get(1, "databases", 50) == "Customers"
    assert names.get(1, "segments", 7) == "VIP"
    assert names.get(1, "templates", 5) == "Welcome"
    assert names.get(1, "templates", 5, "subject") == "Hello there"
    assert names.get(1, "resources", 3) == "Main site"
    assert len(names) == 6


def test_unknown_object_or_field_is_empty(names: NameCatalogue) -> None:
    assert names.get(1, "campaigns", 999) == ""
    assert names.get(1, "campaigns", None) == ""
    assert names.get(1, "databases", 50, "subid") == ""  # field not set on this object
    assert names.get(1, "segments", 10) == ""  # id of another kind
    assert names.get(1, "no_such_kind", 10) == ""
    assert NameCatalogue().get(1, "campaigns", 10) == ""


def test_field_known_to_kind_but_never_set_is_empty() -> None:
    cat = NameCatalogue()
    cat.upsert(1, "templates", 5, name="Welcome")
    assert cat.get(1, "templates", 5, "subject") == ""
    assert cat.get(1, "templates", 5) == "Welcome"


def test_account_scoping(names: NameCatalogue) -> None:
    assert names.get(1, "campaigns", 10) == "Black Friday"
    assert names.get(2, "campaigns", 10) == "Other account's campaign"
    assert names.get(2, "campaigns", 10, "subid") == "other"
    # account 2 has no database 50, and never sees account 1's
    assert names.get(2, "databases", 50) == ""
    assert names.get(3, "campaigns", 10) == ""


def test_upsert_updates_only_the_given_fields(names: NameCatalogue) -> None:
    names.upsert(1, "campaigns", 10, name="Cyber Monday")
    assert names.get(1, "campaigns", 10) == "Cyber Monday"
    assert names.get(1, "campaigns", 10, "subid") == "bf-2023"
    names.upsert(1, "campaigns", 10, subid="cm")
    assert names.get(1, "campaigns", 10) == "Cyber Monday"
    assert names.get(1, "campaigns", 10, "subid") == "cm"
    assert len(names) == 6  # updated in place, no new entry
    # the other account's object is untouched
    assert names.get(2, "campaigns", 10) == "Other account's campaign"


def test_upsert_stores_values_as_strings() -> None:
    cat = NameCatalogue()
    cat.upsert(1, "campaigns", 1, subid=42)  # type: ignore[arg-type]
    assert cat.get(1, "campaigns", 1, "subid") == "42"


def test_upsert_unknown_kind_raises_with_accepted_kinds() -> None:
    cat = NameCatalogue()
    with pytest.raises(ValueError) as info:
        cat.upsert(1, "campaign", 10, name="x")
    assert str(info.value) == (
        "kind 'campaign' is not one of campaigns, databases, segments, templates, resources"
    )
    assert len(cat) == 0


def test_upsert_unknown_field_raises_with_accepted_fields() -> None:
    cat = NameCatalogue()
    with pytest.raises(ValueError) as info:
        cat.upsert(1, "databases", 50, name="Customers", subject="x", alias="y")
    assert str(info.value) == "databases: unknown field(s) alias, subject; accepted: name"
    with pytest.raises(ValueError) as info:
        cat.upsert(1, "templates", 5, title="x")
    assert str(info.value) == "templates: unknown field(s) title; accepted: name, subject"
    # a rejected upsert stores nothing
    assert len(cat) == 0
    assert cat.get(1, "databases", 50) == ""


def test_to_records(names: NameCatalogue) -> None:
    records = names.to_records()
    assert sorted(records, key=lambda r: (r["account_id"], r["kind"], r["id"])) == [
        {"account_id": 1, "kind": "campaigns", "id": 10, "name": "Black Friday",
         "subid": "bf-2023"},
        {"account_id": 1, "kind": "databases", "id": 50, "name": "Customers"},
        {"account_id": 1, "kind": "resources", "id": 3, "name": "Main site"},
        {"account_id": 1, "kind": "segments", "id": 7, "name": "VIP"},
        {"account_id": 1, "kind": "templates", "id": 5, "name": "Welcome",
         "subject": "Hello there"},
        {"account_id": 2, "kind": "campaigns", "id": 10, "name": "Other account's campaign",
         "subid": "other"},
    ]


def test_records_round_trip(names: NameCatalogue) -> None:
    copy = NameCatalogue.from_records(names.to_records())
    assert len(copy) == len(names)
    assert copy.to_records() == names.to_records()
    for account in (1, 2, 3):
        for kind, fields in KIND_FIELDS.items():
            for obj_id in (3, 5, 7, 10, 50):
                for field in fields:
                    assert copy.get(account, kind, obj_id, field) == names.get(
                        account, kind, obj_id, field
                    )


def test_from_records_accepts_string_ids() -> None:
    cat = NameCatalogue.from_records(
        [{"account_id": "1", "kind": "segments", "id": "7", "name": "VIP"}]
    )
    assert cat.get(1, "segments", 7) == "VIP"
    assert cat.to_records() == [{"account_id": 1, "kind": "segments", "id": 7, "name": "VIP"}]


def test_from_records_validates() -> None:
    with pytest.raises(ValueError) as info:
        NameCatalogue.from_records([{"account_id": 1, "kind": "lists", "id": 1, "name": "x"}])
    assert str(info.value) == (
        "kind 'lists' is not one of campaigns, databases, segments, templates, resources"
    )
    with pytest.raises(ValueError) as info:
        NameCatalogue.from_records(
            [{"account_id": 1, "kind": "segments", "id": 1, "name": "x", "size": "3"}]
        )
    assert str(info.value) == "segments: unknown field(s) size; accepted: name"


def test_empty_round_trip_and_pickle(names: NameCatalogue) -> None:
    assert NameCatalogue().to_records() == []
    assert len(NameCatalogue.from_records([])) == 0
    clone = pickle.loads(pickle.dumps(names))
    assert clone.to_records() == names.to_records()
    assert clone.get(2, "campaigns", 10, "subid") == "other"
