"""A neighbour's servers and objects: nothing is stopped, applied over or deleted unless it is this study's
and this layer's.

Names may contain '--' and '-', so a neighbour's names can extend or re-split ours: study 'lab' against
study 'lab--b', layer 'raw' against layer 'raw--b', and study 'qwen' with layer 'cluster-raw' against
study 'qwen-cluster' with layer 'raw' (both name their objects 'qwen-cluster-raw').
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml

from servinglab.config import load_study
from servinglab.errors import PlatformError
from servinglab.platforms.local import LocalPlatform
from servinglab.platforms.processes import Registry, ServerEntry



@pytest.fixture(autouse=True)
def _no_override_file(monkeypatch):
    monkeypatch.delenv("SERVINGLAB_OVERRIDES", raising=False)


# ------------------------------------------------------------------------------------- local servers


def local_study(folder: Path, name: str, python: str | None = None):
    """A local study with layers 'raw' and 'raw--b', its cache (and so its registry) in ``folder``."""
    model = folder / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}", encoding="utf-8")  # a directory vLLM would be pointed at
    data = {
        "study": name,
        "platform": {"kind": "local", "python": python, "stop_grace_s": 2},
        "model": {"name": "m", "served_name": "m", "source": {"kind": "local", "path": str(model)}},
        "layers": {"raw": {"kind": "raw-vllm"}, "raw--b": {"kind": "raw-vllm"}},
        "paths": {"cache_dir": str(folder / "cache"), "runs_dir": str(folder / "runs"),
                  "reports_dir": str(folder / "reports")},
    }  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_study(path)


@pytest.fixture
def servers():
    """Real processes registered as servers (a ``sleep`` in its own session, as a server is started)."""
    started: list[subprocess.Popen] = []

    def register(registry: Registry, study: str, layer: str) -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
        started.append(proc)
        registry.save(ServerEntry(
            study=study, layer=layer, spec_hash="0" * 64, pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(), port=1, base_url="http://127.0.0.1:1/v1",
            served_name="m", log_path="/dev/null", command=["sleep", "300"], started_at="then", state="ready",
        ))  # fmt: skip
        return proc

    yield register
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def test_tearing_down_a_study_leaves_the_study_whose_name_extends_it(tmp_path, servers):
    lab = LocalPlatform(local_study(tmp_path, "lab"))
    mine = servers(lab.registry, "lab", "raw")
    neighbour = servers(lab.registry, "lab--b", "raw")  # same cache folder, so the same registry

    stopped = lab.teardown()

    assert len(stopped) == 1 and stopped[0].startswith(f"raw (pid {mine.pid}")
    assert not alive(mine)
    assert alive(neighbour)
    assert [(e.study, e.layer) for e in lab.registry.entries("lab--b")] == [("lab--b", "raw")]


def test_a_layer_and_a_study_that_read_alike_keep_their_own_entries(tmp_path, servers):
    registry = LocalPlatform(local_study(tmp_path, "lab")).registry
    servers(registry, "lab", "b--raw")
    servers(registry, "lab--b", "raw")
    assert [(e.study, e.layer) for e in registry.entries("lab")] == [("lab", "b--raw")]
    assert [(e.study, e.layer) for e in registry.entries("lab--b")] == [("lab--b", "raw")]
    assert len(list(registry.directory.glob("*.json"))) == 2


def test_deploying_a_layer_leaves_the_layer_whose_name_extends_it(tmp_path, servers):
    # An interpreter that cannot run: the start fails right after the registry has been consulted.
    lab = LocalPlatform(local_study(tmp_path, "lab", python="/bin/false"))
    neighbour = servers(lab.registry, "lab", "raw--b")
    with pytest.raises(PlatformError, match="platform.python"):
        lab.ensure("raw", tmp_path / "run")
    assert alive(neighbour)
    lab.teardown(["raw"])
    assert alive(neighbour)
    assert [e.layer for e in lab.registry.entries("lab")] == ["raw--b"]
