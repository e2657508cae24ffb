"""The flow bundle format: flows validation, content addressing, encoding round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest

from provisioning.bundles import (
    CORE_NODE_TYPES,
    Bundle,
    BundleDigestMismatch,
    InvalidBundle,
    InvalidFlows,
    ModuleRef,
    bundle_digest,
    non_core_node_types,
    required_node_types,
    validate_flows,
)

FLOWS: list[dict[str, Any]] = [
    {"id": "tab1", "type": "tab", "label": "Line A"},
    {"id": "sf1", "type": "subflow", "name": "scale", "in": [], "out": []},
    {"id": "sfn", "type": "function", "z": "sf1", "func": "return msg;", "wires": []},
    {"id": "inj", "type": "inject", "z": "tab1", "wires": [["inst"]]},
    {"id": "inst", "type": "subflow:sf1", "z": "tab1", "wires": [["dbg"]]},
    {"id": "dbg", "type": "debug", "z": "tab1", "wires": []},
    {"id": "grp", "type": "group", "z": "tab1", "nodes": ["dbg"]},
    {"id": "mod", "type": "modbus-read", "z": "tab1", "wires": []},
    {"id": "brk", "type": "mqtt-broker", "broker": "localhost"},
]


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_valid_flows_pass_and_come_back_as_parsed() -> None:
    assert validate_flows(encode(FLOWS)) == FLOWS
    assert validate_flows(json.dumps(FLOWS)) == FLOWS
    assert validate_flows(b"[]") == []
    # A byte-order mark (Windows editors) is not a reason to refuse.
    assert validate_flows(b"\xef\xbb\xbf" + encode(FLOWS)) == FLOWS


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe[]", "not UTF-8"),
        (b'[{"id": "a", "type": "tab"', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"id": "a", "type": "tab"}', "JSON array of nodes, but this is a JSON object"),
        (b'{"rev": "abc", "flows": []}', "Admin API response"),
        (b'"flows"', "JSON array of nodes, but this is a JSON str"),
        (b'[{"id": "a", "type": "tab"}, 7]', "item 1 is a JSON int, not a node object"),
        (b'[{"type": "inject"}]', "item 0 (type 'inject') has no 'id' string"),
        (b'[{"id": 5, "type": "inject"}]', "has no 'id' string"),
        (b'[{"id": "", "type": "inject"}]', "has no 'id' string"),
        (b'[{"id": "n1"}]', "item 0 (id 'n1') has no 'type' string"),
        (b'[{"id": "n1", "type": ""}]', "has no 'type' string"),
        (
            b'[{"id": "a", "type": "tab"}, {"id": "a", "type": "inject", "z": "a"}]',
            "id 'a' is used by item 0 and item 1",
        ),
        (
            b'[{"id": "n1", "type": "inject", "z": "gone"}]',
            "belongs to z='gone', but there is no tab or subflow with that id",
        ),
        (
            b'[{"id": "t", "type": "inject"}, {"id": "n1", "type": "debug", "z": "t"}]',
            "belongs to z='t'",  # z must name a tab or subflow, not just any node
        ),
        (
            b'[{"id": "t", "type": "tab"}, {"id": "n1", "type": "subflow:nope", "z": "t"}]',
            "instance of subflow 'nope', which is not defined",
        ),
        (b'[{"id": "a", "type": "tab", "x": NaN}]', "NaN is not a JSON number"),
        (b'[{"id": "a", "type": "tab", "id": "b"}]', "key 'id' appears twice"),
    ],
)
def test_invalid_flows_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidFlows) as caught:
        validate_flows(data)
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_size_bound() -> None:
    data = encode(FLOWS)
    assert validate_flows(data, max_bytes=len(data)) == FLOWS
    with pytest.raises(InvalidFlows, match=rf"{len(data)} bytes, more than the limit of 100"):
        validate_flows(data, max_bytes=100)


def test_required_and_non_core_node_types() -> None:
    # Structural types and instances of a subflow in the same file need no module.
    assert required_node_types(FLOWS) == {
        "function",
        "inject",
        "debug",
        "modbus-read",
        "mqtt-broker",
    }
    assert non_core_node_types(FLOWS) == {"modbus-read"}
    assert {"inject", "debug", "function", "change", "switch", "http in"} <= CORE_NODE_TYPES
    assert "tab" not in required_node_types([{"id": "t", "type": "tab"}])


def test_digest_is_stable_and_independent_of_key_and_module_order() -> None:
    modules = [ModuleRef(name="node-red-contrib-b", version="1.0.0"), ModuleRef.parse("a-x@2.1.0")]
    digest = bundle_digest(FLOWS, modules)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    reordered = [dict(reversed(list(node.items()))) for node in FLOWS]
    assert bundle_digest(reordered, list(reversed(modules))) == digest
    # Re-parsing pretty-printed JSON gives the same address.
    assert bundle_digest(validate_flows(json.dumps(FLOWS, indent=4)), modules) == digest
    # Any change to content, node order or a module version changes it.
    changed = [*FLOWS[:-1], {**FLOWS[-1], "broker": "otherhost"}]
    assert bundle_digest(changed, modules) != digest
    assert bundle_digest(list(reversed(FLOWS)), modules) != digest
    assert bundle_digest(FLOWS, [modules[0], ModuleRef.parse("a-x@2.1.1")]) != digest
    assert bundle_digest(FLOWS, []) != digest


def test_bundle_round_trip_and_verification() -> None:
    bundle = Bundle.create(encode(FLOWS), ["node-red-contrib-modbus@5.43.0", "@scope/pkg@1.0.0"])
    assert [str(m) for m in bundle.modules] == [
        "@scope/pkg@1.0.0",
        "node-red-contrib-modbus@5.43.0",
    ]
    data = bundle.to_bytes()
    assert bundle.digest == bundle_digest(FLOWS, bundle.modules)
    again = Bundle.from_bytes(data, expected_digest=bundle.digest)
    assert again == bundle and again.to_bytes() == data
    # Re-encoded with other whitespace and key order it still verifies: the digest is over content.
    pretty = json.dumps(json.loads(data), indent=2).encode()
    assert Bundle.from_bytes(pretty, expected_digest=bundle.digest) == bundle


def test_digest_mismatch_is_refused() -> None:
    bundle = Bundle.create(encode(FLOWS))
    tampered = json.loads(bundle.to_bytes())
    tampered["flows"][3]["func"] = "process.exit()"
    with pytest.raises(BundleDigestMismatch) as caught:
        Bundle.from_bytes(json.dumps(tampered).encode(), expected_digest=bundle.digest)
    assert caught.value.expected == bundle.digest
    assert caught.value.actual != bundle.digest
    assert "not the release the command named" in str(caught.value)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], "a bundle is a JSON object"),
        ({"format": 99, "flows": [], "modules": []}, "bundle format 99 is not supported"),
        ({"format": 1, "flows": [], "modules": [], "extra": 1}, "no field(s) ['extra']"),
        ({"format": 1, "flows": {}, "modules": []}, "JSON array of nodes"),
        ({"format": 1, "flows": [], "modules": {}}, "'modules' is a list"),
        (
            {"format": 1, "flows": [], "modules": [{"name": "Bad Name", "version": "1.0.0"}]},
            "'Bad Name' is not an npm package name",
        ),
        (
            {
                "format": 1,
                "flows": [],
                "modules": [{"name": "a", "version": "1.0.0"}, {"name": "a", "version": "2.0.0"}],
            },
            "module 'a' is listed twice",
        ),
    ],
)
def test_invalid_bundles_are_refused(document: Any, reason: str) -> None:
    with pytest.raises(InvalidBundle) as caught:
        Bundle.from_bytes(encode(document))
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("node-red-contrib-x", "has no version"),
        ("node-red-contrib-x@^1.2.0", "is not an exact version"),
        ("node-red-contrib-x@latest", "is not an exact version"),
        ("Node-Red-X@1.0.0", "is not an npm package name"),
        ("@scope@1.0.0", "is not an npm package name"),
    ],
)
def test_module_specs(spec: str, reason: str) -> None:
    with pytest.raises(InvalidBundle, match=reason):
        ModuleRef.parse(spec)


def test_module_spec_parsing() -> None:
    assert ModuleRef.parse("@flowfuse/node-red-dashboard@1.2.3-beta.1") == ModuleRef(
        name="@flowfuse/node-red-dashboard", version="1.2.3-beta.1"
    )
