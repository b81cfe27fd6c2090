"""metrics.py: CRPS, exact-level central intervals (by hand and by Monte Carlo on three
distributions), the Gaussian forecast's scores against scipy and mpmath, NLL/D against an
independent computation on a tiny transformers model, bootstrap intervals of a known
distribution, paired comparisons, and the PIT of calibrated and biased samplers."""

from __future__ import annotations

import csv
import json
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats

import data
import evaluate
import metrics

FAST = ["--dtype", "fp32", "--device", "cpu"]


def test_crps_known_cases():
    y = np.array([[1.0]])  # (N=1, cells=1)
    assert metrics.crps(np.array([[[3.0]]]), y).item() == 2.0  # one sample: |x − y|
    # two samples: ½(|x1 − y| + |x2 − y|) − ¼·|x1 − x2| = ½(1 + 3) − ¼·4 = 1
    assert metrics.crps(np.array([[[0.0], [4.0]]]), y).item() == 1.0
    # an unparsed sample is left out; no parsed sample → NaN
    assert metrics.crps(np.array([[[0.0], [4.0], [np.nan]]]), y).item() == 1.0
    assert np.isnan(metrics.crps(np.array([[[np.nan]]]), y).item())


def test_sample_intervals_are_order_statistics_named_by_their_exact_level():
    """10 samples 0…9: the k-th smallest to the k-th largest, level (11 − 2k)/11. Truth 0.5
    lies only in the 1st–10th [0, 9] (9/11 = 81.8%); 4.5 in every one down to the 5th–6th
    [4, 5] (1/11). A cell where 3 samples failed has n = 7: its levels are (8 − 2k)/8, and
    k = 4 would need 8 samples (NaN)."""
    values = np.arange(10.0)[None, :, None].repeat(2, axis=2)  # (1 series, 10 samples, 2 cells)
    values[0, 7:, 1] = np.nan
    intervals = metrics.Samples(values).intervals(np.array([[0.5, 4.5]]))
    assert len(intervals) == 5
    assert [inside[0, 0] for inside, _ in intervals] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [level[0, 0] for _, level in intervals] == pytest.approx([9 / 11, 7 / 11, 5 / 11,
                                                                     3 / 11, 1 / 11])
    # n = 7 (samples 0…6): the 1st–7th [0, 6], …, the 3rd–5th [2, 4]; 4.5 lies in k = 1, 2
    assert [level[0, 1] for _, level in intervals][:3] == pytest.approx([6 / 8, 4 / 8, 2 / 8])
    assert [inside[0, 1] for inside, _ in intervals][:3] == [1.0, 1.0, 0.0]
    assert all(np.isnan(level[0, 1]) and np.isnan(inside[0, 1])
               for inside, level in intervals[3:])


@pytest.mark.parametrize("seed, draw", [
    (0, lambda rng, shape: rng.normal(size=shape)),
    (1, lambda rng, shape: rng.lognormal(0.0, 1.0, shape)),  # another seed: not exp(normal's)
    (2, lambda rng, shape: rng.standard_cauchy(shape)),
], ids=["normal", "lognormal", "cauchy"])
def test_exact_levels_hold_by_monte_carlo_whatever_the_distribution(seed, draw):
    """Truth and 10 samples all drawn from one distribution, 100,000 cells: each interval's
    observed coverage equals its exact level (11 − 2k)/11 within 4 Monte Carlo standard
    errors, √(p(1−p)/cells) ≤ 0.0016 (measured |difference| ≤ 0.0027, normal/lognormal/
    Cauchy). The interpolated intervals' 74% at 90% that the issue measured are 2–4 points off."""
    cells = 100_000
    rng = np.random.default_rng(seed)
    values, truths = draw(rng, (cells, 10, 1)), draw(rng, (cells, 1))
    curve = metrics.calibration(metrics.Samples(values), truths)["coverage_curve"]
    exact = [(11 - 2 * k) / 11 for k in range(1, 6)]
    assert curve["levels"] == pytest.approx(exact, abs=1e-12)
    error = [math.sqrt(p * (1 - p) / cells) for p in exact]
    assert all(abs(c - p) < 4 * e for c, p, e in zip(curve["coverage"], exact, error)), (
        curve["coverage"])


def test_score_reports_the_interval_nearest_90_percent_at_its_level():
    """Two cells, samples (0, 1, 2) in each: one interval, the 1st–3rd [0, 2], level 2/4.
    Truth 0 lies on its edge (covered), truth 3 outside. (Through evaluate.py the stored
    float32 data never equal a decoded forecast exactly, so coverage is pinned here.)"""
    values = np.array([0.0, 1.0, 2.0])[None, :, None, None].repeat(2, axis=3)  # (1, 3, 1, 2)
    m, totals = metrics.score(metrics.Samples(values), np.array([[[0.0, 3.0]]]),
                              np.zeros((1, 2)), alpha=1.0)
    assert (m["coverage"], m["coverage_level"]) == (0.5, 0.5)
    assert [a.tolist() for a in totals["coverage"]] == [[1.0], [2.0]]  # 1 of 2 cells
    assert m["coverage_curve"] == {"levels": [0.5], "coverage": [0.5]}


def test_samples_too_few_for_any_interval_score_without_coverage():
    """10 samples of which only one parsed per cell (an unconstrained run that rarely parses):
    no cell has the 2 a central interval needs, so there is no coverage to report, and the
    other scores still come from the one parsed sample."""
    values = np.full((2, 10, 1, 2), np.nan)
    values[:, 0] = 1.0
    truths = np.full((2, 1, 2), 1.5)
    m, totals = metrics.score(metrics.Samples(values), truths, np.zeros((2, 2)), alpha=1.0)
    assert (m["coverage"], m["coverage_level"]) == (None, None)
    assert "coverage" not in totals
    assert m["coverage_curve"]["levels"] == [None] * 5
    assert (m["mae_scaled"], m["crps_scaled"], m["parse_failure_rate"]) == (0.5, 0.5, 0.9)


def test_bootstrap_interval_of_a_mean_of_normal_samples():
    """The mean of n N(0, 1) draws: its 95% interval covers 0 and is about 2·1.96/√n wide
    (measured over seeds 0–9 of the draws: width / (2·1.96/√n) in 0.91–1.06; seed 7's mean
    lies 2.1 standard errors from 0, so its interval rightly misses 0)."""
    n = 400
    for seed in range(10):
        x = np.random.default_rng(seed).normal(size=n)
        (ci,) = metrics.bootstrap({"x": (x, np.ones(n))}, 1000).values()
        assert ci[0] < 0 < ci[1] or abs(x.mean()) > 1.96 / math.sqrt(n), seed
        assert (ci[1] - ci[0]) / (2 * 1.96 / math.sqrt(n)) == pytest.approx(1.0, abs=0.12), seed


def test_paired_comparison_of_a_run_with_itself_is_exactly_zero():
    rng = np.random.default_rng(1)
    values = rng.normal(5.0, 1.0, (30, 4, 3, 2))
    truths = rng.normal(5.0, 1.0, (30, 3, 2))
    _, totals = metrics.score(metrics.Samples(values), truths, truths[:, 0], alpha=2.0,
                              nll_scaled=rng.normal(size=(30, 6)))
    diff = metrics.paired(totals, totals, 1000)
    assert list(diff) == list(metrics.LOWER_IS_BETTER)
    for k, d in diff.items():
        assert (d["difference"], d["ci95"], d["excludes_0"]) == (0.0, [0.0, 0.0], False), k
        assert (d["a_wins"], d["b_wins"]) == (0.0, 0.0), k


def test_paired_comparison_finds_a_real_difference():
    """Run b's errors are run a's plus 1 on every cell: a wins everywhere, the interval of
    a − b lies below 0, and the difference is the hand value."""
    truths = np.zeros((20, 3, 2))
    a = np.random.default_rng(2).normal(0.0, 0.5, (20, 1, 3, 2))
    b = np.abs(a) + 1.0
    _, ta = metrics.score(metrics.Samples(np.abs(a)), truths, truths[:, 0], alpha=1.0)
    _, tb = metrics.score(metrics.Samples(b), truths, truths[:, 0], alpha=1.0)
    d = metrics.paired(ta, tb, 1000)["mae_scaled"]
    assert d["difference"] == pytest.approx(-1.0, abs=1e-12)
    assert d["excludes_0"] and d["ci95"][1] < 0 and (d["a_wins"], d["b_wins"]) == (1.0, 0.0)


def test_pit_histogram_equals_its_exact_expectation():
    """Truth and 3 samples from one N(μ, 1) per cell, 100,000 cells: the rank of the truth is
    uniform on 0…3, so (rank + U)/4 is exactly U(0, 1) and each of the 10 bins holds 0.1 in
    expectation (Monte Carlo standard error 0.00095; measured largest deviation 0.0019). A PIT
    that divides by n = 3 instead of n + 1 puts 0.075 in each bin and a quarter of the cells
    past 1, and one that leaves U out 0.25 in bins 0, 2, 5 and 7: both fail the 0.004 bound.
    A sampler shifted by +1σ puts the truth low: its first bins fill (measured 0.22 in the
    first, 0.027 in the last), and its one interval covers 0.38, not its level 0.5."""
    rng = np.random.default_rng(0)
    mu = rng.normal(0.0, 3.0, (100_000, 1))
    truths = mu + rng.normal(size=mu.shape)
    calibrated = mu[:, None] + rng.normal(size=(100_000, 3, 1))
    c = metrics.calibration(metrics.Samples(calibrated), truths)
    assert np.abs(np.array(c["pit_histogram"]) - 0.1).max() < 0.004, c["pit_histogram"]
    biased = metrics.calibration(metrics.Samples(calibrated + 1.0), truths)
    assert biased["pit_histogram"][0] > 0.2 and biased["pit_histogram"][-1] < 0.04
    assert biased["coverage_curve"]["coverage"][0] < 0.4  # the 1st–3rd of 3: level 0.5
    point = metrics.Samples(calibrated[:, :1])
    assert metrics.calibration(point, truths) == {"pit_histogram": None, "coverage_curve": None}


# ----------------------------------------------------------------------------- one distribution


def test_a_sampled_forecasts_scores_are_its_empirical_distributions():
    """Samples (0, 1, 3, 7) of one cell, truth 2: the median is 2; CRPS = ∫(F(x) − 1{x ≥ 2})²dx
    over the empirical CDF F, integrated exactly piece by piece (steps at the samples): 13/16;
    the 1st–4th interval [0, 7] (level 3/5) covers, the 2nd–3rd [1, 3] (1/5) too; PIT =
    (2 below + U)/5."""
    samples, y = np.array([0.0, 1.0, 3.0, 7.0]), 2.0
    values = samples[None, :, None, None]  # (1, 4, 1, 1)
    forecast = metrics.Samples(values)
    edges = np.sort(np.append(samples, y))
    exact = sum((np.mean(samples <= a) - (a >= y)) ** 2 * (b - a)
                for a, b in zip(edges[:-1], edges[1:]))
    assert exact == 13 / 16
    assert forecast.crps(np.array([[[y]]])).item() == pytest.approx(exact, abs=1e-15)
    assert forecast.median().item() == 2.0
    (wide, wide_level), (narrow, narrow_level) = forecast.intervals(np.array([[[y]]]))
    assert (wide.item(), wide_level.item(), narrow.item(), narrow_level.item()) == (
        1.0, 3 / 5, 1.0, 1 / 5)
    u = np.random.default_rng(metrics.BOOTSTRAP_SEED).random((1, 1, 1)).item()
    assert forecast.pit(np.array([[[y]]])).item() == pytest.approx((2 + u) / 5, abs=1e-15)


def test_a_gaussian_forecasts_scores_equal_scipy():
    """N(μ, σ²) per cell against scipy: CRPS = ∫(Φ((x−μ)/σ) − 1{x ≥ y})²dx by quadrature
    (measured |difference| ≤ 3e-9 relative; quad's own error bound 1e-10 absolute), PIT =
    norm.cdf, coverage = whether y lies in norm.interval(level), the median μ. And its CRPS is
    not its MAE (what a point forecast would score)."""
    rng = np.random.default_rng(3)
    mean, sigma = rng.normal(5.0, 2.0, (4, 3, 2)), rng.uniform(0.05, 3.0, (3, 2))
    truths = mean + rng.normal(0.0, 2.0, mean.shape) * sigma
    g = metrics.Gaussian(mean, sigma)
    s = np.broadcast_to(sigma, mean.shape)
    for i in np.ndindex(mean.shape):
        m, sd, y = mean[i], s[i], truths[i]
        below = integrate.quad(lambda x, m=m, sd=sd: stats.norm.cdf(x, m, sd) ** 2,
                               m - 40 * sd, y, epsabs=1e-12)[0]
        above = integrate.quad(lambda x, m=m, sd=sd: stats.norm.sf(x, m, sd) ** 2,
                               y, m + 40 * sd, epsabs=1e-12)[0]
        assert g.crps(truths)[i] == pytest.approx(below + above, rel=1e-7, abs=1e-10), i
        assert g.pit(truths)[i] == pytest.approx(stats.norm.cdf(y, m, sd), rel=1e-12, abs=1e-15)
    for (inside, level), expected in zip(g.intervals(truths), metrics.GAUSSIAN_LEVELS):
        lo, hi = stats.norm.interval(expected, mean, s)
        assert np.array_equal(inside, ((truths >= lo) & (truths <= hi)).astype(float))
        assert (level == expected).all()
    assert np.array_equal(g.median(), mean)
    m, _ = metrics.score(g, truths, truths[:, 0], alpha=1.0)
    assert m["crps_scaled"] < m["mae_scaled"]
    assert m["crps_scaled"] == pytest.approx(float(np.mean(g.crps(truths))), rel=1e-12)
    assert m["coverage_level"] == pytest.approx(0.9, abs=1e-15)
    assert m["coverage_curve"]["levels"] == pytest.approx(metrics.GAUSSIAN_LEVELS, abs=1e-15)


def mp_bin_nll(mean: float, sigma: float, truth: float, decimals: int) -> float:
    """−ln((Φ(upper) − Φ(lower)) / w) at 500 digits (mpmath: at 40σ the mass is 1e-348, the
    difference of two numbers within 1e-348 of 1), bin = the truth as written."""
    with mpmath.workdps(500):
        w = mpmath.mpf(10) ** -decimals
        centre = mpmath.mpf(f"{truth:.{decimals}f}")
        cdf = [mpmath.ncdf((centre + h - mpmath.mpf(mean)) / mpmath.mpf(sigma))
               for h in (-w / 2, w / 2)]
        return float(-mpmath.log((cdf[1] - cdf[0]) / w))


@pytest.mark.parametrize("decimals", [0, 2, 3])
def test_gaussian_bin_nll_equals_mpmath_and_never_goes_below_the_floor(decimals):
    """The mass on the truth's bin / w, against mpmath at 500 digits, from the centre to 40σ
    away either side (mass e^-800) and with σ far wider than the bin (1e6·w, 1e17·w): measured
    relative difference ≤ 7.9e-12 (torch's log_ndtr in the far tail). Never −inf or NaN;
    never below −decimals·ln 10, which a σ far narrower than the bin reaches (measured within
    9e-16)."""
    w = 10.0**-decimals
    cases = [(1.0, 0.3, 1.0), (1.0, 0.3, 1.2), (50.0, 1.0, 10.0), (10.0, 1.0, 50.0),
             (5.0, 0.01, 5.02), (3.0, 1e6 * w, 2.5), (7.0, 0.3 * w, 7.0),
             (3.0, 1e17 * w, 2.5)]  # Φ(b), Φ(a) round to one float64: the midpoint rule
    mean, sigma, truth = (np.array(c) for c in zip(*cases))
    ours = metrics.Gaussian(mean, sigma).bin_nll(truth, decimals)
    assert np.isfinite(ours).all()
    for got, case in zip(ours, cases):
        assert got == pytest.approx(mp_bin_nll(*case, decimals), rel=3e-11), case
    assert (ours >= metrics.nll_floor(decimals) - 1e-12).all()
    sharp = metrics.Gaussian(np.array([7.0]), np.array([1e-6 * w])).bin_nll(np.array([7.0]),
                                                                           decimals)
    assert sharp.item() == pytest.approx(-decimals * math.log(10), abs=1e-12)


# ----------------------------------------------------------------------------- NLL/D


def allowed_chars(prefix: str, decimals: int) -> set[str]:
    """What the LLMTIME grammar lets follow `prefix` (a prompt ends with ';'), written from the
    format's definition and not from qwen_min.grammar's tables: up to 3 integer digits, then
    '.' and `decimals` digits (no '.' at 0 decimals), ',' after a step's first value and ';'
    after its second."""
    step = prefix.rsplit(";", 1)[1]
    value = step.rsplit(",", 1)[-1]
    separator = "," if "," not in step else ";"
    digits = set("0123456789")
    if "." in value:
        return digits if len(value.split(".")[1]) < decimals else {separator}
    if not value:
        return digits
    ends = {"."} if decimals else {separator}
    return (digits if len(value) < 3 else set()) | ends


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_nll_per_dim_equals_an_independent_computation(tiny, tmp_path, decimals):
    """evaluate.py's NLL/D against a full forward pass of the transformers model on prompt +
    target, each position's log-softmax restricted to the characters allowed_chars gives, the
    nats summed over the target and the ';' that ends its last value (at 0 decimals a digit may
    follow that value instead, so the ';' has a cost), / D values − decimals·ln 10 (+ ln α).
    Measured |difference| ≤ 3.3e-7 (fp32 logits). And the unconstrained variant (full softmax)
    relates to the teacher-forced CE as nats = CE · tokens, and is never below the grammar's."""
    hf, path = tiny
    t = np.arange(16.0)  # short series: an 11-step prompt of ~120 tokens
    series = np.stack([np.stack([5 + 4 * np.sin(t / 3 + k), 6 + 3 * np.cos(t / 4 + k)], 1)
                       for k in range(10)])
    h5 = data.write_h5(tmp_path / "lv.h5", series, t)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(path), "--data", str(h5), "--out", str(out),
                          "--ledger", str(tmp_path / "ledger.jsonl"), *FAST, "--limit", "2",
                          "--forecast-steps", "3", "--batch-size", "2", "--plot-series", "0",
                          "--decimals", str(decimals)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    tokenizer = evaluate.load_tokenizer(path)
    trajectories, _ = data.load_trajectories(h5)
    scaler = data.LLMTimeScaler.fit(trajectories[data.split_indices(10)["train"]], decimals)
    with open(out / "per_series.csv") as f:
        tf_ce = [float(r["teacher_forced_ce"]) for r in csv.DictReader(f)]
    grammar_nll, free_nll = [], []
    for i, index in enumerate(data.split_indices(10)["val"][:2]):
        prompt, target, _ = data.forecast_split(trajectories[index], scaler, 0.7, 3)
        target += ";"  # every value ends with its separator, the last one too
        ids = data.tokenize(tokenizer, prompt + target)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()  # (T, V)
        nats = free = 0.0
        for j, char in enumerate(target):
            row = logits[len(prompt) + j - 1]  # predicts target character j
            allowed = [data.tokenize(tokenizer, c)[0]
                       for c in allowed_chars(prompt + target[:j], decimals)]
            nats -= (row[data.tokenize(tokenizer, char)[0]] - row[allowed].logsumexp(0)).item()
            free -= torch.log_softmax(row, 0)[data.tokenize(tokenizer, char)[0]].item()
        assert free == pytest.approx(tf_ce[i] * len(target), rel=1e-5)
        grammar_nll.append(nats / 6 - decimals * math.log(10))
        free_nll.append(free / 6 - decimals * math.log(10))
        assert grammar_nll[-1] < free_nll[-1]
    assert m["nll_per_dim_scaled"] == pytest.approx(np.mean(grammar_nll), abs=2e-6)
    assert m["nll_per_dim"] == pytest.approx(np.mean(grammar_nll) + math.log(scaler.alpha),
                                             abs=2e-6)
    assert m["density"] == evaluate.DENSITY["model"]


def test_sample_quantile_equals_numpys_nanquantile():
    """The vectorised quantile against numpy's, on samples with unparsed (NaN) ones and a cell
    with none parsed; measured |difference| ≤ 9e-16 (numpy's lerp rounds differently)."""
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 1.0, (40, 7, 3, 2))
    values[rng.random(values.shape) < 0.3] = np.nan
    values[0, :, 0, 0] = np.nan
    for q in (0.0, 0.05, 0.25, 0.5, 0.9, 1.0):
        ours = metrics.sample_quantile(values, q)
        numpy = metrics.quiet_nan(np.nanquantile, values, q, axis=1)
        np.testing.assert_allclose(ours, numpy, rtol=0, atol=4e-15)
        assert np.isnan(ours[0, 0, 0])
