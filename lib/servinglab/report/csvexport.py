"""A run's tables as CSV, for a spreadsheet or pandas: the decision table, the latency stages, the lifecycle trials.

Every value is what the report shows or what the run recorded, read through :mod:`.rundata`; nothing is
measured or judged again. Columns come in a fixed order, units in their names; a value a record does not
hold (an imported ``vllm bench serve`` result without p95, a trial without a reason) is an empty field.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

from ..measure import intervals
from .rundata import RunData, load_run
from .sections import trial_sentence
from .table import decision_table

DECISION_TABLE_FILE = "decision_table.csv"
STAGES_FILE = "latency_stages.csv"
LIFECYCLE_FILE = "lifecycle_trials.csv"

DECISION_COLUMNS = ("row", "row_title", "layer", "kind", "column", "value", "status", "badge", "validity",
                    "provenance", "trials", "evidence", "source_page_claim")  # fmt: skip

# The summary keys of a stage (vllm bench serve's names), each with its CSV column.
_METRICS = (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2el", "e2e"))
_STATISTICS = ("median", "p95", "p99")


def _latency_columns() -> list[tuple[str, str]]:
    """(summary key, column) for every latency statistic, each median and p95 followed by its interval."""
    out = []
    for metric, name in _METRICS:
        for statistic in _STATISTICS:
            key = f"{statistic}_{metric}_ms"
            column = f"{name}_{'p50' if statistic == 'median' else statistic}"
            out.append((key, f"{column}_ms"))
            if statistic != "p99":  # intervals are recorded for medians and p95s only
                out += [(f"{key}@low", f"{column}_ci_low_ms"), (f"{key}@high", f"{column}_ci_high_ms")]
    return out


LATENCY_COLUMNS = _latency_columns()
STAGE_COLUMNS = ("layer", "stage", "source", "provenance", "params_segment", "mode", "max_concurrency",
                 "request_rate_req_s", "validity", "validity_reasons", "repeats", "completed", "failed", "duration_s",
                 "request_throughput_req_s", "request_throughput_ci_low_req_s", "request_throughput_ci_high_req_s",
                 "output_throughput_tok_s", "total_token_throughput_tok_s", "request_goodput_req_s",
                 *(column for _, column in LATENCY_COLUMNS))  # fmt: skip
LIFECYCLE_COLUMNS = ("layer", "kind", "platform", "experiment", "trial", "status", "result", "refused_by", "reason",
                     "settled", "started_at_unix_s", "ended_at_unix_s", "provenance", "params_segment",
                     "measurements_json")  # fmt: skip


def decision_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per cell of the decision table (row × layer), in the table's order, as the report shows it."""
    table = decision_table(run)
    out = []
    for row, cells in table.rows:
        for (layer, kind), cell in zip(table.layers, cells):
            out.append({
                "row": row.key, "row_title": row.title, "layer": layer, "kind": kind,
                "column": table.columns.get(kind, kind), "value": cell.text, "status": cell.status,
                "badge": cell.badge, "validity": cell.validity, "provenance": cell.provenance, "trials": cell.trials,
                "evidence": cell.evidence, "source_page_claim": table.claim(row.key, kind),
            })  # fmt: skip
    return out


def _interval(stage: dict[str, Any], key: str, end: str) -> float | None:
    found = intervals.recorded(stage, key)
    return found[0 if end == "low" else 1] if found else None


def _latency_values(stage: dict[str, Any]) -> dict[str, Any]:
    summary = stage["summary"]
    out = {}
    for key, column in LATENCY_COLUMNS:
        figure, _, end = key.partition("@")
        out[column] = _interval(stage, figure, end) if end else summary.get(figure)
    return out


def stage_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per latency stage record, in the order they were written."""
    out = []
    for stage in run.latency_stages:
        summary, validity = stage["summary"], stage.get("validity") or {}
        out.append({
            "layer": stage["layer"], "stage": stage["stage"], "source": stage["source"],
            "provenance": stage.get("provenance") or "measured", "params_segment": stage.get("params_segment"),
            "mode": stage["mode"], "max_concurrency": stage.get("max_concurrency"),
            "request_rate_req_s": stage.get("request_rate"), "validity": validity.get("verdict") or "unchecked",
            "validity_reasons": "; ".join(r.get("text", "") for r in validity.get("reasons") or []),
            "repeats": stage.get("repeats") or 1, "completed": summary.get("completed"),
            "failed": summary.get("failed"), "duration_s": summary.get("duration"),
            "request_throughput_req_s": summary.get("request_throughput"),
            "request_throughput_ci_low_req_s": _interval(stage, "request_throughput", "low"),
            "request_throughput_ci_high_req_s": _interval(stage, "request_throughput", "high"),
            "output_throughput_tok_s": summary.get("output_throughput"),
            "total_token_throughput_tok_s": summary.get("total_token_throughput"),
            "request_goodput_req_s": summary.get("request_goodput"),
            **_latency_values(stage),
        })  # fmt: skip
    return out


def lifecycle_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per lifecycle trial record, with the report's sentence for it and every measurement as JSON."""
    return [{
        "layer": r["layer"], "kind": r["kind"], "platform": r["platform"], "experiment": r["experiment"],
        "trial": r["trial"] + 1, "status": r["status"], "result": trial_sentence(r), "refused_by": r.get("refused_by"),
        "reason": r.get("reason"), "settled": r.get("settled"), "started_at_unix_s": r["started_at_unix"],
        "ended_at_unix_s": r["ended_at_unix"], "provenance": r.get("provenance") or "measured",
        "params_segment": r.get("params_segment"),
        "measurements_json": json.dumps(r["measurements"], sort_keys=True, separators=(",", ":")),
    } for r in run.lifecycle]  # fmt: skip


# A spreadsheet runs a field that starts with one of these as a formula. Texts come from run directories that
# anyone may have written (a log line in a failure's reason), so such a text is written with a leading
# apostrophe, which spreadsheets read as "this is text" (OWASP's advice on CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _field(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """Rows as CSV with a header, in ``columns``' order; None as an empty field, floats as Python writes them,
    a text that a spreadsheet would run as a formula behind an apostrophe."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _field(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


CSV_FILES = (DECISION_TABLE_FILE, STAGES_FILE, LIFECYCLE_FILE)

TABLES: tuple[tuple[str, tuple[str, ...], Callable[[RunData], list[dict[str, Any]]]], ...] = (
    (DECISION_TABLE_FILE, DECISION_COLUMNS, decision_rows),
    (STAGES_FILE, STAGE_COLUMNS, stage_rows),
    (LIFECYCLE_FILE, LIFECYCLE_COLUMNS, lifecycle_rows),
)


def csv_folder_name(run: RunData) -> str:
    """The folder, under ``<reports>/csv/``, that holds a run's tables as CSV (``publish`` links them there)."""
    return f"{run.study}-{run.run_id}"


def csv_tables(run: RunData) -> dict[str, str]:
    """{file name: CSV text} of the run's decision table, latency stages and lifecycle trials."""
    return {name: csv_text(columns, rows(run)) for name, columns, rows in TABLES}


def export_csv(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
               warn: Callable[[str], None] | None = None) -> list[Path]:  # fmt: skip
    """Write a run's decision table, latency stages and lifecycle trials as CSV files.

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    out_dir : path, optional
        The folder to write into; defaults to ``reports/csv/<study>-<run-id>/`` of the current project (the
        working directory), never to a folder the run directory names.
    warn : callable, optional
        Called with one sentence per data file holding lines that could not be read (and are not exported).

    Returns the files written: ``decision_table.csv``, ``latency_stages.csv``, ``lifecycle_trials.csv``
    (each with its header, also when the run has no such records).
    """
    from . import file_in, reports_folder, write_if_changed

    run = load_run(run_dir)
    if warn is not None:
        for warning in run.damaged:
            warn(warning)
    tables = csv_tables(run)
    if out_dir is None:
        out_dir = file_in(file_in(reports_folder(), "csv"), csv_folder_name(run))
    folder = reports_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in tables.items():
        path = file_in(folder, name)
        write_if_changed(path, text)
        paths.append(path)
    return paths


__all__ = ["csv_tables", "decision_rows", "export_csv", "lifecycle_rows", "stage_rows"]
