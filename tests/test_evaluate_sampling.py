"""evaluate.py's sampling seeds: each series' noise comes from a hash of (--seed, its position
in the split), so runs with different seeds share no stream and the batch size changes
nothing."""

from __future__ import annotations

import numpy as np
import pytest

import data
import evaluate


def test_series_seeds_are_a_hash_of_seed_and_position():
    """With seed + position, --seed 1 would reuse --seed 0's noise for the next series."""
    assert evaluate.series_seeds(0, range(2)).tolist() == [3515856193555864121,
                                                           1007771458165660865]
    zero, one = evaluate.series_seeds(0, range(101)), evaluate.series_seeds(1, range(100))
    assert not set(zero.tolist()) & set(one.tolist())
    assert evaluate.series_seeds(0, range(5, 7)).tolist() == zero[5:7].tolist()
    assert (zero >= 0).all()


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """20 series of 10 steps with different values but prompts of one length (no padding
    token, which is outside the tiny checkpoint's 512-token vocabulary)."""
    t = np.arange(10.0)
    rng = np.random.default_rng(0)
    values = rng.uniform(1.0, 9.0, (20, 10, 2))
    values[:, 0] = 9.99  # the maximum of every series: α = 1, so every value is d.dd
    return data.write_h5(tmp_path_factory.mktemp("sampling") / "lv.h5", values, t)


@pytest.mark.slow
def test_sampled_forecasts_do_not_depend_on_the_batch_size(tiny, series, tmp_path):
    def samples(batch_size: str) -> np.ndarray:
        out = tmp_path / f"b{batch_size}"
        assert evaluate.main(["--model", str(tiny[1]), "--data", str(series), "--out", str(out),
                              "--ledger", str(tmp_path / "ledger.jsonl"), "--samples", "3",
                              "--limit", "4", "--forecast-steps", "2", "--batch-size",
                              batch_size, "--dtype", "fp32", "--device", "cpu",
                              "--plot-series", "0"]) == 0
        with np.load(out / "forecasts.npz") as f:
            return {k: f[k] for k in f.files}

    one, four = samples("1"), samples("4")
    assert one.keys() == four.keys()
    for k in one:
        if k.startswith("sum_nll"):  # the teacher-forced pass, padded per batch: fp32 rounding
            np.testing.assert_allclose(one[k], four[k], rtol=1e-6, err_msg=k)  # measured 1.9e-7
        else:  # the samples and every score drawn from them: exactly equal
            np.testing.assert_array_equal(one[k], four[k], err_msg=k)
    assert np.isfinite(one["samples"]).mean() > 0.5  # most samples parse: a real comparison
