"""Processes edgefleet starts and must find again: wireguard-go (hub and device) and Mosquitto.

Each runs in a session of its own so a Ctrl-C to the Python process does not hit it, and leaves a
pid file so a later process can tell whether it still runs and is really ours (its command line
says so) before adopting or stopping it. Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioning.files import write_private

log = logging.getLogger(__name__)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone; our own zombie children are reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def cmdline(pid: int) -> list[str]:
    """The command line of `pid` (empty when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def terminate(
    pid: int,
    timeout: float,
    *,
    name: str,
    group: bool = False,
    child: subprocess.Popen[Any] | None = None,
) -> None:
    """SIGTERM `pid`; SIGKILL it (its process group with `group`) if it outlives `timeout`.

    With `child` (our own `Popen` of that pid) it is also reaped.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout, child):
        return
    log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", name, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, timeout, child)


def _wait_gone(pid: int, timeout: float, child: subprocess.Popen[Any] | None) -> bool:
    if child is not None and child.pid == pid:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    return wait_until(lambda: not pid_alive(pid), timeout)


class PidFile:
    """A pid file, and the rule that says whether the process it names is the one we started.

    `is_ours(cmdline)` looks at the running process's command line: a pid reused by another
    program is never adopted or stopped.
    """

    def __init__(self, path: Path, is_ours: Callable[[list[str]], bool]) -> None:
        self.path = path
        self._is_ours = is_ours

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, f"{pid}\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def read(self) -> int | None:
        """The pid in the file (None: no file, or not a number)."""
        try:
            return int(self.path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None

    def owner(self) -> int | None:
        """The pid in the file if that process runs and is ours, else None."""
        pid = self.read()
        if pid is None or not pid_alive(pid) or not self._is_ours(cmdline(pid)):
            return None
        return pid
