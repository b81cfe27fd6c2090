"""Bad input ends in one line naming the file and what to do, never a traceback: a malformed
ledger, data too small or all zero, a tokenizer that is not Qwen2's, a malformed metrics.json
or forecasts.npz, a metrics.jsonl cut by a kill, Ctrl-C, a full disk; and an adapter from
another base model is refused."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import evaluate
import ledger as ledger_mod
import report
import sweep
import train
from lora import apply_lora, save_adapter
from qwen_min import load_model
from tests.test_runtime import FullDisk

LEDGER_LINE = ('line 1: not valid JSON (Expecting value, column 1); each line must be one record '
               'like {"kind": "train", "name": ..., "flops": ..., "timestamp": ...}. Repair or '
               'delete that line; the other lines are kept as they are.')


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """The 512-token tiny checkpoint and 20 series of 10 steps whose prompts all have one
    length (so no padding token, which is outside its vocabulary)."""
    root = tmp_path_factory.mktemp("errors")
    t = np.arange(10.0)
    one = np.stack([2 * t, np.full(10, 19.98)], axis=1)  # (10 steps, 2)
    h5 = data.write_h5(root / "lv.h5", np.repeat(one[None], 20, axis=0), t)
    return tiny[1], h5


def eval_args(files, tmp_path, *extra) -> list[str]:
    ckpt, h5 = files
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "eval"),
            "--forecast-steps", "1", "--ledger", str(tmp_path / "ledger.jsonl"), "--dtype",
            "fp32", "--device", "cpu", "--limit", "1", "--plot-series", "0", *extra]


def train_args(files, tmp_path, *extra) -> list[str]:
    ckpt, h5 = files
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "run"),
            "--ledger", str(tmp_path / "ledger.jsonl"), "--steps", "1", "--batch-size", "1",
            "--context-length", "99", "--stride", "99", "--dtype", "fp32", "--device", "cpu",
            *extra]  # a whole series per window: no padding token (outside the vocabulary)


def one_line(capsys) -> str:
    """The one line on stderr, besides a progress bar's (which redraws with carriage returns)."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 4: the ledger


def test_a_malformed_ledger_is_one_line_in_every_script(files, tmp_path, capsys):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("not json\n")
    assert evaluate.main(eval_args(files, tmp_path)) == 2
    assert one_line(capsys) == f"error: {ledger}, {LEDGER_LINE}"
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert train.main(train_args(files, tmp_path)) == 2
    assert one_line(capsys) == f"error: {ledger}, {LEDGER_LINE}"
    assert not (tmp_path / "run" / "config.json").exists()
    ckpt, h5 = files
    assert sweep.main(["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "s"),
                       "--ledger", str(ledger)]) == 2
    assert one_line(capsys) == f"sweep.py: error: {ledger}, {LEDGER_LINE}"
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- 5: the data


def test_too_few_or_all_zero_series_are_one_line_in_evaluate(files, tmp_path, capsys):
    ckpt, _ = files
    t = np.arange(10.0)
    single = data.write_h5(tmp_path / "one.h5", np.ones((1, 10, 2)), t)
    zeros = data.write_h5(tmp_path / "zeros.h5", np.zeros((20, 10, 2)), t)
    assert evaluate.main(eval_args((ckpt, single), tmp_path)) == 2
    assert one_line(capsys) == (
        f"error: --data {single}: 1 systems are too few for a 70/15/15 train/val/test split (a "
        "part would be empty); use a file with at least 7 systems")
    assert evaluate.main(eval_args((ckpt, zeros), tmp_path)) == 2
    assert one_line(capsys) == (
        f"error: --data {zeros}: LLMTIME scaler: the training values' maximum is 0.0; α = max "
        "/ 9.99 needs a finite maximum > 0 (are all training series zero?)")


# ----------------------------------------------------------------------------- 6: the tokenizer


def test_a_tokenizer_that_is_not_qwen2s_is_one_line(files, tmp_path, capsys):
    """A word-level tokenizer splits LLMTIME text into words and punctuation runs, not one
    token per character: train.py and evaluate.py refuse the folder before any work."""
    ckpt, h5 = files
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    words = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(other / "tokenizer.json"))
    line = (f"error: {other / 'tokenizer.json'}: not Qwen2's tokenizer (it writes "
            "'1.23,4.56;78.90,0.05;' as 16 tokens, expected 21); LLMTIME needs one token per "
            "digit and separator: put the tokenizer.json of Qwen/Qwen2.5-0.5B-Instruct in that "
            "folder")
    assert evaluate.main(eval_args((other, h5), tmp_path)) == 2
    assert one_line(capsys) == line
    assert train.main(train_args((other, h5), tmp_path)) == 2
    assert one_line(capsys) == line


# ----------------------------------------------------------------------------- 7, 8: outputs


def test_compare_on_a_malformed_metrics_json_is_one_line(tmp_path, capsys):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"n_series": 2, "mse_sc')  # cut short
    assert evaluate.main(["--compare", str(folder), "--out", str(tmp_path / "c")]) == 2
    assert one_line(capsys) == (
        f"error: {folder / 'metrics.json'}: not readable JSON (Unterminated string starting "
        "at: line 1 column 17 (char 16)); repair or remove it; or run evaluate.py --out "
        f"{folder} again")


@pytest.fixture
def final_run(tmp_path):
    """The smallest runs folder whose report reads a final run's metrics.jsonl and its
    evaluation's forecasts.npz."""
    final = tmp_path / "runs" / "final"
    (final / "eval").mkdir(parents=True)
    (final / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "flops": 10}\n'
                                         '{"step": 2, "loss": 2.25, "flops": 20}\n{"step": 3, "lo')
    (final / "eval" / "metrics.json").write_text(json.dumps(
        {"n_series": 1, "split": "val", "mse_scaled_by_horizon": [0.5]}))
    np.savez(final / "eval" / "forecasts.npz", samples=np.zeros((1, 2, 1, 2)),
             truths=np.zeros((1, 1, 2)))
    return final


def test_report_skips_a_metrics_jsonl_line_cut_by_a_kill(final_run, capsys):
    root = final_run.parent
    assert report.main(["--runs", str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    assert "| steps done | 2 |" in md and "| last train loss | 2.25 |" in md


def test_report_on_a_truncated_forecasts_npz_is_one_line(final_run, capsys):
    (final_run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "flops": 10}\n')
    npz = final_run / "eval" / "forecasts.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    assert report.main(["--runs", str(final_run.parent)]) == 2
    assert one_line(capsys) == (
        f"error: {npz}: not a readable .npz file (File is not a zip file); it is truncated or "
        "corrupt: run evaluate.py for that folder again, or remove the folder")


# ----------------------------------------------------------------------------- 9: Ctrl-C, disk


def test_ctrl_c_in_evaluate_is_one_line_and_exit_130(files, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "generate", interrupted)
    assert evaluate.main(eval_args(files, tmp_path)) == 130
    assert one_line(capsys) == (
        f"interrupted: {tmp_path / 'eval'} holds no metrics.json (no finished evaluation); the "
        f"batches that ran are on {tmp_path / 'ledger.jsonl'}. Run the same command again to "
        "evaluate from the start")


def test_ctrl_c_in_sweep_is_one_line_and_exit_130(files, tmp_path, capsys, monkeypatch):
    """Ctrl-C reaches the sweep's child too: train.py exits 130, and so does the sweep."""
    ckpt, h5 = files
    monkeypatch.setattr(sweep, "run", lambda cmd, reservation=None: 130)
    assert sweep.main(["--model", str(ckpt), "--data", str(h5), "--out", str(tmp_path / "s"),
                       "--ledger", str(tmp_path / "ledger.jsonl")]) == 130
    assert capsys.readouterr().err == (
        "sweep.py: interrupted; run the same command again to continue: finished runs are "
        "skipped and an interrupted run resumes\n")


def fill_disk_at(monkeypatch, name: str) -> None:
    """Writes of files called `name` (through qwen_min.runtime.atomic_write_bytes) fail."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}."):
            return FullDisk(fd)
        return real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_full_disk_in_evaluate_is_one_line_and_leaves_no_metrics(files, tmp_path, capsys,
                                                                   monkeypatch):
    """forecasts.npz cannot be written: the line names it, and metrics.json (the mark of a
    finished evaluation, written last) and any temp file are absent."""
    fill_disk_at(monkeypatch, "forecasts.npz")
    assert evaluate.main(eval_args(files, tmp_path)) == 2
    npz = tmp_path / "eval" / "forecasts.npz"
    assert one_line(capsys) == (f"error: {npz}: No space left on device; free some disk "
                                "space, then run the same command again")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "horizon.png", "per_series.csv"]


def test_a_full_disk_in_train_is_one_line(files, tmp_path, capsys, monkeypatch):
    fill_disk_at(monkeypatch, "state.pt")
    assert train.main(train_args(files, tmp_path)) == 2
    state = tmp_path / "run" / "state.pt"
    assert one_line(capsys) == (f"error: {state}: No space left on device; free some disk "
                                "space, then run the same command again")
    assert not state.exists() and not list((tmp_path / "run").glob(".*.tmp"))


# ----------------------------------------------------------------------------- 10: base model


@pytest.fixture
def foreign_adapter(files, hf_checkpoint, tmp_path):
    """(an adapter trained on the tiny checkpoint, another checkpoint of the same shape with
    other random weights, the message that refuses the pair)."""
    ckpt, h5 = files
    _, other = hf_checkpoint(seed=1)
    model = load_model(ckpt)
    apply_lora(model, rank=2)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, str(ckpt), {"scaler": {"alpha": 2.0, "decimals": 2},
                                             "data_sha256": data.file_sha256(h5)})
    message = (f"--model {other} is not the base model {adapter} was trained on ({ckpt}): its "
               "weights differ from those recorded (weights_sha256) in its qwen_min.json")
    return adapter, other, message


def test_an_adapter_from_another_base_model_is_refused(files, foreign_adapter, tmp_path,
                                                       capsys):
    adapter, other, message = foreign_adapter
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(files[0])  # where PEFT looks for the base
    assert evaluate.main(eval_args((other, files[1]), tmp_path, "--adapter", str(adapter))) == 2
    assert one_line(capsys) == (f"error: {message}; evaluate it with that model, or pass "
                                "--force to evaluate anyway")
    assert not (tmp_path / "ledger.jsonl").exists()  # refused before any work


@pytest.mark.slow
def test_force_or_an_unrecorded_base_evaluates_with_a_warning(files, foreign_adapter, tmp_path,
                                                              capsys):
    """--force overrides the refusal with a warning; an adapter that records no base (an
    older train.py's) is evaluated with a warning, as nothing can be checked."""
    adapter, other, message = foreign_adapter
    ckpt, h5 = files
    assert evaluate.main(eval_args((other, h5), tmp_path, "--adapter", str(adapter),
                                   "--force")) == 0
    assert f"warning: {message}; evaluating anyway (--force)" in capsys.readouterr().err.split(
        "\n")
    meta = json.loads((adapter / "qwen_min.json").read_text())
    del meta["base_model"]
    (adapter / "qwen_min.json").write_text(json.dumps(meta))
    assert evaluate.main(eval_args((ckpt, h5), tmp_path, "--adapter", str(adapter),
                                   "--out", str(tmp_path / "old"))) == 0
    assert (f"warning: {adapter}/qwen_min.json records no base model (an adapter from an older "
            f"train.py): that it was trained on --model {ckpt} is not checked"
            in capsys.readouterr().err.split("\n"))


def test_a_full_disk_leaves_the_ledger_as_it_was(tmp_path, monkeypatch):
    """A ledger append that the disk cuts short is cut back: no half record, which would make
    every later read of the ledger (every run's budget check) fail."""
    ledger = tmp_path / "ledger.jsonl"
    ledger_mod.append_ledger(ledger, {"kind": "train", "name": "a", "flops": 1})
    before = ledger.read_bytes()
    real = os.write

    def half(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(OSError) as e:
        ledger_mod.append_ledger(ledger, {"kind": "train", "name": "b", "flops": 2})
    monkeypatch.undo()
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(ledger))
    assert ledger.read_bytes() == before


def test_a_malformed_metrics_json_in_a_finished_sweep_run_is_one_line(tmp_path, capsys):
    """A run folder the sweep takes as finished (it holds eval/metrics.json) whose
    metrics.json was cut short: one line naming it and what to do, exit 2, no traceback."""
    path = tmp_path / "grid-r2-lr0.0001" / "eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"mse_scaled": 1.')
    with pytest.raises(SystemExit) as stop:
        sweep.train_and_eval(sweep.parse_args(["--out", str(tmp_path)]), "grid-r2-lr0.0001",
                             2, 1e-4, 64, 2)
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"sweep.py: error: {path}: not readable JSON (Expecting ',' delimiter: line 1 column 17 "
        f"(char 16)); repair or remove it; or delete {path.parent} to evaluate that run again\n")
