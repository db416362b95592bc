"""Which GPUs, driver and CUDA a run had: from ``nvidia-smi`` on this machine, or from a cluster's node labels.

The run context records them (``hardware.gpu``) so a reader knows what the numbers were measured on. Both
sources are read as hostile text: a field that does not parse is left out, never guessed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

# NVIDIA GPU feature discovery's node labels; older releases split the versions into major/minor/rev.
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB
DRIVER_LABELS = ("nvidia.com/cuda.driver-version.full", ("nvidia.com/cuda.driver.major",
                 "nvidia.com/cuda.driver.minor", "nvidia.com/cuda.driver.rev"))  # fmt: skip
CUDA_LABELS = ("nvidia.com/cuda.runtime-version.full", ("nvidia.com/cuda.runtime.major",
               "nvidia.com/cuda.runtime.minor"))  # fmt: skip

NVIDIA_SMI_TIMEOUT_S = 10.0
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.\-]{0,31}$")
_CUDA_IN_HEADER = re.compile(r"CUDA Version:\s*([0-9][0-9.]{0,15})")


def _version(text: str | None) -> str | None:
    return text if text and _VERSION.match(text) else None


def _label_version(labels: dict[str, str], spec: tuple[str, tuple[str, ...]]) -> str | None:
    full, parts = spec
    if labels.get(full):
        return _version(labels[full])
    values = [labels.get(p) for p in parts]
    if values[0] is None:
        return None
    return _version(".".join(v for v in values if v))


def parse_nvidia_smi(query_csv: str, header: str = "") -> dict[str, Any]:
    """The GPUs of ``nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits``,
    and the CUDA version from plain ``nvidia-smi``'s header (the highest the driver supports).

    Returns ``{}`` when no line parses.
    """
    names: list[str] = []
    memories: list[int] = []
    drivers: set[str] = set()
    for line in query_csv.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[0] or not fields[2].isdigit():
            continue
        names.append(fields[0][:100])
        memories.append(int(fields[2]))
        if _version(fields[1]):
            drivers.add(fields[1])
    if not names:
        return {}
    cuda = _CUDA_IN_HEADER.search(header)
    return _summary(names, min(memories), ", ".join(sorted(drivers)) or None,
                    _version(cuda.group(1).rstrip(".")) if cuda else None, "nvidia-smi")  # fmt: skip


def local_gpu_facts() -> dict[str, Any]:
    """This machine's NVIDIA GPUs as ``nvidia-smi`` reports them; ``{}`` without it or when it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)  # fmt: skip
        header = subprocess.run([smi], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_nvidia_smi(query.stdout, header.stdout)


def node_gpu_facts(nodes: list[dict[str, Any]], gpus_by_node: dict[str, int]) -> dict[str, Any]:
    """The GPUs of the nodes in ``gpus_by_node`` (name → allocatable GPUs) as their feature-discovery labels say;
    ``{}`` when no node carries a product label."""
    products: list[str] = []
    memories: set[int] = set()
    drivers: set[str] = set()
    cudas: set[str] = set()
    for node in nodes:
        meta = node.get("metadata") or {}
        if meta.get("name") not in gpus_by_node:
            continue
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if isinstance(v, str)}
        if labels.get(PRODUCT_LABEL):
            products += [labels[PRODUCT_LABEL][:100]] * gpus_by_node[meta["name"]]
        if (labels.get(MEMORY_LABEL) or "").isdigit():
            memories.add(int(labels[MEMORY_LABEL]))
        if driver := _label_version(labels, DRIVER_LABELS):
            drivers.add(driver)
        if cuda := _label_version(labels, CUDA_LABELS):
            cudas.add(cuda)
    if not products:
        return {}
    return _summary(products, min(memories) if memories else None, ", ".join(sorted(drivers)) or None,
                    ", ".join(sorted(cudas)) or None, "node labels")  # fmt: skip


def _summary(names: list[str], memory_mib: int | None, driver: str | None, cuda: str | None,
             source: str) -> dict[str, Any]:  # fmt: skip
    products = sorted(set(names))
    return {"products": products, "count": len(names), "memory_mib": memory_mib, "driver": driver, "cuda": cuda,
            "source": source}  # fmt: skip
