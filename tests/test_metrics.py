"""metrics.py: CRPS, central-interval coverage, NLL/D against an independent computation on a
tiny transformers model, bootstrap intervals of a known distribution, paired comparisons, and
the PIT of calibrated and biased samplers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

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


def test_coverage_counts_the_truth_inside_the_central_interval():
    values = np.arange(11.0)[None, :, None]  # (1 series, 11 samples 0…10, 1 cell)
    # quantiles: 50% → [2.5, 7.5], 90% → [0.5, 9.5]
    assert metrics.coverage(values, np.array([[2.0]]), 0.5) == 0.0
    assert metrics.coverage(values, np.array([[2.0]]), 0.9) == 1.0
    assert metrics.coverage(values, np.array([[9.6]]), 0.9) == 0.0
    # inside the central 50% but away from the median: covered. An interval between the
    # (1 − level) and level quantiles, [5, 5] at 0.5, would miss it
    assert metrics.coverage(values, np.array([[3.0]]), 0.5) == 1.0
    assert metrics.coverage(values, np.array([[7.4]]), 0.5) == 1.0


def test_score_reports_interval_coverage():
    """Two cells, samples (0, 1, 2) in each: 50% interval [0.5, 1.5], 90% [0.1, 1.9]. Truth 0
    lies in neither, truth 1 in both. (Through evaluate.py the stored float32 data never equal
    a decoded forecast exactly, so coverage is pinned here.)"""
    values = np.array([0.0, 1.0, 2.0])[None, :, None, None].repeat(2, axis=3)  # (1, 3, 1, 2)
    m, totals = metrics.score(values, np.array([[[0.0, 1.0]]]), np.zeros((1, 2)), alpha=1.0)
    assert (m["coverage_50"], m["coverage_90"]) == (0.5, 0.5)
    assert [a.tolist() for a in totals["coverage_50"]] == [[1.0], [2.0]]  # 1 of 2 cells


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
    _, totals = metrics.score(values, truths, truths[:, 0], alpha=2.0,
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
    _, ta = metrics.score(np.abs(a), truths, truths[:, 0], alpha=1.0)
    _, tb = metrics.score(b, truths, truths[:, 0], alpha=1.0)
    d = metrics.paired(ta, tb, 1000)["mae_scaled"]
    assert d["difference"] == pytest.approx(-1.0, abs=1e-12)
    assert d["excludes_0"] and d["ci95"][1] < 0 and (d["a_wins"], d["b_wins"]) == (1.0, 0.0)


def test_pit_is_uniform_for_samples_from_the_truths_own_distribution():
    """20 samples per cell and the truth, all from one N(μ, 1) per cell: the PIT histogram is
    flat (largest deviation from 0.1 measured 0.0075 over 6000 cells), and the coverage curve
    lies on the calibrated one for 20 samples (measured within 0.0074); a sampler shifted by
    +1σ puts the truth low: its first bins fill (measured 0.35 in the first, 0.013 in the
    last) and its 50% interval covers 0.31."""
    rng = np.random.default_rng(0)
    mu = rng.normal(0.0, 3.0, (300, 10, 2))
    truths = mu + rng.normal(size=mu.shape)
    calibrated = mu[:, None] + rng.normal(size=(300, 20, 10, 2))
    c = metrics.calibration(calibrated, truths)
    assert np.abs(np.array(c["pit_histogram"]) - 0.1).max() < 0.02
    # 20 calibrated samples cover level·19/21, not the level: measured within 0.008 of it
    curve = c["coverage_curve"]
    assert curve["calibrated"] == pytest.approx([x * 19 / 21 for x in metrics.CURVE_LEVELS])
    assert np.abs(np.array(curve["coverage"]) - np.array(curve["calibrated"])).max() < 0.02
    biased = metrics.calibration(calibrated + 1.0, truths)
    assert biased["pit_histogram"][0] > 0.25 and biased["pit_histogram"][-1] < 0.02
    assert biased["coverage_curve"]["coverage"][4] < 0.4  # 50% interval
    assert metrics.calibration(calibrated[:, :1], truths)["pit_histogram"] is None  # greedy


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
