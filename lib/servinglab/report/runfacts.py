"""What a run ran on, read from its run directory: the accelerator and the engine's arguments.

The comparison page shows these side by side and the llm-d-benchmark export writes them into each
report's stack, so both read them the same way here.
"""

from __future__ import annotations

from typing import Any

from .rundata import RunData

# Flags whose values change at every start of the same server: left out when runs are compared.
PER_START_FLAGS = ("--host", "--port")
# Node-selector keys that name the GPU product on common clusters (GKE, NVIDIA's GPU feature discovery).
GPU_LABEL_HINTS = ("accelerator", "gpu.product", "gpu-type", "gpu.model")


def accelerator(run: RunData) -> dict[str, Any]:
    """The accelerator the engine ran on: ``model`` (a name), ``count`` (per replica), ``gpu`` and ``text``.

    On a cluster the GPU's product is known only when the study pins it with a node selector; otherwise
    the extended resource name stands in for it. On the local platform with the CPU build it is the CPU.
    """
    platform = run.params.get("platform", {})
    hardware = run.context.get("hardware", {})
    if platform.get("kind") == "kubernetes":
        gpus = platform.get("gpus", 1)
        resource = platform.get("gpu_resource", "nvidia.com/gpu")
        selector = platform.get("node_selector") or {}
        product = next((v for k, v in sorted(selector.items()) if any(h in k for h in GPU_LABEL_HINTS)), None)
        labelled = (hardware.get("gpu") or {}).get("products") or []
        if product is None and len(labelled) == 1:  # every GPU node carries the same product label
            product = labelled[0]
        version = _cluster_facts(run).get("kubernetes_version")
        where = f"Kubernetes {version}" if version else "Kubernetes"
        if hardware.get("nodes") is not None:
            where += f", {hardware['nodes']} nodes, {hardware.get('allocatable_gpus', 0)} GPUs allocatable"
        if not gpus:
            text = f"CPU only ({platform.get('cpu', '?')} CPUs a replica); {where}"
            return {"model": "CPU", "count": 1, "gpu": False, "text": text}
        name = product or resource
        return {"model": name, "count": gpus, "gpu": True, "text": f"{gpus} × {name} a replica; {where}"}
    cpu = hardware.get("cpu_model") or "unknown CPU"
    accel = run.context.get("platform", {}).get("accelerator") or ""
    cores = hardware.get("logical_cores")
    text = f"CPU: {cpu}" + (f", {cores} cores" if cores else "")
    if hardware.get("memory_gib"):
        text += f", {hardware['memory_gib']} GiB"
    if accel and "CPU" not in accel:
        return {"model": accel, "count": 1, "gpu": True, "text": f"{accel}; host {text}"}
    return {"model": f"CPU ({cpu})", "count": 1, "gpu": False, "text": text}


def _cluster_facts(run: RunData) -> dict[str, Any]:
    for record in reversed(run.preflight):
        cluster = record.get("facts", {}).get("cluster")
        if cluster:
            return cluster
    return {}


def engine_command_args(run: RunData, layer: str | None = None) -> list[str]:
    """The engine's arguments from ``--model`` on, as a fresh start of ``layer`` (any layer when None) ran them.

    ``--host`` and ``--port`` are left out: they change at every start. A layer whose deployments record no
    command (a cluster renders the arguments into its objects) gets the study's engine arguments.
    """
    for d in reversed(run.deployments):
        if layer is not None and d.get("layer") != layer:
            continue
        command = d.get("command") or []
        if "--model" in command:
            args = command[command.index("--model") :]
            out, skip = [], False
            for arg in args:
                if skip:
                    skip = False
                    continue
                if arg in PER_START_FLAGS:
                    skip = True
                    continue
                if arg.split("=", 1)[0] in PER_START_FLAGS:
                    continue
                out.append(arg)
            return out
    model = run.params.get("model", {})
    out = []
    for key, value in (model.get("engine_args") or {}).items():
        flag = f"--{key}"
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def args_dict(args: list[str]) -> dict[str, Any]:
    """``["--a", "1", "--flag"]`` as ``{"--a": "1", "--flag": None}`` (llm-d-benchmark's native args form)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--"):
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[arg] = args[i + 1]
                i += 1
            else:
                out[arg] = None
        i += 1
    return out


def gpu_text(run: RunData) -> str | None:
    """The run context's GPU line, as recorded at preflight: products, memory, driver and CUDA, and where they
    were read (``nvidia-smi`` on this machine, or the nodes' feature-discovery labels); ``None`` without GPUs."""
    gpu = run.context.get("hardware", {}).get("gpu") or {}
    if not gpu.get("products"):
        return None
    text = f"{gpu.get('count', '?')} × {' + '.join(gpu['products'])}"
    if gpu.get("memory_mib"):
        text += f" ({gpu['memory_mib']} MiB)"
    text += f" · driver {gpu.get('driver') or 'unknown'} · CUDA {gpu.get('cuda') or 'unknown'}"
    return text + f" (from {gpu.get('source', 'unknown')})"
