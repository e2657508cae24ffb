"""The gateway's supervised Mosquitto: TLS, PKI, device credentials, ACLs, restarts, persistence.

Everything runs against a real Mosquitto 2 started by `MosquittoSupervisor` on a free port, with
real paho-mqtt 2 clients over TLS verifying the broker with the gateway's CA.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from cryptography import x509

from gateway.broker.dynsec import DynsecAdmin, generate_password
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.broker.mqtt_url import parse_mqtt_url
from gateway.broker.pki import ensure_ca, ensure_server_certificate
from gateway.errors import BrokerError, DeviceExistsError, PortInUseError
from provisioning.mqtt import MqttEndpoint
from provisioning.wire import validate_device_id
from tests.support.mosquitto import MqttProbe, device_endpoint, enroll_device, running_broker
from tests.support.waiting import free_port, port_open, wait_for

NOT_AUTHORIZED = 0x87
QUEUED_COMMANDS = 1500


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoSupervisor]:
    with running_broker() as supervisor:
        yield supervisor


@pytest.fixture(scope="module")
def admin(broker: MosquittoSupervisor) -> Iterator[DynsecAdmin]:
    with DynsecAdmin(broker.endpoint) as dynsec_admin:
        yield dynsec_admin


@pytest.fixture
def probes() -> Iterator[list[MqttProbe]]:
    """Collects probes so each is closed even when the test fails."""
    made: list[MqttProbe] = []
    yield made
    for probe in made:
        probe.close()


def _probe(
    probes: list[MqttProbe],
    endpoint: MqttEndpoint,
    client_id: str,
    *,
    clean_start: bool = True,
    session_expiry: int = 0,
) -> MqttProbe:
    probe = MqttProbe(endpoint, client_id, clean_start=clean_start, session_expiry=session_expiry)
    probes.append(probe)
    return probe


def _connected(probes: list[MqttProbe], endpoint: MqttEndpoint, client_id: str) -> MqttProbe:
    probe = _probe(probes, endpoint, client_id)
    rc = probe.connect()
    assert not rc.is_failure, f"{client_id} was refused: {rc}"
    return probe


# -- TLS and PKI -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_server_certificate_verifies_for_loopback_names(
    broker: MosquittoSupervisor, name: str
) -> None:
    context = ssl.create_default_context(cafile=str(broker.ca.cert_path))
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_server_certificate_does_not_verify_for_other_names(broker: MosquittoSupervisor) -> None:
    context = ssl.create_default_context(cafile=str(broker.ca.cert_path))
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="not-the-gateway.example")


def test_broker_refuses_clients_that_do_not_trust_or_use_tls(broker: MosquittoSupervisor) -> None:
    untrusting = ssl.create_default_context()  # system store only: our CA is not in it
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    plain = replace(broker.endpoint, tls=False)
    probe = MqttProbe(plain, "plain-client")
    try:
        with pytest.raises(TimeoutError):
            probe.connect(timeout=1.5)
    finally:
        probe.close()


def test_ca_is_created_once_with_private_key_0600(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "pki")
    assert ca.key_path.stat().st_mode & 0o777 == 0o600
    again = ensure_ca(tmp_path / "pki")
    assert again.cert_pem == ca.cert_pem
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_certificate_reissued_only_when_names_change(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    cert_path, key_path = ensure_server_certificate(ca, tmp_path, ["broker.example.com"])
    first = cert_path.read_bytes()
    assert key_path.stat().st_mode & 0o777 == 0o600
    san = x509.load_pem_x509_certificate(first).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "broker.example.com" in san.value.get_values_for_type(x509.DNSName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)
    assert socket.gethostname().lower() in san.value.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= ips

    ensure_server_certificate(ca, tmp_path, ["broker.example.com"])
    assert cert_path.read_bytes() == first, "same names must not re-issue"

    ensure_server_certificate(ca, tmp_path, ["broker.example.com", "10.1.2.3"])
    reissued = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert_path.read_bytes() != first
    ips = {
        str(ip)
        for ip in reissued.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.IPAddress)
    }
    assert "10.1.2.3" in ips
    reissued.verify_directly_issued_by(ca.load_certificate())


# -- device credentials and ACLs ------------------------------------------------------------


def test_device_uses_its_own_topics_and_receives_commands(
    broker: MosquittoSupervisor, probes: list[MqttProbe]
) -> None:
    device = _connected(probes, enroll_device(broker, "dev-own"), "dev-own")
    gateway = _connected(probes, broker.endpoint, "gw-own")
    for kind in ("telemetry", "status", "reply"):
        assert not gateway.subscribe(f"$share/gw/fleet/+/{kind}").is_failure

    assert device.subscribe("fleet/dev-own/cmd").value == 1  # granted QoS 1
    for kind in ("telemetry", "status", "reply"):
        topic = f"fleet/dev-own/{kind}"
        rc = device.publish(topic, f"{kind}-payload")
        assert not rc.is_failure, f"{kind}: {rc}"
        wait_for(partial(gateway.received, topic), what=f"gateway receiving {kind}")
    assert gateway.received("fleet/dev-own/telemetry") == [b"telemetry-payload"]

    rc = gateway.publish("fleet/dev-own/cmd", b'{"cmd": "ping"}')
    assert not rc.is_failure
    assert wait_for(lambda: device.received("fleet/dev-own/cmd"), what="cmd delivered") == [
        b'{"cmd": "ping"}'
    ]


def test_device_cannot_publish_or_subscribe_for_another_device(
    broker: MosquittoSupervisor, probes: list[MqttProbe]
) -> None:
    mallory = _connected(probes, enroll_device(broker, "dev-mallory"), "dev-mallory")
    victim = _connected(probes, enroll_device(broker, "dev-victim"), "dev-victim")
    gateway = _connected(probes, broker.endpoint, "gw-acl")
    assert not gateway.subscribe("$share/gw/fleet/+/telemetry").is_failure
    assert not victim.subscribe("fleet/dev-victim/cmd").is_failure

    for topic in ("fleet/dev-victim/telemetry", "fleet/dev-victim/status", "fleet/dev-victim/cmd"):
        rc = mallory.publish(topic, b"forged")
        assert rc.value == NOT_AUTHORIZED, f"{topic}: {rc}"
    for topic in ("fleet/dev-victim/cmd", "fleet/+/cmd", "fleet/#", "#", "fleet/dev-mallory/#"):
        assert mallory.subscribe(topic).value == NOT_AUTHORIZED, topic

    # Markers sent after the forgeries arrive; the forgeries never do (per-client ordering).
    assert not mallory.publish("fleet/dev-mallory/telemetry", b"marker").is_failure
    wait_for(lambda: gateway.received("fleet/dev-mallory/telemetry"), what="telemetry marker")
    assert gateway.received("fleet/dev-victim/telemetry") == []
    gateway.publish("fleet/dev-victim/cmd", b"real")
    wait_for(lambda: victim.received("fleet/dev-victim/cmd"), what="real cmd")
    assert victim.received("fleet/dev-victim/cmd") == [b"real"]


def test_wrong_password_or_client_id_is_refused_at_connect(
    broker: MosquittoSupervisor, probes: list[MqttProbe]
) -> None:
    good = enroll_device(broker, "dev-login")
    wrong_password = replace(good, password="not-the-password")
    assert _probe(probes, wrong_password, "dev-login").connect().is_failure
    assert _probe(probes, good, "someone-else").connect().is_failure
    other_user = device_endpoint(broker, "dev-nobody", generate_password())
    assert _probe(probes, other_user, "dev-nobody").connect().is_failure
    assert not _probe(probes, good, "dev-login").connect().is_failure


def test_gateway_identity_is_limited_to_its_role(
    broker: MosquittoSupervisor, probes: list[MqttProbe]
) -> None:
    gateway = _connected(probes, broker.endpoint, "gw-scope")
    assert gateway.subscribe("fleet/+/telemetry").value == NOT_AUTHORIZED  # shared only
    assert gateway.subscribe("#").value == NOT_AUTHORIZED
    assert not gateway.subscribe("fleet/+/status").is_failure  # retained statuses at start
    rc = gateway.publish("fleet/dev-x/telemetry", b"forged")
    assert rc.value == NOT_AUTHORIZED


def test_remove_device_disconnects_it_at_once_and_it_cannot_return(
    broker: MosquittoSupervisor, admin: DynsecAdmin, probes: list[MqttProbe]
) -> None:
    endpoint = enroll_device(broker, "dev-revoked")
    device = _connected(probes, endpoint, "dev-revoked")
    assert not device.publish("fleet/dev-revoked/status", b"online", retain=True).is_failure
    assert "dev-revoked" in admin.list_devices()

    admin.remove_device("dev-revoked")
    # "At once": kicked by the broker, not found out at the next keepalive (30 s) or reconnect.
    wait_for(lambda: device.disconnects, timeout=3, what="revoked device being kicked")
    assert "dev-revoked" not in admin.list_devices()
    assert _probe(probes, endpoint, "dev-revoked").connect().is_failure
    admin.remove_device("dev-revoked")  # already gone: no error

    # Its retained "online" was cleared, so a starting gateway does not see a ghost. Retained
    # messages follow the SUBACK in order, so once the marker's arrives the other would have too.
    reader = _connected(probes, broker.endpoint, "gw-status-reader")
    reader.publish("fleet/dev-marker/status", b"marker", retain=True)
    reader.subscribe("fleet/dev-revoked/status")
    reader.subscribe("fleet/dev-marker/status")
    wait_for(lambda: reader.received("fleet/dev-marker/status"), what="retained marker")
    assert reader.received("fleet/dev-revoked/status") == []
    reader.publish("fleet/dev-marker/status", b"", retain=True)


def test_add_device_rejects_duplicates_and_bad_ids(admin: DynsecAdmin) -> None:
    admin.add_device("dev-dup", generate_password())
    with pytest.raises(DeviceExistsError, match="already has a broker credential"):
        admin.add_device("dev-dup", generate_password())
    for bad in ("ab", "Dev-Upper", "dev/slash", "dev+", "dev#", "x" * 65, "dev_underscore"):
        with pytest.raises(ValueError, match="invalid device id"):
            admin.add_device(bad, "pw")
    with pytest.raises(ValueError):
        validate_device_id("")
    admin.remove_device("dev-dup")


def test_dynsec_admin_is_thread_safe(admin: DynsecAdmin) -> None:
    ids = [f"dev-par-{n}" for n in range(12)]
    errors: list[BaseException] = []

    def add(device_id: str) -> None:
        try:
            admin.add_device(device_id, generate_password())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(device_id,)) for device_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert set(ids) <= set(admin.list_devices())
    for device_id in ids:
        admin.remove_device(device_id)
    assert not set(ids) & set(admin.list_devices())


# -- supervision, persistence, ports -----------------------------------------------------------


def test_supervisor_restarts_killed_broker_and_clients_reconnect(
    caplog: pytest.LogCaptureFixture, probes: list[MqttProbe]
) -> None:
    caplog.set_level(logging.ERROR, logger="gateway.broker.mosquitto")
    with running_broker() as broker, DynsecAdmin(broker.endpoint, timeout=8) as admin:
        device = _connected(probes, enroll_device(broker, "dev-restart"), "dev-restart")
        old_pid = broker.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        wait_for(lambda: broker.restarts == 1, what="a restart")
        wait_for(lambda: broker.pid not in (None, old_pid), what="a new mosquitto")
        assert "mosquitto exited with code -9; restarting (restart #1)" in caplog.text
        wait_for(lambda: device.connected_count == 2, timeout=10, what="device reconnecting")
        # The admin connection came back by itself and still works (credential kept).
        assert "dev-restart" in admin.list_devices()


def test_admin_calls_while_broker_is_down_raise_broker_error(tmp_path: Path) -> None:
    with running_broker(tmp_path) as broker:
        admin = DynsecAdmin(broker.endpoint, timeout=1.0)
        admin.connect()
        try:
            broker.stop()
            wait_for(lambda: not admin.connected, what="admin noticing the broker is gone")
            started = time.monotonic()
            with pytest.raises(BrokerError, match="not connected to the broker"):
                admin.list_devices()
            assert 0.9 < time.monotonic() - started < 5
        finally:
            admin.close()
    with pytest.raises(BrokerError, match="cannot connect"):
        DynsecAdmin(broker.endpoint, timeout=1.0).connect()


def test_admin_with_wrong_password_fails_fast(broker: MosquittoSupervisor) -> None:
    wrong = replace(broker.endpoint, password="wrong")
    started = time.monotonic()
    with pytest.raises(BrokerError, match="refused the connection"):
        DynsecAdmin(wrong, timeout=5.0).connect()
    assert time.monotonic() - started < 3, "a refused login must not wait for the timeout"


ORPHAN_SCRIPT = """
import sys
from pathlib import Path
from gateway.broker.mosquitto import MosquittoSupervisor
supervisor = MosquittoSupervisor(Path(sys.argv[1]), port=int(sys.argv[2]), bind="127.0.0.1")
supervisor.start()
print(supervisor.pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_gateway_takes_its_broker_with_it(tmp_path: Path) -> None:
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(tmp_path), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    broker_pid = 0
    try:
        assert gateway.stdout is not None
        broker_pid = int(gateway.stdout.readline())
        gateway.kill()
        gateway.wait()
        wait_for(
            lambda: not _alive(broker_pid), timeout=10, what="the broker to die with its gateway"
        )
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        if broker_pid and _alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_broker_left_behind_is_replaced_at_start(tmp_path: Path) -> None:
    """A broker still running from an earlier gateway (found through the pid file) is stopped
    and replaced, so the port and the persistence file are ours again."""
    port = free_port()
    with running_broker(tmp_path, port=port) as first:
        config = tmp_path / "mosquitto" / "mosquitto.conf"
        assert config.exists()
        first_pid = first.pid
    # Start one by hand from the same config, as if a gateway had died without stopping it.
    orphan = subprocess.Popen(
        ["mosquitto", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        (tmp_path / "mosquitto" / "mosquitto.pid").write_text(f"{orphan.pid}\n")
        wait_for(lambda: port_open(port), timeout=10, what="the orphan to listen")
        with running_broker(tmp_path, port=port) as broker:
            assert broker.pid not in (orphan.pid, first_pid)
            assert orphan.wait(timeout=10) is not None
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_retained_status_and_queued_command_survive_broker_restart(
    tmp_path: Path, probes: list[MqttProbe]
) -> None:
    port = free_port()
    with running_broker(tmp_path, port=port) as broker:
        endpoint = enroll_device(broker, "dev-offline")
        device = _probe(probes, endpoint, "dev-offline", clean_start=False, session_expiry=86400)
        assert not device.connect().is_failure
        assert not device.subscribe("fleet/dev-offline/cmd").is_failure
        device.publish("fleet/dev-offline/status", b"online", retain=True)
        device.close()
        gateway = _connected(probes, broker.endpoint, "gw-persist")
        # More than Mosquitto's default max_queued_messages (1000): none may be dropped.
        for n in range(QUEUED_COMMANDS):
            gateway.client.publish("fleet/dev-offline/cmd", f"cmd-{n}", qos=1)
        assert not gateway.publish("fleet/dev-offline/cmd", b"last").is_failure
        gateway.close()

    with running_broker(tmp_path, port=port) as broker:
        reader = _connected(probes, broker.endpoint, "gw-persist-2")
        reader.subscribe("fleet/+/status")
        assert wait_for(
            lambda: reader.received("fleet/dev-offline/status"), what="retained status"
        ) == [b"online"]
        back = _probe(probes, endpoint, "dev-offline", clean_start=False, session_expiry=86400)
        assert not back.connect().is_failure
        wait_for(
            lambda: b"last" in back.received("fleet/dev-offline/cmd"),
            what="queued commands after restart",
        )
        expected = [f"cmd-{n}".encode() for n in range(QUEUED_COMMANDS)] + [b"last"]
        assert back.received("fleet/dev-offline/cmd") == expected


def test_port_in_use_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        supervisor = MosquittoSupervisor(tmp_path, port=port)
        with pytest.raises(PortInUseError, match=rf"port {port} is already in use.*--mqtt-port"):
            supervisor.start()
        supervisor.stop()
        assert supervisor.pid is None


# -- MQTT URLs -------------------------------------------------------------------------------


def test_parse_mqtt_url() -> None:
    ca = Path("/etc/ca.pem")
    endpoint = parse_mqtt_url("mqtts://gw:p%40ss@broker.example:9883", ca_file=ca)
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("broker.example", 9883, True)
    assert (endpoint.username, endpoint.password, endpoint.ca_file) == ("gw", "p@ss", ca)
    assert "p@ss" not in repr(endpoint)
    plain = parse_mqtt_url("mqtt://[::1]")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("::1", 1883, False, None)
    assert parse_mqtt_url("mqtts://host").port == 8883


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("http://host", "scheme"),
        ("broker:1883", "scheme"),
        ("mqtt://", "no host"),
        ("mqtt://host:notaport", "malformed"),
        ("mqtt://host:70000", "malformed"),
        ("mqtt://host/some/path", "path"),
        ("mqtt://host:0", "port 0"),
    ],
)
def test_parse_mqtt_url_rejects_junk(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mqtt_url(url)


def test_parse_mqtt_url_never_echoes_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_mqtt_url("http://user:hunter2@host")
    assert "hunter2" not in str(info.value)
