"""What an enrolled machine keeps in its state directory.

``device-key.pem``  the device's private key (0600; made here, never sent anywhere)
``identity.json``   device id, gateway id and public key, broker credential (0600)
``ca.pem``          the CA the broker's certificate must chain to (pinned at enrollment)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import keys
from provisioning.files import write_private
from provisioning.wire import EnrollResponse


class NotEnrolled(RuntimeError):
    pass


@dataclass(frozen=True)
class AgentState:
    directory: Path

    @property
    def key_path(self) -> Path:
        return self.directory / "device-key.pem"

    @property
    def identity_path(self) -> Path:
        return self.directory / "identity.json"

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def enrolled(self) -> bool:
        return self.identity_path.exists() and self.key_path.exists()

    @property
    def claim_code_path(self) -> Path:
        """A machine enrolled into stock: its claim code, for the label (mode 0600)."""
        return self.directory / "claim-code.txt"

    def save(self, gateway_url: str, response: EnrollResponse) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if response.broker.ca_cert:
            write_private(self.ca_path, response.broker.ca_cert)
        record = {"gateway_url": gateway_url, **response.model_dump(exclude={"claim_code"})}
        write_private(self.identity_path, json.dumps(record, indent=2))
        if response.claim_code:
            write_private(self.claim_code_path, response.claim_code + "\n")
        else:
            self.claim_code_path.unlink(missing_ok=True)

    def load(self) -> Identity:
        if not self.enrolled:
            raise NotEnrolled(
                f"this machine is not enrolled (nothing in {self.directory}); run "
                "`edgefleet agent enroll --gateway URL --token TOKEN` first"
            )
        record = json.loads(self.identity_path.read_text())
        gateway_url = record.pop("gateway_url")
        return Identity(
            gateway_url=gateway_url,
            enrollment=EnrollResponse.model_validate(record),
            private_key=keys.load_private_key(self.key_path),
            ca_path=self.ca_path if self.ca_path.exists() else None,
        )


@dataclass(frozen=True)
class Identity:
    gateway_url: str
    enrollment: EnrollResponse
    private_key: ec.EllipticCurvePrivateKey
    ca_path: Path | None

    @property
    def device_id(self) -> str:
        return self.enrollment.device_id

    @property
    def gateway_public_key(self) -> ec.EllipticCurvePublicKey:
        return keys.load_public_key(self.enrollment.gateway_public_key)

    @property
    def broker_host(self) -> str:
        from urllib.parse import urlsplit

        return self.enrollment.broker.host or urlsplit(self.gateway_url).hostname or "localhost"
