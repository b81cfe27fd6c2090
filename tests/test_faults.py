"""Fault injection (issue 11, item 4): train.py is SIGKILLed at 5 seeded random moments, two of
them inside a checkpoint, then resumed. After each kill, state.pt loads with weights_only, the
resumed run ends with the adapter of an uninterrupted run bit for bit, and its ledger records
cover every step, with FLOPs above the uninterrupted run's only for steps that ran twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ledger
import train

pytestmark = pytest.mark.slow  # whole train.py processes, killed and resumed

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3  # checkpoints (and ledger records) at steps 3, 6, 9, 12
# one thread: the same arithmetic in every run (see train_here), no spinning on a busy machine
ENV = os.environ | {"OMP_NUM_THREADS": "1"}

# Runs train.main with a SIGKILL planted inside a checkpoint: at the n-th write of state.pt
# (half of it written to the temp file, as a kill during the write leaves it), or right after
# the n-th ledger append (before the state.pt that follows it).
PLANTED = """
import os, signal, sys, tempfile
import ledger, train
where, n = sys.argv[1], int(sys.argv[2])
calls = 0

def kill_on_nth(real, before):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == n and before:
            before(*args)
        out = real(*args, **kwargs)
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

def half_written(path, data):
    fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.write(fd, data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

if where == "state-write":
    real_write = train.atomic_write_bytes
    def write(path, data):
        return (kill_on_nth(real_write, half_written) if path.name == "state.pt" else real_write)(
            path, data)
    train.atomic_write_bytes = write
else:
    ledger.append_ledger = kill_on_nth(ledger.append_ledger, None)
sys.exit(train.main(sys.argv[3:]))
"""


def moments(seed: int = 0) -> list[tuple[str, float]]:
    """Five kills: inside the n-th state.pt write, after the n-th ledger append (n from 2, so
    a state.pt exists to resume from), and three signals after k steps plus a random delay."""
    rng = np.random.default_rng(seed)
    return [("state-write", int(rng.integers(2, STEPS // EVERY + 1))),
            ("after-ledger", int(rng.integers(2, STEPS // EVERY + 1)))] + [
            ("signal", int(rng.integers(EVERY + 1, STEPS - 1)) + rng.uniform(0, 0.9))
            for _ in range(3)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_vocab_checkpoint, lv_20x30):
    """A 512-word tiny checkpoint (LLMTIME uses ids 11–26) and 20 series of 299 tokens, cut
    into full windows (64 + 5·47 = 299), so no padding id is needed."""
    ckpt, h5 = small_vocab_checkpoint, lv_20x30
    straight = tmp_path_factory.mktemp("faults") / "straight"
    assert train_here(train_args(ckpt, h5, straight)) == 0
    return ckpt, h5, straight


def train_args(ckpt: Path, h5: Path, run: Path) -> list[str]:
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(run), "--context-length", "64",
            "--stride", "47", "--batch-size", "2", "--lr", "1e-2", "--dtype", "fp32",
            "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--eval-every", "4",
            "--eval-windows", "2", "--ledger", str(run / "ledger.jsonl")]


def train_here(argv: list[str]) -> int:
    """train.main in this process (no second start-up), on one thread as the killed processes
    run, so that the arithmetic is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(threads)


def run_train(argv: list[str], planted: tuple[str, int] | None = None) -> subprocess.Popen:
    """train.py in a process of its own, to be killed."""
    script = ["-c", PLANTED, *map(str, planted)] if planted else ["train.py"]
    return subprocess.Popen([sys.executable, *script, *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(proc: subprocess.Popen, run: Path, moment: float) -> None:
    """SIGKILL once the run has logged int(moment) steps, plus the fraction in seconds."""
    while len(train.read_metrics(run / "metrics.jsonl")) < int(moment) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(moment % 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def ledger_ranges(run: Path) -> list[tuple[tuple[int, int], int]]:
    return [(tuple(r["steps"]), r["flops"]) for r in ledger.read_ledger(run / "ledger.jsonl")]


@pytest.mark.parametrize("where, when", moments())
def test_sigkill_then_resume_equals_the_uninterrupted_run(setup, tmp_path, where, when):
    ckpt, h5, straight = setup
    run = tmp_path / "run"
    argv = train_args(ckpt, h5, run)
    if where == "signal":
        kill_after(run_train(argv), run, when)
    else:
        assert run_train(argv, (where, when)).wait(timeout=300) == -signal.SIGKILL
    killed_at = train.read_state(run / "state.pt")["step"]  # loads with weights_only=True
    assert train_here(argv + ["--resume"]) == 0

    want = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [r["loss"] for r in train.read_metrics(run / "metrics.jsonl")] == [
        r["loss"] for r in train.read_metrics(straight / "metrics.jsonl")]

    # the ledger: every step range of the uninterrupted run, each with the same FLOPs; a range
    # recorded twice is one whose steps ran twice (recorded, then killed before state.pt)
    uninterrupted = dict(ledger_ranges(straight))
    assert list(uninterrupted) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    records = ledger_ranges(run)
    assert all(uninterrupted[steps] == n for steps, n in records)
    assert sorted(set(steps for steps, _ in records)) == list(uninterrupted)
    twice = [steps for i, (steps, _) in enumerate(records) if steps in dict(records[:i])]
    total = ledger.ledger_total(run / "ledger.jsonl")
    assert total == sum(uninterrupted.values()) + sum(uninterrupted[s] for s in twice)
    if where != "signal":  # the planted kills land between a ledger record and its state.pt
        assert twice == [(killed_at, killed_at + EVERY)]
    assert len({r["run_id"] for r in ledger.read_ledger(run / "ledger.jsonl")}) == 1
    assert json.loads((run / "config.json").read_text())["stopped"]["reason"] == "completed"
