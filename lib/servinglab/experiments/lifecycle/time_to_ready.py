"""Time to ready: delete the layer and deploy it from nothing, ``workloads.lifecycle.repeats`` times."""

from __future__ import annotations

import time
from typing import Any

from ...errors import PlatformError
from .trial import Trial


def run(trial: Trial) -> dict[str, Any]:
    """Delete the layer and deploy it again from nothing; the time and its phases."""
    t0 = time.time()
    stopped = trial.platform.teardown([trial.layer])
    gone_s = time.time() - t0
    deployment = trial.platform.ensure(trial.layer, str(trial.run_dir))
    if deployment.reused:
        raise PlatformError(f"layers.{trial.layer}: still running after teardown, so nothing was timed")
    return {"time_to_ready_s": deployment.time_to_ready_s, "phases_s": deployment.phases_s,
            "teardown_s": round(gone_s, 3), "stopped": stopped, "how": trial.mechanism.how,
            "url": deployment.url}  # fmt: skip
