"""Source notebooks: no outputs, a parameters cell of literals, no definitions, only servinglab imports."""

from __future__ import annotations

import ast
import json

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_the_suite_has_its_stages():
    assert [p.stem for p in NOTEBOOKS] == ["00_preflight", "10_deploy", "20_smoke", "30_latency", "40_lifecycle", "90_report"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in code_cells(path):
        assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_literals_with_the_injected_names(path):
    tagged = [c for c in code_cells(path) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    tree = ast.parse("".join(tagged[0]["source"]))
    names = []
    for node in tree.body:
        assert isinstance(node, ast.Assign), ast.dump(node)
        ast.literal_eval(node.value)  # papermill cannot recompute derived values: literals only
        names += [t.id for t in node.targets]
    assert {"params_file", "run_dir", "overrides", "batch"} <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_definitions_and_only_servinglab_imports(path):
    cells = code_cells(path)
    assert "parameters" not in cells[0]["metadata"].get("tags", [])  # imports come first
    for cell in cells:
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] == "servinglab"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] == "servinglab" for a in node.names)
