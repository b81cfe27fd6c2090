"""data.py: simulator, HDF5 checks, split, LLMTIME encode/decode, tokens, windows, eval split."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import data
from data import DataError, LLMTimeScaler
from qwen_min import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_json) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def sim() -> tuple[np.ndarray, np.ndarray]:
    """The default dataset, as `make data` writes it."""
    return data.simulate(seed=0)


# --- simulator -------------------------------------------------------------------------------


def test_simulate_schema_and_determinism():
    x, t = data.simulate(n_systems=6, n_steps=30, t_max=50.0, seed=3)
    assert x.shape == (6, 30, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(t, np.linspace(0.0, 50.0, 30))
    np.testing.assert_array_equal(data.simulate(n_systems=6, n_steps=30, t_max=50.0, seed=3)[0], x)
    assert not np.array_equal(data.simulate(n_systems=6, n_steps=30, t_max=50.0, seed=4)[0], x)


def test_simulated_statistics_are_near_the_coursework_file(sim):
    x, t = sim
    assert x.shape == (1000, 100, 2)
    np.testing.assert_array_equal(t, np.linspace(0.0, 200.0, 100))
    print(f"simulated: {data.summary(x)}")
    assert x.min() > 0
    assert 10 < x.max() < 20
    assert 0.7 < np.median(x) < 0.9
    assert 5 < np.percentile(x, 99) < 7
    prey = x[:, :, 0]
    peaks = ((prey[:, 1:-1] > prey[:, :-2]) & (prey[:, 1:-1] > prey[:, 2:])).sum(axis=1)
    assert peaks.min() >= 2  # every system oscillates


def test_integrate_matches_linear_theory_near_equilibrium():
    # ln(x/x*) = ε·cos(ωt), ln(y/y*) = ε·√(d/a)·sin(ωt), ω = √(a·d), up to O(ε²)
    a, d, x_eq, y_eq, eps = 0.2, 0.3, 1.5, 0.8, 1e-3
    params = np.array([[a, a / y_eq, d / x_eq, d]])
    t = np.linspace(0.0, 200.0, 100)
    x = data.integrate(params, np.array([[x_eq * np.exp(eps), y_eq]]), t)[0]
    w = np.sqrt(a * d)
    np.testing.assert_allclose(np.log(x[:, 0] / x_eq), eps * np.cos(w * t), rtol=0, atol=1e-2 * eps)
    np.testing.assert_allclose(
        np.log(x[:, 1] / y_eq), eps * np.sqrt(d / a) * np.sin(w * t), rtol=0, atol=1e-2 * eps
    )


def test_integrate_conserves_the_first_integral():
    # H = c·x − d·ln x + b·y − a·ln y is constant along every Lotka–Volterra orbit
    params, initial = data.sample_systems(50, np.random.default_rng(0))
    x = data.integrate(params, initial, np.linspace(0.0, 200.0, 100))
    a, b, c, d = (p[:, None] for p in params.T)
    h = c * x[..., 0] - d * np.log(x[..., 0]) + b * x[..., 1] - a * np.log(x[..., 1])
    assert np.abs(h - h[:, :1]).max() < 1e-7 * np.abs(h).min()


def test_cli_writes_the_simulation(tmp_path, capsys):
    out = tmp_path / "sub" / "lv.h5"
    data.main(["--out", str(out), "--systems", "5", "--steps", "12", "--seed", "1"])
    x, t = data.load_trajectories(out)
    want_x, want_t = data.simulate(5, 12, seed=1)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(t, want_t)
    assert capsys.readouterr().out.startswith(f"wrote {out}: /trajectories (5, 12, 2) float32")
    assert os.listdir(out.parent) == ["lv.h5"]  # no temp file left behind


# --- HDF5 loading ----------------------------------------------------------------------------


def write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


def test_load_round_trip_and_any_shape_float64(tmp_path):
    x, t = data.simulate(4, 9, seed=2)
    path = data.write_h5(tmp_path / "lv.h5", x, t)
    got_x, got_t = data.load_trajectories(path)
    assert got_x.dtype == np.float64 and got_t.dtype == np.float64
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_t, t)
    # a user's own file: float64, other sizes, integer times
    x64 = np.random.default_rng(0).uniform(0, 3, (3, 7, 2))
    path = write_raw(tmp_path / "own.h5", trajectories=x64, time=np.arange(7))
    got_x, got_t = data.load_trajectories(path)
    np.testing.assert_array_equal(got_x, x64)
    np.testing.assert_array_equal(got_t, np.arange(7.0))


GOOD_X = np.ones((3, 5, 2), dtype=np.float32)
GOOD_T = np.linspace(0.0, 4.0, 5)
NAN_X = GOOD_X.copy()
NAN_X[1, 2, 1] = np.nan
INF_X = GOOD_X.copy()
INF_X[2, 0, 0] = np.inf
NEG_X = GOOD_X.copy()
NEG_X[0, 3, 0], NEG_X[2, 1, 1] = -0.5, -1.0


@pytest.mark.parametrize(
    "datasets, message",
    [
        (
            dict(time=GOOD_T),
            "no dataset /trajectories (found: time); expected /trajectories (systems, time "
            "steps, 2) and /time (time steps,)",
        ),
        (
            dict(trajectories=GOOD_X),
            "no dataset /time (found: trajectories); expected /trajectories (systems, time "
            "steps, 2) and /time (time steps,)",
        ),
        (
            dict(trajectories=GOOD_X[0], time=GOOD_T),
            "/trajectories has shape (5, 2); expected 3 dimensions (systems, time steps, 2) "
            "with [..., 0] = prey and [..., 1] = predator",
        ),
        (
            dict(trajectories=np.ones((3, 5, 3)), time=GOOD_T),
            "/trajectories has shape (3, 5, 3); expected 3 dimensions (systems, time steps, 2) "
            "with [..., 0] = prey and [..., 1] = predator",
        ),
        (
            dict(trajectories=np.ones((0, 5, 2)), time=GOOD_T),
            "/trajectories has shape (0, 5, 2); expected at least 1 system and 2 time steps",
        ),
        (
            dict(trajectories=NAN_X, time=GOOD_T),
            "/trajectories has 1 NaN or inf values (the first is system 1, step 2, variable 1: "
            "nan); fix or drop those systems",
        ),
        (
            dict(trajectories=INF_X, time=GOOD_T),
            "/trajectories has 1 NaN or inf values (the first is system 2, step 0, variable 0: "
            "inf); fix or drop those systems",
        ),
        (
            dict(trajectories=NEG_X, time=GOOD_T),
            "/trajectories has 2 negative values (the first is system 0, step 3, variable 0: "
            "-0.5); populations must be ≥ 0, fix or drop those systems",
        ),
        (
            dict(trajectories=GOOD_X, time=GOOD_T[:4]),
            "/time has shape (4,); expected (5,), one time per step of /trajectories (3, 5, 2)",
        ),
        (
            dict(trajectories=GOOD_X, time=GOOD_T[None]),
            "/time has shape (1, 5); expected (5,), one time per step of /trajectories (3, 5, 2)",
        ),
        (
            dict(trajectories=GOOD_X, time=GOOD_T[::-1]),
            "/time must be finite and strictly increasing",
        ),
        (
            dict(trajectories=np.array([b"a", b"b"]), time=GOOD_T),
            "/trajectories has dtype |S1; expected numbers (float32 or float64)",
        ),
    ],
    ids=[
        "no-trajectories", "no-time", "rank-2", "last-dim-3", "no-systems", "nan", "inf",
        "negative", "time-length", "time-rank", "time-decreasing", "strings",
    ],
)
def test_load_rejects_bad_files(tmp_path, datasets, message):
    path = write_raw(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataError) as e:
        data.load_trajectories(path)
    assert str(e.value) == f"{path}: {message}"


def test_load_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "lotka_volterra_data.h5"
    with pytest.raises(DataError) as e:
        data.load_trajectories(missing)
    assert str(e.value) == (
        f"{missing}: no such file; run `make data` to simulate the default dataset, "
        "or pass --data PATH"
    )
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match=f"^{text}: not a readable HDF5 file "):
        data.load_trajectories(text)


def test_write_h5_refuses_bad_data_and_keeps_the_old_file(tmp_path):
    path = data.write_h5(tmp_path / "lv.h5", GOOD_X, GOOD_T)
    with pytest.raises(DataError, match="negative values"):
        data.write_h5(path, NEG_X, GOOD_T)
    np.testing.assert_array_equal(data.load_trajectories(path)[0], GOOD_X)
    assert os.listdir(tmp_path) == ["lv.h5"]


# --- split -----------------------------------------------------------------------------------


def test_split_is_70_15_15_disjoint_covering_and_seeded():
    split = data.split_indices(1000)
    assert {k: len(v) for k, v in split.items()} == {"train": 700, "val": 150, "test": 150}
    everything = np.concatenate([split["train"], split["val"], split["test"]])
    np.testing.assert_array_equal(np.sort(everything), np.arange(1000))  # disjoint and covering
    again = data.split_indices(1000, seed=42)
    for k in split:
        np.testing.assert_array_equal(again[k], split[k])
    assert not np.array_equal(data.split_indices(1000, seed=1)["train"], split["train"])
    smallest = data.split_indices(7)
    assert {k: len(v) for k, v in smallest.items()} == {"train": 5, "val": 1, "test": 1}
    with pytest.raises(DataError) as e:
        data.split_indices(5)
    assert str(e.value) == (
        "5 systems are too few for a 70/15/15 train/val/test split (a part would be empty); "
        "use a file with at least 7 systems"
    )


# --- LLMTIME scaler --------------------------------------------------------------------------


def test_fit_puts_the_training_maximum_at_9_99(sim):
    x, _ = sim
    train = x[data.split_indices(len(x))["train"]]
    scaler = LLMTimeScaler.fit(train)
    assert scaler.alpha == pytest.approx(float(train.max()) / 9.99, rel=1e-12)
    texts = [scaler.encode(s) for s in train]
    assert max(max(t.replace(";", ",").split(",")) for t in texts) == "9.99"
    assert {len(t) for t in texts} == {999}  # every value is d.dd
    assert LLMTimeScaler.fit(train, decimals=1).alpha == pytest.approx(train.max() / 9.9)
    with pytest.raises(DataError) as e:
        LLMTimeScaler.fit(np.zeros((3, 5, 2)))
    assert str(e.value) == (
        "LLMTIME scaler: the training values' maximum is 0.0; α = max / 9.99 needs a finite "
        "maximum > 0 (are all training series zero?)"
    )


@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
def test_encode_decode_round_trip(sim, decimals):
    x, _ = sim
    # fitted on the first 100 systems, so other systems also hold values past 9.99
    scaler = LLMTimeScaler.fit(x[:100], decimals=decimals)
    series = x[:300].astype(np.float64)
    worst = 0.0
    for s in series:
        values, invalid = scaler.decode(scaler.encode(s))
        assert invalid == 0 and values.shape == s.shape
        worst = max(worst, np.abs(values - s).max())
    bound = scaler.alpha * 0.5 * 10.0**-decimals
    assert bound / 2 < worst <= bound * (1 + 1e-9)
    assert (series / scaler.alpha).max() > 10  # the large-value case was exercised


def test_encode_format_and_values_past_9_99():
    scaler = LLMTimeScaler(alpha=2.0)
    series = np.array([[1.9, 2.08], [0.0, 19.98], [24.692, 246.9]])
    text = scaler.encode(series)
    assert text == "0.95,1.04;0.00,9.99;12.35,123.45"  # more integer digits past 9.99
    values, invalid = scaler.decode(text)
    np.testing.assert_allclose(values, [[1.9, 2.08], [0.0, 19.98], [24.7, 246.9]], rtol=1e-15)
    assert invalid == 0
    assert LLMTimeScaler(alpha=1.0, decimals=0).encode(np.array([[3.4, 12.6]])) == "3,13"
    with pytest.raises(DataError, match="NaN, inf or negative"):
        scaler.encode(np.array([[1.0, -0.1]]))
    with pytest.raises(DataError, match=r"expected a \(time steps, 2\) series, got \(3,\)"):
        scaler.encode(np.array([1.0, 2.0, 3.0]))


NAN = np.nan


@pytest.mark.parametrize(
    "text, rows, invalid",
    [
        ("", [], 0),
        ("0.95,1.04;0.74,0.78", [[0.95, 1.04], [0.74, 0.78]], 0),
        ("0.95,1.04;0.74,0.78;", [[0.95, 1.04], [0.74, 0.78]], 0),  # trailing ';' ends a step
        (" 0.95,1.04\n", [[0.95, 1.04]], 0),
        ("12.50,0.03", [[12.5, 0.03]], 0),
        ("0.95,1.04;;0.74,0.78", [[0.95, 1.04], [NAN, NAN], [0.74, 0.78]], 1),  # empty step
        ("0.95,1.04;abc;0.74,0.78", [[0.95, 1.04], [NAN, NAN], [0.74, 0.78]], 1),
        ("0.95;0.74,0.78", [[NAN, NAN], [0.74, 0.78]], 1),  # one value
        ("0.95,1.04,1.10;0.74,0.78", [[NAN, NAN], [0.74, 0.78]], 1),  # three values
        ("0.95,1.04;0.74,0.7", [[0.95, 1.04], [NAN, NAN]], 1),  # truncated last step
        ("0.95,1.04;0.74,", [[0.95, 1.04], [NAN, NAN]], 1),
        ("0.95,1.04;0.7", [[0.95, 1.04], [NAN, NAN]], 1),
        ("-0.95,1.04;1e3,1.00;nan,inf;0.5,1.04", [[NAN, NAN]] * 4, 4),  # not encoder numbers
        ("0.95,1.04;<|endoftext|>", [[0.95, 1.04], [NAN, NAN]], 1),
        (";", [[NAN, NAN]], 1),
    ],
)
def test_decode_malformed_text(text, rows, invalid):
    values, n_invalid = LLMTimeScaler(alpha=2.0).decode(text)
    np.testing.assert_allclose(values, 2.0 * np.array(rows).reshape(-1, 2), rtol=1e-15)
    assert n_invalid == invalid


def test_decode_to_a_fixed_number_of_steps():
    scaler = LLMTimeScaler(alpha=1.0)
    values, invalid = scaler.decode("0.10,0.20;x;0.30,0.40;0.50,0.60", n_steps=3)
    np.testing.assert_array_equal(values, [[0.1, 0.2], [NAN, NAN], [0.3, 0.4]])
    assert invalid == 1
    values, invalid = scaler.decode("0.10,0.20;", n_steps=3)  # stopped early: 2 missing steps
    np.testing.assert_array_equal(values, [[0.1, 0.2], [NAN, NAN], [NAN, NAN]])
    assert invalid == 2


def test_scaler_settings_survive_json():
    scaler = LLMTimeScaler(alpha=1.0728343471034512, decimals=3)
    assert LLMTimeScaler.from_dict(json.loads(json.dumps(scaler.to_dict()))) == scaler
    with pytest.raises(DataError) as e:
        LLMTimeScaler.from_dict({"decimals": 2})
    assert str(e.value) == (
        "LLMTIME scaler settings {'decimals': 2}: missing alpha; expected {'alpha': float, "
        "'decimals': int} as written by LLMTimeScaler.to_dict()"
    )
    with pytest.raises(DataError, match="alpha must be a finite number > 0, got 0.0"):
        LLMTimeScaler(alpha=0.0)


# --- tokens ----------------------------------------------------------------------------------


def test_a_100_step_series_is_999_tokens_one_per_character(sim, tiny):
    tokenizer = load_tokenizer(tiny[1])  # through qwen_min's loader, as train.py does
    x, _ = sim
    scaler = LLMTimeScaler.fit(x)
    text = scaler.encode(x[0])
    ids = data.tokenize(tokenizer, text)
    assert len(ids) == 999 == data.expected_token_count(100, decimals=2)
    assert ids == [tokenizer.token_to_id(ch) for ch in text]
    assert tokenizer.decode(ids) == text
    print(f"\n{text[:29]}… → {ids[:29]}…")


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_expected_token_count_matches_the_text(tok, decimals):
    scaler = LLMTimeScaler(alpha=1.0, decimals=decimals)
    series = np.random.default_rng(0).uniform(0, 9.4, (37, 2))
    ids = data.tokenize(tok, scaler.encode(series))
    assert len(ids) == data.expected_token_count(37, decimals)


def test_llmtime_characters_have_fixed_ids(tok):
    # 0-9 are 15-24; '.' ',' ';' are 13, 11, 26
    ids = data.tokenize(tok, "0.1,2;3.4,5;6.7,8;9")
    assert ids == [15, 13, 16, 11, 17, 26, 18, 13, 19, 11, 20, 26, 21, 13, 22, 11, 23, 26, 24]


def test_tokenize_refuses_merged_tokens(tok):
    with pytest.raises(DataError) as e:
        data.tokenize(tok, "0.95;;0.74")  # ';;' is a single Qwen2 token
    assert str(e.value) == (
        "tokenizer made 9 tokens of 10 LLMTIME characters ('0.95;;0.74'…); LLMTIME needs one "
        "token per digit and separator, as Qwen2's tokenizer.json does: check the --model "
        "folder's tokenizer"
    )


# --- training windows ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_tokens, starts",
    [(999, [0, 256]), (768, [0]), (769, [0, 256]), (10, [0]), (1300, [0, 256, 512, 768])],
)
def test_window_starts_reach_the_end(n_tokens, starts):
    assert data.window_starts(n_tokens, 768, 256) == starts


def test_training_windows_small():
    P = data.PAD_ID
    ids, labels, mask = data.training_windows(
        [list(range(1, 10)), [7, 8, 9]], context_length=4, stride=2
    )
    assert ids.dtype == labels.dtype == mask.dtype == torch.long
    assert ids.tolist() == [
        [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [P, 7, 8, 9],  # last window: left-padded
        [P, 7, 8, 9],  # a series shorter than the context
    ]
    assert labels.tolist() == [
        [1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [-100, -100, 8, 9], [-100, -100, 8, 9],
    ]  # 7 follows padding: nothing real predicts it there
    assert mask.tolist() == [[1, 1, 1, 1]] * 3 + [[0, 1, 1, 1]] * 2


def test_training_windows_cover_every_token_of_a_999_token_series(tok):
    series = np.random.default_rng(1).uniform(0, 9.9, (100, 2))
    tokens = data.tokenize(tok, LLMTimeScaler(alpha=1.0).encode(series))
    ids, labels, mask = data.training_windows([tokens, tokens])
    assert ids.shape == labels.shape == mask.shape == (4, 768)
    assert mask.sum(dim=1).tolist() == [768, 743, 768, 743]  # 25 padding tokens
    assert ids[0].tolist() == tokens[:768]
    assert ids[1, 25:].tolist() == tokens[256:]  # the last window ends at the series' end
    assert ids[1, :25].tolist() == [data.PAD_ID] * 25
    assert (labels[1, :26] == -100).all() and (labels[1, 26:] == ids[1, 26:]).all()


def test_training_windows_bad_settings():
    with pytest.raises(DataError) as e:
        data.training_windows([[1, 2, 3]], context_length=4, stride=5)
    assert str(e.value) == (
        "training windows: need context_length ≥ 1 and 1 ≤ stride ≤ context_length (so no "
        "token is skipped), got context_length=4, stride=5"
    )
    with pytest.raises(DataError, match="no tokens"):
        data.training_windows([[]])


# --- evaluation split ------------------------------------------------------------------------


def test_forecast_split_puts_the_separator_in_the_prompt(sim, tok):
    x, _ = sim
    series = x[5].astype(np.float64)
    scaler = LLMTimeScaler.fit(x)
    prompt, target, values = data.forecast_split(series, scaler)
    assert prompt.endswith(";") and prompt.count(";") == 70  # 70 context steps, then ';'
    assert not target.startswith(";") and not target.endswith(";") and target.count(";") == 9
    assert prompt + target == scaler.encode(series[:80])
    np.testing.assert_array_equal(values, series[70:80])
    context, invalid = scaler.decode(prompt)
    assert invalid == 0 and context.shape == (70, 2)
    # as tokens: the target starts with a digit, and splitting at ';' changes no token
    p_ids, t_ids = data.tokenize(tok, prompt), data.tokenize(tok, target)
    assert p_ids + t_ids == data.tokenize(tok, prompt + target)
    assert len(p_ids) == 700 and len(t_ids) == 99  # 10 steps = 100 tokens with the next ';'
    assert tok.decode(t_ids[:1]).isdigit()


def test_forecast_split_too_long():
    with pytest.raises(DataError) as e:
        data.forecast_split(np.ones((20, 2)), LLMTimeScaler(alpha=1.0), forecast_steps=7)
    assert str(e.value) == (
        "forecast split: a 20-step series has 14 context steps (context_fraction=0.7); "
        "7 forecast steps must fit in the remaining 6"
    )
