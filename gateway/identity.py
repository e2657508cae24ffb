"""The gateway's own identity: the key that signs every command, and the id devices address."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import keys


@dataclass(frozen=True)
class GatewayIdentity:
    private_key: ec.EllipticCurvePrivateKey
    gateway_id: str
    public_key_pem: str

    @classmethod
    def load_or_create(cls, path: Path) -> GatewayIdentity:
        key = keys.ensure_private_key(path)
        public = key.public_key()
        # Derived from the key, so every replica that shares the key shares the id.
        return cls(key, f"edgefleet-gw-{keys.fingerprint(public)}", keys.public_key_pem(public))
