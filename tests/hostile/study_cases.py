"""Hostile study input, as a careless user or a hostile file would give it: shared by the tests beside this
module and ``benchmarks/startup.py`` (which times each refusal).

Each case writes its files into a folder and says what ``load_study`` is given (the study file, ``--set``
items, an override file) and which fragments the one-line refusal must hold, and which it must not.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

MINIMAL = """\
study: t
platform: {kind: local}
model:
  name: m
  served_name: m
  source: {kind: built}
layers:
  raw: {kind: raw-vllm}
"""

CLUSTER = """\
study: t
platform: {kind: kubernetes}
model:
  name: m
  served_name: m
  source: {kind: uri, uri: "hf://org/m"}
layers:
  raw: {kind: raw-vllm}
"""

PASTED_KEY = "sk-live-4f9a8b7c6d5e4f3a"


@dataclass
class Case:
    """One hostile input and what its refusal must (and must not) say."""

    name: str
    study: str | bytes = MINIMAL
    sets: list[str] = field(default_factory=list)
    override: str | bytes | None = None
    says: list[str] = field(default_factory=list)
    never_says: list[str] = field(default_factory=list)
    pad_bytes: int = 0  # a comment this long appended to the study (the oversized file)

    def write(self, folder: Path) -> tuple[Path, Path | None]:
        """Write the study (and override) file into ``folder``: (study path, override path or None)."""
        folder.mkdir(parents=True, exist_ok=True)
        study = folder / (re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") + ".yaml")
        data = self.study.encode("utf-8") if isinstance(self.study, str) else self.study
        with study.open("wb") as handle:
            handle.write(data)
            if self.pad_bytes:
                chunk = b"#" + b"x" * (1 << 20) + b"\n"
                for _ in range(self.pad_bytes // len(chunk) + 1):
                    handle.write(chunk)
        override = None
        if self.override is not None:
            override = folder / "override.yaml"
            text = self.override
            override.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return study.resolve(), override.resolve() if override else None


def alias_bomb(levels: int, indent: str) -> str:
    """A flow list of anchored lists, each ten aliases of the one before: 10**levels strings once expanded."""
    rows = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        rows.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "[\n" + ",\n".join(f"{indent}  {row}" for row in rows) + f"\n{indent}]"


def study_with(extra: str, base: str = MINIMAL) -> str:
    return base + extra


def cases() -> list[Case]:
    """Every hostile case, in the order the benchmark prints them."""
    binary = random.Random(6).randbytes(4096)
    return [
        Case("alias bomb under an Any field",
             study_with(f"run:\n  parameters:\n    30_latency:\n      prompts: {alias_bomb(6, '      ')}\n"),
             says=["invalid YAML at line", "expands the document beyond 20000 values"]),
        Case("alias bomb in a string field", study_with(f"description: {alias_bomb(6, '')}\n"),
             says=["invalid YAML at line", "expands the document beyond 20000 values"]),
        Case("deeper alias bomb in a string field", study_with(f"description: {alias_bomb(7, '')}\n"),
             says=["invalid YAML at line", "expands the document beyond 20000 values"]),
        Case("alias that contains itself", study_with("description: &me [1, *me]\n"),
             says=["alias *me refers to a value that contains it"]),
        Case("duplicate key (runs_dir: / further down)", study_with("paths:\n  runs_dir: runs\n  runs_dir: /\n"),
             says=["line 11, column 3", "key 'runs_dir' is given twice (first at line 10)"]),
        Case("duplicate top-level key", study_with("study: other\n"),
             says=["line 9, column 1", "key 'study' is given twice (first at line 1)"]),
        Case("binary file", binary, says=["study file is not UTF-8 text (byte 0x"]),
        Case("Latin-1 study file", study_with('description: "caf\u00e9"\n').encode("latin-1"),
             says=["study file is not UTF-8 text (byte 0xe9 at line 9, column 18); save it as UTF-8"]),
        Case("Latin-1 override file", override='description: "caf\u00e9"\n'.encode("latin-1"),
             says=["override.yaml: override file", "is not UTF-8 text (byte 0xe9 at line 1, column 18)"]),
        Case("NUL byte", study_with("description: a\x00b\n"),
             says=["line 9, column 15", "character #x0000 is not allowed"]),
        Case("10 KB of nested brackets", study_with("description: " + "[" * 10240 + "\n"),
             says=["invalid YAML at line 9, column", "nest"]),
        Case("50 MB file", pad_bytes=50 << 20, says=["study file is larger than 1024 KiB"]),
        Case("integer of 5000 digits", study_with("workloads:\n  latency:\n    seed: " + "9" * 5000 + "\n"),
             says=["line 11, column 11", "cannot read the value"]),
        Case(".inf steady_rate", study_with("workloads:\n  lifecycle:\n    steady_rate: .inf\n"),
             says=["workloads.lifecycle.steady_rate: inf is not a finite number"]),
        Case(".inf stop_grace_s", study_with("platform: {kind: local, stop_grace_s: .inf}\n", base=MINIMAL.replace(
             "platform: {kind: local}\n", "")),
             says=["platform.stop_grace_s: inf is not a finite number"]),
        Case(".inf in_cluster.timeout_s",
             study_with("workloads:\n  latency:\n    in_cluster: {timeout_s: .inf}\n", base=CLUSTER),
             says=["workloads.latency.in_cluster.timeout_s: inf is not a finite number"]),
        Case(".nan rate", study_with("workloads:\n  latency:\n    rate_sweep: {rates: [5, .nan]}\n"),
             says=["workloads.latency.rate_sweep.rates.1: nan is not a finite number"]),
        Case(".inf under an Any field", study_with("run:\n  parameters:\n    30_latency: {x: -.inf}\n"),
             says=["run.parameters.30_latency.x: -inf is not a finite number"]),
        Case("inf through --set", sets=["workloads.lifecycle.steady_rate=inf"],
             says=["--set workloads.lifecycle.steady_rate=inf: workloads.lifecycle.steady_rate:", "finite number"]),
        Case("steady_rate 1e12", sets=["workloads.lifecycle.steady_rate=1e12"],
             says=["workloads.lifecycle.steady_rate: Input should be less than or equal to 1000"]),
        Case("stop_grace_s 1e300", sets=["platform.stop_grace_s=1e300"],
             says=["platform.stop_grace_s: Input should be less than or equal to 3600"]),
        Case("in_cluster.timeout_s 1e300",
             study_with("workloads:\n  latency:\n    in_cluster: {timeout_s: 1.0e+300}\n", base=CLUSTER),
             says=["workloads.latency.in_cluster.timeout_s: Input should be less than or equal to 604800"]),
        Case("negative seed", sets=["workloads.latency.seed=-1"],
             says=["workloads.latency.seed: Input should be greater than or equal to 0 (got -1)"]),
        Case("seed past int32", sets=["workloads.lifecycle.seed=4294967296"],
             says=["workloads.lifecycle.seed: Input should be less than or equal to 2147483647"]),
        Case("replicas past int32", sets=["layers.raw.replicas=2147483648"],
             says=["layers.raw.replicas: Input should be less than or equal to 2147483647"]),
        Case("GPUs past int32", CLUSTER, sets=["platform.gpus=4294967296"],
             says=["platform.gpus: Input should be less than or equal to 2147483647"]),
        Case("start-up budget past int32", CLUSTER, sets=["platform.startup_budget_s=9999999999"],
             says=["platform.startup_budget_s: Input should be less than or equal to 604800"]),
        Case("concurrency 1e9", sets=["workloads.latency.concurrency=[1, 1000000000]"],
             says=["workloads.latency.concurrency: every concurrency must be at most 100000"]),
        Case("engine-arg list with --host", MINIMAL.replace("{kind: built}\n", "{kind: built}\n  engine_args:\n"
             f'    max-num-seqs: ["8", "--host", "0.0.0.0", "--api-key", "{PASTED_KEY}"]\n'),
             says=["model.engine_args: 'max-num-seqs' must be one value (text, a number or true/false), not a list"],
             never_says=[PASTED_KEY]),
        Case("engine-arg value starting with --", sets=["model.engine_args.max-num-seqs=--host"],
             says=["model.engine_args: 'max-num-seqs': a value may not start with '--'"]),
        Case("engine-arg abbreviating --host", sets=["model.engine_args.hos=0.0.0.0"],
             says=["model.engine_args: 'hos' would be read as --host, which the platform sets"]),
        Case("engine-arg --config", sets=["model.engine_args.config=more.yaml"],
             says=["model.engine_args: 'config' is set by the platform"]),
        Case("update_engine_args list", sets=["workloads.lifecycle.update_engine_args.max-num-seqs=[1, --port, 1]"],
             says=["workloads.lifecycle.update_engine_args: 'max-num-seqs' must be one value"]),
        Case("engine-arg of the wrong shape", sets=["model.engine_args.max-model-len={a: 1}"],
             says=["model.engine_args: 'max-model-len' must be one value"], never_says=["max-model-len.bool", ".int:"]),
        Case("union field of the wrong type", sets=["workloads.latency.workers=many"],
             says=["workloads.latency.workers: Input should be a valid integer",
                   "or Input should be 'auto' (got 'many')"],
             never_says=["workers.int", "constrained-int", "literal["]),
        Case("key pasted into api_key_env", study_with(f"auth:\n  api_key_env: {PASTED_KEY}\n"),
             says=["auth.api_key_env: must name an environment variable"], never_says=[PASTED_KEY]),
        Case("key pasted into api_key_env by --set", sets=[f"auth.api_key_env={PASTED_KEY}"],
             says=["--set auth.api_key_env=(not shown): auth.api_key_env: must name an environment variable"],
             never_says=[PASTED_KEY]),
        Case("key pasted into auth by --set, not YAML", sets=[f"auth.api_key_env={PASTED_KEY}: [x"],
             says=["--set auth.api_key_env=(not shown): invalid YAML"], never_says=[PASTED_KEY]),
        Case("numeric key pasted into api_key_file", study_with("auth:\n  api_key_file: 48151623429\n"),
             says=["auth.api_key_file: Input should be a valid string"], never_says=["48151623429"]),
        Case("key pasted into api_key_file", study_with(f"auth:\n  api_key_file: {PASTED_KEY}\n"),
             says=["auth.api_key_file: no such file"], never_says=[PASTED_KEY]),
        Case("key set as VLLM_API_KEY in platform.env", MINIMAL.replace("platform: {kind: local}", f"platform: {{kind: local, env: {{VLLM_API_KEY: {PASTED_KEY}}}}}"),
             says=["platform.env: VLLM_API_KEY looks like a secret"], never_says=[PASTED_KEY]),
        Case("token in platform.env by --set", sets=[f"platform.env.HF_TOKEN={PASTED_KEY}"],
             says=["--set platform.env.HF_TOKEN=(not shown)", "looks like a secret"], never_says=[PASTED_KEY]),
        Case("alias bomb in a --set value",
             sets=["description=" + alias_bomb(6, "").replace("\n", " ")],
             says=["invalid YAML at line 1", "expands the document beyond 20000 values"]),
        Case("--set key 5000 parts deep", sets=[".".join(["a"] * 5000) + "=1"],
             says=["more than 32 parts between dots"]),
    ]
