"""The token `edgefleet login` keeps: $XDG_CONFIG_HOME/edgefleet/credentials.json (default
~/.config/edgefleet/), mode 0600 in a 0700 directory. Commands use it when EDGEFLEET_TOKEN and
--token are not given; its gateway is the default when EDGEFLEET_GATEWAY and --gateway are not."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from provisioning.files import write_private


@dataclass(frozen=True)
class Saved:
    gateway: str
    token: str
    token_id: str
    email: str


def path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "credentials.json"


def load() -> Saved | None:
    try:
        data = json.loads(path().read_text())
        return Saved(
            str(data["gateway"]), str(data["token"]), str(data["token_id"]), str(data["email"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(saved: Saved) -> Path:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(target.parent, 0o700)
    return write_private(target, json.dumps(saved.__dict__, indent=2))


def forget() -> bool:
    try:
        path().unlink()
    except FileNotFoundError:
        return False
    return True
