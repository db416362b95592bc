"""What an executed notebook shows its reader: figures as PNG beside SVG (an unsigned notebook shows no SVG),
tables rounded by unit with every text whole and warnings listed apart, and no progress-widget warning.

The JupyterLab test opens an unsigned executed notebook in a real ``jupyter lab`` in headless Chromium, as an
analyst opening a scheduler's run would.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import CHROMIUM, PARAMS, REPO, launch_chromium

from servinglab.report import show

FIXTURE_RUN = REPO / "tests" / "fixtures" / "report-runs" / "cluster-full"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def execute(cells: list[str], folder: Path, name: str = "figures") -> Path:
    """A notebook of ``cells`` executed by papermill into ``folder`` (unsigned, as the batch leaves it)."""
    import papermill

    source = nbformat.v4.new_notebook()
    source.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source.cells = [nbformat.v4.new_code_cell(text) for text in cells]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(source, folder / f"{name}.source.ipynb")
    executed = folder / f"{name}.ipynb"
    papermill.execute_notebook(str(folder / f"{name}.source.ipynb"), str(executed), kernel_name="python3",
                               progress_bar=False, cwd=str(folder))  # fmt: skip
    return executed


def outputs(path: Path) -> list[dict]:
    return [o for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]


def figure_outputs(path: Path) -> list[dict]:
    return [o for o in outputs(path) if "image/svg+xml" in o.get("data", {})]


def assert_figures_show_untrusted(path: Path) -> None:
    """Every figure output holds a real PNG beside its SVG, and no HTML (which an untrusted viewer prefers to
    both images and strips of the SVG)."""
    figures = figure_outputs(path)
    assert figures, "no figure in the notebook"
    for output in figures:
        data = output["data"]
        assert base64.b64decode(data["image/png"]).startswith(PNG_MAGIC)
        assert "text/html" not in data
    for output in outputs(path):  # no SVG hidden inside HTML either
        assert "<svg" not in "".join(output.get("data", {}).get("text/html", ""))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A complete local run (synthetic numbers) with one more stage that warned twice."""
    from synthetic import closed_stage
    from test_report import make_run

    from servinglab import records

    run = make_run(tmp_path_factory.mktemp("run"), "complete")
    stage, rows = closed_stage("raw", 32, 2400.0, 3300.0, tokens=128, gap_ms=40.0)
    stage["summary"]["warnings"] = ["the client was the bottleneck: its event loop woke 900 ms late",
                                    "too few requests for a p95"]  # fmt: skip
    records.append(run, records.LATENCY_REQUESTS, rows, provenance="synthetic")
    records.append(run, records.LATENCY_STAGES, [stage], provenance="synthetic")
    return run


@pytest.fixture(scope="module")
def figures_notebook(tmp_path_factory, synthetic_run) -> Path:
    """A notebook, executed once for this module, that loads a model directory's tokenizer as the latency
    notebook does (through transformers, which imports tqdm.auto) and shows a run's latency figures."""
    from servinglab import modelbuild

    model = modelbuild.ensure_model(tmp_path_factory.mktemp("cache"), "tiny", 0, weights=False)
    cells = ["from servinglab import report\nfrom servinglab.measure.workload import DirectoryTokenizer",
             f"DirectoryTokenizer({str(model)!r}).vocab_size",
             f"report.latency_figures({str(synthetic_run)!r})"]  # fmt: skip
    return execute(cells, tmp_path_factory.mktemp("notebooks"))


def test_a_kernel_that_loads_the_tokenizer_shows_no_progress_widget_warning(figures_notebook):
    text = json.dumps(outputs(figures_notebook))
    assert "TqdmWarning" not in text and "IProgress" not in text
    assert any(o.get("execution_count") == 2 for o in outputs(figures_notebook))  # the tokenizer loaded


def test_figures_carry_a_png_beside_the_svg(figures_notebook):
    assert_figures_show_untrusted(figures_notebook)
    assert len(figure_outputs(figures_notebook)) == 3
    captions = ["".join(o["data"]["text/html"]) for o in outputs(figures_notebook) if "text/html" in o.get("data", {})]
    assert any("Latency against throughput." in c for c in captions)


def test_the_report_inlines_svg_only():
    from servinglab.report import plots
    from servinglab.report.rundata import load_run

    # Drawing the PNG costs about as much as the SVG: the report, which shows the SVG, goes without.
    figure = plots.time_to_ready_figure(load_run(FIXTURE_RUN))
    assert figure is not None and figure.svg.startswith("<svg") and figure.png is None


def test_a_stage_table_is_rounded_by_unit_and_lists_its_warnings_apart(synthetic_run):
    from servinglab.experiments.latency import stages_frame

    frame = stages_frame(synthetic_run)
    shown = show.table(frame)
    assert "warnings" not in shown.frame.columns and "warnings" in frame.columns
    assert {"TTFT p50 (ms)", "TPOT p50 (ms)", "E2E p95 (ms)", "req/s"} <= set(shown.frame.columns)
    cells = shown.shown()
    # ms to one decimal; rates to two significant digits (whole numbers kept whole); no six-decimal floats.
    assert all(text == "–" or len(text.partition(".")[2]) == 1 for text in cells["TTFT p50 (ms)"])
    first = frame["req/s"].iloc[0]
    assert cells["req/s"].iloc[0] == show.format_value("req/s", float(first))
    text = repr(shown) + shown._repr_html_()
    assert not any(len(part) > 7 for word in text.split() for part in [word.partition(".")[2].rstrip("<,;)")]
                   if part.isdigit())  # fmt: skip
    # Each warning a line of its own, named by its layer and stage.
    assert shown.notes == ["raw c=32: the client was the bottleneck: its event loop woke 900 ms late",
                           "raw c=32: too few requests for a p95"]  # fmt: skip
    assert "<li>raw c=32: too few requests for a p95</li>" in shown._repr_html_()


@pytest.mark.parametrize(
    "column, value, text",
    [("TTFT p50 (ms)", 12.345678, "12.3"), ("median_ttft_ms", 0.04, "0.0"), ("time_to_ready_s", 0.834567, "0.83"),
     ("req/s", 1.23456, "1.2"), ("out tok/s", 7177.4123, "7177"), ("request_throughput", 0.05219, "0.052"),
     ("observed_percent", 49.96, "50.0"), ("completed", 6.0, "6"), ("completed", 6, "6"), ("ratio", 0.0123456, "0.0123"),
     ("TTFT p95 (ms)", None, "–"), ("TTFT p95 (ms)", float("nan"), "–"), ("passed", True, "True"), ("via", "gateway", "gateway")],
)  # fmt: skip
def test_values_are_rounded_by_the_unit_their_column_names(column, value, text):
    assert show.format_value(column, value) == text


def test_the_decision_table_keeps_every_cell_whole():
    from servinglab.report.rundata import load_run
    from servinglab.report.table import decision_table

    table = decision_table(load_run(FIXTURE_RUN))
    shown = show.DecisionTable(table)  # what show.decision_table(run_dir) returns, without loading the run again
    longest = max((cell for _, cells in table.rows for cell in cells), key=lambda c: len(c.text))
    assert len(longest.text) > 200  # the cells pandas cut at 50 characters
    import html

    page = shown._repr_html_()
    assert html.escape(longest.text) in page and longest.text in repr(shown)
    for name, _ in table.layers:
        assert f'<th style="text-align: left">{name}</th>' in page
    assert all(html.escape(cell.badge) in page for _, cells in table.rows for cell in cells)


@pytest.mark.engine
def test_the_latency_notebook_shows_figures_and_no_progress_widget_warning(engine, tmp_path):
    """30_latency, as the batch executes it, against the shared engine: its tokenizer (transformers, which
    imports tqdm.auto) loads in the kernel, which once printed "TqdmWarning: IProgress not found"."""
    import papermill

    executed = tmp_path / "30_latency.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "30_latency.ipynb"), str(executed), kernel_name="python3", progress_bar=False,
        cwd=str(REPO / "notebooks"), parameters={"params_file": str(PARAMS / "local.yaml"), "run_dir": str(engine.run_dir)},
    )  # fmt: skip
    text = json.dumps(outputs(executed))
    assert "TqdmWarning" not in text and "IProgress" not in text
    assert_figures_show_untrusted(executed)
    tables = [o["data"]["text/html"] for o in outputs(executed) if "<table" in "".join(o.get("data", {}).get("text/html", ""))]
    assert any("TTFT p50 (ms)" in "".join(t) for t in tables)


# --- JupyterLab, opening an unsigned executed notebook ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """A real ``jupyter lab`` on a free local port serving ``tmp_path/notebooks``, with its own Jupyter folders;
    its token travels in the environment, never in its command line."""
    token = secrets.token_hex(16)
    folders = {name: tmp_path / "jupyter" / name for name in ("config", "data", "runtime", "settings", "workspaces")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # What a notebook's outputs need and nothing more: no language servers, no terminals (quicker to start and stop).
    (folders["config"] / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {
        "jpserver_extensions": {"jupyter_lsp": False, "jupyter_server_terminals": False}, "terminals_enabled": False}}))
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_CONFIG_DIR=str(folders["config"]),
               JUPYTER_DATA_DIR=str(folders["data"]), JUPYTER_RUNTIME_DIR=str(folders["runtime"]),
               JUPYTERLAB_SETTINGS_DIR=str(folders["settings"]), JUPYTERLAB_WORKSPACES_DIR=str(folders["workspaces"]))  # fmt: skip
    port = free_port()
    log = (tmp_path / "lab.log").open("w")
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={notebooks}", "--ServerApp.port_retries=0", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert lab.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(request, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "jupyter lab did not answer within 60 s"
                time.sleep(0.3)
        yield {"base": base, "token": token, "notebooks": notebooks, "data_dir": folders["data"], "argv": lab.args}
    finally:
        stop_lab(lab, base, token)
        log.close()


def stop_lab(lab: subprocess.Popen, base: str, token: str) -> None:
    """Stop the kernel the server started for the notebook (a process of its own session) through the API,
    then the server; killed only when it does not end."""
    def call(method: str, path: str) -> bytes:
        request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()

    try:
        for kernel in json.loads(call("GET", "/api/kernels")):
            call("DELETE", f"/api/kernels/{kernel['id']}")
        lab.terminate()
        lab.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        os.killpg(lab.pid, 9)
        lab.wait()


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="Debian's chromium is not installed (CI installs it)")
def test_jupyterlab_shows_the_figures_of_an_unsigned_executed_notebook(jupyter_lab, figures_notebook):
    from nbformat.sign import NotebookNotary
    from playwright.sync_api import sync_playwright

    executed = Path(shutil.copy(figures_notebook, jupyter_lab["notebooks"]))
    assert not NotebookNotary(data_dir=str(jupyter_lab["data_dir"])).check_signature(nbformat.read(executed, 4))
    assert jupyter_lab["token"] not in " ".join(map(str, jupyter_lab["argv"]))

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{jupyter_lab['base']}/lab/tree/{executed.name}?token={jupyter_lab['token']}")
            images = page.locator(".jp-OutputArea-output img")
            images.first.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)  # fmt: skip
            shown = images.evaluate_all("imgs => imgs.map(i => [i.src.slice(0, 22), i.naturalWidth, i.naturalHeight])")
            assert len(shown) == 3 and all(src.startswith(("data:image/png", "blob:")) and w > 0 and h > 0
                                           for src, w, h in shown), shown  # fmt: skip
            box = images.first.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100
            text = page.locator(".jp-NotebookPanel").inner_text()
            assert "Latency against throughput." in text and "image/svg+xml" not in text and "IProgress" not in text
        finally:
            browser.close()
    # Nothing was signed on the reader's behalf, opening it included.
    assert not NotebookNotary(data_dir=str(jupyter_lab["data_dir"])).check_signature(nbformat.read(executed, 4))
