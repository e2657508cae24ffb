"""Telemetry queries: latest values, bucketed ranges and CSV export of one device (viewer role).

Times in query parameters are ISO 8601 (``2025-01-31T12:00:00Z``; no zone means UTC) or unix
seconds. Metric names may contain ``/``, so a metric is the rest of the path:
``/devices/{id}/telemetry/line1/temp``. Two names are taken by the routes themselves:
``latest`` and ``export.csv``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from gateway.accounts import scoping
from gateway.accounts.principal import Principal
from gateway.api.auth import FleetRead
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.errors import Invalid
from gateway.telemetry import queries
from provisioning.telemetry import METRIC_PATTERN, is_metric_name
from provisioning.wire import ErrorBody

DEFAULT_RANGE = 3600.0
_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422)
}
router = APIRouter(
    prefix="/api/v1/devices/{device_id}/telemetry", tags=["telemetry"], responses=_errors
)

Since = Annotated[
    datetime | None,
    Query(
        description="Start (inclusive); ISO 8601 or unix seconds. Default: an hour before until."
    ),
]
Until = Annotated[
    datetime | None, Query(description="End (exclusive); ISO 8601 or unix seconds. Default: now.")
]


class LatestValue(BaseModel):
    metric: str
    ts: float = Field(description="Unix seconds of the sample.")
    time: datetime
    value: float


class LatestOut(BaseModel):
    device_id: str
    metrics: list[LatestValue]


class BucketOut(BaseModel):
    start: float = Field(description="Unix seconds where the bucket starts (a multiple of every).")
    time: datetime
    count: int
    min: float
    max: float
    avg: float


class RangeOut(BaseModel):
    device_id: str
    metric: str
    since: float
    until: float
    every: float = Field(description="Bucket width in seconds.")
    buckets: list[BucketOut] = Field(description="Buckets holding samples, oldest first.")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _seconds(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _window(since: datetime | None, until: datetime | None) -> tuple[float, float]:
    end = time.time() if until is None else _seconds(until)
    start = end - DEFAULT_RANGE if since is None else _seconds(since)
    if not end > start:
        raise Invalid(
            "bad_range",
            f"until ({_utc(end).isoformat()}) must be after since ({_utc(start).isoformat()})",
        )
    return start, end


def _known_device(session: SessionDep, who: Principal, device: str) -> str:
    """The id of the machine `device` names (id or name), if the caller sees it; else 404."""
    return scoping.resolve_device(session, who, device).id


def _metric_name(metric: str) -> str:
    if not is_metric_name(metric):
        raise Invalid("bad_metric", f"{metric!r} is not a metric name ({METRIC_PATTERN})")
    return metric


@router.get("/latest", response_model=LatestOut, summary="The newest value of each metric")
def latest(device_id: str, session: SessionDep, runtime: RuntimeDep, who: FleetRead) -> LatestOut:
    device_id = _known_device(session, who, device_id)
    with runtime.engine.connect() as conn:
        rows = queries.latest(conn, device_id)
    return LatestOut(
        device_id=device_id,
        metrics=[
            LatestValue(metric=r.metric, ts=r.ts, time=_utc(r.ts), value=r.value) for r in rows
        ],
    )


@router.get(
    "/export.csv",
    summary="Samples as CSV (streamed): ts,time,metric,value",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
def export_csv(
    device_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    who: FleetRead,
    since: Since = None,
    until: Until = None,
    metric: Annotated[str | None, Query(description="Only this metric (default: all).")] = None,
) -> StreamingResponse:
    device_id = _known_device(session, who, device_id)
    if metric is not None:
        _metric_name(metric)
    start, end = _window(since, until)
    engine = runtime.engine

    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["ts", "time", "metric", "value"])
        with engine.connect() as conn:
            for count, (name, ts, value) in enumerate(
                queries.export_rows(conn, device_id, metric, start, end), 1
            ):
                writer.writerow([repr(ts), _utc(ts).isoformat(), name, repr(value)])
                if count % 1000 == 0:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    filename = f"{device_id}-telemetry.csv"
    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/{metric:path}",
    response_model=RangeOut,
    summary="One metric over a time range, in buckets with min/max/avg/count",
)
def metric_range(
    device_id: str,
    metric: str,
    session: SessionDep,
    runtime: RuntimeDep,
    who: FleetRead,
    since: Since = None,
    until: Until = None,
    every: Annotated[
        float | None,
        Query(gt=0, description="Bucket width in seconds (default: about 500 buckets)."),
    ] = None,
) -> RangeOut:
    device_id = _known_device(session, who, device_id)
    _metric_name(metric)
    start, end = _window(since, until)
    width = queries.auto_every(start, end) if every is None else every
    try:
        with runtime.engine.connect() as conn:
            found = queries.buckets(conn, device_id, metric, start, end, width)
    except queries.QueryError as exc:
        raise Invalid("bad_query", str(exc)) from exc
    return RangeOut(
        device_id=device_id,
        metric=metric,
        since=start,
        until=end,
        every=width,
        buckets=[
            BucketOut(
                start=b.start, time=_utc(b.start), count=b.count, min=b.min, max=b.max, avg=b.avg
            )
            for b in found
        ],
    )
