"""What a RabbitMQ delivery's error says of the broker: a login refused for guest, and
a connection whose publishers the broker blocks (a resource alarm)."""

from __future__ import annotations

import asyncio
import logging

from aiormq import exceptions as amqp
from yarl import URL

from engine.transports.rabbitmq import RabbitTransport, _blocked, _Broker


def broker(user: str) -> _Broker:
    return _Broker(url=URL("amqp://h:5672/"), where="RabbitMQ h:5672 vhost '/'", user=user,
                   vhost="/", semaphore=asyncio.Semaphore(1))


def test_a_login_refused_for_guest_says_brokers_take_it_only_from_their_own_host() -> None:
    refused = amqp.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    said = str(RabbitTransport._wrap_connect(refused, broker("guest")))
    assert "login refused for user 'guest': wrong user name or password (or, for guest, a " \
        "broker that takes it only from its own host" in said
    assert "for guest" not in str(RabbitTransport._wrap_connect(refused, broker("alice")))


def test_the_reason_a_broker_blocks_a_connection_is_kept_until_it_unblocks() -> None:
    class Connection:
        pass

    connection = Connection()
    log = logging.getLogger("aiormq.connection")
    log.warning("Connection %r was blocked by: %r", connection, "low on memory")
    assert _blocked.reasons.get(connection) == "low on memory"
    log.warning("Connection %r was unblocked", connection)
    assert _blocked.reasons.get(connection) is None
