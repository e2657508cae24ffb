"""WireGuard pieces both sides share: keys, config files, `wg`/`ip`/`nft` calls, wireguard-go.

The hub (gateway host) and the tunnel endpoint (device) drive the same tools, so the helpers live
here rather than being written twice. Keys and wg-quick files come from the PyPI
`wireguard-tools` package; changing a running interface goes through Debian's `wg` command, which
works the same on a kernel interface and on wireguard-go's UAPI socket. Every call is a
list-argument subprocess; private keys travel through 0600 files or stdin, never on a command
line, and are never logged. This module imports neither FastAPI nor SQLModel so the agent can
use it.

`netns` arguments run the command inside that network namespace (`ip netns exec`); the tests use
this to build a hub, devices and engineers on one host without touching the host's own network.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from wireguard_tools import WireguardConfig, WireguardKey, WireguardPeer

logger = logging.getLogger(__name__)

#: Where wireguard-go puts its UAPI sockets. The directory is shared by all network namespaces
#: (it is a file system path), so interface names must be unique on the host.
UAPI_DIR = Path("/var/run/wireguard")
#: Safe for LTE and PPPoE paths, where 1420 (WireGuard's default) fragments.
DEFAULT_MTU = 1280
#: Keeps a NAT mapping alive on the way out of a customer's network.
DEFAULT_KEEPALIVE = 15
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class WireGuardError(RuntimeError):
    """Something on the WireGuard side (a tool, wireguard-go, an interface) did not work."""


class WgCommandError(WireGuardError):
    """A `wg`, `ip`, `nft` or `sysctl` call failed; carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"command {' '.join(self.argv)!r} failed with exit code {returncode}: "
            f"{self.stderr or '(no message)'}"
        )

    @property
    def tool_missing(self) -> bool:
        """The tool itself is not installed (directly, or under `ip netns exec`)."""
        return self.returncode == 127 or self.stderr.startswith("exec of ")


class WgKeyError(ValueError):
    """A text that should be a WireGuard key is not one."""


class WgConfigError(ValueError):
    """A WireGuard config file could not be read."""


# --------------------------------------------------------------------------------------- keys


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


def write_secret_file(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600, atomically (temp file in the same dir, rename).

    The file is created 0600 from the start (never world-readable for a moment) and the parent
    directory must already exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


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
    write_secret_file(path, private + "\n")
    logger.info("created WireGuard private key %s", path)
    return private


# ------------------------------------------------------------------------------ names, commands


def check_interface_name(name: str) -> str:
    """Return `name` if it is a usable interface name (1-15 chars, letters/digits/`_.-`)."""
    if not isinstance(name, str) or not _IFNAME_RE.match(name):
        raise ValueError(
            f"interface name {name!r} is not valid: use 1 to 15 letters, digits, '_', '.' or '-'"
        )
    return name


def _check_netns(netns: str | None) -> str | None:
    if netns is not None and not _NETNS_RE.match(netns):
        raise ValueError(f"network namespace name {netns!r} is not valid")
    return netns


def netns_argv(argv: Sequence[str], netns: str | None) -> list[str]:
    """`argv` prefixed to run inside `netns` (unchanged when `netns` is None)."""
    if _check_netns(netns) is None:
        return list(argv)
    return ["ip", "netns", "exec", str(netns), *argv]


def run_command(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input_text: str | None = None,
    timeout: float = 15.0,
) -> str:
    """Run a tool (in `netns` if given) and return its stdout; raise WgCommandError on failure.

    `input_text` goes to stdin, which is how secrets reach `wg` (never through argv).
    """
    full = netns_argv(argv, netns)
    try:
        proc = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise WgCommandError(full, 127, f"{full[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise WgCommandError(full, -1, f"timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise WgCommandError(full, proc.returncode, proc.stderr)
    return proc.stdout


# ------------------------------------------------------------------------------------------ wg


@dataclass(frozen=True)
class PeerUpdate:
    """One peer's wanted state for `wg set` (`remove=True` deletes the peer)."""

    public_key: str
    allowed_ips: tuple[IPv4Network, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    remove: bool = False


def wg_set_private_key(
    interface: str, private_key: str, *, listen_port: int | None = None, netns: str | None = None
) -> None:
    """Give `interface` its private key through stdin (and optionally its UDP listen port)."""
    normalize_key(private_key, "private key")
    argv = ["wg", "set", check_interface_name(interface)]
    if listen_port is not None:
        argv += ["listen-port", str(int(listen_port))]
    argv += ["private-key", "/dev/stdin"]
    run_command(argv, netns=netns, input_text=private_key.strip() + "\n")


def wg_set_peers(
    interface: str, updates: Iterable[PeerUpdate], *, netns: str | None = None
) -> None:
    """Apply several peer changes in one `wg set` call (one UAPI transaction)."""
    argv = ["wg", "set", check_interface_name(interface)]
    count = 0
    for update in updates:
        count += 1
        argv += ["peer", normalize_key(update.public_key)]
        if update.remove:
            argv.append("remove")
            continue
        argv += ["allowed-ips", ",".join(str(net) for net in update.allowed_ips)]
        if update.endpoint is not None:
            argv += ["endpoint", update.endpoint]
        if update.persistent_keepalive is not None:
            argv += ["persistent-keepalive", str(int(update.persistent_keepalive))]
    if count:
        run_command(argv, netns=netns)


@dataclass(frozen=True)
class PeerStats:
    """One peer as `wg show IFACE dump` reports it. `last_handshake` is a Unix time or None."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None

    def handshake_age(self, now: float | None = None) -> float | None:
        """Seconds since the last handshake (None if there never was one): the liveness signal."""
        if self.last_handshake is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_handshake)


@dataclass(frozen=True)
class InterfaceState:
    """An interface's public side and its peers, from `wg show IFACE dump`."""

    public_key: str
    listen_port: int
    peers: Mapping[str, PeerStats]


def parse_wg_dump(text: str) -> InterfaceState:
    """Parse `wg show IFACE dump` (tab separated; the first line is the interface itself).

    The private key in the first line is dropped here and never kept.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise WgConfigError("`wg show dump` printed nothing; is the interface up?")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise WgConfigError(f"unexpected interface line in `wg show dump` ({len(head)} fields)")
    peers: dict[str, PeerStats] = {}
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) != 8:
            raise WgConfigError(f"unexpected peer line in `wg show dump` ({len(cols)} fields)")
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
        peers[pub] = PeerStats(
            public_key=pub,
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=tuple(a for a in allowed.split(",") if a and a != "(none)"),
            last_handshake=float(handshake) if handshake != "0" else None,
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive),
        )
    return InterfaceState(public_key=head[1], listen_port=int(head[2]), peers=peers)


def wg_show_dump(interface: str, *, netns: str | None = None) -> InterfaceState:
    """The live state of `interface` (peers, handshakes, bytes)."""
    out = run_command(["wg", "show", check_interface_name(interface), "dump"], netns=netns)
    return parse_wg_dump(out)


# ------------------------------------------------------------------------------------ ip, sysctl


def link_exists(interface: str, *, netns: str | None = None) -> bool:
    """Whether a network interface of that name exists (in `netns`)."""
    try:
        run_command(["ip", "link", "show", "dev", check_interface_name(interface)], netns=netns)
    except WgCommandError:
        return False
    return True


def configure_link(
    interface: str,
    *,
    address: IPv4Interface,
    mtu: int,
    routes: Iterable[IPv4Network] = (),
    netns: str | None = None,
) -> None:
    """Address, MTU and up state of a tunnel interface, plus routes through it (idempotent)."""
    name = check_interface_name(interface)
    if not 576 <= mtu <= 65535:
        raise ValueError(f"MTU {mtu} is out of range: use 576..65535 (default {DEFAULT_MTU})")
    run_command(["ip", "address", "replace", str(address), "dev", name], netns=netns)
    run_command(["ip", "link", "set", "dev", name, "mtu", str(mtu), "up"], netns=netns)
    for route in routes:
        run_command(["ip", "route", "replace", str(route), "dev", name], netns=netns)


def set_sysctl(key: str, value: str, *, netns: str | None = None) -> None:
    """Set one sysctl (inside `netns` when given: network sysctls are per namespace)."""
    run_command(["sysctl", "-q", "-w", f"{key}={value}"], netns=netns)


# ------------------------------------------------------------------------------------------ nft


def nft_apply(commands: Sequence[Mapping[str, Any]], *, netns: str | None = None) -> None:
    """Apply nftables commands (libnftables JSON objects) as one atomic transaction via stdin.

    JSON rather than the text syntax: names and addresses are data, so nothing can be injected
    and nothing needs quoting.
    """
    if not commands:
        return
    payload = json.dumps({"nftables": list(commands)})
    run_command(["nft", "-j", "-f", "-"], netns=netns, input_text=payload)


def nft_list_table(
    family: str, table: str, *, netns: str | None = None
) -> list[dict[str, Any]] | None:
    """The objects of one nftables table as JSON dicts, or None if the table does not exist."""
    try:
        out = run_command(["nft", "-j", "list", "table", family, table], netns=netns)
    except WgCommandError as exc:
        # nft's own answer for a missing table; not a missing nft binary (exit 127 here, or
        # `ip netns exec`'s 'exec of "nft" failed: No such file or directory').
        if exc.stderr.startswith("Error: No such file or directory"):
            return None
        raise
    items: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    return items


def nft_delete_table(family: str, table: str, *, netns: str | None = None) -> bool:
    """Delete one of our tables (rules, chains, maps go with it); False if it was not there."""
    if nft_list_table(family, table, netns=netns) is None:
        return False
    nft_apply([{"delete": {"table": {"family": family, "name": table}}}], netns=netns)
    return True


# --------------------------------------------------------------------------------------- configs


def render_wg_quick(
    *,
    private_key: str,
    address: IPv4Interface,
    peer_public_key: str,
    endpoint: str,
    allowed_ips: Sequence[IPv4Network],
    mtu: int = DEFAULT_MTU,
    persistent_keepalive: int | None = DEFAULT_KEEPALIVE,
) -> str:
    """A wg-quick config for a one-peer client (the support engineer's file)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise WgConfigError(f"endpoint {endpoint!r} must be HOST:PORT")
    config = WireguardConfig(
        private_key=WireguardKey(normalize_key(private_key, "private key")),
        addresses=[address],
        mtu=mtu,
    )
    config.add_peer(
        WireguardPeer(
            public_key=WireguardKey(normalize_key(peer_public_key)),
            endpoint_host=host.strip("[]"),
            endpoint_port=int(port),
            persistent_keepalive=persistent_keepalive,
            allowed_ips=[IPv4Interface(str(net)) for net in allowed_ips],
        )
    )
    return config.to_wgconfig(wgquick_format=True)


def host_network(address: IPv4Address) -> IPv4Network:
    """`address` as a /32 network (one /32 per peer)."""
    return IPv4Network(f"{address}/32")


# ----------------------------------------------------------------------------------- wireguard-go


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
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
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


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
        self.netns = _check_netns(netns)
        self.pid_file = pid_file
        self.log_file = log_file
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The supervised process id (the `timeout` wrapper when `max_lifetime` was used)."""
        return self._pid

    def _is_ours(self, pid: int) -> bool:
        cmd = _cmdline(pid)
        return any(Path(part).name == Path(self.binary).name for part in cmd) and (
            self.interface in cmd
        )

    def running(self) -> bool:
        """Whether the process is alive and its UAPI socket answers."""
        return self._pid is not None and pid_alive(self._pid) and uapi_alive(self.interface)

    def adopt(self) -> bool:
        """Take over a wireguard-go left running by an earlier process (via the pid file)."""
        if self.pid_file is None or not self.pid_file.exists():
            return False
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8").strip())
        except ValueError:
            return False
        if pid_alive(pid) and self._is_ours(pid) and uapi_alive(self.interface):
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
        if not _wait_until(lambda: not uapi_alive(self.interface), 2.0):
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
            write_secret_file(self.pid_file, f"{self._pid}\n")
        proc = self._proc
        if not _wait_until(lambda: proc.poll() is not None or uapi_alive(self.interface), timeout):
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
        if pid is not None and pid_alive(pid) and (self._proc is not None or self._is_ours(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout):
                logger.warning("wireguard-go %s ignored SIGTERM; killing it", self.interface)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._wait_gone(pid, timeout)
        # Wait for wireguard-go's own cleanup; a killed one leaves its socket behind.
        _wait_until(lambda: not uapi_alive(self.interface), timeout)
        with contextlib.suppress(FileNotFoundError):
            uapi_socket(self.interface).unlink()
        self._forget()

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        return _wait_until(lambda: not pid_alive(pid), timeout)

    def _forget(self) -> None:
        self._proc = None
        self._pid = None
        if self.pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def _log_tail(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        return self.log_file.read_text(encoding="utf-8", errors="replace")[-800:].strip()
