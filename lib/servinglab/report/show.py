"""What a notebook shows: figures that any reader sees, tables that read at a glance.

An executed notebook is unsigned, so JupyterLab treats its outputs as untrusted: it renders no SVG (nor
inline SVG inside HTML, whose tags it strips, leaving the text "image/svg+xml"), but it does render PNG and
sanitised HTML. So a figure goes out as one output holding both a PNG and the SVG (JupyterLab picks the SVG
when the notebook is trusted, the PNG otherwise), with its caption as a separate HTML output; nothing is
signed on the reader's behalf. A table goes out as plain HTML: numbers rounded by the unit its column names,
long texts whole, and free-text notes (a stage's warnings) listed under the table instead of as its last
column.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plots import Figure
    from .table import Table as Rows

NOTHING_TO_DRAW = "Nothing measured to draw in this run."
MISSING = "–"  # a value the record does not hold
# What a column's name says about its unit, and the decimals a value of that unit is shown with.
MILLISECONDS = re.compile(r"(\(ms\)|_ms\b|_ms_)")
SECONDS = re.compile(r"(\(s\)|_s\b|_s_)")
PERCENT = re.compile(r"(%|_percent\b)")
RATE = re.compile(r"(/s\b|_per_s\b|throughput)")
NOTE_COLUMNS = ("warnings",)  # free text listed under a table, not shown as its last column
LABEL_COLUMNS = ("layer", "stage", "experiment", "trial")  # what names a row in the list of its notes


# --- figures -----------------------------------------------------------------------------------------


def figure_bundle(figure: Figure) -> dict[str, str]:
    """One figure as an output's data: PNG (when drawn) beside SVG, and its title as text.

    The bundle holds no HTML, which JupyterLab would prefer to both images and, untrusted, strip of the SVG.
    """
    data = {"image/svg+xml": figure.svg, "text/plain": f"<figure: {figure.title}>"}
    if figure.png:
        data["image/png"] = base64.b64encode(figure.png).decode("ascii")
    return data


def caption_html(figure: Figure) -> str:
    """The figure's title and the sentence that reads it, as sanitiser-safe HTML."""
    return f"<p><b>{html.escape(figure.title)}.</b> {html.escape(figure.reading)}</p>"


@dataclass(frozen=True)
class FigureList:
    """Figures shown one under the other in a notebook: each a caption, then the figure as PNG and SVG."""

    items: list[Figure]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if not self.items:
            display({"text/plain": NOTHING_TO_DRAW}, raw=True)
        for figure in self.items:
            display({"text/html": caption_html(figure), "text/plain": f"{figure.title}. {figure.reading}"}, raw=True)
            display(figure_bundle(figure), raw=True)

    def __repr__(self) -> str:
        return "\n".join(f"{f.title}. {f.reading}" for f in self.items) or NOTHING_TO_DRAW


# --- tables ------------------------------------------------------------------------------------------


def _significant(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, never dropping a digit before the point (1234.5 → 1235)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def format_value(column: str, value: Any) -> str:
    """A cell as shown: by the unit its column names, ms to 0.1, s to 0.01, % to 0.1, rates and other
    fractions to 2 or 3 significant digits; integers and texts as they are; a missing value as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, (bool, numbers.Integral)) or not isinstance(value, numbers.Real):
        return str(value)
    number = float(value)
    if MILLISECONDS.search(column) or PERCENT.search(column):
        return f"{number:.1f}"
    if SECONDS.search(column):
        return f"{number:.2f}"
    if number.is_integer() and not RATE.search(column):
        return str(int(number))  # a count in a column that also holds a missing value (pandas made it float)
    return _significant(number, 2 if RATE.search(column) else 3)


def _python_value(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


@dataclass(frozen=True)
class ShownTable:
    """A DataFrame as a notebook shows it: rounded by unit, every text whole, notes listed under it."""

    frame: Any  # a pandas DataFrame
    notes: list[str] = field(default_factory=list)
    name: str = ""

    def shown(self) -> Any:
        """The frame with every cell formatted as shown (texts)."""
        shown = self.frame.copy()
        for column in shown.columns:
            shown[column] = [format_value(str(column), _python_value(v)) for v in self.frame[column]]
        return shown

    def _repr_html_(self) -> str:
        # to_html keeps every text whole (display.max_colwidth cuts only the text form).
        parts = [self.shown().to_html(escape=True, na_rep=MISSING, border=0, index=self._named_index())]
        if self.notes:
            items = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes)
            parts.append(f"<p><b>{html.escape(self.name or 'Notes')}</b></p><ul>{items}</ul>")
        return "\n".join(parts)

    def _named_index(self) -> bool:
        """Whether the rows' index says something (a fact's name), not just 0, 1, 2…"""
        import pandas as pd

        return not isinstance(self.frame.index, pd.RangeIndex)

    def __repr__(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.width", 200):
            text = self.shown().to_string(index=self._named_index())
        if self.notes:
            text += f"\n\n{self.name or 'Notes'}:\n" + "\n".join(f"- {note}" for note in self.notes)
        return text


def _row_label(row: Any, columns: list[str], index: Any) -> str:
    named = [str(row[c]) for c in LABEL_COLUMNS if c in columns and row[c] is not None and str(row[c]) != "nan"]
    return " ".join(named) or str(index)


def _notes(frame: Any, column: str) -> list[str]:
    """One line per row with text in ``column``, named by the row's layer/stage (or its index)."""
    columns = [str(c) for c in frame.columns]
    lines = []
    for index, row in frame.iterrows():
        value = row[column]
        texts = value if isinstance(value, (list, tuple)) else [value]
        for text in texts:
            if text is not None and str(text).strip() and str(text) != "nan":
                lines.append(f"{_row_label(row, columns, index)}: {text}")
    return lines


def table(frame: Any, notes: tuple[str, ...] = NOTE_COLUMNS) -> ShownTable:
    """Show a DataFrame readably in a notebook.

    Parameters
    ----------
    frame : pandas.DataFrame or list of dict
        A table of the library's (its column names carry their units: ``TTFT p50 (ms)``, ``time_to_ready_s``),
        or its rows as records.
    notes : tuple of str
        Columns of free text (warnings) taken out of the table and listed under it, one line per row that
        has any, named by the row's layer and stage.

    Returns
    -------
    ShownTable
        What the notebook displays: an HTML table with numbers rounded by unit (ms to 0.1, s to 0.01,
        rates to 2 significant digits) and every text whole, and the notes as a list.
    """
    if isinstance(frame, list):
        import pandas as pd

        frame = pd.DataFrame(frame)
    present = [c for c in notes if c in frame.columns]
    listed = [line for c in present for line in _notes(frame, c)]
    return ShownTable(frame.drop(columns=present), listed, ", ".join(present))


# --- the decision table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionTable:
    """The decision table as a notebook shows it: one row per dimension, each cell its badge and its whole text."""

    table: Rows

    def _repr_html_(self) -> str:
        t = self.table
        groups = "".join(f'<th colspan="{n}" style="text-align: left">{html.escape(column)}</th>' for column, n in t.groups)
        layers = "".join(f'<th style="text-align: left">{html.escape(name)}</th>' for name, _ in t.layers)
        body = []
        for row, cells in t.rows:
            tds = "".join(
                f'<td style="text-align: left; vertical-align: top"><b>{html.escape(cell.badge)}</b><br>'
                f"{html.escape(cell.text)}</td>"
                for cell in cells
            )
            body.append(f'<tr><th style="text-align: left; vertical-align: top">{html.escape(row.title)}</th>{tds}</tr>')
        return (f'<table><thead><tr><th></th>{groups}</tr><tr><th style="text-align: left">Dimension</th>{layers}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>")  # fmt: skip

    def __repr__(self) -> str:
        t = self.table
        lines = []
        for row, cells in t.rows:
            lines.append(row.title)
            lines += [f"  {name} [{cell.badge}]: {cell.text}" for (name, _), cell in zip(t.layers, cells)]
        return "\n".join(lines)


def decision_table(run_dir: str | os.PathLike) -> DecisionTable:
    """The decision table of a run, for a notebook: every cell's badge and whole text, nothing cut.

    Parameters
    ----------
    run_dir : path
        A run directory (``runs/<study>/<run-id>``).
    """
    from .rundata import load_run
    from .table import decision_table as build

    return DecisionTable(build(load_run(run_dir)))
