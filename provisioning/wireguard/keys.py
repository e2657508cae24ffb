"""WireGuard keys: Curve25519 key pairs in WireGuard's base64 form, and 0600 key files."""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from wireguard_tools import WireguardKey

from provisioning.files import write_private

logger = logging.getLogger(__name__)


class WgKeyError(ValueError):
    """A text that should be a WireGuard key is not one."""


@dataclass(frozen=True)
class KeyPair:
    """A Curve25519 key pair in WireGuard's base64 form. `repr` never shows the private half."""

    private_key: str = field(repr=False)
    public_key: str


def generate_keypair() -> KeyPair:
    """A fresh key pair (clamped Curve25519 private key and its public key)."""
    private = WireguardKey.generate()
    return KeyPair(private_key=str(private), public_key=str(private.public_key()))


def public_key_from_private(private_key: str) -> str:
    """The public key that belongs to `private_key` (base64)."""
    return str(_parse_key(private_key, "private key").public_key())


def normalize_key(text: str, what: str = "public key") -> str:
    """Check that `text` is a WireGuard key and return it in standard base64.

    Raises WgKeyError naming `what` so a caller sees which field was wrong.
    """
    return str(_parse_key(text, what))


def normalize_public_key(text: str, what: str = "public key") -> str:
    """`normalize_key` for a peer's public key from outside (an engineer, a device).

    A key of small order (the all-zero key among them) is refused: every Diffie-Hellman with it
    gives the same all-zero secret, so a peer with it authenticates nothing. X25519 itself says
    so (the exchange fails), so that is the check.
    """
    key = _parse_key(text, what)
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key.keydata))
    except ValueError:
        raise WgKeyError(
            f"{what} is a key of small order (such as all zeros), which WireGuard cannot use; "
            "make a real one with `wg genkey | wg pubkey`"
        ) from None
    return str(key)


def _parse_key(text: str, what: str) -> WireguardKey:
    if not isinstance(text, str):
        raise WgKeyError(f"{what} must be a base64 string, got {type(text).__name__}")
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WgKeyError(
            f"{what} is not valid base64 ({exc}); expected 44 characters as printed by `wg pubkey`"
        ) from exc
    if len(raw) != 32:
        raise WgKeyError(
            f"{what} decodes to {len(raw)} bytes, a WireGuard key has 32 "
            "(44 base64 characters as printed by `wg pubkey`)"
        )
    return WireguardKey(raw)


def read_private_key(path: Path) -> str:
    """Read a private key file, refusing one that group or others can read."""
    path = Path(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise WgKeyError(
            f"private key file {path} has mode {mode:o}; it must be 0600 (run: chmod 600 {path})"
        )
    return normalize_key(path.read_text(encoding="utf-8"), f"private key in {path}")


def load_or_create_private_key(path: Path) -> str:
    """The private key kept in `path`, made (0600) on first use so a restart keeps the identity."""
    path = Path(path)
    if path.exists():
        return read_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = generate_keypair().private_key
    write_private(path, private + "\n")
    logger.info("created WireGuard private key %s", path)
    return private
