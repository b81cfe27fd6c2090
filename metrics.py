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

One footing for every forecaster: the probability mass it puts on the truth's bin, / the bin
width. A baseline's Gaussian scores −ln(Φ(upper) − Φ(lower)) − decimals·ln 10 per value
(Gaussian.bin_nll), not its density at the exact truth, which could climb above any mass / w.
So no forecaster goes below the floor −decimals·ln 10 (nll_floor): all mass on the right bin.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

GAUSSIAN_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # 10%…90%: those of 19 samples
HEADLINE_LEVEL = 0.9  # metrics.json's `coverage`: the interval whose level is nearest this
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


def mean_or_none(x: np.ndarray) -> float | None:
    """Mean over the parsed (finite) entries; None (JSON null) when nothing parsed."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def sample_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """np.nanquantile(values, q, axis=1) with linear interpolation, vectorised: numpy's loops
    over every cell in Python (0.65 s per level for 150 series of 10 samples); here NaN sorts
    last, so the parsed samples of a cell are the first n of its sorted column. Only for
    pictures (trajectories.png's band): the scored intervals are order statistics (Samples)."""
    x = np.sort(values, axis=1)
    n = np.isfinite(values).sum(1, keepdims=True)  # (N, 1, ...)
    position = q * np.maximum(n - 1, 0)
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, np.maximum(n - 1, 0))
    a, b = np.take_along_axis(x, below, 1), np.take_along_axis(x, above, 1)
    return np.where(n > 0, a + (position - below) * (b - a), np.nan)[:, 0]


# ----------------------------------------------------------------------------- forecasts
#
# A forecast is one predictive distribution per cell (series × step × variable), and every
# score is taken from it: the point forecast is its median; CRPS, the central intervals and
# the PIT are its own. Two kinds: the model's samples (Samples), a baseline's Gaussian.


def crps(values: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Sample CRPS, mean|X − y| − ½·mean|X − X'|, over the samples that parsed: the CRPS of
    their empirical distribution. values (N, S, ...), truth (N, ...) → (N, ...); NaN where
    no sample parsed."""
    ok = np.isfinite(values)
    n = ok.sum(1)
    x = np.where(ok, values, 0.0)
    error = (np.abs(x - truth[:, None]) * ok).sum(1)
    pairs = np.abs(x[:, :, None] - x[:, None, :]) * (ok[:, :, None] & ok[:, None, :])  # (N,S,S,…)
    with np.errstate(invalid="ignore", divide="ignore"):
        return error / n - 0.5 * pairs.sum((1, 2)) / n**2


Intervals = list[tuple[np.ndarray, np.ndarray]]  # (covered (N, ...) 1/0/NaN, level (N, ...))


@dataclass
class Samples:
    """S forecast samples per cell, values (N, S, steps, 2), NaN where a sample's step did not
    parse; the distribution is their empirical one (S = 1: a point forecast)."""

    values: np.ndarray

    def median(self) -> np.ndarray:
        """(N, steps, 2): the per-step median over the samples that parsed (LLMTIME's point)."""
        return quiet_nan(np.nanmedian, self.values, axis=1)

    def crps(self, truths: np.ndarray) -> np.ndarray:
        return crps(self.values, truths)

    def quantile(self, q: float) -> np.ndarray:
        """For pictures only (an interpolated quantile has no exact coverage: intervals)."""
        return sample_quantile(self.values, q)

    def intervals(self, truths: np.ndarray) -> Intervals:
        """Per k = 1 … ⌊S/2⌋: is the truth between the k-th smallest and the k-th largest of a
        cell's n parsed samples, and that interval's exact level (n + 1 − 2k)/(n + 1), NaN
        where n < 2k. Why exact: a truth exchangeable with the samples (one more draw of a
        continuous distribution) has each of the n + 1 ranks with probability 1/(n + 1), and
        the interval misses the k lowest and the k highest, whatever the distribution."""
        x = np.sort(self.values, axis=1)  # NaN sorts last: the parsed ones come first
        n = np.isfinite(self.values).sum(1, keepdims=True)  # (N, 1, ...)
        out = []
        for k in range(1, self.values.shape[1] // 2 + 1):
            lower = np.take_along_axis(x, np.full_like(n, k - 1), 1)[:, 0]
            upper = np.take_along_axis(x, np.maximum(n - k, 0), 1)[:, 0]
            ok = n[:, 0] >= 2 * k
            inside = (truths >= lower) & (truths <= upper)
            out.append((np.where(ok, inside, np.nan),
                        np.where(ok, (n[:, 0] + 1 - 2 * k) / (n[:, 0] + 1), np.nan)))
        return out

    def pit(self, truths: np.ndarray, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
        """Probability integral transform per cell: (rank of the truth among the n parsed
        samples + U) / (n + 1), ties split at random, U ~ U(0, 1). If truth and samples are
        exchangeable it is exactly U(0, 1): the rank is uniform on 0 … n. NaN where no sample
        parsed."""
        ok = np.isfinite(self.values)
        n = ok.sum(1)
        below = (ok & (self.values < truths[:, None])).sum(1)
        ties = (ok & (self.values == truths[:, None])).sum(1)
        u = np.random.default_rng(seed).random(below.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, (below + u * (ties + 1)) / (n + 1), np.nan)

    def failure_rate(self) -> float:
        """The share of (series, sample, step) forecasts that did not parse."""
        return float(np.isnan(self.values[..., 0]).mean())

    @property
    def spread(self) -> bool:
        """Whether it has intervals and a PIT at all: a point forecast (S = 1) has neither."""
        return self.values.shape[1] >= 2


def log_normal_cdf(z: np.ndarray) -> np.ndarray:
    """ln Φ(z), accurate in the far lower tail (torch's log_ndtr; float64)."""
    return torch.special.log_ndtr(torch.from_numpy(np.asarray(z, np.float64))).numpy()


def normal_cdf(z: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, np.float64))).numpy()


def log_normal_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ln(Φ(b) − Φ(a)) for a < b, finite in both far tails. An interval right of 0 is mirrored
    to the left (Φ(b) − Φ(a) = Φ(−a) − Φ(−b)), so the difference is of two small numbers, not
    of two near 1; ln Φ(b) + ln(1 − e^(ln Φ(a) − ln Φ(b))) then stays in log space. Where even
    that rounds to ln 0 (b − a below float64's resolution of Φ), the midpoint rule
    ln φ(m) + ln(b − a) is exact to that resolution."""
    mirror = a + b > 0
    lo, hi = np.where(mirror, -b, a), np.where(mirror, -a, b)
    top, bottom = log_normal_cdf(hi), log_normal_cdf(lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        mass = top + np.log(-np.expm1(bottom - top))
        midpoint = -0.5 * ((lo + hi) / 2) ** 2 - 0.5 * math.log(2 * math.pi) + np.log(hi - lo)
    return np.where(np.isfinite(mass), mass, midpoint)


@dataclass
class Gaussian:
    """N(mean, sigma²) per cell: a baseline's forecast distribution. mean (N, steps, 2) is its
    point forecast; sigma > 0 broadcasts to it (σ per horizon and variable: backtest_sigma)."""

    mean: np.ndarray
    sigma: np.ndarray

    spread = True

    def median(self) -> np.ndarray:
        return self.mean

    def failure_rate(self) -> float:
        """The share of steps the baseline could not forecast (non-finite: NaN)."""
        return float(np.isnan(self.mean[..., 0]).mean())

    def z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.sigma

    def crps(self, truths: np.ndarray) -> np.ndarray:
        """Closed form (Gneiting & Raftery 2007): σ·[z(2Φ(z) − 1) + 2φ(z) − 1/√π]."""
        z = self.z(truths)
        density = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return self.sigma * (z * (2 * normal_cdf(z) - 1) + 2 * density - 1 / math.sqrt(math.pi))

    def quantile(self, q: float) -> np.ndarray:
        """mean + Φ⁻¹(q)·σ."""
        return self.mean + torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item() * (
            self.sigma)

    def intervals(self, truths: np.ndarray) -> Intervals:
        """The central interval between the (1 − level)/2 and (1 + level)/2 quantiles, at each
        of GAUSSIAN_LEVELS: a continuous distribution has one at every level."""
        out = []
        for level in GAUSSIAN_LEVELS:
            lower, upper = self.quantile((1 - level) / 2), self.quantile((1 + level) / 2)
            inside = (truths >= lower) & (truths <= upper)
            out.append((np.where(np.isfinite(self.mean), inside, np.nan),
                        np.full(truths.shape, level)))
        return out

    def pit(self, truths: np.ndarray) -> np.ndarray:
        return normal_cdf(self.z(truths))

    def bin_nll(self, truths: np.ndarray, decimals: int) -> np.ndarray:
        """−ln(mass on the truth's LLMTIME bin / bin width) per cell, all in scaled units: the
        model's footing (its token probabilities are the mass on the bin its text names). The
        bin: the reals that `decimals` decimals write as the truth does, centre ± w/2 with
        w = 10^-decimals. Never below −decimals·ln 10, where all the mass is on that bin."""
        w = 10.0**-decimals
        centre = np.vectorize(lambda v: float(f"{v:.{decimals}f}"))(truths)  # as encode writes
        return -log_normal_mass(self.z(centre - w / 2), self.z(centre + w / 2)) + math.log(w)


Forecast = Samples | Gaussian


def nll_floor(decimals: int) -> float:
    """The lowest NLL/D any forecaster can score, scaled units: all its mass on the truth's
    bin, −ln(1 / 10^-decimals) = −decimals·ln 10 (−4.605 at 2 decimals); + ln α in the data's."""
    return -decimals * math.log(10)


# ----------------------------------------------------------------------------- NLL/D


def nll_per_dim(nats: np.ndarray, n_values: int, decimals: int, alpha: float = 1.0
                ) -> np.ndarray:
    """Per-series NLL/D from the target tokens' summed nats (see the module docstring); α = 1
    gives scaled units, the scaler's α the data's own."""
    return np.asarray(nats) / n_values + nll_floor(decimals) + math.log(alpha)


def backtest_sigma(errors: np.ndarray, decimals: int) -> np.ndarray:
    """(steps, 2) σ per horizon and variable, scaled units: the RMS over series of a point
    forecaster's errors `errors` (N, steps, 2) made on the contexts alone (its last `steps`
    context steps forecast from the ones before). Floored at the standard deviation of an
    LLMTIME bin, 10^-decimals/√12: a series the forecaster fits exactly would otherwise get
    σ = 0, a point mass with no PIT, whose every interval has width 0."""
    rms = np.sqrt(quiet_nan(np.nanmean, errors**2, axis=0))
    return np.fmax(rms, 10.0**-decimals / math.sqrt(12))


# ----------------------------------------------------------------------------- calibration


def headline(levels: list[float | None]) -> int | None:
    """Index of the level nearest HEADLINE_LEVEL (the wider on a tie): the interval whose
    coverage metrics.json reports as `coverage`, beside its exact level `coverage_level`.
    A level is None where no cell had enough parsed samples for it; None if all are."""
    scored = [i for i, level in enumerate(levels) if level is not None]
    if not scored:
        return None
    return min(scored, key=lambda i: (abs(levels[i] - HEADLINE_LEVEL), -levels[i]))


def calibration(forecast: Forecast, truths: np.ndarray) -> dict:
    """The PIT histogram (share of cells in each of PIT_BINS equal bins; flat when calibrated)
    and the coverage curve: each central interval's observed coverage beside its exact level
    (the mean over the cells it scores); None for point forecasts."""
    if not forecast.spread:
        return {"pit_histogram": None, "coverage_curve": None}
    u = forecast.pit(truths)
    u = u[np.isfinite(u)]
    counts, _ = np.histogram(u, bins=PIT_BINS, range=(0.0, 1.0))
    intervals = forecast.intervals(truths)
    return {"pit_histogram": (counts / max(len(u), 1)).tolist(),
            "coverage_curve": {"levels": [mean_or_none(level) for _, level in intervals],
                               "coverage": [mean_or_none(inside) for inside, _ in intervals]}}


# ----------------------------------------------------------------------------- per series


Totals = dict[str, tuple[np.ndarray, np.ndarray]]  # metric → (sums (N,), counts (N,))


def per_series(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, ...) cell values, NaN where not scored → (sum over the scored cells, their count)."""
    flat = cells.reshape(len(cells), -1)
    ok = np.isfinite(flat)
    return np.where(ok, flat, 0.0).sum(1), ok.sum(1).astype(float)


def series_totals(forecast: Forecast, truths: np.ndarray, last_context: np.ndarray,
                  alpha: float, nll_scaled: np.ndarray | None) -> Totals:
    """Every headline metric as per-series (sum, count); the forecast and truths (N, steps, 2)
    in original units, last_context (N, 2) the persistence forecast that fills failed steps,
    nll_scaled (N, D) per-value NLL in scaled units (None: no likelihood)."""
    point = forecast.median()
    err = (point - truths) / alpha  # (N, steps, 2) in LLMTIME units
    filled = np.where(np.isnan(point), last_context[:, None], point)
    totals = {
        "mse_scaled": per_series(err**2),
        "mae_scaled": per_series(np.abs(err)),
        "mse_scaled_filled": per_series(((filled - truths) / alpha) ** 2),
        "crps_scaled": per_series(forecast.crps(truths) / alpha),  # CRPS scales with the units
    }
    if forecast.spread:
        intervals = forecast.intervals(truths)
        at = headline([mean_or_none(level) for _, level in intervals])
        if at is not None:
            totals["coverage"] = per_series(intervals[at][0])
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


LABELS = {"n_series": "series", "decoding": "decoding", "samples": "samples",
          "mse_scaled": "MSE (scaled)", "mae_scaled": "MAE (scaled)",
          "mse_scaled_filled": "filled MSE (scaled)", "crps_scaled": "CRPS (scaled)",
          "nll_per_dim_scaled": "NLL/D (scaled)", "coverage": "coverage (its level)",
          "parse_failure_rate": "parse failures", "teacher_forced_ce": "teacher-forced CE",
          "generation_ce": "generation CE"}  # metrics.json keys as the tables head them


def shown_level(m: dict, key: str) -> str:
    """" at 81.8%" after `coverage`: the exact level of the interval it counts."""
    level = m.get("coverage_level") if key == "coverage" else None
    return f" at {100 * level:.1f}%" if level is not None else ""


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


def score(forecast: Forecast, truths: np.ndarray, last_context: np.ndarray, alpha: float,
          nll_scaled: np.ndarray | None = None, n_bootstrap: int = 0) -> tuple[dict, Totals]:
    """(metrics.json's scores, their per-series totals) of a forecast distribution against
    `truths` (N, steps, 2), all in original units; see series_totals for the rest.
    n_bootstrap > 0 adds each metric's `_ci95` interval."""
    totals = series_totals(forecast, truths, last_context, alpha, nll_scaled)
    point = forecast.median()
    err = (point - truths) / alpha
    metrics = {k: ratio(*totals[k]) for k in
               ("mse_scaled", "mae_scaled", "mse", "mae", "mse_scaled_filled", "crps_scaled")}
    metrics |= calibration(forecast, truths)
    curve = metrics["coverage_curve"]
    at = headline(curve["levels"]) if curve else None
    metrics |= {"coverage": None if at is None else curve["coverage"][at],
                "coverage_level": None if at is None else curve["levels"][at]}
    metrics |= {k: ratio(*totals[k]) if k in totals else None
                for k in ("nll_per_dim_scaled", "nll_per_dim")}
    metrics |= {
        "parse_failure_rate": forecast.failure_rate(),
        "mse_scaled_by_horizon": [mean_or_none(err[:, h] ** 2) for h in range(err.shape[1])],
        "mae_scaled_by_horizon": [mean_or_none(np.abs(err[:, h])) for h in range(err.shape[1])],
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
