"""The few calls a notebook makes first: load the study, pick its platform and run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__, layers, records, runlock
from .config import Study, load_resolved, load_study
from .errors import RunBusyError, RunDirError
from .platforms import Platform, get_platform


@dataclass
class StudyRun:
    """A loaded study, its platform and the run directory results go to."""

    study: Study
    platform: Platform
    run_dir: Path

    def teardown_hint(self) -> str:
        """The command that stops what this study left running (for notebooks run on their own)."""
        return f"servinglab teardown {self.study.source_file}"


def run_context(study: Study) -> dict:
    """What run.json records about a study when a run starts."""
    return {
        "params": study.resolved(),
        "sources": study.sources,
        "project_dir": str(study.project_dir),
        "git": records.git_state(study.project_dir),
        "servinglab_version": __version__,
        # What each kind of the study's layers is, as this servinglab knows it, in the registry's order (the
        # source page's): the report reads it from here.
        "layer_kinds": {k.name: k.describe() for k in layers.kinds() if any(l.kind == k.name for l in study.layers.values())},
    }


def load_frozen(segment_file: str | os.PathLike) -> Study:
    """The study a run's params segment froze: no override file or ``--set`` applies again."""
    segment = records.read_params_segment(segment_file)
    return load_resolved(segment["params"], segment["study_file"], segment["sources"], str(segment_file))


def _refuse_beside_a_batch(study: Study) -> None:
    """A notebook run on its own would deploy, measure and tear down the servers a batch of the study is using."""
    holder = runlock.current_holder(study.runs_dir, study.study)
    if holder is not None:
        raise RunBusyError(
            f"{runlock.lock_path(study.runs_dir, study.study)}: study {study.study} is executing in "
            f"{holder.describe()}; run this notebook when it has ended"
        )


def open_study(
    params_file: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StudyRun:
    """Load a study and find where its results go.

    Parameters
    ----------
    params_file : path
        The study file, or a run's frozen params segment (``<run_dir>/params/<n>.json``, what the batch runner
        passes): the study exactly as that invocation resolved it, whatever the study file says now.
    run_dir : path, optional
        The run directory, as the batch runner injects it. Empty (a notebook run on its own): the study's
        newest run when it was made with the same parameters, otherwise a new run.
    overrides : list of str
        ``dotted.key=value`` items, as ``--set`` gives them (already part of a frozen segment).

    Raises
    ------
    RunBusyError
        A study file (not a batch's segment) whose study a batch is executing now.
    """
    if records.is_params_segment(params_file):
        study = load_frozen(params_file)
        records.write_under_segment(int(Path(params_file).stem))
    else:
        study = load_study(params_file, overrides)
        _refuse_beside_a_batch(study)
    platform = get_platform(study)
    if run_dir:
        path = Path(run_dir)
        if not (path / records.RUN_FILE).is_file():
            raise RunDirError(f"{path}: not a run directory (no {records.RUN_FILE})")
    else:
        latest = records.latest_run(study.runs_dir, study.study)
        if latest and records.read_context(latest).get("params") == study.resolved():
            path = latest
        else:
            path = records.create_run(study.runs_dir, study.study, run_context(study) | {"status": "interactive"})
    return StudyRun(study, platform, path)
