"""Lotka–Volterra data for LLMTIME forecasting: simulate, load, split, encode, tokenize, window.

The file format (a user's own file works unchanged):
    /trajectories  (N, T, 2) float, [..., 0] = prey, [..., 1] = predator, all values ≥ 0
    /time          (T,)      float, strictly increasing (the default data: linspace(0, 200, 100))

LLMTIME (Gruver et al. 2023, "Large Language Models Are Zero-Shot Time Series Forecasters"),
adapted to two variables:
    scale   x' = x / α, with α fitted on the training split only, so the largest training
            value prints as 9.99 (at 2 decimals) and every training value as d.dd
    round   to `decimals` places
    join    the two variables of a time step with ',', the time steps with ';', no spaces,
            no trailing ';':   0.95,1.04;0.74,0.78;0.68,0.56
Qwen2's tokenizer makes every digit and every '.', ',' and ';' its own token, so a T-step
series at 2 decimals is 10·T − 1 tokens (999 for 100 steps).

Run as a script to simulate the default dataset: `python data.py --out data/lotka_volterra_data.h5`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tokenizers import Tokenizer

from qwen_min.runtime import atomic_write_bytes, os_error_line

DEFAULT_PATH = Path("data/lotka_volterra_data.h5")
PAD_ID = 151643  # <|endoftext|>, Qwen2's padding token
IGNORE_INDEX = -100  # labels the loss skips
MISSING_FILE_HINT = "run `make data` to simulate the default dataset, or pass --data PATH"


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the source, the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Simulator
# ---------------------------------------------------------------------------------------------


def sample_systems(n_systems: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random parameters (N, 4) = [a, b, c, d] and initial populations (N, 2) = [prey, predator].

    a (prey growth) and d (predator death) are log-uniform in [0.1, 0.5]: near the equilibrium
    one cycle takes 2π/√(a·d) ≈ 13–63 time units, i.e. 3–15 cycles in t ∈ [0, 200]. The
    equilibrium (x*, y*) = (d/c, a/b) is log-uniform in [0.3, 3.2] per variable, which fixes
    b and c, and each initial population is its equilibrium value times e^U(−1, 1): the
    further from equilibrium, the spikier the cycle. These ranges put the value distribution
    near the coursework file's (median ≈ 0.8, 99th percentile ≈ 6, max ≈ 12–15).
    """

    def log_uniform(lo: float, hi: float) -> np.ndarray:
        return np.exp(rng.uniform(math.log(lo), math.log(hi), n_systems))

    a, d = log_uniform(0.1, 0.5), log_uniform(0.1, 0.5)
    x_eq, y_eq = log_uniform(0.3, 3.2), log_uniform(0.3, 3.2)
    params = np.stack([a, a / y_eq, d / x_eq, d], axis=1)  # (N, 4)
    initial = np.stack([x_eq, y_eq], axis=1) * np.exp(rng.uniform(-1.0, 1.0, (n_systems, 2)))
    return params, initial


def integrate(
    params: np.ndarray, initial: np.ndarray, time: np.ndarray, substeps: int = 100
) -> np.ndarray:
    """Solve dx/dt = a·x − b·x·y, dy/dt = c·x·y − d·y for all systems at once → (N, T, 2) float64.

    Classic RK4 with `substeps` equal steps between consecutive sample times, on the logs
    u = ln x, v = ln y:  du/dt = a − b·e^v,  dv/dt = c·e^u − d.  In log space the populations
    stay exactly positive and near-zero troughs keep their relative accuracy.
    """
    a, b, c, d = params.T  # each (N,)

    def slope(z: np.ndarray) -> np.ndarray:  # z: (2, N) = [u, v]
        return np.stack([a - b * np.exp(z[1]), c * np.exp(z[0]) - d])

    z = np.log(initial.T)  # (2, N)
    out = np.empty((len(time), *z.shape))  # (T, 2, N)
    out[0] = z
    for k in range(1, len(time)):
        h = (time[k] - time[k - 1]) / substeps
        for _ in range(substeps):
            k1 = slope(z)
            k2 = slope(z + 0.5 * h * k1)
            k3 = slope(z + 0.5 * h * k2)
            k4 = slope(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[k] = z
    return np.exp(out).transpose(2, 0, 1)  # (N, T, 2)


def simulate(
    n_systems: int = 1000, n_steps: int = 100, t_max: float = 200.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories (N, T, 2) float32 [prey, predator] and time (T,) = linspace(0, t_max, T).

    Deterministic given the seed; every system has its own parameters (`sample_systems`).
    """
    if n_systems < 1 or n_steps < 2 or not t_max > 0:
        raise DataError(
            f"simulate: need n_systems ≥ 1, n_steps ≥ 2 and t_max > 0, got n_systems={n_systems},"
            f" n_steps={n_steps}, t_max={t_max}"
        )
    params, initial = sample_systems(n_systems, np.random.default_rng(seed))
    time = np.linspace(0.0, t_max, n_steps)
    return integrate(params, initial, time).astype(np.float32), time


# ---------------------------------------------------------------------------------------------
# HDF5 files
# ---------------------------------------------------------------------------------------------


def check_arrays(trajectories: np.ndarray, time: np.ndarray, source: str) -> None:
    """Raise DataError unless trajectories is (N ≥ 1, T ≥ 2, 2), finite, ≥ 0 and time is (T,),
    finite and strictly increasing. `source` (a file name) starts every message."""
    if trajectories.ndim != 3 or trajectories.shape[-1] != 2:
        raise DataError(
            f"{source}: /trajectories has shape {trajectories.shape}; expected 3 dimensions "
            "(systems, time steps, 2) with [..., 0] = prey and [..., 1] = predator"
        )
    n, t, _ = trajectories.shape
    if n < 1 or t < 2:
        raise DataError(
            f"{source}: /trajectories has shape {trajectories.shape}; expected at least 1 system "
            "and 2 time steps"
        )
    bad = ~np.isfinite(trajectories)
    if bad.any():
        i, j, v = np.argwhere(bad)[0]
        raise DataError(
            f"{source}: /trajectories has {int(bad.sum())} NaN or inf values (the first is "
            f"system {i}, step {j}, variable {v}: {trajectories[i, j, v]}); fix or drop those "
            "systems"
        )
    negative = trajectories < 0
    if negative.any():
        i, j, v = np.argwhere(negative)[0]
        raise DataError(
            f"{source}: /trajectories has {int(negative.sum())} negative values (the first is "
            f"system {i}, step {j}, variable {v}: {trajectories[i, j, v]}); populations must be "
            "≥ 0, fix or drop those systems"
        )
    if time.shape != (t,):
        raise DataError(
            f"{source}: /time has shape {time.shape}; expected ({t},), one time per step of "
            f"/trajectories {trajectories.shape}"
        )
    if not np.isfinite(time).all() or not (np.diff(time) > 0).all():
        raise DataError(f"{source}: /time must be finite and strictly increasing")


def write_h5(path: str | Path, trajectories: np.ndarray, time: np.ndarray) -> Path:
    """Write /trajectories (float32) and /time (float64) atomically (temp file + rename)."""
    path = Path(path)
    trajectories, time = np.asarray(trajectories), np.asarray(time)
    check_arrays(trajectories, time, str(path))
    buf = io.BytesIO()  # built in memory (a few MB), then written in one atomic step
    with h5py.File(buf, "w") as f:
        f.create_dataset("trajectories", data=trajectories.astype(np.float32))
        f.create_dataset("time", data=time.astype(np.float64))
    return atomic_write_bytes(path, buf.getvalue())


def load_trajectories(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Trajectories (N, T, 2) float64 and time (T,) float64 from an HDF5 file, fully validated.

    Any N and T; float or integer storage. Every problem raises DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; {MISSING_FILE_HINT}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        arrays = {}
        for name in ("trajectories", "time"):
            if not isinstance(f.get(name), h5py.Dataset):
                raise DataError(
                    f"{path}: no dataset /{name} (found: {', '.join(sorted(f)) or 'nothing'}); "
                    "expected /trajectories (systems, time steps, 2) and /time (time steps,)"
                )
            dataset = f[name]
            if dataset.dtype.kind not in "fiu":
                raise DataError(
                    f"{path}: /{name} has dtype {dataset.dtype}; expected numbers (float32 or "
                    "float64)"
                )
            arrays[name] = np.asarray(dataset[()], dtype=np.float64)
    check_arrays(arrays["trajectories"], arrays["time"], str(path))
    return arrays["trajectories"], arrays["time"]


def summary(trajectories: np.ndarray) -> str:
    """One line of value statistics: min, max, median, 99th percentile."""
    x = np.asarray(trajectories)
    return (
        f"min {x.min():.4f}  max {x.max():.2f}  median {np.median(x):.3f}  "
        f"p99 {np.percentile(x, 99):.2f}"
    )


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256: an adapter records it, so that its data file can be recognised."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_indices(n_systems: int, seed: int = 42) -> dict[str, np.ndarray]:
    """70/15/15 train/val/test system indices from a seeded permutation (disjoint, covering all).

    Sizes: train = round(0.7·N), val = round(0.15·N), test = the rest (700/150/150 for 1000).
    """
    n_train, n_val = round(0.7 * n_systems), round(0.15 * n_systems)
    if min(n_train, n_val, n_systems - n_train - n_val) < 1:
        raise DataError(
            f"{n_systems} systems are too few for a 70/15/15 train/val/test split (a part would "
            "be empty); use a file with at least 7 systems"
        )
    order = np.random.default_rng(seed).permutation(n_systems)
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


# ---------------------------------------------------------------------------------------------
# LLMTIME text
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMTimeScaler:
    """x ↔ text: `encode` writes round(x/α, decimals) as LLMTIME text, `decode` reads it back.

    Values above the training maximum (possible in val/test) scale past 9.99 and are written
    with more integer digits ("12.34"): decoding reads them exactly, they only cost one token
    per extra digit. The model never saw such numbers in training, so expect it to forecast
    below 10 there.
    """

    alpha: float
    decimals: int = 2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise DataError(f"LLMTIME scaler: alpha must be a finite number > 0, got {self.alpha}")
        if not isinstance(self.decimals, int) or self.decimals < 0:
            raise DataError(f"LLMTIME scaler: decimals must be an integer ≥ 0, got {self.decimals}")

    @property
    def number_pattern(self) -> re.Pattern:
        """A value as `encode` writes it: digits, then '.' and exactly `decimals` digits."""
        return re.compile(r"\d+" + (rf"\.\d{{{self.decimals}}}" if self.decimals else ""))

    @classmethod
    def fit(cls, train_trajectories: np.ndarray, decimals: int = 2) -> LLMTimeScaler:
        """α = max(train) / 9.99 (at 2 decimals; 9.9 at 1, 9.999 at 3): the largest training
        value is written as the largest one-integer-digit number, so every training value
        has the form d.dd."""
        top = float(np.max(train_trajectories))
        if not math.isfinite(top) or top <= 0:
            raise DataError(
                f"LLMTIME scaler: the training values' maximum is {top}; α = max / 9.99 needs a "
                "finite maximum > 0 (are all training series zero?)"
            )
        return cls(alpha=top / (10 - 10.0**-decimals), decimals=decimals)

    def to_dict(self) -> dict:
        return {"alpha": float(self.alpha), "decimals": int(self.decimals)}

    @classmethod
    def from_dict(cls, d: dict) -> LLMTimeScaler:
        missing = [k for k in ("alpha", "decimals") if k not in d]
        if missing:
            raise DataError(
                f"LLMTIME scaler settings {d}: missing {', '.join(missing)}; expected "
                "{'alpha': float, 'decimals': int} as written by LLMTimeScaler.to_dict()"
            )
        return cls(alpha=float(d["alpha"]), decimals=int(d["decimals"]))

    def encode(self, series: np.ndarray) -> str:
        """(T, 2) values ≥ 0 → "p,q;p,q;…" (T steps, no trailing ';')."""
        series = np.asarray(series, dtype=np.float64)
        if series.ndim != 2 or series.shape[1] != 2:
            raise DataError(
                f"LLMTIME encode: expected a (time steps, 2) series, got {series.shape}"
            )
        if not np.isfinite(series).all() or (series < 0).any():
            raise DataError("LLMTIME encode: the series has NaN, inf or negative values")
        d = self.decimals
        return ";".join(f"{p:.{d}f},{q:.{d}f}" for p, q in series / self.alpha)

    def decode(self, text: str, n_steps: int | None = None) -> tuple[np.ndarray, int]:
        """LLMTIME text → (values (S, 2) in original units, number of invalid steps). Never raises.

        Steps are split on ';' and a step is valid when it is exactly two numbers in the form
        `encode` writes (digits, '.', `decimals` digits), separated by ','. Invalid steps (words,
        one or three values, empty, a truncated last step such as "0.9" or "0.95,1.0") become a
        NaN row in place, so row i is always step i. One trailing ';' ends the last step and
        does not start an empty one. With `n_steps`, the result is cut or NaN-padded to exactly
        n_steps rows and missing steps count as invalid.
        """
        pieces = text.strip().split(";")
        if pieces[-1] == "":
            pieces.pop()
        if n_steps is not None:
            pieces = pieces[:n_steps] + [""] * (n_steps - len(pieces))
        values = np.full((len(pieces), 2), np.nan)
        number = self.number_pattern
        for i, piece in enumerate(pieces):
            fields = [s.strip() for s in piece.split(",")]
            if len(fields) == 2 and all(number.fullmatch(s) for s in fields):
                values[i] = [float(s) * self.alpha for s in fields]
        return values, int(np.isnan(values[:, 0]).sum())


def expected_token_count(n_steps: int, decimals: int = 2) -> int:
    """Tokens in an n-step series whose scaled values are all < 10 (one token per character):
    a value is 1 digit + '.' + decimals digits, a step is 2 values + ',', ';' joins steps."""
    value = 1 + (1 + decimals if decimals else 0)
    return n_steps * (2 * value + 1) + (n_steps - 1)


def tokenize(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of LLMTIME text from the real tokenizer, checked to be one token per character
    (Qwen2 splits every digit and, between digits, every '.', ',' and ';')."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != len(text):
        raise DataError(
            f"tokenizer made {len(ids)} tokens of {len(text)} LLMTIME characters "
            f"({text[:30]!r}…); LLMTIME needs one token per digit and separator, as Qwen2's "
            "tokenizer.json does: check the --model folder's tokenizer"
        )
    return ids


# ---------------------------------------------------------------------------------------------
# Training windows and the evaluation split
# ---------------------------------------------------------------------------------------------


def window_starts(n_tokens: int, context_length: int, stride: int) -> list[int]:
    """Starts 0, stride, 2·stride, … up to and including the first window that reaches the end.

    Every window but the last is full; the last one ends at the series' last token and is
    usually shorter (left-padded by `training_windows`). For 999 tokens, 768/256: [0, 256],
    i.e. tokens 0–767 and 256–998 (743 tokens + 25 padding).
    """
    starts = [0]
    while starts[-1] + context_length < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def training_windows(
    token_lists: list[list[int]], context_length: int = 768, stride: int = 256, pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each series' token ids into windows → input_ids, labels, attention_mask, each (N, L).

    Windows follow `window_starts`, so every token is in some window and each series' last
    token is the last position of its last window (except a last window of a single token,
    possible only when stride = context_length: it predicts nothing and is left out). Short
    windows are left-padded with pad_id: the attention mask is 0 there, and labels are the
    input ids with −100 on padding and on the first real token of a padded window. That token
    would be predicted from the last pad position, whose output is implementation-defined
    (ours and transformers' differ there), so every counted label is predicted from a real
    token.
    """
    if context_length < 1 or not 1 <= stride <= context_length:
        raise DataError(
            f"training windows: need context_length ≥ 1 and 1 ≤ stride ≤ context_length (so "
            f"no token is skipped), got context_length={context_length}, stride={stride}"
        )
    # a window of one token predicts nothing (its only token is masked below), and a batch of
    # such windows would have a loss of 0/0: it is left out
    windows = [
        window
        for ids in token_lists
        for s in window_starts(len(ids), context_length, stride)
        if len(window := ids[s : s + context_length]) >= 2
    ]
    if not windows:
        raise DataError(
            "training windows: no tokens to predict (no series has 2 or more tokens)"
        )
    input_ids = torch.full((len(windows), context_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), context_length), dtype=torch.long)
    for row, ids in enumerate(windows):
        input_ids[row, context_length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, context_length - len(ids) :] = 1
    # position t predicts label t (from t − 1): a label counts when t − 1 is a real token
    predicted_from_pad = torch.zeros_like(attention_mask, dtype=torch.bool)
    predicted_from_pad[:, 1:] = attention_mask[:, :-1] == 0
    labels = input_ids.masked_fill((attention_mask == 0) | predicted_from_pad, IGNORE_INDEX)
    return input_ids, labels, attention_mask


def forecast_split(
    series: np.ndarray,
    scaler: LLMTimeScaler,
    context_fraction: float = 0.7,
    forecast_steps: int = 10,
) -> tuple[str, str, np.ndarray]:
    """(prompt text, target text, target values (forecast_steps, 2)) for one (T, 2) series.

    The context is the first C = round(context_fraction·T) steps (70 of 100) and the prompt
    is their encoding plus the ';' that separates them from step C, so the model's first
    generated token is a digit. The target is steps C … C+forecast_steps−1: its text has no
    leading or trailing ';' (prompt + target = encode(series[:C + forecast_steps])), and its
    values are the true ones, in original units (not rounded).
    """
    series = np.asarray(series, dtype=np.float64)
    context = round(context_fraction * len(series))
    if context < 1 or forecast_steps < 1 or context + forecast_steps > len(series):
        raise DataError(
            f"forecast split: a {len(series)}-step series has {context} context steps "
            f"(context_fraction={context_fraction}); {forecast_steps} forecast steps must fit "
            f"in the remaining {len(series) - context}"
        )
    target = series[context : context + forecast_steps]
    return scaler.encode(series[:context]) + ";", scaler.encode(target), target.copy()


# ---------------------------------------------------------------------------------------------
# Command line: simulate the default dataset
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Simulate Lotka–Volterra data to an HDF5 file.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="HDF5 file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", type=int, default=1000, help="number of systems N")
    parser.add_argument("--steps", type=int, default=100, help="time steps T per system")
    parser.add_argument("--t-max", type=float, default=200.0, help="time = linspace(0, t_max, T)")
    args = parser.parse_args(argv)
    try:
        trajectories, time = simulate(args.systems, args.steps, args.t_max, args.seed)
    except DataError as e:
        parser.error(str(e))
    try:
        path = write_h5(args.out, trajectories, time)
    except OSError as e:  # a full disk: the file is written atomically, none is left half
        parser.exit(2, f"error: {os_error_line(e)}\n")
    print(
        f"wrote {path}: /trajectories {trajectories.shape} float32, "
        f"/time ({len(time)},) from {time[0]:g} to {time[-1]:g}"
    )
    print(f"values: {summary(trajectories)}")


if __name__ == "__main__":
    main()
