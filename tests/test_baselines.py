"""baselines.py: exact simple baselines, lv-fit on the project's own simulator and on series
that are not Lotka–Volterra at all, batching, and one-line errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

import baselines
import data
import evaluate
import metrics

TIME = np.linspace(0.0, 200.0, 100)  # the default data's grid (data.simulate), Δt ≈ 2.02
CONTEXT, HORIZON = 70, 10  # evaluate.py's split: 70% of 100 steps, then 10 forecast steps


@pytest.fixture(scope="module")
def simulated() -> tuple[np.ndarray, np.ndarray]:
    """Two systems from data.py's simulator: parameters (2, 4) and float32 series (2, 100, 2)."""
    params, initial = data.sample_systems(2, np.random.default_rng(0))
    return params, data.integrate(params, initial, TIME).astype(np.float32)


def not_lotka_volterra(simulated) -> np.ndarray:
    """(7, 100, 2) series the textbook model does not describe, at coursework-like values."""
    rng = np.random.default_rng(1)
    noisy = simulated[1][0] * np.exp(rng.normal(0.0, 0.3, (100, 2)))  # 30% noise
    with_zeros = simulated[1][1].astype(np.float64)
    with_zeros[::7, 0] = 0.0  # prey recorded as 0 every 7th step
    spike = np.full((100, 2), 0.8)
    spike[30] = 14.0  # one outlier at the coursework file's maximum
    ramp = np.stack([np.linspace(0.0, 5.0, 100), np.linspace(3.0, 0.0, 100)], 1)
    # swaps every step: no LV fit gets closer than the constant at the mean (start −1)
    alternating = np.tile([[0.1, 5.0], [5.0, 0.1]], (50, 1))
    constant, zero = np.full((100, 2), 1.5), np.zeros((100, 2))
    return np.stack([noisy, with_zeros, spike, ramp, constant, zero, alternating])


def test_persistence_and_context_mean_are_exact():
    context = np.array([[[1.0, 2.0], [3.0, 5.0], [2.0, 8.0]], [[0.0, 1.0], [4.0, 1.0], [8.0, 4.0]]])
    last = baselines.forecast("persistence", context, 2).forecasts
    np.testing.assert_array_equal(last, [[[2.0, 8.0]] * 2, [[8.0, 4.0]] * 2])
    mean = baselines.forecast("context-mean", context, 3).forecasts
    np.testing.assert_array_equal(mean, [[[2.0, 5.0]] * 3, [[4.0, 2.0]] * 3])


def test_linear_continues_a_line_on_the_time_stamps_and_clips_at_zero():
    time = np.array([0.0, 1.0, 3.0, 4.0, 6.0, 10.0])  # uneven: the line must use the stamps
    prey, predator = 1.0 + 0.5 * time, 2.0 - 0.25 * time  # the predator line crosses 0 at t = 8
    series = np.stack([prey, predator], -1)[None]  # (1, 6, 2)
    forecast = baselines.forecast("linear", series[:, :4], 2, time).forecasts
    # measured |error| 0.0 here and 1.1e-16 with k = 3 (float64 least squares)
    np.testing.assert_allclose(forecast[0], [[4.0, 0.5], [6.0, 0.0]], rtol=0, atol=1e-12)
    bent = series.copy()
    bent[0, 0] = [9.0, 9.0]  # off the line: only k = 3 (the last 3 steps) still fits exactly
    forecast = baselines.forecast("linear", bent[:, :4], 2, time, k=3).forecasts
    np.testing.assert_allclose(forecast[0], [[4.0, 0.5], [6.0, 0.0]], rtol=0, atol=1e-12)


def test_lv_fit_recovers_the_simulator(simulated):
    params, series = simulated
    res = baselines.forecast("lv-fit", series[:, :CONTEXT], HORIZON, TIME[: CONTEXT + HORIZON])
    # measured max relative error 2.8e-7 (the series are float32, as simulate() stores them);
    # the issue asks for 1%
    np.testing.assert_allclose(res.info["params"], params, rtol=1e-5)
    alpha = series.max(axis=(1, 2), keepdims=True) / 9.99  # the series' own LLMTIME scale
    scaled_mse = (((res.forecasts - series[:, CONTEXT : CONTEXT + HORIZON]) / alpha) ** 2).mean()
    assert scaled_mse < 1e-10  # measured 5.0e-14; the issue asks < 1e-4
    assert res.forecasts.shape == (2, HORIZON, 2) and res.forecasts.dtype == np.float64
    assert (res.info["residual"] < 1e-10).all()  # measured 4.4e-14, 7.0e-15 (data units²)


def test_lv_fit_scores_at_or_above_the_one_bin_floor_with_a_crps_of_its_own(simulated):
    """lv-fit is nearly exact on the simulator's own data, so its backtest σ sits at the floor
    w/√12 (one bin's standard deviation). Scored as the model is, by the mass on the truth's
    bin / w, no value goes below −2·ln 10 = −4.605; at that σ the most mass one bin can hold
    is 2Φ(√3) − 1 = 0.917, so none goes below −4.605 + 0.087 either (measured −4.516 to
    −3.922, mean −4.288: the truth's bin is off-centre by up to w/2). The density at the exact
    truth scored −4.93 in the demo, below any model's reach. Its CRPS is the Gaussian's
    (measured 6.7e-4 scaled), not its MAE (measured 1.2e-7)."""
    _, series = simulated
    scaler = data.LLMTimeScaler.fit(series)
    res = baselines.forecast("lv-fit", series[:, :CONTEXT], HORIZON, TIME[: CONTEXT + HORIZON])
    args = SimpleNamespace(baseline="lv-fit", forecast_steps=HORIZON)
    errors = evaluate.backtest_errors(args, series, TIME, CONTEXT)
    forecast = evaluate.forecast_distribution(res.forecasts[:, None], errors, scaler)
    truths = series[:, CONTEXT : CONTEXT + HORIZON]
    nll = evaluate.density(forecast, truths, scaler, None)
    floor = metrics.nll_floor(scaler.decimals)
    assert floor == pytest.approx(-2 * math.log(10), abs=1e-15)
    best = floor - math.log(2 * stats.norm.cdf(math.sqrt(3)) - 1)
    assert np.isfinite(nll).all() and (nll >= best - 1e-12).all() and nll.min() < best + 0.01
    m, _ = metrics.score(forecast, truths, series[:, CONTEXT - 1], scaler.alpha,
                         nll.reshape(len(series), -1))
    assert m["nll_per_dim_scaled"] >= floor
    assert m["crps_scaled"] > 1000 * m["mae_scaled"]


def test_lv_fit_never_fails_on_series_that_are_not_lotka_volterra(simulated):
    series = not_lotka_volterra(simulated)
    context = series[:, :CONTEXT]
    # grid 1000 adds starts with a = 1000 per sampling interval (starts 3 and 4): the prey
    # grows by e^1000 a step, their ODE overflows and they must never be chosen
    res = baselines.forecast(
        "lv-fit", context, HORIZON, TIME[: CONTEXT + HORIZON], grid=(0.15, 1000.0)
    )
    assert np.isfinite(res.forecasts).all() and (res.forecasts >= 0).all()
    assert np.isfinite(res.info["residual"]).all()
    assert not {3, 4} & set(res.info["start"].tolist())  # measured starts: 0 1 1 0 −1 2 −1
    assert res.info["start"][6] == -1  # the alternating series: only the mean fits this well
    # the context-mean constant always competes, so no fit is worse on its context
    mean_residual = ((context - context.mean(1, keepdims=True)) ** 2).mean((1, 2))
    # + 1e-12: torch and numpy sum in different orders (measured 8.9e-16 on the alternating one)
    assert (res.info["residual"] <= mean_residual + 1e-12).all()
    # a constant series is an LV equilibrium: forecast exactly, residual 0
    np.testing.assert_array_equal(res.forecasts[4], np.full((HORIZON, 2), 1.5))
    assert res.info["residual"][4] == 0.0


def test_lv_fit_batched_equals_one_series_at_a_time(simulated):
    """Series never mix: a series' fit is the same beside others as on its own. Three series,
    so that a misaligned series × start layout pairs some start with another series' data."""
    series = np.concatenate([simulated[1], not_lotka_volterra(simulated)[:1]])  # (3, 100, 2)
    options = dict(grid=(0.15,), iterations=40, polish=5)  # a short fit: only equality matters
    time = TIME[: CONTEXT + HORIZON]
    batch = baselines.forecast("lv-fit", series[:, :CONTEXT], HORIZON, time, **options)
    alone = baselines.forecast("lv-fit", series[1:2, :CONTEXT], HORIZON, time, **options)
    # measured ≤ 5e-12: the same call repeated differs by that much (MKL's solves and least
    # squares are not bit-reproducible from call to call), batched or not
    np.testing.assert_allclose(batch.forecasts[1], alone.forecasts[0], rtol=1e-9, atol=0)
    np.testing.assert_allclose(batch.info["params"][1], alone.info["params"][0], rtol=1e-9)


SHORT = np.array([[[1.0, 4.0], [3.0, 2.0]], [[2.0, 0.0], [2.0, 6.0]]])  # (2 series, 2 steps, 2)
SHORT_FORECASTS = {  # 3 steps from the first 1 or from both context steps (time 0, 1, 2, …)
    1: {name: np.repeat(SHORT[:, :1], 3, 1) for name in ("persistence", "context-mean", "linear")},
    2: {"persistence": np.repeat(SHORT[:, 1:], 3, 1),
        "context-mean": np.full((2, 3, 2), [2.0, 3.0]),
        # the line through the 2 steps at t = 2, 3, 4: prey 1, 3 → 5, 7, 9; predator 4, 2 → 0,
        # −2, −4, clipped at 0; series 1: prey flat at 2, predator 0, 6 → 12, 18, 24
        "linear": np.array([[[5.0, 0.0], [7.0, 0.0], [9.0, 0.0]],
                            [[2.0, 12.0], [2.0, 18.0], [2.0, 24.0]]])},
}


@pytest.mark.parametrize("steps", [0, 1, 2])
@pytest.mark.parametrize("name", baselines.NAMES)
def test_short_contexts_forecast_exactly_or_are_refused(name, steps):
    """0 steps: no baseline forecasts. 1 step: persistence, context-mean and linear (slope 0)
    repeat it. 2 steps: each its own exact forecast. lv-fit refuses fewer than 3 steps."""
    context = SHORT[:, :steps]
    if steps == 0 or name == "lv-fit":
        with pytest.raises(ValueError) as error:
            baselines.forecast(name, context, 3)
        assert str(error.value) == (
            "baselines: context must be (series, steps, 2) with at least one of each, got shape "
            "(2, 0, 2)" if steps == 0 else
            f"baseline 'lv-fit': needs a context of at least 3 steps, got {steps}")
    else:
        forecasts = baselines.forecast(name, context, 3).forecasts
        np.testing.assert_array_equal(forecasts, SHORT_FORECASTS[steps][name])


ONE_LINE_ERRORS = [  # (baseline, what differs from a valid call, the exact message)
    ("arima", {},
     "unknown baseline 'arima'; choose one of persistence, context-mean, linear, lv-fit"),
    ("linear", {"window": 3}, "baseline 'linear': unknown option(s) window; it takes k"),
    ("linear", {"k": 0}, "baseline 'linear': option k must be an integer ≥ 1, got 0"),
    ("persistence", {"context": np.ones((3, 2))},
     "baselines: context must be (series, steps, 2) with at least one of each, got shape (3, 2)"),
    ("persistence", {"context": -np.ones((1, 3, 2))},
     "baselines: context has NaN, inf or negative values; populations ≥ 0"),
    ("persistence", {"horizon": 0}, "baselines: horizon must be an integer ≥ 1, got 0"),
    ("lv-fit", {"time": np.arange(4.0)},
     "baselines: time must be 5 finite, strictly increasing stamps (context steps + horizon), "
     "got shape (4,)"),
]  # fmt: skip


@pytest.mark.parametrize("name, change, message", ONE_LINE_ERRORS)
def test_bad_input_is_a_one_line_error(name, change, message):
    call = {"context": np.ones((1, 3, 2)), "horizon": 2} | change
    with pytest.raises(ValueError) as error:
        baselines.forecast(name, **call)
    assert str(error.value) == message
