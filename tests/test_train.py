"""train.py: targets, validation, schedules, flags, state.pt, early stopping, TensorBoard, SIGTERM
(issues 13, 11 and 14), on a tiny random checkpoint with the real vocabulary."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import flops
import ledger
import train
from qwen_min import distributed, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(real_vocab_checkpoint, lv_20x30):
    """A tiny checkpoint and 20 simulated 30-step series: 299 tokens each, so at context 64 a
    series is 4 full windows and a left-padded one of 43 tokens."""
    return real_vocab_checkpoint, lv_20x30


@pytest.fixture(scope="module")
def small(small_vocab_checkpoint, lv_20x30):
    """For whole runs: a 512-word vocabulary (LLMTIME uses ids 11–26), 8× faster than the
    real one. It has no padding token, so runs use --stride 47: 299 = 64 + 5·47 tokens, the
    windows of a series are all full."""
    return small_vocab_checkpoint, lv_20x30


def train_args(setup, out: Path, *extra: str) -> list[str]:
    ckpt, h5 = setup
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(out), "--context-length", "64",
            "--stride", "47", "--batch-size", "2", "--lr", "1e-2", "--dtype", "fp32",
            "--ledger", str(out.parent / f"{out.name}-ledger.jsonl"), *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- windows


def test_every_counted_target_is_predicted_from_a_real_token(setup, tmp_path):
    args = train.parse_args(train_args(setup, tmp_path / "r", "--stride", "48"))
    _, windows, val = train.prepare_windows(args, load_tokenizer(setup[0]))
    for w in (windows, val):
        targets = w["labels"][:, 1:] != data.IGNORE_INDEX  # what model.loss counts
        assert bool(w["attention_mask"][:, :-1][targets].all())  # the position predicting it
        # every real token after a real token is a target: nothing else was dropped
        real_pairs = (w["attention_mask"][:, :-1] == 1) & (w["attention_mask"][:, 1:] == 1)
        assert torch.equal(targets, real_pairs)
    padded = windows["attention_mask"][:, 0] == 0
    assert int(padded.sum()) == 14  # one left-padded last window per training series


def test_eval_windows_counts_windows_not_series(setup, tmp_path):
    args = train.parse_args(train_args(setup, tmp_path / "r", "--eval-windows", "7",
                                       "--stride", "64"))
    tokenizer = load_tokenizer(setup[0])
    scaler, _, val = train.prepare_windows(args, tokenizer)
    trajectories, _ = data.load_trajectories(setup[1])
    first_two = [data.tokenize(tokenizer, scaler.encode(trajectories[i]))
                 for i in data.split_indices(20)["val"][:2]]
    ids, labels, mask = data.training_windows(first_two, 64, 64)  # 5 windows per series
    assert val["input_ids"].shape == (7, 64)
    assert torch.equal(val["input_ids"], ids[:7]) and torch.equal(val["labels"], labels[:7])


@torch.no_grad()
def test_validation_loss_weights_every_counted_token_alike(setup, tmp_path):
    """Batches of 2: [64, 64], [64, 64], [43 tokens, left-padded]. The loss is the mean over
    all 4·63 + 42 counted targets, not the mean of the batch means."""
    args = train.parse_args(train_args(setup, tmp_path / "r", "--eval-windows", "5",
                                       "--stride", "64"))
    _, _, val = train.prepare_windows(args, load_tokenizer(setup[0]))
    assert (val["attention_mask"].sum(1)).tolist() == [64, 64, 64, 64, 43]
    model = load_model(setup[0])
    got, _ = train.validation_loss(model, val, 2, torch.device("cpu"), torch.float32)
    logits = model(val["input_ids"], val["attention_mask"])  # (5, 64, V)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           val["labels"][:, 1:].reshape(-1), ignore_index=-100)
    # measured |got − want| = 8.2e-7 (fp32 sums in another order); window weighting: 6.4e-3
    assert got == pytest.approx(want.item(), abs=4e-6)


# ----------------------------------------------------------------------------- schedules


def test_learning_rate_at_named_steps():
    cosine = train.parse_args(["--schedule", "cosine", "--warmup", "2", "--lr", "1e-3",
                               "--steps", "8"])
    # warmup (s+1)/2 · lr, then lr · ½(1 + cos(π · (s − 2)/6))
    want = {0: 5e-4, 1: 1e-3, 2: 1e-3, 5: 5e-4, 7: 1e-3 * 0.5 * (1 - math.sqrt(3) / 2)}
    assert {s: train.learning_rate(s, cosine) for s in want} == pytest.approx(want, rel=1e-12)
    constant = train.parse_args(["--lr", "1e-3", "--steps", "8", "--warmup", "2"])
    assert [train.learning_rate(s, constant) for s in (0, 1, 7)] == [1e-3] * 3


def test_raising_steps_on_a_cosine_resume_is_refused(small, tmp_path, capsys):
    run = tmp_path / "cos"
    cosine = ("--schedule", "cosine", "--warmup", "1")
    assert train.main(train_args(small, run, "--steps", "2", *cosine)) == 0
    capsys.readouterr()
    assert train.main(train_args(small, run, "--steps", "4", "--resume", *cosine)) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: --steps 4 differs from the 2 steps that {run}'s cosine schedule "
        "decays over; resume with --steps 2, or start a new run to train longer\n")


def test_eval_every_validates_at_its_multiples_and_counts_the_flops(small, tmp_path):
    run = tmp_path / "ev"
    argv = train_args(small, run, "--steps", "5", "--eval-every", "2", "--eval-windows", "3")
    assert train.main(argv) == 0
    assert [r["step"] for r in metrics(run) if "val_loss" in r] == [2, 4]
    cfg = load_model(small[0]).cfg
    step = flops.train_step_flops(cfg, 2, 64, 8, ("q_proj", "v_proj"))
    evaluation = sum(flops.teacher_forced_flops(cfg, rows, 64, 8, ("q_proj", "v_proj"))
                     for rows in (2, 1))  # 3 windows in batches of 2
    records = ledger.read_ledger(tmp_path / "ev-ledger.jsonl")
    assert [(r["steps"], r["flops"]) for r in records] == [([0, 5], 5 * step + 2 * evaluation)]
    # the budget check planned exactly what ran
    plan = train.planned_flops(train.parse_args(argv), cfg, ("q_proj", "v_proj"), 0, 3)
    assert plan == 5 * step + 2 * evaluation


@pytest.mark.slow  # a train.py process of its own, signalled: fault injection
def test_sigterm_finishes_the_step_and_checkpoints(small, tmp_path):
    run = tmp_path / "term"
    argv = train_args(small, run, "--steps", "200", "--checkpoint-every", "1000")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 2:
        assert proc.poll() is None, "train.py ended before it was signalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    state = torch.load(run / "state.pt", weights_only=True)
    done = metrics(run)[-1]["step"]
    assert 2 <= state["step"] == done < 200  # the step under way was finished, then saved
    assert json.loads((run / "config.json").read_text())["stopped"]["reason"] == "interrupted"
    records = ledger.read_ledger(tmp_path / "term-ledger.jsonl")
    assert [r["steps"] for r in records] == [[0, done]]
    assert records[0]["flops"] == state["flops"] == metrics(run)[-1]["flops"]


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank 0: expected an integer ≥ 1"),
    (["--rank", "-2"], "--rank -2: expected an integer ≥ 1"),
    (["--alpha", "0"], "--alpha 0.0: expected a number > 0 (default: = --rank)"),
    (["--lr", "0"], "--lr 0.0: expected a number > 0"),
    (["--lr", "nan"], "--lr nan: expected a number > 0"),
    (["--context-length", "1"],
     "--context-length 1: expected an integer ≥ 2 (a window needs a token to predict from)"),
    (["--context-length", "128", "--stride", "200"],
     "--stride 200: expected an integer from 1 to --context-length (128), so no token is "
     "skipped"),
    (["--stride", "0"], "--stride 0: expected an integer from 1 to --context-length (768), so "
     "no token is skipped"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer ≥ 1"),
    (["--steps", "-1"], "--steps -1: expected an integer ≥ 1"),
    (["--steps", "5", "--warmup", "6"], "--warmup 6: expected an integer from 0 to --steps (5)"),
    (["--seed", "-1"], "--seed -1: expected an integer ≥ 0"),
    (["--split-seed", "-1"], "--split-seed -1: expected an integer ≥ 0"),
    (["--decimals", "-1"], "--decimals -1: expected an integer from 0 to 6"),
    (["--eval-every", "-1"], "--eval-every -1: expected an integer ≥ 0 (0: off)"),
    (["--eval-windows", "0"], "--eval-windows 0: expected an integer ≥ 1"),
    (["--early-stop", "-1"], "--early-stop -1: expected an integer ≥ 0 (0: off)"),
    (["--early-stop", "3"], "--early-stop 3: expected used with --eval-every from 1 to --steps "
     "(3000), which it counts evaluations of (got --eval-every 0)"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0: expected an integer ≥ 1"),
    (["--flops-budget", "0"], "--flops-budget 0.0: expected a number > 0"),
])
def test_a_bad_numeric_flag_is_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"train.py: error: {message}\n"


def test_an_unknown_target_is_one_line_and_exit_2(small, tmp_path, capsys):
    assert train.main(train_args(small, tmp_path / "t", "--targets", "q_proj,qproj")) == 2
    assert capsys.readouterr().err == (
        "error: --targets q_proj,qproj: LoRA targets ['q_proj', 'qproj']: expected one or more "
        "of ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']\n")


def test_stride_defaults_to_the_context_up_to_256():
    assert train.parse_args(["--context-length", "128"]).stride == 128
    assert train.parse_args([]).stride == 256
    assert train.parse_args(["--context-length", "512", "--stride", "100"]).stride == 100


# ----------------------------------------------------------------------------- state.pt


@pytest.fixture(scope="module")
def one_step_run(small, tmp_path_factory):
    run = tmp_path_factory.mktemp("state") / "run"
    assert train.main(train_args(small, run, "--steps", "1")) == 0
    return run


def test_state_loads_with_weights_only(one_step_run):
    state = torch.load(one_step_run / "state.pt", map_location="cpu", weights_only=True)
    assert (state["format"], state["step"]) == (2, 1)
    assert state["run_id"] == json.loads((one_step_run / "config.json").read_text())["run_id"]
    assert len(state["lora"]) == 8  # 2 layers × (q_proj, v_proj) × (A, B)


def test_a_truncated_state_is_a_one_line_error(small, one_step_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "state.pt"):
        (run / name).write_bytes((one_step_run / name).read_bytes())
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    argv = train_args(small, run, "--steps", "2", "--resume")
    argv[argv.index("--ledger") + 1] = str(one_step_run.parent / "run-ledger.jsonl")
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {state}: cannot be read (") and err.count("\n") == 1
    assert err.endswith("); it is truncated or not a train.py state file: restore it, or start "
                        "a new run in another --out\n")


def test_a_foreign_state_is_refused_without_unpickling_it(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"step": 1, "lora": {}, "optimizer": argparse.Namespace(evil=True)}, path)
    with pytest.raises(train.RunError) as e:
        train.read_state(path)
    assert str(e.value) == (
        f"{path}: holds objects other than tensors, numbers, strings, lists and dicts, so it is "
        "not a train.py state file; do not resume from it, start a new run in another --out")
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(train.RunError) as e:
        train.read_state(path)
    assert str(e.value) == (
        f"{path}: not a train.py state file (expected a dict with 'format', 'step', 'lora', "
        "'optimizer', ...); start a new run in another --out")


def test_a_state_from_the_older_layout_says_so(one_step_run, tmp_path):
    path = tmp_path / "state.pt"
    old = train.read_state(one_step_run / "state.pt")
    del old["format"], old["run_id"]
    torch.save(old, path)
    with pytest.raises(train.RunError) as e:
        train.read_state(path)
    assert str(e.value) == (
        f"{path}: a run folder from an older train.py (state format 1, this train.py reads 2); "
        "finish it with the train.py that started it, or start a new run in another --out")


# ----------------------------------------------------------------------------- early stopping


def test_early_stop_keeps_the_best_adapter_and_charges_only_what_ran(small, tmp_path,
                                                                     monkeypatch):
    """Scripted validation losses 3.0, 2.0, 2.5, 2.4: with --early-stop 2 the best is step 2
    and the run stops at step 4 of 10."""
    losses = iter([3.0, 2.0, 2.5, 2.4])
    monkeypatch.setattr(train, "validation_loss", lambda *a: (next(losses), 0))
    run = tmp_path / "es"
    argv = train_args(small, run, "--steps", "10", "--eval-every", "1", "--early-stop", "2")
    assert train.main(argv) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    stopped = json.loads((run / "config.json").read_text())["stopped"]
    assert (stopped["reason"], stopped["step"], stopped["best_step"]) == ("early_stop", 4, 2)
    assert json.loads((run / "adapter" / "qwen_min.json").read_text())["step"] == 2
    # adapter/ is the state after step 2: the same tensors as a run of 2 steps
    assert train.main(train_args(small, tmp_path / "two", "--steps", "2")) == 0
    best, two = (load_file(r / "adapter" / "adapter_model.safetensors")
                 for r in (run, tmp_path / "two"))
    assert all(torch.equal(best[k], two[k]) for k in two)
    step = flops.train_step_flops(load_model(small[0]).cfg, 2, 64, 8, ("q_proj", "v_proj"))
    assert ledger.ledger_total(tmp_path / "es-ledger.jsonl") == 4 * step  # not 10 steps
    # resumable: a stopped run stays stopped, and nothing more is charged
    assert train.main(argv + ["--resume"]) == 0
    assert ledger.ledger_total(tmp_path / "es-ledger.jsonl") == 4 * step


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_missing_names_the_extra(small, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert train.main(train_args(small, tmp_path / "tb", "--steps", "1", "--tensorboard")) == 2
    assert capsys.readouterr().err == (
        "error: --tensorboard needs the optional extra 'tracking' (the tensorboard package): "
        "pip install '.[tracking]', or leave out --tensorboard\n")


def test_tensorboard_event_file_holds_the_logged_scalars(small, tmp_path):
    pytest.importorskip("tensorboard", reason="the 'tracking' extra (tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    argv = train_args(small, run, "--steps", "2", "--eval-every", "2", "--eval-windows", "2",
                      "--tensorboard")
    assert train.main(argv) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    records = metrics(run)
    f32 = np.float32
    assert scalars["train/loss"] == [(r["step"], f32(r["loss"])) for r in records]
    assert scalars["train/lr"] == [(1, f32(1e-2)), (2, f32(1e-2))]
    assert scalars["val/loss"] == [(2, f32(records[1]["val_loss"]))]
    assert scalars["flops/used"] == [(r["step"], f32(r["flops"])) for r in records]
    assert scalars["flops/budget_share"] == [(r["step"], f32(r["flops"] / 1e17))
                                             for r in records]
    assert [s for s, _ in scalars["train/tokens_per_s"]] == [1, 2]
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"])
    assert os.listdir(run / "tensorboard")[0].startswith("events.out.tfevents.")


# ----------------------------------------------------------------------------- resume and budget


def test_resume_with_out_alone_takes_every_saved_flag(small, tmp_path, monkeypatch, capsys):
    """The hint printed after Ctrl-C works as printed: `train.py --out DIR --resume` takes the
    model, data, ledger and every other flag from DIR/config.json (before: it tried to download
    Qwen, and with the flags retyped but no --ledger it charged runs/ledger.jsonl). A --ledger
    other than the saved one is refused."""
    monkeypatch.chdir(tmp_path)  # where a default ledger (runs/ledger.jsonl) would land
    run, saved = tmp_path / "r", tmp_path / "r-ledger.jsonl"
    real_lr = train.learning_rate

    def ctrl_c_at_step_2(step, args):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr(step, args)

    monkeypatch.setattr(train, "learning_rate", ctrl_c_at_step_2)
    argv = train_args(small, run, "--steps", "4", "--checkpoint-every", "2", "--rank", "2")
    assert train.main(argv) == 130
    assert capsys.readouterr().err.endswith(
        f"aborted; continue with  python train.py --out {run} --resume\n")
    monkeypatch.setattr(train, "learning_rate", real_lr)
    other = tmp_path / "other.jsonl"
    assert train.main(["--out", str(run), "--resume", "--ledger", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: --ledger {other} is not the ledger {run} records its FLOPs on "
        f"({saved}); leave --ledger out to use that one\n")
    assert train.main(["--out", str(run), "--resume"]) == 0
    assert [r["steps"] for r in ledger.read_ledger(saved)] == [[0, 2], [2, 4]]
    assert not other.exists() and not (tmp_path / "runs").exists()
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["ledger"], config["rank"]) == (str(small[0]), str(saved), 2)
    assert config["stopped"]["reason"] == "completed"
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_two_runs_sharing_a_ledger_with_room_for_one(small, tmp_path, capsys):
    """Each run plans 400 steps; the budget holds 1.5 of them. The first, in flight, holds its
    reservation: the second is refused before its first step (before: both passed the check,
    4.0e10 against a budget of 3e10). The first's clean exit (SIGTERM) releases it."""
    step = flops.train_step_flops(load_model(small[0]).cfg, 2, 64, 8, ("q_proj", "v_proj"))
    budget = str(1.5 * 400 * step)
    shared = tmp_path / "ledger.jsonl"
    first = train_args(small, tmp_path / "first", "--steps", "400", "--flops-budget", budget,
                       "--ledger", str(shared))
    proc = subprocess.Popen([sys.executable, "train.py", *first], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (tmp_path / "first" / "metrics.jsonl").exists():  # it is training
            assert proc.poll() is None, "the first run ended before its first step"
            time.sleep(0.05)
        second = train_args(small, tmp_path / "second", "--steps", "400", "--flops-budget",
                            budget, "--ledger", str(shared))
        assert train.main(second) == 3
        err = capsys.readouterr().err
        assert f", and runs in flight reserve {400 * step:.3e} more" in err
        assert err.startswith(f"error: this run plans {400 * step:.3e} FLOPs, but {shared} ")
        assert not (tmp_path / "second" / "metrics.jsonl").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    records = ledger.read_ledger(shared, reservations=True)
    assert ledger.held(records) == {}
    assert {r["name"] for r in records} == {str(tmp_path / "first")}


def test_resume_restores_every_rng_it_saves(small, one_step_run):
    """state.pt's generators are set again on resume, torch's included (nothing draws from it
    after a resume today, so only its state shows a missing restore)."""
    state = torch.load(one_step_run / "state.pt", weights_only=True)
    assert {k for k in state if k.endswith("_rng")} == {"torch_rng", "cuda_rng"}
    args = train.parse_args(train_args(small, one_step_run, "--steps", "2", "--resume"))
    world = distributed.World()
    s = train.set_up(args, world)  # seeds torch with --seed for the LoRA init
    torch.manual_seed(1234)
    progress, _ = train.start_or_resume(args, s, world)
    assert progress.step == 1
    assert torch.equal(torch.get_rng_state(), state["torch_rng"])
    if torch.cuda.is_available():
        assert torch.equal(torch.cuda.get_rng_state(), state["cuda_rng"][0])
    else:
        assert state["cuda_rng"] == []
