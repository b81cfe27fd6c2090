"""LoRA fine-tuning of Qwen2.5-0.5B-Instruct on LLMTIME-encoded Lotka–Volterra series.

    python train.py --out runs/final                     # the published best setting
    python train.py --out runs/final --resume            # continue after Ctrl-C or a crash
    python train.py --model runs/demo/tiny-qwen2 ...     # any local Hugging Face folder

A run folder holds everything evaluation needs: `adapter/` (PEFT format plus qwen_min.json
with the data's α, decimals and this training config), `state.pt` (the resumable state:
LoRA tensors, Adam, RNG, step), `metrics.jsonl` and `loss.png`. Every invocation appends its
counted FLOPs (3 × the forward pass, from the model's own hooks) to the ledger.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import flops
from lora import apply_lora, lora_parameters, save_adapter
from qwen_min import CheckpointError, count_flops, load_model, load_tokenizer
from qwen_min.loading import DEFAULT_MODEL
from qwen_min.runtime import atomic_write_bytes, autocast, pick_device, pick_dtype

DEFAULTS = dict(
    model=DEFAULT_MODEL,
    data="data/lotka_volterra_data.h5",
    rank=8,
    alpha=None,  # None: alpha = rank, a LoRA scale of 1 (see lora.apply_lora)
    targets="q_proj,v_proj",
    lr=1e-4,
    context_length=768,
    stride=256,
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
    checkpoint_every=100,
    flops_budget=flops.BUDGET,
    ledger="runs/ledger.jsonl",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="hub repo id or local checkpoint folder")
    p.add_argument("--data", help="HDF5 file with /trajectories and /time (make data)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank)")
    p.add_argument("--targets", help="comma-separated projections to adapt")
    p.add_argument("--lr", type=float)
    p.add_argument("--context-length", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="total optimizer steps (raise it with --resume)")
    p.add_argument("--seed", type=int, help="LoRA init, data order and dropout")
    p.add_argument("--split-seed", type=int, help="train/val/test permutation")
    p.add_argument("--decimals", type=int)
    p.add_argument("--schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup", type=int, help="linear warmup steps (cosine schedule)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto: bf16 where fast")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", help="run folder (default runs/r{rank}-lr{lr}-ctx{context})")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (0: off)")
    p.add_argument("--eval-windows", type=int, help="fixed validation windows for --eval-every")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--flops-budget", type=float)
    p.add_argument("--ledger", help="JSONL ledger of counted FLOPs across all runs")
    p.add_argument("--force", action="store_true", help="run even if the budget would be exceeded")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(**DEFAULTS)
    args = p.parse_args(argv)
    if args.alpha is None:
        args.alpha = float(args.rank)
    if args.out is None:
        args.out = f"runs/r{args.rank}-lr{args.lr:g}-ctx{args.context_length}"
    return args


# ----------------------------------------------------------------------------- data


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_windows(args, tokenizer) -> tuple[data.LLMTimeScaler, dict, dict]:
    """Train windows and a fixed validation subset, with the scaler fitted on train only."""
    trajectories, _ = data.load_trajectories(args.data)
    split = data.split_indices(len(trajectories), seed=args.split_seed)
    scaler = data.LLMTimeScaler.fit(trajectories[split["train"]], decimals=args.decimals)

    def windows(indices):
        tokens = [data.tokenize(tokenizer, scaler.encode(trajectories[i])) for i in indices]
        ids, labels, mask = data.training_windows(tokens, args.context_length, args.stride)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return scaler, windows(split["train"]), windows(split["val"][: args.eval_windows])


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


def save_state(run: Path, step: int, model, optimizer, counted: int) -> None:
    """Everything a resume needs, in one atomically replaced file."""
    buf = io.BytesIO()
    torch.save({
        "step": step,
        "lora": {k: v.detach().cpu() for k, v in lora_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "flops": counted,
    }, buf)
    atomic_write_bytes(run / "state.pt", buf.getvalue())


def load_state(run: Path, model, optimizer) -> tuple[int, int]:
    path = run / "state.pt"
    if not path.exists():
        raise SystemExit(f"--resume: {path} does not exist; start the run without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = lora_parameters(model)
    if set(params) != set(state["lora"]):
        raise SystemExit(f"{path}: its LoRA tensors do not match this model/--rank/--targets")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["lora"][k])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["flops"]


def check_resume_config(run: Path, args, data_sha256: str) -> None:
    """A resumed run must be the same run: only --steps (and bookkeeping flags) may change,
    and the data file must hold the same bytes."""
    if not (run / "config.json").exists():
        raise SystemExit(f"--resume: {run}/config.json does not exist; start the run without "
                         "--resume")
    saved = json.loads((run / "config.json").read_text())
    if saved.get("data_sha256") != data_sha256:
        raise SystemExit(f"--resume: {args.data} is not the data file {run} was trained on "
                         "(its SHA-256 differs); resume with the original file")
    free = {"steps", "resume", "force", "eval_every", "checkpoint_every", "device", "ledger",
            "flops_budget"}
    changed = {k: (saved[k], v) for k, v in vars(args).items()
               if k not in free and k in saved and saved[k] != v}
    if changed:
        raise SystemExit(f"--resume: {run}/config.json differs from these flags: {changed}")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records newer than the checkpoint we resume from, so none are duplicated."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(x + "\n" for x in keep).encode())


def plot_loss(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
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
    """Teacher-forced loss on the fixed validation windows; returns (loss, counted FLOPs)."""
    model.eval()
    total, n = 0.0, 0
    with count_flops() as c:
        for i in range(0, len(val["input_ids"]), batch_size):
            batch = {k: v[i : i + batch_size].to(device) for k, v in val.items()}
            with autocast(device, dtype):
                loss = model.loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
            total, n = total + loss.item() * len(batch["input_ids"]), n + len(batch["input_ids"])
    model.train()
    return total / max(n, 1), c.total


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.out)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        # under bf16 autocast the frozen base is kept in bf16 (half the memory, no per-call
        # casts); LoRA tensors and Adam state stay fp32 (bench/results.md)
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
        scaler, train, val = prepare_windows(args, tokenizer)
    except (CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    n_trainable = apply_lora(model, args.rank, args.alpha, targets)
    model.to(device).train()
    optimizer = torch.optim.Adam(list(lora_parameters(model).values()), lr=args.lr)

    data_sha256 = file_sha256(args.data)
    if args.resume:
        check_resume_config(run, args, data_sha256)
        start, counted = load_state(run, model, optimizer)
        truncate_metrics(run / "metrics.jsonl", start)
    else:
        if (run / "state.pt").exists():
            print(f"error: {run} already holds a run; pass --resume to continue it, or choose "
                  "another --out", file=sys.stderr)
            return 2
        start, counted = 0, 0
    if start >= args.steps:
        print(f"{run}: already at step {start} of {args.steps}; raise --steps to train more")
        return 0

    cfg, B, L = model.cfg, args.batch_size, args.context_length
    step_flops = flops.train_step_flops(cfg, B, L, args.rank, targets)
    planned = (args.steps - start) * step_flops
    if args.eval_every:  # validation is forward-only, batches of B windows of L tokens
        n_evals = args.steps // args.eval_every - start // args.eval_every
        eval_batches = math.ceil(len(val["input_ids"]) / B)
        per_batch = flops.teacher_forced_flops(cfg, B, L, args.rank, targets)
        planned += n_evals * eval_batches * per_batch
    try:
        flops.check_budget(args.ledger, planned, args.flops_budget, args.force)
    except flops.BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if not args.resume:
        config = vars(args) | {"data_sha256": data_sha256}
        atomic_write_bytes(run / "config.json", json.dumps(config, indent=2).encode())

    metadata = {
        "scaler": scaler.to_dict(),
        "train_config": vars(args),
        "data_sha256": data_sha256,
        "trainable_parameters": n_trainable,
    }
    n_windows = len(train["input_ids"])
    used_before = flops.ledger_total(args.ledger)
    print(f"{run}: {n_windows} training windows of {L} tokens, LoRA r={args.rank} "
          f"alpha={args.alpha:g} on {','.join(targets)} ({n_trainable:,} trainable), "
          f"{device} {'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}, "
          f"planned {planned:.3g} FLOPs")
    session_flops, t0, done = 0, time.time(), start
    try:
        with StopFlag() as stop:
            bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train",
                       dynamic_ncols=True)
            for step in bar:
                idx = torch.from_numpy(batch_indices(step, n_windows, B, args.seed))
                batch = {k: v[idx].to(device) for k, v in train.items()}
                lr = learning_rate(step, args)
                loss, step_flops = train_step(model, optimizer, batch, lr, device, dtype)
                done, session_flops = step + 1, session_flops + step_flops
                record = {"step": step + 1, "loss": loss, "lr": lr,
                          "flops": counted + session_flops, "seconds": round(time.time() - t0, 3)}
                if args.eval_every and (step + 1) % args.eval_every == 0:
                    record["val_loss"], eval_flops = validation_loss(model, val, B, device, dtype)
                    session_flops += eval_flops
                    record["flops"] = counted + session_flops
                append_jsonl(run / "metrics.jsonl", record)
                used = used_before + session_flops
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{(step + 1 - start) * B * L / (time.time() - t0):.0f}",
                                flops=f"{used:.2e}",
                                budget=f"{100 * used / args.flops_budget:.2f}%")
                last = step + 1 == args.steps
                if last or stop.requested or (step + 1) % args.checkpoint_every == 0:
                    save_state(run, step + 1, model, optimizer, counted + session_flops)
                    save_adapter(model, run / "adapter", args.model, metadata | {"step": step + 1})
                    plot_loss(run)
                if stop.requested:
                    break
            bar.close()
    finally:  # whatever happened, the FLOPs spent are on the ledger
        flops.append_ledger(args.ledger, {
            "kind": "train", "name": str(run), "flops": session_flops, "steps": [start, done],
            "batch_size": B, "context_length": L, "rank": args.rank, "targets": list(targets),
            "lr": args.lr,
        })
    print(f"{run}: step {done}/{args.steps}, {session_flops:.3e} FLOPs counted this session "
          f"(run total {counted + session_flops:.3e}); adapter in {run / 'adapter'}")
    if stop.requested and done < args.steps:
        print(f"interrupted: continue with  python train.py --out {run} --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
