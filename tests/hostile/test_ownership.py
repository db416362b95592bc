"""A neighbour's servers and objects: nothing is stopped, applied over or deleted unless it is this study's
and this layer's.

Names may contain '--' and '-', so a neighbour's names can extend or re-split ours: study 'lab' against
study 'lab--b', layer 'raw' against layer 'raw--b', and study 'qwen' with layer 'cluster-raw' against
study 'qwen-cluster' with layer 'raw' (both name their objects 'qwen-cluster-raw').
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from kube_emulator import EmulatedCluster

from servinglab.config import load_study
from servinglab.errors import PlatformError
from servinglab.experiments.clusterload import run_in_cluster
from servinglab.layers.common import LAYER_LABEL, MANAGED_BY, STUDY_LABEL
from servinglab.layers.render import render_layer
from servinglab.measure.loadgen import StageSpec
from servinglab.measure.server_metrics import ServerWindow
from servinglab.measure.stage import StagePlan
from servinglab.measure.workload import RequestSpec
from servinglab.platforms.kube import Kube, load_api_client
from servinglab.platforms.kubernetes import KubernetesPlatform, OwnershipError
from servinglab.platforms.local import LocalPlatform
from servinglab.platforms.processes import Registry, ServerEntry

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "params" / "cluster-example.yaml"
NS = "servinglab"


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


# ---------------------------------------------------------------------------------- cluster objects


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The emulator with Jobs (the in-cluster load's) as well as the serving objects."""
    emulated = EmulatedCluster()
    emulated.emulator.resources["batch/v1/jobs"] = {}
    with emulated:
        config = emulated.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", config)
        emulated.kube = Kube(load_api_client(config))
        emulated.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield emulated


# Short deadlines: where an object is taken over instead of refused, the wait that follows ends soon.
QUICK = ["platform.ready_timeout_s=5", "workloads.latency.in_cluster.start_delay_s=0.5",
         "workloads.latency.in_cluster.timeout_s=5"]
LOAD = ["workloads.latency.client=in-cluster",
        "workloads.latency.in_cluster.image=registry.example/servinglab-loadgen:0.1.0",
        "workloads.latency.in_cluster.insecure_skip_tls_verify=true"]  # fmt: skip


def neighbour_study(*overrides: str):
    """Study 'qwen-cluster' with layer 'raw'."""
    return load_study(EXAMPLE, [*QUICK, *overrides])


def colliding_study(*overrides: str):
    """Study 'qwen' with layer 'cluster-raw': the same object names as the neighbour's layer 'raw'."""
    return load_study(EXAMPLE, ["study=qwen", "layers.cluster-raw.kind=raw-vllm", *QUICK, *overrides])


def owner_of(kube: Kube, kind: str, name: str) -> tuple[str | None, str | None]:
    api_version = {"Deployment": "apps/v1", "Service": "v1", "Job": "batch/v1", "ConfigMap": "v1"}[kind]
    labels = kube.get(api_version, kind, NS, name)["metadata"].get("labels") or {}
    return labels.get(STUDY_LABEL), labels.get(LAYER_LABEL)


def test_colliding_names_are_refused_and_the_neighbours_objects_kept(cluster, tmp_path):
    neighbour = render_layer(neighbour_study(), "raw")
    for obj in neighbour:
        cluster.kube.apply(obj)
    ours = colliding_study()
    assert {o["metadata"]["name"] for o in render_layer(ours, "cluster-raw")} == {"qwen-cluster-raw", "qwen-cluster-raw-ingress"}

    platform = KubernetesPlatform(ours, cluster.kube)
    with pytest.raises(OwnershipError) as caught:
        platform.ensure("cluster-raw", str(tmp_path))
    message = str(caught.value)
    # The first object it would apply (the layer's NetworkPolicy, applied before its pods) names the owner.
    assert message.startswith("layers.cluster-raw: NetworkPolicy/qwen-cluster-raw-ingress in namespace servinglab belongs to")
    assert "servinglab.io/study=qwen-cluster, servinglab.io/layer=raw" in message and "\n" not in message

    # Not applied over: the neighbour's labels and spec are as it applied them.
    for obj in neighbour:
        found = cluster.kube.get(obj["apiVersion"], obj["kind"], NS, obj["metadata"]["name"])
        assert found["metadata"]["labels"] == obj["metadata"]["labels"]
    assert platform.status() == []  # nor shown as this study's layer
    # Nor deleted by this study's teardown, which goes by this study's labels.
    assert platform.teardown() == []
    assert owner_of(cluster.kube, "Deployment", "qwen-cluster-raw") == ("qwen-cluster", "raw")
    assert owner_of(cluster.kube, "Service", "qwen-cluster-raw") == ("qwen-cluster", "raw")


def test_an_unlabelled_object_of_the_same_name_is_not_taken_over(cluster, tmp_path):
    cluster.kube.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "qwen-cluster-raw", "namespace": NS},
                        "spec": {"ports": [{"port": 80}]}})  # fmt: skip
    platform = KubernetesPlatform(neighbour_study(), cluster.kube)
    with pytest.raises(OwnershipError, match=r"Service/qwen-cluster-raw .* \(no servinglab labels\)"):
        platform.ensure("raw", str(tmp_path))
    assert cluster.kube.get("apps/v1", "Deployment", NS, "qwen-cluster-raw") is None  # nothing applied
    assert cluster.kube.get("v1", "Service", NS, "qwen-cluster-raw")["metadata"].get("labels") is None


def test_scaling_does_not_reach_a_neighbours_deployment(cluster):
    for obj in render_layer(neighbour_study(), "raw"):
        cluster.kube.apply(obj)
    with pytest.raises(OwnershipError, match="not scaled"):
        KubernetesPlatform(colliding_study(), cluster.kube).scale("cluster-raw", 0)
    assert cluster.kube.get("apps/v1", "Deployment", NS, "qwen-cluster-raw")["spec"]["replicas"] == 1


@pytest.mark.parametrize("labels", [None, {MANAGED_BY: "servinglab", STUDY_LABEL: "qwen-cluster", LAYER_LABEL: "raw",
                                           "app.kubernetes.io/component": "loadgen"}])  # fmt: skip
def test_the_in_cluster_load_leaves_a_same_named_job_it_does_not_own(cluster, tmp_path, labels):
    """An unlabelled Job, or the neighbour's load Job: neither deleted nor applied over."""
    meta = {"name": "qwen-cluster-raw-load", "namespace": NS, **({"labels": labels} if labels else {})}
    cluster.kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": dict(meta),
                        "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                       "containers": [{"name": "c", "image": "busybox"}]}}}})  # fmt: skip
    cluster.kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": dict(meta), "data": {"plan.json": "{}"}})
    # The neighbour's load Job against the colliding study; an unlabelled one against the neighbour itself.
    study, layer = (colliding_study(*LOAD), "cluster-raw") if labels else (neighbour_study(*LOAD), "raw")
    plan = StagePlan.make("c=1", [RequestSpec("hi", 3, 4)], [], StageSpec(max_concurrency=1))

    started = time.monotonic()
    with pytest.raises(OwnershipError, match=r"in-cluster load: Job/qwen-cluster-raw-load in namespace servinglab "
                                             r"belongs to another owner"):  # fmt: skip
        run_in_cluster(study, KubernetesPlatform(study, cluster.kube), layer, tmp_path, plan, ServerWindow([]))
    assert time.monotonic() - started < 5
    job = cluster.kube.get("batch/v1", "Job", NS, "qwen-cluster-raw-load")
    config_map = cluster.kube.get("v1", "ConfigMap", NS, "qwen-cluster-raw-load")
    assert job is not None and config_map["data"] == {"plan.json": "{}"}
    assert job["metadata"].get("labels") == labels and job["spec"]["template"]["spec"]["containers"][0]["name"] == "c"
