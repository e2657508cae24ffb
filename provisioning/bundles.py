"""The flow bundle: what a release is, shared by the gateway (which stores it) and the agent.

A bundle is a Node-RED flows array plus the node modules (name and exact version) those flows
need. It is content-addressed: `bundle_digest` hashes a canonical JSON encoding, so the same
flows and modules give the same digest however the JSON keys were ordered or indented, and an
agent that fetched a bundle over HTTP can prove it got the bytes the signed command named.

Flows are checked here, before anything stores or ships them, because Node-RED itself accepts
almost anything on `POST /flows` and then fails at runtime; a user should hear "item 3 has no
id" at release time, not "rolled back" on a thousand machines.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = [
    "BUNDLE_FORMAT",
    "CORE_NODE_TYPES",
    "MAX_FLOWS_BYTES",
    "STRUCTURAL_NODE_TYPES",
    "Bundle",
    "BundleDigestMismatch",
    "InvalidBundle",
    "InvalidFlows",
    "ModuleRef",
    "bundle_digest",
    "canonical_json",
    "check_flows",
    "non_core_node_types",
    "required_node_types",
    "validate_flows",
]

BUNDLE_FORMAT: Final = 1
"""Version of the bundle encoding; it is hashed too, so a format change changes digests."""

MAX_FLOWS_BYTES: Final = 5 * 1024 * 1024
"""Node-RED's default `apiMaxLength` is 5 MB: a bigger flows file would be refused by the
Admin API on the machine, so it is refused here first."""

MAX_JSON_DEPTH: Final = 100
"""Deepest nesting of arrays and objects a flows file or bundle may have. Real flows nest a
handful of levels; a limit well below Python's recursion limit keeps every later step (the
canonical encoding, the agent's own parse, Node-RED's) far from it."""

# Node types Node-RED's own `node-red` module registers (package @node-red/nodes, core/**).
# Generated from Node-RED 4.1.15 with:
#   grep -rhoE "registerType\(['\"][^'\"]+" node_modules/@node-red/nodes/core --include=*.js
# It is a static list on purpose: the gateway has no Node-RED installed to ask. A test compares
# it with what a running Node-RED reports for its `node-red` module.
CORE_NODE_TYPES: Final[frozenset[str]] = frozenset(
    {
        "batch",
        "catch",
        "change",
        "comment",
        "complete",
        "csv",
        "debug",
        "delay",
        "exec",
        "file",
        "file in",
        "function",
        "global-config",
        "html",
        "http in",
        "http proxy",
        "http request",
        "http response",
        "inject",
        "join",
        "json",
        "junction",
        "link call",
        "link in",
        "link out",
        "mqtt in",
        "mqtt out",
        "mqtt-broker",
        "range",
        "rbe",
        "sort",
        "split",
        "status",
        "switch",
        "tcp in",
        "tcp out",
        "tcp request",
        "template",
        "tls-config",
        "trigger",
        "udp in",
        "udp out",
        "unknown",
        "watch",
        "websocket in",
        "websocket out",
        "websocket-client",
        "websocket-listener",
        "xml",
        "yaml",
    }
)

STRUCTURAL_NODE_TYPES: Final[frozenset[str]] = frozenset({"tab", "subflow", "group", "junction"})
"""Types the flow engine itself understands; no node module provides them."""

_CONTAINER_TYPES: Final = frozenset({"tab", "subflow"})
_SUBFLOW_PREFIX: Final = "subflow:"

# npm package names: optional @scope/, lowercase, URL-safe, at most 214 characters.
_MODULE_NAME = re.compile(r"^(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
_MODULE_NAME_MAX = 214
# An exact semantic version; a release pins versions so it means the same thing next year.
_EXACT_VERSION = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)


class InvalidBundle(ValueError):
    """A bundle (or its flows) cannot be used; `reason` says what is wrong in user terms."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidFlows(InvalidBundle):
    """The data is not a Node-RED flows array that Node-RED could run."""


class BundleDigestMismatch(InvalidBundle):
    """A fetched bundle does not hash to the digest it was asked for (corrupt or substituted)."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"bundle digest is {actual} but {expected} was expected; the download is corrupt "
            "or not the release the command named, so it was not used"
        )
        self.expected = expected
        self.actual = actual


def canonical_json(value: Any) -> bytes:
    """The one encoding hashed for content addresses: sorted keys, no whitespace, UTF-8.

    Raises `InvalidBundle` for what has no such encoding (a lone surrogate, nesting past
    Python's recursion limit); `_load_json` refuses both before a document gets here.
    """
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidBundle(
            f"the document holds a lone UTF-16 surrogate ({exc.object[exc.start : exc.end]!a}), "
            "which is not a character and has no UTF-8 encoding"
        ) from None
    except RecursionError:
        raise InvalidBundle(f"the document nests deeper than {MAX_JSON_DEPTH} levels") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _load_json(data: bytes | str, what: str, max_bytes: int) -> Any:
    """Parse strictly: no NaN/Infinity and no duplicate keys, since both would make the
    canonical encoding (and so the digest) ambiguous."""
    if isinstance(data, str):
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidFlows(
                f"{what} holds a lone UTF-16 surrogate, which is not a character; "
                "remove it or write the character itself"
            ) from None
    else:
        size = len(data)
    if size > max_bytes:
        raise InvalidFlows(
            f"{what} is {size} bytes, more than the limit of {max_bytes} bytes "
            "(Node-RED's Admin API refuses larger deploys); split it or remove unused nodes"
        )
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidFlows(
                f"{what} is not UTF-8 text (bad byte at offset {exc.start}); "
                "export it from the Node-RED editor again"
            ) from exc
    else:
        text = data
    try:
        document = json.loads(
            text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys
        )
    except json.JSONDecodeError as exc:
        raise InvalidFlows(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError:
        raise InvalidFlows(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidFlows(f"{what} is not usable JSON: {exc}") from exc
    _check_depth(document, what)
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(document):
        raise InvalidFlows(
            f"{what} holds a lone UTF-16 surrogate escape such as \\ud800, which is not a "
            "character; remove it or write the character itself"
        )
    return document


# Text that came from UTF-8 (or a str that encodes to it) has no surrogates; only JSON's
# "\\ud800"-style escapes can make one, and pairs of them are fine (an emoji), so the document
# is searched only when the text holds such an escape.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _check_depth(document: Any, what: str) -> None:
    """Refuse nesting past `MAX_JSON_DEPTH`, level by level (no recursion, whatever the input)."""
    level = [document] if type(document) is dict or type(document) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise InvalidFlows(
                f"{what} nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects; "
                "Node-RED flows need a handful"
            )
        below: list[Any] = []
        for value in level:
            items = value.values() if type(value) is dict else value
            below += [item for item in items if type(item) is dict or type(item) is list]
        level = below


def _has_lone_surrogate(document: Any) -> bool:
    stack = [document]
    while stack:
        value = stack.pop()
        items = itertools.chain(value.keys(), value.values()) if type(value) is dict else value
        for item in items:
            if type(item) is str and _SURROGATE.search(item):
                return True
            if type(item) is dict or type(item) is list:
                stack.append(item)
    return False


def _describe(index: int, node: dict[str, Any]) -> str:
    node_id = node.get("id")
    node_type = node.get("type")
    parts = [f"item {index}"]
    if isinstance(node_id, str):
        parts.append(f"id {node_id!r}")
    if isinstance(node_type, str):
        parts.append(f"type {node_type!r}")
    return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


def check_flows(items: Any) -> list[dict[str, Any]]:
    """Check already-parsed JSON is a Node-RED flows array; return it typed, or raise InvalidFlows.

    Rules (all are things Node-RED needs to load the flows): a JSON array; every item an object
    with a non-empty string `id` and `type`; ids unique; a `z` (the tab or subflow a node lives
    in) names a tab or subflow in the same file; a `subflow:<id>` instance names a subflow that
    is defined in the file. Items are counted from 0, as in the file.
    """
    if isinstance(items, dict):
        if "flows" in items and "rev" in items:
            raise InvalidFlows(
                "this is a Node-RED Admin API response ({rev, flows}), not a flows file; "
                "use its 'flows' array, or export the flows from the editor"
            )
        raise InvalidFlows(
            "a Node-RED flows file is a JSON array of nodes, but this is a JSON object; "
            "export all flows from the Node-RED editor (Menu > Export > all flows)"
        )
    if not isinstance(items, list):
        raise InvalidFlows(
            f"a Node-RED flows file is a JSON array of nodes, but this is a JSON "
            f"{type(items).__name__}"
        )
    flows: list[dict[str, Any]] = []
    first_index: dict[str, int] = {}
    for index, node in enumerate(items):
        if not isinstance(node, dict):
            raise InvalidFlows(
                f"item {index} is a JSON {type(node).__name__}, not a node object; "
                "every item of a flows array is an object with 'id' and 'type'"
            )
        node_id = node.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise InvalidFlows(f"{_describe(index, node)} has no 'id' string; every node needs one")
        node_type = node.get("type")
        if not isinstance(node_type, str) or not node_type:
            raise InvalidFlows(
                f"{_describe(index, node)} has no 'type' string; every node needs one"
            )
        if node_id in first_index:
            raise InvalidFlows(
                f"id {node_id!r} is used by item {first_index[node_id]} and item {index}; "
                "node ids must be unique (import the flows into the editor and export again)"
            )
        first_index[node_id] = index
        flows.append(node)

    containers = {n["id"] for n in flows if n["type"] in _CONTAINER_TYPES}
    subflows = {n["id"] for n in flows if n["type"] == "subflow"}
    for index, node in enumerate(flows):
        if "z" in node and node["z"] not in (None, ""):
            z = node["z"]
            if not isinstance(z, str) or z not in containers:
                raise InvalidFlows(
                    f"{_describe(index, node)} belongs to z={z!r}, but there is no tab or "
                    "subflow with that id in the file; export the whole flow, not part of it"
                )
        node_type = node["type"]
        if node_type.startswith(_SUBFLOW_PREFIX):
            target = node_type[len(_SUBFLOW_PREFIX) :]
            if target not in subflows:
                raise InvalidFlows(
                    f"{_describe(index, node)} is an instance of subflow {target!r}, which is "
                    "not defined in the file; export the flows together with their subflows"
                )
    return flows


def validate_flows(data: bytes | str, max_bytes: int = MAX_FLOWS_BYTES) -> list[dict[str, Any]]:
    """Parse and check a Node-RED flows file; raise InvalidFlows with a reason a user can act on."""
    return check_flows(_load_json(data, "the flows file", max_bytes))


def required_node_types(flows: Iterable[dict[str, Any]]) -> set[str]:
    """Node types the flows need from node modules (core or contributed).

    Structural types (tab, subflow, group, junction) and instances of subflows defined in the
    same flows need no module, so they are left out. A Node-RED runtime runs these flows only
    if it knows every type returned here.
    """
    nodes = list(flows)
    subflows = {n.get("id") for n in nodes if n.get("type") == "subflow"}
    needed: set[str] = set()
    for node in nodes:
        node_type = node.get("type")
        if not isinstance(node_type, str) or node_type in STRUCTURAL_NODE_TYPES:
            continue
        if node_type.startswith(_SUBFLOW_PREFIX) and node_type[len(_SUBFLOW_PREFIX) :] in subflows:
            continue
        needed.add(node_type)
    return needed


def non_core_node_types(flows: Iterable[dict[str, Any]]) -> set[str]:
    """Node types that some module other than Node-RED's own must provide.

    The gateway reports these at release time when the release lists no modules for them.
    """
    return required_node_types(flows) - CORE_NODE_TYPES


class ModuleRef(BaseModel):
    """One npm node module a bundle needs, pinned to an exact version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > _MODULE_NAME_MAX or not _MODULE_NAME.match(value):
            raise ValueError(
                f"{value!r} is not an npm package name (lowercase letters, digits, '-', '.', "
                "'_', '~', optionally '@scope/', at most 214 characters)"
            )
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        if not _EXACT_VERSION.match(value):
            raise ValueError(
                f"{value!r} is not an exact version; a release pins one version such as "
                "1.2.3 (no ranges like ^1.2 or tags like latest)"
            )
        return value

    @classmethod
    def parse(cls, spec: str) -> ModuleRef:
        """Parse `name@version` (also `@scope/name@version`), as typed on a command line."""
        name, sep, version = spec.rpartition("@")
        if not sep or not name or name == "@":
            raise InvalidBundle(
                f"module {spec!r} has no version; write it as name@version, "
                "for example node-red-contrib-foo@1.2.3"
            )
        try:
            return cls(name=name, version=version)
        except ValueError as exc:
            raise InvalidBundle(f"module {spec!r}: {_first_error(exc)}") from exc

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def _first_error(exc: ValueError) -> str:
    """The human part of a pydantic error (or any ValueError)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            message = str(found[0].get("msg", exc))
            return message.removeprefix("Value error, ")
    return str(exc)


def _sorted_modules(modules: Iterable[ModuleRef]) -> list[ModuleRef]:
    ordered = sorted(modules, key=lambda m: m.name)
    for before, after in itertools.pairwise(ordered):
        if before.name == after.name:
            raise InvalidBundle(
                f"module {before.name!r} is listed twice ({before.version} and "
                f"{after.version}); Node-RED can load only one version"
            )
    return ordered


def _bundle_document(
    flows: Sequence[dict[str, Any]], modules: Iterable[ModuleRef]
) -> dict[str, Any]:
    return {
        "format": BUNDLE_FORMAT,
        "flows": list(flows),
        "modules": [m.model_dump() for m in _sorted_modules(modules)],
    }


def bundle_digest(flows: Sequence[dict[str, Any]], modules: Iterable[ModuleRef]) -> str:
    """Content address `sha256:<hex>` of flows and modules.

    Key order inside nodes and module order do not matter (both are canonicalised); node order
    does, because Node-RED keeps tabs in file order.
    """
    return "sha256:" + hashlib.sha256(canonical_json(_bundle_document(flows, modules))).hexdigest()


class Bundle(BaseModel):
    """An immutable release bundle: flows plus the modules they need."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flows: list[dict[str, Any]]
    modules: tuple[ModuleRef, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Bundle:
        check_flows(self.flows)
        _sorted_modules(self.modules)
        return self

    @classmethod
    def create(cls, flows_json: bytes | str, modules: Iterable[ModuleRef | str] = ()) -> Bundle:
        """Build a bundle from a flows file and `ModuleRef`s or `name@version` strings."""
        flows = validate_flows(flows_json)
        refs = tuple(m if isinstance(m, ModuleRef) else ModuleRef.parse(m) for m in modules)
        _sorted_modules(refs)
        return cls(flows=flows, modules=tuple(sorted(refs, key=lambda m: m.name)))

    @property
    def digest(self) -> str:
        return bundle_digest(self.flows, self.modules)

    def required_node_types(self) -> set[str]:
        return required_node_types(self.flows)

    def to_bytes(self) -> bytes:
        """The canonical encoding; its sha256 is the digest."""
        return canonical_json(_bundle_document(self.flows, self.modules))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        expected_digest: str | None = None,
        max_bytes: int = MAX_FLOWS_BYTES + 1024 * 1024,
    ) -> Bundle:
        """Decode a bundle (as served by the gateway) and, if given, check its digest.

        The digest is computed over the canonical re-encoding, so a bundle whose bytes were
        re-indented still verifies, while any change to flows or modules does not.
        """
        document = _load_json(data, "the bundle", max_bytes)
        if not isinstance(document, dict):
            raise InvalidBundle("a bundle is a JSON object with 'format', 'flows' and 'modules'")
        unknown = set(document) - {"format", "flows", "modules"}
        if unknown:
            raise InvalidBundle(f"a bundle has no field(s) {sorted(unknown)}")
        if document.get("format") != BUNDLE_FORMAT:
            raise InvalidBundle(
                f"bundle format {document.get('format')!r} is not supported (this side reads "
                f"format {BUNDLE_FORMAT}); upgrade the edge agent or the gateway"
            )
        flows = check_flows(document.get("flows"))
        raw_modules = document.get("modules", [])
        if not isinstance(raw_modules, list):
            raise InvalidBundle("a bundle's 'modules' is a list of {name, version} objects")
        modules: list[ModuleRef] = []
        for index, raw in enumerate(raw_modules):
            try:
                modules.append(ModuleRef.model_validate(raw))
            except ValueError as exc:
                raise InvalidBundle(f"bundle module {index}: {_first_error(exc)}") from exc
        bundle = cls(flows=flows, modules=tuple(_sorted_modules(modules)))
        if expected_digest is not None:
            bundle.verify(expected_digest)
        return bundle

    def verify(self, expected_digest: str) -> None:
        """Raise BundleDigestMismatch unless this bundle's digest is `expected_digest`."""
        actual = self.digest
        if actual != expected_digest:
            raise BundleDigestMismatch(expected_digest, actual)
