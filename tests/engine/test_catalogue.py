"""Event catalogue: the built-in codes of spec (c), dense indices, extension from data."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from engine.catalogue import (
    CATEGORIES,
    EventCatalogue,
    EventType,
    builtin_catalogue,
    load_catalogue,
)
from engine.errors import ConfigError

T, D, IMP, PIX = "tracking", "delivery", "import", "pixel"

# code -> (UI name, category, channel), in the order of spec section (c)
SPEC_TABLE: dict[str, tuple[str, str, str]] = {
    # email
    "send": ("Send", D, "email"),
    "reply": ("Reply", D, "email"),
    "uopen": ("Unique Open", T, "email"),
    "open": ("Open", T, "email"),
    "uclick": ("Unique Click", T, "email"),
    "click": ("Click", T, "email"),
    "confirm": ("Confirm", T, "email"),
    "confirmsub": ("Confirm Subscription", T, "email"),
    "unsub": ("Unsubscribe", T, "email"),
    "complain": ("Complain", D, "email"),
    "sbounce": ("SoftBounce", D, "email"),
    "hbounce": ("HardBounce", D, "email"),
    "suppress": ("Suppression", D, "email"),
    "deliv": ("Delivered", D, "email"),
    "undeliv": ("Undelivered", D, "email"),
    "read": ("Read Message", T, "email"),
    "glanced": ("Glanced Message", T, "email"),
    "skimmed": ("Skimmed Message", T, "email"),
    # profile import
    "import_manual": ("Manual Import", IMP, "profile"),
    "import_file": ("File Import", IMP, "profile"),
    "import_api": ("API Import", IMP, "profile"),
    # SMS
    "send_sms": ("Send SMS", D, "sms"),
    "click_sms": ("Click SMS", T, "sms"),
    "uclick_sms": ("Unique Click SMS", T, "sms"),
    "deliv_sms": ("Delivered SMS", D, "sms"),
    "undeliv_sms": ("Undelivered SMS", D, "sms"),
    "unsub_sms": ("Unsubscribe SMS", T, "sms"),
    # push (UI names of the last four were not recovered; ours)
    "uopen_push": ("Unique Open Push", T, "push"),
    "open_push": ("Open Push", T, "push"),
    "send_push": ("Send Push", D, "push"),
    "click_push": ("Click Push", T, "push"),
    "uclick_push": ("Unique Click Push", T, "push"),
    "deliv_push": ("Delivered Push", D, "push"),
    "undeliv_push": ("Undelivered Push", D, "push"),
    # hookray's own code for an AK-Pixel hit
    "pixel": ("Pixel Action", PIX, "web"),
}

# spec (d): the tracking variant of event_data lists exactly these codes
SPEC_TRACKING_CODES = {
    "uopen", "open", "uclick", "click", "confirm", "confirmsub", "unsub", "read", "glanced",
    "skimmed", "click_sms", "uclick_sms", "unsub_sms", "uopen_push", "open_push", "click_push",
    "uclick_push",
}


@pytest.fixture
def cat() -> EventCatalogue:
    return builtin_catalogue()


def row(code: str, category: str = D, channel: str = "viber", **extra: Any) -> dict[str, Any]:
    return {"code": code, "category": category, "channel": channel, **extra}


def write_types(tmp_path: Path, doc: Any, name: str = "extra_types.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


# --- built-in codes ------------------------------------------------------------------------


def test_all_35_builtin_codes_in_spec_order(cat: EventCatalogue) -> None:
    assert len(cat) == 35
    assert cat.codes() == list(SPEC_TABLE)


@pytest.mark.parametrize(("code", "expected"), SPEC_TABLE.items())
def test_builtin_code_category_channel_and_name(
    cat: EventCatalogue, code: str, expected: tuple[str, str, str]
) -> None:
    name, category, channel = expected
    assert code in cat
    event_type = cat.get(code)
    assert isinstance(event_type, EventType)
    assert (event_type.code, event_type.name, event_type.category, event_type.channel) == (
        code, name, category, channel
    )
    assert cat.category(code) == category


def test_counts_per_category(cat: EventCatalogue) -> None:
    assert Counter(cat.category(code) for code in cat.codes()) == {
        T: 17, D: 14, IMP: 3, PIX: 1
    }
    assert len(cat.by_category(T)) == 17
    assert len(cat.by_category(D)) == 14
    assert cat.by_category(IMP) == ["import_manual", "import_file", "import_api"]
    assert cat.by_category(PIX) == ["pixel"]
    assert sum(len(cat.by_category(c)) for c in CATEGORIES) == len(cat)


def test_tracking_codes_are_the_spec_tracking_list(cat: EventCatalogue) -> None:
    assert set(cat.by_category(T)) == SPEC_TRACKING_CODES


def test_counts_per_channel(cat: EventCatalogue) -> None:
    channels = Counter(cat.get(code).channel for code in cat.codes())
    assert channels == {"email": 18, "profile": 3, "sms": 6, "push": 7, "web": 1}


def test_categories_constant() -> None:
    assert CATEGORIES == ("tracking", "delivery", "import", "pixel")


def test_by_unknown_category_is_empty(cat: EventCatalogue) -> None:
    assert cat.by_category("promo") == []


def test_dense_indices_follow_file_order(cat: EventCatalogue) -> None:
    assert [cat.index(code) for code in cat.codes()] == list(range(len(cat)))
    assert cat.index("send") == 0
    assert cat.index("pixel") == 34


def test_builtin_data_file_is_well_formed() -> None:
    text = resources.files("engine").joinpath("data/event_types.json").read_text("utf-8")
    rows = json.loads(text)["event_types"]
    codes = [r["code"] for r in rows]
    assert len(codes) == len(set(codes)) == 35
    for r in rows:
        assert r["category"] in CATEGORIES
        assert r["name"] and r["channel"]
    guessed = {r["code"] for r in rows if "guessed" in r.get("note", "")}
    assert guessed == {"deliv_push", "undeliv_push"}


@pytest.mark.parametrize("missing", ["promo", "", "CLICK", None, 5])
def test_unknown_code(cat: EventCatalogue, missing: Any) -> None:
    assert missing not in cat
    if isinstance(missing, str):
        with pytest.raises(KeyError, match=f"unknown event type {missing!r}"):
            cat.get(missing)
        with pytest.raises(KeyError, match="unknown event type"):
            cat.index(missing)
        with pytest.raises(KeyError, match="unknown event type"):
            cat.category(missing)


def test_event_type_is_immutable(cat: EventCatalogue) -> None:
    with pytest.raises(AttributeError):
        cat.get("click").category = D  # type: ignore[misc]


def test_builtin_and_default_load_are_cached() -> None:
    assert builtin_catalogue() is builtin_catalogue()
    assert load_catalogue() is builtin_catalogue()
    assert load_catalogue(None) is builtin_catalogue()


# --- extension -----------------------------------------------------------------------------


def test_extended_adds_codes_with_next_indices(cat: EventCatalogue) -> None:
    bigger = cat.extended([row("send_viber", channel="viber"), row("promo_issued", T, "promo")])
    assert len(bigger) == 37
    assert bigger.index("send_viber") == 35
    assert bigger.index("promo_issued") == 36
    assert bigger.category("promo_issued") == T
    assert bigger.get("send_viber").name == "send_viber"  # name defaults to the code
    assert [bigger.index(c) for c in bigger.codes()] == list(range(37))
    # the original is untouched
    assert len(cat) == 35
    assert "send_viber" not in cat
    assert builtin_catalogue().codes() == list(SPEC_TABLE)


def test_extended_replacing_a_code_keeps_its_index(cat: EventCatalogue) -> None:
    replaced = cat.extended([row("deliv_push", D, "push", name="Push Delivered (real code)")])
    assert len(replaced) == 35
    assert replaced.index("deliv_push") == cat.index("deliv_push") == 32
    assert replaced.get("deliv_push").name == "Push Delivered (real code)"
    assert cat.get("deliv_push").name == "Delivered Push"

    moved = cat.extended([row("click", D, "email")])
    assert moved.index("click") == cat.index("click")
    assert moved.category("click") == D
    assert "click" in moved.by_category(D)
    assert cat.category("click") == T


def test_extended_with_nothing_is_an_equal_copy(cat: EventCatalogue) -> None:
    copy = cat.extended([])
    assert copy is not cat
    assert copy.codes() == cat.codes()


def test_constructor_with_repeated_code_keeps_first_index() -> None:
    small = EventCatalogue([row("a"), row("b"), row("a", T, "sms")])
    assert len(small) == 2
    assert small.index("a") == 0
    assert small.index("b") == 1
    assert small.category("a") == T


def test_empty_catalogue() -> None:
    empty = EventCatalogue([])
    assert len(empty) == 0
    assert empty.codes() == []
    assert "click" not in empty


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (row("x", "promo"), "event type 'x': category 'promo' is not one of "
         "tracking, delivery, import, pixel"),
        ({"code": "x", "category": D}, "missing or not a string: channel"),
        ({"category": D, "channel": "sms"}, "missing or not a string: code"),
        ({"code": "", "category": "", "channel": ""},
         "missing or not a string: code, category, channel"),
        ({"code": ["x"], "category": D, "channel": "sms"}, "missing or not a string: code"),
        ("send_viber", "event type 'send_viber': expected an object (code, category, channel)"),
        (None, "event type None: expected an object"),
    ],
)
def test_extended_rejects_bad_rows(cat: EventCatalogue, bad: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cat.extended([row("fine"), bad])
    assert message in str(info.value)


# --- extra file ----------------------------------------------------------------------------


def test_load_catalogue_with_extra_file(tmp_path: Path) -> None:
    path = write_types(
        tmp_path,
        {"event_types": [
            {"code": "send_viber", "name": "Send Viber", "category": "delivery",
             "channel": "viber"},
            {"code": "promo_activated", "name": "Promo code activated", "category": "tracking",
             "channel": "promo", "note": "extra keys are ignored"},
            {"code": "deliv_push", "name": "Delivered Push", "category": "delivery",
             "channel": "push"},
        ]},
    )
    loaded = load_catalogue(path)
    assert len(loaded) == 37
    assert loaded.get("send_viber").name == "Send Viber"
    assert loaded.index("send_viber") == 35
    assert loaded.index("promo_activated") == 36
    assert loaded.index("deliv_push") == 32
    assert load_catalogue(path) is loaded  # cached per file
    assert load_catalogue() is builtin_catalogue()
    assert "send_viber" not in builtin_catalogue()


def test_load_catalogue_with_empty_extra_list(tmp_path: Path) -> None:
    path = write_types(tmp_path, {"event_types": []})
    assert load_catalogue(path).codes() == list(SPEC_TABLE)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "Expecting property name"),
        ('{"types": []}', 'no list under "event_types"'),
        ("[]", 'no list under "event_types"'),
        ('{"event_types": 5}', 'no list under "event_types"'),
        ('{"event_types": "abc"}', 'no list under "event_types"'),
        ('{"event_types": {"a": 1}}', 'no list under "event_types"'),
        ('{"event_types": [], "event_types": []}', "duplicate key 'event_types'"),
        ("", "Expecting value"),
    ],
)
def test_bad_extra_file(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad_types.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_catalogue(str(path))
    message = str(info.value)
    assert message.startswith(f"EVENT_TYPES_FILE={path}: cannot read event types (")
    assert reason in message
    assert 'expected a JSON object {"event_types": [{"code", "name", "category", "channel"}' in (
        message
    )


def test_missing_extra_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_catalogue(str(path))
    assert f"EVENT_TYPES_FILE={path}: cannot read event types (" in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_bad_category_in_extra_file(tmp_path: Path) -> None:
    path = write_types(tmp_path, {"event_types": [row("promo_issued", "promo", "promo")]})
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    assert str(info.value) == (
        f"EVENT_TYPES_FILE={path}: event_types[0]: "
        "event type 'promo_issued': category 'promo' is not one of "
        "tracking, delivery, import, pixel"
    )


def test_a_code_no_event_could_carry_is_refused_a_long_one_is_an_exchange_hooks_concern(
        tmp_path: Path) -> None:
    """A code that is not UTF-8 could be named by no event or hook; a long one serves
    HTTP and Kafka hooks, and only an exchange hook's routing key "<list_id>.<code>"
    must fit AMQP's 255 bytes (refused there, tests/engine/test_hooks.py)."""
    long = "é" * 117 + "xy"  # 236 bytes
    path = write_types(tmp_path, {"event_types": [row(long)]})
    assert long in load_catalogue(path)
    path = write_types(tmp_path, {"event_types": [row("promo\ud800")]})
    with pytest.raises(ConfigError, match=r"event type 'promo\\ud800': the code is not valid "
                       "UTF-8 \\(a lone surrogate\\)"):
        load_catalogue(path)


def test_non_object_row_in_extra_file(tmp_path: Path) -> None:
    path = write_types(tmp_path, {"event_types": ["send_viber"]})
    with pytest.raises(ConfigError, match="expected an object"):
        load_catalogue(path)


def test_a_test_event_of_a_code_from_the_extra_file_is_sent(tmp_path: Path) -> None:
    """The test event of a code EVENT_TYPES_FILE adds is built with that catalogue
    (its category's sample event_data), not refused as unknown."""
    import asyncio

    from engine.hooks import parse_hook
    from engine.testevent import send_test_event
    from engine.transports.stub import StubTransport

    path = write_types(tmp_path, {"event_types": [
        {"code": "send_viber", "name": "Send Viber", "category": "delivery",
         "channel": "viber"}]})
    catalogue = load_catalogue(path)
    hook = parse_hook({"id": 3, "name": "h", "account_id": 1, "actions": ["send_viber"],
                       "target": {"http_batch": {"url": "http://127.0.0.1:9/x"}}}, catalogue)
    stub = StubTransport()
    outcome = asyncio.run(send_test_event(hook, "send_viber", transport=stub,
                                          catalogue=catalogue))
    assert outcome.ok, outcome
    (message,) = [json.loads(p) for d in stub.sent for p in d.parts]
    assert message["event_type"] == "send_viber" and message["is_test"] is True
    assert message["event_data"]["campaign_id"] == 130


def test_an_event_types_file_with_a_byte_order_mark_or_nested_too_deeply(
        tmp_path: Path) -> None:
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"event_types": [
        {"code": "bom_ev", "name": "BOM", "category": "delivery", "channel": "x"}]}).encode())
    assert "bom_ev" in load_catalogue(bom)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError) as err:
        load_catalogue(deep)
    assert str(err.value) == (f"EVENT_TYPES_FILE={deep}: cannot read event types (JSON nested "
                              "too deeply to be read)")


def test_an_edited_event_types_file_is_read_again(tmp_path: Path) -> None:
    from engine.catalogue import load_catalogue

    path = tmp_path / "types.json"
    path.write_text(json.dumps({"event_types": [
        {"code": "send_viber", "name": "Send Viber", "category": "delivery",
         "channel": "viber"}]}))
    first = load_catalogue(str(path))
    assert "send_viber" in first and load_catalogue(str(path)) is first  # cached
    path.write_text(json.dumps({"event_types": [
        {"code": "send_viber", "name": "Send Viber", "category": "delivery",
         "channel": "viber"},
        {"code": "deliv_viber", "name": "Viber delivered", "category": "delivery",
         "channel": "viber"}]}))
    again = load_catalogue(str(path))
    assert "deliv_viber" in again and "deliv_viber" not in first


def test_a_bad_row_of_the_file_is_named_by_the_setting_the_file_and_its_place(
        tmp_path: Path) -> None:
    """A row error named neither EVENT_TYPES_FILE nor the row, and showed the whole row:
    one with a 50,000-character name made an error line as long."""
    path = write_types(tmp_path, {"event_types": [
        row("fine"), {"name": "n" * 50_000, "category": "delivery", "channel": "sms"}]})
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    text = str(info.value)
    assert text.startswith(f"EVENT_TYPES_FILE={path}: event_types[1]: event type {{'name'"
                           ), text[:300]
    assert text.endswith("missing or not a string: code") and len(text) < 400, len(text)
    path = write_types(tmp_path, {"event_types": [row("c" * 50_000, "p" * 50_000)]})
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    assert "is not one of tracking" in str(info.value) and len(str(info.value)) < 800
    path = write_types(tmp_path, {"event_types": [{"code": "x", "category": "delivery"}]})
    with pytest.raises(ConfigError, match=r"=\S+: event_types\[0\]: event type 'x': missing"
                       r" or not a string: channel$"):
        load_catalogue(path)
