"""Forecast scores: errors, CRPS, interval coverage, NLL per dimension, calibration, and the
bootstrap intervals and paired comparisons that say how sure each number is.

Every score is a mean over cells (series × step × variable, or series × value for NLL/D), so
each is kept per series as a (sum, count) pair: the headline is Σ sums / Σ counts, and a
bootstrap resample of series is the same ratio over the resampled rows. evaluate.py stores the
pairs in forecasts.npz (`sum_<metric>`, `count_<metric>`), so `evaluate.py --compare` and
report.py pair two runs series by series without re-running them.

    NLL/D (LLMTIME, Gruver et al. 2023, models/gpt.py's gpt_nll_fn):
        nll_per_dim_scaled = (Σ_target tokens −log p_G(token)) / D − decimals·ln 10
        nll_per_dim        = nll_per_dim_scaled + ln α
    p_G is the model's next-token distribution renormalised to the tokens the LLMTIME grammar
    allows at that point (qwen_min.grammar: the decoding mask), D the number of target values
    (2 per step). A number written with `decimals` decimals is a bin of width 10^-decimals in
    scaled units, so token probability / bin width is a density; x ↦ x/α scales it by 1/α.
    Without the renormalisation (p = the full softmax) the same formula gives the unconstrained
    variant, teacher_forced_ce · tokens / D − decimals·ln 10 per series, which is never lower:
    renormalising can only raise each token's probability.
"""

from __future__ import annotations

import math
import warnings
import zipfile

import numpy as np

INTERVALS = (0.5, 0.9)  # central intervals whose coverage is reported
CURVE_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # the coverage curve: 10%…90%
PIT_BINS = 10
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 1000  # evaluate.py --bootstrap's default, and report.py's paired intervals
LOWER_IS_BETTER = ("mse_scaled_filled", "mse_scaled", "mae_scaled", "crps_scaled",
                   "nll_per_dim_scaled")  # the metrics --compare and the report pair


def quiet_nan(fn, *a, **kw):
    """numpy's nan-reductions, without the warning for a slice with no parsed value (→ NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*a, **kw)


def point_forecast(values: np.ndarray) -> np.ndarray:
    """(N, S, steps, 2) → (N, steps, 2): the per-step median over the samples that parsed."""
    return quiet_nan(np.nanmedian, values, axis=1)


def crps(values: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Sample CRPS, mean|X − y| − ½·mean|X − X'|, over the samples that parsed.
    values (N, S, ...), truth (N, ...) → (N, ...); NaN where no sample parsed."""
    ok = np.isfinite(values)
    n = ok.sum(1)
    x = np.where(ok, values, 0.0)
    error = (np.abs(x - truth[:, None]) * ok).sum(1)
    pairs = np.abs(x[:, :, None] - x[:, None, :]) * (ok[:, :, None] & ok[:, None, :])  # (N,S,S,…)
    with np.errstate(invalid="ignore", divide="ignore"):
        return error / n - 0.5 * pairs.sum((1, 2)) / n**2


def sample_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """np.nanquantile(values, q, axis=1) with linear interpolation, vectorised: numpy's loops
    over every cell in Python (0.65 s per level for 150 series of 10 samples); here NaN sorts
    last, so the parsed samples of a cell are the first n of its sorted column."""
    x = np.sort(values, axis=1)
    n = np.isfinite(values).sum(1, keepdims=True)  # (N, 1, ...)
    position = q * np.maximum(n - 1, 0)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, np.maximum(n - 1, 0))
    a, b = np.take_along_axis(x, below, 1), np.take_along_axis(x, above, 1)
    return np.where(n > 0, a + (position - below) * (b - a), np.nan)[:, 0]


def covered(values: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """(N, ...) 1.0 where the truth lies in the samples' central `level` interval, 0.0 where
    not, NaN where no sample parsed; values (N, S, ...)."""
    lo, hi = (sample_quantile(values, q) for q in ((1 - level) / 2, (1 + level) / 2))
    return np.where(np.isfinite(lo), (truth >= lo) & (truth <= hi), np.nan)


def coverage(values: np.ndarray, truth: np.ndarray, level: float) -> float | None:
    """Share of (series, step, variable) cells whose truth lies in the samples' central
    `level` interval; cells where no sample parsed are left out. None for point forecasts."""
    if values.shape[1] < 2:  # a point forecast has no interval
        return None
    return mean_or_none(covered(values, truth, level))


def mean_or_none(x: np.ndarray) -> float | None:
    """Mean over the parsed (finite) entries; None (JSON null) when nothing parsed."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


# ----------------------------------------------------------------------------- NLL/D


def nll_per_dim(nats: np.ndarray, n_values: int, decimals: int, alpha: float = 1.0
                ) -> np.ndarray:
    """Per-series NLL/D from the target tokens' summed nats (see the module docstring); α = 1
    gives scaled units, the scaler's α the data's own."""
    return np.asarray(nats) / n_values - decimals * math.log(10) + math.log(alpha)


def gaussian_nll(point: np.ndarray, truths: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """−log N(truth; point, σ²) per cell, in the units of its arguments; sigma broadcasts."""
    return 0.5 * np.log(2 * math.pi * sigma**2) + (truths - point) ** 2 / (2 * sigma**2)


def backtest_sigma(errors: np.ndarray, decimals: int) -> np.ndarray:
    """(steps, 2) σ per horizon and variable, scaled units: the RMS over series of a point
    forecaster's errors `errors` (N, steps, 2) made on the contexts alone (its last `steps`
    context steps forecast from the ones before). Floored at the standard deviation of an
    LLMTIME bin, 10^-decimals/√12: the model's density cannot be sharper than one bin either,
    and a series the forecaster fits exactly would otherwise get an infinite density."""
    rms = np.sqrt(quiet_nan(np.nanmean, errors**2, axis=0))
    return np.fmax(rms, 10.0**-decimals / math.sqrt(12))


# ----------------------------------------------------------------------------- calibration


def pit(values: np.ndarray, truths: np.ndarray, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Probability integral transform per cell: (rank of the truth among the n parsed samples
    + U) / (n + 1), ties split at random, U ~ U(0, 1). If truth and samples are exchangeable
    (the truth is one more draw from the forecast distribution) it is exactly U(0, 1).
    values (N, S, ...) → (N, ...); NaN where no sample parsed."""
    ok = np.isfinite(values)
    n = ok.sum(1)
    below = (ok & (values < truths[:, None])).sum(1)
    ties = (ok & (values == truths[:, None])).sum(1)
    u = np.random.default_rng(seed).random(below.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (below + u * (ties + 1)) / (n + 1), np.nan)


def calibrated_coverage(level: float, samples: int) -> float:
    """The expected coverage of the central `level` interval between two sample quantiles
    (numpy's linear interpolation) of S calibrated samples: level·(S − 1)/(S + 1), below the
    diagonal. Why: the quantile at p sits at order statistic p(S − 1) + 1 of S, and a truth
    exchangeable with the samples falls below the k-th with probability k/(S + 1). At S = 10
    the 90% interval covers 74%; only S → ∞ reaches the diagonal."""
    return level * (samples - 1) / (samples + 1)


def calibration(values: np.ndarray, truths: np.ndarray) -> dict:
    """The PIT histogram (share of cells in each of PIT_BINS equal bins; flat when calibrated)
    and the central intervals' coverage at CURVE_LEVELS beside what calibrated samples of this
    number would give (calibrated_coverage); None for point forecasts."""
    if values.shape[1] < 2:
        return {"pit_histogram": None, "coverage_curve": None}
    u = pit(values, truths)
    u = u[np.isfinite(u)]
    counts, _ = np.histogram(u, bins=PIT_BINS, range=(0.0, 1.0))
    return {"pit_histogram": (counts / max(len(u), 1)).tolist(),
            "coverage_curve": {
                "levels": list(CURVE_LEVELS),
                "coverage": [coverage(values, truths, c) for c in CURVE_LEVELS],
                "calibrated": [calibrated_coverage(c, values.shape[1]) for c in CURVE_LEVELS]}}


# ----------------------------------------------------------------------------- per series


Totals = dict[str, tuple[np.ndarray, np.ndarray]]  # metric → (sums (N,), counts (N,))


def per_series(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, ...) cell values, NaN where not scored → (sum over the scored cells, their count)."""
    flat = cells.reshape(len(cells), -1)
    ok = np.isfinite(flat)
    return np.where(ok, flat, 0.0).sum(1), ok.sum(1).astype(float)


def series_totals(values: np.ndarray, truths: np.ndarray, last_context: np.ndarray,
                  alpha: float, nll_scaled: np.ndarray | None) -> Totals:
    """Every headline metric as per-series (sum, count); values (N, S, steps, 2) and truths
    (N, steps, 2) in original units, last_context (N, 2) the persistence forecast that fills
    failed steps, nll_scaled (N, D) per-value NLL in scaled units (None: no density)."""
    point = point_forecast(values)
    err = (point - truths) / alpha  # (N, steps, 2) in LLMTIME units
    filled = np.where(np.isnan(point), last_context[:, None], point)
    totals = {
        "mse_scaled": per_series(err**2),
        "mae_scaled": per_series(np.abs(err)),
        "mse_scaled_filled": per_series(((filled - truths) / alpha) ** 2),
        "crps_scaled": per_series(crps(values / alpha, truths / alpha)),
    }
    if values.shape[1] >= 2:
        totals |= {f"coverage_{round(100 * c)}": per_series(covered(values, truths, c))
                   for c in INTERVALS}
    if nll_scaled is not None:
        sums, counts = per_series(nll_scaled)
        totals["nll_per_dim_scaled"] = sums, counts
        totals["nll_per_dim"] = sums + counts * math.log(alpha), counts
    totals["mse"] = totals["mse_scaled"][0] * alpha**2, totals["mse_scaled"][1]
    totals["mae"] = totals["mae_scaled"][0] * alpha, totals["mae_scaled"][1]
    return totals


def ratio(sums: np.ndarray, counts: np.ndarray) -> float | None:
    """Σ sums / Σ counts: the mean over every scored cell; None when nothing was scored."""
    total = counts.sum()
    return float(sums.sum() / total) if total else None


def resamples(n_series: int, n: int, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(n, n_series) series indices drawn with replacement: whole series, not steps, since a
    series' steps share its dynamics and are not independent."""
    return np.random.default_rng(seed).integers(0, n_series, (n, n_series))


def resampled(sums: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The ratio over each resample `rows` (n, N) → (n,), NaN where nothing was scored."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[rows].sum(1) / counts[rows].sum(1)


def shown_interval(ci: list[float] | None) -> str:
    """" [lo, hi]" at 3 significant digits, as the tables print an interval after its value."""
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def shown_difference(d: dict | None) -> str:
    """A paired() entry as the tables print it: the difference [95% interval], * when the
    interval excludes 0; then the share of series each run wins (run / reference)."""
    if d is None:
        return "—"
    ci = f" [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]" if d["ci95"] else ""
    wins = (f"; wins {100 * d['a_wins']:.0f}% / {100 * d['b_wins']:.0f}%"
            if d["a_wins"] is not None else "")
    return f"{d['difference']:+.3g}{ci}{'*' if d['excludes_0'] else ''}{wins}"


def interval(x: np.ndarray) -> list[float] | None:
    """The central 95% of the finite bootstrap statistics (the percentile interval)."""
    x = x[np.isfinite(x)]
    return [float(v) for v in np.percentile(x, [2.5, 97.5])] if len(x) else None


def bootstrap(totals: Totals, n: int, seed: int = BOOTSTRAP_SEED) -> dict:
    """`<metric>_ci95`: [lo, hi] for every metric, from n resamples of the series (one draw of
    rows shared by all metrics)."""
    rows = resamples(len(next(iter(totals.values()))[0]), n, seed)
    return {f"{k}_ci95": interval(resampled(s, c, rows)) if c.sum() else None
            for k, (s, c) in totals.items()}


def paired(a: Totals, b: Totals, n: int, seed: int = BOOTSTRAP_SEED) -> dict[str, dict]:
    """Run a − run b on the same series, per metric of LOWER_IS_BETTER that both have: the
    difference of the headline means, its paired-bootstrap 95% interval (the same resampled
    series for both runs), whether that interval excludes 0, and the share of series on which
    each run is strictly lower (series scored by only one run count for neither)."""
    rows = resamples(len(next(iter(a.values()))[0]), n, seed)
    out = {}
    for k in LOWER_IS_BETTER:
        if k not in a or k not in b or not a[k][1].sum() or not b[k][1].sum():
            continue
        ci = interval(resampled(*a[k], rows) - resampled(*b[k], rows)) if n else None
        with np.errstate(invalid="ignore", divide="ignore"):
            sa, sb = a[k][0] / a[k][1], b[k][0] / b[k][1]
        both = np.isfinite(sa) & np.isfinite(sb)
        out[k] = {"difference": ratio(*a[k]) - ratio(*b[k]), "ci95": ci,
                  "excludes_0": bool(ci and (ci[0] > 0 or ci[1] < 0)),
                  "a_wins": float(np.mean(sa[both] < sb[both])) if both.any() else None,
                  "b_wins": float(np.mean(sb[both] < sa[both])) if both.any() else None}
    return out


# ----------------------------------------------------------------------------- the metrics


def score(values: np.ndarray, truths: np.ndarray, last_context: np.ndarray, alpha: float,
          nll_scaled: np.ndarray | None = None, n_bootstrap: int = 0) -> tuple[dict, Totals]:
    """(metrics.json's scores, their per-series totals) of forecasts `values` (N, S, steps, 2)
    against `truths` (N, steps, 2), all in original units; see series_totals for the rest.
    n_bootstrap > 0 adds each metric's `_ci95` interval."""
    totals = series_totals(values, truths, last_context, alpha, nll_scaled)
    point = point_forecast(values)
    err = (point - truths) / alpha
    metrics = {k: ratio(*totals[k]) for k in
               ("mse_scaled", "mae_scaled", "mse", "mae", "mse_scaled_filled", "crps_scaled")}
    metrics |= {f"coverage_{round(100 * c)}": coverage(values, truths, c) for c in INTERVALS}
    metrics |= {k: ratio(*totals[k]) if k in totals else None
                for k in ("nll_per_dim_scaled", "nll_per_dim")}
    metrics |= {
        "parse_failure_rate": float(np.isnan(values[..., 0]).mean()),
        "mse_scaled_by_horizon": [mean_or_none(err[:, h] ** 2) for h in range(err.shape[1])],
        "mae_scaled_by_horizon": [mean_or_none(np.abs(err[:, h])) for h in range(err.shape[1])],
        **calibration(values, truths),
    }
    if n_bootstrap:
        metrics |= bootstrap(totals, n_bootstrap)
    return metrics, totals


def rank_score(m: dict) -> float | None:
    """The validation score "best" minimises: mse_scaled_filled, or mse_scaled where the
    metrics predate it; None when no step parsed."""
    filled = m.get("mse_scaled_filled")
    return m.get("mse_scaled") if filled is None else filled


def best(rows: list[dict]) -> dict:
    """Lowest rank_score; runs without one (nothing parsed) rank after all others, by the
    teacher-forced cross-entropy, so a stage whose forecasts all fail still picks a setting."""
    return min(rows, key=lambda r: (rank_score(r) is None, rank_score(r) or 0.0,
                                    r.get("teacher_forced_ce") or 0.0))


# ----------------------------------------------------------------------------- stored totals


class TotalsError(ValueError):
    """forecasts.npz lacks or garbles the per-series totals: the message says what to do."""


def same_series(a: tuple, b: tuple) -> bool:
    """Whether two load_series results forecast the same series: same indices, same truths."""
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def totals_arrays(totals: Totals) -> dict[str, np.ndarray]:
    """The totals as forecasts.npz arrays: sum_<metric>, count_<metric>."""
    return {f"{kind}_{k}": pair[i] for k, pair in totals.items()
            for i, kind in enumerate(("sum", "count"))}


def load_series(npz_path) -> tuple[np.ndarray, np.ndarray, Totals]:
    """(indices, truths, totals) of an evaluation's forecasts.npz, for paired comparisons."""
    try:
        with np.load(npz_path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TotalsError(f"{npz_path}: not a readable .npz ({e}); run evaluate.py again") from None
    names = [k[len("sum_"):] for k in arrays if k.startswith("sum_")]
    if (not names or "indices" not in arrays or "truths" not in arrays
            or any(f"count_{k}" not in arrays for k in names)):
        raise TotalsError(f"{npz_path}: no per-series totals (sum_*, count_*), written by an "
                          "older evaluate.py; run the evaluation again to compare it")
    return arrays["indices"], arrays["truths"], {k: (arrays[f"sum_{k}"], arrays[f"count_{k}"])
                                                 for k in names}
