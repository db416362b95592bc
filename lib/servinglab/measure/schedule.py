"""When each request of a stage is sent: all at once (closed loop), or seeded Poisson/gamma arrivals.

The schedule is computed before the stage starts, so sending costs no random draws and two runs with the
same seed send at the same offsets. Gamma arrivals follow ``vllm bench serve``: shape = burstiness and
mean inter-arrival 1/rate, so burstiness 1 is Poisson, below 1 burstier, above 1 more regular.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ParamsError


def arrival_offsets_s(count: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds from the stage start for ``count`` requests at ``rate`` requests/s.

    ``rate`` infinite sends everything at offset 0 (a concurrency cap then makes it a closed loop).
    """
    if count < 0:
        raise ParamsError(f"count {count}: must not be negative")
    if math.isinf(rate):
        return np.zeros(count)
    if not rate > 0:
        raise ParamsError(f"request rate {rate}: must be positive or inf")
    if not burstiness > 0:
        raise ParamsError(f"burstiness {burstiness}: must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)
    # The first request goes at once; the gaps separate it from the following ones.
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if count else gaps
