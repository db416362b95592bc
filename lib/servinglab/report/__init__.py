"""The comparison report: decision table, advice, figures, rendered from a run directory alone."""

from __future__ import annotations

import html
import os
import re
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import jinja2

from .. import __version__
from ..config import Paths, engine_argv
from ..errors import ParamsError, RunDirError
from ..records import DATA_DIR, RUN_FILE
from .advice import derive_advice, derive_recommendations
from .conversations import session_tables
from .plots import START_PHASE_LABELS, figures, latency_figures, lifecycle_figures, telemetry_figures
from .csvexport import CSV_FILES, csv_folder_name, export_csv
from .headline import all_measured_here, provenance_line, validity_line, verdict_of
from .rundata import RunData, load_run
from .runfacts import gpu_text
from .telemetry import telemetry_section
from .sections import (RunWarning, cost_section, group_warnings, lifecycle_failures, lifecycle_rows, manifest_section,
                       stage_warnings)
from . import consistency
from ..measure.server_metrics import figure_text
from .table import (annotation_lines, decision_table, interval_text, provenance_lines, table_frame,
                    validity_lines)


def run_warnings(run: RunData) -> list[RunWarning]:
    """Every failure and warning the report lists (damaged lines, failures, validity, consistency…), each
    with the kind it is grouped under and its whole reason."""
    warnings = [RunWarning("Damaged records", line) for line in run.damaged]
    for d in run.deployments:
        if d["status"] == "failed":
            # The whole reason: its first line is the headline, the log lines after it the cause.
            warnings.append(RunWarning("Deploy failed", (d.get("reason") or "no reason recorded").strip(), d["layer"]))
    for layer in run.layers:
        for check in run.smoke_of(layer):
            if not check["passed"]:
                observed = f"observed {check['observed']!r}"
                warnings.append(RunWarning("Smoke check failed", observed, layer, check["check"]))
        record = run.last_deployment(layer)
        if record and record["status"] == "ready" and record["reused"] and not run.fresh_starts(layer):
            warnings.append(RunWarning("Reused server", f"reused a server started at {record.get('started_at')}: "
                                       "its time to ready is not from this run", layer))  # fmt: skip
    warnings += [RunWarning("Not valid", line) for line in validity_lines(run)]
    warnings += [RunWarning("Records disagree", line) for line in consistency.check(run)]
    warnings += stage_warnings(run)
    warnings += lifecycle_failures(run)
    if run.preflight and not run.preflight[-1]["model"].get("vocabulary_covered", True):
        warnings.append(RunWarning("Tokenizer", "the tokenizer does not cover the model's vocabulary: streamed "
                                   "chunks may carry empty text"))  # fmt: skip
    for nb in run.context.get("notebooks", []):
        if nb.get("status") not in ("ok", "running", "interactive"):
            warnings.append(RunWarning(f"Notebook {nb.get('status')}", nb.get("error") or "no error recorded",
                                       subject=nb["name"]))  # fmt: skip
    status = run.context.get("status")
    if status and status not in ("ok", "running", "interactive"):
        warnings.append(RunWarning("Run status", f"the run ended as {status}"))
    return warnings


def report_warnings(run: RunData) -> list[str]:
    """Every warning the report lists, one line each, in order (the batch's summary counts them)."""
    return [w.line for w in run_warnings(run)]


def _server_args(run: RunData) -> str:
    for d in reversed(run.deployments):
        command = d.get("command") or []
        if "--model" in command:
            return " ".join(command[command.index("--model") :])
    args = engine_argv(run.params.get("model", {}).get("engine_args") or {})
    # A cluster layer's command is in its rendered objects, not in the run: the study's part of it.
    return " ".join(args) + " (the study's; the layer adds the model and its address)" if args else ""


def client_connections(run: RunData) -> str:
    """How the clients reached the layers, from the study recorded in ``run.json``: the proxy, how each layer's
    TLS certificate was checked, and where the key was allowed over plain http://."""
    client = run.params.get("client")
    if client is None:
        return "not recorded (the clients of this run may have taken a proxy from the environment)"
    proxy = f"through proxy {client['proxy']}" if client.get("proxy") else "no proxy (the environment's ignored)"
    trusted = f"the CAs of {client['ca_file']}" if client.get("ca_file") else "the system's CAs"
    unchecked = [name for name, on in (client.get("tls_verify") or {}).items() if not on]
    tls = f"TLS certificates checked against {trusted}"
    tls += f", not checked for {', '.join(unchecked)} (client.tls_verify)" if unchecked else ""
    plain = client.get("allow_plain_http_key") or []
    key = (f"API key allowed over plain http:// to another machine for {', '.join(plain)}" if plain
           else "API key never sent over plain http:// to another machine")  # fmt: skip
    return f"{proxy} · {tls} · {key}"


def load_pattern(run: RunData) -> str:
    if not run.latency_stages:
        return "smoke requests only (no latency stage in this run)"
    closed = [s["max_concurrency"] for s in run.latency_stages if s.get("mode") == "closed"]
    rates = [s["request_rate"] for s in run.latency_stages if s.get("mode") == "open"]
    parts = []
    if closed:
        parts.append("closed loop at concurrency " + ", ".join(str(c) for c in sorted(set(closed))))
    if rates:
        parts.append("open loop at " + ", ".join(f"{r:g}" for r in sorted(set(rates))) + " req/s")
    swept = [s for s in run.latency_stages if s.get("mode") == "sweep"]
    if swept:
        paced = sorted(s["request_rate"] for s in swept if isinstance(s.get("request_rate"), int | float))
        parts.append("a saturation sweep (a synchronous and a throughput probe"
                     + (f", then {len(paced)} Poisson rates from {paced[0]:.3g} to {paced[-1]:.3g} req/s)" if paced
                        else ", no rate stage)"))  # fmt: skip
    sources = sorted({s.get("source", "servinglab") for s in run.latency_stages})
    return "; ".join(parts) + f" (measured by {', '.join(sources)})"


def request_shape(run: RunData) -> str:
    smoke = f"smoke: chat, max_tokens {run.params.get('workloads', {}).get('smoke', {}).get('max_tokens')}"
    if not run.latency_stages:
        return smoke
    w = run.params.get("workloads", {}).get("latency", {})
    return (f"chat, random prompts of {w.get('input_len')} tokens in / {w.get('output_len')} out"
            f"{', ignore_eos' if w.get('ignore_eos') else ''}, seed {w.get('seed')}; {smoke}")  # fmt: skip


def template_environment(undefined: type) -> jinja2.Environment:
    """The report templates, escaped, with ``undefined`` deciding what a missing value does."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("servinglab.report", "templates"),
        autoescape=True,
        undefined=undefined,
        keep_trailing_newline=True,
    )


def _href(target: Path, reports_dir: Path | None) -> str | None:
    """A relative link from a report in ``reports_dir`` to ``target`` (None: no folder given, or no relative
    path between them), so that it holds wherever the reports folder and the runs move together."""
    if reports_dir is None:
        return None
    try:
        relative = os.path.relpath(target, reports_dir.resolve())
    except ValueError:  # another drive: no relative path
        return None
    return urllib.parse.quote(Path(relative).as_posix())


def data_links(run: RunData, reports_dir: Path | None = None) -> list[dict[str, str | None]]:
    """The run's data files, as the data section lists them: {name, href}; href is relative to
    ``reports_dir`` (the report's folder), or None when the report's place is not known."""
    files = [run.run_dir / RUN_FILE] + sorted((run.run_dir / DATA_DIR).glob("*.jsonl"))
    return [{"name": str(p.relative_to(run.run_dir)), "href": _href(p, reports_dir)} for p in files]


def render_html(run_dir: str | os.PathLike, reports_dir: str | os.PathLike | None = None) -> str:
    """The report of one run as a self-contained HTML document (same data, same bytes).

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    reports_dir : path, optional
        The folder the page will be written into: its data section then links the run's files and the CSV
        tables (``csv/<study>-<run-id>/``, which :func:`publish` writes) by relative paths. Without it, the
        page names the files without links and depends on nothing but the run's data.
    """
    run = load_run(run_dir)
    folder = Path(reports_dir) if reports_dir is not None else None
    table = decision_table(run)
    env = template_environment(jinja2.ChainableUndefined)
    # A value a stage does not hold (an imported result has no server side) reads as missing, not as an error.
    env.globals["fmt"] = lambda v: "–" if v is None or isinstance(v, jinja2.Undefined) else f"{v:.1f}"
    env.globals["server_figure"] = figure_text
    env.globals["interval"] = lambda stage, key: interval_text(stage, key).strip()
    csv_files = [f"csv/{csv_folder_name(run)}/{name}" for name in CSV_FILES] if folder is not None else []
    advice, recommendations = derive_advice(run, table), derive_recommendations(run, table)
    warnings = run_warnings(run)
    return env.get_template("report.html.j2").render(
        version=__version__,
        ctx=run.context,
        params=run.params,
        platform=run.context.get("platform", {}),
        hardware=run.context.get("hardware", {}),
        engine=run.context.get("engine", {}),
        model=run.context.get("model", {}),
        git=run.context.get("git", {}),
        server_args=_server_args(run),
        gpu_line=gpu_text(run),
        load_pattern=load_pattern(run),
        client_connections=client_connections(run),
        request_shape=request_shape(run),
        stages=run.latency_stages,
        warning_groups=group_warnings(warnings),
        warning_count=len(warnings),
        conversations=session_tables(run.latency_stages),
        stages_apart=run.stages_apart,
        provenance=provenance_lines(run),
        provenance_line=provenance_line(run),
        all_measured_here=all_measured_here(run),
        validity_line=validity_line(run),
        verdict=verdict_of(run, advice, recommendations),
        notes=annotation_lines(run),
        table=table,
        advice=advice,
        recommendations=recommendations,
        manifests=manifest_section(run),
        lifecycle=lifecycle_rows(run),
        costs=cost_section(run),
        figures=figures(run),
        telemetry=telemetry_section(run),
        telemetry_figures=telemetry_figures(run),
        preflight=run.preflight[-1] if run.preflight else None,
        deployments=run.deployments,
        phase_labels=START_PHASE_LABELS,
        smoke=run.smoke,
        data_files=data_links(run, folder),
        csv_files=[urllib.parse.quote(name) for name in csv_files],
    )


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


# A comparison's file name holds a run id followed by "-vs-"; a study name (lowercase) never does.
COMPARISON_NAME = re.compile(r"^compare-.*\d{8}T\d{6}Z(?:-\d+)?-vs-.*\.html$")


def _index_item(name: str) -> str:
    # Any file in the folder is listed, whoever put it there: its name is text and a link, never markup.
    href = html.escape(urllib.parse.quote(name, safe=""))
    return f'<li><a href="{href}">{html.escape(name.removesuffix(".html"))}</a></li>'


def write_index(reports_dir: Path) -> Path:
    """``reports/index.html``: every published report, newest first per study, then the comparisons."""
    names = sorted((p.name for p in reports_dir.glob("*.html") if p.name != "index.html"), reverse=True)
    entries = [n for n in names if not COMPARISON_NAME.match(n)]
    comparisons = [n for n in names if COMPARISON_NAME.match(n)]
    items = "\n".join(_index_item(name) for name in entries)
    if comparisons:
        items += "\n</ul><h2>Comparisons</h2><ul>\n" + "\n".join(_index_item(name) for name in comparisons)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>servinglab reports</title><style>body{font:15px/1.5 system-ui,sans-serif;max-width:760px;"
        "margin:0 auto;padding:16px}</style></head><body><h1>servinglab reports</h1>"
        "<p>Each study's newest report is <code>&lt;study&gt;.html</code>; "
        "<code>&lt;study&gt;-&lt;run-id&gt;.html</code> are the runs.</p>"
        f"<ul>\n{items}\n</ul></body></html>\n"
    )
    path = reports_dir / "index.html"
    write_if_changed(path, page)
    return path


def reports_folder(reports_dir: str | os.PathLike | None = None) -> Path:
    """Where reports are written: ``reports_dir`` when given, else the current project's reports folder (the
    study schema's default ``paths.reports_dir`` under the working directory).

    A run's run.json never chooses it (its ``project_dir`` and ``paths.reports_dir`` are data, and a copied
    or edited run directory may name any folder). Raises ParamsError when it exists and is not a folder.
    """
    folder = Path(reports_dir) if reports_dir is not None else Path.cwd() / Paths().reports_dir
    if folder.exists() and not folder.is_dir():
        raise ParamsError(f"{folder}: not a folder; reports are written into a folder")
    return folder


def file_in(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name made from a run's names; RunDirError when that would be anywhere but
    directly inside ``folder`` (a separator, a dot name, a link leading out)."""
    path = folder / name
    if Path(name).name != name or name.startswith(".") or path.resolve().parent != folder.resolve():
        raise RunDirError(f"{folder}: refusing to write {name[:80]!r}, which is not a file directly inside it")
    return path


def publish(run_dir: str | os.PathLike, reports_dir: str | os.PathLike | None = None) -> Path:
    """Render a run into ``<reports_dir>/<study>-<run-id>.html``, refresh ``<study>.html`` and the index.

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    reports_dir : path, optional
        Where reports go; defaults to ``reports/`` of the current project (the working directory), never to
        a folder the run directory names.

    Returns the path of the run's report.
    """
    run = load_run(run_dir)
    reports_dir = reports_folder(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = file_in(reports_dir, f"{run.study}-{run.run_id}.html")
    # The page links its tables as CSV: written first, where `servinglab export csv` writes them.
    export_csv(run_dir, file_in(file_in(reports_dir, "csv"), csv_folder_name(run)))
    write_if_changed(path, render_html(run_dir, reports_dir))
    own = re.compile(rf"^{re.escape(run.study)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?\.html$")
    runs = [(m.group(1), int(m.group(2) or 1), p) for p in reports_dir.iterdir() if (m := own.match(p.name))]
    newest = max(runs)[2]
    shutil.copyfile(newest, file_in(reports_dir, f"{run.study}.html"))
    write_index(reports_dir)
    return path


def table_for(run_dir: str | os.PathLike) -> Any:
    """The decision table of a run as a DataFrame, for display in a notebook."""
    return table_frame(decision_table(load_run(run_dir)))


__all__ = ["latency_figures", "lifecycle_figures", "publish", "render_html", "table_for", "write_index"]
