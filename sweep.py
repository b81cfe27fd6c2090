"""The coursework's experiment plan, run end to end within the FLOP budget.

    python sweep.py --out runs/sweep                    # the plan fitted to 98% of the budget
    python sweep.py --plan published                    # the published plan: stops at the budget
    python sweep.py --grid-steps 50 --context-steps 50 --final-steps 100 --eval-limit 20 ...

Stages (each run is train.py then evaluate.py on the validation split):
  1. grid: LoRA rank {2, 4, 8} × learning rate {1e-5, 5e-5, 1e-4} at context 512;
  2. context: lengths {128, 512, 768} with the grid's best (rank, lr);
  3. final: the best setting of all, trained longer.
"Best" is the lowest validation mse_scaled_filled (failed steps scored as persistence; metrics
from an evaluate.py without it fall back to mse_scaled); runs with no parsed step at all rank
last, by teacher-forced cross-entropy.

The plan (flops.coursework_plan, priced by flops.plan_flops, evaluations included) covers the
untrained baseline and the 500-step trial run beside these stages. `--plan fit`, the default,
shortens it to ≤ 98% of --flops-budget, the grid first, and prints what it changed; explicit
--*-steps flags set the stage lengths before the fit. `--plan published` runs the stage lengths
as given. Either way train.py and evaluate.py check the ledger before every run: when the
budget would be exceeded the sweep stops and says so. Finished runs are skipped when the sweep
is started again, and a killed run resumes, so an interrupted sweep completes as if it had not
been. Writes summary.md, summary.csv and grid_heatmap.png.

`--devices cuda:0,cuda:1` runs a stage's independent runs (the grid's, the context study's) at
once, one per device; each stage still waits for all its runs before choosing its best. The
runs share the ledger: each holds a reservation on it for its whole price while it runs
(sweep.Admission), so together they never overrun the budget. Without it, runs go one at a time
on train.py's default device.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import data
import flops
import ledger
from metrics import best, rank_score  # one ranking for the sweep and report.py
from qwen_min import CheckpointError
from qwen_min.loading import DEFAULT_MODEL, ConfigError, load_config, resolve_checkpoint
from qwen_min.model import Qwen2Config
from qwen_min.runtime import (
    atomic_write_bytes,
    atomic_write_text,
    os_error_line,
    provenance,
    read_json,
)

HERE = Path(__file__).resolve().parent
BUDGET_EXIT = 3  # train.py's and evaluate.py's exit code for a refused run
INTERRUPTED = 130  # their exit code after Ctrl-C (128 + SIGINT), and the sweep's
MAX_STRIDE = 256  # train.py's window stride, capped by each run's context length
STAGE_STEPS = {"grid": "grid_steps", "context": "context_steps", "final": "final_steps"}
PUBLISHED = flops.DEFAULT_PLAN
SUMMARY_KEYS = ["name", "stage", "rank", "lr", "context", "steps", "mse_scaled",
                "mse_scaled_filled", "parse_failure_rate", "mae_scaled", "teacher_forced_ce",
                "n_series"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the flag, what was expected, where to look."""

    def error(self, message: str):
        self.exit(2, f"sweep.py: error: {message} (see python sweep.py --help)\n")


def number(kind: type, low: float, strict: bool = False):
    """An argparse type: a `kind` (int or float) ≥ low (> low when strict)."""
    bound = f"{'>' if strict else '≥'} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {bound}, got {text!r}"
            ) from None
        if not (value > low if strict else value >= low):  # NaN compares False: refused too
            raise argparse.ArgumentTypeError(f"expected a value {bound}, got {text!r}")
        return value

    return parse


def number_list(kind: type, low: float, strict: bool = False):
    """An argparse type: comma-separated `kind`s, each checked as number(kind, low, strict)."""
    one = number(kind, low, strict)

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [one(x) for x in items]

    return parse


def device_list(text: str) -> list[str]:
    """--devices: comma-separated torch device names, each one a worker slot (cpu may repeat)."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of devices like cuda:0,cuda:1, got {text!r}")
    for item in items:
        try:
            device = torch.device(item)
        except RuntimeError:
            raise argparse.ArgumentTypeError(
                f"expected devices like cpu, cuda:0 or mps, got {item!r}") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{item}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "name devices from cuda:0 up, or cpu")
    return items


def batch_size(text: str) -> str:
    """evaluate.py's --batch-size: 'auto' or an integer ≥ 1 (passed on as written)."""
    return text if text == "auto" else str(number(int, 1)(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default="data/lotka_volterra_data.h5")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--ledger", default="runs/ledger.jsonl")
    p.add_argument("--plan", choices=["fit", "published"], default="fit",
                   help="fit: shortened to ≤ 98%% of the budget (default); published: as given")
    p.add_argument("--ranks", type=number_list(int, 1), default=[2, 4, 8])
    p.add_argument("--lrs", type=number_list(float, 0, strict=True), default=[1e-5, 5e-5, 1e-4])
    p.add_argument("--contexts", type=number_list(int, 2), default=[128, 512, 768])
    p.add_argument("--grid-context", type=number(int, 2), default=512)
    for stage, dest in STAGE_STEPS.items():
        p.add_argument(f"--{dest.replace('_', '-')}", type=number(int, 1),
                       help=f"training steps of each {stage} run "
                            f"(published: {stage_steps(PUBLISHED, stage)})")
    p.add_argument("--batch-size", type=number(int, 1), default=4)
    p.add_argument("--eval-limit", type=number(int, 1), help="validation series per run")
    p.add_argument("--forecast-steps", type=number(int, 1), default=10)
    p.add_argument("--eval-batch-size", type=batch_size, help="evaluate.py's --batch-size")
    p.add_argument("--flops-budget", type=number(float, 0, strict=True), default=ledger.BUDGET)
    p.add_argument("--early-stop", type=number(int, 1),
                   help="train.py --early-stop N for every run (give --eval-every in --extra)")
    p.add_argument("--tensorboard", action="store_true",
                   help="train.py --tensorboard for every run (logs in each run folder)")
    p.add_argument("--extra", default="", help="extra flags for train.py, e.g. '--dtype fp32'")
    p.add_argument("--devices", type=device_list,
                   help="run each stage's runs concurrently, one per device, e.g. cuda:0,cuda:1 "
                        "(default: one at a time on train.py's default device)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the plan


def evaluation_size(args: argparse.Namespace) -> flops.Evaluation:
    """One evaluation as evaluate.py will run it on --data: the validation series (or
    --eval-limit), prompts of 70% of a series' steps at 10 tokens a step (two 1-digit numbers
    with 2 decimals, ',', ';'), and --forecast-steps steps generated, priced at the grammar's
    longest forecast as evaluate.py reserves it (flops.evaluation_price)."""
    trajectories, _ = data.load_trajectories(args.data)
    n_val = len(data.split_indices(len(trajectories))["val"])
    context_steps = round(0.7 * trajectories.shape[1])
    return flops.Evaluation(series=min(n_val, args.eval_limit or n_val),
                            prompt_len=context_steps * (2 * (2 + 2) + 2),
                            forecast_steps=args.forecast_steps)


def stage_steps(plan: flops.Plan, stage: str) -> int:
    """The training steps of a stage's runs (the longest, where they differ)."""
    return max(r.steps for r in plan.runs if r.stage == stage)


def choose_plan(args: argparse.Namespace, cfg: Qwen2Config, evaluation: flops.Evaluation
                ) -> tuple[flops.Plan, list[str]]:
    """The plan this sweep runs, priced on the model's config, and what the fit changed."""
    published = {stage: stage_steps(PUBLISHED, stage) for stage in STAGE_STEPS}
    steps = {stage: getattr(args, dest) or published[stage] for stage, dest in STAGE_STEPS.items()}
    plan = flops.coursework_plan(args.ranks, args.lrs, args.contexts, args.grid_context,
                                 steps["grid"], steps["context"], steps["final"], args.batch_size,
                                 evaluation)
    if args.plan == "published":
        return plan, []
    return flops.fit_plan(plan, cfg, args.flops_budget)


# ----------------------------------------------------------------------------- the runs


def run(cmd: list[str], reservation: str | None = None) -> int:
    """Run train.py or evaluate.py (found beside this file) in a child process; with a
    reservation id, the child reserves its plan out of that reservation first
    (ledger.PARENT_ENV)."""
    print("$ " + " ".join(cmd), flush=True)
    env = os.environ | {ledger.PARENT_ENV: reservation} if reservation else None
    return subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]], env=env)


def device_flag(device: str | None) -> list[str]:
    """The --device a child runs on; none: the script's own default."""
    return [] if device is None else ["--device", device]


def train_command(args: argparse.Namespace, run_dir: Path, rank: int, lr: float, context: int,
                  steps: int, device: str | None = None) -> list[str]:
    cmd = ["train.py", "--model", args.model, "--data", args.data, "--ledger", args.ledger,
           "--out", str(run_dir), "--rank", str(rank), "--lr", str(lr),
           "--context-length", str(context), "--stride", str(min(MAX_STRIDE, context)),
           "--steps", str(steps), "--batch-size", str(args.batch_size),
           "--flops-budget", str(args.flops_budget)]
    if args.early_stop:
        cmd += ["--early-stop", str(args.early_stop)]
    if args.tensorboard:
        cmd.append("--tensorboard")
    if (run_dir / "state.pt").exists():
        cmd.append("--resume")
    return cmd + device_flag(device) + args.extra.split()


def eval_command(args: argparse.Namespace, run_dir: Path, device: str | None = None) -> list[str]:
    cmd = ["evaluate.py", "--model", args.model, "--data", args.data, "--ledger", args.ledger,
           "--flops-budget", str(args.flops_budget), "--adapter", str(run_dir / "adapter"),
           "--out", str(run_dir / "eval"), "--split", "val",
           "--forecast-steps", str(args.forecast_steps)]
    if args.eval_batch_size:
        cmd += ["--batch-size", args.eval_batch_size]
    if args.eval_limit:
        cmd += ["--limit", str(args.eval_limit)]
    return cmd + device_flag(device)


def train_and_eval(args: argparse.Namespace, name: str, rank: int, lr: float, context: int,
                   steps: int, device: str | None = None, reservation: str | None = None
                   ) -> dict | None:
    """One experiment on `device` (None: the scripts' default), its FLOPs drawing on
    `reservation` when given; returns its validation metrics, or None when the budget
    refused it."""
    run_dir = Path(args.out) / name
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.exists():
        train = train_command(args, run_dir, rank, lr, context, steps, device)
        # without metrics.json, what eval/ holds is left by a killed evaluation: evaluate.py
        # writes only into an empty --out
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
        for script, cmd in (("train.py", train),
                            ("evaluate.py", eval_command(args, run_dir, device))):
            code = run(cmd, reservation)
            if code == INTERRUPTED:  # Ctrl-C reaches the child too: it saved what it could
                raise KeyboardInterrupt
            if code == BUDGET_EXIT:
                print(f"sweep: {name}: {script} refused: the budget would be exceeded")
                return None
            if code != 0:
                raise SystemExit(f"sweep: {name}: {script} failed with exit code {code}")
    try:
        metrics = read_json(metrics_path)
    except ValueError as e:  # a finished run's metrics.json cut short or edited by hand
        print(f"sweep.py: error: {e}; or delete {metrics_path.parent} to evaluate that run "
              "again", file=sys.stderr)
        raise SystemExit(2) from None
    row = {"name": name, "stage": name.split("-")[0], "rank": rank, "lr": lr, "context": context,
           "steps": steps}
    return row | {k: metrics.get(k) for k in SUMMARY_KEYS if k not in row}


class Admission:
    """Keeps concurrent runs inside the budget together, through the ledger's reservations.
    Before a run starts, the sweep reserves its whole price (training and evaluation, as
    flops.plan_flops prices them) on the ledger, and its train.py and evaluate.py reserve out
    of that reservation, so no run beside it, in this sweep or another process, can take the
    room its evaluation still needs. A run whose price does not fit waits for one in flight to
    end; with none in flight it starts without a reservation, and its scripts decide alone,
    exactly as in a sequential sweep."""

    def __init__(self, args: argparse.Namespace, cfg: Qwen2Config, evaluation: flops.Evaluation):
        self.args, self.cfg, self.evaluation = args, cfg, evaluation
        self.in_flight = 0  # runs started and not yet ended
        self.turn = 0  # the index, in the stage's list, of the next run to admit
        self.changed = threading.Condition()

    def price(self, name: str, rank: int, context: int, steps: int) -> int:
        """A run's training and evaluation as flops.plan_flops prices them (0: finished)."""
        if (Path(self.args.out) / name / "eval" / "metrics.json").exists():
            return 0
        run = flops.Run(name.split("-")[0], steps, context, rank, batch=self.args.batch_size)
        return flops.plan_flops(flops.Plan((run,), self.evaluation), self.cfg)["total"]

    def reserve(self, name: str, price: int) -> ledger.Reservation | None:
        """The run's price reserved on the ledger; None when it does not fit now."""
        try:
            return ledger.reserve(self.args.ledger, price, self.args.flops_budget,
                                  name=str(Path(self.args.out) / name), parent="")
        except ledger.BudgetError:
            return None

    @contextlib.contextmanager
    def slot(self, index: int, name: str, price: int):
        """Admit run `index` of the stage, in the listed order, so the runs start (and a budget
        refusal falls) as in a sequential sweep, whichever worker thread asks first; yields
        its reservation (None: it runs on its scripts' own checks)."""
        booking = None

        def admitted() -> bool:
            nonlocal booking
            if self.turn != index:
                return False
            booking = self.reserve(name, price) if price else None
            return booking is not None or not price or not self.in_flight

        with self.changed:
            self.changed.wait_for(admitted)
            self.in_flight += 1
            self.turn += 1
            self.changed.notify_all()
        try:
            yield booking
        finally:
            if booking:
                booking.release()
            with self.changed:
                self.in_flight -= 1
                self.changed.notify_all()


def run_concurrently(args: argparse.Namespace, admission: Admission, runs: list[tuple]
                     ) -> tuple[list[dict], bool]:
    """A stage's independent runs, each (name, rank, lr, context, steps), on a pool of worker
    slots, one per --devices entry (one slot without it: the runs go one by one, in order).

    Returns the rows of the finished runs in the order listed, and whether every run finished.
    After a refusal (the budget) or a failure no further run starts; the runs in flight finish,
    so their FLOPs are not spent for nothing, then a failure is raised."""
    slots = args.devices or [None]
    free = queue.SimpleQueue()  # the devices no run holds now
    for device in slots:
        free.put(device)
    stop = threading.Event()

    def one(index: int, spec: tuple) -> dict | None:
        name, rank, _, context, steps = spec
        with admission.slot(index, name, admission.price(name, rank, context, steps)) as booking:
            if stop.is_set():
                return None
            device = free.get()  # never waits: one slot per worker thread
            try:
                row = train_and_eval(args, *spec, device=device,
                                     reservation=booking and booking.id)
            except BaseException:  # a failed run (SystemExit): start nothing more
                stop.set()
                raise
            finally:
                free.put(device)
        if row is None:
            stop.set()
        return row

    admission.turn = 0
    with ThreadPoolExecutor(len(slots)) as pool:
        results = list(pool.map(one, range(len(runs)), runs))
    rows = [row for row in results if row is not None]
    return rows, len(rows) == len(runs)


# ----------------------------------------------------------------------------- outputs


def cell(v) -> str:
    """A summary.md cell: 4 significant digits, '—' for a missing value."""
    return f"{v:.4g}" if isinstance(v, float) else "—" if v is None else str(v)


def write_summary(out: Path, rows: list[dict], note: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_KEYS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    md = ["| " + " | ".join(SUMMARY_KEYS) + " |", "|---" * len(SUMMARY_KEYS) + "|"]
    md += ["| " + " | ".join(cell(r[k]) for k in SUMMARY_KEYS) + " |" for r in rows]
    atomic_write_text(out / "summary.md", "\n".join(md + ["", note]) + "\n")
    print("\n".join(md + ["", note]))


def plot_heatmap(out: Path, grid: list[dict], ranks: list[int], lrs: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.full((len(ranks), len(lrs)), np.nan)
    for r in grid:
        v = rank_score(r)
        z[ranks.index(r["rank"]), lrs.index(r["lr"])] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(5, 3.6))
    im = ax.imshow(z, cmap="viridis_r")
    ax.set(xticks=range(len(lrs)), xticklabels=[f"{x:g}" for x in lrs], yticks=range(len(ranks)),
           yticklabels=ranks, xlabel="learning rate", ylabel="LoRA rank",
           title="validation MSE (scaled, failed steps filled)")
    for (i, j), v in np.ndenumerate(z):
        ax.text(j, i, "—" if np.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w")
    fig.colorbar(im)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "grid_heatmap.png", buf.getvalue())


# ----------------------------------------------------------------------------- main


def run_stages(args: argparse.Namespace, plan: flops.Plan, cfg: Qwen2Config
               ) -> tuple[list[dict], str]:
    """Grid, context study, final run; the rows done and a note on how the sweep ended."""
    admission = Admission(args, cfg, plan.evaluation)
    out, budget = Path(args.out), f"the budget ({args.flops_budget:.3g}) would be exceeded"
    grid = [(f"grid-r{rank}-lr{lr:g}", rank, lr, args.grid_context, stage_steps(plan, "grid"))
            for rank in args.ranks for lr in args.lrs]
    rows, finished = run_concurrently(args, admission, grid)
    if not finished:
        return rows, f"Stopped in the grid: {budget}."
    plot_heatmap(out, rows, args.ranks, args.lrs)
    g = best(rows)
    contexts = [(f"context-{ctx}", g["rank"], g["lr"], ctx, stage_steps(plan, "context"))
                for ctx in args.contexts]
    context_rows, finished = run_concurrently(args, admission, contexts)
    rows += context_rows
    if not finished:
        return rows, f"Stopped in the context study: {budget}."
    b = best(rows)
    final = [("final", b["rank"], b["lr"], b["context"], stage_steps(plan, "final"))]
    final_rows, finished = run_concurrently(args, admission, final)
    if not finished:
        return rows, f"Stopped before the final run: {budget}."
    return rows + final_rows, "All stages finished within the budget."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_sweep(args)
    except (CheckpointError, ConfigError, data.DataError, ledger.LedgerError) as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk: every file is written atomically, none is left half
        print(f"sweep.py: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep.py: interrupted; run the same command again to continue: finished runs "
              "are skipped and an interrupted run resumes", file=sys.stderr)
        return INTERRUPTED


def run_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_checkpoint(args.model))
    evaluation = evaluation_size(args)
    ledger.ledger_total(args.ledger)  # a malformed ledger stops the sweep before its first run
    try:
        plan, changes = choose_plan(args, cfg, evaluation)
    except ValueError as e:  # flops.fit_plan: the plan cannot be fitted to the budget
        print(f"sweep.py: error: --plan fit: {e}; or run --plan published", file=sys.stderr)
        return BUDGET_EXIT
    total = flops.plan_flops(plan, cfg)["total"]
    print(f"plan ({args.plan}): grid {stage_steps(plan, 'grid')}, context "
          f"{stage_steps(plan, 'context')}, final {stage_steps(plan, 'final')} steps; "
          f"{total:.3e} FLOPs = {total / args.flops_budget:.1%} of the budget")
    for line in changes:
        print("  " + line)
    if total > args.flops_budget:
        print("  the plan does not fit: the sweep stops before the first run that would overrun it")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # the sweep's flags (its grid, for report.py) and the code that ran it
    atomic_write_text(Path(args.out) / "sweep.json", json.dumps(
        vars(args) | {"provenance": provenance()}, indent=2) + "\n")
    rows, note = run_stages(args, plan, cfg)
    best_by = "best = lowest mse_scaled_filled (mse_scaled where a run's metrics lack it)"
    write_summary(Path(args.out), rows, f"{note} {best_by}.")
    return 0 if note.startswith("All") else BUDGET_EXIT


if __name__ == "__main__":
    sys.exit(main())
