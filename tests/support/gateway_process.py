"""A real `edgefleet gateway run` and real `edgefleet agent run` processes, driven by the CLI.

`GatewayProcess` starts the gateway as a subprocess on free ports in its own data directory
(SQLite, and the Mosquitto it supervises), waits for ``GET /healthz``, makes the first admin API
token with ``edgefleet admin create-token`` and runs operator commands through `cli()` the way a
user does. `stop()` sends SIGTERM (SIGKILL after a timeout) and checks that neither the gateway nor
a Mosquitto of its data directory is left behind. Everything a failing assertion needs to say why
is at hand: `log_tail()` gives the end of the gateway's log.

`AgentProcess` enrolls a machine through ``edgefleet agent enroll`` into its own state directory
and runs ``edgefleet agent run`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import httpx

from gateway.broker.dynsec import GATEWAY_USERNAME, DynsecAdmin
from gateway.broker.mosquitto import broker_directory, gateway_password_path, pki_directory
from gateway.broker.pki import CA_CERT_NAME
from provisioning.mqtt import MqttEndpoint
from tests.support import local_http
from tests.support.accounts import login_token, person_token
from tests.support.waiting import free_port, wait_for

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60.0
T = TypeVar("T")


def edgefleet_command() -> list[str]:
    """The `edgefleet` console script of this interpreter's environment (or `-m edgefleet.cli`)."""
    script = Path(sys.executable).parent / "edgefleet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "edgefleet.cli"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without EDGEFLEET_* settings (they would leak into commands)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_edgefleet(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = CLI_TIMEOUT_S,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `edgefleet ARGS` to the end; with `check`, fail with its output on a non-zero exit."""
    argv = [*edgefleet_command(), *(str(a) for a in args)]
    done = subprocess.run(
        argv,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"`edgefleet {' '.join(argv[len(edgefleet_command()) :])}` exited with "
            f"{done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def processes_mentioning(needle: str) -> list[int]:
    """Pids of live processes whose command line contains `needle` (this process excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle.encode() in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _stop_process(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM, wait, SIGKILL its process group on timeout. True if it stopped on SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # it runs in its own session: pgid == pid
        proc.wait(10)
        return False


class GatewayProcess:
    """One `edgefleet gateway run` subprocess (SQLite + supervised Mosquitto in `data_dir`)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        http_port: int | None = None,
        mqtt_port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.extra_env = dict(env or {})  # EDGEFLEET_* settings for this gateway alone
        self.http_port = http_port or free_port()
        self.mqtt_port = mqtt_port or free_port()
        while self.mqtt_port == self.http_port:
            self.mqtt_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-gateway.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.admin_token = ""
        self.admin_token_id = ""

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def external_broker(self) -> bool:
        return "--mqtt-url" in self.extra_args

    def _option(self, name: str) -> list[str]:
        """`[name, value]` when `name` is among the extra arguments (e.g. --db), else []."""
        if name in self.extra_args:
            at = self.extra_args.index(name)
            return self.extra_args[at : at + 2]
        return []

    @property
    def argv(self) -> list[str]:
        broker = [] if self.external_broker else ["--mqtt-port", str(self.mqtt_port)]
        return [
            *edgefleet_command(),
            "gateway",
            "run",
            "--data-dir",
            str(self.data_dir),
            "--http",
            f"127.0.0.1:{self.http_port}",
            *broker,
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv,
            env=clean_env(self.extra_env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(self._healthy, timeout=timeout, interval=0.1, what="gateway /healthz")
            self.make_admin_token()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def make_admin_token(self) -> None:
        """Set `admin_token` (and its id) once the gateway answers, as a user does: the bootstrap
        token from ``edgefleet admin create-token`` creates the first admin user, who logs in
        for an API token. A subclass for a replica of a cluster may take another replica's
        instead (one database, one set of tokens)."""
        email = "tests-admin@tests.example.com"
        bootstrap = self.cli("admin", "create-token", "--json", check=False)
        if bootstrap.returncode == 0:
            made = person_token(
                self.url, json.loads(bootstrap.stdout)["token"], "admin", email=email
            )
        else:  # a restart on the same data: the admin exists, and logs in again
            assert "an admin user exists" in bootstrap.stderr, bootstrap.stderr
            made = login_token(self.url, email)
        self.admin_token, self.admin_token_id = made["token"], made["id"]

    def _healthy(self) -> bool:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(
                f"`edgefleet gateway run` exited with {code} while starting:\n{self.log_tail()}"
            )
        try:
            return local_http.get(self.url + "/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def mosquitto_config(self) -> Path:
        return broker_directory(self.data_dir) / "mosquitto.conf"

    def mosquitto_pids(self) -> list[int]:
        """Mosquitto processes started for this data directory (found by their config path)."""
        return [
            pid
            for pid in processes_mentioning(str(self.mosquitto_config))
            if b"mosquitto" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        ]

    def broker_pid(self) -> int:
        """The pid of the running broker, from the supervisor's pid file."""
        pid = int((broker_directory(self.data_dir) / "mosquitto.pid").read_text().strip())
        assert pid in self.mosquitto_pids(), (
            f"pid file says {pid}, running: {self.mosquitto_pids()}"
        )
        return pid

    def stop(self, timeout: float = STOP_TIMEOUT_S, check: bool = True) -> None:
        """SIGTERM and wait (SIGKILL on timeout); with `check`, assert it stopped cleanly and
        left no Mosquitto of its data directory behind (strays are killed either way)."""
        problems = []
        if self.proc is not None:
            code_before = self.proc.poll()
            if not _stop_process(self.proc, timeout):
                problems.append(f"the gateway ignored SIGTERM for {timeout:.0f}s (killed)")
            elif code_before is None and self.proc.returncode not in (0, -signal.SIGTERM):
                problems.append(f"the gateway exited with {self.proc.returncode} on SIGTERM")
        if self._log is not None:
            self._log.close()
            self._log = None
        strays = self.mosquitto_pids()
        for pid in strays:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if strays:
            problems.append(f"mosquitto of {self.data_dir} still running after stop: {strays}")
        if check and problems:
            raise AssertionError("; ".join(problems) + f"\n--- gateway log\n{self.log_tail()}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(check=exc_type is None)

    # ---- diagnostics -----------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    # ---- the command line ------------------------------------------------------------------
    def env(self, token: str | None = None) -> dict[str, str]:
        return {
            "EDGEFLEET_GATEWAY": self.url,
            "EDGEFLEET_TOKEN": self.admin_token if token is None else token,
            # `edgefleet login` keeps its token here, not in the home of whoever runs the tests
            "XDG_CONFIG_HOME": str(self.data_dir.parent / "xdg-config"),
        }

    def cli(
        self,
        *args: str | Path,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        token: str | None = None,
        timeout: float = CLI_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run `edgefleet ARGS` with EDGEFLEET_GATEWAY/EDGEFLEET_TOKEN set (admin by default).
        `admin ...` commands get `--data-dir` of this gateway."""
        argv = [str(a) for a in args]
        if argv[:1] == ["admin"]:
            argv += ["--data-dir", str(self.data_dir), *self._option("--db")]
        merged = {**self.env(token), **(env or {})}
        done = run_edgefleet(*argv, env=merged, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"`edgefleet {' '.join(argv)}` exited with {done.returncode}\n--- stdout\n"
                f"{done.stdout}\n--- stderr\n{done.stderr}\n--- gateway log\n{self.log_tail()}"
            )
        return done

    def cli_json(self, *args: str | Path, token: str | None = None) -> Any:
        """Run a command with `--json` and return the one JSON document it printed."""
        done = self.cli(*args, "--json", token=token)
        try:
            return json.loads(done.stdout)
        except ValueError as exc:
            raise AssertionError(
                f"`edgefleet {' '.join(map(str, args))} --json` did not print one JSON document: "
                f"{exc}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            ) from exc

    def create_api_token(self, role: str, name: str | None = None) -> str:
        """A new user of `role` (named `name`@tests.example.com) and their API token."""
        email = f"{name}@tests.example.com" if name else None
        return str(person_token(self.url, self.admin_token, role, email=email)["token"])

    def create_provisioning_token(self, *args: str) -> dict[str, Any]:
        created: dict[str, Any] = self.cli_json("token", "create", *args)
        return created

    def devices(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.cli_json(
            "devices", "list", *(["--all"] if include_revoked else [])
        )
        return items

    def device(self, device_id: str, include_revoked: bool = True) -> dict[str, Any] | None:
        return next((d for d in self.devices(include_revoked) if d["id"] == device_id), None)

    # ---- the broker's own view -------------------------------------------------------------
    def broker_endpoint(self) -> MqttEndpoint:
        """How the gateway reaches its own broker (as `MosquittoSupervisor.endpoint` does)."""
        return MqttEndpoint(
            host="127.0.0.1",
            port=self.mqtt_port,
            tls=True,
            username=GATEWAY_USERNAME,
            password=gateway_password_path(self.data_dir).read_text().strip(),
            ca_file=pki_directory(self.data_dir) / CA_CERT_NAME,
        )

    def broker_credentials(self) -> list[str]:
        """Device ids the broker holds a credential for (asked through its dynsec API)."""
        with DynsecAdmin(self.broker_endpoint(), timeout=10.0) as admin:
            return admin.list_devices()


def spawn_agent(
    state_dir: Path,
    log: IO[bytes],
    node_red: str,
    *,
    env: Mapping[str, str] | None = None,
    debug: bool = False,
) -> subprocess.Popen[bytes]:
    """`edgefleet agent run` on `state_dir` beside the Node-RED at `node_red`: a subprocess in a
    session of its own, its output appended to `log`, with only the given EDGEFLEET_* settings."""
    argv = [*edgefleet_command(), "agent", "run", "--state-dir", str(state_dir)]
    argv += ["--node-red", node_red, *(["--log-level", "debug"] if debug else [])]
    return subprocess.Popen(
        argv,
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


class AgentProcess:
    """One machine: `edgefleet agent enroll` into `state_dir`, then `edgefleet agent run`."""

    def __init__(self, gateway: GatewayProcess, state_dir: Path, name: str) -> None:
        self.gateway = gateway
        self.state_dir = Path(state_dir).resolve()
        self.name = name
        self.gateway_url = gateway.url
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def key_path(self) -> Path:
        return self.state_dir / "device-key.pem"

    @property
    def device_id(self) -> str:
        return str(json.loads(self.identity_path.read_text())["device_id"])

    def enroll_args(self, token: str, *, force: bool = False, json_out: bool = True) -> list[str]:
        args = ["agent", "enroll", "--gateway", self.gateway_url, "--token", token]
        args += ["--name", self.name, "--state-dir", str(self.state_dir)]
        return args + (["--force"] if force else []) + (["--json"] if json_out else [])

    def enroll(
        self, token: str, *, force: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Enroll through the CLI (no operator token in its environment: a machine has none)."""
        return self.gateway.cli(*self.enroll_args(token, force=force), check=check, token="")

    def start(self) -> Self:
        assert self.proc is None, "already started"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = spawn_agent(self.state_dir, self._log, "http://127.0.0.1:1")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def connects(self) -> int:
        """How often the agent has logged a successful connection to the broker."""
        return self.log_text().count("connected to the broker (session present")

    def wait_connected(self, count: int = 1, timeout: float = 20.0) -> None:
        def enough() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            return self.connects() >= count

        try:
            wait_for(enough, timeout=timeout, what=f"agent {self.name} connect #{count}")
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\n--- agent log\n{self.log_tail()}\n--- gateway log\n"
                f"{self.gateway.log_tail()}"
            ) from exc

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait (SIGKILL on timeout); returns the exit code (None if never started)."""
        if self.proc is not None:
            _stop_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a power cut would: no clean disconnect, the broker sends the Last Will."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def wait_until(
    condition: Callable[[], T | None], what: str, *context: Any, timeout: float = 20.0
) -> T:
    """`wait_for` whose failure message carries the log tails of the `context` processes."""
    try:
        return wait_for(condition, timeout=timeout, interval=0.2, what=what)
    except TimeoutError as exc:
        logs = "".join(
            f"\n--- {type(p).__name__} log ({p.log_path.name})\n{p.log_tail()}" for p in context
        )
        raise AssertionError(f"{exc}{logs}") from exc
