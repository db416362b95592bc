"""The few calls a notebook makes first: load the study, pick its platform and run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__, results
from .config import Study, load_study
from .errors import RunDirError
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
        "git": results.git_state(study.project_dir),
        "servinglab_version": __version__,
    }


def open_study(
    params_file: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StudyRun:
    """Load a study and find where its results go.

    Parameters
    ----------
    params_file : path
        The study file.
    run_dir : path, optional
        The run directory, as the batch runner injects it. Empty (a notebook run on its own): the study's
        newest run when it was made with the same parameters, otherwise a new run.
    overrides : list of str
        ``dotted.key=value`` items, as ``--set`` gives them.
    """
    study = load_study(params_file, overrides)
    platform = get_platform(study)
    if run_dir:
        path = Path(run_dir)
        if not (path / results.RUN_FILE).is_file():
            raise RunDirError(f"{path}: not a run directory (no {results.RUN_FILE})")
    else:
        latest = results.latest_run(study.runs_dir, study.study)
        if latest and results.read_context(latest).get("params") == study.resolved():
            path = latest
        else:
            path = results.create_run(study.runs_dir, study.study, run_context(study) | {"status": "interactive"})
    return StudyRun(study, platform, path)
