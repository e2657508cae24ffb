"""The docker compose layouts: valid for docker-compose, and wired the way the README says.

There is no Docker engine on the development machines, so nothing here starts a container.
docker-compose (1.29, Debian's) validates each file with `config -q`, and the rest is checked by
reading the YAML and the configuration files the services mount: the things that would break a
deployment silently (a gateway without a health check, a database without a volume, an EMQX node
missing from the seeds, a broker hook pointing nowhere, a secret with a default).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import GatewaySettings
from provisioning.device_input import MAX_MQTT_PACKET_BYTES

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"
LAYOUTS = ["single-node", "cluster"]
GATEWAY_IMAGE = "edgefleet/gateway"
# The gateway's settings, as the README documents them.
# Every variable the gateway reads: its settings fields (a compose file may use no other).
GATEWAY_ENV = {f"EDGEFLEET_{name.upper()}" for name in GatewaySettings.model_fields}
REQUIRED_VAR = re.compile(r"\$\{(\w+):\?")
DEFAULTED_VAR = re.compile(r"\$\{\w+:-([^}]*)\}")
MOUNT = re.compile(r"^(?P<source>.+):(?P<target>/[^:]*)(?::(?:ro|rw))?$")


def compose_file(layout: str) -> Path:
    return COMPOSE / layout / "docker-compose.yml"


def load(layout: str) -> dict[str, Any]:
    data = yaml.safe_load(compose_file(layout).read_text())
    assert isinstance(data, dict)
    return data


def services(layout: str) -> dict[str, dict[str, Any]]:
    result = load(layout)["services"]
    assert isinstance(result, dict)
    return result


def gateways(layout: str) -> dict[str, dict[str, Any]]:
    found = {
        name: svc
        for name, svc in services(layout).items()
        if str(svc.get("image", "")).startswith(GATEWAY_IMAGE + ":")
    }
    assert found, f"{layout}: no service runs the {GATEWAY_IMAGE} image"
    return found


def required_vars(layout: str) -> set[str]:
    return set(REQUIRED_VAR.findall(compose_file(layout).read_text()))


def published_ports(svc: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address it is published on ("" for all addresses)."""
    result: dict[int, str] = {}
    for spec in svc.get("ports", []):
        parts = str(spec).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        result[int(parts[-1])] = host_ip
    return result


def with_defaults(value: str) -> str:
    """`value` with every ${VAR:-default} replaced by its default, as compose does when unset."""
    return DEFAULTED_VAR.sub(lambda m: m.group(1), value)


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source (a named volume or a path relative to the compose file)."""
    result = {}
    for spec in svc.get("volumes", []):
        match = MOUNT.match(str(spec))
        assert match, f"cannot read the volume {spec!r}"
        result[match["target"]] = with_defaults(match["source"])
    return result


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    assert isinstance(env, dict), "use the mapping form for environment"
    return {str(k): str(v) for k, v in env.items()}


def nginx_conf(layout: str) -> str:
    return (COMPOSE / layout / "nginx" / "nginx.conf").read_text()


def _block_at(conf: str, start: int) -> str:
    """The text from `start` to the brace that closes the first block opened after it."""
    depth = 0
    for i in range(conf.index("{", start), len(conf)):
        depth += {"{": 1, "}": -1}.get(conf[i], 0)
        if depth == 0:
            return conf[start : i + 1]
    raise AssertionError("unbalanced braces in nginx.conf")


def nginx_block(conf: str, header: str) -> str:
    """The first `header { ... }` block, e.g. nginx_block(conf, "stream {")."""
    return _block_at(conf, conf.index(header))


def nginx_servers(conf: str) -> list[str]:
    return [_block_at(conf, m.start()) for m in re.finditer(r"^\s*server\s*\{", conf, re.MULTILINE)]


# --- docker-compose itself ------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh installs Debian's)")
    return binary


def run_config(
    docker_compose: str, layout: str, env_file: Path
) -> subprocess.CompletedProcess[str]:
    # --env-file keeps a developer's own compose/<layout>/.env out of the test, and the minimal
    # environment keeps the caller's variables out of the interpolation.
    return subprocess.run(
        [
            docker_compose,
            "--env-file",
            str(env_file),
            "-f",
            str(compose_file(layout)),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(env_file.parent)},
        timeout=60,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_docker_compose_accepts_the_layout(
    docker_compose: str, layout: str, tmp_path: Path
) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}=test0secret\n" for name in sorted(required_vars(layout))))
    result = run_config(docker_compose, layout, env_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_secret_must_be_set_explicitly(
    docker_compose: str, layout: str, tmp_path: Path
) -> None:
    """No secret has a default: with an empty .env, compose refuses and says what to set."""
    names = required_vars(layout)
    assert "POSTGRES_PASSWORD" in names
    assert "EDGEFLEET_PUBLIC_HOST" in names
    for missing in sorted(names):
        env_file = tmp_path / f"env-{missing}"
        env_file.write_text("".join(f"{n}=test0secret\n" for n in sorted(names - {missing})))
        result = run_config(docker_compose, layout, env_file)
        assert result.returncode != 0, f"{layout} starts without {missing}"
        assert missing in result.stderr and ".env" in result.stderr, result.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_env_example_names_every_required_variable(layout: str) -> None:
    example = (COMPOSE / layout / ".env.example").read_text()
    defined = set(re.findall(r"^#?\s*(\w+)=", example, re.MULTILINE))
    assert required_vars(layout) <= defined, required_vars(layout) - defined


# --- what every layout needs ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gateway_has_a_healthcheck_on_healthz(layout: str) -> None:
    for name, svc in gateways(layout).items():
        check = svc.get("healthcheck")
        assert check, f"{layout}/{name} has no healthcheck"
        assert "/healthz" in " ".join(check["test"]), f"{layout}/{name}: {check['test']}"
        port = env_of(svc)["EDGEFLEET_HTTP"].rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}/healthz" in " ".join(check["test"]), (
            f"{layout}/{name} checks another port than EDGEFLEET_HTTP's {port}"
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gateways_are_built_from_this_repository(layout: str) -> None:
    for name, svc in gateways(layout).items():
        build = svc["build"]
        context = (COMPOSE / layout / build["context"]).resolve()
        assert context == REPO, f"{layout}/{name} builds from {context}"
        assert (context / build["dockerfile"]).is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_postgres_keeps_its_data_in_a_named_volume(layout: str) -> None:
    data = load(layout)
    pg = data["services"]["postgres"]
    assert pg["image"].startswith("postgres:16")
    source = mounts(pg).get("/var/lib/postgresql/data")
    assert source in data["volumes"], f"{layout}: postgres data is not in a named volume"
    assert pg.get("healthcheck"), f"{layout}: postgres has no healthcheck"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gateway_data_dir_is_a_named_volume(layout: str) -> None:
    data = load(layout)
    for name, svc in gateways(layout).items():
        data_dir = env_of(svc)["EDGEFLEET_DATA_DIR"]
        source = mounts(svc).get(data_dir)
        assert source in data["volumes"], f"{layout}/{name}: {data_dir} is not a named volume"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_images_are_pinned(layout: str) -> None:
    for name, svc in services(layout).items():
        image = with_defaults(str(svc["image"]))
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.match(r"\d", tag), (
            f"{layout}/{name}: {image} is not pinned"
        )
        if not repo.startswith(GATEWAY_IMAGE):
            assert "$" not in str(svc["image"]), (
                f"{layout}/{name}: third-party image from a variable"
            )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gateway_settings_use_the_documented_names(layout: str) -> None:
    readme = (REPO / "README.md").read_text()
    used_anywhere: set[str] = set()
    for name, svc in gateways(layout).items():
        used = {k for k in env_of(svc) if k.startswith("EDGEFLEET_")}
        assert used <= GATEWAY_ENV, f"{layout}/{name}: not a gateway setting {used - GATEWAY_ENV}"
        used_anywhere |= used
    for variable in used_anywhere:
        assert variable in readme, f"README.md does not document {variable}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_proxy_terminates_tls_for_https(layout: str) -> None:
    proxy = services(layout)["proxy"]
    assert published_ports(proxy).get(443) == "", f"{layout}: proxy does not publish 443"
    proxy_mounts = mounts(proxy)
    assert (COMPOSE / layout / proxy_mounts["/etc/nginx/nginx.conf"]).resolve() == (
        COMPOSE / layout / "nginx" / "nginx.conf"
    )
    assert proxy_mounts["/etc/nginx/certs"] == "./certs"
    https = [s for s in nginx_servers(nginx_conf(layout)) if "listen 443 ssl" in s]
    assert len(https) == 1
    assert "ssl_certificate /etc/nginx/certs/fullchain.pem;" in https[0]
    assert "TLSv1.2 TLSv1.3" in https[0]
    assert "proxy_pass http://" in https[0]
    # The broker hooks are never served to the internet.
    assert re.search(r"location /api/v1/broker/ \{\s*return 404;", https[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_the_proxy_mqtt_and_tunnels_are_published_to_the_world(layout: str) -> None:
    for name, svc in services(layout).items():
        allowed = {80, 443, 8883} if name == "proxy" else set()
        if name in gateways(layout):
            allowed = {51820} | {int(p) for p in [env_of(svc).get("EDGEFLEET_MQTT_PORT")] if p}
        for port, host_ip in published_ports(svc).items():
            assert port in allowed or host_ip == "127.0.0.1", (
                f"{layout}/{name} publishes {port} to every address"
            )


def depends(layout: str, name: str) -> set[str]:
    """Every service that `name` waits for, directly or not."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dep in services(layout)[todo.pop()].get("depends_on", {}):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("layout", LAYOUTS)
def test_start_order_has_no_cycle_through_a_gateway(layout: str) -> None:
    """What a gateway needs before it can answer /healthz never waits for a gateway."""
    for name, svc in gateways(layout).items():
        assert name not in depends(layout, name), f"{layout}: {name} waits for itself"
        needs = {"postgres"}
        mqtt_url = env_of(svc).get("EDGEFLEET_MQTT_URL")
        if mqtt_url:
            needs.add(service_behind(layout, mqtt_host(mqtt_url)))
        for dep in needs:
            assert dep in depends(layout, name), f"{layout}: {name} does not wait for {dep}"
            assert not depends(layout, dep) & set(gateways(layout)), (
                f"{layout}: {dep}, which {name} needs to start, waits for a gateway"
            )


def mqtt_host(url: str) -> str:
    match = re.fullmatch(r"mqtts?://[^@]+@(?P<host>[^:/]+):\d+", url)
    assert match, f"cannot read the MQTT URL {url!r}"
    return match["host"]


def service_behind(layout: str, host: str) -> str:
    """The service that a host name reaches inside the compose network."""
    for name, svc in services(layout).items():
        aliases = (svc.get("networks") or {}).get("default", {}).get("aliases", [])
        if host == name or host in aliases or host == svc.get("hostname"):
            return name
    raise AssertionError(f"{host!r} names no service of {layout}")


# --- single node ------------------------------------------------------------------------------


def test_single_node_publishes_the_embedded_brokers_tls_port() -> None:
    """The gateway's Mosquitto serves TLS with the CA machines pin: nothing may terminate it."""
    (gateway,) = gateways("single-node").values()
    env = env_of(gateway)
    assert "EDGEFLEET_MQTT_URL" not in env
    mqtt_port = int(env["EDGEFLEET_MQTT_PORT"])
    assert published_ports(gateway).get(mqtt_port) == ""
    conf = nginx_conf("single-node")
    assert "stream {" not in conf
    http_port = env["EDGEFLEET_HTTP"].rsplit(":", 1)[1]
    assert f"server gateway:{http_port};" in nginx_block(conf, "upstream gateway_http {")


# --- cluster -----------------------------------------------------------------------------------


def emqx_nodes() -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in services("cluster").items() if str(s["image"]).startswith("emqx/emqx:")
    }


def test_cluster_emqx_nodes_name_each_other_as_seeds() -> None:
    nodes = emqx_nodes()
    assert len(nodes) == 3
    names = {}
    for service, svc in nodes.items():
        env = env_of(svc)
        node_name = env["EMQX_NODE__NAME"]
        host = node_name.split("@", 1)[1]
        # Erlang long names: the host part must resolve to this container.
        assert "." in host and svc["hostname"] == host
        assert service_behind("cluster", host) == service
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        names[service] = node_name
    for service, svc in nodes.items():
        seeds = env_of(svc)["EMQX_CLUSTER__STATIC__SEEDS"].strip("[]").split(",")
        assert {s.strip() for s in seeds} == set(names.values()), f"{service} seeds {seeds}"
        assert "${EMQX_COOKIE:?" in env_of(svc)["EMQX_NODE__COOKIE"]


def test_cluster_emqx_asks_the_gateway_through_http_hooks() -> None:
    conf_path = COMPOSE / "cluster" / "emqx" / "emqx.conf"
    for service, svc in emqx_nodes().items():
        node_mounts = mounts(svc)
        assert (COMPOSE / "cluster" / node_mounts["/opt/emqx/etc/emqx.conf"]).resolve() == conf_path
        assert node_mounts["/opt/emqx/data"] in load("cluster")["volumes"], service
    conf = conf_path.read_text()
    authn = re.search(r'url = "http://([\w.-]+):(\d+)/api/v1/broker/authn"', conf)
    authz = re.search(r'url = "http://([\w.-]+):(\d+)/api/v1/broker/authz"', conf)
    assert authn and authz
    assert authn.groups() == authz.groups() == ("proxy", "8080")
    assert re.search(r"no_match\s*=\s*deny", conf)
    # The broker refuses a packet over the size the gateway accepts (plus topic and properties).
    limit = re.search(r'max_packet_size = "(\d+)KB"', conf)
    assert limit and int(limit.group(1)) * 1024 == MAX_MQTT_PACKET_BYTES
    # The replicas' service account comes first: they connect before any hook can answer.
    assert conf.index("backend = built_in_database") < conf.index("backend = http")
    # nginx serves the hooks on an internal listener that is not published, balanced over
    # the gateway replicas.
    assert 8080 not in published_ports(services("cluster")["proxy"])
    internal = [s for s in nginx_servers(nginx_conf("cluster")) if "listen 8080;" in s]
    assert len(internal) == 1
    assert re.search(r"location /api/v1/broker/ \{\s*proxy_pass http://gateways;", internal[0])


def test_cluster_proxy_balances_over_every_replica_and_node() -> None:
    conf = nginx_conf("cluster")
    replicas = gateways("cluster")
    assert len(replicas) == 3
    upstream = nginx_block(conf, "upstream gateways {")
    assert set(re.findall(r"server ([\w.-]+):8080", upstream)) == set(replicas)
    for svc in replicas.values():
        assert env_of(svc)["EDGEFLEET_HTTP"].endswith(":8080")
    brokers = nginx_block(conf, "upstream emqx {")
    hosts = set(re.findall(r"server ([\w.-]+):1883", brokers))
    assert hosts == {s["hostname"] for s in emqx_nodes().values()}
    mqtts = [s for s in nginx_servers(conf) if "listen 8883 ssl" in s]
    assert len(mqtts) == 1 and "proxy_pass emqx;" in mqtts[0]
    assert "ssl_certificate /etc/nginx/certs/fullchain.pem;" in mqtts[0]
    assert published_ports(services("cluster")["proxy"]).get(8883) == ""


def test_cluster_replicas_share_one_data_dir_and_reach_emqx_like_machines() -> None:
    replicas = gateways("cluster")
    volumes = {tuple(svc["volumes"]) for svc in replicas.values()}
    assert len(volumes) == 1, "replicas must share the CA and signing key"
    for name, svc in replicas.items():
        env = env_of(svc)
        assert "EDGEFLEET_MQTT_PORT" not in env, f"{name} would start an embedded broker"
        # Machines are told the host, port and TLS the gateway itself uses: the public name,
        # which inside the network is nginx's TLS listener.
        url = env["EDGEFLEET_MQTT_URL"]
        assert url.startswith("mqtts://") and url.endswith(":8883")
        assert mqtt_host(url) == "${EDGEFLEET_PUBLIC_HOST}"
        assert service_behind("cluster", mqtt_host(url)) == "proxy"
        ca_file = Path(env["EDGEFLEET_MQTT_CA_FILE"])
        assert mounts(svc)[str(ca_file.parent)] == "./certs"
        assert "${POSTGRES_PASSWORD:?" in env["EDGEFLEET_DB_URL"]
    # Only the first replica creates the data dir: the others wait for it to be healthy.
    for name in ("gateway-2", "gateway-3"):
        assert replicas[name]["depends_on"]["gateway-1"]["condition"] == "service_healthy"


# --- the image --------------------------------------------------------------------------------


def test_dockerfile_installs_every_package_with_the_gateway_extra() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.MULTILINE)
    assert "pip install --no-cache-dir '.[gateway]'" in dockerfile
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "gateway" in pyproject["project"]["optional-dependencies"]
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", dockerfile, re.MULTILINE))
    assert set(packages) == copied, f"the image copies {copied}, the distribution has {packages}"
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    for package in packages:
        assert f"!{package}/" in ignore
    assert '["edgefleet"]' in dockerfile and '["gateway", "run"]' in dockerfile


# --- Grafana -------------------------------------------------------------------------------

GRAFANA = COMPOSE / "grafana"


def grafana_datasource() -> dict[str, Any]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "edgefleet.yml").read_text())
    (source,) = doc["datasources"]
    assert isinstance(source, dict)
    return source


def fleet_dashboard() -> dict[str, Any]:
    doc = json.loads((GRAFANA / "dashboards" / "fleet.json").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grafana_reads_edgefleets_database_read_only(layout: str) -> None:
    svc = services(layout)
    grafana, postgres = svc["grafana"], svc["postgres"]
    assert "postgres" in grafana["depends_on"]
    source = grafana_datasource()
    assert source["type"] == "grafana-postgresql-datasource"
    assert source["url"] == "postgres:5432"
    assert source["jsonData"]["database"] == env_of(postgres)["POSTGRES_DB"]
    # Its password comes from the environment compose gives Grafana, and the same variable
    # makes the role in the database; nothing is written in a file.
    assert source["user"] == "grafana_reader"
    assert source["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    assert "GRAFANA_DB_PASSWORD:?" in env_of(grafana)["GRAFANA_DB_PASSWORD"]
    assert env_of(grafana)["GRAFANA_DB_PASSWORD"] == env_of(postgres)["GRAFANA_DB_PASSWORD"]
    init = mounts(postgres)
    script = next(s for t, s in init.items() if t.startswith("/docker-entrypoint-initdb.d/"))
    text = (COMPOSE / layout / script).resolve().read_text()
    assert "CREATE ROLE grafana_reader LOGIN PASSWORD :'password'" in text
    assert "GRANT pg_read_all_data TO grafana_reader" in text  # read, never write
    assert "GF_SECURITY_ADMIN_PASSWORD" in env_of(grafana)
    assert "GRAFANA_ADMIN_PASSWORD:?" in env_of(grafana)["GF_SECURITY_ADMIN_PASSWORD"]
    assert published_ports(grafana) == {3000: "127.0.0.1"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grafana_provisions_the_fleet_dashboard(layout: str) -> None:
    grafana = services(layout)["grafana"]
    where = {
        target: (COMPOSE / layout / source).resolve() for target, source in mounts(grafana).items()
    }
    assert where["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "edgefleet.yml").read_text()
    )["providers"][0]
    dashboards = where[provider["options"]["path"]]
    assert (dashboards / "fleet.json").is_file()
    uid = grafana_datasource()["uid"]
    board = fleet_dashboard()
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def _grafana_sql(sql: str, values: dict[str, str]) -> str:
    """A panel's query as Grafana sends it: variables and the time-range macros filled in."""
    for name, value in values.items():
        sql = sql.replace(name, value)
    assert "$" not in sql, sql
    return sql


@pytest.mark.postgres
def test_the_dashboards_queries_run_on_edgefleets_schema(pg_database: str) -> None:
    """Every query of the dashboard runs against the migrated schema, and the metric chart
    gives the numbers the gateway's own API gives (compacted, rolled up and raw samples)."""
    from gateway.db import make_engine, migrate
    from gateway.telemetry import queries
    from gateway.telemetry.compaction import Compactor
    from gateway.telemetry.store import IncomingBatch, TelemetryStore
    from provisioning.telemetry import Sample
    from tests.support.telemetry import add_device

    engine = make_engine(GatewaySettings(db_url=pg_database).database_url)
    migrate(engine)
    try:
        add_device(engine, "press-07")
        start = 1_700_002_800.0
        rows = [
            Sample("temp", start + s + 0.25, round(20 + (s % 37) * 0.01, 2)) for s in range(7200)
        ]
        store = TelemetryStore(engine)
        store.write([IncomingBatch("press-07", 1, rows[:3600])], start)
        Compactor(engine, compact_after=60).run_once(now=start + 3 * 3600)  # the first hour
        store.write([IncomingBatch("press-07", 2, rows[3600:])], start)  # the second: raw
        values = {
            "$device": "press-07",
            "$metric": "temp",
            "$__unixEpochFrom()": str(int(start)),
            "$__unixEpochTo()": str(int(start) + 7200),
        }
        board = fleet_dashboard()
        sql = [t["rawSql"] for p in board["panels"] for t in p["targets"]]
        sql += [v["query"] for v in board["templating"]["list"]]
        results = {}
        with engine.connect() as conn:
            for text in sql:
                results[text] = conn.exec_driver_sql(_grafana_sql(text, values)).all()
            expected = queries.buckets(conn, "press-07", "temp", start, start + 7200, 60)
        chart = next(r for t, r in results.items() if "telemetry_rollups_1m" in t)
        assert [(row[0].timestamp(), row[2], row[3]) for row in chart] == [
            (b.start, b.min, b.max) for b in expected
        ]
        assert [row[1] for row in chart] == pytest.approx([b.avg for b in expected], rel=1e-12)
        assert len(chart) == 120
        metrics = next(r for t, r in results.items() if "SELECT metric FROM" in t)
        assert metrics == [("temp",)]
    finally:
        engine.dispose()
