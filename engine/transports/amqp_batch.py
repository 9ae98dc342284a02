"""AMQP 0-9-1 publishes written a whole delivery at a time on an aiormq channel.

aiormq's ``Channel.basic_publish`` takes one coroutine per message: a lock, a
timeout, a pamqp ``Basic.Publish`` and ``ContentHeader`` marshalled field by field,
an item on the connection's write queue and one socket write each. Here the
frames of every message of a delivery are written by one ``bytes.join`` (the
method frame once per routing key, the header from a template), queued as one
``ChannelFrame`` under the channel's lock, and their confirmations registered
where aiormq's reader settles them (``Channel.confirmations``; returned
``mandatory`` messages are matched by ``message_id``, as aiormq does). Acks,
nacks, returns and a channel closing reach these futures exactly as they reach
``basic_publish``'s.

The bytes are those pamqp writes for the same publish (``tests`` compare them):
``Basic.Publish`` (reserved 0, exchange, routing key, mandatory bit), a content
header with ``content_type``, ``delivery_mode`` and ``message_id`` set, and the
body in frames of at most ``Channel.max_content_size`` bytes.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Sequence

import aiormq
from aiormq import exceptions as amqp
from aiormq.abc import ChannelFrame

FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC = 60
_PUBLISH = 40
# property flags: content_type (bit 15), delivery_mode (bit 12), message_id (bit 7)
_FLAGS = 0x8000 | 0x1000 | 0x0080
_frame_head = struct.Struct(">BHI")
_header_head = struct.Struct(">BHIHHQH")


def _shortstr(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"{what} is {len(raw)} bytes long, AMQP allows at most 255")
    return bytes((len(raw),)) + raw


def method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The ``Basic.Publish`` frame."""
    payload = (struct.pack(">HHH", _BASIC, _PUBLISH, 0) + _shortstr(exchange, "exchange")
               + _shortstr(routing_key, "routing key") + (b"\x01" if mandatory else b"\x00"))
    return _frame_head.pack(_METHOD, channel, len(payload)) + payload + FRAME_END


def publish_frames(channel: int, max_content: int, exchange: str, keys: Sequence[str],
                   bodies: Sequence[bytes], ids: Sequence[str], content_type: str,
                   delivery_mode: int, mandatory: bool) -> bytes:
    """The frames publishing ``bodies[i]`` with routing key ``keys[i]`` and message id
    ``ids[i]``, in order, as one string of bytes."""
    fixed = _shortstr(content_type, "content type") + bytes((delivery_mode,))
    methods: dict[str, bytes] = {}
    out: list[bytes] = []
    add = out.append
    header = _header_head.pack
    head = _frame_head.pack
    for key, body, mid in zip(keys, bodies, ids, strict=True):
        method = methods.get(key)
        if method is None:
            method = methods[key] = method_frame(channel, exchange, key, mandatory)
        add(method)
        mid_raw = _shortstr(mid, "message id")
        size = len(body)
        # content header payload: class, weight, body size, flags (14) + properties
        add(header(_HEADER, channel, 14 + len(fixed) + len(mid_raw), _BASIC, 0, size, _FLAGS))
        add(fixed)
        add(mid_raw)
        add(FRAME_END)
        if not size:
            continue  # no body frame, as aiormq sends none
        if size <= max_content or max_content <= 0:  # frame_max 0: no limit, one frame
            add(head(_BODY, channel, size))
            add(body)
            add(FRAME_END)
        else:
            for start in range(0, size, max_content):
                piece = body[start:start + max_content]
                add(head(_BODY, channel, len(piece)))
                add(piece)
                add(FRAME_END)
    return b"".join(out)


async def publish_all(channel: aiormq.Channel, exchange: str, keys: Sequence[str],
                      bodies: Sequence[bytes], ids: Sequence[str | None], *,
                      content_type: str, delivery_mode: int, mandatory: bool
                      ) -> list[object]:
    """Publish every body on ``channel`` (in confirm mode) in one write and return
    each message's outcome once the broker settled it, as ``asyncio.gather(...,
    return_exceptions=True)`` of ``basic_publish`` calls would: the confirmation
    frame, or the exception (``DeliveryError`` for a nack, ``PublishError`` for a
    returned message, the channel's error when it closes). A message without an id
    gets a random one, as in ``basic_publish`` (returned messages are matched by it).
    Raises, with nothing written, when the channel is already closed or a name does
    not fit."""
    if not channel.publisher_confirms:
        raise ValueError("publish_all needs a channel in publisher-confirm mode")
    mids = [mid if mid else uuid.uuid4().hex for mid in ids]
    if not mids:
        return []
    async with channel.lock:
        payload = publish_frames(channel.number, channel.max_content_size, exchange, keys,
                                 bodies, mids, content_type, delivery_mode, mandatory)
        # queued first (this may wait for room; cancelled then, nothing was written),
        # then the confirmations registered with no await in between: the broker's
        # replies are read by a task of this loop, which cannot run before they are.
        # A channel closed meanwhile fails them at once, with the reason it closed.
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        first = channel.delivery_tag + 1
        futures = [channel.create_future() for _ in mids]
        confirmations = channel.confirmations
        for tag, future in enumerate(futures, first):
            confirmations[tag] = future
        by_id = channel.message_id_delivery_tag
        if mandatory:
            for tag, mid in enumerate(mids, first):
                by_id[mid] = tag
        channel.delivery_tag = first + len(mids) - 1
    try:  # cancelled: gather cancels the futures, and aiormq ignores their replies
        results = await asyncio.gather(*futures, return_exceptions=True)
        if mandatory and len(set(mids)) < len(mids):
            _fail_returned_twins(mids, results)
        return results
    finally:
        if mandatory:
            for tag, mid in enumerate(mids, first):
                if by_id.get(mid) == tag:
                    del by_id[mid]


def _fail_returned_twins(mids: Sequence[str], results: list[object]) -> None:
    """A returned message is matched by its id to the last message of that id (as
    aiormq keeps one delivery tag per id): when a batch holds an id twice and one copy
    came back, which one is unknown, so every copy of that id counts as returned."""
    returned: dict[str, object] = {}
    for mid, result in zip(mids, results, strict=True):
        if isinstance(result, amqp.PublishError):
            returned.setdefault(mid, result)
    for n, mid in enumerate(mids):
        if mid in returned and not isinstance(results[n], BaseException):
            results[n] = returned[mid]
