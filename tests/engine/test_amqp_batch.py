"""The AMQP frames ``engine.transports.amqp_batch`` writes are byte for byte those
aiormq and pamqp write for the same ``basic_publish`` calls."""

from __future__ import annotations

import pytest
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from engine.transports.amqp_batch import method_frame, publish_frames

JSON = "application/json"


def pamqp_frames(channel: int, max_content: int, exchange: str, keys: list[str],
                 bodies: list[bytes], ids: list[str], mandatory: bool) -> bytes:
    out = b""
    for key, body, mid in zip(keys, bodies, ids, strict=True):
        frames: list[object] = [
            Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory),
            ContentHeader(properties=Basic.Properties(content_type=JSON, delivery_mode=2,
                                                      message_id=mid),
                          body_size=len(body))]
        frames += [ContentBody(body[i:i + max_content])
                   for i in range(0, len(body), max_content)]
        out += ChannelFrame.marshall(channel, frames).payload  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("mandatory", [True, False])
@pytest.mark.parametrize("channel", [1, 7, 65535])
def test_frames_match_pamqp(channel: int, mandatory: bool) -> None:
    bodies = [b'{"a":1}', "{\"name\":\"Zoë ✓\"}".encode(), b"x" * 300, b"y" * 1000, b""]
    keys = ["12.click", "12.open", "ünïcode.key", "12.click", ""]
    ids = ["m1", "a" * 255, "é" * 10, "id-4", "id-5"]
    got = publish_frames(channel, 256, "hooks.events", keys, bodies, ids, JSON, 2,
                         mandatory)
    assert got == pamqp_frames(channel, 256, "hooks.events", keys, bodies, ids, mandatory)


def test_default_exchange_and_one_frame_per_body() -> None:
    bodies = [b"b" * 100] * 3
    got = publish_frames(1, 131_064, "", ["q"] * 3, bodies, ["1", "2", "3"], JSON, 2, True)
    assert got == pamqp_frames(1, 131_064, "", ["q"] * 3, bodies, ["1", "2", "3"], True)
    assert got.count(method_frame(1, "", "q", True)) == 3


@pytest.mark.parametrize(("exchange", "key", "mid", "field"), [
    ("e" * 256, "k", "m", "exchange"),
    ("e", "k" * 256, "m", "routing key"),
    ("e", "k", "m" * 256, "message id"),
])
def test_names_over_255_bytes_are_refused(exchange: str, key: str, mid: str,
                                          field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} is 256 bytes long"):
        publish_frames(1, 1000, exchange, [key], [b"{}"], [mid], JSON, 2, False)


def test_no_frame_limit_sends_each_body_in_one_frame() -> None:
    """A broker tuned to frame_max 0 (no limit) gives aiormq a negative
    max_content_size; aiormq then sends each body whole, and so does this."""
    bodies = [b"z" * 70_000, b"{}"]
    got = publish_frames(3, -8, "", ["q", "q"], bodies, ["1", "2"], JSON, 2, True)
    assert got == pamqp_frames(3, 10**9, "", ["q", "q"], bodies, ["1", "2"], True)


@pytest.mark.parametrize("size", [256, 512, 513])
def test_bodies_at_the_frame_limit_split_as_aiormq_splits_them(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    got = publish_frames(1, 256, "", ["q"], [body], ["1"], JSON, 2, False)
    assert got == pamqp_frames(1, 256, "", ["q"], [body], ["1"], False)


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError):
        publish_frames(1, 1000, "", ["q", "q"], [b"{}"], ["1", "2"], JSON, 2, True)


def test_a_returned_message_aiormq_logs_is_named_without_its_body(
        caplog: pytest.LogCaptureFixture) -> None:
    """One that comes back after its delivery timed out is logged by aiormq at ERROR
    with its repr: the body (a subscriber's data) must not reach the log."""
    import logging

    from aiormq.abc import DeliveredMessage

    import engine.transports.rabbitmq  # noqa: F401 - installs the log filter

    returned = DeliveredMessage(
        delivery=Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="",
                                       routing_key="q1"),
        header=ContentHeader(properties=Basic.Properties(message_id="m-1")),
        body=b'{"email": "alice@example.org"}', channel=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="aiormq.channel"):
        logging.getLogger("aiormq.channel").error("Unhandled message %r returning", returned)
    assert "alice@example.org" not in caplog.text
    assert "message id 'm-1', exchange '', routing key 'q1', 30 bytes" in caplog.text
