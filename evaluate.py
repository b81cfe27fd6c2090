"""Forecast evaluation: LLMTIME forecasts of held-out Lotka–Volterra series, and baselines.

    python evaluate.py --out runs/eval-base                               # the untrained model
    python evaluate.py --adapter runs/final/adapter --out runs/eval-final # a trained adapter
    python evaluate.py --adapter runs/final/adapter --samples 20 --out runs/eval-final-s20
    python evaluate.py --baseline lv-fit --out runs/baselines/val/lv-fit  # no language model
    python evaluate.py --compare runs/eval-base runs/eval-final --out runs/compare

Each series' first 70% of time steps is the prompt (ending in ';'); the model writes the next
--forecast-steps steps, batched with the KV cache. Decoding is grammar-constrained by default
(only `int.frac,int.frac;` can be written: qwen_min.grammar) and greedy; `--unconstrained` lets
the model write any token. `--samples N` draws N constrained continuations per series
(`--temperature`, `--top-p`, `--seed`); the point forecast is their per-step median, as in
LLMTIME (Gruver et al. 2023). `--baseline NAME` forecasts with a classical method instead
(baselines.py), on the same series, prompt length and horizon. Written to --out: metrics.json,
per_series.csv, forecasts.npz (every sample), trajectories.png and horizon.png; the counted
FLOPs go to the ledger, one record per batch, so a killed evaluation loses at most one batch.

Scores. "Scaled" is in LLMTIME units (value / α, what the coursework reports), "original" in
the data's own units. MSE/MAE are over the steps that parsed; `mse_scaled_filled` puts the
persistence forecast (the last context value) in every step that did not, so runs with
different failure rates compare fairly. Every score comes from one predictive distribution
per forecast value: the model's samples (a greedy forecast is one sample), a baseline's
Gaussian around its forecast (σ from a backtest on the contexts); the point forecast is its
median. CRPS: the sample estimator mean|X−y| − ½·mean|X−X'|, or the Gaussian's closed form.
`coverage_curve`: how often the truth lies in each central interval, beside its exact level
(samples: between the k-th smallest and k-th largest of S, level (S+1−2k)/(S+1)); `coverage`
is the one nearest 90%, at `coverage_level`. `nll_per_dim(_scaled)`: the negative
log-likelihood per target value (LLMTIME's NLL/D: the mass on the truth's bin / its width; a
model's from its teacher-forced pass under the grammar, a baseline's from its Gaussian;
metrics.py). Every metric gets `<metric>_ci95`, a 95% bootstrap interval over the series
(`--bootstrap N` resamples, 0: none); sampled and baseline runs get `pit_histogram` and
`coverage_curve` (calibration).
`--compare` pairs each run with the best one on the same series (metrics.paired). The scoring
itself lives in metrics.py.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import baselines
import data
import flops
import ledger
from lora import AdapterError, base_model_mismatch, load_adapter
from metrics import (
    BOOTSTRAP_RESAMPLES,
    LABELS,
    LOWER_IS_BETTER,
    Gaussian,
    Samples,
    TotalsError,
    backtest_sigma,
    best,
    load_series,
    mean_or_none,
    nll_per_dim,
    paired,
    same_series,
    score,
    shown_difference,
    shown_interval,
    shown_level,
    totals_arrays,
)
from qwen_min import CheckpointError, KVCache, count_flops, generate, load_model, load_tokenizer
from qwen_min.generate import SamplingOptions, cache_dtype
from qwen_min.grammar import GrammarTables, LLMTimeGrammar
from qwen_min.loading import DEFAULT_MODEL
from qwen_min.model import LoRALinear, cross_entropy
from qwen_min.runtime import (
    CompileFallback,
    atomic_write_bytes,
    atomic_write_text,
    autocast,
    compile_wanted,
    os_error_line,
    pick_device,
    pick_dtype,
    provenance,
    read_json,
)

DEFAULTS = dict(
    model=DEFAULT_MODEL,
    adapter=None,
    baseline=None,
    data="data/lotka_volterra_data.h5",
    split="val",
    split_seed=None,  # None: the adapter's, else ENCODING_DEFAULTS
    decimals=None,
    context_fraction=None,
    limit=None,
    forecast_steps=10,
    unconstrained=False,
    samples=0,
    temperature=1.0,
    top_p=1.0,
    seed=0,
    batch_size="auto",
    dtype="auto",
    device="auto",
    compile="auto",  # auto: on for CUDA (decoding steps as CUDA graphs), off elsewhere
    out="runs/eval",
    ledger="runs/ledger.jsonl",
    flops_budget=ledger.BUDGET,
    plot_series=4,
    bootstrap=BOOTSTRAP_RESAMPLES,
)
# What defines the split and the encoding. An adapter's metadata fixes them (a flag that
# contradicts it is an error); without an adapter these defaults are train.py's.
ENCODING_DEFAULTS = dict(split_seed=42, decimals=2, context_fraction=0.7)
CPU_BATCH = 16


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line: argparse's usage block would hide the message
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="hub repo id or local checkpoint folder")
    p.add_argument("--adapter", help="a LoRA adapter folder written by train.py (optional)")
    p.add_argument("--baseline", help=f"forecast with a baseline instead: {baselines.NAMES}")
    p.add_argument("--data", help="HDF5 file with /trajectories and /time")
    p.add_argument("--split", choices=["val", "test"])
    p.add_argument("--split-seed", type=int, help="default 42 (with --adapter: its own)")
    p.add_argument("--decimals", type=int, help="default 2 (with --adapter: its own)")
    p.add_argument("--context-fraction", type=float, help="share of each series in the prompt")
    p.add_argument("--limit", type=int, help="first N series of the split (default: all)")
    p.add_argument("--forecast-steps", type=int, help="steps to forecast")
    p.add_argument("--unconstrained", action="store_true",
                   help="let the model write any token (the raw greedy protocol)")
    p.add_argument("--samples", type=int, help="sampled continuations per series (0: greedy)")
    p.add_argument("--temperature", type=float, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep this much probability")
    p.add_argument("--seed", type=int, help="sampling seed (series i's noise: a hash of the "
                   "seed and i, its position in the split)")
    p.add_argument("--batch-size", help="series per batch, or auto (CUDA: what fits; CPU: 16)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="decoding steps as compiled "
                   "graphs (qwen_min/compiled.py); auto: on for CUDA, and eager if it fails")
    p.add_argument("--out", help="output folder")
    p.add_argument("--ledger", help="JSONL FLOP ledger")
    p.add_argument("--flops-budget", type=float)
    p.add_argument("--force", action="store_true", help="override: run past the FLOP "
                   "budget, write into an --out that holds files, or evaluate an adapter "
                   "trained on another base model (a warning says so)")
    p.add_argument("--plot-series", type=int, help="series drawn in trajectories.png")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="resamples of the series for each metric's 95%% interval (0: none)")
    p.add_argument("--compare", nargs="+", metavar="EVAL_DIR",
                   help="only draw a comparison of finished evaluations (their metrics.json)")
    p.set_defaults(**DEFAULTS)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """The first numeric flag out of range, as a one-line message; None when all are valid."""
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            return f"--batch-size must be an integer ≥ 1 or auto, got {args.batch_size!r}"
    rules = [
        ("--limit", args.limit, args.limit is None or args.limit >= 1,
         "an integer ≥ 1 (the first N series of the split; leave it out for all)"),
        ("--forecast-steps", args.forecast_steps, args.forecast_steps >= 1, "an integer ≥ 1"),
        ("--batch-size", args.batch_size, args.batch_size == "auto" or args.batch_size >= 1,
         "an integer ≥ 1 or auto"),
        ("--samples", args.samples, args.samples >= 0, "an integer ≥ 0 (0: greedy)"),
        ("--temperature", args.temperature, args.samples == 0 or args.temperature > 0,
         "> 0 when sampling (for greedy decoding use --samples 0)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--seed", args.seed, args.seed >= 0, "an integer ≥ 0"),
        ("--split-seed", args.split_seed, args.split_seed is None or args.split_seed >= 0,
         "an integer ≥ 0"),
        ("--decimals", args.decimals, args.decimals is None or args.decimals >= 0,
         "an integer ≥ 0"),
        ("--context-fraction", args.context_fraction,
         args.context_fraction is None or 0 < args.context_fraction < 1, "in (0, 1)"),
        ("--flops-budget", args.flops_budget, args.flops_budget > 0, "> 0"),
        ("--plot-series", args.plot_series, args.plot_series >= 0, "an integer ≥ 0"),
        ("--bootstrap", args.bootstrap, args.bootstrap >= 0, "an integer ≥ 0 (0: no intervals)"),
    ]
    for flag, value, ok, expected in rules:
        if not ok:
            return f"{flag} must be {expected}, got {value}"
    if args.baseline is not None:
        if args.baseline not in baselines.NAMES:
            return (f"--baseline {args.baseline!r} is not a baseline; choose one of "
                    f"{', '.join(baselines.NAMES)}")
        if args.adapter or args.samples or args.unconstrained:
            return ("--baseline runs no language model: leave out --adapter, --samples and "
                    "--unconstrained")
    return None


def encoding_from_adapter(args: argparse.Namespace, metadata: dict, where: str) -> str | None:
    """Take split seed, decimals and context fraction from the adapter's metadata (where it has
    them); a flag that contradicts it is an error, returned as a one-line message."""
    train_config = metadata.get("train_config", {})
    fixed = {"split_seed": train_config.get("split_seed"),
             "decimals": metadata["scaler"]["decimals"],
             "context_fraction": train_config.get("context_fraction")}
    for key, value in fixed.items():
        given = getattr(args, key)
        if value is None:
            continue
        if given is not None and given != value:
            flag = "--" + key.replace("_", "-")
            return (f"{flag} {given} contradicts {where}: the adapter was trained with {key} = "
                    f"{value}; leave the flag out (the adapter's value is used)")
        setattr(args, key, value)
    return None


def base_model_problem(args: argparse.Namespace, model, metadata: dict) -> str | None:
    """A one-line refusal when --model is not the base model the adapter was trained on (its
    qwen_min.json records the base's identity: lora.base_model_identity); None when it is.
    --force turns the refusal into a warning; an adapter from before the record is accepted
    with a warning, as nothing can be checked."""
    recorded = metadata.get("base_model")
    if recorded is None:
        print(f"warning: {args.adapter}/qwen_min.json records no base model (an adapter from an "
              f"older train.py): that it was trained on --model {args.model} is not checked",
              file=sys.stderr)
        return None
    if not (differs := base_model_mismatch(model, recorded)):
        return None
    message = (f"--model {args.model} is not the base model {args.adapter} was trained on "
               f"({recorded.get('name_or_path')}): {differs} in its qwen_min.json")
    if args.force:
        print(f"warning: {message}; evaluating anyway (--force)", file=sys.stderr)
        return None
    return f"{message}; evaluate it with that model, or pass --force to evaluate anyway"


def context_problem(args: argparse.Namespace, context_steps: int, series_steps: int
                    ) -> str | None:
    """A one-line refusal when the context is shorter than the forecaster needs: the model one
    step (a prompt), a baseline baselines.MIN_CONTEXT; None when it is long enough."""
    need = baselines.MIN_CONTEXT[args.baseline] if args.baseline else 1
    if context_steps >= need:
        return None
    who = f"baseline {args.baseline}" if args.baseline else "the model"
    return (f"--context-fraction {args.context_fraction} gives a {context_steps}-step context "
            f"(of {series_steps} steps); {who} needs at least {need}: raise --context-fraction "
            f"to at least {need / series_steps:g}")


def fill_encoding_defaults(args: argparse.Namespace) -> None:
    for key, value in ENCODING_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def left_pad(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), data.PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, T - len(t):], mask[i, T - len(t):] = torch.tensor(t), 1
    return ids, mask


@torch.no_grad()
def prompt_last_logits(model, cache, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, V) logits of each prompt's last position, which predict the first target token.

    Sampled generation keeps no logits (B·N rows × steps × V would not fit), so the cache is
    rewound by one position and the prompt's last token runs again: one token per series."""
    cache.rewind(ids.shape[1] - 1)
    return model(ids[:, -1:], mask, cache, last_only=True)[:, -1]  # (B, V)


def grammar_states(tables: GrammarTables, ids: torch.Tensor) -> torch.Tensor:
    """(B, L) the grammar's state before each token of `ids` (B, L), which starts a step.
    A token the grammar does not allow (−1) restarts at state 0 rather than index a table with
    −1: its own probability is 0 under the grammar already, so later states do not matter."""
    states = [tables.start(ids.shape[0])]
    for j in range(ids.shape[1] - 1):
        states.append(tables.advance(states[-1], ids[:, j]).clamp(min=0))
    return torch.stack(states, 1)


@torch.no_grad()
def teacher_forced(model, cache, prompt_mask, targets, first_logits, tables: GrammarTables
                   ) -> tuple[list[float], list[float]]:
    """Per series: the mean cross-entropy of the true target tokens given the true prefix, and
    their summed nats under the grammar-renormalised distribution (metrics.nll_per_dim): each
    position's logits restricted to the tokens the grammar allows there, then log-softmax.

    Runs after `generate` with the same KV cache: rewound to the prompt, the cache takes the
    true continuation instead of the generated one, so the 700-token prompt is not run twice.
    first_logits (B, V) are the prompt's last-position logits (generation step 0), which
    predict the first target token."""
    B, T = prompt_mask.shape
    L = max(len(t) for t in targets)
    ids = torch.full((B, L), data.PAD_ID, dtype=torch.long, device=prompt_mask.device)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(targets):  # right-padded: the targets follow the prompt directly
        ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
    cache.rewind(T)
    h = model.model(ids[:, :-1], torch.cat([prompt_mask, mask[:, :-1]], 1), cache)
    states = grammar_states(tables, ids)  # (B, L)
    columns = tables.token_ids  # (C,): the grammar's tokens; no other can be allowed
    ce, nats = [], []
    for i, t in enumerate(targets):
        # position j of the target block predicts target token j+1
        logits = torch.cat([first_logits[i : i + 1], model.lm_head(h[i, : len(t) - 1]).float()])
        target = ids[i, : len(t)]
        ce.append(cross_entropy(logits, target).item())  # (len(t), V) vs (len(t),)
        allowed = tables.allowed[states[i, : len(t)]][:, columns]  # (len(t), C)
        restricted = logits[:, columns].masked_fill(~allowed, float("-inf"))
        column = (columns[None] == target[:, None]).long().argmax(1)  # (len(t),) into C
        nats.append(cross_entropy(restricted, column).item() * len(t))
    return ce, nats


def generation_ce(step_logits: torch.Tensor, row: torch.Tensor, target: list[int]) -> float:
    """Cross-entropy of the generation's own per-step scores against the true tokens (the
    coursework's validation loss); compared over the shorter of the two sequences. A row that
    finished before the batch did is filled with PAD_ID after its last step: the logits of
    those steps (it was fed its final ';' again) are not its own, so they are left out."""
    written = int((row != data.PAD_ID).sum())  # the fill follows the row's own tokens
    n = min(len(target), written)
    target_ids = torch.tensor(target[:n], device=step_logits.device)
    return cross_entropy(step_logits[:n], target_ids).item()


def lora_settings(model) -> dict:
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return {"lora_rank": lora[0].rank if lora else 0,
            "lora_targets": sorted({m.flop_name for m in lora})}


def auto_batch_size(model, device: torch.device, samples: int, prompt_len: int,
                    positions: int, new_tokens: int) -> int:
    """Series per batch: on CUDA as many as fit in 70% of the free memory, 1 GiB set aside.
    Per series, in fp32 bytes (bf16 activations take half: an upper bound):
      - its KV cache over `positions` (prompt + generated);
      - the prefill's activations (on CUDA all rows go through at once), one layer at a time:
        per prompt token its MLP's 3 intermediate-size vectors (gate, up, their product) and
        4 hidden-size ones, and the attention's scores and weights, num_heads·T² each, should
        SDPA fall back to its plain kernel;
      - greedy: the kept logits of every generated step. They are allocated after the prefill
        has freed its activations, so the larger of the two counts, beside the cache.
      - sampled: no logits, but after the prefill three caches are alive at once: the
        prompt's (1 row, kept for the teacher-forced pass), the expanded one (N rows) and the
        expansion's temporary copy of the prompt (N rows, bounded by the full length here).
    On CPU 16: larger batches only add cache misses there."""
    if device.type != "cuda":
        return CPU_BATCH
    cfg = model.cfg
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions * 4
    T = prompt_len
    prefill = 4 * T * (3 * cfg.intermediate_size + 4 * cfg.hidden_size
                       + 2 * cfg.num_attention_heads * T)
    if samples:
        per_series = max(kv + prefill, (2 * samples + 1) * kv)
    else:
        per_series = kv + max(prefill, new_tokens * cfg.vocab_size * 4)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int((0.7 * free - 2**30) // per_series))


def series_seeds(seed: int, positions: range) -> torch.Tensor:
    """(B,) int64 sampling seeds of the series at these positions in the split: a hash of
    (--seed, position). Each series' noise then depends on nothing else (not the batch), and
    no two runs share a stream: with seed + position, --seed 1 would give series i the noise
    that --seed 0 gave series i + 1."""
    digests = (hashlib.sha256(f"{seed},{i}".encode()).digest() for i in positions)
    return torch.tensor([int.from_bytes(d[:8], "little") >> 1 for d in digests],
                        dtype=torch.int64)  # 63 bits: a non-negative int64


def text_of(tokenizer, row: list[int]) -> str:
    """A generated row as text; the end-of-sequence filler of finished rows is dropped."""
    return tokenizer.decode([t for t in row if t != data.PAD_ID])


def forecast_with_model(args, model, tokenizer, scaler, prompts, targets, device, dtype, out):
    """Every series through the model, batch by batch, each batch's FLOPs on the ledger.
    → (values (N, S, steps, 2) original units, NaN where a step failed, texts, teacher-forced
    CE per series, generation CE per series or None when sampling, the target's nats per
    series under the grammar (teacher_forced), counted FLOPs)."""
    grammar = LLMTimeGrammar.from_tokenizer(tokenizer, scaler.decimals)
    new_tokens = grammar.max_new_tokens(args.forecast_steps)  # the longest n_steps can take
    size = args.batch_size
    if size == "auto":
        prompt_len = max(map(len, prompts))
        positions = prompt_len + max(new_tokens, max(map(len, targets)))
        size = auto_batch_size(model, device, args.samples, prompt_len, positions, new_tokens)
    batches = [slice(b, min(b + size, len(prompts))) for b in range(0, len(prompts), size)]
    # the price the plan also counts (flops.evaluation_price), held while the batches run
    planned = flops.evaluation_price(
        model.cfg, list(map(len, prompts)), list(map(len, targets)), args.forecast_steps,
        scaler.decimals, size, **lora_settings(model), samples=args.samples, top_p=args.top_p,
        constrained=not args.unconstrained)
    with ledger.reserve(args.ledger, planned, args.flops_budget, args.force,
                        name=str(out)) as booking:
        return generate_batches(args, model, tokenizer, scaler, grammar, prompts, targets,
                                batches, new_tokens, device, dtype, out, booking)


def generate_batches(args, model, tokenizer, scaler, grammar, prompts, targets, batches,
                     new_tokens: int, device, dtype, out, booking: ledger.Reservation):
    """forecast_with_model's batches in turn, each one's counted FLOPs a charge on `booking`."""
    S = max(args.samples, 1)
    values = np.full((len(prompts), S, args.forecast_steps, 2), np.nan)
    texts, tf_ce, gen_ce, nats, total = [], [], [], [], 0
    tables = grammar.tables(model.cfg.vocab_size, device)

    def decode(ids, mask, room: int, seeds, compiled: bool):
        """The batch's forecasts into a fresh KV cache: (cache, tokens, step logits)."""
        cache = KVCache(model.cfg, ids.shape[0], room, cache_dtype(model, device), device)
        tokens, step_logits = generate(
            model, ids, new_tokens, mask, eos_token_id=data.PAD_ID, cache=cache,
            grammar=None if args.unconstrained else grammar, n_steps=args.forecast_steps,
            sampling=SamplingOptions(args.samples, args.temperature, args.top_p, seeds=seeds),
            return_logits=not args.samples,
            # decode steps as one CUDA graph each (qwen_min/compiled.py); the same count
            compiled_decode=compiled)
        return cache, tokens, step_logits

    compiled, eager = (functools.partial(decode, compiled=c) for c in (True, False))
    decode_batch = compiled if compile_wanted(args.compile, device) else eager
    if decode_batch is compiled and args.compile == "auto":  # failed: the batch again, eagerly
        decode_batch = CompileFallback(lambda: compiled, eager, "compiled decoding")
    for sl in tqdm(batches, desc=f"eval {args.split}", unit="batch", dynamic_ncols=True):
        ids, mask = (x.to(device) for x in left_pad(prompts[sl]))
        B, T = ids.shape
        room = T + max(new_tokens, max(len(t) for t in targets[sl]))
        with count_flops() as counter, autocast(device, dtype):
            cache, tokens, step_logits = decode_batch(
                ids, mask, room, series_seeds(args.seed, range(sl.start, sl.stop)))
            first = (prompt_last_logits(model, cache, ids, mask) if args.samples
                     else step_logits[:, 0])
            ce, target_nats = teacher_forced(model, cache, mask, targets[sl], first, tables)
            tf_ce, nats = tf_ce + ce, nats + target_nats
            if not args.samples:
                gen_ce += [generation_ce(step_logits[j], tokens[j], t)
                           for j, t in enumerate(targets[sl])]
        for r, row in enumerate(tokens.tolist()):  # rows are series-major: b·S + s
            text = text_of(tokenizer, row)
            values[sl.start + r // S, r % S] = scaler.decode(text, n_steps=args.forecast_steps)[0]
            texts.append(text)
        total += counter.total
        booking.append({
            "kind": "eval", "name": str(out), "flops": counter.total, "split": args.split,
            "series": [sl.start, sl.stop], "prompt_len": T, "new_tokens": tokens.shape[1],
            "target_lens": [len(t) for t in targets[sl]], "samples": args.samples,
            "top_p": args.top_p})
    series_texts = [" | ".join(texts[i * S : (i + 1) * S]) for i in range(len(prompts))]
    return values, series_texts, tf_ce, gen_ce or None, nats, total


def forecast_with_baseline(args, series, time, context_steps: int, out):
    """values (N, 1, steps, 2) from a baseline (non-finite → failed step), the series mean of
    each per-series diagnostic in its info (lv-fit's residual, …), and its backtest errors
    (backtest_errors); 0 FLOPs."""
    res = baselines.forecast(args.baseline, series[:, :context_steps], args.forecast_steps,
                             time=time[: context_steps + args.forecast_steps])
    values = np.where(np.isfinite(res.forecasts), res.forecasts, np.nan)[:, None]
    errors = backtest_errors(args, series, time, context_steps)
    ledger.append_ledger(args.ledger, {"kind": "baseline", "name": str(out), "flops": 0,
                                      "baseline": args.baseline, "split": args.split,
                                      "series": [0, len(series)]})
    info = {k: summarize(v) for k, v in res.info.items() if np.shape(v) == (len(series),)}
    return values, info, errors


def summarize(diagnostic: np.ndarray) -> float | dict[str, int]:
    """A per-series baseline diagnostic for metrics.json: the mean of a measured one (lv-fit's
    residual); for a categorical one (integers: lv-fit's winning start, −1, 0, 1, …), where a
    mean means nothing, how many series took each value."""
    if diagnostic.dtype.kind in "iub":
        values, counts = np.unique(diagnostic, return_counts=True)
        return {str(v): int(n) for v, n in zip(values.tolist(), counts)}
    return float(np.mean(diagnostic))


def backtest_errors(args, series, time, context_steps: int) -> np.ndarray | None:
    """(N, steps, 2) the baseline's errors, original units, when it forecasts each context's
    last --forecast-steps steps from the steps before them: its density's σ is fitted on these
    (metrics.backtest_sigma), so no held-out step is seen. None when the context is too short
    to hold them out (fewer steps would remain than the baseline needs: MIN_CONTEXT)."""
    start = context_steps - args.forecast_steps
    if start < baselines.MIN_CONTEXT[args.baseline]:
        return None
    res = baselines.forecast(args.baseline, series[:, :start], args.forecast_steps,
                             time=time[:context_steps])
    forecasts = np.where(np.isfinite(res.forecasts), res.forecasts, np.nan)  # as the forecast
    return forecasts - series[:, start:context_steps]


DENSITY = {"model": "the model's token probabilities, renormalised to the LLMTIME grammar",
           "baseline": "Gaussian around the forecast, σ per horizon and variable from a "
                       "backtest on the contexts; NLL/D from its mass on the truth's bin",
           "point": "none: a point forecast (the context is too short to hold out a backtest "
                    "for σ), so no NLL/D, coverage or PIT"}


def forecast_distribution(values: np.ndarray, errors: np.ndarray | None,
                          scaler: data.LLMTimeScaler) -> Samples | Gaussian:
    """The one distribution every score is taken from (metrics.py): the model's samples; a
    baseline's Gaussian around its forecast, σ per horizon and variable from its backtest
    errors (metrics.backtest_sigma); a point forecast where there was no backtest."""
    if errors is None:
        return Samples(values)
    sigma = backtest_sigma(errors / scaler.alpha, scaler.decimals) * scaler.alpha
    return Gaussian(values[:, 0], sigma)


def density(forecast: Samples | Gaussian, truths, scaler, nats) -> np.ndarray | None:
    """Per-value NLL in scaled units for metrics.score, on one footing: the mass on the truth's
    LLMTIME bin / the bin width. A model's from the target nats of its teacher-forced pass (its
    series' NLL/D on each of the series' values; NaN for a series whose truth the grammar
    cannot write, > 999 in scaled units), a baseline's from its Gaussian (Gaussian.bin_nll)."""
    D = truths[0].size
    if nats is not None:
        per_dim = nll_per_dim(np.array(nats), D, scaler.decimals)
        return np.repeat(np.where(np.isfinite(per_dim), per_dim, np.nan)[:, None], D, 1)
    if not isinstance(forecast, Gaussian):
        return None
    scaled = Gaussian(forecast.mean / scaler.alpha, forecast.sigma / scaler.alpha)
    return scaled.bin_nll(truths / scaler.alpha, scaler.decimals)


# ----------------------------------------------------------------------------- output


def plot(out: Path, name: str, fig) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out / name, buf.getvalue())


def plot_trajectories(out, series, time, context_steps, forecast, rows, title):
    """Context, truth and the point forecast; with a distribution, its 10–90% band shaded."""
    import matplotlib.pyplot as plt

    point = forecast.median()
    band = [forecast.quantile(q) for q in (0.1, 0.9)] if forecast.spread else None
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.6 * len(rows)), squeeze=False)
    for ax_row, i in zip(axes, rows):
        for v, (ax, name) in enumerate(zip(ax_row, ("prey", "predator"))):
            horizon = time[context_steps : context_steps + point.shape[1]]
            ax.plot(time[:context_steps], series[i, :context_steps, v], "k-", lw=1, label="context")
            ax.plot(time[context_steps:], series[i, context_steps:, v], "k:", lw=1, label="truth")
            if band is not None:
                ax.fill_between(horizon, band[0][i, :, v], band[1][i, :, v], color="r",
                                alpha=0.2, label="10–90% band")
            ax.plot(horizon, point[i, :, v], "r.-", label="forecast")
            ax.set_title(f"series {i}: {name}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    plot(out, "trajectories.png", fig)
    plt.close(fig)


def plot_horizon(out, curves: dict[str, list[float]], ylabel: str, name: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    positive = False
    for label, y in curves.items():
        y = [np.nan if v is None else v for v in y]
        positive |= any(v > 0 for v in y)  # NaN > 0 is False
        ax.plot(np.arange(1, len(y) + 1), y, "o-", label=label)
    # a log axis spreads errors that span decades; an exact forecast (all 0) keeps a linear one
    ax.set(xlabel="forecast horizon (time steps)", ylabel=ylabel,
           yscale="log" if positive else "linear")
    ax.legend(fontsize=8)
    plot(out, name, fig)
    plt.close(fig)


COMPARE_KEYS = ("n_series", "decoding", "mse_scaled", "mse_scaled_filled", "crps_scaled",
                "nll_per_dim_scaled", "mae_scaled", "coverage", "parse_failure_rate",
                "teacher_forced_ce", "generation_ce")


def with_interval(m: dict, key: str) -> str:
    """A metric as the comparison table shows it: 4 significant digits (coverage with its
    level), then its bootstrap 95% interval when metrics.json has one."""
    v = m.get(key)
    text = "—" if v is None else v if isinstance(v, str) else f"{v:.4g}"
    return text + shown_level(m, key) + shown_interval(m.get(f"{key}_ci95"))


def series_of(folders: list, what: str) -> tuple[dict, str | None]:
    """Each folder's per-series totals (forecasts.npz), and a one-line reason when they were not
    all evaluated on the same series (indices and true values)."""
    loaded = {folder: load_series(Path(folder) / "forecasts.npz") for folder in folders}
    first = folders[0]
    for folder in folders[1:]:
        if not same_series(loaded[first], loaded[folder]):
            return loaded, (f"{what}: {folder} and {first} forecast different series (their "
                            "forecasts.npz indices or true values differ); compare runs on the "
                            "same data file, split and --limit")
    return loaded, None


def paired_table(runs: dict, loaded: dict, n_bootstrap: int) -> list[str]:
    """Markdown: each run against the best (metrics.best) on the same series, per metric."""
    top = best(list(runs.values()))
    ref = next(d for d, m in runs.items() if m is top)
    lines = [f"Paired with the best run by filled MSE, {ref}: run − best [paired-bootstrap 95% "
             "interval over series], * where it excludes 0; the share of series on which each "
             "is lower (run / best).", "",
             "| run | " + " | ".join(LABELS[k] for k in LOWER_IS_BETTER) + " |",
             "|---" * (len(LOWER_IS_BETTER) + 1) + "|"]
    for d in runs:
        if d != ref:
            diff = paired(loaded[d][2], loaded[ref][2], n_bootstrap)
            lines.append(f"| {d} | " + " | ".join(shown_difference(diff.get(k))
                                                   for k in LOWER_IS_BETTER) + " |")
    return lines


def compare(dirs: list[str], out: Path, n_bootstrap: int) -> int:
    """Side-by-side figure and table of finished evaluations, with each metric's interval, and
    each run paired with the best on the same series."""
    runs = {}
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            print(f"error: {path} not found; run evaluate.py --out {d} first", file=sys.stderr)
            return 2
        try:
            runs[d] = read_json(path)
        except ValueError as e:
            return fail(f"{e}; or run evaluate.py --out {d} again")
    try:
        loaded, different = series_of(dirs, "--compare")
    except TotalsError as e:
        return fail(str(e))
    if different:
        return fail(different)
    out.mkdir(parents=True, exist_ok=True)
    plot_horizon(out, {d: m.get("mse_scaled_by_horizon", []) for d, m in runs.items()},
                 "MSE (scaled units)", "compare_horizon.png")
    lines = ["| run | " + " | ".join(LABELS[k] for k in COMPARE_KEYS) + " |",
             "|---" * (len(COMPARE_KEYS) + 1) + "|"]
    lines += [f"| {d} | " + " | ".join(with_interval(m, k) for k in COMPARE_KEYS) + " |"
              for d, m in runs.items()]
    if len(runs) > 1:
        lines += ["", *paired_table(runs, loaded, n_bootstrap)]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def write_outputs(out: Path, metrics: dict, indices, values, forecast, truths, texts, tf_ce,
                  gen_ce, totals):
    """Every output but the figures; metrics.json last, as the mark of a finished evaluation
    (sweep.py skips a run that has one), so a failed write (a full disk) leaves none."""
    point = forecast.median()
    err = (point - truths) / metrics["alpha"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["series", "mse_scaled", "mae_scaled", "teacher_forced_ce", "generation_ce",
                "nll_per_dim_scaled", "failed_steps", "forecast_text"])
    nll = totals.get("nll_per_dim_scaled")
    for k, i in enumerate(indices):
        w.writerow([int(i), mean_or_none(err[k] ** 2), mean_or_none(np.abs(err[k])),
                    tf_ce[k] if tf_ce else None, gen_ce[k] if gen_ce else None,
                    float(nll[0][k] / nll[1][k]) if nll and nll[1][k] else None,
                    int(np.isnan(values[k, :, :, 0]).sum()), texts[k] if texts else None])
    atomic_write_text(out / "per_series.csv", buf.getvalue())
    npz = io.BytesIO()
    sigma = ({"sigma": np.broadcast_to(forecast.sigma, point.shape)}
             if isinstance(forecast, Gaussian) else {})  # a baseline's distribution: N(point, σ²)
    np.savez(npz, indices=indices, forecasts=point, samples=values, truths=truths, **sigma,
             **totals_arrays(totals))
    atomic_write_bytes(out / "forecasts.npz", npz.getvalue())
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def decoding(args: argparse.Namespace) -> str:
    """How the forecasts were made, as metrics.json and --compare show it."""
    if args.baseline:
        return "baseline"
    how = "unconstrained" if args.unconstrained else "grammar-constrained"
    return f"{how}, {args.samples} samples" if args.samples else f"{how}, greedy"


def prepare_out(out: Path, force: bool) -> str | None:
    """Create --out before any compute, so that nothing is charged for results that cannot be
    written: it must be writable, and empty unless --force. A one-line problem, or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return (f"--out {out}: cannot write there ({e.strerror or e}); choose a folder you can "
                "write to")
    if not force and any(out.iterdir()):
        return (f"--out {out} already holds files (an earlier evaluation?); choose another "
                "--out, or pass --force to write over them")
    return None


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    try:
        if args.compare:
            if problem := check_args(args):  # --bootstrap is the one that --compare uses
                return fail(problem)
            return compare(args.compare, Path(args.out), args.bootstrap)
        return run_evaluation(args)
    except (ledger.LedgerError, data.DataError) as e:
        return fail(str(e))
    except OSError as e:  # a full disk: outputs are written atomically, none is left half
        return fail(os_error_line(e))
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} holds no metrics.json (no finished evaluation); the "
              f"batches that ran are on {args.ledger}. Run the same command again to evaluate "
              "from the start", file=sys.stderr)
        return 130


def run_evaluation(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if problem := check_args(args) or prepare_out(out, args.force):
        return fail(problem)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = tokenizer = metadata = None
    try:
        trajectories, time = data.load_trajectories(args.data)
        if args.baseline is None:
            # under bf16 autocast the frozen base is kept in bf16 (half the memory, no per-call
            # casts); LoRA tensors stay fp32 (bench/results.md)
            model = load_model(args.model, dtype=dtype, device=device)
            tokenizer = load_tokenizer(args.model)
        if args.adapter:
            metadata = load_adapter(model, args.adapter)
    except (CheckpointError, data.DataError, AdapterError) as e:
        return fail(str(e))
    if metadata is not None:
        if "scaler" not in metadata:
            return fail(f"{args.adapter}/qwen_min.json has no 'scaler' (α, decimals); was the "
                        "adapter written by train.py?")
        if problem := encoding_from_adapter(args, metadata, f"{args.adapter}/qwen_min.json"):
            return fail(problem)
        # its split seed and α mean something only for the file it was trained on
        trained_on = metadata.get("data_sha256")
        if trained_on and trained_on != data.file_sha256(args.data):
            return fail(f"--data {args.data} is not the file {args.adapter} was trained on (its "
                        "SHA-256 differs from the adapter's qwen_min.json): evaluate it on that "
                        "file, or its validation series may be ones it trained on")
        if problem := base_model_problem(args, model, metadata):
            return fail(problem)
        scaler = data.LLMTimeScaler.from_dict(metadata["scaler"])
    fill_encoding_defaults(args)
    try:  # too few series to split, or all zero: refused as train.py refuses them
        split = data.split_indices(len(trajectories), seed=args.split_seed)
        if metadata is None:  # no adapter: α fitted on the training split, as training does
            scaler = data.LLMTimeScaler.fit(trajectories[split["train"]], decimals=args.decimals)
    except data.DataError as e:
        return fail(f"--data {args.data}: {e}")
    indices = split[args.split][: args.limit]
    series = trajectories[indices]
    context_steps = int(round(args.context_fraction * series.shape[1]))
    if problem := context_problem(args, context_steps, series.shape[1]):
        return fail(problem)
    if context_steps + args.forecast_steps > series.shape[1]:
        return fail(f"--forecast-steps {args.forecast_steps} runs past the series "
                    f"({series.shape[1]} steps, {context_steps} of them context)")
    truths = series[:, context_steps : context_steps + args.forecast_steps]

    texts = tf_ce = gen_ce = info = nats = errors = None
    if args.baseline:
        values, info, errors = forecast_with_baseline(args, series, time, context_steps, out)
        counted = 0
    else:
        model.to(device).eval()
        prompts, targets = [], []
        for s in series:
            prompt, target, _ = data.forecast_split(
                s, scaler, args.context_fraction, args.forecast_steps)
            prompts.append(data.tokenize(tokenizer, prompt))
            # the ';' that ends the last value is scored too, as every other value's end is (at
            # 0 decimals a digit may follow the last one instead, so that ';' costs nats)
            targets.append(data.tokenize(tokenizer, target + ";"))
        try:
            values, texts, tf_ce, gen_ce, nats, counted = forecast_with_model(
                args, model, tokenizer, scaler, prompts, targets, device, dtype, out)
        except ledger.BudgetError as e:
            return fail(str(e), code=3)

    forecast = forecast_distribution(values, errors, scaler)
    scores, totals = score(forecast, truths, series[:, context_steps - 1], scaler.alpha,
                           density(forecast, truths, scaler, nats), args.bootstrap)
    metrics = {
        "n_series": len(series),
        "split": args.split,
        "split_seed": args.split_seed,
        "model": None if args.baseline else args.model,
        "adapter": args.adapter,
        "baseline": args.baseline,
        "baseline_info": info,
        "decoding": decoding(args),
        "samples": args.samples,
        "temperature": args.temperature if args.samples else None,
        "top_p": args.top_p if args.samples else None,
        "seed": args.seed if args.samples else None,
        "forecast_steps": args.forecast_steps,
        "context_steps": context_steps,
        "alpha": scaler.alpha,
        "decimals": scaler.decimals,
        "density": DENSITY["model" if args.baseline is None else
                           "baseline" if isinstance(forecast, Gaussian) else "point"],
        **scores,
        "teacher_forced_ce": float(np.mean(tf_ce)) if tf_ce else None,
        "generation_ce": float(np.mean(gen_ce)) if gen_ce else None,
        "flops": counted,
        "provenance": provenance(),
    }
    title = (f"baseline: {args.baseline}" if args.baseline else
             f"{args.model}" + (f" + {args.adapter}" if args.adapter else " (no adapter)"))
    rows = list(range(min(args.plot_series, len(series))))
    if rows:
        plot_trajectories(out, series, time, context_steps, forecast, rows, title)
    plot_horizon(out, {"MSE": metrics["mse_scaled_by_horizon"],
                       "MAE": metrics["mae_scaled_by_horizon"]}, "error (scaled units)",
                 "horizon.png")
    write_outputs(out, metrics, indices, values, forecast, truths, texts, tf_ce, gen_ce,
                  totals)  # the last
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("horizon")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
