"""Figures for the report, as inline SVG text that is the same for the same data."""

from __future__ import annotations

import io
from dataclasses import dataclass

from .rundata import RunData

PHASE_LABELS = {
    "interpreter_and_import_s": "start Python, import vLLM",
    "engine_init_s": "engine init (weights, KV cache, compile, warm-up)",
    "api_server_up_s": "API server up (/health)",
    "model_listed_s": "model listed (/v1/models)",
}


@dataclass(frozen=True)
class Figure:
    anchor: str
    title: str
    svg: str
    reading: str  # one sentence that says what the figure shows


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    # No date, a fixed id salt: identical data gives identical bytes.
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def time_to_ready_figure(run: RunData) -> Figure | None:
    """Stacked bars: each fresh start's time to ready, split into its phases."""
    starts = [(d["layer"], d) for d in run.deployments if d["status"] == "ready" and not d["reused"]]
    if not starts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "servinglab"
    phases = list(PHASE_LABELS)
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.5 * len(starts)))
    labels = [f"{layer} #{i + 1}" for i, (layer, _) in enumerate(starts)]
    lefts = [0.0] * len(starts)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for phase, color in zip(phases, colors):
        widths = [d.get("phases_s", {}).get(phase, 0.0) for _, d in starts]
        ax.barh(labels, widths, left=lefts, color=color, label=PHASE_LABELS[phase])
        lefts = [a + b for a, b in zip(lefts, widths)]
    ax.set_xlabel("seconds from process start")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(starts)), ncol=2, fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    longest_layer, longest = max(starts, key=lambda s: s[1]["time_to_ready_s"])
    biggest = max(longest.get("phases_s", {}).items(), key=lambda kv: kv[1], default=(None, 0))
    reading = (
        f"The slowest start, {longest_layer}, took {longest['time_to_ready_s']:.1f} s to ready; "
        f"{biggest[1]:.1f} s of it was {PHASE_LABELS.get(biggest[0], biggest[0])}."
    )
    return Figure("fig-time-to-ready", "Time to ready by phase", _svg(fig), reading)


def figures(run: RunData) -> list[Figure]:
    return [f for f in (time_to_ready_figure(run),) if f is not None]
