"""Flow push figures: time from `POST /deployments` to every device `succeeded`, for N agents.

What runs, per fleet size:
- a real `edgefleet gateway run` subprocess (its supervised Mosquitto, SQLite by default or a fresh
  PostgreSQL database with `--db postgresql`), started fresh;
- N enrolled machines, each the real edge agent (`edge_agent.assembly.build_agent`: its MQTT
  session, signed-command inbox, deploy handler, FlowDeployer, HTTP fetch of the bundle with its
  own JWT). Agents run as threads inside harness processes (`--per-worker` each, 10 by default;
  at most ~100, as paho-mqtt's select() cannot watch file descriptors above 1023): a process per
  agent would cost a thousand interpreters beside the gateway on a 2-core machine;
- a Node-RED for each agent: a real Node-RED from npm up to `--real-node-red-max` machines, above
  that a minimal stand-in for Node-RED's Admin API (GET/POST /flows with revs, GET /nodes, GET
  /flows/state, GET /settings), served by each harness process. The output says which.

Measured: wall time from the push to the last device succeeded (the scheduler sends, agents fetch
the bundle over HTTP, deploy, verify, report), per-device time from command sent to result
(p50/p95/max), the gateway's CPU seconds and peak RSS over the push (and its Mosquitto's).

With ``--replicas N`` (PostgreSQL only) the gateway is N `edgefleet gateway run` replicas on one
fresh database and one Mosquitto of their own (the cluster layout, as in tests/test_cluster.py):
the leader's scheduler sends the commands, each agent fetches its bundle from the replica it was
enrolled against (round robin, as behind a load balancer), and the replies are split between
the replicas by the shared subscription. CPU is then the replicas' sum, RSS the largest.

Run from the repository root:  python -m bench.flow_push_bench [--agents 10,100,1000]
                               python -m bench.flow_push_bench --db postgresql --replicas 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import httpx
import psutil

from edge_agent.state import AgentState
from provisioning import keys
from provisioning.bundles import CORE_NODE_TYPES
from provisioning.wire import EnrollResponse
from tests.support.cluster import gateway_cluster
from tests.support.gateway_process import GatewayProcess
from tests.support.mosquitto import running_broker
from tests.support.node_red import start_node_red

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


# ---- the Node-RED Admin API stand-in (only above --real-node-red-max) ------------------------


class _StandIn:
    """Many minimal Node-RED Admin APIs in one HTTP server, one per path prefix /nr/{i}."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.flows: dict[str, tuple[str, bytes]] = {}
        self.nodes = json.dumps(
            [
                {
                    "id": "node-red/core",
                    "module": "node-red",
                    "version": "4.0.0",
                    "enabled": True,
                    "types": sorted(CORE_NODE_TYPES),
                }
            ]
        ).encode()

    @staticmethod
    def rev_of(flows: bytes) -> str:
        return hashlib.md5(flows, usedforsecurity=False).hexdigest()

    def get(self, instance: str) -> tuple[str, bytes]:
        with self.lock:
            return self.flows.get(instance, (self.rev_of(b"[]"), b"[]"))

    def put(self, instance: str, expected_rev: str, flows: bytes) -> str | None:
        with self.lock:
            current = self.flows.get(instance, (self.rev_of(b"[]"), b"[]"))[0]
            if expected_rev != current:
                return None
            rev = self.rev_of(flows)
            self.flows[instance] = (rev, flows)
            return rev


def _standin_server(standin: _StandIn) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            return None

        def _split(self) -> tuple[str, str]:
            parts = self.path.split("?")[0].split("/", 3)  # "", "nr", "{i}", "rest"
            return parts[2], "/" + (parts[3] if len(parts) > 3 else "")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            instance, path = self._split()
            if path == "/flows":
                rev, flows = standin.get(instance)
                self._send(200, b'{"rev":"' + rev.encode() + b'","flows":' + flows + b"}")
            elif path == "/nodes":
                self._send(200, standin.nodes)
            elif path == "/flows/state":
                self._send(200, b'{"state":"start"}')
            elif path == "/settings":
                self._send(200, b'{"version":"4.0.0-standin"}')
            else:
                self._send(404, b'{"error":"not_found"}')

        def do_POST(self) -> None:
            instance, path = self._split()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if path != "/flows":
                self._send(404, b'{"error":"not_found"}')
                return
            flows = json.dumps(body["flows"], separators=(",", ":")).encode()
            rev = standin.put(instance, body.get("rev", ""), flows)
            if rev is None:
                self._send(409, b'{"code":"version_mismatch"}')
            else:
                self._send(200, b'{"rev":"' + rev.encode() + b'"}')

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            error = sys.exc_info()[1]
            if not isinstance(error, ConnectionError):  # a client that gave up is no news
                super().handle_error(request, client_address)

    return Server(("127.0.0.1", 0), Handler)


# ---- agents in harness processes -------------------------------------------------------------


@dataclass(frozen=True)
class AgentSpec:
    state_dir: str
    node_red: str | None  # None: this harness's stand-in
    username: str | None = None
    password: str | None = None


def _no_probe() -> None:
    return None


def _harness(specs: list[AgentSpec], ready: Any, stop: EventType) -> None:
    """Run real agents as threads until `stop` is set (in a child process)."""
    logging.basicConfig(level=logging.WARNING)
    from edge_agent.assembly import build_agent
    from edge_agent.settings import AgentSettings

    server = None
    base = ""
    if any(spec.node_red is None for spec in specs):
        server = _standin_server(_StandIn())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/nr"
    mark = time.monotonic()
    agents = []
    for index, spec in enumerate(specs):
        options: dict[str, Any] = {
            "state_dir": Path(spec.state_dir),
            "node_red": spec.node_red or f"{base}/{index}",
            "node_red_username": spec.username,
            "node_red_password": spec.password,
            "max_reconnect_delay": 5,
            # This measures flow pushes: the telemetry parts stay quiet (and off port 1881).
            "telemetry_intake": False,
            "host_metrics_interval": 0,
        }
        settings = AgentSettings(**options)
        agent = build_agent(settings)
        # The agent probes Node-RED's version every 30 s with a fresh httpx client (a new TLS
        # context each time, ~50 ms of CPU here): nothing on a machine, but ~2 cores for 1,000
        # agents sharing this host. It has nothing to do with pushes, so it is off here.
        setattr(agent, "_watch_node_red", _no_probe)  # noqa: B010
        agents.append(agent)
    built = time.monotonic() - mark
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 300
    for agent in agents:
        while not agent.connected.wait(1.0) and time.monotonic() < deadline:
            if stop.is_set():
                break
    print(
        f"harness {os.getpid()}: built {len(agents)} agents in {built:.1f}s, connected after "
        f"{time.monotonic() - mark:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    ready.put(sum(1 for a in agents if a.connected.is_set()))
    stop.wait()
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(timeout=15)
    if server is not None:
        server.shutdown()


# ---- the gateway side ------------------------------------------------------------------------


class _Sampler:
    """Peak RSS of a process, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _profile_all(pids: list[int], count: int) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PROFILE_DIR set: py-spy samples each gateway process over the push (raw
    collapsed stacks, one file per replica), to see where its CPU goes."""
    where = os.environ.get("BENCH_PROFILE_DIR")
    if not where:
        return []
    spy = str(Path(sys.executable).parent / "py-spy")
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "-r",
                "100",
                "-f",
                "raw",
                "-o",
                str(Path(where) / f"flow-push-{count}-gateway-{n}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n, pid in enumerate(pids)
    ]


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _enroll(http: httpx.Client, token: str, root: Path, count: int, urls: list[str]) -> list[str]:
    """Enroll `count` machines through `http`; machine i talks to ``urls[i % len(urls)]``."""

    def one(index: int) -> str:
        key = keys.generate_private_key()
        response = http.post(
            "/api/v1/enroll",
            json={
                "token": token,
                "public_key": keys.public_key_pem(key.public_key()),
                "name": f"m{index:04d}",
            },
        )
        response.raise_for_status()
        state = AgentState(root / f"agent-{index:04d}")
        state.directory.mkdir(parents=True)
        keys.write_private_key(state.key_path, key)
        state.save(urls[index % len(urls)], EnrollResponse.model_validate(response.json()))
        return str(state.directory)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def _bench_flows(label: str, nodes: int = 30) -> list[dict[str, Any]]:
    tab = f"tab-{label}"
    flows: list[dict[str, Any]] = [{"id": tab, "type": "tab", "label": label}]
    for i in range(nodes):
        flows.append(
            {
                "id": f"n{i}-{label}",
                "type": ("inject", "function", "change", "debug")[i % 4],
                "z": tab,
                "name": f"step {i}",
                "func": "return msg;",
                "x": 100 + 150 * (i % 6),
                "y": 40 + 60 * (i // 6),
                "wires": [[f"n{i + 1}-{label}"]] if i + 1 < nodes and i % 4 != 3 else [],
            }
        )
    return flows


@dataclass
class RunResult:
    agents: int
    node_red: str
    database: str
    replicas: int
    seconds: float
    state: str
    per_device: list[float]
    gateway_cpu: float
    gateway_rss_mb: float
    broker_cpu: float
    harness_cpu: float
    node_red_cpu: float
    node_red_rss_mb: float
    failures: dict[str, int]

    def line(self) -> str:
        pd = sorted(self.per_device) or [0.0]
        p95 = pd[min(len(pd) - 1, round(0.95 * (len(pd) - 1)))]
        return (
            f"{self.agents:>5} agents  {self.node_red:<28} {self.database:<10} "
            f"{'' if self.replicas == 0 else f'x{self.replicas} replicas  '}"
            f"push->all succeeded {self.seconds:6.2f} s  ({self.state}; per device sent->result "
            f"p50 {statistics.median(pd):.2f} s, p95 {p95:.2f} s, max {pd[-1]:.2f} s)  "
            f"gateway CPU {self.gateway_cpu:5.1f} s, peak RSS {self.gateway_rss_mb:5.0f} MB"
            f"{' (largest replica)' if self.replicas > 1 else ''}; "
            f"mosquitto CPU {self.broker_cpu:4.1f} s; agents' harness CPU {self.harness_cpu:5.1f} s"
            + (
                f"; Node-REDs' CPU {self.node_red_cpu:4.1f} s, RSS {self.node_red_rss_mb:.0f} MB"
                if self.node_red_rss_mb
                else ""
            )
        )


def _start_gateways(
    stack: contextlib.ExitStack, run_dir: Path, extra: list[str], replicas: int
) -> tuple[list[GatewayProcess], int]:
    """The gateway side and the pid of its broker: one gateway with its own Mosquitto
    (``replicas == 0``), or N replicas on one Mosquitto started here."""
    if replicas == 0:
        gateway = GatewayProcess(run_dir / "gateway", extra_args=extra)
        gateway.start(timeout=60)
        stack.callback(gateway.stop, check=False)
        return [gateway], gateway.broker_pid()
    broker = stack.enter_context(running_broker(run_dir / "broker"))
    cluster = stack.enter_context(gateway_cluster(run_dir, extra[1], broker, size=replicas))
    return cluster.replicas, broker.pid or 0


def run_one(
    count: int,
    real_max: int,
    per_worker: int,
    database: str,
    root: Path,
    log: Any,
    replicas: int = 0,
) -> RunResult:
    real = count <= real_max
    extra: list[str] = []
    pg_name = None
    if database == "postgresql":
        import psycopg

        pg_name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        extra = ["--db", PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{pg_name}"]
    run_dir = root / f"run-{count}"
    with contextlib.ExitStack() as stack:
        if pg_name is not None:

            def drop() -> None:
                import psycopg

                with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')

            stack.callback(drop)
        gateways, broker_pid = _start_gateways(stack, run_dir, extra, replicas)
        gateway = gateways[0]
        http = stack.enter_context(
            httpx.Client(
                base_url=gateway.url,
                headers={"Authorization": f"Bearer {gateway.admin_token}"},
                timeout=60,
            )
        )
        token = http.post(
            "/api/v1/provisioning-tokens", json={"uses": count, "ttl_seconds": 7200}
        ).json()["token"]
        log(f"[{count}] enrolling {count} machines")
        mark = time.monotonic()
        state_dirs = _enroll(http, token, run_dir, count, [g.url for g in gateways])
        log(f"[{count}] enrolled in {time.monotonic() - mark:.1f}s")

        node_reds: list[str | None] = [None] * count
        node_red_pids: list[int] = []
        if real:
            log(f"[{count}] starting {count} real Node-RED processes")
            managers = [start_node_red(run_dir / f"node-red-{i:04d}") for i in range(count)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(manager.__enter__) for manager in managers]
            errors = []
            for index, (manager, future) in enumerate(zip(managers, futures, strict=True)):
                try:
                    handle = future.result()
                    node_reds[index] = handle.url
                    node_red_pids.append(handle.pid)
                    stack.push(manager)  # stopped when the run ends
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise RuntimeError(f"{len(errors)} Node-RED(s) did not start: {errors[0]}")
        specs = [AgentSpec(d, nr) for d, nr in zip(state_dirs, node_reds, strict=True)]
        context = multiprocessing.get_context("spawn")
        ready = context.Queue()
        stop = context.Event()
        workers = max(1, -(-count // per_worker))
        slices = [specs[i::workers] for i in range(workers) if specs[i::workers]]
        harnesses = [context.Process(target=_harness, args=(s, ready, stop)) for s in slices]
        log(f"[{count}] starting agents in {len(harnesses)} harness process(es)")
        for process in harnesses:
            process.start()

        def stop_harnesses() -> None:
            stop.set()
            deadline = time.monotonic() + 30
            for process in harnesses:
                process.join(timeout=max(0.1, deadline - time.monotonic()))
            for process in harnesses:
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)

        stack.callback(stop_harnesses)
        mark = time.monotonic()
        connected = sum(ready.get(timeout=1800) for _ in harnesses)
        log(f"[{count}] {connected} agents connected in {time.monotonic() - mark:.1f}s")
        if connected != count:
            raise RuntimeError(
                f"only {connected} of {count} agents connected; look for 'removed stale broker "
                f"credentials' in {gateway.log_path} (an enrollment racing the credential sync)"
            )

        flows = _bench_flows(f"bench-{count}-{uuid.uuid4().hex[:6]}")
        release = http.post("/api/v1/flows/releases", json={"flows_json": json.dumps(flows)}).json()
        gateway_pids = [g.proc.pid for g in gateways if g.proc]
        harness_pids = [p.pid for p in harnesses if p.pid]
        cpu_before = sum(_cpu(pid) for pid in gateway_pids)
        broker_before = _cpu(broker_pid)
        harness_before = sum(_cpu(pid) for pid in harness_pids)
        node_red_before = sum(_cpu(pid) for pid in node_red_pids)
        log(f"[{count}] pushing")
        samplers = [stack.enter_context(_Sampler(pid)) for pid in gateway_pids]
        spies = _profile_all(gateway_pids, count)
        started = time.monotonic()
        deployment = http.post(
            "/api/v1/deployments",
            json={
                "release": release["digest"],
                "to": {"all": True},
                "timeout_seconds": 600,
                "max_failures": "100%",
            },
        ).json()
        while True:
            summary = http.get("/api/v1/deployments", params={"limit": 1}).json()[0]
            if summary["counts"].get("succeeded", 0) == count or summary["state"] != "running":
                break
            time.sleep(0.25)
        seconds = time.monotonic() - started
        for sampler in samplers:
            sampler.close()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        gateway_cpu = sum(_cpu(pid) for pid in gateway_pids) - cpu_before
        broker_cpu = _cpu(broker_pid) - broker_before
        harness_cpu = sum(_cpu(pid) for pid in harness_pids) - harness_before
        node_red_cpu = sum(_cpu(pid) for pid in node_red_pids) - node_red_before
        node_red_rss = sum(psutil.Process(pid).memory_info().rss for pid in node_red_pids)
        final = http.get(f"/api/v1/deployments/{deployment['id']}").json()
        error_counts: dict[str, int] = {}
        for device in final["devices"]:
            if device["error"]:
                key = device["error"][:160]
                error_counts[key] = error_counts.get(key, 0) + 1
        for error, times in sorted(error_counts.items(), key=lambda item: -item[1])[:5]:
            log(f"[{count}] {times} device(s): {error}")
        while final["state"] == "running" and time.monotonic() - started < seconds + 30:
            time.sleep(0.2)  # the scheduler marks the deployment done at its next tick
            final = http.get(f"/api/v1/deployments/{deployment['id']}").json()
        failures = {s: n for s, n in final["counts"].items() if s != "succeeded"}
        return RunResult(
            agents=count,
            node_red=f"real Node-RED x{count}" if real else "Admin API stand-in",
            database=database,
            replicas=replicas,
            seconds=seconds,
            state=final["state"],
            per_device=[d["seconds"] for d in final["devices"] if d["seconds"] is not None],
            gateway_cpu=gateway_cpu,
            gateway_rss_mb=max(sampler.peak for sampler in samplers) / 1e6,
            broker_cpu=broker_cpu,
            harness_cpu=harness_cpu,
            node_red_cpu=node_red_cpu,
            node_red_rss_mb=node_red_rss / 1e6,
            failures=failures,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument(
        "--real-node-red-max",
        type=int,
        default=100,
        help="up to this many agents each get a real Node-RED; above, the Admin API stand-in",
    )
    parser.add_argument(
        "--per-worker",
        type=int,
        default=10,
        help="agents per harness process: at most ~100 (paho-mqtt's select() cannot watch file "
        "descriptors above 1023 and each agent holds several); fewer threads per process "
        "contend less for the GIL (10: 1,000 agents in 100 processes, ~6 GB)",
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--replicas",
        default="0",
        help="gateway replicas on PostgreSQL sharing one Mosquitto, comma-separated to compare "
        "(e.g. 1,2,3); 0 (default): one gateway with its own supervised Mosquitto",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line per run")
    args = parser.parse_args()
    replica_counts = [int(x) for x in args.replicas.split(",")]
    if any(replica_counts) and args.db != "postgresql":
        parser.error("--replicas needs --db postgresql (SQLite is one replica)")
    logging.basicConfig(level=logging.WARNING)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-flow-bench-") as tmp:
        for replicas in replica_counts:
            for count in (int(x) for x in args.agents.split(",")):
                run_root = Path(tmp) / f"replicas-{replicas}"
                result = run_one(
                    count, args.real_node_red_max, args.per_worker, args.db, run_root, log,
                    replicas,
                )  # fmt: skip
                results.append(result)
                log(result.line())
    print(
        f"flow push bench on {os.cpu_count()} CPU(s); agents are real edge agents (threads, "
        f"{args.per_worker} per harness process); Node-RED: real up to {args.real_node_red_max} "
        "machines, a minimal Admin API stand-in above that"
    )
    for result in results:
        print(result.line())
        if result.failures:
            print(f"      not succeeded: {result.failures}")
        if args.json:
            print(json.dumps({k: v for k, v in vars(result).items() if k != "per_device"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
