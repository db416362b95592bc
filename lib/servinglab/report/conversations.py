"""The report's multi-turn block: per layer and stage that sent sessions, TTFT by turn index and the sessions'
duration, read from the ``conversations`` field of the stage records alone (nothing re-derived from turns)."""

from __future__ import annotations

from typing import Any


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _turn_row(turn: dict[str, Any]) -> dict[str, Any]:
    """One turn index as the table shows it: counted from 1 (the records count from 0)."""
    prompt = turn.get("mean_prompt_tokens")
    return {
        "turn": turn["turn"] + 1,
        "completed": turn.get("completed"),
        "failed": turn.get("failed"),
        "prompt_tokens": "–" if prompt is None else f"{prompt:.0f}",
        "ttft_ms": " / ".join(_ms(turn.get(key)) for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms")),
    }


def session_tables(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages that ran multi-turn sessions, each with its table of TTFT by turn index.

    Parameters
    ----------
    stages : list of dict
        The run's ``latency_stages`` records; those without a ``conversations`` field are left out.

    Returns
    -------
    list of dict
        Per stage, in record order: layer, stage, validity verdict, sessions (completed of planned, over every
        repeat), turns completed, session duration (median / p99, s) and ``rows``: per turn index its
        completed and failed turns, the server's mean prompt tokens and TTFT mean / p50 / p99 (ms).
    """
    tables = []
    for stage in stages:
        section = stage.get("conversations")
        if not isinstance(section, dict):
            continue
        tables.append({
            "layer": stage.get("layer"),
            "stage": stage.get("stage"),
            "verdict": (stage.get("validity") or {}).get("verdict", "unchecked"),
            "sessions": f"{section.get('sessions_completed')} of {section.get('sessions')}",
            "turns_completed": section.get("turns_completed"),
            "duration_s": " / ".join(_s(section.get(key)) for key in ("median_session_duration_s", "p99_session_duration_s")),
            "rows": [_turn_row(t) for t in section.get("by_turn") or []],
        })  # fmt: skip
    return tables
