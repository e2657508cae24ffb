"""Commands from the gateway: verified, run once, their result kept.

An agent runs nothing unsigned, expired, addressed to another device, or seen before. A command
that arrives twice (MQTT QoS 1 may redeliver; a gateway may resend) is not run again: its stored
result is reported again instead.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.jwt_rules import Command, TokenRejected, verify_command

MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True)
class Seen:
    command: Command
    result: dict[str, Any] | None


class CommandInbox:
    def __init__(
        self,
        path: Path,
        gateway_key: ec.EllipticCurvePublicKey,
        gateway_id: str,
        device_id: str,
    ) -> None:
        self._key = gateway_key
        self._gateway_id = gateway_id
        self._device_id = device_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
            "expires_at INTEGER NOT NULL, received_at REAL NOT NULL, result TEXT)"
        )

    def verify(self, payload: bytes) -> Command:
        if len(payload) > MAX_COMMAND_BYTES:
            raise TokenRejected("oversized", f"command of {len(payload)} bytes refused")
        return verify_command(
            payload, self._key, gateway_id=self._gateway_id, device_id=self._device_id
        )

    def admit(self, command: Command) -> Seen | None:
        """Record a verified command. None: new, run it. A Seen: a repeat, report its result."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM commands WHERE id = ?", (command.id,)
            ).fetchone()
            if row is not None:
                return Seen(command, json.loads(row[0]) if row[0] else None)
            self._db.execute(
                "INSERT INTO commands (id, kind, expires_at, received_at) VALUES (?, ?, ?, ?)",
                (command.id, command.kind, command.expires_at, time.time()),
            )
            # Ids are only needed until the command could no longer verify anyway.
            self._db.execute("DELETE FROM commands WHERE expires_at < ?", (time.time() - 3600,))
            return None

    def finish(self, command_id: str, result: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE commands SET result = ? WHERE id = ?", (json.dumps(result), command_id)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
