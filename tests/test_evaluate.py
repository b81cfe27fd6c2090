"""evaluate.py: metrics as hand-computed numbers (generate stubbed), CRPS and coverage, adapter
metadata rules, baselines, bad flags, and the FLOP ledger against flops.evaluation_flops."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

import data
import evaluate
import flops
import ledger
from lora import apply_lora, save_adapter
from qwen_min import Qwen2Config, generate, load_model, load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_vocab_checkpoint):
    """A tiny checkpoint and 20 identical series whose numbers are easy by hand.

    prey = 2t (0, 2, …, 18), predator = 19.98 at every step t = 0…9, so α = 19.98 / 9.99 = 2:
    scaled, prey is t and predator 9.99. Context: the first 7 steps; 3 forecast steps, whose
    truth is prey 14, 16, 18 (scaled 7, 8, 9) and predator 19.98. Persistence: (12, 19.98)."""
    root = tmp_path_factory.mktemp("evaluate")
    ckpt = real_vocab_checkpoint
    t = np.arange(10.0)
    one = np.stack([2 * t, np.full(10, 19.98)], axis=1)  # (10 steps, 2)
    h5 = data.write_h5(root / "lv.h5", np.repeat(one[None], 20, axis=0), t)
    return ckpt, h5, load_tokenizer(ckpt)


def base_args(setup, tmp_path, *extra):
    ckpt, h5, _ = setup
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "eval"),
            "--forecast-steps", "3", "--ledger", str(tmp_path / "ledger.jsonl"),
            "--dtype", "fp32", "--device", "cpu", "--limit", "2", *extra]


def stub_generate(tokenizer, texts: list[str], boost: dict[int, list[int]] | None = None):
    """A stand-in for qwen_min.generate with its API: row r writes texts[r] (then padding);
    logits are 0, except that for rows in `boost` the listed token at each step gets
    ln(V − 1), so that token's probability is exactly ½. Records each call's arguments."""
    calls = []

    def generate(model, ids, max_new_tokens, mask, eos_token_id=None, cache=None,
                 prefill_rows=4, *, grammar=None, n_steps=None, sampling=None,
                 return_logits=True, compiled_decode=False):
        samples, temperature, top_p, seeds = (sampling.samples, sampling.temperature,
                                              sampling.top_p, sampling.seeds)
        start = sum(len(c["seeds"]) * max(c["samples"], 1) for c in calls)
        calls.append(dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          grammar=grammar, n_steps=n_steps, samples=samples,
                          temperature=temperature, top_p=top_p, seeds=seeds.tolist(),
                          return_logits=return_logits))
        if cache is not None:  # as generate leaves it: the prompt's keys/values (zeros here)
            cache.length = ids.shape[1]
        mine = texts[start : start + len(ids) * max(samples, 1)]
        rows = [data.tokenize(tokenizer, t) for t in mine]
        n = max(map(len, rows))
        tokens = torch.full((len(rows), n), data.PAD_ID)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row)
        if not return_logits:
            return tokens, None
        V = model.cfg.vocab_size
        logits = torch.zeros(len(rows), n, V)
        for r, wanted in (boost or {}).items():
            logits[r, torch.arange(len(wanted)), wanted] = math.log(V - 1)
        return tokens, logits

    generate.calls = calls
    return generate


GREEDY_TEXTS = ["7.50,9.99;8.00,9.49;9.00,9.99;",  # errors: prey +1 at step 0, predator −1 at 1
                "7.00,9.99;8.00;9.50,9.99;"]  # step 1 does not parse; prey +1 at step 2
TARGET = "7.00,9.99;8.00,9.99;9.00,9.99;"  # as scored: the last value's ';' included
# the HDF5 file holds float32: 19.98 is stored as 19.9799995…, so α = 1.99999995…; measured
# relative differences from the exact hand values: at most 5e-7
REL = 2e-6


def test_metrics_as_numbers(setup, tmp_path, monkeypatch):
    """Known forecasts and truth: every metric against its hand-computed value.

    Scaled errors (/α = /2): series 0 has 0.5 at (step 0, prey) and (step 1, predator); series
    1 has 0.5 at (step 2, prey) and step 1 unparsed. Over the 10 parsed values: MSE 4·0.25/…
    = 0.75/10, MAE 1.5/10; in original units ×4 and ×2. Filled: series 1's step 1 becomes
    persistence (12, 19.98) against (16, 19.98): scaled error 2, so (0.75 + 4) / 12.
    generation_ce: series 0's logits give the true token probability ½ at each of the 30
    target positions (ln 2); series 1's are uniform (ln V)."""
    ckpt, h5, tokenizer = setup
    V = 151936
    stub = stub_generate(tokenizer, GREEDY_TEXTS, boost={0: data.tokenize(tokenizer, TARGET)})
    monkeypatch.setattr(evaluate, "generate", stub)
    assert evaluate.main(base_args(setup, tmp_path)) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_series"] == 2 and m["alpha"] == pytest.approx(2.0, rel=REL)
    assert m["mse_scaled"] == pytest.approx(0.075, rel=REL)
    assert m["mae_scaled"] == pytest.approx(0.15, rel=REL)
    assert m["mse"] == pytest.approx(0.3, rel=REL)
    assert m["mae"] == pytest.approx(0.3, rel=REL)
    assert m["mse_scaled_by_horizon"] == pytest.approx([0.0625, 0.125, 0.0625], rel=REL)
    assert m["mae_scaled_by_horizon"] == pytest.approx([0.125, 0.25, 0.125], rel=REL)
    assert m["mse_scaled_filled"] == pytest.approx(4.75 / 12, rel=REL)
    assert m["crps_scaled"] == pytest.approx(0.15, rel=REL)  # one sample: the MAE
    assert m["parse_failure_rate"] == pytest.approx(1 / 6, rel=REL)
    # fp32 log-softmax over 151,936 logits: measured |difference| 3.9e-5
    assert m["generation_ce"] == pytest.approx((math.log(2) + math.log(V)) / 2, abs=1e-4)
    assert m["decoding"] == "grammar-constrained, greedy" and m["coverage"] is None
    # 3 steps of two 1–3-digit numbers with 2 decimals: 3·(2·(3 + 1 + 2) + 2) tokens at most
    (call,) = stub.calls
    assert call["max_new_tokens"] == 42 and call["n_steps"] == 3 and call["grammar"] is not None
    assert call["eos_token_id"] == data.PAD_ID and call["return_logits"] is True


def test_unconstrained_is_recorded(setup, tmp_path, monkeypatch):
    stub = stub_generate(setup[2], GREEDY_TEXTS)
    monkeypatch.setattr(evaluate, "generate", stub)
    assert evaluate.main(base_args(setup, tmp_path, "--unconstrained")) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["decoding"] == "unconstrained, greedy"
    assert stub.calls[0]["grammar"] is None and stub.calls[0]["max_new_tokens"] == 42


def test_sampled_forecasts(setup, tmp_path, monkeypatch):
    """3 samples per series: the point forecast is the per-step median, CRPS and coverage come
    from the samples, every sample is kept, and each series has its own seed."""
    samples = ["7.00,9.99;8.00,9.99;9.00,9.99;",  # series 0: the truth,
               "8.00,9.99;8.00,9.99;9.00,9.99;",  # prey +2 (scaled +1) at step 0,
               "10.00,9.99;8.00,9.99;9.00,9.99;",  # prey +6 (scaled +3) at step 0
               *["7.00,9.99;8.00,9.99;9.00,9.99;"] * 2,  # series 1: 2 exact,
               "7.00;8.00;9.00;"]  # and 1 that fails every step
    stub = stub_generate(setup[2], samples)
    monkeypatch.setattr(evaluate, "generate", stub)
    args = base_args(setup, tmp_path, "--samples", "3", "--temperature", "0.7", "--top-p",
                     "0.9", "--seed", "5")
    assert evaluate.main(args) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # median of series 0, step 0 prey: 8 (scaled error 1; the mean would be 8.33); all else
    # exact, over 12 cells
    assert m["mse_scaled"] == pytest.approx(1 / 12, rel=REL)
    assert m["mse_scaled_filled"] == pytest.approx(1 / 12, rel=REL)
    # the one inexact cell: scaled errors 0, 1, 3 → mean|X−y| = 4/3,
    # mean|X−X'| = 2·(1 + 3 + 2)/9 = 4/3, so CRPS = 4/3 − 2/3 = 2/3; the other 11 are 0
    assert m["crps_scaled"] == pytest.approx(2 / 3 / 12, rel=REL)
    assert m["parse_failure_rate"] == pytest.approx(3 / 18)  # 1 sample × 3 steps of 6 × 3
    # one interval, the 1st–3rd of n parsed samples, level (n − 1)/(n + 1): 1/2 in series 0's
    # 6 cells, 1/3 in series 1's (n = 2); its exact level is their mean
    assert m["coverage_level"] == pytest.approx(5 / 12, abs=1e-15)
    assert m["generation_ce"] is None and m["teacher_forced_ce"] > 0
    assert m["decoding"] == "grammar-constrained, 3 samples"
    (call,) = stub.calls
    assert call["seeds"] == evaluate.series_seeds(5, range(2)).tolist()
    assert call["samples"] == 3 and call["return_logits"] is False
    assert (call["temperature"], call["top_p"]) == (0.7, 0.9)
    saved = np.load(tmp_path / "eval" / "forecasts.npz")
    assert saved["samples"].shape == (2, 3, 3, 2)
    assert saved["forecasts"][0, 0, 0] == pytest.approx(16.0, rel=REL)  # the median: 8.00·α


def test_baseline_run_same_outputs_and_a_zero_flop_record(setup, tmp_path):
    """persistence repeats (12, 19.98): scaled prey errors −1, −2, −3, predator 0, so MSE 14/6.
    Its distribution: a Gaussian around the forecast, σ per horizon from the backtest on the
    context (steps 4–6 from step 3: prey errors 1, 2, 3 scaled, so σ = h; predator exact, so
    σ = the bin floor 0.01/√12). Every score comes from it, computed here with scipy: prey
    z = 1 at every horizon, predator z = 0."""
    assert evaluate.main(base_args(setup, tmp_path, "--baseline", "persistence")) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["mse_scaled"] == pytest.approx(14 / 6, rel=REL)
    assert m["mse_scaled_by_horizon"] == pytest.approx([0.5, 2.0, 4.5], rel=REL)
    assert m["decoding"] == "baseline" and m["baseline"] == "persistence"
    assert m["parse_failure_rate"] == 0.0 and m["flops"] == 0
    (record,) = ledger.read_ledger(tmp_path / "ledger.jsonl")
    assert (record["kind"], record["flops"], record["series"]) == ("baseline", 0, [0, 2])
    for f in ("per_series.csv", "forecasts.npz", "trajectories.png", "horizon.png"):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    floor = 0.01 / math.sqrt(12)
    # NLL/D: the mass on the truth's bin (7, 8, 9 ± 0.005; predator 9.99 ± 0.005) / 0.01
    norm = stats.norm
    prey = [-math.log((norm.cdf(6 + h + 0.005, 6, h) - norm.cdf(6 + h - 0.005, 6, h)) / 0.01)
            for h in (1, 2, 3)]
    predator = -math.log((norm.cdf(0.005, 0, floor) - norm.cdf(-0.005, 0, floor)) / 0.01)
    nll = (sum(prey) + 3 * predator) / 6
    assert m["nll_per_dim_scaled"] == pytest.approx(nll, rel=REL)
    assert m["nll_per_dim"] == pytest.approx(nll + math.log(2.0), rel=REL)
    assert m["nll_per_dim_scaled"] >= -2 * math.log(10)
    # CRPS: σ·[z(2Φ(z) − 1) + 2φ(z) − 1/√π], not the MAE (1)
    crps = ((1 + 2 + 3) * (2 * norm.cdf(1) - 1 + 2 * norm.pdf(1) - 1 / math.sqrt(math.pi))
            + 3 * floor * (2 * norm.pdf(0) - 1 / math.sqrt(math.pi))) / 6
    assert m["crps_scaled"] == pytest.approx(crps, rel=REL)
    assert m["mae_scaled"] == pytest.approx(1.0, rel=REL)
    # coverage: prey |z| = 1 lies inside the central intervals of level ≥ 2Φ(1) − 1 = 68%,
    # predator z = 0 inside all; PIT Φ(1) = 0.84 for prey, ½ for predator
    assert m["coverage_curve"]["coverage"] == [0.5] * 6 + [1.0] * 3
    assert (m["coverage"], m["coverage_level"]) == (1.0, pytest.approx(0.9))
    assert m["pit_histogram"] == [0.0] * 5 + [0.5, 0.0, 0.0, 0.5, 0.0]
    saved = np.load(tmp_path / "eval" / "forecasts.npz")
    np.testing.assert_allclose(saved["sigma"][0] / m["alpha"], [[1, floor], [2, floor],
                                                                [3, floor]], rtol=REL)
    assert evaluate.main(["--compare", str(tmp_path / "eval"), "--out", str(tmp_path / "c")]) == 0
    header, _, row = (tmp_path / "c" / "compare.md").read_text().splitlines()[:3]
    assert header == ("| run | series | decoding | MSE (scaled) | filled MSE (scaled) | CRPS "
                      "(scaled) | NLL/D (scaled) | MAE (scaled) | coverage (its level) | parse "
                      "failures | teacher-forced CE | generation CE |")
    # two identical series: every resample gives the same mean, so each interval is a point
    assert row == (f"| {tmp_path / 'eval'} | 2 | baseline | 2.333 [2.33, 2.33] | 2.333 [2.33, "
                   f"2.33] | {crps:.4g} [{crps:.3g}, {crps:.3g}] | {nll:.4g} [{nll:.3g}, "
                   f"{nll:.3g}] | 1 [1, 1] | 1 at 90.0% [1, 1] | 0 | — | — |")


@pytest.mark.parametrize("name, steps", [
    *((name, steps) for name in ("persistence", "context-mean", "linear", "lv-fit")
      for steps in (0, 1, 2)),
    (None, 0)])  # fmt: skip
def test_short_contexts_forecast_or_are_one_line_errors(setup, tmp_path, capsys, name, steps):
    """Contexts of 0, 1 and 2 of the 10 steps (--context-fraction 0.04, 0.1, 0.2): prey 2t,
    predator 19.98. A forecaster that cannot use the context refuses in one line, exit 2 (None:
    the model, as a baseline does); each baseline that can forecasts 3 steps from it (linear
    through 1 step: flat)."""
    fraction = {0: "0.04", 1: "0.1", 2: "0.2"}[steps]
    flags = ["--baseline", name] if name else []
    code = evaluate.main(base_args(setup, tmp_path, *flags, "--context-fraction", fraction,
                                   "--plot-series", "0"))
    need = 3 if name == "lv-fit" else 1
    if steps < need:
        who = f"baseline {name}" if name else "the model"
        assert code == 2
        assert capsys.readouterr().err == (
            f"error: --context-fraction {float(fraction)} gives a {steps}-step context (of 10 "
            f"steps); {who} needs at least {need}: raise --context-fraction to at least "
            f"{need / 10:g}\n")
        return
    assert code == 0
    predator = float(np.float32(19.98))  # as the HDF5 file holds it
    prey = {(1, "persistence"): [0, 0, 0], (1, "context-mean"): [0, 0, 0],
            (1, "linear"): [0, 0, 0], (2, "persistence"): [2, 2, 2],
            (2, "context-mean"): [1, 1, 1], (2, "linear"): [4, 6, 8]}[steps, name]
    forecasts = np.load(tmp_path / "eval" / "forecasts.npz")["forecasts"]
    np.testing.assert_array_equal(forecasts, [[[p, predator] for p in prey]] * 2)
    # 3 forecast steps leave no context to backtest on: no σ, so the row says it is a point
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["density"] == evaluate.DENSITY["point"]


def test_lv_fit_backtests_only_a_context_it_can_fit(setup, tmp_path):
    """A 5-step context and 3 forecast steps leave 2 steps before the held-out ones, too few
    for lv-fit (baselines.MIN_CONTEXT: 3): it forecasts without a backtest, not a traceback."""
    assert evaluate.main(base_args(setup, tmp_path, "--baseline", "lv-fit", "--context-fraction",
                                   "0.5", "--plot-series", "0")) == 0
    forecasts = np.load(tmp_path / "eval" / "forecasts.npz")["forecasts"]
    assert forecasts.shape == (2, 3, 2) and np.isfinite(forecasts).all()


def test_baseline_info_averages_measures_and_counts_categories():
    """lv-fit's residual is a measure (its mean is meaningful); its winning start is a
    category (−1 the context mean, 0 the regression guess, 1… the grid), so metrics.json
    counts the series per start instead of averaging the labels."""
    info = {"residual": np.array([0.5, 1.5, 4.0]), "start": np.array([2, -1, 2])}
    assert {k: evaluate.summarize(v) for k, v in info.items()} == {
        "residual": 2.0, "start": {"-1": 1, "2": 2}}


@pytest.mark.slow
def test_lv_fit_records_its_residual_and_start_counts(setup, tmp_path):
    assert evaluate.main(base_args(setup, tmp_path, "--baseline", "lv-fit")) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(m["baseline_info"]) == {"residual", "start"}
    assert sum(m["baseline_info"]["start"].values()) == 2
    assert isinstance(m["baseline_info"]["residual"], float)


@pytest.mark.parametrize("flags, message", [
    (["--samples", "-1"], "error: --samples must be an integer ≥ 0 (0: greedy), got -1"),
    (["--samples", "4", "--temperature", "0"],
     "error: --temperature must be > 0 when sampling (for greedy decoding use --samples 0), "
     "got 0.0"),
    (["--baseline", "prophet"],
     "error: --baseline 'prophet' is not a baseline; choose one of persistence, context-mean, "
     "linear, lv-fit"),
    (["--limit", "0"], "error: --limit must be an integer ≥ 1 (the first N series of the split; "
                       "leave it out for all), got 0"),
    (["--batch-size", "0"], "error: --batch-size must be an integer ≥ 1 or auto, got 0"),
    (["--batch-size", "many"], "error: --batch-size must be an integer ≥ 1 or auto, got 'many'"),
    (["--top-p", "1.5"], "error: --top-p must be in (0, 1], got 1.5"),
    (["--context-fraction", "1"], "error: --context-fraction must be in (0, 1), got 1.0"),
    (["--forecast-steps", "0"], "error: --forecast-steps must be an integer ≥ 1, got 0"),
])
def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys, flags, message):
    assert evaluate.main(base_args(setup, tmp_path, *flags)) == 2
    assert capsys.readouterr().err == message + "\n"


def test_a_non_number_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--limit", "ten"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --limit: invalid int value: 'ten'\n"


@pytest.fixture(scope="module")
def adapter(setup, tmp_path_factory):
    """A rank-2 adapter on q_proj and o_proj whose metadata says split seed 7, decimals 3."""
    ckpt, h5, _ = setup
    model = load_model(ckpt)
    apply_lora(model, rank=2, targets=("q_proj", "o_proj"))
    scaler = data.LLMTimeScaler(alpha=2.0, decimals=3)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, folder, str(ckpt), {"scaler": scaler.to_dict(),
                                            "train_config": {"split_seed": 7, "decimals": 3}})
    return folder


def test_adapter_metadata_defines_split_and_encoding(setup, adapter, tmp_path, monkeypatch):
    texts = ["7.000,9.990;8.000,9.990;9.000,9.990;"] * 2
    stub = stub_generate(setup[2], texts)
    monkeypatch.setattr(evaluate, "generate", stub)
    assert evaluate.main(base_args(setup, tmp_path, "--adapter", str(adapter))) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (m["split_seed"], m["decimals"]) == (7, 3)
    assert m["mse_scaled"] == pytest.approx(0.0, abs=1e-12)  # float32 data: measured 2.6e-14
    saved = np.load(tmp_path / "eval" / "forecasts.npz")
    assert saved["indices"].tolist() == data.split_indices(20, seed=7)["val"][:2].tolist()
    # 3 steps of two numbers of up to 3 + 1 + 3 characters: sized by the adapter's decimals
    assert stub.calls[0]["max_new_tokens"] == 3 * (2 * 7 + 2)


@pytest.mark.parametrize("flags, message", [
    (["--split-seed", "42"], "error: --split-seed 42 contradicts {}/qwen_min.json: the adapter "
                             "was trained with split_seed = 7; leave the flag out (the adapter's "
                             "value is used)"),
    (["--decimals", "2"], "error: --decimals 2 contradicts {}/qwen_min.json: the adapter was "
                          "trained with decimals = 3; leave the flag out (the adapter's value "
                          "is used)"),
])
def test_a_flag_contradicting_the_adapter_is_an_error(setup, adapter, tmp_path, capsys, flags,
                                                      message):
    assert evaluate.main(base_args(setup, tmp_path, "--adapter", str(adapter), *flags)) == 2
    assert capsys.readouterr().err == message.format(adapter) + "\n"


def test_an_adapter_trained_on_another_data_file_is_an_error(setup, tmp_path, capsys):
    """The adapter's split seed and α belong to the file it was trained on (its SHA-256 in
    qwen_min.json); another --data would make its training series 'validation' ones."""
    ckpt, h5, _ = setup
    model = load_model(ckpt)
    apply_lora(model, rank=2)
    folder = tmp_path / "adapter"
    save_adapter(model, folder, str(ckpt), {"scaler": {"alpha": 2.0, "decimals": 2},
                                            "train_config": {"split_seed": 42, "decimals": 2},
                                            "data_sha256": "0" * 64})
    assert evaluate.main(base_args(setup, tmp_path, "--adapter", str(folder))) == 2
    assert capsys.readouterr().err == (
        f"error: --data {h5} is not the file {folder} was trained on (its SHA-256 differs from "
        "the adapter's qwen_min.json): evaluate it on that file, or its validation series may "
        "be ones it trained on\n")


def greedy_generate(model, ids, max_new_tokens, mask, eos_token_id=None, cache=None, **api):
    """qwen_min.generate's plain greedy loop under evaluate.py's call (every token written)."""
    return generate(model, ids, max_new_tokens, mask, cache=cache)


def test_ledger_equals_the_closed_form(setup, adapter, tmp_path, monkeypatch):
    """A real evaluation (LoRA, 2 batches: 2 + 1 series): each batch's ledger record equals
    flops.evaluation_flops of its shapes, their sum is metrics.json's figure, and the plan
    prices the same evaluation at the same figure, exactly, as evaluate.py reserved it: one
    price, flops.evaluation_price (every token written here, so the bound is reached)."""
    monkeypatch.setattr(evaluate, "generate", greedy_generate)
    args = base_args(setup, tmp_path, "--adapter", str(adapter), "--batch-size", "2",
                     "--limit", "3", "--forecast-steps", "1", "--unconstrained")
    assert evaluate.main(args) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    records = ledger.read_ledger(tmp_path / "ledger.jsonl")
    assert [r["series"] for r in records] == [[0, 2], [2, 3]]
    cfg = load_model(setup[0]).cfg
    lora = dict(lora_rank=2, lora_targets=["o_proj", "q_proj"])
    for r in records:
        assert r["flops"] == flops.evaluation_flops(
            cfg, len(r["target_lens"]), r["prompt_len"], r["new_tokens"], r["target_lens"],
            **lora)
    assert sum(r["flops"] for r in records) == m["flops"] > 0
    # every series the same: 7 context steps of 12 tokens ("0.000,9.990;"), 2·(3+1+3)+2
    # generated, 12 target tokens (its ';' included)
    assert {(r["prompt_len"], r["new_tokens"])
            for r in records} == {(84, 16)} and records[0]["target_lens"] == [12, 12]
    plan = flops.Plan(runs=(flops.Run("eval", steps=0, seq_len=0, rank=2),),
                      evaluation=flops.Evaluation(series=3, prompt_len=84, forecast_steps=1,
                                                  target_len=12, decimals=3))
    assert flops.plan_flops(plan, cfg, lora_targets=lora["lora_targets"])["total"] == m["flops"]
    reservation = ledger.read_ledger(tmp_path / "ledger.jsonl", reservations=True)[0]
    assert (reservation["kind"], reservation["reserved"]) == ("reservation", m["flops"])


def test_sampled_constrained_ledger_equals_the_closed_form(setup, adapter, tmp_path):
    """The real generate, grammar-constrained, 2 samples at top-p 0.9: each batch's ledger
    record equals flops.evaluation_flops with sampling over the grammar's 13 tokens."""
    args = base_args(setup, tmp_path, "--adapter", str(adapter), "--batch-size", "2",
                     "--limit", "3", "--forecast-steps", "1", "--samples", "2", "--top-p", "0.9")
    assert evaluate.main(args) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    records = ledger.read_ledger(tmp_path / "ledger.jsonl")
    cfg = load_model(setup[0]).cfg
    for r in records:
        assert r["flops"] == flops.evaluation_flops(
            cfg, len(r["target_lens"]), r["prompt_len"], r["new_tokens"], r["target_lens"],
            lora_rank=2, lora_targets=["o_proj", "q_proj"], samples=2, top_p=0.9,
            sample_tokens=13)
    assert sum(r["flops"] for r in records) == m["flops"] > 0 and m["parse_failure_rate"] == 0


def test_generation_ce_stops_at_the_rows_own_end(setup):
    """A row that finished at step 2 (then PAD fill) is scored on its 2 steps only: the logits
    after them, made while it was fed its last token again, are not its forecast's."""
    V = load_model(setup[0]).cfg.vocab_size
    target = [16, 17, 18, 19]
    logits = torch.zeros(4, V)
    logits[2:, 16] = 50.0  # garbage after the row's end, far from the targets
    row = torch.tensor([16, 26, data.PAD_ID, data.PAD_ID])
    # two steps of uniform logits: −log(1/V) each
    assert evaluate.generation_ce(logits, row, target) == pytest.approx(math.log(V), rel=1e-6)


def test_auto_batch_size_counts_the_prefill_activations(monkeypatch):
    """Qwen2.5-0.5B's shapes, 10 GiB free (faked: no GPU needed), a 770-token prompt and 140
    generated tokens (910 positions). Per series, fp32 bytes:
      KV cache   2·24 layers·2 KV heads·64·910·4          =  22,364,160
      prefill    770·(3·4864 + 4·896 + 2·14·770)·4          = 122,386,880
      logits     140·151,936·4                              =  85,084,160
    Greedy: cache + the larger of prefill and logits (the logits come after the prefill has
    freed its activations); counting the cache and logits alone would give 59. Sampled (20):
    the prompt's cache, the 20 expanded rows and the expansion's 20-row copy outweigh it."""
    model = SimpleNamespace(cfg=Qwen2Config())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    cuda, room = torch.device("cuda"), 0.7 * 10 * 2**30 - 2**30
    greedy = evaluate.auto_batch_size(model, cuda, 0, 770, 910, 140)
    assert greedy == room // (22_364_160 + 122_386_880) == 44
    assert evaluate.auto_batch_size(model, cuda, 2, 770, 910, 140) == 44  # 5 caches < prefill
    sampled = evaluate.auto_batch_size(model, cuda, 20, 770, 910, 140)
    assert sampled == room // (41 * 22_364_160) == 7
    assert evaluate.auto_batch_size(model, torch.device("cpu"), 8, 770, 910, 140) == 16


def test_compare_pairs_runs_on_the_same_series_and_refuses_others(setup, tmp_path, capsys):
    """Two identical runs: each metric's paired difference is 0 with interval [0, 0], neither
    wins a series. A run on other series (another --limit) is refused with one line."""
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder, limit in zip(folders, ("2", "2", "3")):
        args = base_args(setup, tmp_path, "--baseline", "persistence", "--limit", limit,
                         "--plot-series", "0")
        assert evaluate.main([*args, "--out", str(folder)]) == 0
    capsys.readouterr()
    assert evaluate.main(["--compare", *map(str, folders[:2]), "--out", str(tmp_path / "c1")]) == 0
    lines = (tmp_path / "c1" / "compare.md").read_text().splitlines()
    zero = "+0 [+0, +0]; wins 0% / 0%"
    assert lines[-1] == f"| {folders[1]} | " + " | ".join([zero] * 5) + " |"
    assert evaluate.main(["--compare", *map(str, folders), "--out", str(tmp_path / "c2")]) == 2
    assert capsys.readouterr().err == (
        f"error: --compare: {folders[2]} and {folders[0]} forecast different series (their "
        "forecasts.npz indices or true values differ); compare runs on the same data file, "
        "split and --limit\n")
    assert not (tmp_path / "c2").exists()


def test_compare_shows_a_worse_run_minus_the_best_as_positive(setup, tmp_path, capsys):
    """context-mean forecasts prey 6 (scaled 3) against 7, 8, 9: errors 4, 5, 6, so its MSE
    is 77/6 against persistence's 14/6. Persistence is the best; context-mean's row shows run −
    best = +63/6 = +10.5 on both MSEs, the interval above 0 (*), and the best winning both
    series (0% / 100%). Swapping run and best would print −10.5 and 100% / 0%."""
    folders = {name: tmp_path / name for name in ("persistence", "context-mean")}
    for name, folder in folders.items():
        args = base_args(setup, tmp_path, "--baseline", name, "--plot-series", "0")
        assert evaluate.main([*args, "--out", str(folder)]) == 0
    capsys.readouterr()
    assert evaluate.main(["--compare", *map(str, folders.values()), "--out",
                          str(tmp_path / "c")]) == 0
    lines = (tmp_path / "c" / "compare.md").read_text().splitlines()
    assert lines[-5].startswith(f"Paired with the best run by filled MSE, {folders['persistence']}")
    assert lines[-2] == ("|---" * 6) + "|"
    cells = lines[-1].split(" | ")
    assert cells[0] == f"| {folders['context-mean']}"
    worse = "+10.5 [+10.5, +10.5]*; wins 0% / 100%"
    assert cells[1:3] == [worse, worse]  # filled MSE, MSE: run − best


def test_compare_without_per_series_totals_is_a_one_line_error(setup, tmp_path, capsys):
    """forecasts.npz from before the per-series totals: --compare cannot pair it, and says so."""
    folder = tmp_path / "old"
    args = base_args(setup, tmp_path, "--baseline", "persistence", "--plot-series", "0")
    assert evaluate.main([*args, "--out", str(folder)]) == 0
    with np.load(folder / "forecasts.npz") as f:
        kept = {k: f[k] for k in ("indices", "forecasts", "samples", "truths")}
    np.savez(folder / "forecasts.npz", **kept)
    capsys.readouterr()
    assert evaluate.main(["--compare", str(folder), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == (
        f"error: {folder / 'forecasts.npz'}: no per-series totals (sum_*, count_*), written by "
        "an older evaluate.py; run the evaluation again to compare it\n")


# ----------------------------------------------------------------------------- --out and budget


def test_an_unwritable_out_is_refused_before_any_compute(setup, tmp_path, capsys, monkeypatch):
    """--out below a file cannot be created: one line, exit 2, the model never loaded and
    nothing on the ledger (today: the evaluation ran, was charged, then died in out.mkdir)."""
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **kw: pytest.fail("model loaded"))
    (tmp_path / "file.txt").write_text("")
    out = tmp_path / "file.txt" / "eval"
    args = base_args(setup, tmp_path)
    args[args.index("--out") + 1] = str(out)
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out}: cannot write there (Not a directory); choose a folder you can "
        "write to\n")
    assert not (tmp_path / "ledger.jsonl").exists()


def test_an_out_that_holds_files_is_refused_unless_forced(setup, tmp_path, capsys):
    args = base_args(setup, tmp_path, "--baseline", "persistence")
    assert evaluate.main(args) == 0
    first = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    capsys.readouterr()
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path / 'eval'} already holds files (an earlier evaluation?); choose "
        "another --out, or pass --force to write over them\n")
    assert len(ledger.read_ledger(tmp_path / "ledger.jsonl")) == 1  # the refused run: nothing
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    assert evaluate.main(args + ["--force"]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["mse_scaled"] == first["mse_scaled"] == pytest.approx(14 / 6, rel=REL)


def test_an_evaluation_reserves_and_respects_the_reservations_of_runs_in_flight(
        setup, tmp_path, capsys):
    """A run in flight (this live process) holds all but 1e9 of a 1e11 budget: the evaluation
    (2.95e9 FLOPs planned here) is refused, exit 3, and nothing is charged. Alone, it reserves
    its price and releases it when done."""
    path = tmp_path / "ledger.jsonl"
    holder = ledger.reserve(path, 10**11 - 10**9, budget=1e11, name="runs/in-flight")
    args = base_args(setup, tmp_path, "--flops-budget", "1e11")
    assert evaluate.main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: this run plans ") and err.count("\n") == 1
    assert ", and runs in flight reserve 9.900e+10 more (1.000e+09 left)" in err
    assert ledger.read_ledger(path) == [] and not (tmp_path / "eval" / "metrics.json").exists()
    holder.release()
    assert evaluate.main(args) == 0
    records = ledger.read_ledger(path, reservations=True)
    assert [r["kind"] for r in records[2:]] == ["reservation", "eval", "release"]
    assert records[2]["reserved"] >= records[3]["flops"] > 0
    assert ledger.held(records) == {}


def test_a_backtest_that_blows_up_leaves_that_cell_out_of_sigma(monkeypatch):
    """A baseline whose backtest overflows (lv-fit's ODE can) in one series: that cell is NaN,
    as a failed forecast step is, so σ comes from the other series instead of being inf."""
    series = np.zeros((2, 6, 2))
    blown = np.array([[[np.inf, 1.0]], [[2.0, 3.0]]])  # (N, 1 step, 2)
    monkeypatch.setattr(evaluate.baselines, "forecast",
                        lambda *a, **k: SimpleNamespace(forecasts=blown, info={}))
    args = SimpleNamespace(forecast_steps=1, baseline="persistence")
    errors = evaluate.backtest_errors(args, series, np.arange(6.0), context_steps=5)
    np.testing.assert_array_equal(errors, [[[np.nan, 1.0]], [[2.0, 3.0]]])


def test_compare_refuses_a_negative_bootstrap_in_one_line(tmp_path, capsys):
    assert evaluate.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                          str(tmp_path / "c"), "--bootstrap", "-1"]) == 2
    assert capsys.readouterr().err == (
        "error: --bootstrap must be an integer ≥ 0 (0: no intervals), got -1\n")
