"""`edgefleet telemetry ...`: what a machine measured, from the gateway's HTTP API.

Times: ``--since 1h`` means an hour ago (any duration: 90s, 15m, 1h, 7d); an ISO 8601 time
(``2025-01-31T12:00:00Z``) means that moment. Only argparse, the standard library and httpx load
here (through `edgefleet.client`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from edgefleet.client import GatewayClient
from edgefleet.cmd_operator import client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    print_table,
    printed_as_json,
)
from edgefleet.parsers import Subparsers, command, connection_options, group, operator


def register(sub: Subparsers) -> None:
    tsub = group(
        sub,
        "telemetry",
        help="what the machines measured: latest values, history, live tail",
        description="Read a machine's telemetry from the gateway (needs a viewer token).",
        epilog="examples:\n"
        "  edgefleet telemetry latest press-07\n"
        "  edgefleet telemetry query press-07 temp --since 1h --every 1m\n"
        "  edgefleet telemetry tail press-07\n"
        "  edgefleet telemetry export press-07 --since 1d -o press-07.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    latest = command(
        tsub, _latest, "latest", help="the newest value of each metric", parents=operator()
    )
    latest.add_argument("device_id", metavar="DEVICE")

    query = command(
        tsub,
        _query,
        "query",
        help="one metric over time, in buckets (min, avg, max, count)",
        description="One metric over a time range, grouped in buckets of --every.",
        parents=operator(),
    )
    query.add_argument("device_id", metavar="DEVICE")
    query.add_argument("metric", metavar="METRIC")
    _range_options(query)
    query.add_argument(
        "--every", help="bucket width, e.g. 10s, 1m, 1h (default: about 500 buckets)"
    )

    tail = command(
        tsub,
        _tail,
        "tail",
        help="follow a machine's values live (Ctrl-C ends)",
        description="Print the newest value of each metric, then every newer one as it arrives "
        "(polls the latest values; a metric updated several times between two polls shows its "
        "newest value).",
        parents=[connection_options()],
    )
    tail.add_argument("device_id", metavar="DEVICE")
    tail.add_argument("--interval", default="2s", help="how often to poll (default 2s)")
    tail.add_argument("--metric", action="append", help="only this metric (repeat for more)")
    tail.add_argument(
        "--json", action="store_true", help="one JSON object per line (a stream, not a document)"
    )

    export = command(
        tsub,
        _export,
        "export",
        help="samples as CSV: ts,time,metric,value",
        parents=[connection_options()],
    )
    export.add_argument("device_id", metavar="DEVICE")
    export.add_argument("--metric", help="only this metric (default: all)")
    _range_options(export)
    export.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")


def _range_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="1h", help="start: a duration ago or a time (1h)")
    parser.add_argument("--until", help="end: a duration ago or a time (default: now)")


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds of ``1h`` (an hour before now), ``2025-01-31T12:00:00Z`` or ``...+02:00``."""
    current = time.time() if now is None else now
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            return current - parse_duration(text)
        except CommandError:
            raise CommandError(
                f"not a time: {text!r} (give a duration ago such as 15m or 1h, or an ISO time "
                "such as 2025-01-31T12:00:00Z)"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _client(args: argparse.Namespace) -> GatewayClient:
    return client_of(args)


def _path(device_id: str, rest: str) -> str:
    return f"/devices/{quote(device_id, safe='')}/telemetry/{rest}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: float) -> str:
    return f"{value:.6g}"


def _latest(args: argparse.Namespace) -> None:
    found = _client(args).get(_path(args.device_id, "latest"))
    if printed_as_json(args, found):
        return
    rows = [
        [m["metric"], _number(m["value"]), _iso(m["ts"]), ago(m["time"])] for m in found["metrics"]
    ]
    print_table(["METRIC", "VALUE", "TIME (UTC)", "AGE"], rows)


def _window_params(args: argparse.Namespace) -> dict[str, Any]:
    now = time.time()
    params: dict[str, Any] = {"since": parse_when(args.since, now)}
    params["until"] = now if args.until is None else parse_when(args.until, now)
    return params


def _query(args: argparse.Namespace) -> None:
    params = _window_params(args)
    if args.every is not None:
        params["every"] = parse_duration(args.every)
    found = _client(args).get(_path(args.device_id, quote(args.metric, safe="/")), params=params)
    if printed_as_json(args, found):
        return
    rows = [
        [_iso(b["start"]), b["count"], _number(b["min"]), _number(b["avg"]), _number(b["max"])]
        for b in found["buckets"]
    ]
    print(
        f"{found['metric']} of {found['device_id']}, {_iso(found['since'])} to "
        f"{_iso(found['until'])}, every {found['every']:g}s"
    )
    print_table(["BUCKET (UTC)", "COUNT", "MIN", "AVG", "MAX"], rows)


def _tail(args: argparse.Namespace) -> None:
    client = _client(args)
    interval = parse_duration(args.interval)
    wanted = set(args.metric or [])
    seen: dict[str, float] = {}
    while True:
        found = client.get(_path(args.device_id, "latest"))
        for item in found["metrics"]:
            metric, ts = item["metric"], item["ts"]
            if (wanted and metric not in wanted) or seen.get(metric, -1.0) >= ts:
                continue
            seen[metric] = ts
            if args.json:
                print_json_line({"metric": metric, "ts": ts, "value": item["value"]})
            else:
                print(f"{_iso(ts)}  {metric}  {_number(item['value'])}", flush=True)
        time.sleep(interval)


def print_json_line(item: dict[str, Any]) -> None:
    print(json.dumps(item, separators=(",", ":")), flush=True)


def _export(args: argparse.Namespace) -> None:
    client = _client(args)
    params = _window_params(args)
    if args.metric:
        params["metric"] = args.metric
    url = f"{client.base_url}/api/v1{_path(args.device_id, 'export.csv')}"
    headers = {"Authorization": f"Bearer {args.token}"}
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        with httpx.stream("GET", url, params=params, headers=headers, timeout=60) as response:
            if not response.is_success:
                response.read()
                raise CommandError(
                    f"gateway said {response.status_code}: {_error_detail(response)}"
                )
            for text in response.iter_text():
                out.write(text)
    except httpx.TransportError as exc:
        raise CommandError(f"cannot reach the gateway at {client.base_url}: {exc}") from exc
    finally:
        if out is not sys.stdout:
            out.close()


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return str(body.get("detail") if isinstance(body, dict) else body)
