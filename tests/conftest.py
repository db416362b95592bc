"""Test set-up: every test (and every notebook under nbval) runs the shrunk study in a private folder.

``SERVINGLAB_OVERRIDES`` is set before collection to a file that merges params/ci.yaml and private
paths over whatever study is loaded, so the notebooks, whose defaults name params/local.yaml, run the
small study without being edited. Servers the session leaves (the shared engine, the notebooks') are
stopped when pytest ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"
SERVINGLAB = [sys.executable, "-m", "servinglab.cli"]
_WORKSPACE: Path | None = None


def write_overrides(folder: Path, extra: dict | None = None) -> Path:
    """An override file: params/ci.yaml, private runs/reports/cache folders, then ``extra``."""
    from servinglab.config import deep_merge

    data = yaml.safe_load((PARAMS / "ci.yaml").read_text())
    data["paths"] = {
        "runs_dir": str(folder / "runs"),
        "reports_dir": str(folder / "reports"),
        "cache_dir": str(folder / "cache"),
    }
    data = deep_merge(data, extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "overrides.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pytest_configure(config):
    global _WORKSPACE
    _WORKSPACE = Path(tempfile.mkdtemp(prefix="servinglab-tests-"))
    os.environ["SERVINGLAB_OVERRIDES"] = str(write_overrides(_WORKSPACE / "session"))


def pytest_unconfigure(config):
    if _WORKSPACE is None:
        return
    from servinglab.config import load_study
    from servinglab.platforms import get_platform

    get_platform(load_study(PARAMS / "local.yaml")).teardown()
    shutil.rmtree(_WORKSPACE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # The notebooks deploy a real engine too (they reuse the session's when it is up).
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.engine)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Nothing but the page: no background requests of Chromium's own, so a test can count what a page asks for.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def launch_chromium(playwright):  # noqa: ANN001 - Playwright's sync API object
    """Debian's headless Chromium, as every browser test opens it."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for a test module's pages."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = launch_chromium(p)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _WORKSPACE / "session"


@pytest.fixture()
def private_overrides(tmp_path):
    """A function to make an override file in this test's own folder (own cache, registry, runs)."""
    return lambda extra=None: write_overrides(tmp_path / "ws", extra)


@pytest.fixture(scope="session")
def engine():
    """The shared real vLLM server of the shrunk study (started once, reused by the notebooks)."""
    from servinglab import api

    study_run = api.open_study(PARAMS / "local.yaml")
    deployment = study_run.platform.ensure("raw", study_run.run_dir)
    yield SimpleNamespace(
        study=study_run.study, platform=study_run.platform, run_dir=study_run.run_dir, deployment=deployment
    )


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The Kubernetes API emulator with the serving stack's CRDs and nodes, as the study's kubeconfig sees it
    (``.kube`` is a client); the study files are read as written, without the CI overrides."""
    from kube_emulator import EmulatedCluster, install_serving_stack

    from servinglab.platforms.kube import Kube, load_api_client

    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)
    with EmulatedCluster() as emulated:
        config = emulated.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", config)
        emulated.kube = Kube(load_api_client(config))
        install_serving_stack(emulated.kube)
        yield emulated


def engine_processes(owner_fragment: str | None = None) -> list[psutil.Process]:
    """vLLM processes on this machine (optionally only those whose owner mark contains a fragment)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
            if "vllm" not in text.lower() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if owner_fragment and owner_fragment not in proc.environ().get("SERVINGLAB_SERVER_OWNER", ""):
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return found


def run_cli(*args: str, env_overrides: Path | None = None, timeout: float = 900, extra_env=None):
    """Run ``servinglab`` in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ)
    if env_overrides is not None:
        env["SERVINGLAB_OVERRIDES"] = str(env_overrides)
    env.update(extra_env or {})
    return subprocess.run(
        [*SERVINGLAB, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
