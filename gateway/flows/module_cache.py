"""The gateway's node module cache: `npm pack` tarballs stored once, served to agents by sha256.

Air-gapped sites are normal in industry, so an agent never asks a public registry: it installs
the tarballs the operator added here. A tarball is immutable under its name and version (a second
upload of the same version with other bytes is refused), and the node types it registers are read
from its files so that a release can say which of its types no listed module provides.

The tarball is handled like an archive from a stranger, since machines will hand it to npm: it is
read in memory and never extracted, and refused unless every member is a plain file or directory
under ``package/`` (no absolute paths, no ``..``, no symbolic or hard links, no devices), with at
most `_MAX_MEMBERS` members and `_MAX_UNPACKED_BYTES` unpacked. The first pass streams the
archive through a decompressor that stops at that limit, so a decompression bomb is refused
after at most that many bytes, not unpacked whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.errors import Conflict, Invalid, NotFound
from gateway.flows.models import FlowModule
from gateway.pagination import Page, PageRequest, SortKey, finish, keyset
from gateway.registry import audit
from provisioning.bundles import InvalidBundle, ModuleRef

__all__ = ["ModuleSummary", "add_module", "get_module", "list_modules", "modules_by_ref"]

_MAX_MEMBERS: Final = 5000
_MAX_READ_BYTES: Final = 8 * 1024 * 1024
_MAX_UNPACKED_BYTES: Final = 256 * 1024 * 1024
_TAR_SLACK: Final = 16 * 1024 * 1024  # headers and padding beyond the members' own bytes
_PACKAGE_ROOT: Final = "package"
_REGISTER_TYPE = re.compile(r"""registerType\(\s*(['"])([^'"\\]{1,200})\1""")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModuleSummary:
    """A cached module without its bytes (what listings and releases need)."""

    sha256: str
    name: str
    version: str
    size: int
    node_types: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class _Package:
    name: str
    version: str
    node_types: list[str]


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > _MAX_READ_BYTES:
        raise Invalid(
            "bad_tarball",
            f"{member.name} in the tarball is {member.size} bytes; a node module file larger "
            f"than {_MAX_READ_BYTES} bytes is not accepted",
        )
    handle = archive.extractfile(member)
    if handle is None:
        raise Invalid("bad_tarball", f"{member.name} in the tarball is not a regular file")
    return handle.read()


class _Capped(io.RawIOBase):
    """A decompressed stream that refuses to give more than `limit` bytes."""

    def __init__(self, source: gzip.GzipFile, limit: int) -> None:
        self._source = source
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        got = self._source.read(min(len(view), self._left + 1))
        if len(got) > self._left:
            raise Invalid(
                "bad_tarball",
                f"the tarball unpacks to more than {_MAX_UNPACKED_BYTES} bytes; it was refused "
                "without unpacking the rest",
            )
        self._left -= len(got)
        view[: len(got)] = got
        return len(got)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why `member` may not be in a module tarball, or None."""
    name = member.name
    if member.issym() or member.islnk():
        return f"{name!r} is a link; a module tarball holds plain files only"
    if not (member.isfile() or member.isdir()):
        return f"{name!r} is not a plain file or directory"
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal.startswith("/"):
        return f"{name!r} is an absolute path"
    inside = normal == _PACKAGE_ROOT or normal.startswith(_PACKAGE_ROOT + "/")
    if ".." in name.split("/") or not inside:
        return f"{name!r} lies outside package/"
    if "\\" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return f"{name!a} holds a backslash or a control character"
    return None


def _check_members(data: bytes) -> None:
    """First pass, streaming under the unpacked-size cap: every member's kind, path and size."""
    stream = gzip.GzipFile(fileobj=io.BytesIO(data))
    capped = io.BufferedReader(_Capped(stream, _MAX_UNPACKED_BYTES + _TAR_SLACK))
    total = 0
    with tarfile.open(fileobj=capped, mode="r|") as archive:
        for count, member in enumerate(archive, start=1):
            if count > _MAX_MEMBERS:
                raise Invalid("bad_tarball", f"the tarball has more than {_MAX_MEMBERS} files")
            problem = _member_problem(member)
            if problem is not None:
                raise Invalid("bad_tarball", f"{problem}; make the tarball with `npm pack`")
            total += member.size
            if total > _MAX_UNPACKED_BYTES:
                raise Invalid(
                    "bad_tarball",
                    f"the tarball's files add up to more than {_MAX_UNPACKED_BYTES} bytes",
                )


def _inspect(data: bytes) -> _Package:
    """Name, version and registered node types of an `npm pack` tarball, or Invalid."""
    try:
        _check_members(data)
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise Invalid("bad_tarball", f"not a gzipped tarball as `npm pack` makes ({exc})") from exc
    with archive:
        files: dict[str, tarfile.TarInfo] = {}
        try:
            for count, member in enumerate(archive, start=1):
                if count > _MAX_MEMBERS:
                    raise Invalid("bad_tarball", f"the tarball has more than {_MAX_MEMBERS} files")
                if member.isfile():
                    files[posixpath.normpath(member.name)] = member
            manifest_member = files.get("package/package.json")
            if manifest_member is None:
                raise Invalid(
                    "bad_tarball",
                    "the tarball has no package/package.json; make it with `npm pack` in the "
                    "module's directory",
                )
            manifest = _parse_manifest(_read_member(archive, manifest_member))
            name, version = manifest.get("name"), manifest.get("version")
            if not isinstance(name, str) or not isinstance(version, str):
                raise Invalid(
                    "bad_tarball", "package.json needs a string 'name' and a string 'version'"
                )
            try:
                ref = ModuleRef(name=name, version=version)
            except ValueError as exc:
                raise Invalid("bad_tarball", f"package.json: {exc}") from exc
            node_files = _node_files(manifest, ref)
            types: set[str] = set()
            for js in node_files:
                for path in (js, js.removesuffix(".js") + ".html"):
                    found = files.get(posixpath.normpath(posixpath.join("package", path)))
                    if found is not None:
                        text = _read_member(archive, found).decode("utf-8", "replace")
                        types.update(match.group(2) for match in _REGISTER_TYPE.finditer(text))
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise Invalid("bad_tarball", f"the tarball is damaged ({exc})") from exc
    return _Package(ref.name, ref.version, sorted(types))


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise Invalid("bad_tarball", "package/package.json nests too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise Invalid("bad_tarball", f"package/package.json is not JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise Invalid("bad_tarball", "package/package.json is not a JSON object")
    return manifest


def _node_files(manifest: dict[str, Any], ref: ModuleRef) -> list[str]:
    section = manifest.get("node-red")
    nodes = section.get("nodes") if isinstance(section, dict) else None
    if not isinstance(nodes, dict) or not nodes:
        raise Invalid(
            "not_a_node_module",
            f"{ref} is not a Node-RED node module: its package.json has no "
            '"node-red": {"nodes": {...}} section',
        )
    return [path for path in nodes.values() if isinstance(path, str)]


def _summary(row: FlowModule) -> ModuleSummary:
    return ModuleSummary(row.sha256, row.name, row.version, row.size, list(row.node_types))


def _summaries(where: Any = None) -> sa.Select[Any]:
    table = FlowModule.__table__  # type: ignore[attr-defined]
    query = sa.select(
        table.c.sha256, table.c.name, table.c.version, table.c.size, table.c.node_types
    ).order_by(table.c.name, table.c.version)
    return query if where is None else query.where(where)


def add_module(
    session: Session, data: bytes, actor: str, expected_sha256: str | None = None
) -> tuple[ModuleSummary, bool]:
    """Store a tarball; returns (module, created). The same bytes again are not an error."""
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None:
        expected = expected_sha256.strip().lower().removeprefix("sha256:")
        if not _SHA256_HEX.match(expected):
            raise Invalid("bad_sha256", f"{expected_sha256!r} is not a sha256 in hex")
        if expected != digest:
            raise Invalid(
                "sha256_mismatch",
                f"the upload hashes to sha256 {digest}, not {expected}; it was damaged on the "
                "way, so it was not stored",
            )
    existing = session.exec(select(FlowModule).where(FlowModule.sha256 == digest)).first()
    if existing is not None:
        return _summary(existing), False
    package = _inspect(data)
    same_version = session.exec(
        select(FlowModule.sha256).where(
            FlowModule.name == package.name, FlowModule.version == package.version
        )
    ).first()
    if same_version is not None:
        raise Conflict(
            "module_version_exists",
            f"{package.name}@{package.version} is already in the module cache with other "
            f"content (sha256 {same_version}); a version is immutable, publish a new one",
        )
    row = FlowModule(
        sha256=digest,
        name=package.name,
        version=package.version,
        size=len(data),
        node_types=package.node_types,
        data=data,
        added_at=utcnow(),
        added_by=actor[:80],
    )
    session.add(row)
    audit.record(
        session,
        actor,
        "flows.module.add",
        f"{package.name}@{package.version}"[:128],
        sha256=digest,
        size=len(data),
        node_types=package.node_types,
    )
    try:
        session.commit()
    except sa.exc.IntegrityError:  # a concurrent upload of the same tarball won the race
        session.rollback()
        return add_module(session, data, actor, expected_sha256)
    return _summary(row), True


def list_modules(session: Session, page: PageRequest) -> Page[ModuleSummary]:
    """By name and version, a page at a time (`gateway.pagination`)."""
    table = FlowModule.__table__  # type: ignore[attr-defined]
    query = _summaries().order_by(None)
    keys = [SortKey(table.c.name), SortKey(table.c.version), SortKey(table.c.sha256)]
    rows = [ModuleSummary(*row) for row in session.execute(keyset(query, keys, page))]
    return finish(rows, page, lambda m: (m.name, m.version, m.sha256))


def modules_by_ref(session: Session, refs: Iterable[str]) -> dict[str, ModuleSummary]:
    """Cached modules among `name@version` refs (those not cached are absent)."""
    wanted = {ModuleRef.parse(ref) for ref in refs}
    if not wanted:
        return {}
    names = sorted({m.name for m in wanted})
    query = _summaries(col(FlowModule.name).in_(names))
    found = [ModuleSummary(*row) for row in session.execute(query)]
    keys = {str(m) for m in wanted}
    return {m.ref: m for m in found if m.ref in keys}


def modules_providing(session: Session, node_types: Iterable[str]) -> dict[str, list[str]]:
    """For each node type, the cached modules (name@version) that register it."""
    wanted = set(node_types)
    providers: dict[str, list[str]] = {}
    if not wanted:
        return providers
    for module in (ModuleSummary(*row) for row in session.execute(_summaries())):
        for node_type in wanted.intersection(module.node_types):
            providers.setdefault(node_type, []).append(module.ref)
    return providers


def get_module(session: Session, sha256: str) -> FlowModule:
    row = session.get(FlowModule, sha256)
    if row is None:
        raise NotFound("unknown_module", f"no module tarball with sha256 {sha256}")
    return row


def parse_module_ref(spec: str) -> ModuleRef:
    try:
        return ModuleRef.parse(spec)
    except InvalidBundle as exc:
        raise Invalid("bad_module", exc.reason) from exc
