"""Every parser of outside input is total: any input gives a result or a clear refusal, never an
exception that escapes (RecursionError, UnicodeEncodeError, KeyError, ...). Hypothesis drives
each parser with arbitrary bytes and with generated documents close to valid ones: flows files and
bundles, telemetry batches, status and reply messages, module manifests and tarballs, and the
agent's intake. The specific inputs of issue 12 are pinned beside them.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.telemetry.intake import decode_json, samples_from_request
from gateway.errors import Invalid
from gateway.flows import module_cache
from provisioning.bundles import MAX_JSON_DEPTH, Bundle, InvalidBundle, validate_flows
from provisioning.device_input import (
    MAX_DETAIL_CHARS,
    MessageRefused,
    has_unsafe_characters,
    parse_message,
)
from provisioning.telemetry import BatchRejected, make_sample, parse_batch
from provisioning.wire import DeviceStatus, Reply

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# JSON values, nested, with the awkward parts: lone surrogates, controls, huge and odd numbers.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None), max_size=20),
    st.sampled_from(["\ud800", "\udfff", "\x1b[2J", "\u202e", "", "id", "type", "z", "tab"]),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=40,
)


def _encode(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# ---- flows and bundles ----------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_a_flows_file_of_any_bytes_is_flows_or_a_reason(data: bytes | str) -> None:
    try:
        flows = validate_flows(data)
    except InvalidBundle as exc:
        assert exc.reason
    else:
        assert isinstance(flows, list)


@FUZZ
@given(st.lists(json_values, max_size=6))
def test_any_json_document_as_flows_is_flows_or_a_reason(items: list[Any]) -> None:
    try:
        bundle = Bundle.create(_encode(items))
        assert bundle.to_bytes()  # what is accepted has its canonical encoding and a digest
        assert bundle.digest.startswith("sha256:")
    except InvalidBundle as exc:
        assert exc.reason


@FUZZ
@given(st.binary(max_size=400) | json_values.map(lambda v: _encode(v).encode()))
def test_a_bundle_of_any_bytes_is_a_bundle_or_a_reason(data: bytes) -> None:
    try:
        Bundle.from_bytes(data)
    except InvalidBundle as exc:
        assert exc.reason


@pytest.mark.parametrize(
    "text",
    [
        _nested(1500),
        _nested(MAX_JSON_DEPTH + 1),
        '[{"id": "a", "type": "inject", "name": "\\ud800"}]',
        '[{"id": "a", "type": "inject", "\\udfff": 1}]',
        '[{"id": "a", "type": "inject", "name": "\ud800"}]',  # a str holding one, not an escape
    ],
)
def test_deep_nesting_and_lone_surrogates_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(InvalidBundle) as refused:
        Bundle.create(text)
    assert "nests deeper" in refused.value.reason or "surrogate" in refused.value.reason


def test_surrogate_pairs_and_moderate_nesting_are_fine() -> None:
    flows = [{"id": "a", "type": "inject", "name": "\ud83d\ude00", "x": json.loads(_nested(50))}]
    bundle = Bundle.create(json.dumps(flows))
    assert Bundle.from_bytes(bundle.to_bytes(), bundle.digest).flows[0]["name"] == "\U0001f600"


# ---- telemetry batches ------------------------------------------------------------------------

_sample = st.fixed_dictionaries(
    {"m": st.one_of(st.text(max_size=70), st.integers()), "t": _scalars, "v": _scalars}
)
_batch = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), _scalars), "seq": _scalars, "samples": st.lists(_sample)},
    optional={"device": _scalars, "extra": _scalars},
)


@FUZZ
@given(st.binary(max_size=300) | _batch.map(lambda b: _encode(b).encode()))
def test_a_telemetry_message_of_any_bytes_is_a_batch_or_a_reason(payload: bytes) -> None:
    now = time.time()
    try:
        batch = parse_batch(payload, now=now)
    except BatchRejected as exc:
        assert exc.reason and exc.detail
    else:
        assert batch.samples
        for metric, ts, value in batch.samples:
            assert isinstance(metric, str) and math.isfinite(ts) and math.isfinite(value)
            assert ts <= now + 300


# ---- status and reply messages ---------------------------------------------------------------

_status = st.fixed_dictionaries(
    {"state": st.sampled_from(["online", "offline", "owned"]) | _scalars},
    optional={
        "agent_version": _scalars,
        "node_red_version": _scalars,
        "ts": _scalars,
        "outbox_queued": _scalars,
        "outbox_dropped": _scalars,
    },
)
_reply = st.fixed_dictionaries(
    {
        "command_id": st.sampled_from(["c" * 32, "?", "x" * 65, "a/b"]) | _scalars,
        "state": st.sampled_from(["succeeded", "failed", "owned", "applying"]) | _scalars,
    },
    optional={
        "detail": _scalars | st.text(min_size=MAX_DETAIL_CHARS, max_size=MAX_DETAIL_CHARS + 9),
        "data": json_values,
        "ts": _scalars,
    },
)


@FUZZ
@given(st.binary(max_size=300) | _status.map(lambda s: _encode(s).encode()))
def test_a_status_message_is_a_checked_status_or_a_refusal(payload: bytes) -> None:
    try:
        status = parse_message(DeviceStatus, payload, 4096)
    except MessageRefused as exc:
        assert exc.reason in {"malformed_json", "schema", "oversized"}
        assert len(exc.detail) < 400  # it names the field, it does not quote the payload
    else:
        assert status.state in ("online", "offline")
        for text in (status.agent_version, status.node_red_version):
            assert text is None or (len(text) <= 64 and not has_unsafe_characters(text))


@FUZZ
@given(st.binary(max_size=300) | _reply.map(lambda r: _encode(r).encode()))
def test_a_reply_message_is_a_checked_reply_or_a_refusal(payload: bytes) -> None:
    try:
        reply = parse_message(Reply, payload, 64 * 1024)
    except MessageRefused as exc:
        assert exc.reason in {"malformed_json", "schema", "oversized"}
    else:
        assert reply.state in {"succeeded", "failed", "applying"}
        assert reply.detail is None or len(reply.detail) <= MAX_DETAIL_CHARS


def test_a_refusal_names_the_field_never_the_value() -> None:
    with pytest.raises(MessageRefused) as refused:
        parse_message(DeviceStatus, json.dumps({"state": "SECRET-VALUE"}).encode(), 4096)
    assert "state" in refused.value.detail and "SECRET-VALUE" not in refused.value.detail
    with pytest.raises(MessageRefused) as oversized:
        parse_message(Reply, b"{" + b" " * 70_000 + b"}", 64 * 1024)
    assert oversized.value.reason == "oversized"


# ---- module manifests and tarballs -----------------------------------------------------------


Links = dict[str, tuple[bytes, str]]


def tarball(members: dict[str, bytes], *, links: Links | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for path, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(path)
            info.type = kind
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def _manifest(name: object = "node-red-contrib-x", version: object = "1.0.0") -> bytes:
    doc = {"name": name, "version": version, "node-red": {"nodes": {"x": "x.js"}}}
    return json.dumps(doc).encode()


GOOD = {"package/package.json": _manifest(), "package/x.js": b"RED.nodes.registerType('x-node')"}


def test_a_good_tarball_is_read() -> None:
    found = module_cache._inspect(tarball(GOOD))
    assert (found.name, found.version, found.node_types) == (
        "node-red-contrib-x",
        "1.0.0",
        ["x-node"],
    )


@FUZZ
@given(st.binary(max_size=400) | json_values.map(lambda v: _encode(v).encode()))
def test_a_manifest_of_any_bytes_is_read_or_refused(manifest: bytes) -> None:
    try:
        module_cache._inspect(tarball({**GOOD, "package/package.json": manifest}))
    except Invalid as exc:
        assert exc.reason in {"bad_tarball", "not_a_node_module"}


@FUZZ
@given(st.binary(max_size=600))
def test_a_tarball_of_any_bytes_is_read_or_refused(data: bytes) -> None:
    for candidate in (data, gzip.compress(data)):
        try:
            module_cache._inspect(candidate)
        except Invalid as exc:
            assert exc.reason in {"bad_tarball", "not_a_node_module"}


@pytest.mark.parametrize(
    ("members", "links", "says"),
    [
        ({**GOOD, "package/../../etc/cron.d/x": b"* * * * * root sh"}, None, "outside package/"),
        ({**GOOD, "/etc/passwd": b"root::0:0"}, None, "absolute path"),
        ({**GOOD, "other/x.js": b""}, None, "outside package/"),
        (GOOD, {"package/link": (tarfile.SYMTYPE, "/etc/shadow")}, "is a link"),
        (GOOD, {"package/hard": (tarfile.LNKTYPE, "package/x.js")}, "is a link"),
        (GOOD, {"package/fifo": (tarfile.FIFOTYPE, "")}, "not a plain file"),
        (GOOD, {"package/dev": (tarfile.CHRTYPE, "")}, "not a plain file"),
        ({**GOOD, **{f"package/f{n}": b"" for n in range(5001)}}, None, "more than 5000 files"),
        ({**GOOD, "package/package.json": _manifest(name=["a"] * 3)}, None, "string 'name'"),
        ({**GOOD, "package/package.json": _nested(5000).encode()}, None, "package.json"),
    ],
)
def test_a_tarball_from_a_stranger_is_refused(
    members: dict[str, bytes], links: Links | None, says: str
) -> None:
    with pytest.raises(Invalid) as refused:
        module_cache._inspect(tarball(members, links=links))
    assert refused.value.reason == "bad_tarball"
    assert says in refused.value.detail


class _CountingGzip(gzip.GzipFile):
    """Counts the bytes decompressed (an observer: what gets read is the real thing)."""

    unpacked = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        _CountingGzip.unpacked += len(data)
        return data


def _bomb(members: int, size: int) -> bytes:
    """`members` files of `size` zero bytes, gzipped: a few MB that unpack to members*size."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as packed,
        tarfile.open(fileobj=packed, mode="w|") as archive,
    ):
        info = tarfile.TarInfo("package/package.json")
        info.size = len(GOOD["package/package.json"])
        archive.addfile(info, io.BytesIO(GOOD["package/package.json"]))
        zeros = b"\0" * (1 << 20)
        for n in range(members):
            info = tarfile.TarInfo(f"package/zeros{n}")
            info.size = size
            archive.addfile(info, _Zeros(size, zeros))
    return buffer.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int, block: bytes) -> None:
        self._left = size
        self._block = block

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._block[:n] if n <= len(self._block) else b"\0" * n


@pytest.mark.parametrize(("members", "size"), [(1, 1 << 30), (600, 1 << 20)])
def test_a_decompression_bomb_is_refused_without_unpacking_it_all(
    monkeypatch: pytest.MonkeyPatch, members: int, size: int
) -> None:
    bomb = _bomb(members, size)
    assert len(bomb) < 8 << 20  # small enough to upload
    _CountingGzip.unpacked = 0
    monkeypatch.setattr(module_cache.gzip, "GzipFile", _CountingGzip)
    with pytest.raises(Invalid) as refused:
        module_cache._inspect(bomb)
    assert "more than 268435456 bytes" in refused.value.detail
    assert _CountingGzip.unpacked <= (256 + 16) << 20  # never more than the cap and its slack


# ---- the agent's intake ----------------------------------------------------------------------


@FUZZ
@given(
    st.binary(max_size=300) | json_values.map(lambda v: _encode(v).encode()),
    st.none() | st.text(max_size=70),
)
def test_the_intake_turns_any_body_into_samples_or_a_400_reason(
    body: bytes, metric: str | None
) -> None:
    now = time.time()
    try:
        for sample in samples_from_request(decode_json(body), metric, now):
            make_sample(*sample, now=now, max_future_skew=300)
    except BatchRejected as exc:
        assert exc.reason


def test_deeply_nested_json_at_the_intake_is_a_400_reason() -> None:
    with pytest.raises(BatchRejected) as refused:
        decode_json(_nested(100_000).encode())
    assert refused.value.reason == "malformed_json"
