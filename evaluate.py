"""Forecast evaluation: greedy LLMTIME forecasts of held-out Lotka–Volterra series.

    python evaluate.py --out runs/eval-base                               # the untrained model
    python evaluate.py --adapter runs/final/adapter --out runs/eval-final # a trained adapter
    python evaluate.py --compare runs/eval-base runs/eval-final --out runs/compare

Each series' first 70% of time steps is the prompt (ending in ';'); the model greedily
writes the next --forecast-steps steps, batched with the KV cache. Written to --out:
metrics.json, per_series.csv, forecasts.npz, trajectories.png and horizon.png; the counted
FLOPs go to the ledger.

Scores. MSE/MAE are over the steps that parsed (a step is two numbers); steps the model
garbled or never wrote count in `parse_failure_rate` instead. "Scaled" is in LLMTIME units
(value / α, what the coursework reports), "original" in the data's own units.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import flops
from lora import AdapterError, load_adapter
from qwen_min import CheckpointError, KVCache, count_flops, generate, load_model, load_tokenizer
from qwen_min.generate import cache_dtype
from qwen_min.loading import DEFAULT_MODEL
from qwen_min.model import LoRALinear, cross_entropy
from qwen_min.runtime import (
    atomic_write_bytes,
    atomic_write_text,
    autocast,
    pick_device,
    pick_dtype,
)

DEFAULTS = dict(
    model=DEFAULT_MODEL,
    adapter=None,
    data="data/lotka_volterra_data.h5",
    split="val",
    split_seed=42,
    decimals=2,
    limit=None,
    forecast_steps=10,
    context_fraction=0.7,
    batch_size=16,
    dtype="auto",
    device="auto",
    out="runs/eval",
    ledger="runs/ledger.jsonl",
    flops_budget=flops.BUDGET,
    plot_series=4,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="hub repo id or local checkpoint folder")
    p.add_argument("--adapter", help="a LoRA adapter folder written by train.py (optional)")
    p.add_argument("--data", help="HDF5 file with /trajectories and /time")
    p.add_argument("--split", choices=["val", "test"])
    p.add_argument("--split-seed", type=int)
    p.add_argument("--decimals", type=int, help="without --adapter (with one, its metadata rules)")
    p.add_argument("--limit", type=int, help="first N series of the split (default: all)")
    p.add_argument("--forecast-steps", type=int, help="steps to forecast (10 = 100 tokens)")
    p.add_argument("--context-fraction", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--out", help="output folder")
    p.add_argument("--ledger", help="JSONL FLOP ledger")
    p.add_argument("--flops-budget", type=float)
    p.add_argument("--force", action="store_true", help="run even if the budget would be exceeded")
    p.add_argument("--plot-series", type=int, help="series drawn in trajectories.png")
    p.add_argument("--compare", nargs="+", metavar="EVAL_DIR",
                   help="only draw a comparison of finished evaluations (their metrics.json)")
    p.set_defaults(**DEFAULTS)
    return p.parse_args(argv)


def left_pad(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), T), data.PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, T - len(t):], mask[i, T - len(t):] = torch.tensor(t), 1
    return ids, mask


@torch.no_grad()
def teacher_forced_ce(model, cache, prompt_mask, targets, first_logits) -> list[float]:
    """Per-series mean cross-entropy of the true target tokens given the true prefix.

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
    cache.length = T
    h = model.hidden_states(ids[:, :-1], torch.cat([prompt_mask, mask[:, :-1]], 1), cache)
    out = []
    for i, t in enumerate(targets):
        # position j of the target block predicts target token j+1
        logits = torch.cat([first_logits[i : i + 1], model.lm_head(h[i, : len(t) - 1]).float()])
        out.append(cross_entropy(logits, ids[i, : len(t)]).item())  # (len(t), V) vs (len(t),)
    return out


def planned_flops(model, prompts, targets, new_tokens: int, batch_size: int) -> int:
    """An upper bound for the budget check: per batch, generation at the longest prompt plus a
    teacher-forced pass with the LM head on every position (the real pass heads only targets)."""
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    kw = {"lora_rank": lora[0].rank if lora else 0,
          "lora_targets": sorted({m.flop_name for m in lora})}
    total = 0
    for b in range(0, len(prompts), batch_size):
        n = len(prompts[b : b + batch_size])
        longest = max(len(p) + len(t) for p, t in zip(prompts[b : b + batch_size],
                                                       targets[b : b + batch_size]))
        total += flops.generation_flops(model.cfg, n, longest, new_tokens, **kw)
        total += flops.teacher_forced_flops(model.cfg, n, longest, **kw)
    return total


def generation_ce(step_logits: torch.Tensor, target: list[int]) -> float:
    """Cross-entropy of the generation's own per-step scores against the true tokens (the
    coursework's validation loss); compared over the shorter of the two sequences."""
    n = min(len(target), step_logits.shape[0])
    target_ids = torch.tensor(target[:n], device=step_logits.device)
    return cross_entropy(step_logits[:n], target_ids).item()


def mean_or_none(x: np.ndarray) -> float | None:
    """Mean over the parsed (finite) entries; None (JSON null) when nothing parsed."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def plot(out: Path, name: str, fig) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out / name, buf.getvalue())


def plot_trajectories(out, series, time, context_steps, forecasts, rows, title):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.6 * len(rows)), squeeze=False)
    for ax_row, i in zip(axes, rows):
        for v, (ax, name) in enumerate(zip(ax_row, ("prey", "predator"))):
            n = forecasts.shape[1]
            ax.plot(time[:context_steps], series[i, :context_steps, v], "k-", lw=1, label="context")
            ax.plot(time[context_steps:], series[i, context_steps:, v], "k:", lw=1, label="truth")
            ax.plot(time[context_steps : context_steps + n], forecasts[i, :, v], "r.-",
                    label="forecast")
            ax.set_title(f"series {i}: {name}", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    plot(out, "trajectories.png", fig)
    plt.close(fig)


def plot_horizon(out, curves: dict[str, list[float]], ylabel: str, name: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, y in curves.items():
        y = [np.nan if v is None else v for v in y]
        ax.plot(np.arange(1, len(y) + 1), y, "o-", label=label)
    ax.set(xlabel="forecast horizon (time steps)", ylabel=ylabel, yscale="log")
    ax.legend(fontsize=8)
    plot(out, name, fig)
    plt.close(fig)


def compare(dirs: list[str], out: Path) -> int:
    """Side-by-side figure and table of finished evaluations."""
    runs = {}
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            print(f"error: {path} not found; run evaluate.py --out {d} first", file=sys.stderr)
            return 2
        runs[d] = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    plot_horizon(out, {d: m["mse_scaled_by_horizon"] for d, m in runs.items()},
                 "MSE (scaled units)", "compare_horizon.png")
    keys = ["n_series", "mse_scaled", "mae_scaled", "mse", "mae", "teacher_forced_ce",
            "generation_ce", "parse_failure_rate"]
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    lines += [f"| {d} | " + " | ".join(fmt(m[k]) for k in keys) + " |" for d, m in runs.items()]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    out = Path(args.out)
    if args.compare:
        return compare(args.compare, out)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        # under bf16 autocast the frozen base is kept in bf16 (half the memory, no per-call
        # casts); LoRA tensors and Adam state stay fp32 (bench/results.md)
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
        trajectories, time = data.load_trajectories(args.data)
    except (CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = data.split_indices(len(trajectories), seed=args.split_seed)
    if args.adapter:
        try:
            metadata = load_adapter(model, args.adapter)
        except AdapterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if "scaler" not in metadata:
            print(f"error: {args.adapter}/qwen_min.json has no 'scaler' (α, decimals); was the "
                  "adapter written by train.py?", file=sys.stderr)
            return 2
        scaler = data.LLMTimeScaler.from_dict(metadata["scaler"])
    else:  # the untrained model: α fitted on the training split, exactly as training does
        scaler = data.LLMTimeScaler.fit(trajectories[split["train"]], decimals=args.decimals)
    model.to(device).eval()
    indices = split[args.split][: args.limit]
    series = trajectories[indices]
    context_steps = int(round(args.context_fraction * series.shape[1]))
    if context_steps + args.forecast_steps > series.shape[1]:
        print(f"error: --forecast-steps {args.forecast_steps} runs past the series "
              f"({series.shape[1]} steps, {context_steps} of them context)", file=sys.stderr)
        return 2

    prompts, targets, truths = [], [], []
    for s in series:
        prompt, target, truth = data.forecast_split(
            s, scaler, args.context_fraction, args.forecast_steps)
        prompts.append(data.tokenize(tokenizer, prompt))
        targets.append(data.tokenize(tokenizer, target))
        truths.append(truth)
    # a step is 2 numbers of (integer digits + '.' + decimals) plus ',' and ';'
    new_tokens = args.forecast_steps * (2 * (args.decimals + 2) + 2)
    try:
        flops.check_budget(args.ledger, planned_flops(model, prompts, targets, new_tokens,
                                                      args.batch_size), args.flops_budget,
                           args.force)
    except flops.BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    forecasts = np.full((len(series), args.forecast_steps, 2), np.nan)
    texts, tf_ce, gen_ce, failures = [], [], [], []
    with count_flops() as counter:
        for b in tqdm(range(0, len(series), args.batch_size), desc=f"eval {args.split}",
                      unit="batch", dynamic_ncols=True):
            sl = slice(b, b + args.batch_size)
            ids, mask = left_pad(prompts[sl])
            ids, mask = ids.to(device), mask.to(device)
            room = ids.shape[1] + max(new_tokens, max(len(t) for t in targets[sl]))
            cache = KVCache(model.cfg, len(ids), room, cache_dtype(model, device), device)
            with autocast(device, dtype):
                tokens, step_logits = generate(model, ids, new_tokens, mask, cache=cache)
                tf_ce += teacher_forced_ce(model, cache, mask, targets[sl], step_logits[:, 0])
            for j, row in enumerate(tokens.tolist()):
                text = tokenizer.decode(row)
                values, bad = scaler.decode(text, n_steps=args.forecast_steps)  # NaN rows: invalid
                forecasts[b + j], texts[len(texts):] = values, [text]
                failures.append(bad)
                gen_ce.append(generation_ce(step_logits[j], targets[b + j]))
    truths = np.stack(truths)
    err_scaled = (forecasts - truths) / scaler.alpha  # (N, steps, 2)
    sq, ab = err_scaled**2, np.abs(err_scaled)
    metrics = {
        "n_series": len(series),
        "split": args.split,
        "model": args.model,
        "adapter": args.adapter,
        "forecast_steps": args.forecast_steps,
        "context_steps": context_steps,
        "alpha": scaler.alpha,
        "decimals": scaler.decimals,
        "mse_scaled": mean_or_none(sq),
        "mae_scaled": mean_or_none(ab),
        "mse": mean_or_none(sq * scaler.alpha**2),
        "mae": mean_or_none(ab * scaler.alpha),
        "mse_scaled_by_horizon": [mean_or_none(sq[:, h]) for h in range(args.forecast_steps)],
        "mae_scaled_by_horizon": [mean_or_none(ab[:, h]) for h in range(args.forecast_steps)],
        "teacher_forced_ce": float(np.mean(tf_ce)),
        "generation_ce": float(np.mean(gen_ce)),
        "parse_failure_rate": float(np.sum(failures)) / (len(series) * args.forecast_steps),
        "flops": counter.total,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["series", "mse_scaled", "mae_scaled", "teacher_forced_ce", "generation_ce",
                "failed_steps", "forecast_text"])
    for k, i in enumerate(indices):
        w.writerow([int(i), mean_or_none(sq[k]), mean_or_none(ab[k]), tf_ce[k], gen_ce[k],
                    failures[k], texts[k]])
    atomic_write_text(out / "per_series.csv", buf.getvalue())
    npz = io.BytesIO()
    np.savez(npz, indices=indices, forecasts=forecasts, truths=truths)
    atomic_write_bytes(out / "forecasts.npz", npz.getvalue())
    title = f"{args.model}" + (f" + {args.adapter}" if args.adapter else " (no adapter)")
    rows = list(range(min(args.plot_series, len(series))))
    plot_trajectories(out, series, time, context_steps, forecasts, rows, title)
    plot_horizon(out, {"MSE": metrics["mse_scaled_by_horizon"],
                       "MAE": metrics["mae_scaled_by_horizon"]}, "error (scaled units)",
                 "horizon.png")
    flops.append_ledger(args.ledger, {"kind": "eval", "name": str(out), "flops": counter.total,
                                      "n_series": len(series), "split": args.split})
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("horizon")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
