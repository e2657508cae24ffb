"""The supervised `wireguard-go` process (hub and device) and its UAPI control socket."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from provisioning.process import PidFile, cmdline, pid_alive, terminate, wait_until
from provisioning.wireguard.tools import (
    WireGuardError,
    check_interface_name,
    check_netns,
    netns_argv,
)

logger = logging.getLogger(__name__)

#: Where wireguard-go puts its UAPI sockets. The directory is shared by all network namespaces
#: (it is a file system path), so interface names must be unique on the host.
UAPI_DIR = Path("/var/run/wireguard")


def uapi_socket(interface: str) -> Path:
    """wireguard-go's control socket for `interface`."""
    return UAPI_DIR / f"{check_interface_name(interface)}.sock"


def uapi_alive(interface: str) -> bool:
    """Whether a live wireguard-go answers on the UAPI socket of `interface`."""
    path = uapi_socket(interface)
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class WireGuardGo:
    """Runs and stops one `wireguard-go -f IFACE` process (in a network namespace if given).

    The process gets its own session (so it outlives a restart of the Python process that started
    it, and a Ctrl-C to that process does not hit it); a pid file lets a later process adopt and
    stop it. Output goes to a log file, not a pipe, so nothing breaks when the parent goes away.
    `max_lifetime` wraps it in coreutils `timeout`, a hard end that holds even if the Python side
    dies: the device's tunnel cannot outlive its expiry.
    """

    def __init__(
        self,
        interface: str,
        *,
        netns: str | None = None,
        pid_file: Path | None = None,
        log_file: Path | None = None,
        binary: str = "wireguard-go",
    ) -> None:
        self.interface = check_interface_name(interface)
        self.netns = check_netns(netns)
        self.pid_file = PidFile(pid_file, self._is_ours) if pid_file is not None else None
        self.log_file = log_file
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The supervised process id (the `timeout` wrapper when `max_lifetime` was used)."""
        return self._pid

    def _is_ours(self, cmd: list[str]) -> bool:
        return any(Path(part).name == Path(self.binary).name for part in cmd) and (
            self.interface in cmd
        )

    def running(self) -> bool:
        """Whether the process is alive and its UAPI socket answers."""
        return self._pid is not None and pid_alive(self._pid) and uapi_alive(self.interface)

    def adopt(self) -> bool:
        """Take over a wireguard-go left running by an earlier process (via the pid file)."""
        pid = self.pid_file.owner() if self.pid_file is not None else None
        if pid is not None and uapi_alive(self.interface):
            self._pid = pid
            logger.info("adopted wireguard-go for %s (pid %d)", self.interface, pid)
            return True
        return False

    def start(self, *, max_lifetime: float | None = None, timeout: float = 10.0) -> int:
        """Start wireguard-go and wait until its UAPI socket answers; return the pid."""
        if self.running():
            raise WireGuardError(f"wireguard-go for {self.interface} is already running")
        sock = uapi_socket(self.interface)
        # A process that was just killed answers for a moment while its threads exit.
        if not wait_until(lambda: not uapi_alive(self.interface), 2.0):
            raise WireGuardError(
                f"another wireguard-go already serves {self.interface} ({sock}); interface names "
                "are shared by all network namespaces: pick another name or stop that process"
            )
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # stale socket of a process that was killed
        argv = [self.binary, "-f", self.interface]
        if max_lifetime is not None:
            if max_lifetime <= 0:
                raise ValueError("max_lifetime must be positive")
            argv = ["timeout", "--signal=TERM", "--kill-after=5", f"{max_lifetime:.3f}s", *argv]
        full = netns_argv(argv, self.netns)
        env = {**os.environ, "LOG_LEVEL": "error"}
        out: Any = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_file.open("ab")
        try:
            self._proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise WireGuardError(f"cannot run {full[0]}: {exc}; install wireguard-go") from exc
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._pid = self._proc.pid
        if self.pid_file is not None:
            self.pid_file.write(self._pid)
        proc = self._proc
        if not wait_until(lambda: proc.poll() is not None or uapi_alive(self.interface), timeout):
            self.stop()
            raise WireGuardError(f"wireguard-go for {self.interface} did not come up in {timeout}s")
        if proc.poll() is not None:
            self._forget()
            raise WireGuardError(
                f"wireguard-go for {self.interface} exited with {proc.returncode}: "
                f"{self._log_tail()}"
            )
        logger.info("wireguard-go %s up (pid %d, netns %s)", self.interface, self._pid, self.netns)
        return self._pid

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and remove what it leaves behind."""
        pid = self._pid
        ours = self._proc is not None or (pid is not None and self._is_ours(cmdline(pid)))
        if pid is not None and pid_alive(pid) and ours:
            name = f"wireguard-go {self.interface}"
            terminate(pid, timeout, name=name, group=True, child=self._proc)
        # Wait for wireguard-go's own cleanup; a killed one leaves its socket behind.
        wait_until(lambda: not uapi_alive(self.interface), timeout)
        with contextlib.suppress(FileNotFoundError):
            uapi_socket(self.interface).unlink()
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        self._pid = None
        if self.pid_file is not None:
            self.pid_file.remove()

    def _log_tail(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        return self.log_file.read_text(encoding="utf-8", errors="replace")[-800:].strip()
