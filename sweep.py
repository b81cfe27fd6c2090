"""The coursework's experiment plan, run end to end within the FLOP budget.

    python sweep.py --out runs/sweep                          # the published plan
    python sweep.py --grid-steps 50 --context-steps 50 --final-steps 100 --eval-limit 20 ...

Stages (each run is train.py then evaluate.py on the validation split):
  1. grid: LoRA rank {2, 4, 8} × learning rate {1e-5, 5e-5, 1e-4} at context 512;
  2. context: lengths {128, 512, 768} with the grid's best (rank, lr);
  3. final: the best setting of all, trained longer.
"Best" is the lowest validation MSE (scaled units). Finished runs are skipped when the sweep is
run again, so an interrupted sweep resumes. Before every run train.py checks the ledger; when
the budget would be exceeded the sweep stops and says so. Writes summary.md, summary.csv and
grid_heatmap.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from qwen_min.runtime import atomic_write_bytes, atomic_write_text

BUDGET_EXIT = 3  # train.py's exit code for a refused run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--data", default="data/lotka_volterra_data.h5")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--ledger", default="runs/ledger.jsonl")
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--lrs", default="1e-5,5e-5,1e-4")
    p.add_argument("--contexts", default="128,512,768")
    p.add_argument("--grid-context", type=int, default=512)
    p.add_argument("--grid-steps", type=int, default=1000)
    p.add_argument("--context-steps", type=int, default=1000)
    p.add_argument("--final-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=None, help="validation series per run")
    p.add_argument("--forecast-steps", type=int, default=10)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--flops-budget", type=float, default=1e17)
    p.add_argument("--extra", default="", help="extra flags for train.py, e.g. '--dtype fp32'")
    return p.parse_args(argv)


def run(cmd: list[str]) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call([sys.executable, *cmd])


def train_and_eval(args, name: str, rank: int, lr: float, context: int, steps: int) -> dict | None:
    """One experiment; returns its validation metrics, or None when the budget refused it."""
    run_dir, eval_dir = Path(args.out) / name, Path(args.out) / name / "eval"
    common = ["--model", args.model, "--data", args.data, "--ledger", args.ledger]
    if not (eval_dir / "metrics.json").exists():
        train = ["train.py", *common, "--out", str(run_dir), "--rank", str(rank), "--lr", str(lr),
                 "--context-length", str(context), "--steps", str(steps), "--batch-size",
                 str(args.batch_size), "--flops-budget", str(args.flops_budget),
                 *args.extra.split()]
        if (run_dir / "state.pt").exists():
            train.append("--resume")
        code = run(train)
        if code == BUDGET_EXIT:
            return None
        if code != 0:
            raise SystemExit(f"sweep: {name}: train.py failed with exit code {code}")
        evaluate = ["evaluate.py", *common, "--adapter", str(run_dir / "adapter"), "--out",
                    str(eval_dir), "--split", "val", "--forecast-steps", str(args.forecast_steps),
                    "--batch-size", str(args.eval_batch_size)]
        if args.eval_limit:
            evaluate += ["--limit", str(args.eval_limit)]
        if run(evaluate) != 0:
            raise SystemExit(f"sweep: {name}: evaluate.py failed")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    return {"name": name, "stage": name.split("-")[0], "rank": rank, "lr": lr, "context": context,
            "steps": steps, **{k: metrics[k] for k in ("mse_scaled", "mae_scaled",
                                                        "teacher_forced_ce", "parse_failure_rate",
                                                        "n_series")}}


def best(rows: list[dict]) -> dict:
    finite = [r for r in rows if r["mse_scaled"] is not None]  # None: no step parsed
    if not finite:
        raise SystemExit("sweep: no run produced a finite validation MSE")
    return min(finite, key=lambda r: r["mse_scaled"])


def write_summary(out: Path, rows: list[dict], note: str) -> None:
    keys = ["name", "stage", "rank", "lr", "context", "steps", "mse_scaled", "mae_scaled",
            "teacher_forced_ce", "parse_failure_rate", "n_series"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else "—" if v is None else str(v)  # noqa: E731
    md = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    md += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    atomic_write_text(out / "summary.md", "\n".join(md + ["", note]) + "\n")
    print("\n".join(md + ["", note]))


def plot_heatmap(out: Path, grid: list[dict], ranks: list[int], lrs: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.full((len(ranks), len(lrs)), np.nan)
    for r in grid:
        v = r["mse_scaled"]
        z[ranks.index(r["rank"]), lrs.index(r["lr"])] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(5, 3.6))
    im = ax.imshow(z, cmap="viridis_r")
    ax.set(xticks=range(len(lrs)), xticklabels=[f"{x:g}" for x in lrs], yticks=range(len(ranks)),
           yticklabels=ranks, xlabel="learning rate", ylabel="LoRA rank",
           title="validation MSE (scaled)")
    for (i, j), v in np.ndenumerate(z):
        ax.text(j, i, "—" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w")
    fig.colorbar(im)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "grid_heatmap.png", buf.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(x) for x in args.ranks.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows, note = [], "All stages finished within the budget."
    for rank, lr in [(r, lr) for r in ranks for lr in lrs]:
        row = train_and_eval(args, f"grid-r{rank}-lr{lr:g}", rank, lr, args.grid_context,
                             args.grid_steps)
        if row is None:
            note = f"Stopped in the grid: the budget ({args.flops_budget:.3g}) would be exceeded."
            break
        rows.append(row)
    else:
        plot_heatmap(out, rows, ranks, lrs)
        g = best(rows)
        for ctx in contexts:
            row = train_and_eval(args, f"context-{ctx}", g["rank"], g["lr"], ctx,
                                 args.context_steps)
            if row is None:
                note = f"Stopped in the context study: budget ({args.flops_budget:.3g}) reached."
                break
            rows.append(row)
        else:
            b = best(rows)
            row = train_and_eval(args, "final", b["rank"], b["lr"], b["context"], args.final_steps)
            if row is None:
                note = f"Stopped before the final run: budget ({args.flops_budget:.3g}) reached."
            else:
                rows.append(row)
    write_summary(out, rows, note)
    return 0 if note.startswith("All") else BUDGET_EXIT


if __name__ == "__main__":
    sys.exit(main())
