"""`edgefleet gateway run`: the database, the broker, the MQTT listeners and the HTTP API."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

import uvicorn
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.api.http_protocol import guarded_protocol
from gateway.app import create_app
from gateway.broker.admin import BrokerAdmin, DeviceBrokerInfo
from gateway.broker.dynsec import DynsecAdmin
from gateway.broker.emqx import EmqxApi, EmqxBrokerAdmin
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.broker.mqtt_url import parse_mqtt_url
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import ReplyListener
from gateway.data_dir import secure_data_dir
from gateway.db import MQTT_POOL, api_pool, make_engine, migrate
from gateway.device_messages import DeviceMessages
from gateway.errors import StartupError
from gateway.flows import wiring as flows
from gateway.identity import GatewayIdentity
from gateway.leader import LeaderElection, SingletonJobs
from gateway.registry import devices
from gateway.registry.status_listener import StatusListener
from gateway.runtime import GatewayRuntime
from gateway.settings import GatewaySettings
from gateway.telemetry import wiring as telemetry
from gateway.tunnels import wiring as tunnels
from provisioning.mqtt import MqttEndpoint
from provisioning.wire import Topics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def single_replica_lock(data_dir: Path) -> Iterator[None]:
    """SQLite mode is one replica: a second `gateway run` on the same data dir is refused."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = open(data_dir / "gateway.lock", "a+")  # noqa: SIM115
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(
                f"another gateway is already running on {data_dir}; with SQLite the gateway runs "
                "as one replica (use --db postgresql://... for several)"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def listen_socket(host: str, port: int, flag: str) -> socket.socket:
    """Bind the HTTP socket first thing and hand it to uvicorn later: nothing started in between
    (the broker, say) can take the port, and a port in use is an error that names the flag."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another with {flag}"
        ) from exc
    # Accepted connections inherit this. Without it every response waits out the client's
    # delayed ACK: ~45 ms per request instead of ~1 ms (measured with httpx on loopback).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(2048)  # listening at once: SO_REUSEADDR lets nobody else bind it now
    return sock


def _housekeeping(runtime: GatewayRuntime) -> None:
    """Purge used JWT ids; remove broker credentials of revoked or unknown devices."""
    with Session(runtime.engine) as session:
        devices.purge_used_jtis(session)
        devices.sync_broker_credentials(session, runtime.broker)


class _Terminated(Exception):
    """SIGTERM: leave through the ExitStack so the broker and listeners stop cleanly."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


# How often a thread that wants the GIL may take it from one that runs (CPython's default is
# 5 ms). The gateway mixes latency-bound threads (the event loop answering /healthz, the MQTT
# writers) with CPU-bound request handlers; at 5 ms, a queue of busy handlers delays the loop by
# that much per handler in line. 1 ms keeps both within bounds (bench/overload_bench.py).
GIL_SWITCH_INTERVAL = 0.001


def run_gateway(settings: GatewaySettings) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # uvicorn re-raises the signal it stopped on once it is done; with this handler that
    # becomes an exception that unwinds the ExitStack instead of killing the process outright.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _run(settings)
    except _Terminated:
        log.info("gateway stopped (SIGTERM)")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(settings: GatewaySettings) -> None:
    secure_data_dir(settings.data_dir)  # 0700, its files 0600: keys, the database, the broker's
    with contextlib.ExitStack() as stack:
        if settings.is_sqlite:
            stack.enter_context(single_replica_lock(settings.data_dir))
        http_socket = listen_socket(settings.http_host, settings.http_port, "--http")
        stack.callback(http_socket.close)
        engine = make_engine(settings.database_url, api_pool(settings.http_max_in_flight))
        stack.callback(engine.dispose)
        migrate(engine)
        mqtt_engine = make_engine(settings.database_url, MQTT_POOL)
        stack.callback(mqtt_engine.dispose)
        identity = GatewayIdentity.load_or_create(settings.signing_key_path)

        endpoint, info = _start_broker(settings, stack)
        broker = _broker_admin(settings, engine, endpoint, stack)

        publisher = CommandPublisher(endpoint, Topics(settings.topic_prefix))
        publisher.start()
        stack.callback(publisher.stop)
        jobs = SingletonJobs(LeaderElection(engine))
        runtime = GatewayRuntime(
            settings,
            engine,
            identity,
            broker,
            info,
            publisher,
            jobs=jobs,
            endpoint=endpoint,
            mqtt_engine=mqtt_engine,
        )
        jobs.add("housekeeping", settings.status_sync_interval, lambda: _housekeeping(runtime))
        # Each feature registers its reply hooks and jobs and starts its parts (`stack` stops
        # them): before the reply listener starts, since it runs the hooks.
        flows.install(runtime, stack)  # the deploy reply hook, the rollout job
        tunnels.install(runtime, stack)  # hooks, reaper job, the hub on --tunnel-hub
        telemetry.install(runtime, stack)  # ingest, retention

        messages = DeviceMessages(runtime.metrics)
        listener = StatusListener(endpoint, mqtt_engine, runtime.topics, messages)
        listener.start()
        stack.callback(listener.stop)
        replies = ReplyListener(endpoint, mqtt_engine, runtime.topics, runtime.hooks, messages)
        replies.start()
        stack.callback(replies.stop)

        jobs.start()  # after every feature has added its jobs above
        stack.callback(jobs.stop)
        app = create_app(runtime)
        config = uvicorn.Config(
            app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="info",
            access_log=False,
            http=guarded_protocol(settings.http_header_timeout, settings.http_max_connections),
            timeout_keep_alive=settings.http_keep_alive,
            h11_max_incomplete_event_size=16 * 1024,  # request line and headers
        )
        log.info(
            "gateway %s: HTTP on %s, database %s",
            identity.gateway_id,
            settings.http,
            "SQLite" if settings.is_sqlite else "PostgreSQL",
        )
        uvicorn.Server(config).run(sockets=[http_socket])


def _broker_admin(
    settings: GatewaySettings, engine: Engine, endpoint: MqttEndpoint, stack: contextlib.ExitStack
) -> BrokerAdmin:
    """Mosquitto: credentials through dynamic security. EMQX: the gateway answers its hooks."""
    if settings.broker_kind == "emqx":
        if not settings.mqtt_url:
            raise StartupError("--broker-kind emqx needs --mqtt-url (the EMQX cluster)")
        api = None
        if settings.emqx_api_url and settings.emqx_api_key and settings.emqx_api_secret:
            api = EmqxApi(settings.emqx_api_url, settings.emqx_api_key, settings.emqx_api_secret)
        else:
            log.warning(
                "no EMQX API key: revoked machines are refused at their next connect "
                "but not kicked at once (set EDGEFLEET_EMQX_API_URL/_KEY/_SECRET)"
            )
        return EmqxBrokerAdmin(engine, api)
    dynsec = DynsecAdmin(endpoint, settings.topic_prefix)
    dynsec.connect()
    stack.callback(dynsec.close)
    return dynsec


def _start_broker(
    settings: GatewaySettings, stack: contextlib.ExitStack
) -> tuple[MqttEndpoint, DeviceBrokerInfo]:
    if settings.mqtt_url:
        endpoint = parse_mqtt_url(settings.mqtt_url, settings.mqtt_ca_file)
        ca_pem = settings.mqtt_ca_file.read_text() if settings.mqtt_ca_file else None
        host = settings.public_host or endpoint.host
        return endpoint, DeviceBrokerInfo(host, endpoint.port, endpoint.tls, ca_pem)
    hostnames = [settings.public_host] if settings.public_host else []
    supervisor = MosquittoSupervisor(
        settings.data_dir,
        settings.mqtt_port,
        hostnames=hostnames,
        topic_prefix=settings.topic_prefix,
    )
    supervisor.start()
    stack.callback(supervisor.stop)
    info = DeviceBrokerInfo(settings.public_host, settings.mqtt_port, True, supervisor.ca.cert_pem)
    return supervisor.endpoint, info
