"""Releases: immutable, content-addressed bundles of Node-RED flows and the modules they need.

The same flows and modules always make the same digest, so "releasing" twice returns the first
release (with its notes) instead of a copy. A release is checked before it is stored: a flows file
Node-RED could not load is refused with the reason; node types that neither Node-RED's core nor a
listed module provide are reported (with the cached modules that would provide them), because such
a release fails on every machine that lacks those types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.errors import Conflict, Invalid, NotFound
from gateway.flows.models import FlowRelease
from gateway.flows.module_cache import modules_by_ref, modules_providing, parse_module_ref
from gateway.pagination import Page, PageRequest, SortKey, finish, keyset
from gateway.registry import audit
from provisioning.bundles import Bundle, InvalidBundle, ModuleRef, non_core_node_types

__all__ = [
    "ReleaseSummary",
    "create_release",
    "get_release",
    "list_releases",
    "resolve_digest",
    "summary",
]

_FULL_DIGEST: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_PREFIX: Final = re.compile(r"^(?:sha256:)?([0-9a-f]{6,64})$")


@dataclass(frozen=True)
class ReleaseSummary:
    """A release without its bundle bytes."""

    digest: str
    size: int
    node_count: int
    modules: list[str]
    node_types: list[str]
    unprovided_types: list[str]
    warnings: list[str]
    notes: str
    created_at: datetime
    created_by: str


_SUMMARY_COLUMNS: Final = (
    "digest",
    "size",
    "node_count",
    "modules",
    "node_types",
    "unprovided_types",
    "warnings",
    "notes",
    "created_at",
    "created_by",
)


def _analyse(session: Session, bundle: Bundle) -> tuple[list[str], list[str]]:
    """(unprovided node types, warnings) for a bundle, from the module cache's knowledge."""
    refs = [str(m) for m in bundle.modules]
    cached = modules_by_ref(session, refs)
    warnings = [
        f"module {ref} is not in the gateway's module cache: machines that do not have it "
        "cannot install it (add it with `edgefleet flows module add TARBALL`)"
        for ref in refs
        if ref not in cached
    ]
    provided = {t for module in cached.values() for t in module.node_types}
    unprovided = sorted(non_core_node_types(bundle.flows) - provided)
    if unprovided:
        uncached = len(refs) - len(cached)
        suffix = (
            f" (or by the {uncached} listed module(s) not in the cache, whose types are unknown)"
            if uncached
            else ""
        )
        warnings.append(
            f"node type(s) {', '.join(unprovided)} are not provided by Node-RED's core nodes or "
            f"by a listed module{suffix}; machines without them will roll this release back"
        )
        for node_type, providers in sorted(modules_providing(session, unprovided).items()):
            warnings.append(
                f"node type {node_type!r} is provided by {', '.join(providers)} in the module "
                f"cache: add --module {providers[-1]}"
            )
    return unprovided, warnings


def create_release(
    session: Session,
    flows_json: str,
    modules: list[str],
    notes: str,
    actor: str,
    *,
    allow_empty: bool = False,
) -> tuple[FlowRelease, bool]:
    """Validate and store a release; returns (release, created). A flows file without nodes
    would wipe the machines' flows: it is refused unless `allow_empty`."""
    refs: list[ModuleRef] = [parse_module_ref(spec) for spec in modules]
    try:
        bundle = Bundle.create(flows_json, refs)
    except InvalidBundle as exc:
        raise Invalid("invalid_flows", exc.reason) from exc
    if not bundle.flows and not allow_empty:
        raise Invalid(
            "empty_flows",
            "the flows file holds no nodes: deploying it would remove every flow from the "
            "machines; if that is what you want, say so (allow_empty, or --allow-empty)",
        )
    digest = bundle.digest
    existing = session.get(FlowRelease, digest)
    if existing is not None:
        return existing, False
    unprovided, warnings = _analyse(session, bundle)
    data = bundle.to_bytes()
    row = FlowRelease(
        digest=digest,
        bundle=data,
        size=len(data),
        node_count=len(bundle.flows),
        modules=[str(m) for m in bundle.modules],
        node_types=sorted(bundle.required_node_types()),
        unprovided_types=unprovided,
        warnings=warnings,
        notes=notes,
        created_at=utcnow(),
        created_by=actor[:80],
    )
    session.add(row)
    audit.record(
        session,
        actor,
        "flows.release",
        digest,
        modules=row.modules,
        nodes=row.node_count,
        unprovided_types=unprovided,
    )
    try:
        session.commit()
    except sa.exc.IntegrityError:  # the same release made at the same moment elsewhere
        session.rollback()
        return get_release(session, digest), False
    return row, True


def resolve_digest(session: Session, ref: str) -> str:
    """A full digest from a digest or a unique prefix of its hex (at least 6 digits)."""
    ref = ref.strip().lower()
    if _FULL_DIGEST.match(ref):
        if session.exec(select(FlowRelease.digest).where(FlowRelease.digest == ref)).first():
            return ref
        raise NotFound("unknown_release", f"no release {ref}")
    match = _PREFIX.match(ref)
    if match is None:
        raise Invalid(
            "bad_release_ref",
            f"{ref!r} is not a release: give its digest (sha256:...) or the first 6 or more hex "
            "digits of it",
        )
    pattern = f"sha256:{match.group(1)}%"
    found = list(
        session.exec(
            select(FlowRelease.digest).where(col(FlowRelease.digest).like(pattern)).limit(5)
        )
    )
    if not found:
        raise NotFound("unknown_release", f"no release starts with {match.group(1)}")
    if len(found) > 1:
        raise Conflict(
            "ambiguous_release",
            f"{match.group(1)} is the start of several releases ({', '.join(found)}); give more "
            "digits",
        )
    return found[0]


def get_release(session: Session, ref: str) -> FlowRelease:
    release = session.get(FlowRelease, resolve_digest(session, ref))
    assert release is not None
    return release


def summary(row: FlowRelease) -> ReleaseSummary:
    return ReleaseSummary(
        row.digest,
        row.size,
        row.node_count,
        list(row.modules),
        list(row.node_types),
        list(row.unprovided_types),
        list(row.warnings),
        row.notes,
        row.created_at,
        row.created_by,
    )


def list_releases(session: Session, page: PageRequest) -> Page[ReleaseSummary]:
    """Newest first, a page at a time (`gateway.pagination`)."""
    table = FlowRelease.__table__  # type: ignore[attr-defined]
    query = sa.select(*(table.c[name] for name in _SUMMARY_COLUMNS))
    keys = [SortKey(table.c.created_at, True), SortKey(table.c.digest, True)]
    rows = [ReleaseSummary(*row) for row in session.execute(keyset(query, keys, page))]
    return finish(rows, page, lambda r: (r.created_at, r.digest))
