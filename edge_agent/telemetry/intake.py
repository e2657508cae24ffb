"""Local telemetry intake: Node-RED hands samples to the agent over HTTP on loopback.

Node-RED's built-in *http request* node can post here with no extra nodes: set the method to
POST, the URL to ``http://127.0.0.1:1881/telemetry`` and ``msg.payload`` to an object.
Port 1881 is the default because Node-RED itself listens on 1880. Three shapes are accepted:

``POST /telemetry`` with ``{"temp": 21.5, "rpm": 1200}``
    One sample per key, all stamped with the agent's clock. (``samples`` is reserved.)
``POST /telemetry`` with ``{"samples": [{"m": "temp", "v": 21.5, "t": 1732370000.1}, ...]}``
    Explicit samples; ``t`` (unix seconds, not milliseconds) is optional and defaults to now.
``POST /telemetry/<metric>`` with a bare number such as ``21.5``
    For a flow whose ``msg.payload`` is just the value.

Answers: ``200 {"accepted": n, "queued": q}`` once the samples are on disk in the outbox;
``400 {"error": reason, "detail": ...}`` for bad input (nothing of that request is stored);
``413`` for a body over the limit; ``411`` without a Content-Length; ``503`` if the outbox
cannot store (the caller may retry). ``GET /health`` reports the outbox's counters.

Why the standard library's ``ThreadingHTTPServer`` and not FastAPI/uvicorn: the agent runs on
small boxes and its install excludes the web stack; the intake serves one local client at a
modest rate, and the little it must do (parse JSON, bound the body, map errors) is a page of
code. It binds 127.0.0.1 by default: any process on the machine may post, nothing off it can.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import unquote

from edge_agent.telemetry.outbox import Outbox, OutboxError
from provisioning.telemetry import SCHEMA, BatchRejected, Sample

log = logging.getLogger(__name__)

DEFAULT_INTAKE_HOST: Final = "127.0.0.1"
DEFAULT_INTAKE_PORT: Final = 1881
DEFAULT_MAX_BODY: Final = 1024 * 1024
PATH: Final = "/telemetry"
_SAMPLE_KEYS: Final = frozenset({"m", "v", "t"})


class IntakeError(RuntimeError):
    """The intake cannot start (port taken, bad address)."""


class _NonFinite(Exception):
    """JSON text held NaN or Infinity, which JSON proper does not allow."""


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity. Raises `BatchRejected` with a usable detail."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except _NonFinite as exc:
        raise BatchRejected("non_numeric", f"{exc} is not a number JSON allows") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchRejected("malformed_json", f"body is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise BatchRejected("malformed_json", "body nests too deeply for telemetry") from None


def samples_from_request(doc: Any, metric: str | None, now: float) -> list[Sample]:
    """Turn one decoded request body into samples (not yet validated: `Outbox.add` does that).

    ``metric`` is the name from ``/telemetry/<metric>``, if the path had one.
    """
    if metric is not None:
        return [Sample(metric, now, doc)]
    if not isinstance(doc, dict):
        raise BatchRejected(
            SCHEMA,
            f"send a JSON object, not {type(doc).__name__}: "
            '{"metric": value, ...} or {"samples": [{"m": name, "v": value, "t": seconds}]}',
        )
    if not doc:
        raise BatchRejected(SCHEMA, "the object holds no samples")
    if "samples" not in doc:
        return [Sample(name, now, value) for name, value in doc.items()]
    if len(doc) != 1 or not isinstance(doc["samples"], list) or not doc["samples"]:
        raise BatchRejected(
            SCHEMA, '"samples" must be the only key and hold a non-empty list of {m, v, t?}'
        )
    samples: list[Sample] = []
    for index, item in enumerate(doc["samples"]):
        if not isinstance(item, dict) or "m" not in item or "v" not in item:
            raise BatchRejected(SCHEMA, f"samples[{index}] must be an object with m and v")
        if not item.keys() <= _SAMPLE_KEYS:
            extra = sorted(item.keys() - _SAMPLE_KEYS)
            raise BatchRejected(SCHEMA, f"samples[{index}] has unknown keys {extra}; use m, v, t")
        samples.append(Sample(item["m"], item.get("t", now), item["v"]))
    return samples


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], outbox: Outbox, max_body: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.outbox = outbox
        self.max_body = max_body
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-intake"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive: Node-RED reuses its connection
    timeout = 10  # a client that stalls mid-request does not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms ACK stall

    @property
    def _server(self) -> _Server:
        assert isinstance(self.server, _Server)
        return self.server

    def do_POST(self) -> None:
        found, metric = self._route()
        if not found:
            self._not_found()
            return
        body = self._read_body()
        if body is None:
            return
        try:
            doc = decode_json(body)
            samples = samples_from_request(doc, metric, time.time())
            accepted = self._server.outbox.add(samples)
        except BatchRejected as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": exc.reason, "detail": exc.detail})
            return
        except OutboxError as exc:
            log.error("intake could not store samples: %s", exc)
            self._reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "outbox_unavailable", "detail": f"{exc}; retry later"},
            )
            return
        self._reply(HTTPStatus.OK, {"accepted": accepted, "queued": len(self._server.outbox)})

    def do_GET(self) -> None:
        if self.path == "/health":
            try:
                stats = self._server.outbox.stats()
            except OutboxError as exc:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "down", "detail": str(exc)})
                return
            self._reply(
                HTTPStatus.OK,
                {"status": "ok", "queued": stats.queued, "dropped": stats.dropped},
            )
        elif self._is_intake_path():
            self._reply(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": "method_not_allowed", "detail": f"POST samples to {PATH}"},
                headers={"Allow": "POST"},
            )
        else:
            self._not_found()

    def _is_intake_path(self) -> bool:
        path = self.path.split("?", 1)[0]
        return path == PATH or path.startswith(PATH + "/")

    def _route(self) -> tuple[bool, str | None]:
        """(is this the intake, metric name from ``/telemetry/<name>`` or None)."""
        path = self.path.split("?", 1)[0]
        if path == PATH:
            return True, None
        if path.startswith(PATH + "/") and len(path) > len(PATH) + 1:
            return True, unquote(path[len(PATH) + 1 :])
        return False, None

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted")
            return None
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
            return None
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError(raw_length)
        except ValueError:
            self._refuse(HTTPStatus.BAD_REQUEST, f"Content-Length {raw_length!r} is not a size")
            return None
        limit = self._server.max_body
        if length > limit:
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the {limit}-byte limit; send smaller batches",
            )
            return None
        return self.rfile.read(length)

    def _refuse(self, status: HTTPStatus, detail: str) -> None:
        """Answer and close: the body (if any) was not read, so the connection is unusable."""
        self.close_connection = True
        error = status.phrase.lower().replace(" ", "_")
        self._reply(status, {"error": error, "detail": detail}, headers={"Connection": "close"})

    def _not_found(self) -> None:
        self.close_connection = True
        self._reply(
            HTTPStatus.NOT_FOUND,
            {"error": "not_found", "detail": f"POST samples to {PATH}"},
            headers={"Connection": "close"},
        )

    def _reply(
        self, status: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("intake %s: " + format, self.address_string(), *args)


class IntakeServer:
    """The HTTP intake in its own thread; ``port=0`` picks a free port (see `port`)."""

    def __init__(
        self,
        outbox: Outbox,
        host: str = DEFAULT_INTAKE_HOST,
        port: int = DEFAULT_INTAKE_PORT,
        *,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.outbox = outbox
        self.host = host
        self._requested_port = port
        self.max_body = max_body
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (after `start`), else the one asked for."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{PATH}"

    def start(self) -> None:
        if self._server is not None:
            return
        if not _is_loopback(self.host):
            log.warning(
                "telemetry intake listens on %s: anything that reaches it can post telemetry "
                "as this device",
                self.host,
            )
        try:
            self._server = _Server((self.host, self._requested_port), self.outbox, self.max_body)
        except OSError as exc:
            raise IntakeError(
                f"cannot listen on {self.host}:{self._requested_port} for telemetry: {exc} "
                "(is another agent running, or pick another intake port)"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how soon stop() is noticed
            name="telemetry-intake",
            daemon=True,
        )
        self._thread.start()
        log.info("telemetry intake on %s", self.url)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = None
        self._thread = None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
