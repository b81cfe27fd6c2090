"""Classical forecasts of Lotka–Volterra series: the yardsticks beside the language model.

    res = forecast("lv-fit", context, horizon=10, time=time)
    res.forecasts  # (N, horizon, 2) in the data's units;  res.info: per-series diagnostics

Every baseline sees what the model sees, the first C steps of each series (prey, predator),
and forecasts the next `horizon` steps. None uses a language model, so evaluate.py records
each run in the FLOP ledger with 0 FLOPs.

    persistence    the last context value, repeated
    context-mean   the mean of the context, repeated
    linear         a least-squares line through the last k context steps (default: all of
                   them), continued and clipped at 0
    lv-fit         the Lotka–Volterra ODE fitted to the context, then integrated forward:
                       dx/dt = a·x − b·x·y        x = prey
                       dy/dt = c·x·y − d·y        y = predator

Each forecasts from a context of one step or more, but lv-fit, which needs 3 (MIN_CONTEXT).

lv-fit is the one baseline that knows the physics: on clean simulated data it recovers the
simulator's parameters and its forecast is nearly exact, so it shows how close to exact a
forecaster can get there. How it fits (details in `fit_starts`):
    1. starts     per series, one guess of (a, b, c, d) from a linear regression on the
                  integrated equations, and a grid of guesses that put the equilibrium at the
                  context's time average (on an LV cycle, mean x = d/c and mean y = a/b)
    2. fit        all series × all starts in one tensor program, by multiple shooting: every
                  context step k has its own state, RK4 carries it to step k+1, and a penalty
                  joins the pieces into one trajectory (short integrations keep the loss smooth
                  where one long integration would have a local minimum per cycle miscounted);
                  then a few Levenberg–Marquardt steps on the one-piece trajectory, from the
                  first state, converge tightly
    3. choose     each start's fitted (parameters, initial state) is integrated once over the
                  context and the horizon; the start with the least squared error on the
                  context wins. The constant trajectory at the context mean (an LV equilibrium)
                  always competes, so a series that is not LV at all still gets a finite forecast
                  no worse on its context than context-mean; a start whose ODE overflows loses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

NAMES = ("persistence", "context-mean", "linear", "lv-fit")
# The fewest context steps each baseline forecasts from. One step is enough for the first three
# (linear's line through one point has slope 0: persistence); lv-fit fits 6 unknowns, (a, b, c,
# d) and the first state, which fewer than 3 steps (6 values) cannot determine.
MIN_CONTEXT = {"persistence": 1, "context-mean": 1, "linear": 1, "lv-fit": 3}


@dataclass
class BaselineForecast:
    """forecasts (N, horizon, 2) float64 in the data's units; info: name → (N, ...) array."""

    forecasts: np.ndarray
    info: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Simple baselines
# ---------------------------------------------------------------------------------------------


def persistence(context: np.ndarray, horizon: int, time: np.ndarray) -> BaselineForecast:
    """Every forecast step is the last context step."""
    return BaselineForecast(np.repeat(context[:, -1:], horizon, axis=1))  # (N, horizon, 2)


def context_mean(context: np.ndarray, horizon: int, time: np.ndarray) -> BaselineForecast:
    """Every forecast step is the mean of the context steps."""
    return BaselineForecast(np.repeat(context.mean(axis=1, keepdims=True), horizon, axis=1))


def linear(
    context: np.ndarray, horizon: int, time: np.ndarray, k: int | None = None
) -> BaselineForecast:
    """Least-squares line through the last k context steps (per series and variable), continued
    to the horizon's time stamps and clipped at 0, since populations are never negative.

    The default, every context step, scored best on the training split of the default data
    (scaled MSE 0.38 at k = 70 = C; 0.77 at 20, 1.96 at 10, 3.46 at 2): the cycles are only
    6–30 steps long, so a line through the last few steps runs straight out of a turn. Through
    one step (k = 1, or a 1-step context) the line is flat: the last value, as persistence.
    """
    if k is None:
        k = context.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"baseline 'linear': option k must be an integer ≥ 1, got {k!r}")
    k = min(k, context.shape[1])
    t = time[context.shape[1] - k : context.shape[1]]  # (k,) times of the fitted steps
    y = context[:, -k:]  # (N, k, 2)
    t_mean, y_mean = t.mean(), y.mean(axis=1)  # scalar, (N, 2)
    dt = t - t_mean  # (k,)
    # least squares for a line: slope = Σ (t − t̄)(y − ȳ) / Σ (t − t̄)²; with k = 1 it is 0
    slope = np.einsum("k,nkv->nv", dt, y - y_mean[:, None]) / max(float(dt @ dt), 1e-300)
    future = time[context.shape[1] :] - t_mean  # (horizon,)
    line = y_mean[:, None] + future[None, :, None] * slope[:, None]  # (N, horizon, 2)
    return BaselineForecast(np.clip(line, 0.0, None))


# ---------------------------------------------------------------------------------------------
# Lotka–Volterra fit
# ---------------------------------------------------------------------------------------------


def lv_slope(z: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d/dt of z = (ln x, ln y):  du/dt = a − b·y,  dv/dt = −d + c·x,  i.e. p + q·(y, x) with
    p = (a, −d), q = (−b, c). Logs keep the populations positive (as in data.integrate)."""
    return p + q * torch.exp(z).flip(-1)


def rk4(
    z: torch.Tensor, p: torch.Tensor, q: torch.Tensor, h: torch.Tensor | float, substeps: int
) -> torch.Tensor:
    """Carry log-states z (..., 2) forward by substeps·h with classic RK4 (h broadcasts to z)."""
    for _ in range(substeps):
        k1 = lv_slope(z, p, q)
        k2 = lv_slope(z + 0.5 * h * k1, p, q)
        k3 = lv_slope(z + 0.5 * h * k2, p, q)
        k4 = lv_slope(z + h * k3, p, q)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


def slope_terms(log_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 4) log (a, b, c, d) → p = (a, −d) and q = (−b, c), each (..., 2), for lv_slope."""
    a, b, c, d = log_params.exp().unbind(-1)
    return torch.stack([a, -d], -1), torch.stack([-b, c], -1)


def integrate(
    log_params: torch.Tensor, log_initial: torch.Tensor, time: torch.Tensor, substeps: int
) -> torch.Tensor:
    """Populations (M, T, 2) at `time` (T,) from log (a, b, c, d) (M, 4) and log x0, y0 (M, 2)."""
    p, q = slope_terms(log_params)
    z, states = log_initial, [log_initial]
    for h in (time.diff() / substeps).tolist():
        z = rk4(z, p, q, h, substeps)
        states.append(z)
    return torch.stack(states, 1).exp()  # (M, T, 2)


def regression_guess(context: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """(a, b, c, d) per series (N, 4) from the integrated equations, linear in the parameters:
        ln x(t) − ln x(t0) = a·(t − t0) − b·∫y,     ln y(t) − ln y(t0) = c·∫x − d·(t − t0)
    with trapezoid integrals. Crude at coarse sampling, but a start near the right cycle length.
    Negative or unusable estimates become 0.1 (within the simulator's range)."""
    logs = context.log()  # (N, C, 2)
    steps = time.diff()[None, :, None] * (context[:, 1:] + context[:, :-1]) / 2  # (N, C−1, 2)
    integral = torch.cat([torch.zeros_like(context[:, :1]), steps.cumsum(1)], 1)  # (N, C, 2)
    elapsed = (time - time[0])[None, :].expand(len(context), -1)  # (N, C)
    rise = logs - logs[:, :1]  # (N, C, 2)
    # prey: rise_x = a·elapsed − b·∫y;  predator: rise_y = c·∫x − d·elapsed
    design_x = torch.stack([elapsed, -integral[..., 1]], -1)  # (N, C, 2)
    design_y = torch.stack([integral[..., 0], -elapsed], -1)  # (N, C, 2)
    a_b = torch.linalg.lstsq(design_x, rise[..., :1]).solution[..., 0]  # (N, 2)
    c_d = torch.linalg.lstsq(design_y, rise[..., 1:]).solution[..., 0]  # (N, 2)
    guess = torch.cat([a_b, c_d], -1)  # (N, 4)
    return torch.where(torch.isfinite(guess) & (guess > 0), guess, torch.full_like(guess, 0.1))


def initial_guesses(
    context: torch.Tensor, time: torch.Tensor, grid: tuple[float, ...]
) -> torch.Tensor:
    """Log (a, b, c, d) starts (N, S, 4): the regression guess, then for each (a, d) of the grid
    (in units of 1 / the mean sampling interval) the b and c that put the equilibrium
    (d/c, a/b) at the context's time averages."""
    per_step = 1 / time.diff().mean()
    rates = torch.tensor([(a, d) for a in grid for d in grid], dtype=context.dtype) * per_step
    a, d = rates.T[:, None, :]  # each (1, G)
    mean_x, mean_y = context.mean(1).T[:, :, None]  # each (N, 1)
    grid_guess = torch.stack(torch.broadcast_tensors(a, a / mean_y, d / mean_x, d), -1)
    return torch.cat([regression_guess(context, time)[:, None], grid_guess], 1).log()


def shooting_loss(
    log_params: torch.Tensor,
    log_states: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    substeps: int,
    join_weight: float,
) -> torch.Tensor:
    """Multiple-shooting loss per fit (M,): misfit of the states to the data + join_weight ×
    the gaps where RK4 carries state k over steps[k] and lands beside state k+1.

    log_params (M, 4), log_states (M, C, 2), target (M, C, 2) already divided by the series'
    scale, so every series weighs the same; steps (C−1,) the sampling intervals.
    """
    p, q = slope_terms(log_params[:, None])  # each (M, 1, 2): one ODE per fit, all its pieces
    landed = rk4(log_states[:, :-1], p, q, (steps / substeps)[None, :, None], substeps)
    misfit = (log_states.exp() - target).square().mean((1, 2))
    gap = (landed.exp() - log_states[:, 1:].exp()).square().mean((1, 2))
    return misfit + join_weight * gap


def fit_multiple_shooting(
    log_params: torch.Tensor,
    target: torch.Tensor,
    time: torch.Tensor,
    iterations: int,
    substeps: int,
    join_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the log-parameters (M, 4) and the log-states (M, C, 2), which start at the data.

    The fits share no parameters: the gradient of the summed loss reaches each fit through its
    own loss only, so a fit whose ODE overflows gets NaN gradients, stays non-finite and loses
    at the selection, without touching the others.
    """
    # log(0) guard for series with zeros: the target is in units of its series' maximum, so
    # the states start no lower than 0.1% of it
    log_states = target.clamp_min(1e-3).log().requires_grad_()
    log_params = log_params.clone().requires_grad_()
    optimizer = torch.optim.Adam([log_params, log_states], lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations, eta_min=1e-4)
    for _ in range(iterations):
        loss = shooting_loss(log_params, log_states, target, time.diff(), substeps, join_weight)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        schedule.step()
    return log_params.detach(), log_states.detach()[:, 0]


def least_squares_polish(
    unknowns: torch.Tensor,
    target: torch.Tensor,
    time: torch.Tensor,
    iterations: int,
    substeps: int,
) -> torch.Tensor:
    """Levenberg–Marquardt on single-shooting fits: unknowns (M, 6) = log (a, b, c, d, x0, y0),
    residuals = the integrated trajectory minus target (M, C, 2). Returns the polished (M, 6).

    Multiple shooting lands near the right trajectory but, with a finite join penalty, not on
    it; a few Gauss–Newton steps on the one-piece trajectory then converge fast and tightly.
    The Jacobian comes from forward differences, all 6 nudged copies integrated in the same
    batch as the trial point. A trial that does not lower a fit's error (or overflows) is
    rejected and its damping grows, so every fit only ever improves.
    """
    m, c = target.shape[:2]
    nudge = 1e-6 * torch.eye(6, dtype=unknowns.dtype)  # forward differences in log space

    def evaluate(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.cat([u[:, None], u[:, None] + nudge], 1).reshape(m * 7, 6)  # (M·7, 6)
        paths = integrate(rows[:, :4], rows[:, 4:], time, substeps).reshape(m, 7, c * 2)
        residual = paths[:, 0] - target.reshape(m, c * 2)  # (M, 2C)
        jacobian = (paths[:, 1:] - paths[:, :1]).transpose(1, 2) / 1e-6  # (M, 2C, 6)
        error = residual.square().sum(1)
        return torch.where(torch.isfinite(error), error, torch.inf), residual, jacobian

    error, residual, jacobian = evaluate(unknowns)
    damping = torch.full((m, 1), 1e-3, dtype=unknowns.dtype)
    for _ in range(iterations):
        jtj = jacobian.transpose(1, 2) @ jacobian  # (M, 6, 6)
        jtr = (jacobian.transpose(1, 2) @ residual[..., None])[..., 0]  # (M, 6)
        scaled = torch.diagonal(jtj, dim1=1, dim2=2) + 1e-12  # Marquardt's diagonal scaling
        system = jtj + torch.diag_embed(damping * scaled)
        step = torch.linalg.solve(system, -jtr.nan_to_num(0.0, 0.0, 0.0))
        trial = unknowns + step.nan_to_num(0.0, 0.0, 0.0)
        trial_error, trial_residual, trial_jacobian = evaluate(trial)
        better = trial_error < error  # (M,)
        unknowns = torch.where(better[:, None], trial, unknowns)
        residual = torch.where(better[:, None], trial_residual, residual)
        jacobian = torch.where(better[:, None, None], trial_jacobian, jacobian)
        error = torch.where(better, trial_error, error)
        damping = torch.where(better[:, None], damping / 3, damping * 4).clamp(1e-9, 1e9)
    return unknowns


def fit_starts(
    series: torch.Tensor,
    time: torch.Tensor,
    grid: tuple[float, ...],
    iterations: int,
    polish: int,
    substeps: int,
    join_weight: float,
) -> torch.Tensor:
    """Every start fitted to its series (N, C, 2) at `time` (C,): log (a, b, c, d, x0, y0) in the
    data's units, (N, S, 6). All N·S fits run as one batch, series-major (row = n·S + s)."""
    n = len(series)
    scale = series.amax((1, 2), keepdim=True).clamp_min(1e-12)  # (N, 1, 1)
    starts = initial_guesses(torch.maximum(series, 1e-3 * scale), time, grid)  # (N, S, 4)
    s = starts.shape[1]
    # fit in units of the series' maximum (x → x/scale turns b, c into b·scale, c·scale), so
    # that one learning rate and one damping suit every series
    log_scale = scale.log()  # (N, 1, 1)
    to_scaled = torch.cat(
        [log_scale * torch.tensor([0.0, 1.0, 1.0, 0.0]), -log_scale.expand(n, 1, 2)], -1
    )  # (N, 1, 6): added to log (a, b, c, d, x0, y0)
    target = (series / scale).repeat_interleave(s, 0)  # (N·S, C, 2)
    log_params = (starts + to_scaled[..., :4]).reshape(n * s, 4)
    log_params, log_initial = fit_multiple_shooting(
        log_params, target, time, iterations, substeps, join_weight
    )
    unknowns = torch.cat([log_params, log_initial], 1)  # (N·S, 6)
    unknowns = least_squares_polish(unknowns, target, time, polish, substeps)
    return unknowns.reshape(n, s, 6) - to_scaled


def lv_fit(
    context: np.ndarray,
    horizon: int,
    time: np.ndarray,
    grid: tuple[float, ...] = (0.05, 0.15, 0.45),
    iterations: int = 100,
    polish: int = 15,
    substeps: int = 8,
    join_weight: float = 10.0,
) -> BaselineForecast:
    """Fit the Lotka–Volterra ODE to each context and integrate it `horizon` steps further.

    Options: `grid`, the rates a and d (per mean sampling interval) of the grid starts, each
    (a, d) pair one start; `iterations` of Adam on the multiple-shooting loss; `polish`,
    Levenberg–Marquardt iterations on the one-piece trajectory; `substeps`, RK4 steps per
    sampling interval (8 keeps RK4's error near 1e-6 relative at the default data's Δt ≈ 2);
    `join_weight`, the multiple-shooting penalty on gaps between the pieces.

    info (all per series): residual (N,), the fitted trajectory's mean squared error on the
    context in the data's units; params (N, 4) = (a, b, c, d); initial (N, 2), the fitted
    state at the first context step; start (N,), the winning start (0 = regression guess,
    1… = grid, −1 = the constant at the context mean).
    """
    n, c = context.shape[:2]
    series, t = torch.from_numpy(context), torch.from_numpy(time)  # (N, C, 2), (C + horizon,)
    unknowns = fit_starts(series, t[:c], grid, iterations, polish, substeps, join_weight)
    s = unknowns.shape[1]
    paths = integrate(*unknowns.reshape(n * s, 6).split(4, 1), t, substeps)  # (N·S, C + h, 2)
    # the constant at the context mean is an LV equilibrium (for a = d = 1 per time unit, b and
    # c put (d/c, a/b) there): always finite, it competes as start −1
    mean = series.mean(1).clamp_min(1e-15)  # (N, 2), > 0 for its logarithm
    constant = torch.stack([torch.ones(n), 1 / mean[:, 1], 1 / mean[:, 0], torch.ones(n)], 1)
    unknowns = torch.cat([torch.cat([constant.log(), mean.log()], 1)[:, None], unknowns], 1)
    paths = torch.cat(
        [mean[:, None, None].expand(n, 1, c + horizon, 2), paths.reshape(n, s, c + horizon, 2)], 1
    )  # (N, 1+S, C + horizon, 2)
    residual = (paths[:, :, :c] - series[:, None]).square().mean((2, 3))  # (N, 1+S)
    residual = torch.where(torch.isfinite(paths).all(3).all(2), residual, torch.inf)
    best = residual.argmin(1)  # (N,) the least squared error on the context wins
    rows = torch.arange(n)
    fitted = unknowns[rows, best].exp()  # (N, 6)
    return BaselineForecast(
        paths[rows, best, c:].numpy(),
        {
            "residual": residual[rows, best].numpy(),
            "params": fitted[:, :4].numpy(),
            "initial": fitted[:, 4:].numpy(),
            "start": (best - 1).numpy(),
        },
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

BASELINES: dict[str, Callable[..., BaselineForecast]] = {
    "persistence": persistence,
    "context-mean": context_mean,
    "linear": linear,
    "lv-fit": lv_fit,
}


def check_inputs(context: np.ndarray, horizon: int, time: np.ndarray) -> None:
    """One-line ValueErrors for shapes and values the baselines cannot forecast from."""
    if context.ndim != 3 or context.shape[2] != 2 or 0 in context.shape[:2]:
        raise ValueError(
            f"baselines: context must be (series, steps, 2) with at least one of each, "
            f"got shape {context.shape}"
        )
    if not np.isfinite(context).all() or (context < 0).any():
        raise ValueError("baselines: context has NaN, inf or negative values; populations ≥ 0")
    if not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"baselines: horizon must be an integer ≥ 1, got {horizon!r}")
    steps = context.shape[1] + horizon
    if time.shape != (steps,) or not np.isfinite(time).all() or not (np.diff(time) > 0).all():
        raise ValueError(
            f"baselines: time must be {steps} finite, strictly increasing stamps (context steps"
            f" + horizon), got shape {time.shape}"
        )


def forecast(
    name: str,
    context: np.ndarray,
    horizon: int,
    time: np.ndarray | None = None,
    **options,
) -> BaselineForecast:
    """Forecast `horizon` steps after each context (N, C, 2) with the baseline `name` (NAMES).

    time: (C + horizon,) stamps of the context and forecast steps (default 0, 1, 2, …); only
    linear and lv-fit use it. options: the baseline's keyword options (linear: k; lv-fit: grid,
    iterations, substeps, join_weight).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(NAMES)}")
    run = BASELINES[name]
    allowed = list(inspect.signature(run).parameters)[3:]  # after context, horizon, time
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"baseline {name!r}: unknown option(s) {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'no options'}"
        )
    context = np.asarray(context, dtype=np.float64)
    steps = context.shape[1] + horizon if context.ndim == 3 and isinstance(horizon, int) else 0
    time = np.arange(steps, dtype=np.float64) if time is None else np.asarray(time, np.float64)
    check_inputs(context, horizon, time)
    if context.shape[1] < MIN_CONTEXT[name]:
        raise ValueError(f"baseline {name!r}: needs a context of at least {MIN_CONTEXT[name]} "
                         f"steps, got {context.shape[1]}")
    threads = torch.get_num_threads()
    # the baselines' tensors are small and element-wise: OpenMP's hand-off between threads costs
    # more than the work (exp of 14,000 float64 values took 27 ms on 2 threads and 0.03 ms on 1
    # on the busy 2-core machine), so they run on one thread and restore the caller's setting
    torch.set_num_threads(1)
    try:
        result = run(context, horizon, time, **options)
    finally:
        torch.set_num_threads(threads)
    return BaselineForecast(result.forecasts.astype(np.float64), result.info)
