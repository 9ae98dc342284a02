"""Test event (spec h): one synthetic event of a chosen type, built with the shapes
and example values of spec section (d), run through the hook's custom_data against
a sample profile and sent once through the hook's target, bypassing filters and
batching (HTTP: a one-element array). ``is_test`` is true.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from typing import Any

from engine.catalogue import EventCatalogue, EventType, load_catalogue
from engine.customdata import format_rfc3339_nano
from engine.events import Event, Subscription
from engine.hooks import Hook, hook_secrets, scrub
from engine.messages import MessageBuilder, encode_message, kafka_key, routing_key
from engine.names import NameCatalogue
from engine.transports.base import (
    Delivery,
    Outcome,
    Transport,
    TransportUnavailable,
    load_transport,
    now_ms,
)

log = logging.getLogger("hookray")

SAMPLE_PROFILE = {"email": "alice@example.org", "phone": "+79991234567",
                  "first_name": "Alice", "last_name": "Example"}
SAMPLE_PHONE = SAMPLE_PROFILE["phone"]
SAMPLE_PUSH_ID = "fcm-0000000000000000000000"  # a push subscription token
_TRACKING = {"message_id": 17, "campaign_id": 973, "segment_id": 0, "resource_id": 3,
             "ip": "10.9.0.14", "country": ".us", "city": "New York",
             "postal_code": "101000", "region": "Ohio",
             "tz": "Europe/Vaduz", "lat": 55.244075, "lon": 55.244075,
             "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:59.0) Gecko/20100101 Firefox/59.0",
             "os": "Linux x86_64", "browser": "Firefox", "device": "web",
             "link_url": "http://www.example.com", "launch_id": "00000017000003cd5a9bf01a",
             "send_message_id": "5a9bf01a17_3cd_11_6f_0_2.5a8c045fc1dde44cbf718f78"}
_GEO_UA = ("ip", "country", "city", "postal_code", "region", "tz", "lat", "lon",
           "user_agent", "os", "browser", "device")
SAMPLE_EVENT_DATA: dict[str, dict[str, Any]] = {
    "tracking": _TRACKING,
    "delivery": {"message_id": 5, "campaign_id": 130, "segment_id": 0, "resource_id": 3,
                 "launch_id": "00000017000003cd5a9bf01a",
                 "send_message_id": "5a9bf01a17_3cd_11_6f_0_2.5a8c045fc1dde44cbf718f78"},
    "import": {"import_id": 1, "resource_id": 3},
    "pixel": {"pixel_id": 1, "goal": "purchase", "value": "10.00",
              "page_url": "https://shop.example.com/cart", "referrer": "https://example.com/",
              **{k: _TRACKING[k] for k in _GEO_UA}},  # spec d: the tracking variant's
}
# spec d: link_url is the clicked URL, on click-type events only: those made by a
# click on a link (a confirmation link, an unsubscribe link too; a code added by
# EVENT_TYPES_FILE when it holds "click")
CLICK_TYPES = frozenset({"click", "uclick", "confirm", "confirmsub", "unsub", "click_sms",
                         "uclick_sms", "unsub_sms", "click_push", "uclick_push"})
# spec d (proposal): bounce and undelivered events also carry the provider's (or
# SMTP's) response, as a code and a text
SAMPLE_RESPONSES: dict[str, dict[str, Any]] = {
    "sbounce": {"response_code": 452, "response_text": "452 4.2.2 Mailbox full"},
    "hbounce": {"response_code": 550, "response_text":
                "550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown"},
    "undeliv": {"response_code": 554, "response_text": "554 5.7.1 Message rejected"},
    "undeliv_sms": {"response_code": 21, "response_text": "Absent subscriber"},
    "undeliv_push": {"response_code": 404, "response_text": "Unregistered device token"},
}
# that of a bounce or undelivered code added by EVENT_TYPES_FILE (one holding
# "bounce", or starting "undeliv")
SAMPLE_OTHER_RESPONSE = {"response_code": 500, "response_text": "Not delivered"}
# spec d (proposal): a message's content per channel, sent when the hook's
# send_content option is on
SAMPLE_CONTENT: dict[str, dict[str, Any]] = {
    "email": {"subject": "Black Friday", "html": "<p>Hello, Alice!</p>",
              "text": "Hello, Alice!", "from_name": "Example Shop",
              "from_email": "news@example.com"},
    "push": {"title": "Black Friday", "body": "Hello, Alice!"},
}
SAMPLE_TEXT_CONTENT = {"text": "Hello, Alice!"}  # SMS and the other text channels
SAMPLE_SEND_ID = "test-send"
# spec d: tracking events of the push channel only also carry extra_uid
SAMPLE_EXTRA_UID = "ew4Sgf41"
SAMPLE_SUBSCRIPTION_HASH = "0a4b910312345"  # spec d's example values
SAMPLE_SENDS_TRYING_NUM = 2
SAMPLE_PRIORITY = 1
SAMPLE_CCSUB = {"custom_key": "custom_value"}
# channels whose subscriptions are addressed by phone number (spec d: phone)
PHONE_CHANNELS = frozenset({"sms", "viber", "whatsapp"})
# the other channels of the platform's subscriptions, whose address key is not known
OTHER_CHANNELS = frozenset({"notify", "telegram_bot"})


def sample_event_data(event_type_info: EventType) -> dict[str, Any]:
    """The example event_data of the event type's category (``extra_uid`` added for a
    tracking event of the push channel)."""
    category = event_type_info.category
    data = dict(SAMPLE_EVENT_DATA[category])
    if category == "tracking":
        if event_type_info.code not in CLICK_TYPES and "click" not in event_type_info.code:
            del data["link_url"]
        if event_type_info.channel == "push":
            data["extra_uid"] = SAMPLE_EXTRA_UID
    code = event_type_info.code
    if code in SAMPLE_RESPONSES:
        data.update(SAMPLE_RESPONSES[code])
    elif category == "delivery" and ("bounce" in code or code.startswith("undeliv")):
        data.update(SAMPLE_OTHER_RESPONSE)
    return data


def sample_content(event_type_info: EventType) -> dict[str, Any] | None:
    """The content a message of this event type carries in a test event of a hook
    with send_content: the sent message's (tracking and delivery events of a channel),
    none for imports and pixel hits, which no sent message is behind."""
    if event_type_info.category not in ("tracking", "delivery") or not \
            event_type_info.channel:
        return None
    return dict(SAMPLE_CONTENT.get(event_type_info.channel, SAMPLE_TEXT_CONTENT))


def sample_event(hook: Hook, event_type: str, catalogue: EventCatalogue | None = None) -> Event:
    """A synthetic event of ``event_type`` in the hook's account and database."""
    catalogue = load_catalogue() if catalogue is None else catalogue
    event_type_info = catalogue.get(event_type)
    list_id = hook.database if isinstance(hook.database, int) else 1
    # a sent message's attempts and substitutions: of the events a sending is behind
    sent = event_type_info.category in ("tracking", "delivery") and \
        bool(event_type_info.channel)
    return Event(
        id=f"test-{uuid.uuid4().hex}",
        event_type=event_type,
        event_date=format_rfc3339_nano(time.time_ns()),
        account_id=hook.account_id,
        list_id=list_id,
        profile_id="abcdefgh12345678",
        xxh="ad1850e0d1d9481e",
        md5="145bb30f7ddf1184cb560bc4b7705646",
        is_test=True,
        sends_trying_num=SAMPLE_SENDS_TRYING_NUM if sent else None,
        is_static=False if sent else None,
        subscription_hash_id=SAMPLE_SUBSCRIPTION_HASH,
        subscription=[_sample_subscription(event_type_info.channel)],
        event_data=sample_event_data(event_type_info),
        profile=dict(SAMPLE_PROFILE),
    )


def _sample_subscription(channel: str | None) -> Subscription:
    """A subscription of the event's channel with the keys of that channel only
    (email for email, phone for SMS, Viber and WhatsApp, the push token and provider
    for push, no address for Notify and Telegram bot), and the priority and custom
    fields (``ccsub``) every channel's may have; an email one for an event of no
    subscription channel (import, pixel)."""
    if channel in PHONE_CHANNELS:
        return Subscription(resource_id=3, channel=channel, phone=SAMPLE_PHONE,
                            priority=SAMPLE_PRIORITY, status="subscribed",
                            ccsub=dict(SAMPLE_CCSUB))
    if channel in OTHER_CHANNELS:
        return Subscription(resource_id=3, channel=channel, priority=SAMPLE_PRIORITY,
                            status="subscribed", ccsub=dict(SAMPLE_CCSUB))
    if channel == "push":
        return Subscription(resource_id=3, channel="push", subscription_id=SAMPLE_PUSH_ID,
                            provider="androidfirebase", priority=SAMPLE_PRIORITY,
                            status="subscribed", ccsub=dict(SAMPLE_CCSUB))
    return Subscription(resource_id=3, channel="email", email=SAMPLE_PROFILE["email"],
                        priority=SAMPLE_PRIORITY, status="subscribed",
                        ccsub=dict(SAMPLE_CCSUB))


def build_test_delivery(hook: Hook, event_type: str, names: NameCatalogue | None = None,
                  catalogue: EventCatalogue | None = None) -> Delivery:
    """The one-message Delivery a test event sends."""
    catalogue = load_catalogue() if catalogue is None else catalogue
    event = sample_event(hook, event_type, catalogue)
    content = sample_content(catalogue.get(event_type)) if hook.send_content else None
    if content is not None:
        event.send_id = SAMPLE_SEND_ID
    msg = MessageBuilder(hook, names, catalogue).build(
        event, {(event.account_id, SAMPLE_SEND_ID): content} if content else None)
    kind = hook.target.kind
    keys: list[str] = []
    if kind in ("rabbitmq_queue", "rabbitmq_exchange"):
        keys = [routing_key(event)]
    elif kind == "kafka" and hook.target.kafka is not None:
        key = kafka_key(hook.target.kafka.key, event)
        keys = [key.decode() if key else ""]
    return Delivery(id=f"test-{uuid.uuid4().hex}", hook_id=hook.id or 0,
                    account_id=hook.account_id, kind=kind, parts=[encode_message(msg)],
                    keys=keys, message_ids=[msg.hook_message_id], created_ms=now_ms())


async def send_test_event(hook: Hook, event_type: str, names: NameCatalogue | None = None,
                          transport: Transport | None = None,
                          catalogue: EventCatalogue | None = None, **options: Any) -> Outcome:
    """Send one test event through the hook's target and report the outcome;
    ``catalogue``: the engine's event types (EVENT_TYPES_FILE's codes too)."""
    delivery = build_test_delivery(hook, event_type, names, catalogue)
    own = transport is None
    if transport is None:
        try:
            transport = load_transport(hook.target.kind, **options)
        except TransportUnavailable as exc:
            return Outcome(ok=False, error=type(exc).__name__, detail=str(exc))
    try:
        outcome = await transport.send(hook.target.settings, delivery)
    except Exception as exc:  # not a delivery failure: a client refusing the settings...
        # the same answer through the API, the driver and the CLI (a traceback there):
        # the outcome; the traceback to the log, masked (its message may quote a secret)
        secrets = hook_secrets(hook)
        log.error("test event of hook %s: the %s transport failed\n%s", hook.id,
                  hook.target.kind, scrub("".join(traceback.format_exception(exc)).rstrip(),
                                          secrets))
        # masked, then cut: a secret cut in two would not be found whole
        return Outcome(ok=False, error=type(exc).__name__, detail=scrub(
            f"the test event could not be sent: {type(exc).__name__}: {exc}",
            secrets)[:1000])
    finally:
        if own:
            await transport.close()
    if outcome.ok and hook.target.kind == "rabbitmq_exchange":
        # confirmed is not received: an exchange drops what no binding matches
        outcome.detail = (f"{outcome.detail}; routing key {delivery.keys[0]!r}: only a "
                          "queue bound to match it receives the message")
    return outcome
