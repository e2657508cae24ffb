"""EC P-256 key pairs: made on the side that owns them, kept in 0600 files, exchanged as PEM.

A device's private key is generated on the device and never leaves it; the gateway signs commands
with its own key. Both sides use the same helpers so there is one place that decides key type,
encoding and file permissions.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.files import write_private


class InvalidKey(ValueError):
    """A key that is malformed or of the wrong type (the message says which)."""


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write `key` so that only its owner can read it, atomically (no moment with wider mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, private_key_pem(key))


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidKey(f"no private key at {path}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise InvalidKey(f"{path} does not hold a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise InvalidKey(f"{path} holds a {type(key).__name__}; edgefleet uses EC P-256 keys")
    return key


def ensure_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the key at `path`, creating it (0600) the first time."""
    if path.exists():
        return load_private_key(path)
    key = generate_private_key()
    write_private_key(path, key)
    return key


def load_public_key(pem: str) -> ec.EllipticCurvePublicKey:
    """Parse a PEM public key and insist on EC P-256: anything else is refused with the reason."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InvalidKey(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidKey(f"a {type(key).__name__.lstrip('_')} was given; edgefleet needs EC P-256")
    if key.curve.name != "secp256r1":
        raise InvalidKey(f"the key is on curve {key.curve.name}; edgefleet needs P-256 (secp256r1)")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """A short, stable name for a public key: sha256 of its DER encoding, base64url, 22 chars."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode("ascii")[:22]
