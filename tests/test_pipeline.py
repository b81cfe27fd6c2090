"""train.py → evaluate.py → sweep.py end to end, on a tiny random checkpoint (real vocabulary)
and a small simulated dataset. Slow-ish (the 151,936-word head dominates), but offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import data
import evaluate
import ledger
import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_vocab_checkpoint, lv_20x30):
    return tmp_path_factory.mktemp("pipeline"), real_vocab_checkpoint, lv_20x30


def train_args(setup, out, *extra):
    root, ckpt, h5 = setup
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(out), "--context-length", "64",
            "--stride", "64", "--batch-size", "2", "--lr", "1e-2", "--ledger",
            str(out.parent / f"{out.name}-ledger.jsonl"), "--dtype", "fp32", *extra]


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_on_a_fixed_batch(setup, tmp_path):
    """Overfit one window (1 training series, 1 window): the loss must fall."""
    root, ckpt, h5 = setup
    traj, time = data.load_trajectories(h5)
    one = data.write_h5(tmp_path / "one.h5", np.repeat(traj[:1], 10, axis=0), time)
    args = train_args(setup, tmp_path / "run", "--steps", "8", "--targets",
                      "q_proj,v_proj,o_proj,down_proj")
    args[args.index("--data") + 1] = str(one)
    assert train.main(args) == 0
    loss = losses(tmp_path / "run")
    assert len(loss) == 8 and loss[-1] < loss[0] - 0.5, loss


def test_resume_equals_uninterrupted(setup, tmp_path):
    assert train.main(train_args(setup, tmp_path / "straight", "--steps", "4")) == 0
    assert train.main(train_args(setup, tmp_path / "split", "--steps", "2")) == 0
    assert train.main(train_args(setup, tmp_path / "split", "--steps", "4", "--resume")) == 0
    a = torch.load(tmp_path / "straight" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"])
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert a["flops"] == b["flops"] > 0
    # the split run's two sessions are two ledger records adding up to the same FLOPs
    records = ledger.read_ledger(tmp_path / "split-ledger.jsonl")
    assert [r["steps"] for r in records] == [[0, 2], [2, 4]]
    assert sum(r["flops"] for r in records) == a["flops"]


def test_resume_refuses_changed_hyperparameters(setup, tmp_path, capsys):
    assert train.main(train_args(setup, tmp_path / "r", "--steps", "1")) == 0
    capsys.readouterr()
    assert train.main(train_args(setup, tmp_path / "r", "--steps", "2", "--resume")
                      + ["--lr", "0.5"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: {tmp_path / 'r'}/config.json differs "
                                       "from these flags: {'lr': (0.01, 0.5)}\n")


def test_budget_refusal(setup, tmp_path, capsys):
    out = tmp_path / "over"
    args = train_args(setup, out, "--steps", "3", "--flops-budget", "1e9")
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "error:" in err and "--force" in err
    assert not (out / "state.pt").exists()


def test_bad_data_file_is_a_clear_error(setup, tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    import h5py

    with h5py.File(bad, "w") as f:
        f["trajectories"] = np.ones((5, 10, 3), dtype=np.float32)
        f["time"] = np.linspace(0, 200, 10)
    args = train_args(setup, tmp_path / "x", "--steps", "1")
    args[args.index("--data") + 1] = str(bad)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: /trajectories has shape (5, 10, 3); expected 3 dimensions" in err


def test_evaluate_writes_metrics_for_every_series(setup, tmp_path):
    root, ckpt, h5 = setup
    run = tmp_path / "run"
    assert train.main(train_args(setup, run, "--steps", "2")) == 0
    out = tmp_path / "eval"
    ledger_path = tmp_path / "ledger.jsonl"
    code = evaluate.main(["--model", str(ckpt), "--data", str(h5),
                          "--adapter", str(run / "adapter"),
                          "--out", str(out), "--forecast-steps", "3", "--batch-size", "2",
                          "--ledger", str(ledger_path), "--dtype", "fp32"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    n_val = len(data.split_indices(20)["val"])
    assert m["n_series"] == n_val == 3
    for key in ("mse_scaled", "mae_scaled", "mse", "mae", "teacher_forced_ce", "generation_ce",
                "parse_failure_rate", "mse_scaled_by_horizon", "flops"):
        assert key in m
    assert len(m["mse_scaled_by_horizon"]) == 3 and 0.0 <= m["parse_failure_rate"] <= 1.0
    assert m["teacher_forced_ce"] > 0 and m["generation_ce"] > 0
    rows = (out / "per_series.csv").read_text().splitlines()
    assert len(rows) == 1 + n_val
    assert sum(r["flops"] for r in ledger.read_ledger(ledger_path)) == m["flops"] > 0  # per batch
    for f in ("trajectories.png", "horizon.png", "forecasts.npz"):
        assert (out / f).stat().st_size > 0
    meta = json.loads((run / "adapter" / "qwen_min.json").read_text())
    assert m["alpha"] == meta["scaler"]["alpha"]


def test_evaluate_refuses_to_overrun_the_budget(setup, tmp_path, capsys):
    root, ckpt, h5 = setup
    code = evaluate.main(["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "e"),
                          "--ledger", str(tmp_path / "l.jsonl"), "--flops-budget", "1e6",
                          "--forecast-steps", "3"])
    assert code == 3
    assert "pass --force" in capsys.readouterr().err
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_teacher_forced_ce_through_the_rewound_cache_equals_a_full_pass(setup):
    """evaluate.py reuses generation's KV cache for the teacher-forced pass: same numbers as
    running prompt + target from scratch, for left-padded prompts and ragged targets."""
    from qwen_min import KVCache, generate, load_model
    from qwen_min.grammar import LLMTimeGrammar
    from qwen_min.model import cross_entropy

    model = load_model(setup[1])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(11, 27, (n,), generator=g).tolist() for n in (12, 7, 9)]
    targets = [torch.randint(11, 27, (n,), generator=g).tolist() for n in (5, 9, 1)]
    ids, mask = evaluate.left_pad(prompts)
    cache = KVCache(model.cfg, 3, ids.shape[1] + 9, torch.float32, "cpu")
    _, step_logits = generate(model, ids, 4, mask, cache=cache)
    tables = LLMTimeGrammar().tables(model.cfg.vocab_size)
    got, _ = evaluate.teacher_forced(model, cache, mask, targets, step_logits[:, 0], tables)
    with torch.no_grad():
        want = [cross_entropy(model(torch.tensor([p + t]))[0, len(p) - 1 : -1], torch.tensor(t))
                for p, t in zip(prompts, targets)]
    assert got == pytest.approx([w.item() for w in want], abs=1e-5)


def test_resume_refuses_a_different_data_file(setup, tmp_path, capsys):
    root, ckpt, h5 = setup
    assert train.main(train_args(setup, tmp_path / "r", "--steps", "1")) == 0
    traj, time = data.load_trajectories(h5)
    other = data.write_h5(tmp_path / "other.h5", traj[::-1].copy(), time)
    args = train_args(setup, tmp_path / "r", "--steps", "2", "--resume")
    args[args.index("--data") + 1] = str(other)
    capsys.readouterr()
    assert train.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: {other} is not the data file {tmp_path / 'r'} was trained on (its "
        "SHA-256 differs); resume with the original file\n")
