"""The gateway's own small PKI: a CA kept in the data directory and the broker's server certificate.

Devices verify the broker with this CA (the gateway hands them its PEM at enrollment), so nobody has
to buy or manage a public certificate to run a fleet. The CA key never leaves the data directory and
is written 0600. The server certificate is re-issued on start whenever the host names the operator
asked for change, the CA changed, or it comes close to expiry, so `--mqtt-hostname` "just works".
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.files import write_private

logger = logging.getLogger(__name__)

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.crt"
SERVER_KEY_NAME = "server.key"

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=825)
# Re-issue the server certificate when less than this is left, so a long-running gateway that
# restarts now and then never serves an expired certificate.
SERVER_RENEW_BEFORE = dt.timedelta(days=30)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PkiError(RuntimeError):
    """The CA or certificate files in the data directory are unusable."""


@dataclass(frozen=True)
class CertificateAuthority:
    """Where the gateway's CA lives on disk."""

    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> str:
        """The CA certificate in PEM: what devices get to verify the broker."""
        return self.cert_path.read_text(encoding="ascii")

    def load_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def load_private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(
                f"{self.key_path} is not an EC private key; move it away to make a new CA"
            )
        return key


def _write_public_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise CA/certificate creation between processes sharing one data directory."""
    with open(directory / ".pki.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ensure_ca(directory: Path, common_name: str = "edgefleet gateway CA") -> CertificateAuthority:
    """Return the CA in `directory`, creating it (key 0600) the first time.

    An existing CA is reused as is: re-creating it would orphan every device that trusts it.
    A half-present CA (certificate without key or the reverse) is an error, not a silent re-create.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = CertificateAuthority(directory / CA_CERT_NAME, directory / CA_KEY_NAME)
    with _directory_lock(directory):
        have_cert, have_key = ca.cert_path.exists(), ca.key_path.exists()
        if have_cert and have_key:
            _check_ca(ca)
            return ca
        if have_cert or have_key:
            present, missing = (
                (ca.cert_path, ca.key_path) if have_cert else (ca.key_path, ca.cert_path)
            )
            raise PkiError(
                f"{present} exists but {missing} does not; restore the missing file from a backup, "
                f"or move both away to create a new CA (devices enrolled with the old CA will then "
                f"have to be re-enrolled)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(ca.key_path, _pem_key(key))
        _write_public_file(ca.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        logger.info("created gateway CA %r in %s", common_name, directory)
        return ca


def _check_ca(ca: CertificateAuthority) -> None:
    try:
        cert = ca.load_certificate()
        key = ca.load_private_key()
    except ValueError as exc:
        raise PkiError(f"cannot read the gateway CA in {ca.cert_path.parent}: {exc}") from exc
    if cert.public_key() != key.public_key():
        raise PkiError(f"{ca.cert_path} and {ca.key_path} do not belong together")
    if ca.key_path.stat().st_mode & 0o077:
        logger.warning("%s was readable by others; setting it to 0600", ca.key_path)
        ca.key_path.chmod(0o600)


def _host_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def server_host_names(hostnames: Sequence[str]) -> list[str]:
    """The names and addresses the server certificate covers: the requested ones plus loopback."""
    wanted = [*hostnames, "localhost", "127.0.0.1", "::1", socket.gethostname()]
    seen: dict[str, None] = {}
    for raw in wanted:
        name = raw.strip()
        if not name:
            raise ValueError("an empty host name cannot go into the broker certificate")
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            name = name.lower().rstrip(".")
        seen.setdefault(name, None)
    return list(seen)


def _san_set(names: Sequence[str]) -> set[str]:
    return {_entry_text(_host_entry(name)) for name in names}


def _entry_text(entry: x509.GeneralName) -> str:
    if isinstance(entry, x509.IPAddress):
        return f"ip:{entry.value}"
    if isinstance(entry, x509.DNSName):
        return f"dns:{entry.value.lower()}"
    return f"other:{entry.value}"


def _server_cert_current(
    cert_path: Path, key_path: Path, ca_cert: x509.Certificate, names: Sequence[str]
) -> str | None:
    """None if the existing server certificate can stay, else why it must be re-issued."""
    if not cert_path.exists() or not key_path.exists():
        return "no server certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        return f"existing certificate unreadable ({exc})"
    if cert.public_key() != key.public_key():
        return "certificate and key do not match"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the current CA"
    if cert.not_valid_after_utc - _now() < SERVER_RENEW_BEFORE:
        return "close to expiry"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative names"
    if {_entry_text(entry) for entry in san} != _san_set(names):
        return "host names changed"
    return None


def ensure_server_certificate(
    ca: CertificateAuthority, directory: Path, hostnames: Sequence[str]
) -> tuple[Path, Path]:
    """Return (certificate, key) for the broker, issuing them from `ca` when needed.

    The certificate always covers localhost, 127.0.0.1, ::1 and this machine's host name besides
    `hostnames`; names that parse as IP addresses become IP SANs, the rest DNS SANs.
    """
    names = server_host_names(hostnames)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / SERVER_CERT_NAME, directory / SERVER_KEY_NAME
    with _directory_lock(directory):
        ca_cert = ca.load_certificate()
        reason = _server_cert_current(cert_path, key_path, ca_cert, names)
        if reason is None:
            return cert_path, key_path
        ca_key = ca.load_private_key()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([_host_entry(name) for name in names]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_private(key_path, _pem_key(key))
        _write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        logger.info("issued broker certificate for %s (%s)", ", ".join(names), reason)
        return cert_path, key_path
