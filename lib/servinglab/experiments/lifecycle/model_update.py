"""Model update: change an engine argument under a steady load and measure what the requests saw."""

from __future__ import annotations

import time
from typing import Any

from .trial import Trial, change_under_load

UPDATE_REVISION = "update"


def run(trial: Trial) -> dict[str, Any]:
    """Change an engine argument under a steady load; time until the new revision serves, and what failed."""
    s = trial.settings
    mechanism = trial.mechanism
    revised = trial.platform.with_study(trial.study.revised(s.update_engine_args, UPDATE_REVISION))
    endpoint = trial.platform.endpoint(trial.layer)

    def change() -> None:
        # A cluster layer keeps its objects when the change fails: the runner rolls it back to the study's spec.
        revised.ensure(trial.layer, str(trial.run_dir), keep_on_failure=True)

    out = change_under_load(trial, change, trial.served(UPDATE_REVISION), endpoint)
    t0 = time.time()
    trial.platform.ensure(trial.layer, str(trial.run_dir))  # back to the study's spec
    return out | {"changed_args": dict(s.update_engine_args), "how": mechanism.how,
                  "replaces_in_place": mechanism.replaces_in_place, "restore_s": round(time.time() - t0, 3)}  # fmt: skip
