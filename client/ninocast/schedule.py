"""The horizon schedule: how far ahead (k, in snapshot intervals) each nowcast of a run looks.

Early nowcasts look far ahead (k = T = 40) and later ones close (k = 1): n points evenly spaced from T^(1/p)
down to 1, raised to the p-th power and rounded half-to-even (NINO_SPEC §5.2).
"""

from __future__ import annotations

import numpy as np

MAX_HORIZON = 40


def k_schedule(max_train_steps: int, period: int, horizon: int = MAX_HORIZON, p: float = 2.0) -> list[int]:
    """One k per nowcast of a run of ``max_train_steps`` steps with a nowcast every ``period`` steps."""
    if period <= 0 or max_train_steps <= 0:
        raise ValueError(f"period and max_train_steps must be positive, got {period}, {max_train_steps}")
    n = max(1, max_train_steps // period)
    if n == 1:
        return [int(horizon)]
    top = horizon ** (1.0 / p)
    points = np.array([(top + m * (1.0 - top) / (n - 1)) ** p for m in range(n)])
    return [int(v) for v in np.round(points).astype(np.int32)]


def k_at_step(step: int, max_train_steps: int, period: int, horizon: int = MAX_HORIZON, p: float = 2.0) -> int:
    """The k of a nowcast that happens during optimizer call ``step`` (0-based count of calls so far)."""
    sched = k_schedule(max_train_steps, period, horizon, p)
    return sched[min(len(sched) - 1, step // period)]
