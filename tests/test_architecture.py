"""The package's shape, checked: one home per concept, no import cycle, no reaching into another module's
private names, the contract and the kinds type-checked, and a report that imports no measuring code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lib" / "servinglab"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere (functions included), but for annotations only."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin] + [f"{origin}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target in known:
                found.add(target)
            # Importing a submodule runs every package above it.
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known)
    found.discard(name)
    return {f for f in found if not name.startswith(f + ".")}  # a module's own packages run before it anyway


def import_cycles(package: Path) -> list[list[str]]:
    found = modules(package)
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycle_anywhere_in_the_package():
    cycles = import_cycles(PACKAGE)
    assert cycles == [], "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_cycle_finder_finds_one_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nfrom . import a\n")
    assert import_cycles(package) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert import_cycles(package) == []


def test_nothing_outside_the_layer_kinds_branches_on_a_kinds_name():
    pattern = re.compile(r"[\"'](raw-vllm|kserve|llm-d)[\"']")
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in PACKAGE.rglob("*.py")
                 if "layers" not in p.relative_to(PACKAGE).parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert offenders == []


def test_no_module_reaches_into_another_modules_private_names():
    offenders = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.update(a.asname or a.name for a in node.names)
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
            elif isinstance(node, ast.Import):
                imported.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_") and not node.attr.endswith("_")):  # fmt: skip
                offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_the_platform_contract_is_implemented_by_both_platforms():
    from servinglab.platforms.base import Platform
    from servinglab.platforms.kubernetes import KubernetesPlatform
    from servinglab.platforms.local import LocalPlatform

    declared = {n for n, v in vars(Platform).items() if callable(v) and not n.startswith("_")}
    assert {"ensure", "endpoint", "paths", "metrics_targets", "replicas", "scale", "created_objects", "teardown",
            "refusal", "manifests", "traffic", "pod_timeline", "status", "with_study"} <= declared  # fmt: skip
    for platform in (LocalPlatform, KubernetesPlatform):
        missing = sorted(n for n in declared if not callable(getattr(platform, n, None)))
        assert missing == [], f"{platform.__name__} lacks {missing}"


def test_the_contract_the_kinds_and_the_records_type_check():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "lib/servinglab/platforms", "lib/servinglab/layers", "lib/servinglab/records.py"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success" in done.stdout


@pytest.mark.parametrize("forbidden", ["servinglab.measure.loadgen", "servinglab.experiments.lifecycle", "openai",
                                       "servinglab.layers.render", "servinglab.measure.stage"])  # fmt: skip
def test_the_report_imports_no_measuring_code_and_no_renderer(forbidden):
    code = ("import sys, servinglab.report, servinglab.report.compare, servinglab.report.export; "
            f"print({forbidden!r} in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", f"importing the report imports {forbidden}"


def test_the_folder_list_reads_as_the_flow():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    assert top == ["__init__.py", "api.py", "cli.py", "config.py", "cost.py", "data", "errors.py", "experiments", "layers",
                   "measure", "modelbuild.py", "platforms", "progress.py", "records.py", "report", "runlock.py", "runner.py",
                   "studyfile.py"]  # fmt: skip
    assert (PACKAGE / "experiments" / "lifecycle" / "canary.py").is_file()  # where is canary measured
    assert (PACKAGE / "measure" / "loadgen.py").is_file()  # where are chunks timed
