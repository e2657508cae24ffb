"""The device-side flow deployer against a real Node-RED (from npm, on a free loopback port).

One Node-RED serves the module (its npm registry points at a closed port, so any module
install that worked did so without a registry); a second one runs with adminAuth. Every test
resets the flows first and keeps its deployer state in its own tmp dir.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.deploy.deployer import DirectoryModuleSource, FlowDeployer, tarball_name
from edge_agent.deploy.store import DeployResult
from edge_agent.node_red import (
    NodeRedAuthError,
    NodeRedClient,
    NodeRedError,
    NodeRedUnavailable,
    RevisionConflict,
)
from provisioning.bundles import CORE_NODE_TYPES, Bundle, ModuleRef
from tests.support.node_red import (
    NodeRedHandle,
    admin_headers,
    flows_for,
    get_flows,
    set_flows,
    start_node_red,
)
from tests.support.waiting import free_port

pytestmark = pytest.mark.nodered

ADMIN_PASSWORD = "correct horse battery staple"


def bundle_of(label: str, *extra_types: str, modules: tuple[ModuleRef, ...] = ()) -> Bundle:
    return Bundle(flows=flows_for(label, *extra_types), modules=modules)


def new_id() -> str:
    return f"dep-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def node_red(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRedHandle]:
    dead_registry = f"http://127.0.0.1:{free_port()}/"
    with start_node_red(
        tmp_path_factory.mktemp("node-red"),
        env={"npm_config_registry": dead_registry, "NPM_CONFIG_REGISTRY": dead_registry},
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def auth_node_red(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRedHandle]:
    with start_node_red(
        tmp_path_factory.mktemp("node-red-auth"), admin_password=ADMIN_PASSWORD
    ) as handle:
        yield handle


@pytest.fixture
def baseline(node_red: NodeRedHandle) -> tuple[str, list[dict[str, Any]]]:
    """Reset Node-RED to a known flow for each test; return its (rev, flows)."""
    flows = flows_for("baseline")
    rev = set_flows(node_red, flows)
    return rev, flows


@pytest.fixture
def client(node_red: NodeRedHandle) -> Iterator[NodeRedClient]:
    with NodeRedClient(node_red.url) as c:
        yield c


def test_core_node_types_match_what_node_red_registers(node_red: NodeRedHandle) -> None:
    sets = httpx.get(
        f"{node_red.url}/nodes", headers={"Accept": "application/json"}, timeout=10
    ).json()
    core = {t for s in sets if s["module"] == "node-red" for t in s["types"]}
    assert core == CORE_NODE_TYPES


def test_client_reads_deploys_and_refuses_a_stale_rev(
    node_red: NodeRedHandle, client: NodeRedClient, baseline: tuple[str, list[dict[str, Any]]]
) -> None:
    rev, flows = client.get_flows()
    assert (rev, flows) == baseline
    new_flows = flows_for("client")
    new_rev = client.deploy(new_flows, rev)
    assert new_rev != rev
    assert get_flows(node_red) == (new_rev, new_flows)

    with pytest.raises(RevisionConflict) as caught:
        client.deploy(flows_for("stale"), rev)
    assert caught.value.status == 409
    assert "version_mismatch" in (caught.value.body or "")
    assert get_flows(node_red) == (new_rev, new_flows)
    assert {"inject", "debug"} <= client.list_node_types()
    assert client.list_modules()["node-red"]
    assert client.runtime_state() == "start"


def test_deploy_and_read_back(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployer = FlowDeployer(client, tmp_path / "state")
    bundle = bundle_of("first")
    steps: list[tuple[str, str | None]] = []
    result = deployer.apply(new_id(), bundle, progress=lambda s, d: steps.append((s, d)))

    assert result.status == "succeeded", result.error
    assert result.error is None
    assert result.bundle_digest == bundle.digest
    assert get_flows(node_red) == (result.rev, bundle.flows)
    assert [s for s, _ in steps] == ["installing", "applying", "verifying"]
    good = deployer.last_known_good()
    assert good is not None and good.rev == result.rev and good.flows == bundle.flows

    # A second release replaces the first.
    second = deployer.apply(new_id(), bundle_of("second"))
    assert second.status == "succeeded", second.error
    assert get_flows(node_red) == (second.rev, bundle_of("second").flows)


def test_a_broken_progress_reporter_does_not_break_the_deploy(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    def broken(step: str, detail: str | None) -> None:
        raise ConnectionError("MQTT is down")

    result = FlowDeployer(client, tmp_path).apply(new_id(), bundle_of("p"), progress=broken)
    assert result.status == "succeeded"
    assert get_flows(node_red)[1] == bundle_of("p").flows


def test_unknown_node_type_rolls_back_to_the_previous_flows(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployer = FlowDeployer(client, tmp_path)
    good = deployer.apply(new_id(), bundle_of("good"))
    assert good.status == "succeeded"

    bad = deployer.apply(new_id(), bundle_of("bad", "no-such-node"))

    assert bad.status == "rolled_back"
    assert bad.error is not None and "no-such-node" in bad.error
    assert bad.rev == good.rev
    assert get_flows(node_red) == (good.rev, bundle_of("good").flows)
    last_good = deployer.last_known_good()
    assert last_good is not None and last_good.flows == bundle_of("good").flows
    # Rolled back means nothing is out of step: the next release deploys without drift.
    after = deployer.apply(new_id(), bundle_of("after"))
    assert after.status == "succeeded", after.error


def test_the_first_deploy_takes_the_machines_flows_as_baseline(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployer = FlowDeployer(client, tmp_path)
    assert deployer.last_known_good() is None
    result = deployer.apply(new_id(), bundle_of("bad", "no-such-node"))
    assert result.status == "rolled_back"
    assert get_flows(node_red) == baseline


def test_drift_is_reported_and_force_overrides(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployer = FlowDeployer(client, tmp_path)
    assert deployer.apply(new_id(), bundle_of("ours")).status == "succeeded"
    # Someone at the machine deploys from the editor.
    local_flows = flows_for("edited-on-site")
    local_rev = set_flows(node_red, local_flows)

    drift = deployer.apply(new_id(), bundle_of("next"))
    assert drift.status == "drift"
    assert drift.error is not None and "changed on the machine" in drift.error
    assert drift.rev == local_rev
    assert get_flows(node_red) == (local_rev, local_flows)

    forced = deployer.apply(new_id(), bundle_of("next"), force=True)
    assert forced.status == "succeeded", forced.error
    assert get_flows(node_red) == (forced.rev, bundle_of("next").flows)


def test_a_failed_forced_deploy_restores_the_flows_found_on_the_machine(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployer = FlowDeployer(client, tmp_path)
    assert deployer.apply(new_id(), bundle_of("ours")).status == "succeeded"
    local_flows = flows_for("edited-on-site")
    local_rev = set_flows(node_red, local_flows)
    result = deployer.apply(new_id(), bundle_of("bad", "no-such-node"), force=True)
    assert result.status == "rolled_back"
    assert get_flows(node_red) == (local_rev, local_flows)


class EditsBeforeDeploy(NodeRedClient):
    """A real concurrent edit: someone deploys from the editor between our read and our write."""

    def __init__(self, handle: NodeRedHandle, edit: list[dict[str, Any]]) -> None:
        super().__init__(handle.url)
        self.handle = handle
        self.edit: list[dict[str, Any]] | None = edit

    def deploy(self, flows: list[dict[str, Any]], rev: str) -> str:
        if self.edit is not None:
            set_flows(self.handle, self.edit)
            self.edit = None
        return super().deploy(flows, rev)


def test_a_conflict_while_deploying_is_drift_and_changes_nothing(
    node_red: NodeRedHandle,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    edit = flows_for("concurrent")
    with EditsBeforeDeploy(node_red, edit) as racing:
        result = FlowDeployer(racing, tmp_path).apply(new_id(), bundle_of("mine"))
    assert result.status == "drift"
    assert result.error is not None and "409" in result.error
    assert get_flows(node_red)[1] == edit


def test_a_forced_deploy_wins_a_conflict(
    node_red: NodeRedHandle,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    with EditsBeforeDeploy(node_red, flows_for("concurrent")) as racing:
        result = FlowDeployer(racing, tmp_path).apply(new_id(), bundle_of("mine"), force=True)
    assert result.status == "succeeded", result.error
    assert get_flows(node_red) == (result.rev, bundle_of("mine").flows)


def test_a_duplicate_deployment_id_deploys_once(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployment_id = new_id()
    first = FlowDeployer(client, tmp_path).apply(deployment_id, bundle_of("once"))
    assert first.status == "succeeded"

    # The same command again, even from a restarted agent and with other content, changes
    # nothing: Node-RED keeps the first deploy's rev and flows.
    restarted = FlowDeployer(client, tmp_path)
    steps: list[str] = []
    again = restarted.apply(
        deployment_id, bundle_of("twice"), progress=lambda s, d: steps.append(s)
    )
    assert again == first
    assert steps == []
    assert get_flows(node_red) == (first.rev, bundle_of("once").flows)
    assert restarted.stored_result(deployment_id) == first


class Crash(BaseException):
    """Stands for the agent process dying."""


class DiesAfterDeploy(NodeRedClient):
    def deploy(self, flows: list[dict[str, Any]], rev: str) -> str:
        super().deploy(flows, rev)
        raise Crash


def test_an_interrupted_deploy_is_recognised_as_our_own_write(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    deployment_id = new_id()
    with DiesAfterDeploy(node_red.url) as dying, pytest.raises(Crash):
        FlowDeployer(dying, tmp_path).apply(deployment_id, bundle_of("interrupted"))
    assert get_flows(node_red)[1] == bundle_of("interrupted").flows

    # The redelivered command finishes the job instead of reporting drift.
    result = FlowDeployer(client, tmp_path).apply(deployment_id, bundle_of("interrupted"))
    assert result.status == "succeeded", result.error
    assert get_flows(node_red) == (result.rev, bundle_of("interrupted").flows)


def make_module_tarball(directory: Path, name: str, node_type: str, version: str) -> Path:
    """Build a real installable Node-RED node package with `npm pack` (no network)."""
    package = directory / f"src-{name}-{version}"
    package.mkdir(parents=True)
    (package / "package.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": version,
                "description": "edgefleet test node",
                "license": "Apache-2.0",
                "keywords": ["node-red"],
                "node-red": {"version": ">=3.0.0", "nodes": {node_type: "node.js"}},
            }
        )
    )
    (package / "node.js").write_text(
        "module.exports = function (RED) {\n"
        "  function Node(config) {\n"
        "    RED.nodes.createNode(this, config);\n"
        "    this.on('input', (msg, send, done) => { send(msg); done(); });\n"
        "  }\n"
        f"  RED.nodes.registerType({json.dumps(node_type)}, Node);\n"
        "};\n"
    )
    (package / "node.html").write_text(
        '<script type="text/javascript">\n'
        f"RED.nodes.registerType({json.dumps(node_type)}, {{category: 'function', "
        "defaults: {name: {value: ''}}, inputs: 1, outputs: 1});\n"
        "</script>\n"
    )
    out = directory / "tarballs"
    out.mkdir(exist_ok=True)
    subprocess.run(
        ["npm", "pack", "--offline", "--pack-destination", str(out)],
        cwd=package,
        check=True,
        capture_output=True,
        timeout=120,
    )
    tarball = out / tarball_name(name, version)
    assert tarball.is_file(), f"npm pack did not produce {tarball}"
    return tarball


def test_module_install_from_a_local_tarball_without_a_registry(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    name, node_type = f"node-red-contrib-edgefleet-test-{suffix}", f"ef-echo-{suffix}"
    tarball = make_module_tarball(tmp_path, name, node_type, "1.0.0")
    assert node_type not in client.list_node_types()

    deployer = FlowDeployer(client, tmp_path / "state", DirectoryModuleSource(tarball.parent))
    bundle = bundle_of("with-module", node_type, modules=(ModuleRef(name=name, version="1.0.0"),))
    steps: list[tuple[str, str | None]] = []
    result = deployer.apply(new_id(), bundle, progress=lambda s, d: steps.append((s, d)))

    assert result.status == "succeeded", result.error
    assert ("installing", f"{name}@1.0.0") in steps
    assert client.list_modules()[name] == "1.0.0"
    assert node_type in client.list_node_types()
    assert get_flows(node_red) == (result.rev, bundle.flows)

    # Already installed: the next deploy of the same module installs nothing.
    steps.clear()
    again = deployer.apply(
        new_id(),
        bundle_of("again", node_type, modules=bundle.modules),
        progress=lambda s, d: steps.append((s, d)),
    )
    assert again.status == "succeeded"
    assert steps[0] == ("installing", "1 module(s) already installed")

    # A new version of a loaded module runs only after a restart: refuse to pretend otherwise.
    make_module_tarball(tmp_path, name, node_type, "1.0.1")
    newer = (ModuleRef(name=name, version="1.0.1"),)
    upgrade = deployer.apply(new_id(), bundle_of("upgrade", node_type, modules=newer))
    assert upgrade.status == "failed"
    assert upgrade.error is not None and "Restart Node-RED" in upgrade.error
    assert get_flows(node_red) == (again.rev, bundle_of("again", node_type).flows)


def test_a_module_the_source_lacks_fails_before_flows_change(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    module = ModuleRef(name="node-red-contrib-not-in-cache", version="2.0.0")
    bundle = bundle_of("missing-module", "not-in-cache", modules=(module,))

    result = FlowDeployer(client, tmp_path, DirectoryModuleSource(tmp_path)).apply(new_id(), bundle)
    assert result.status == "failed"
    assert result.error is not None
    assert "no tarball for node-red-contrib-not-in-cache@2.0.0" in result.error
    assert get_flows(node_red) == baseline

    no_source = FlowDeployer(client, tmp_path / "other").apply(new_id(), bundle)
    assert no_source.status == "failed"
    assert no_source.error is not None and "no module source" in no_source.error
    assert get_flows(node_red) == baseline


def test_node_red_down_is_unavailable_and_retryable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with NodeRedClient(url, timeout=2) as down:
        with pytest.raises(NodeRedUnavailable, match="cannot reach Node-RED"):
            down.get_flows()
        deployer = FlowDeployer(down, tmp_path)
        deployment_id = new_id()
        result = deployer.apply(deployment_id, bundle_of("x"))
    assert result.status == "failed" and result.retryable
    assert result.error is not None and url in result.error
    # Not stored: when Node-RED is back, the same command is tried again.
    assert deployer.stored_result(deployment_id) is None


def test_a_broken_tarball_is_a_clear_error_and_a_failed_deploy(
    node_red: NodeRedHandle,
    client: NodeRedClient,
    baseline: tuple[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    junk = tmp_path / tarball_name("node-red-contrib-junk", "1.0.0")
    junk.write_bytes(b"this is not a tarball")
    with pytest.raises(NodeRedError) as caught:
        client.install_tarball(junk)
    assert caught.value.status == 400
    assert "TAR_BAD_ARCHIVE" in (caught.value.body or "")
    assert "HTTP 400" in str(caught.value)

    module = ModuleRef(name="node-red-contrib-junk", version="1.0.0")
    result = FlowDeployer(client, tmp_path / "state", DirectoryModuleSource(tmp_path)).apply(
        new_id(), bundle_of("junk", "junk-node", modules=(module,))
    )
    assert result.status == "failed"
    assert result.error is not None and "module install failed" in result.error
    assert get_flows(node_red) == baseline


def test_admin_auth_works_with_credentials(auth_node_red: NodeRedHandle, tmp_path: Path) -> None:
    set_flows(auth_node_red, flows_for("auth-baseline"))
    with NodeRedClient(auth_node_red.url, "admin", ADMIN_PASSWORD) as client:
        result = FlowDeployer(client, tmp_path).apply(new_id(), bundle_of("authed"))
        assert result.status == "succeeded", result.error
        assert client.get_flows() == (result.rev, bundle_of("authed").flows)
    assert get_flows(auth_node_red) == (result.rev, bundle_of("authed").flows)


def test_admin_auth_without_or_with_wrong_credentials_fails_clearly(
    auth_node_red: NodeRedHandle, tmp_path: Path
) -> None:
    before = get_flows(auth_node_red)
    with NodeRedClient(auth_node_red.url) as anonymous:
        with pytest.raises(NodeRedAuthError, match="requires a login") as caught:
            anonymous.get_flows()
        assert caught.value.status == 401
        result = FlowDeployer(anonymous, tmp_path).apply(new_id(), bundle_of("nope"))
        assert result.status == "failed"
        assert result.error is not None and "username and password" in result.error

    with (
        NodeRedClient(auth_node_red.url, "admin", "wrong") as wrong,
        pytest.raises(NodeRedAuthError, match="refused the login of user 'admin'"),
    ):
        wrong.deploy(flows_for("nope"), before[0])
    assert get_flows(auth_node_red) == before


def test_an_expired_token_is_renewed(auth_node_red: NodeRedHandle) -> None:
    with NodeRedClient(auth_node_red.url, "admin", ADMIN_PASSWORD) as client:
        rev, _ = client.get_flows()
        # Revoke the client's token the way the editor's logout does.
        token = client._token
        assert token is not None
        httpx.post(
            f"{auth_node_red.url}/auth/revoke",
            headers=admin_headers(auth_node_red),
            data={"token": token},
            timeout=10,
        ).raise_for_status()
        assert client.get_flows()[0] == rev
        assert client._token != token


def test_results_are_json_that_round_trips(tmp_path: Path) -> None:
    result = DeployResult(deployment_id="d", status="drift", rev="r", bundle_digest="sha256:x")
    assert DeployResult.model_validate_json(result.model_dump_json()) == result
