"""DESTINATION_DENY: no delivery, OAuth2 token request or test event connects to an
address of a denied network, whatever name leads there; real receiver and brokers."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.errors import HookError
from engine.hooks import HttpBatch, Kafka, RabbitQueue
from engine.receiver import Receiver
from engine.settings import Settings
from engine.stores import HookRegistry
from engine.transports.base import Delivery, Outcome, Transport
from engine.transports.http import HttpTransport
from engine.transports.kafka import KafkaTransport
from engine.transports.rabbitmq import RabbitQueueTransport
from tests.integration.test_api import hook_body, start_api
from tests.integration.test_runtime import events, http_hook
from tests.kafka_fixtures import new_topic
from tests.rabbit_fixtures import Rabbit
from tests.services import free_port, port_open, wait_for

pytestmark = pytest.mark.integration


def delivery(kind: str, n: int = 2) -> Delivery:
    return Delivery(id="d", hook_id=1, account_id=1, kind=kind,
                    parts=[json.dumps({"n": i}).encode() for i in range(n)],
                    keys=["3.click"] * n, message_ids=[f"m{i}" for i in range(n)])


def send(transport: Transport, target: Any, kind: str) -> Outcome:
    async def go() -> Outcome:
        try:
            return await transport.send(target, delivery(kind))
        finally:
            await transport.close()
    return asyncio.run(go())


# --- HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_http_refuses_a_denied_address_by_ip_or_by_name(receiver: Receiver, host: str) -> None:
    url = receiver.url("/deny").replace("127.0.0.1", host)
    outcome = send(HttpTransport(timeout_sec=2, deny="loopback"), HttpBatch(url=url),
                   "http_batch")
    assert not outcome.ok and outcome.error == "ConnectError"
    assert "address 127.0.0.1 is refused by DESTINATION_DENY" in outcome.detail or \
        "address ::1 is refused by DESTINATION_DENY" in outcome.detail, outcome.detail
    assert receiver.requests("/deny") == []


def test_http_delivers_where_no_denied_network_matches(receiver: Receiver) -> None:
    transport = HttpTransport(timeout_sec=2, deny="private, link-local, 127.0.0.2")
    outcome = send(transport, HttpBatch(url=receiver.url("/allowed")), "http_batch")
    assert outcome.ok, outcome
    assert receiver.messages("/allowed") == [{"n": 0}, {"n": 1}]


def test_http_refuses_a_denied_oauth2_token_endpoint(receiver: Receiver) -> None:
    # the batch goes to 127.0.0.1, which is allowed; the token endpoint is named by
    # "localhost" and denied on every address that name has
    receiver.behave("/token", body=json.dumps({"access_token": "t", "expires_in": 60}))
    token_url = receiver.url("/token").replace("127.0.0.1", "localhost")
    target = HttpBatch(url=receiver.url("/batch"), auth={
        "kind": "oauth2", "token_url": token_url, "client_id": "c", "client_secret": "s"})
    outcome = send(HttpTransport(timeout_sec=2, deny="::1, 127.0.0.0/8"), target, "http_batch")
    assert not outcome.ok and "DESTINATION_DENY" in outcome.detail, outcome
    assert receiver.requests("/token") == [] and receiver.requests("/batch") == []


# --- RabbitMQ -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_rabbitmq_refuses_a_denied_broker_address(rabbit: Rabbit, host: str) -> None:
    queue = rabbit.name("deny")
    target = RabbitQueue(**rabbit.broker(host=host), queue=queue)
    outcome = send(RabbitQueueTransport(timeout_sec=5, deny="loopback"), target, "rabbitmq")
    assert not outcome.ok and outcome.error == "ConnectError"
    assert "cannot connect" in outcome.detail and "DESTINATION_DENY" in outcome.detail, outcome
    assert rabbit.message_count(queue) is None  # never declared: no connection was made


def test_rabbitmq_delivers_through_the_guarded_connection(rabbit: Rabbit) -> None:
    queue = rabbit.name("allowed")
    target = RabbitQueue(**rabbit.broker(host="localhost"), queue=queue)
    outcome = send(RabbitQueueTransport(timeout_sec=5, deny="10.0.0.0/8"), target, "rabbitmq")
    assert outcome.ok, outcome
    assert wait_for(lambda: rabbit.message_count(queue) == 2, 5)


# --- Kafka ----------------------------------------------------------------------------------


def test_kafka_refuses_a_denied_bootstrap_server(kafka_broker: Any) -> None:
    target = Kafka(bootstrap_servers=[kafka_broker.bootstrap], topic=new_topic(
        kafka_broker.bootstrap))
    outcome = send(KafkaTransport(timeout_sec=5, deny="loopback"), target, "kafka")
    assert not outcome.ok and outcome.error == "ConnectError"
    assert f"{kafka_broker.bootstrap}: address 127.0.0.1 is refused by DESTINATION_DENY" \
        in outcome.detail, outcome.detail


def test_kafka_refuses_a_denied_broker_the_cluster_names(tansu_bin: str, tmp_path: Path
                                                         ) -> None:
    """The bootstrap server is allowed, but the broker its metadata names is not."""
    port = free_port("127.0.0.2")
    log = (tmp_path / "tansu.log").open("wb")
    proc = subprocess.Popen(
        [tansu_bin, "broker", "--listener-url", f"tcp://127.0.0.2:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
         "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: port_open("127.0.0.2", port), 10), "tansu did not start"
        target = Kafka(bootstrap_servers=[f"127.0.0.2:{port}"], topic="t")
        # at the same time, another hook's producer on the same transport, whose
        # "broker" takes the connection and never answers: it fails after the refusal
        silent = socket.socket()
        silent.bind(("127.0.0.3", 0))
        silent.listen(8)
        other = Kafka(bootstrap_servers=[f"127.0.0.3:{silent.getsockname()[1]}"], topic="t")

        async def both() -> list[Outcome]:
            transport = KafkaTransport(timeout_sec=3, deny="127.0.0.1")
            try:
                return list(await asyncio.gather(transport.send(target, delivery("kafka")),
                                                  transport.send(other, delivery("kafka"))))
            finally:
                await transport.close()

        with silent:
            outcome, elsewhere = asyncio.run(both())
        assert not outcome.ok and outcome.error in ("ConnectError", "Timeout")
        assert f"a connection was refused: 127.0.0.1:{port}: address 127.0.0.1 is refused " \
               "by DESTINATION_DENY" in outcome.detail, outcome.detail
        # what one producer was refused is not told of another's failure
        assert not elsewhere.ok and "127.0.0.3" in elsewhere.detail
        assert "DESTINATION_DENY" not in elsewhere.detail, elsewhere.detail
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# --- the settings, through the API's test event and the engine ---------------------------


async def test_api_test_event_reports_a_denied_destination(
        settings: Settings, redis_client: redis.Redis, receiver: Receiver) -> None:
    client, api = await start_api(
        settings.model_copy(update={"DESTINATION_DENY": "loopback"}), redis_client)
    try:
        # a name is judged when a delivery resolves it (an address, already here)
        hook = await api.create(url=receiver.url("/api-deny").replace("127.0.0.1",
                                                                      "localhost"))
        answer = await api.call("POST", f"/v1/hooks/{hook['id']}/test", api.master,
                                json_body={"event_type": "click"})
        assert answer.status == 200
        assert answer.body["delivered"] is False and answer.body["error"] == "ConnectError"
        assert "address 127.0.0.1 is refused by DESTINATION_DENY" in answer.body["detail"]
        assert receiver.requests("/api-deny") == []
    finally:
        await client.close()


def test_engine_dead_letters_what_a_denied_destination_was_sent(
        engine_factory: Any, receiver: Receiver) -> None:
    engine = engine_factory(DESTINATION_DENY="127.0.0.0/8", HOOK_RETRY_PERIOD_SEC=0.2,
                            HOOK_RETRY_TIMES=2)
    data = http_hook(receiver, "/engine-deny", max_batch_size=10)
    # the engine's own driver refuses such a hook, naming the field
    with pytest.raises(HookError, match=r"target\.http_batch\.url: address 127\.0\.0\.1 is "
                                        "refused by DESTINATION_DENY: no delivery may connect"):
        engine.create_hook(data)
    # one stored before DESTINATION_DENY named its address: each delivery is refused
    hook = HookRegistry(engine.redis, engine.keys, engine.catalogue).create(data)
    # and it can still be edited while its hosts stay as they are
    hook = engine.update_hook(hook.id, {**data, "name": "renamed"})
    assert hook.name == "renamed"
    engine.publish(events(10, types=("click",), list_id=3))
    assert wait_for(lambda: engine.stats(hook.id)["dead_lettered"] == 10, 60), \
        engine.stats(hook.id)
    letters = engine.dead_letters(hook_id=hook.id)
    assert sum(letter.messages for letter in letters) == 10, letters
    for letter in letters:
        assert letter.resends == 2, letter
        assert "address 127.0.0.1 is refused by DESTINATION_DENY" in letter.last_error, letter
    assert receiver.requests("/engine-deny") == []
    outcome = engine.test_event(hook, "click")
    assert not outcome.ok and "DESTINATION_DENY" in outcome.detail


async def test_api_refuses_a_hook_whose_target_is_a_denied_address(
        settings: Settings, redis_client: redis.Redis) -> None:
    """An IP address written as the host is judged when the hook is created or
    updated (422 naming the field); a name, when a delivery resolves it."""
    client, api = await start_api(settings, redis_client)  # the default: link-local
    try:
        answer = await api.call("POST", "/v1/hooks", api.master, json_body=hook_body(
            url="http://169.254.169.254/latest/meta-data/"))
        assert answer.status == 422
        assert answer.error["issues"] == [{
            "field": "target.http_batch.url",
            "reason": "address 169.254.169.254 is refused by DESTINATION_DENY"}]
        kafka = {"name": "k", "actions": ["click"], "target": {"kafka": {
            "bootstrap_servers": ["127.0.0.1:9092", "[fe80::1]:9092"], "topic": "t"}}}
        answer = await api.call("POST", "/v1/hooks", api.master, json_body=kafka)
        assert answer.status == 422
        assert [i["field"] for i in answer.error["issues"]] == [
            "target.kafka.bootstrap_servers[1]"]
        hook = await api.create(url="http://hooks.example.com/x")  # a name: not judged now
        rabbit = {"name": "r", "actions": ["click"], "target": {"rabbitmq_queue": {
            "host": "169.254.10.10", "queue": "q"}}}
        answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master,
                                json_body=rabbit)
        assert answer.status == 422
        assert answer.error["issues"][0]["field"] == "target.rabbitmq_queue.host"
        oauth = hook_body(url="http://hooks.example.com/x")
        oauth["target"]["http_batch"]["auth"] = {
            "kind": "oauth2", "token_url": "http://[fe80::2]/token", "client_id": "c",
            "client_secret": "s"}
        answer = await api.call("PUT", f"/v1/hooks/{hook['id']}", api.master, json_body=oauth)
        assert answer.status == 422
        assert answer.error["issues"][0]["field"] == "target.http_batch.auth.token_url"
    finally:
        await client.close()
    # with DESTINATION_DENY empty, the same hook is taken
    client, api = await start_api(settings.model_copy(update={"DESTINATION_DENY": ""}),
                                  redis_client)
    try:
        stored = await api.create(url="http://169.254.169.254/latest/meta-data/")
    finally:
        await client.close()
    # denied again: that hook can still be edited while its address stays the same
    client, api = await start_api(settings, redis_client)
    try:
        answer = await api.call("PUT", f"/v1/hooks/{stored['id']}", api.master, json_body={
            **hook_body(url="http://169.254.169.254/latest/meta-data/"), "name": "kept"})
        assert answer.status == 200 and answer.body["name"] == "kept", answer.body
    finally:
        await client.close()
