"""The telemetry wire schema: what parses, and every reason a batch is refused."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from provisioning.telemetry import (
    DEVICE_MISMATCH,
    FUTURE_TIMESTAMP,
    MALFORMED_JSON,
    NON_NUMERIC,
    OVERSIZED,
    REASONS,
    SCHEMA,
    UNSUPPORTED_VERSION,
    BatchRejected,
    Sample,
    TelemetryBatch,
    check_identity,
    check_metric_name,
    encode_batch,
    make_sample,
    parse_batch,
)

NOW = 1_732_370_000.0


def parse(payload: bytes, **limits: Any) -> TelemetryBatch:
    options: dict[str, Any] = {
        "max_bytes": 65536,
        "max_samples": 100,
        "now": NOW,
        "max_future_skew": 60.0,
    }
    options.update(limits)
    return parse_batch(payload, **options)


def doc(samples: Any = None, **top: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "seq": 7}
    body["samples"] = samples if samples is not None else [{"m": "temp", "t": NOW, "v": 21.5}]
    body.update(top)
    return json.dumps(body).encode()


def rejected(payload: bytes, **limits: Any) -> BatchRejected:
    with pytest.raises(BatchRejected) as info:
        parse(payload, **limits)
    assert info.value.reason in REASONS
    assert info.value.detail
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value


def test_round_trip_keeps_order_and_values() -> None:
    samples = [Sample("temp", NOW - 1.5, 21.5), Sample("line1/rpm", NOW, 1200.0)]
    payload = encode_batch(42, samples)
    assert json.loads(payload) == {
        "v": 1,
        "seq": 42,
        "samples": [
            {"m": "temp", "t": NOW - 1.5, "v": 21.5},
            {"m": "line1/rpm", "t": NOW, "v": 1200.0},
        ],
    }
    batch = parse(payload)
    assert batch == TelemetryBatch(seq=42, samples=samples, claimed_device=None, version=1)


def test_integers_are_numbers_and_come_out_as_floats() -> None:
    batch = parse(doc([{"m": "count", "t": int(NOW), "v": 3}]))
    assert batch.samples == [Sample("count", NOW, 3.0)]
    assert type(batch.samples[0][2]) is float


def test_claimed_device_is_exposed_and_checked_against_the_topic() -> None:
    batch = parse(encode_batch(1, [Sample("temp", NOW, 1.0)], device="press-01"))
    assert batch.claimed_device == "press-01"
    check_identity(batch, "press-01")  # same device: fine
    with pytest.raises(BatchRejected) as info:
        check_identity(batch, "press-02")
    assert info.value.reason == DEVICE_MISMATCH
    assert "press-01" in info.value.detail and "press-02" in info.value.detail
    check_identity(parse(doc()), "anything")  # no claim: the topic is the identity


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"", b'{"v": 1, "seq": 1, "samples": [', b"\xff\xfe{}"],
)
def test_malformed_json(payload: bytes) -> None:
    assert rejected(payload).reason == MALFORMED_JSON


@pytest.mark.parametrize(
    "payload",
    [
        b"[1, 2, 3]",
        b'"a string"',
        doc(seq=-1),
        doc(seq=2**63),
        doc(seq="7"),
        doc(seq=True),
        doc(samples=[]),
        doc(samples={"m": "temp"}),
        doc(samples=[[NOW, 1.0]]),
        doc(samples=[{"m": "temp", "v": 1.0}]),
        doc(samples=[{"m": "temp", "t": NOW, "v": 1.0, "unit": "C"}]),
        doc(samples=[{"m": "bad name", "t": NOW, "v": 1.0}]),
        doc(samples=[{"m": "", "t": NOW, "v": 1.0}]),
        doc(samples=[{"m": "x" * 65, "t": NOW, "v": 1.0}]),
        doc(samples=[{"m": ".hidden", "t": NOW, "v": 1.0}]),
        doc(samples=[{"m": 5, "t": NOW, "v": 1.0}]),
        doc(samples=[{"m": "temp", "t": "yesterday", "v": 1.0}]),
        doc(samples=[{"m": "temp", "t": -5, "v": 1.0}]),
        doc(device=17),
        doc(extra="field"),
        json.dumps({"v": 1, "samples": [{"m": "temp", "t": NOW, "v": 1}]}).encode(),
    ],
)
def test_schema(payload: bytes) -> None:
    assert rejected(payload).reason == SCHEMA


def test_schema_detail_names_the_place() -> None:
    error = rejected(
        doc(samples=[{"m": "ok", "t": NOW, "v": 1}, {"m": "bad name", "t": NOW, "v": 1}])
    )
    assert "samples.1.m" in error.detail
    assert "metric names match" in error.detail


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.0])
def test_unsupported_version(version: Any) -> None:
    assert rejected(doc(v=version)).reason == UNSUPPORTED_VERSION


def test_oversized_bytes_are_refused_before_parsing() -> None:
    payload = b"x" * 1001  # not even JSON: the size check comes first
    error = rejected(payload, max_bytes=1000)
    assert error.reason == OVERSIZED
    assert "1001" in error.detail


def test_too_many_samples_is_oversized() -> None:
    samples = [{"m": "temp", "t": NOW, "v": float(i)} for i in range(11)]
    assert rejected(doc(samples), max_samples=10).reason == OVERSIZED
    assert len(parse(doc(samples[:10]), max_samples=10).samples) == 10


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":NaN}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":Infinity}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":-Infinity}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":1e400}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":true}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":"21.5"}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":null}]}',
        b'{"v":1,"seq":1,"samples":[{"m":"a","t":1732370000,"v":[1]}]}',
    ],
)
def test_non_numeric(raw: bytes) -> None:
    assert rejected(raw).reason == NON_NUMERIC


def test_future_timestamp_respects_the_skew() -> None:
    assert parse(doc([{"m": "temp", "t": NOW + 59, "v": 1.0}])).samples[0][1] == NOW + 59
    error = rejected(doc([{"m": "ok", "t": NOW, "v": 1}, {"m": "temp", "t": NOW + 61, "v": 1}]))
    assert error.reason == FUTURE_TIMESTAMP
    assert "'temp'" in error.detail


def test_milliseconds_get_a_hint() -> None:
    error = rejected(doc([{"m": "temp", "t": NOW * 1000, "v": 1.0}]))
    assert error.reason == FUTURE_TIMESTAMP
    assert "milliseconds" in error.detail


def test_make_sample_applies_the_same_rules() -> None:
    assert make_sample("temp", 3, NOW, now=NOW, max_future_skew=60) == Sample("temp", NOW, 3.0)
    cases: list[tuple[Any, Any, Any, str]] = [
        ("bad name", 1.0, NOW, SCHEMA),
        ("temp", True, NOW, NON_NUMERIC),
        ("temp", "1", NOW, NON_NUMERIC),
        ("temp", float("nan"), NOW, NON_NUMERIC),
        ("temp", 10**400, NOW, NON_NUMERIC),
        ("temp", 1.0, "now", SCHEMA),
        ("temp", 1.0, 0, SCHEMA),
        ("temp", 1.0, NOW + 61, FUTURE_TIMESTAMP),
    ]
    for metric, value, ts, reason in cases:
        with pytest.raises(BatchRejected) as info:
            make_sample(metric, value, ts, now=NOW, max_future_skew=60)
        assert info.value.reason == reason, (metric, value, ts)


def test_metric_name_charset() -> None:
    for good in ["temp", "line1/rpm", "host.cpu_percent", "a:b-c", "_x", "9" * 64]:
        assert check_metric_name(good) == good
    for bad in ["", "a b", "ä", "-x", "/x", "x" * 65, "a\n"]:
        with pytest.raises(BatchRejected):
            check_metric_name(bad)


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode_batch(1, [Sample("temp", NOW, float("nan"))])


def test_parsing_is_fast_enough_for_the_gateway() -> None:
    """The gateway parses >10k batches/s per process; leave room for the rest of its work."""
    payload = encode_batch(1, [Sample(f"m{i}", NOW, float(i)) for i in range(10)])
    count = 5000
    started = time.perf_counter()
    for _ in range(count):
        parse(payload)
    rate = count / (time.perf_counter() - started)
    assert rate > 10_000, f"only {rate:.0f} batches/s of 10 samples"
