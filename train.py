"""LoRA fine-tuning of Qwen2.5-0.5B-Instruct on LLMTIME-encoded Lotka–Volterra series.

    python train.py --out runs/final                     # the published best setting
    python train.py --out runs/final --resume            # continue after Ctrl-C or a crash
    python train.py --model runs/demo/tiny-qwen2 ...     # any local Hugging Face folder

A run folder holds everything evaluation needs: `adapter/` (PEFT format plus qwen_min.json
with the data's α, decimals, this training config and the step), `state.pt` (the resumable
state: LoRA tensors, Adam, RNG, step, early-stopping progress; loads with weights_only=True),
`config.json` (the flags, and why the run stopped), `metrics.jsonl` and `loss.png`. Before its
first step a run reserves its planned FLOPs on the ledger (ledger.reserve: refused, exit 3,
when they would overrun the budget beside what runs in flight hold). Each checkpoint first
appends the counted FLOPs of the steps since the last one (3 × the forward pass, from the
model's own hooks) to the ledger, so a killed run's FLOPs stay counted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import flops
import ledger
from lora import apply_lora, lora_parameters, save_adapter
from qwen_min import CheckpointError, count_flops, distributed, load_model, load_tokenizer
from qwen_min.compiled import CompiledTrainStep, use_compile_cache
from qwen_min.loading import DEFAULT_MODEL
from qwen_min.runtime import (
    CompileFallback,
    atomic_write_bytes,
    autocast,
    compile_wanted,
    os_error_line,
    pick_device,
    pick_dtype,
    provenance,
)
from qwen_min.runtime import read_jsonl as read_metrics  # a line cut by a kill is skipped

DEFAULTS = dict(
    model=DEFAULT_MODEL,
    data="data/lotka_volterra_data.h5",
    rank=8,
    alpha=None,  # None: alpha = rank, a LoRA scale of 1 (see lora.apply_lora)
    targets="q_proj,v_proj",
    lr=1e-4,
    context_length=768,
    stride=None,  # None: min(256, context_length)
    batch_size=4,
    steps=3000,
    seed=0,
    split_seed=42,
    decimals=2,
    schedule="constant",  # or "cosine" (with --warmup steps of linear warmup)
    warmup=0,
    dtype="auto",
    device="auto",
    out=None,
    eval_every=0,
    eval_windows=16,
    early_stop=0,
    checkpoint_every=100,
    flops_budget=ledger.BUDGET,
    ledger="runs/ledger.jsonl",
    tensorboard=False,
    compile="auto",  # auto: on for CUDA (the whole step as CUDA graphs), off elsewhere
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; a flag left out takes its default, or with --resume the value the run's
    config.json saved, so that `train.py --out DIR --resume` continues the run as it was."""
    # SUPPRESS: a flag left out is absent, so that a saved value can take its place
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--model", help="hub repo id or local checkpoint folder")
    p.add_argument("--data", help="HDF5 file with /trajectories and /time (make data)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank)")
    p.add_argument("--targets", help="comma-separated projections to adapt")
    p.add_argument("--lr", type=float)
    p.add_argument("--context-length", type=int)
    p.add_argument("--stride", type=int, help="window start every N tokens (default: "
                   "min(256, --context-length))")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="total optimizer steps (raise it with --resume, "
                   "constant schedule only)")
    p.add_argument("--seed", type=int, help="LoRA init, data order and dropout")
    p.add_argument("--split-seed", type=int, help="train/val/test permutation")
    p.add_argument("--decimals", type=int)
    p.add_argument("--schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup", type=int, help="linear warmup steps (cosine schedule)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto: bf16 where fast")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", help="run folder (default runs/r{rank}-lr{lr}-ctx{context})")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (0: off)")
    p.add_argument("--eval-windows", type=int, help="validation windows for --eval-every (the "
                   "first N windows of the validation series)")
    p.add_argument("--early-stop", type=int, help="stop when the validation loss has not "
                   "improved for N evaluations; adapter/ is then the best one (0: off)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--flops-budget", type=float)
    p.add_argument("--ledger", help="JSONL ledger of counted FLOPs across all runs")
    p.add_argument("--tensorboard", action="store_true", help="log scalars to <out>/tensorboard "
                   "(pip install '.[tracking]')")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="the whole step as one "
                   "compiled graph (qwen_min/compiled.py); auto: on for CUDA, off elsewhere")
    p.add_argument("--force", action="store_true", help="run even if the budget would be exceeded")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (with "
                   "the flags its config.json saved; --steps and the bookkeeping flags may "
                   "change)")
    given = vars(p.parse_args(argv))
    flags = DEFAULTS | {"force": False, "resume": False}
    if given.get("resume"):
        try:
            flags |= saved_flags(Path(given.get("out") or default_out(flags | given)))
        except RunError as e:
            p.exit(2, f"train.py: error: {e}\n")
    args = argparse.Namespace(**(flags | given))
    if args.alpha is None:
        args.alpha = float(args.rank)
    if args.stride is None:
        args.stride = min(256, args.context_length)
    if problem := flag_problem(args):
        p.exit(2, f"train.py: error: {problem}\n")
    if args.out is None:
        args.out = default_out(vars(args))
    return args


def default_out(flags: dict) -> str:
    return f"runs/r{flags['rank']}-lr{flags['lr']:g}-ctx{flags['context_length']}"


def saved_flags(run: Path) -> dict:
    """The flags a run's config.json saved ({} without one: the resume then says so)."""
    path = run / "config.json"
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"--resume: {path} is not valid JSON ({e}); restore it from a backup, or "
                       "start a new run in another --out") from None
    if not isinstance(saved, dict):
        raise RunError(f"--resume: {path} is not a train.py config.json (expected a JSON "
                       "object); restore it, or start a new run in another --out")
    return {k: saved[k] for k in DEFAULTS if k in saved}


def flag_problem(args: argparse.Namespace) -> str | None:
    """The first numeric flag that is out of range, as a message naming it (None: all fine)."""

    def positive(x: float) -> bool:
        return math.isfinite(x) and x > 0

    checks = [  # (flag, value, valid, what is expected)
        ("--rank", args.rank, args.rank >= 1, "an integer ≥ 1"),
        ("--alpha", args.alpha, positive(args.alpha), "a number > 0 (default: = --rank)"),
        ("--lr", args.lr, positive(args.lr), "a number > 0"),
        ("--context-length", args.context_length, args.context_length >= 2,
         "an integer ≥ 2 (a window needs a token to predict from)"),
        ("--stride", args.stride, 1 <= args.stride <= args.context_length,
         f"an integer from 1 to --context-length ({args.context_length}), so no token is skipped"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "an integer ≥ 1"),
        ("--steps", args.steps, args.steps >= 1, "an integer ≥ 1"),
        ("--warmup", args.warmup, 0 <= args.warmup <= args.steps,
         f"an integer from 0 to --steps ({args.steps})"),
        ("--seed", args.seed, args.seed >= 0, "an integer ≥ 0"),
        ("--split-seed", args.split_seed, args.split_seed >= 0, "an integer ≥ 0"),
        ("--decimals", args.decimals, 0 <= args.decimals <= 6, "an integer from 0 to 6"),
        ("--eval-every", args.eval_every, args.eval_every >= 0, "an integer ≥ 0 (0: off)"),
        ("--eval-windows", args.eval_windows, args.eval_windows >= 1, "an integer ≥ 1"),
        ("--early-stop", args.early_stop, args.early_stop >= 0, "an integer ≥ 0 (0: off)"),
        ("--early-stop", args.early_stop, not args.early_stop or 1 <= args.eval_every <= args.steps,
         f"used with --eval-every from 1 to --steps ({args.steps}), which it counts "
         f"evaluations of (got --eval-every {args.eval_every})"),
        ("--checkpoint-every", args.checkpoint_every, args.checkpoint_every >= 1,
         "an integer ≥ 1"),
        ("--flops-budget", args.flops_budget, positive(args.flops_budget), "a number > 0"),
    ]
    for flag, value, valid, expected in checks:
        if not valid:
            return f"{flag} {value}: expected {expected}"
    return None


class RunError(Exception):
    """A run folder or state file that cannot be used; main prints it as one line, exit 2."""


# ----------------------------------------------------------------------------- data


def prepare_windows(args, tokenizer) -> tuple[data.LLMTimeScaler, dict, dict]:
    """Train windows and a fixed validation subset, with the scaler fitted on train only."""
    trajectories, _ = data.load_trajectories(args.data)
    split = data.split_indices(len(trajectories), seed=args.split_seed)
    scaler = data.LLMTimeScaler.fit(trajectories[split["train"]], decimals=args.decimals)

    def windows(indices):
        tokens = [data.tokenize(tokenizer, scaler.encode(trajectories[i])) for i in indices]
        ids, labels, mask = data.training_windows(tokens, args.context_length, args.stride)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    # --eval-windows counts windows: the first N of all validation series' windows, in order
    val = {k: v[: args.eval_windows] for k, v in windows(split["val"]).items()}
    return scaler, windows(split["train"]), val


def device_batch(windows: dict, rows, device) -> dict:
    """Rows of a window dict on `device`."""
    return {k: windows[k][rows].to(device) for k in ("input_ids", "labels", "attention_mask")}


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """The windows of optimizer step `step` (0-based): epochs of seeded permutations, laid end
    to end. A pure function of the step, so a resumed run sees exactly the same batches."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    return np.array([np.random.default_rng([seed, e]).permutation(n)[p % n]
                     for e, p in zip(epochs, positions)])


def learning_rate(step: int, args) -> float:
    if args.schedule == "constant":
        return args.lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- state

# 2: loads with weights_only=True and carries the run id and early-stopping progress; 1 (no
# "format" field) was pickled whole and recorded its FLOPs on the ledger only at exit
STATE_FORMAT = 2


@dataclass
class Progress:
    """Where a run stands: saved in state.pt at every checkpoint, restored by --resume."""

    run_id: str
    step: int = 0
    flops: int = 0  # counted over the whole run (every session), as the ledger records it
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False

    def validated(self, val_loss: float, step: int) -> bool:
        """Note a validation loss; True if it is the best so far."""
        if self.best_val_loss is not None and val_loss >= self.best_val_loss:
            self.evals_since_best += 1
            return False
        self.best_val_loss, self.best_step, self.evals_since_best = val_loss, step, 0
        return True


def save_state(run: Path, progress: Progress, model, optimizer) -> None:
    """Everything a resume needs, in one atomically replaced file. Only tensors, numbers,
    strings, lists and dicts, so that it loads with torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save({
        "format": STATE_FORMAT,
        **asdict(progress),
        "lora": {k: v.detach().cpu() for k, v in lora_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # this process's GPU only: a resume on a machine with other GPUs still reads it
        "cuda_rng": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }, buf)
    atomic_write_bytes(run / "state.pt", buf.getvalue())


def read_state(path: Path) -> dict:
    """state.pt as a dict, or RunError with one line that names the file and what to do."""
    if not path.exists():
        raise RunError(f"--resume: {path} does not exist; start the run without --resume")
    try:  # weights_only: resuming someone's run folder must not run code from its pickle
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunError(f"{path}: holds objects other than tensors, numbers, strings, lists and "
                       "dicts, so it is not a train.py state file; do not resume from it, start "
                       "a new run in another --out") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f"{path}: cannot be read ({reason}); it is truncated or not a train.py "
                       "state file: restore it, or start a new run in another --out") from None
    if not isinstance(state, dict) or not {"step", "lora", "optimizer"} <= set(state):
        raise RunError(f"{path}: not a train.py state file (expected a dict with 'format', "
                       "'step', 'lora', 'optimizer', ...); start a new run in another --out")
    if state.get("format") != STATE_FORMAT:
        raise RunError(f"{path}: a run folder from an older train.py (state format "
                       f"{state.get('format', 1)}, this train.py reads {STATE_FORMAT}); finish "
                       "it with the train.py that started it, or start a new run in another "
                       "--out")
    return state


def restore(state: dict, path: Path, model, optimizer) -> Progress:
    params = lora_parameters(model)
    if set(params) != set(state["lora"]):
        raise RunError(f"{path}: its LoRA tensors do not match this model/--rank/--targets")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["lora"][k])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"][0])
    return Progress(**{f.name: state[f.name] for f in fields(Progress)})


def check_resume_config(run: Path, args, data_sha256: str) -> dict:
    """A resumed run must be the same run: only --steps (constant schedule) and bookkeeping
    flags may change, and the data file must hold the same bytes. Returns config.json."""
    if not (run / "config.json").exists():
        raise RunError(f"--resume: {run}/config.json does not exist; start the run without "
                       "--resume")
    saved = json.loads((run / "config.json").read_text())
    if saved.get("data_sha256") != data_sha256:
        raise RunError(f"--resume: {args.data} is not the data file {run} was trained on "
                       "(its SHA-256 differs); resume with the original file")
    # the cosine schedule's horizon is --steps: a new horizon would change the learning rate
    # of every step still to come (raising it moves the schedule backwards), so it is refused
    if saved.get("schedule") == "cosine" and saved.get("steps") != args.steps:
        raise RunError(f"--resume: --steps {args.steps} differs from the {saved.get('steps')} "
                       f"steps that {run}'s cosine schedule decays over; resume with --steps "
                       f"{saved.get('steps')}, or start a new run to train longer")
    # a run's FLOPs stay on one ledger, whatever path names it
    if "ledger" in saved and Path(saved["ledger"]).resolve() != Path(args.ledger).resolve():
        raise RunError(f"--resume: --ledger {args.ledger} is not the ledger {run} records its "
                       f"FLOPs on ({saved['ledger']}); leave --ledger out to use that one")
    free = {"steps", "resume", "force", "eval_every", "checkpoint_every", "device", "ledger",
            "flops_budget", "tensorboard", "out", "compile"}  # a moved or copied run folder resumes
    if args.early_stop:  # evaluations decide when it stops
        free.remove("eval_every")
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if k not in free and k in saved and saved[k] != v}
    if changed:
        raise RunError(f"--resume: {run}/config.json differs from these flags: {changed}")
    return saved


def write_config(run: Path, config: dict) -> None:
    atomic_write_bytes(run / "config.json", json.dumps(config, indent=2).encode())


def append_jsonl(path: Path, record: dict) -> None:
    """One record more; a line a full disk cuts short is skipped by read_metrics, and a
    resume rewrites the file (truncate_metrics)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # named, for the one-line error
        raise OSError(e.errno, e.strerror, str(path)) from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records newer than the checkpoint we resume from, so none are duplicated."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["step"] <= step]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


PLOT_SECONDS = 60  # loss.png is redrawn at a checkpoint at most this often (0.5 s a figure)


def plot_loss(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return
    steps, losses = map(np.array, zip(*train))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train loss")
    if len(losses) >= 10:
        ax.plot(steps[9:], np.convolve(losses, np.ones(10) / 10, "valid"), label="10-step mean")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss (teacher-forced)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=run.name)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(run / "loss.png", buf.getvalue())


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def validation_loss(model, val: dict, batch_size: int, device, dtype) -> tuple[float, int]:
    """Teacher-forced loss on the fixed validation windows, the mean over all their counted
    target tokens (each batch's mean weighted by its counted tokens, not by its windows);
    returns (loss, counted FLOPs). Every window has a counted token (data.training_windows)."""
    model.eval()
    total, n = 0.0, 0
    with count_flops() as c:
        for i in range(0, len(val["input_ids"]), batch_size):
            rows = slice(i, i + batch_size)
            batch = device_batch(val, rows, device)
            counted = int((val["labels"][rows, 1:] != data.IGNORE_INDEX).sum())
            with autocast(device, dtype):
                loss = model.loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
            total, n = total + loss.item() * counted, n + counted
    model.train()
    return total / n, c.total


def train_step(model, optimizer, batch: dict, lr: float, device, dtype) -> tuple[float, int]:
    """One Adam step on one batch; returns (loss, counted FLOPs)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with count_flops() as c, autocast(device, dtype):
        loss = model.loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), 3 * c.total  # backward counts as exactly 2× the forward pass


class RunLedger:
    """This run's FLOPs on the shared ledger: one record per step range, naming the run, each
    taken out of the run's reservation (ledger.reserve).

    Each checkpoint records the steps since the previous record *before* state.pt moves on.
    A kill between the two makes --resume run those steps again and record them again (they
    did run twice); the other order would lose them from the ledger. A kill between two
    checkpoints loses at most the --checkpoint-every steps that also ran unrecorded."""

    def __init__(self, args, run: Path, progress: Progress, targets: tuple[str, ...],
                 booking: ledger.Reservation | None):
        self.booking, self.recorded_step, self.pending = booking, progress.step, 0
        self.fields = {
            "kind": "train", "name": str(run), "run_id": progress.run_id,
            "batch_size": args.batch_size, "context_length": args.context_length,
            "rank": args.rank, "targets": list(targets), "lr": args.lr,
        }

    def add(self, n_flops: int) -> None:
        self.pending += n_flops

    def record(self, step: int) -> None:
        if step == self.recorded_step and not self.pending:
            return
        self.booking.append(self.fields | {"flops": self.pending,
                                           "steps": [self.recorded_step, step]})
        self.recorded_step, self.pending = step, 0


def checkpoint(run: Path, progress: Progress, books: RunLedger, model, optimizer, args,
               metadata: dict) -> None:
    """Ledger, then adapter, then state.pt: state.pt is the commit point a resume starts from,
    so whatever a kill interrupts, the ledger already holds these steps, and adapter/ is never
    older than the state (a resume rewrites it)."""
    books.record(progress.step)
    if not args.early_stop:  # with early stopping, adapter/ is the best one, written when found
        save_adapter(model, run / "adapter", args.model, metadata | {"step": progress.step})
    save_state(run, progress, model, optimizer)


def stop_record(progress: Progress, args) -> dict:
    """Why the run stopped, for config.json."""
    if progress.stopped_early:
        why = (f"the validation loss did not improve for {args.early_stop} evaluations (every "
               f"{args.eval_every} steps); adapter/ is the best, from step {progress.best_step}")
        reason = "early_stop"
    elif progress.step >= args.steps:
        reason, why = "completed", f"reached --steps {args.steps}"
    else:
        reason, why = "interrupted", "SIGTERM or Ctrl-C; continue with --resume"
    return {"reason": reason, "why": why, "step": progress.step,
            "best_step": progress.best_step, "best_val_loss": progress.best_val_loss}


def tensorboard_writer_class():
    """torch's SummaryWriter, imported only for --tensorboard: tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the optional extra 'tracking' (the tensorboard "
                       "package): pip install '.[tracking]', or leave out --tensorboard") from None
    return SummaryWriter


class StopFlag:
    """First Ctrl-C/SIGTERM: finish the current step, checkpoint, exit. Second: exit now
    (the previous checkpoint is untouched, because checkpoints are replaced atomically)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (again to abort at once)...", file=sys.stderr)


def planned_flops(args, cfg, targets: tuple[str, ...], start: int, n_val: int) -> int:
    """The FLOPs of steps start..--steps and their validations, for the budget check. The whole
    remaining run is planned; the ledger then records only what runs (early stopping)."""
    B, L = args.batch_size, args.context_length
    planned = (args.steps - start) * flops.train_step_flops(cfg, B, L, args.rank, targets)
    if args.eval_every:  # validation is forward-only: full batches of B windows, then the rest
        n_evals = args.steps // args.eval_every - start // args.eval_every
        full, rest = divmod(n_val, B)
        batches = [B] * full + ([rest] if rest else [])
        planned += n_evals * sum(flops.teacher_forced_flops(cfg, rows, L, args.rank, targets)
                                 for rows in batches)
    return planned


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # under torchrun every process runs this; a plain `python train.py` is a world of one
    world = distributed.init_from_env(pick_device(args.device))
    try:
        return run_training(args, world)
    except (RunError, ledger.LedgerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk: every file is written atomically, none is left half
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except ledger.BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C: the ledger has its record, state.pt is intact
        print(f"aborted; continue with  python train.py --out {args.out} --resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(world)


def pick_step(args, model, optimizer, world: distributed.World, device, dtype):
    """The step function `(batch, lr) -> (loss, counted FLOPs)`: the whole step compiled as one
    graph (CUDA graphs on CUDA), or the eager train_step, through DDP under torchrun. Under
    --compile auto a compile that fails falls back to the eager step (CompileFallback)."""
    if args.compile == "on" and world.size > 1:
        raise RunError("--compile on is not supported under torchrun (several processes); "
                       "pass --compile off or auto")
    trainer = distributed.data_parallel(model, world)

    def eager(batch, lr):
        return train_step(trainer, optimizer, batch, lr, device, dtype)

    def compiled():  # a second run (a sweep's next one) reuses the compiled kernels from disk
        use_compile_cache(Path(args.ledger).parent / "compile-cache")
        return CompiledTrainStep(model, optimizer, args.batch_size, args.context_length,
                                 device, dtype)

    if world.size > 1 or not compile_wanted(args.compile, device):
        return eager
    if args.compile == "on":
        return compiled()
    return CompileFallback(compiled, eager, "the compiled train step")


@dataclass
class Setup:
    """What a session trains with, built the same way for a new run and a resumed one."""

    run: Path
    device: torch.device
    dtype: torch.dtype
    shard: slice  # this rank's rows of every global batch (all of them in a world of one)
    targets: tuple[str, ...]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: dict
    val: dict
    n_trainable: int
    data_sha256: str
    metadata: dict  # what adapter/qwen_min.json records beside the step
    summary_writer: type | None  # --tensorboard's SummaryWriter class


def set_up(args: argparse.Namespace, world: distributed.World) -> Setup:
    """The model with fresh LoRA tensors (seeded), its optimizer, and the data's windows."""
    summary_writer = tensorboard_writer_class() if args.tensorboard else None  # before any work
    device = distributed.local_device(world, pick_device(args.device))
    dtype = pick_dtype(args.dtype, device)
    try:
        shard = distributed.shard_rows(args.batch_size, world)
    except ValueError as e:
        raise RunError(str(e)) from None
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        # under bf16 autocast the frozen base is kept in bf16 (half the memory, no per-call
        # casts); LoRA tensors and Adam state stay fp32 (bench/results.md)
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
        scaler, train, val = prepare_windows(args, tokenizer)
    except (CheckpointError, data.DataError) as e:
        raise RunError(str(e)) from None
    torch.manual_seed(args.seed)
    try:
        n_trainable = apply_lora(model, args.rank, args.alpha, targets)
    except ValueError as e:
        raise RunError(f"--targets {args.targets}: {e}") from None
    model.to(device).train()
    optimizer = torch.optim.Adam(list(lora_parameters(model).values()), lr=args.lr)
    data_sha256 = data.file_sha256(args.data)
    metadata = {"scaler": scaler.to_dict(), "train_config": vars(args),
                "data_sha256": data_sha256, "trainable_parameters": n_trainable}
    return Setup(Path(args.out), device, dtype, shard, targets, model, optimizer, train, val,
                 n_trainable, data_sha256, metadata, summary_writer)


def start_or_resume(args: argparse.Namespace, s: Setup, world: distributed.World
                    ) -> tuple[Progress, dict]:
    """A new run's progress, or the saved one with its tensors, Adam and RNG restored; and
    the config.json to write (a resume records the flags it may change, --steps, ...)."""
    run = s.run
    if args.resume:
        config = check_resume_config(run, args, s.data_sha256) | vars(args)
        progress = restore(read_state(run / "state.pt"), run / "state.pt", s.model, s.optimizer)
        if world.is_main:
            truncate_metrics(run / "metrics.jsonl", progress.step)
        return progress, config
    if (run / "state.pt").exists():
        raise RunError(f"{run} already holds a run; pass --resume to continue it, or choose "
                       "another --out")
    progress = Progress(run_id=uuid.uuid4().hex)
    if world.is_main:  # drop metrics left by a start killed before its first checkpoint
        truncate_metrics(run / "metrics.jsonl", 0)
    return progress, vars(args) | {"data_sha256": s.data_sha256, "run_id": progress.run_id,
                                   "provenance": provenance()}


def reserve_budget(args: argparse.Namespace, s: Setup, planned: int,
                   world: distributed.World) -> ledger.Reservation | None:
    """Rank 0 reserves the planned FLOPs on the ledger (ledger.BudgetError when they do not
    fit); every rank hears its answer, so all stop together. The other ranks hold None: only
    rank 0 writes the ledger."""
    booking = refusal = None
    if world.is_main:
        try:
            booking = ledger.reserve(args.ledger, planned, args.flops_budget, args.force,
                                     name=str(s.run))
        except ledger.BudgetError as e:
            refusal = e
    if distributed.all_reduce_sum(world, int(refusal is not None)):
        raise refusal or ledger.BudgetError("rank 0 found that this run overruns the budget")
    return booking


def validate(args, s: Setup, progress: Progress, world: distributed.World
             ) -> tuple[float, int, bool]:
    """The validation loss after this step, its counted FLOPs, and whether it is the best so
    far under early stopping. Rank 0 validates; the sum hands its loss to every rank (the
    others add 0), so all ranks take the same early-stopping decision."""
    val_loss, eval_flops = (validation_loss(s.model, s.val, args.batch_size, s.device, s.dtype)
                            if world.is_main else (0.0, 0))
    val_loss = distributed.all_reduce_sum(world, val_loss)
    eval_flops = distributed.all_reduce_sum(world, eval_flops)
    new_best = progress.validated(val_loss, progress.step) and bool(args.early_stop)
    progress.stopped_early = bool(args.early_stop and progress.evals_since_best >= args.early_stop)
    return val_loss, eval_flops, new_best


def train_loop(args: argparse.Namespace, s: Setup, progress: Progress, books: RunLedger,
               step_fn, world: distributed.World) -> int:
    """Steps progress.step..--steps, with validation, checkpoints and the loss plot, until the
    end, early stopping or a signal; returns the FLOPs counted in this session."""
    B, L, run = args.batch_size, args.context_length, s.run
    n_windows = len(s.train["input_ids"])
    # purge_step: events a killed session logged after its last checkpoint are replaced
    writer = (s.summary_writer(str(run / "tensorboard"), purge_step=progress.step)
              if s.summary_writer and world.is_main else None)
    used_before = ledger.ledger_total(args.ledger)
    session_flops, t0 = 0, time.time()
    plotted = t0
    try:
        with StopFlag() as stop:
            bar = tqdm(range(progress.step, args.steps), initial=progress.step,
                       total=args.steps, desc="train", dynamic_ncols=True,
                       disable=not world.is_main)
            for step in bar:
                t_step = time.time()
                rows = torch.from_numpy(batch_indices(step, n_windows, B, args.seed)[s.shard])
                lr = learning_rate(step, args)
                loss, n_flops = step_fn(device_batch(s.train, rows, s.device), lr)
                # the global batch's loss, and the FLOPs every rank ran (exact integers)
                loss = distributed.global_mean(world, loss)
                n_flops = distributed.all_reduce_sum(world, n_flops)
                progress.step = step + 1
                scalars = {"train/loss": loss, "train/lr": lr,
                           "train/tokens_per_s": B * L / (time.time() - t_step)}
                record = {"step": progress.step, "loss": loss, "lr": lr}
                new_best = False
                if args.eval_every and progress.step % args.eval_every == 0:
                    val_loss, eval_flops, new_best = validate(args, s, progress, world)
                    n_flops += eval_flops
                    record["val_loss"] = scalars["val/loss"] = val_loss
                progress.flops += n_flops
                session_flops += n_flops
                books.add(n_flops)
                if new_best and world.is_main:  # as at a checkpoint: the ledger, then adapter/
                    books.record(progress.step)
                    save_adapter(s.model, run / "adapter", args.model, s.metadata | {
                        "step": progress.step, "val_loss": val_loss})
                record |= {"flops": progress.flops, "seconds": round(time.time() - t0, 3)}
                if world.is_main:
                    append_jsonl(run / "metrics.jsonl", record)
                used = used_before + session_flops
                scalars |= {"flops/used": used, "flops/budget_share": used / args.flops_budget}
                if writer:
                    for tag, value in scalars.items():
                        writer.add_scalar(tag, value, progress.step)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{scalars['train/tokens_per_s']:.0f}",
                                flops=f"{used:.2e}",
                                budget=f"{100 * used / args.flops_budget:.2f}%")
                # a signal to any rank stops them all after the same step
                stopping = distributed.all_reduce_sum(world, int(stop.requested)) > 0
                ending = stopping or progress.stopped_early or progress.step == args.steps
                if world.is_main and (ending or progress.step % args.checkpoint_every == 0):
                    checkpoint(run, progress, books, s.model, s.optimizer, args, s.metadata)
                    if ending or time.time() - plotted >= PLOT_SECONDS:
                        plot_loss(run)
                        plotted = time.time()
                if stopping or progress.stopped_early:
                    break
            bar.close()
    finally:  # steps since the last checkpoint (a second Ctrl-C, an exception) are on it too
        if world.is_main:
            books.record(progress.step)
        if writer:
            writer.close()
    return session_flops


def finish(args: argparse.Namespace, s: Setup, progress: Progress, config: dict,
           session_flops: int, world: distributed.World) -> int:
    """config.json with why the run stopped, and the closing lines; the exit code."""
    stopped = stop_record(progress, args)
    if not world.is_main:
        return 0
    write_config(s.run, config | {"stopped": stopped})
    print(f"{s.run}: step {progress.step}/{args.steps}, {session_flops:.3e} FLOPs counted this "
          f"session (run total {progress.flops:.3e}); adapter in {s.run / 'adapter'}")
    if stopped["reason"] == "interrupted":
        print(f"interrupted: continue with  python train.py --out {s.run} --resume")
        return 130
    if stopped["reason"] == "early_stop":
        print(f"early stop: {stopped['why']}")
    return 0


def run_training(args: argparse.Namespace, world: distributed.World) -> int:
    """Set up, start or resume, reserve the budget, train, finish."""
    s = set_up(args, world)
    progress, config = start_or_resume(args, s, world)
    if progress.stopped_early or progress.step >= args.steps:
        if world.is_main:
            write_config(s.run, config | {"stopped": stop_record(progress, args)})
            print(f"{s.run}: already stopped at step {progress.step} "
                  f"({stop_record(progress, args)['why']}); nothing to do")
        return 0
    planned = planned_flops(args, s.model.cfg, s.targets, progress.step, len(s.val["input_ids"]))
    booking = reserve_budget(args, s, planned, world)
    try:
        if world.is_main:
            write_config(s.run, config)
        step_fn = pick_step(args, s.model, s.optimizer, world, s.device, s.dtype)
        print(f"{s.run}: {len(s.train['input_ids'])} training windows of {args.context_length} "
              f"tokens, LoRA r={args.rank} alpha={args.alpha:g} on {','.join(s.targets)} "
              f"({s.n_trainable:,} trainable), {s.device} "
              f"{'bf16 autocast' if s.dtype == torch.bfloat16 else 'fp32'}"
              f"{', compiled' if isinstance(step_fn, (CompiledTrainStep, CompileFallback)) else ''}"
              f"{f', {world.size} processes' if world.size > 1 else ''}, planned {planned:.3g} "
              "FLOPs")
        books = RunLedger(args, s.run, progress, s.targets, booking)
        session_flops = train_loop(args, s, progress, books, step_fn, world)
    finally:  # what the run did not spend goes back to the budget
        if booking:
            booking.release()
    return finish(args, s, progress, config, session_flops, world)


if __name__ == "__main__":
    sys.exit(main())
