"""PLACEHOLDER for the baselines helper's baselines.py (same API; replaced at merge).

Only persistence and context-mean are implemented here, for evaluate.py's integration tests;
linear and lv-fit come with the real file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NAMES = ("persistence", "context-mean", "linear", "lv-fit")


@dataclass
class Result:
    forecasts: np.ndarray  # (N, horizon, 2), original units
    info: dict = field(default_factory=dict)


def forecast(name: str, context: np.ndarray, horizon: int, time=None, **options) -> Result:
    """context (N, C, 2) → Result with forecasts (N, horizon, 2)."""
    if name == "persistence":
        level = context[:, -1]
    elif name == "context-mean":
        level = context.mean(1)
    else:
        raise ValueError(f"baseline {name!r} is not in this placeholder; choose from {NAMES[:2]}")
    return Result(np.repeat(level[:, None], horizon, axis=1))
