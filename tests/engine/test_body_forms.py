"""One event written over several lines (a pretty-printed file, an accepted form of a
body) that holds a slip: a lone surrogate, a byte that is no UTF-8, a number JSON
cannot hold, a trailing comma. It was read as NDJSON then, one bad "event" per line,
naming no field, and another account's id in it went unseen (the API's 403)."""

from __future__ import annotations

import pytest

from engine.api import _decode, _foreign
from engine.bodies import decode_body, split_items
from engine.catalogue import load_catalogue
from engine.events import decode_batch, one_object

CAT = load_catalogue()


def pretty(extra: bytes = b"", account: int = 23) -> bytes:
    return (b'{\n  "event_type": "click",\n  "event_date": "2026-11-29T10:00:00Z",\n'
            b'  "account_id": ' + str(account).encode() + extra + b"\n}\n")


@pytest.mark.parametrize(("extra", "field", "reason"), [
    (b',\n  "profile_id": "\\ud800"', "profile_id", "a lone surrogate"),
    (b',\n  "profile_id": "\xff"', "profile_id", "the byte 0xff"),
    (b',\n  "event_data": {"x": 1e400}', "event_data", "Number out of range"),
])
def test_a_pretty_printed_event_with_a_bad_value_is_one_bad_event_named_by_its_field(
        extra: bytes, field: str, reason: str) -> None:
    batch, _ = decode_body(pretty(extra), CAT)
    assert batch.events == [] and len(batch.issues) == 1
    (issue,) = batch.issues
    assert issue.index == 0 and issue.field.startswith(field) and reason in issue.reason


def test_a_pretty_printed_event_with_a_syntax_slip_is_a_malformed_body() -> None:
    batch, _ = decode_body(pretty(b","), CAT)  # a trailing comma
    assert [(i.index, i.field) for i in batch.issues] == [(-1, "$")]
    assert batch.issues[0].reason == (
        "not a JSON object: JSON is malformed: trailing comma in object (byte 87)")
    assert pretty(b",").index(b"}") == 87  # the byte named is the body's own, as sent


def test_another_accounts_pretty_printed_event_is_found_even_when_bad() -> None:
    body = pretty(b',\n  "profile_id": "\\ud800"', account=99)
    batch, items = _decode(body, CAT)
    issues, count = _foreign(body, batch, items, 23)
    assert count == 1 and [(i.index, i.field) for i in issues] == [(0, "account_id")]
    assert split_items(body) == [body.strip()]


def test_ndjson_stays_ndjson_its_first_line_bad_or_not() -> None:
    good = b'{"event_type": "click", "event_date": "2026-11-29T10:00:00Z", "account_id": 23}'
    body = b'{"event_type": "click", "event_date": \n' + good + b"\n" + good + b"\n"
    assert not one_object(body)  # its second line is an event of its own
    batch = decode_batch(body, CAT)
    assert len(batch.events) == 2 and [i.index for i in batch.issues] == [0]
    surrogate = good.replace(b'"account_id": 23', b'"account_id": 23, "profile_id": "\\ud800"')
    assert not one_object(surrogate + b"\n" + good + b"\n")
    lines, _ = decode_body(surrogate + b"\n" + good + b"\n", CAT)
    assert len(lines.events) == 1 and [(i.index, i.field) for i in lines.issues] == \
        [(0, "profile_id")]
    assert one_object(pretty()) and len(decode_batch(pretty(), CAT).events) == 1
    # its first two lines bad: its later events are still events of a line each
    cut = b'{"event_type": "click", "event_date": \n'
    two_bad = cut + b"7\n" + good + b"\n" + good + b"\n"
    assert not one_object(two_bad)
    batch = decode_batch(two_bad, CAT)
    assert len(batch.events) == 2 and [i.index for i in batch.issues] == [0, 1]


def test_a_text_body_with_a_lone_surrogate_after_an_escaping_backslash_is_no_json() -> None:
    """Escaped, the backslash before it would have become an escaped backslash, and
    the event accepted with the text "ud800" in it."""
    body = '[{"event_type": "click", "event_date": "2026-11-29T10:00:00Z", ' \
        '"account_id": 23, "profile_id": "a\\\ud800"}]'
    batch, _ = decode_body(body, CAT)
    assert batch.events == [] and [(i.index, i.field) for i in batch.issues] == [(-1, "$")]
    assert "a lone surrogate" in batch.issues[0].reason


def test_an_array_of_too_many_events_is_refused_before_any_is_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted after every event was built: a 15 MiB array took 2 s of the API's time
    and 97 MiB before its 413 (an NDJSON body of the same, 0.08 s)."""
    import engine.events
    from engine.events import TooManyEvents

    class Unused:
        def decode(self, raw: bytes) -> None:
            raise AssertionError("events built before they were counted")

    one = b'{"event_type":"open","event_date":"2026-11-29T10:00:00Z","account_id":1}'
    monkeypatch.setattr(engine.events, "_batch_decoder", Unused())
    with pytest.raises(TooManyEvents):
        decode_batch(b"[" + b",".join([one] * 11) + b"]", CAT, max_events=10)
    monkeypatch.undo()
    assert len(decode_batch(b"[" + b",".join([one] * 10) + b"]", CAT, max_events=10).events) \
        == 10
