"""Where the local engine, its API server and the measuring client run on this machine's cores.

vLLM's CPU build runs three processes: the API server (HTTP, chat template, tokenization, streaming the
answer), the EngineCore (the scheduler) and a Worker (the model, on OpenMP threads). Between steps the
EngineCore and the Worker wait on shared-memory queues by spinning with ``sched_yield``, so each holds a
core busy while a request is in flight. Left to the kernel's scheduler on a small machine, that spinning
lands beside the client and the API server: the client's event loop then wakes late and the API server
writes a stream's chunks late and all at once, and what is timed is the machine, not the engine.

``auto`` placement puts the engine (EngineCore, Worker and its OpenMP threads) on every core but the
first, and the API server and the client on the first, where neither spins. Measured on a 2-core machine
(benchmarks/README.md): the client's event loop lag at p99 fell from 250–470 ms to under 2 ms and the
streams delivered in one burst from a third of them to none.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Placement:
    """Cores per part: the API server's, the engine's (EngineCore, Worker, OpenMP threads), the client's."""

    api_server: tuple[int, ...]
    engine: tuple[int, ...]
    client: tuple[int, ...]

    def to_record(self) -> dict[str, list[int]]:
        return {"api_server_cpus": list(self.api_server), "engine_cpus": list(self.engine),
                "client_cpus": list(self.client)}  # fmt: skip

    @classmethod
    def from_record(cls, data: dict[str, list[int]] | None) -> Placement | None:
        if not data:
            return None
        return cls(tuple(data["api_server_cpus"]), tuple(data["engine_cpus"]), tuple(data["client_cpus"]))

    @property
    def omp_bind(self) -> str:
        """The engine's cores as ``VLLM_CPU_OMP_THREADS_BIND`` reads them (``1``, ``1-3``, ``1,3``)."""
        cores = sorted(self.engine)
        if cores == list(range(cores[0], cores[-1] + 1)) and len(cores) > 1:
            return f"{cores[0]}-{cores[-1]}"
        return ",".join(str(c) for c in cores)


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def plan(setting: str, cpu_build: bool, cores: list[int] | None = None) -> Placement | None:
    """The placement ``setting`` (``auto`` or ``none``) gives on these cores; None: leave it to the kernel
    (placement off, a GPU build whose engine runs on the GPU, or a single core to share)."""
    cores = usable_cores() if cores is None else cores
    if setting != "auto" or not cpu_build or len(cores) < 2:
        return None
    return Placement(api_server=(cores[0],), engine=tuple(cores[1:]), client=(cores[0],))


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pid: int, cpus: tuple[int, ...] | set[int]) -> None:
    """Every thread of a process onto ``cpus`` (a thread started later inherits its creator's cores)."""
    for tid in threads_of(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def client_on(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """While open, every thread of this process (the measuring client) runs on ``cpus``; their cores are put
    back after. Nothing is changed when ``cpus`` is None."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = {}
    for tid in threads_of(os.getpid()):
        with contextlib.suppress(OSError):
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, cores in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)
