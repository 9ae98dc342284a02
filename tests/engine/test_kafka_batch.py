"""Record batches built a batch at a time are the bytes aiokafka's builder writes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from engine.transports.kafka_batch import (
    HEADER_NAME,
    PrebuiltBatch,
    _varint_sizes,
    batches,
    build_batch,
    crc32c,
    header_fields,
    key_field,
    varint,
)


def _reference(values: list[bytes], keys: list[bytes | None], mids: list[str],
               stamp: int) -> bytes:
    builder = BatchBuilder(1 << 30, 0)
    for value, key, mid in zip(values, keys, mids, strict=True):
        headers = [(HEADER_NAME.decode(), mid.encode())] if mid else []
        assert builder.append(key=key, value=value, timestamp=stamp, headers=headers)
    return bytes(builder._build())


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 200, 8_193])
def test_a_batch_is_byte_for_byte_the_reference(count: int) -> None:
    rng = random.Random(count)
    sizes = [0, 1, 63, 64, 127, 128, 253, 8_191, 8_192, 70_000]
    values = [rng.randbytes(rng.choice(sizes) if count < 1_000 else 40) for _ in range(count)]
    keys = [rng.choice([None, b"", b"1.click", b"k" * 300]) for _ in range(count)]
    mids = [rng.choice(["", "abc-1", "é" * 70, "x" * 9_000]) for _ in range(count)]
    got = build_batch(values, list(map(key_field, keys)), header_fields(mids), 1_700_000_000_123)
    assert got == _reference(values, keys, mids, 1_700_000_000_123)
    batch = DefaultRecordBatch(got)
    assert batch.validate_crc()
    records = list(batch)
    assert [r.value for r in records] == values
    assert [r.key for r in records] == keys
    assert [dict(r.headers).get("hook_message_id", b"").decode() for r in records] == mids


def test_large_deliveries_are_split_below_the_batch_size() -> None:
    values = [bytes([n % 251]) * 300 for n in range(3_000)]
    keys = [key_field(b"7.click")] * len(values)
    headers = header_fields([f"{n:024x}-1" for n in range(len(values))])
    out = batches(values, keys, headers, 5, 64 * 1024)
    assert sum(count for _, count in out) == len(values) and len(out) > 10
    assert all(len(data) <= 64 * 1024 for data, _ in out)
    seen = [r.value for data, _ in out for r in DefaultRecordBatch(data)]
    assert seen == values  # in order, none lost or doubled
    # a record larger than the limit still goes, alone
    big = batches([b"x" * 100_000, b"y"], keys[:2], headers[:2], 5, 64 * 1024)
    assert [count for _, count in big] == [1, 1]


def test_small_records_with_long_keys_and_ids_stay_below_the_batch_size() -> None:
    """Records whose key and header take more than the first estimate allows (small
    values, profile-id keys, long message ids) are still split at the limit."""
    values = [b'{"n":1}'] * 3_000
    keys = [key_field(f"{n:032x}".encode()) for n in range(len(values))]
    headers = header_fields([f"{n:024x}-123456" for n in range(len(values))])
    out = batches(values, keys, headers, 5, 256 * 1024)
    assert all(len(data) <= 256 * 1024 for data, _ in out), [len(d) for d, _ in out]
    assert sum(count for _, count in out) == len(values)
    seen = [r.key for data, _ in out for r in DefaultRecordBatch(data)]
    assert seen == [f"{n:032x}".encode() for n in range(len(values))]


def test_helpers() -> None:
    assert varint(0) == b"\x00" and varint(-1) == b"\x01" and varint(64) == b"\x80\x01"
    sample = np.array([0, 63, 64, 8_191, 8_192, 2**20, 2**40])
    assert _varint_sizes(sample).tolist() == [len(varint(int(v))) for v in sample]
    assert crc32c(b"123", b"456789") == 0xE3069283  # the CRC-32C check value
    prebuilt = PrebuiltBatch(b"data", 3)
    assert prebuilt.record_count() == 3 and prebuilt.closed() and prebuilt._build() == b"data"
    assert prebuilt.size() == 4 and prebuilt.append(key=None, value=b"x", timestamp=None) is None


@pytest.mark.parametrize("width", [1, 27, 63, 64, 200])
def test_headers_of_ids_of_one_length_are_the_reference(width: int) -> None:
    mids = [f"{n:0{width}d}"[-width:] for n in range(50)]
    values = [b"{}"] * len(mids)
    keys: list[bytes | None] = [b"1.click"] * len(mids)
    got = build_batch(values, list(map(key_field, keys)), header_fields(mids), 7)
    assert got == _reference(values, keys, mids, 7)
