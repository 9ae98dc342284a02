"""`python -m bench.transports` runs end to end with tiny sizes: every kind reports an
engine and a ceiling rate in the documented JSON shape, and every message of both runs
checked by id (no speed assertions)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from bench.tansu import Tansu
from bench.transports import KAFKA_PARTITIONS, KafkaDest
from tests.services import run_bench_module

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KINDS = {"http", "rabbitmq_queue", "rabbitmq_exchange", "kafka"}
RUN_TIMEOUT_SEC = 480
RATES = ("engine_per_s", "ceiling_per_s", "ratio")
CHECKS = ("engine_check", "ceiling_check")
CHECK_KEYS = {"expected", "received", "missing", "unexpected", "duplicates", "read_sec"}
CPUS = ("engine_cpu_us", "ceiling_cpu_us")
SERVERS = {"http": "sink", "rabbitmq_queue": "rabbitmq", "rabbitmq_exchange": "rabbitmq",
           "kafka": "tansu"}
TARGETS = {"kafka": 0.5, "rabbitmq_queue": 0.8, "rabbitmq_exchange": 0.8}


def keys_of(kind: str) -> set[str]:
    """The JSON keys of one kind's result (a target and its budget where there is one)."""
    return {*RATES, *CHECKS, *CPUS, *(("target", "budget_us") if kind in TARGETS else ())}


def check_cpu(kind: str, result: dict[str, Any]) -> None:
    """CPU per message by group (bench.cpu): the engine's actors, this process, the
    receiving side and Redis; the bare client's side; the target's budget."""
    server = SERVERS[kind]
    engine, ceiling = result["engine_cpu_us"], result["ceiling_cpu_us"]
    assert set(engine) == {"partitions", "transport", "bench", server, "redis", "machine",
                           "other"}, (kind, engine)
    assert set(ceiling) == {"bench", server, "redis", "machine", "other"}, (kind, ceiling)
    for cpu in (engine, ceiling):
        assert all(isinstance(v, int | float) and v >= 0 for v in cpu.values()), (kind, cpu)
    if kind in TARGETS:
        assert result["target"] == TARGETS[kind], result
        cpus = os.cpu_count() or 1
        assert result["budget_us"] == round(
            cpus * 1e6 / (TARGETS[kind] * result["ceiling_per_s"]), 2), result


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run ``python -m bench.transports`` with ``args``; its output and JSON results."""
    code, output, data = run_bench_module("bench.transports", tmp_path / "transports.json",
                                          args, RUN_TIMEOUT_SEC)
    assert code == 0, output[-3000:]
    return output, data


def check_rates(kind: str, result: dict[str, Any]) -> None:
    assert all(isinstance(result[k], float) for k in RATES), (kind, result)
    assert result["engine_per_s"] > 0 and result["ceiling_per_s"] > 0, (kind, result)


def check_ids(kind: str, result: dict[str, Any], messages: int) -> None:
    """Both runs' id checks: every expected message there, nothing else."""
    for side in CHECKS:
        check = result[side]
        assert set(check) == CHECK_KEYS, (kind, side, check)
        assert check["expected"] == messages, (kind, side, check)
        assert check["missing"] == 0 and check["unexpected"] == 0, (kind, side, check)
        assert check["duplicates"] == 0, (kind, side, check)


@pytest.mark.timeout(RUN_TIMEOUT_SEC + 90)
def test_transports_bench_reports_engine_and_ceiling_rates_of_every_kind(
        redis_url: str, rabbit_url: str, tansu_bin: str, tmp_path: Path) -> None:
    # Given Redis, RabbitMQ and the tansu binary (the bench starts its own broker and sink)
    # When the bench runs with a tiny message count
    output, results = run_bench(tmp_path, "--messages", "1000", "--redis-url", redis_url,
                                "--amqp-url", rabbit_url)
    # Then it reports every kind, every message of both runs found by id
    assert set(results) == KINDS, results
    for kind, result in results.items():
        assert set(result) == keys_of(kind), (kind, result)
        check_rates(kind, result)
        check_ids(kind, result, 1000)
        check_cpu(kind, result)
        for side in ("engine", "ceiling"):
            assert f"{kind} {side} CPU per message: " in output, output[-3000:]
            assert f"{kind} {side} check: 1,000 received of 1,000: 0 missing, 0 unexpected, " \
                   "0 duplicates" in output, output[-3000:]
    # and prints the table
    table = output[output.rindex("kind"):]
    for kind in KINDS:
        assert kind in table, table


@pytest.mark.timeout(RUN_TIMEOUT_SEC + 90)
def test_repeated_rounds_report_the_medians(redis_url: str, tansu_bin: str,
                                            tmp_path: Path) -> None:
    output, results = run_bench(tmp_path, "--messages", "1000", "--repeat", "3",
                                "--only", "kafka", "--redis-url", redis_url)
    assert set(results) == {"kafka"}, results
    result = results["kafka"]
    assert len(result["rounds"]) == 3, result
    for one in result["rounds"]:
        assert set(one) == keys_of("kafka"), one
        check_rates("kafka", one)
        check_ids("kafka", one, 1000)
        check_cpu("kafka", one)
    check_rates("kafka", result)
    check_ids("kafka", result, 3000)  # the rounds' checks added up
    for rate in ("engine_per_s", "ceiling_per_s"):
        assert result[rate] == statistics.median(r[rate] for r in result["rounds"]), result
    check_cpu("kafka", {**result, "rounds": None})
    for side in CPUS:  # each group's median over the rounds
        assert result[side] == {name: round(statistics.median(r[side][name] for r in
                                                               result["rounds"]), 2)
                                for name in result[side]}, result
    assert "kafka: median of 3 rounds" in output, output[-3000:]


def test_the_kafka_count_says_when_the_last_record_arrived(kafka_broker: Tansu) -> None:
    """The engine's Kafka window ends when its last record arrived, not when a later poll
    saw the count: near the end, the destination reads the records as they come."""

    async def scenario() -> tuple[int, int, float | None, float]:
        dest = KafkaDest(kafka_broker.bootstrap)
        await dest.open()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=0)
        await producer.start()
        try:
            # Given 99 of 100 records on the topic, counted near the end
            await asyncio.gather(*[await producer.send(dest.topic, b"{}",
                                                       partition=i % KAFKA_PARTITIONS)
                                   for i in range(99)])
            before, _ = await dest.count(100)
            # When the last one arrives, and the count is read a second later
            await (await producer.send(dest.topic, b"{}", partition=1))
            acked = time.time()
            await asyncio.sleep(1.0)
            n, at = await dest.count(100)
            return before, n, at, acked
        finally:
            await producer.stop()
            await dest.close()

    before, n, at, acked = asyncio.run(scenario())
    # Then the count is exact, and says when the last record came: about when it was
    # acknowledged, not a second later
    assert before < 100 and n == 100, (before, n)
    assert at is not None and acked - 0.1 < at < acked + 0.3, (at, acked)


@pytest.mark.timeout(300)
def test_rabbit_clients_compares_every_client_on_a_real_broker(rabbit_url: str,
                                                               tmp_path: Path) -> None:
    """``python -m bench.rabbit_clients``: each client's rate and CPU, and the transport
    over the raw client it uses (each client's queue count is checked by the bench)."""
    code, output, data = run_bench_module(
        "bench.rabbit_clients", tmp_path / "clients.json",
        ["--messages", "600", "--rounds", "1", "--batch", "200", "--url", rabbit_url], 240)
    assert code == 0, output[-3000:]
    assert set(data["clients"]) == {"aio-pika", "aiormq", "aiormq-nowait", "aiormq-batch",
                                    "hookray"}, data
    for name, client in data["clients"].items():
        assert client["msg_per_s"] > 0 and client["cpu_us_per_msg"] > 0, (name, client)
        assert client["msg_per_s_runs"] == [client["msg_per_s"]], (name, client)
    assert data["hookray_over_raw_client"] == round(
        data["clients"]["hookray"]["msg_per_s"] / data["clients"]["aiormq-batch"]["msg_per_s"],
        2), data
    assert "hookray transport / aiormq-batch" in output, output
