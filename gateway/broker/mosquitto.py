"""The Mosquitto 2 broker the embedded gateway starts, configures and keeps running.

`edgefleet gateway run` on its defaults needs no broker of its own: this module writes a
configuration (one TLS listener with a certificate from the gateway's CA, the dynamic-security
plugin, persistence on), starts ``mosquitto`` and watches it; if it dies it is started again with
backoff, and the restart is logged. Devices and the gateway alike connect over TLS and verify the
broker with the gateway's CA: one listener, no plain loopback port to misconfigure.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

from gateway.broker import dynsec
from gateway.broker.pki import (
    CertificateAuthority,
    ensure_ca,
    ensure_server_certificate,
)
from gateway.errors import PortInUseError
from provisioning.device_input import MAX_MQTT_PACKET_BYTES
from provisioning.files import write_private
from provisioning.mqtt import MqttEndpoint
from provisioning.process import PidFile, terminate
from provisioning.wire import validate_topic_prefix

logger = logging.getLogger(__name__)

MAX_QUEUED_MESSAGES = 10_000_000
MAX_QUEUED_BYTES = 1 << 30
"""Per client, beyond its in-flight window. Telemetry waits here (acknowledged to the device,
so nowhere else) while an ingest replica falls behind or restarts; what exceeds the limits is
dropped by Mosquitto. A count of 10000 lost half of a 60k-message burst in the ingest bench, so
the count is effectively unbounded and memory is bounded by bytes instead (1 GiB per client)."""
PERSISTENT_CLIENT_EXPIRATION = "30d"
AUTOSAVE_INTERVAL_S = 30
"""How often the in-memory store is saved. A clean stop always saves; a crash (SIGKILL, power)
loses at most this many seconds of queued messages and retained changes."""

RESTART_BACKOFF_MIN_S = 0.25
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0
"""A broker that ran this long before exiting is restarted at the minimum backoff again."""

PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib/*/mosquitto_dynamic_security.so",
)
_WILDCARD_BINDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_LOG_TAIL_LINES = 40
# Mosquitto says this whenever it runs as root; the gateway chose that (see `user` in the config).
_EXPECTED_WARNING = "should not be run as root/administrator."


def broker_directory(data_dir: Path) -> Path:
    """Where the broker's config, dynsec file, gateway password and persistence live."""
    return data_dir / "mosquitto"


def pki_directory(data_dir: Path) -> Path:
    """Where the gateway CA and the broker's server certificate live."""
    return data_dir / "pki"


def gateway_password_path(data_dir: Path) -> Path:
    """The 0600 file with the gateway identity's broker password."""
    return broker_directory(data_dir) / "gateway-mqtt.password"


def ensure_gateway_password(data_dir: Path) -> str:
    """Read the gateway identity's broker password, creating it (0600) the first time."""
    path = gateway_password_path(data_dir)
    if path.exists():
        password = path.read_text(encoding="utf-8").strip()
        if password:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
            return password
        logger.warning("%s was empty; generating a new gateway broker password", path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = dynsec.generate_password()
    write_private(path, password + "\n")
    return password


def find_dynsec_plugin() -> Path:
    """The dynamic-security plugin shipped with Mosquitto 2."""
    for pattern in PLUGIN_CANDIDATES:
        for match in sorted(glob.glob(pattern)):
            return Path(match)
    raise RuntimeError(
        "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found; "
        "install Mosquitto 2 (Debian: apt-get install mosquitto) or point the gateway at an "
        "existing broker with --mqtt-url"
    )


def _config_value(value: str | Path) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"{text!r} cannot go into a Mosquitto config file (line break)")
    return text


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it dies (Linux prctl).

    The supervisor starts Mosquitto from `start()` (the gateway's main thread) or from its
    watchdog thread, both of which live as long as the supervisor does.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pid file still finds an orphan later
        pass


_PR_SET_PDEATHSIG = 1


class MosquittoSupervisor:
    """Runs one Mosquitto for the gateway and restarts it when it exits unexpectedly.

    Everything lives under `data_dir`: ``pki/`` (CA and server certificate), ``mosquitto/``
    (generated ``mosquitto.conf``, the dynsec JSON, the gateway's password file, ``mosquitto.db``).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        bind: str = "0.0.0.0",
        hostnames: Sequence[str] = (),
        topic_prefix: str = "fleet",
        mosquitto_binary: str = "mosquitto",
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"MQTT port {port} is out of range; use 1-65535 (--mqtt-port)")
        self._data_dir = Path(data_dir).resolve()
        self._port = port
        self._bind = bind
        self._hostnames = list(hostnames)
        if bind not in _WILDCARD_BINDS:
            self._hostnames.append(bind)
        self._prefix = validate_topic_prefix(topic_prefix)
        self._binary = mosquitto_binary
        self._dir = broker_directory(self._data_dir)
        self._config_path = self._dir / "mosquitto.conf"
        self._dynsec_path = self._dir / "dynamic-security.json"
        self._pid_file = PidFile(
            self._dir / "mosquitto.pid", lambda cmd: str(self._config_path) in cmd
        )
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []
        self._watchdog: threading.Thread | None = None
        self._restarts = 0
        self._log_tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._ca: CertificateAuthority | None = None
        self._password: str | None = None

    # public surface

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = ensure_ca(pki_directory(self._data_dir))
        return self._ca

    @property
    def endpoint(self) -> MqttEndpoint:
        """How the gateway itself connects: TLS to this host, gateway credential, our CA."""
        if self._password is None:
            self._password = ensure_gateway_password(self._data_dir)
        return MqttEndpoint(
            host=_WILDCARD_BINDS.get(self._bind, self._bind),
            port=self._port,
            tls=True,
            username=dynsec.GATEWAY_USERNAME,
            password=self._password,
            ca_file=self.ca.cert_path,
        )

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The running broker's process id (for diagnostics and tests)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def log_tail(self) -> list[str]:
        """The last lines Mosquitto logged."""
        return list(self._log_tail)

    def start(self, timeout: float = 10.0) -> None:
        """Prepare files, start Mosquitto and wait until it accepts TLS connections.

        Raises PortInUseError if the port is taken, RuntimeError (with the tail of Mosquitto's
        log) if it does not come up within `timeout`.
        """
        if self._watchdog is not None and self._watchdog.is_alive():
            return
        binary = shutil.which(self._binary)
        if binary is None:
            raise RuntimeError(
                f"the Mosquitto binary {self._binary!r} was not found on PATH; install "
                f"Mosquitto 2 (Debian: apt-get install mosquitto) or use --mqtt-url"
            )
        self._prepare()
        self._stop_orphan()
        self._check_port_free()
        self._stopping.clear()
        self._log_tail.clear()
        with self._lock:
            proc = self._spawn(binary)
        try:
            self._await_ready(proc, timeout)
        except BaseException:
            self._stopping.set()
            self._terminate(proc)
            raise
        logger.info(
            "mosquitto (pid %d) listening with TLS on %s:%d", proc.pid, self._bind, self._port
        )
        self._watchdog = threading.Thread(
            target=self._watch, args=(binary,), name="mosquitto-watchdog", daemon=True
        )
        self._watchdog.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM so it saves its store, SIGKILL if it hangs) and reap it."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            self._terminate(proc, timeout)
        if self._watchdog is not None:
            self._watchdog.join(timeout)
            self._watchdog = None
        for reader in self._readers:
            reader.join(timeout)
        self._readers.clear()
        self._pid_file.remove()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # files

    def _prepare(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self._dir / "persistence").mkdir(exist_ok=True, mode=0o700)
        cert, key = ensure_server_certificate(
            self.ca, pki_directory(self._data_dir), self._hostnames
        )
        password = self.endpoint.password
        assert password is not None
        dynsec.prepare_config_file(self._dynsec_path, password, self._prefix)
        self._config_path.write_text(self._render_config(cert, key), encoding="utf-8")

    def _render_config(self, cert: Path, key: Path) -> str:
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "# Written by edgefleet on every start of the gateway; edits here are overwritten.",
            "per_listener_settings false",
            "allow_anonymous false",
            # Run as whoever runs the gateway: it owns the data directory and the key files.
            f"user {_config_value(user)}",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp false",
            "connection_messages true",
            "persistence true",
            f"persistence_location {_config_value(self._dir / 'persistence')}",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            f"max_queued_bytes {MAX_QUEUED_BYTES}",
            f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
            "set_tcp_nodelay true",
            # A client publishing more is disconnected by the broker itself; the gateway checks
            # each message's own limit again (telemetry, status, replies).
            f"max_packet_size {MAX_MQTT_PACKET_BYTES}",
            f"plugin {_config_value(find_dynsec_plugin())}",
            f"plugin_opt_config_file {_config_value(self._dynsec_path)}",
            "",
            f"listener {self._port} {_config_value(self._bind)}".rstrip(),
            "protocol mqtt",
            f"cafile {_config_value(self.ca.cert_path)}",
            f"certfile {_config_value(cert)}",
            f"keyfile {_config_value(key)}",
            "tls_version tlsv1.2",
            "",
        ]
        return "\n".join(lines)

    # processes

    def _stop_orphan(self) -> None:
        """Stop a Mosquitto left running by a gateway that was killed without cleaning up.

        It is only ours if its command line names our config file; anything else is left alone.
        """
        pid = self._pid_file.owner()
        if pid is not None:
            logger.warning("stopping mosquitto (pid %d) left running by an earlier gateway", pid)
            terminate(pid, 10.0, name="mosquitto")
        self._pid_file.remove()

    def _check_port_free(self) -> None:
        host = self._bind or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Mosquitto sets SO_REUSEADDR too, so a port in TIME_WAIT is not "in use" for it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, self._port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(self._port, self._bind) from exc
                raise RuntimeError(
                    f"cannot listen on {host}:{self._port}: {exc.strerror}; choose another "
                    "port with --mqtt-port"
                ) from exc

    def _spawn(self, binary: str) -> subprocess.Popen[str]:
        """Start Mosquitto; the caller holds `_lock`."""
        proc = subprocess.Popen(
            [binary, "-c", str(self._config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # Its own session: a Ctrl-C meant for the gateway must not kill the broker before the
            # gateway stops it in order (the watchdog would see a crash).
            start_new_session=True,
            # ...but if the gateway is killed outright, the broker goes with it.
            preexec_fn=_die_with_parent,
        )
        self._proc = proc
        self._pid_file.write(proc.pid)
        assert proc.stdout is not None
        reader = threading.Thread(
            target=self._read_log, args=(proc.stdout,), name="mosquitto-log", daemon=True
        )
        reader.start()
        self._readers = [r for r in self._readers if r.is_alive()] + [reader]
        return proc

    def _read_log(self, stream: IO[str]) -> None:
        """Forward Mosquitto's log to ours and keep the tail for error messages."""
        with stream:
            for raw in stream:
                line = raw.rstrip()
                if not line:
                    continue
                self._log_tail.append(line)
                if line.startswith(("Error", "Warning")) and not line.endswith(_EXPECTED_WARNING):
                    logger.warning("mosquitto: %s", line)
                else:
                    logger.debug("mosquitto: %s", line)

    def _terminate(self, proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
        """SIGTERM so it saves its store, SIGKILL if it hangs; reap it either way."""
        if proc.poll() is None:
            terminate(proc.pid, timeout, name="mosquitto", child=proc)
        else:
            proc.wait()

    def _await_ready(self, proc: subprocess.Popen[str], timeout: float) -> None:
        host = _WILDCARD_BINDS.get(self._bind, self._bind)
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        deadline = time.monotonic() + timeout
        last_error = "no attempt yet"
        while True:
            code = proc.poll()
            if code is not None:
                self._raise_exited(proc, code)
            try:
                with (
                    socket.create_connection((host, self._port), timeout=1.0) as raw,
                    context.wrap_socket(raw, server_hostname=host),
                ):
                    return
            except (OSError, ssl.SSLError) as exc:
                last_error = str(exc)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"mosquitto did not accept TLS connections on {host}:{self._port} within "
                    f"{timeout:.1f}s (last error: {last_error}); its log ends with:\n"
                    + "\n".join(self._log_tail)
                )
            time.sleep(0.05)

    def _raise_exited(self, proc: subprocess.Popen[str], code: int) -> None:
        for reader in self._readers:
            reader.join(2.0)
        tail = "\n".join(self._log_tail)
        if "Address already in use" in tail:
            raise PortInUseError(self._port, self._bind)
        raise RuntimeError(
            f"mosquitto exited with code {code} while starting (config {self._config_path}); "
            f"its log ends with:\n{tail}"
        )

    def _watch(self, binary: str) -> None:
        """Restart Mosquitto whenever it exits without being asked to, with backoff."""
        backoff = RESTART_BACKOFF_MIN_S
        while True:
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_MIN_S
            self._restarts += 1
            logger.error(
                "mosquitto exited with code %s; restarting (restart #%d)", code, self._restarts
            )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._spawn(binary)
                except OSError as exc:
                    logger.error("could not restart mosquitto: %s; retrying", exc)
                    continue
