"""A machine installs only the `agent` extra: the CLI must work there without the gateway's stack.

The test builds a wheel of this tree, installs it with `[agent]` into a fresh virtualenv (no
system site packages) and runs `edgefleet` from there. It builds from a copy of the distribution's
files so that it never writes build/ or *.egg-info into the shared work tree. It creates the venv
without pip and drives it with this interpreter's pip (`pip --python`), which saves the ensurepip
step, and --no-compile saves byte-compiling every dependency. The wheel's dependencies come from
pip's cache (or the package index when the cache is cold).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GATEWAY_ONLY = ("fastapi", "sqlmodel", "uvicorn")


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment minus anything that would leak this venv or the tree into it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"}
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["HOME"] = os.environ.get("HOME", str(home))
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env=clean_env(cwd), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def copy_distribution(dest: Path) -> None:
    """Copy what the wheel is built from: pyproject.toml, the readme and the packages."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest)
    shutil.copy2(REPO / pyproject["project"]["readme"], dest)
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(
            REPO / package,
            dest / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only `edgefleet[agent]` installed; yields its bin directory."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "src"
    copy_distribution(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(source)], work)
    (wheel,) = (work / "dist").glob("edgefleet-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-compile", f"{wheel}[agent]"], work)
    yield venv / "bin"
    shutil.rmtree(work, ignore_errors=True)


def test_edgefleet_help_works_with_only_the_agent_extra(agent_venv: Path, tmp_path: Path) -> None:
    out = run([str(agent_venv / "edgefleet"), "--help"], tmp_path).stdout
    assert "agent" in out and "gateway" in out


def test_agent_commands_work_with_only_the_agent_extra(agent_venv: Path, tmp_path: Path) -> None:
    out = run([str(agent_venv / "edgefleet"), "agent", "--help"], tmp_path).stdout
    assert "enroll" in out and "run" in out
    for action in ("enroll", "run"):
        out = run([str(agent_venv / "edgefleet"), "agent", action, "--help"], tmp_path).stdout
        assert "--state-dir" in out


def test_the_gateway_stack_is_not_installed(agent_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    out = run(
        [str(agent_venv / "python"), "-c", probe, *GATEWAY_ONLY, "paho", "edge_agent"], tmp_path
    )
    found = json.loads(out.stdout)
    assert found == {
        "fastapi": False,
        "sqlmodel": False,
        "uvicorn": False,
        "paho": True,
        "edge_agent": True,
    }
    # The package comes from the venv, not from this work tree.
    where = run(
        [str(agent_venv / "python"), "-c", "import edge_agent; print(edge_agent.__file__)"],
        tmp_path,
    ).stdout.strip()
    assert Path(where).is_relative_to(agent_venv.parent), where


def test_gateway_commands_say_which_extra_they_need(agent_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(agent_venv / "edgefleet"), "gateway", "run", "--data-dir", str(tmp_path / "gw")],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "edgefleet[gateway]" in result.stderr
    assert "Traceback" not in result.stderr
