"""sweep.py: the whole plan end to end on a tiny model (grid → context study → final run),
killed midway and started again, run two at a time (--devices cpu,cpu), stopped cleanly by the
budget, and its flags and choices.

The end-to-end sweep runs 10 child processes (train.py and evaluate.py per run): about 45 s
of CPU, most of it each child's start (imports, tokenizer, model). The tests that run whole
sweeps are marked slow: `make test-all` runs them, `make test` does not."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import flops
import ledger
import sweep
from qwen_min.model import Qwen2Config
from tools.checkpoints import TINY

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["grid-r2-lr0.001", "grid-r2-lr0.01", "context-64", "context-128", "final"]
BEST_BY = "best = lowest mse_scaled_filled (mse_scaled where a run's metrics lack it)."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, real_vocab_checkpoint):
    root = tmp_path_factory.mktemp("sweep")
    data.main(["--out", str(root / "lv.h5"), "--systems", "40"])
    return real_vocab_checkpoint, root / "lv.h5"


def sweep_args(tiny, out: Path, *extra: str) -> list[str]:
    """A 2-run grid at context 128, contexts 64 and 128 (stride 256 fits neither), a final run."""
    ckpt, h5 = tiny
    return ["--model", str(ckpt), "--data", str(h5), "--out", str(out),
            "--ledger", str(out / "ledger.jsonl"), "--ranks", "2", "--lrs", "1e-3,1e-2",
            "--contexts", "64,128", "--grid-context", "128", "--grid-steps", "2",
            "--context-steps", "2", "--final-steps", "3", "--batch-size", "2", "--eval-limit", "3",
            "--forecast-steps", "2", "--extra", "--dtype fp32", *extra]


def start_sweep(args: list[str], log: Path) -> subprocess.Popen:
    """sweep.py in its own process group (so that a kill reaches its children too)."""
    # one thread per process: 2 cores shared by many processes, OpenMP spinning only costs
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "sweep.py", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One uninterrupted tiny sweep: (its folder, its output)."""
    out = tmp_path_factory.mktemp("finished") / "sweep"
    log = out.parent / "log.txt"
    assert start_sweep(sweep_args(tiny, out), log).wait(timeout=600) == 0, log.read_text()
    return out, log.read_text()


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
def test_sweep_runs_all_three_stages(finished):
    out, log = finished
    rows = read_csv(out / "summary.csv")
    assert [r["name"] for r in rows] == NAMES
    assert [int(r["steps"]) for r in rows] == [2, 2, 2, 2, 3]
    for name in NAMES:  # issue 13.1: every run gets a stride its context can hold
        config = json.loads((out / name / "config.json").read_text())
        assert config["stride"] == min(256, config["context_length"]), name
    assert [json.loads((out / n / "config.json").read_text())["context_length"]
            for n in NAMES[:4]] == [128, 128, 64, 128]

    def key(r):  # the rule of sweep.best, restated: filled MSE, else MSE, else teacher-forced CE
        value = r["mse_scaled_filled"] or r["mse_scaled"]
        return (value == "", float(value or 0), float(r["teacher_forced_ce"]))

    grid_best = min(rows[:2], key=key)
    assert {r["lr"] for r in rows[2:4]} == {grid_best["lr"]}
    overall = min(rows[:4], key=key)
    assert (rows[4]["rank"], rows[4]["lr"], rows[4]["context"]) == (
        overall["rank"], overall["lr"], overall["context"])
    records = ledger.read_ledger(out / "ledger.jsonl")
    assert sorted((r["kind"], Path(r["name"]).relative_to(out).as_posix()) for r in records) == \
        sorted([("train", n) for n in NAMES] + [("eval", f"{n}/eval") for n in NAMES])
    note = (out / "summary.md").read_text().splitlines()[-1]
    assert note == f"All stages finished within the budget. {BEST_BY}"
    assert "plan (fit): grid 2, context 2, final 3 steps;" in log
    assert (out / "grid_heatmap.png").stat().st_size > 0


@pytest.mark.slow
def test_a_killed_sweep_started_again_ends_as_an_uninterrupted_one(tiny, finished, tmp_path):
    """SIGKILL to the sweep and its child once the second grid run has written its final
    checkpoint and adapter (its evaluation about to run or running), then start it again: that
    run resumes, and the summary.csv is the one of the sweep that was never interrupted.

    Not between state.pt and the adapter: train.py writes state.pt first, and a kill there
    leaves a finished state with no adapter for evaluate.py (a train.py defect)."""
    out = tmp_path / "sweep"
    proc = start_sweep(sweep_args(tiny, out), tmp_path / "killed.txt")
    adapter = out / NAMES[1] / "adapter" / "adapter_config.json"  # save_adapter's last file
    while not adapter.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "summary.csv").exists()
    log = tmp_path / "again.txt"
    assert start_sweep(sweep_args(tiny, out), log).wait(timeout=600) == 0, log.read_text()
    assert (out / "summary.csv").read_text() == (finished[0] / "summary.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]])
def test_an_evaluation_refused_for_budget_stops_the_sweep_cleanly(tiny, tmp_path, capsys,
                                                                   devices):
    """The budget admits the first grid run's training but not its evaluation: evaluate.py
    gets the sweep's budget, refuses (exit 3), and the sweep stops with a note, no traceback.
    With two devices the second grid run, which would fit the ledger alone but not beside the
    first, waits for it (sweep.Admission), then does not start: the budget is never overrun."""
    out = tmp_path / "sweep"
    train = 2 * flops.train_step_flops(TINY, 2, 128, 2)  # what train.py plans: 3.231e10
    # evaluate.py plans more than the 1.6e9 left: its 3 series of 700 prompt tokens ran 4.15e9
    budget = 1.05 * train
    args = sweep_args(tiny, out, "--plan", "published", "--flops-budget", str(budget), *devices)
    assert sweep.main(args) == sweep.BUDGET_EXIT
    printed = capsys.readouterr().out
    assert "sweep: grid-r2-lr0.001: evaluate.py refused: the budget would be exceeded" in printed
    assert "  the plan does not fit: the sweep stops before the first run that would overrun it\n" \
        in printed
    assert (out / NAMES[0] / "adapter").is_dir()
    assert not (out / NAMES[0] / "eval" / "metrics.json").exists()
    assert not (out / NAMES[1]).exists()
    assert ledger.ledger_total(out / "ledger.jsonl") == train
    assert read_csv(out / "summary.csv") == []
    note = (out / "summary.md").read_text().splitlines()[-1]
    assert note == f"Stopped in the grid: the budget ({budget:.3g}) would be exceeded. {BEST_BY}"


@pytest.mark.slow
def test_a_budget_with_room_for_exactly_the_plan_runs_every_run(tiny, tmp_path):
    """The budget is exactly the price of the sweep's three runs (training and evaluation, as
    the sweep reserves them), and every run runs: train.py and evaluate.py draw on the
    reservation the sweep holds for their run (ledger.PARENT_ENV). Handed nothing, they would
    reserve their plans a second time beside the sweep's, and a run would be refused (issue
    27)."""
    out = tmp_path / "sweep"
    args = sweep_args(tiny, out, "--lrs", "1e-3", "--contexts", "128", "--plan", "published")
    parsed = sweep.parse_args(args)
    admission = sweep.Admission(parsed, TINY, sweep.evaluation_size(parsed))
    runs = [("grid-r2-lr0.001", 2), ("context-128", 2), ("final", 3)]
    budget = sum(admission.price(name, 2, 128, steps) for name, steps in runs)
    log = tmp_path / "log.txt"
    proc = start_sweep(args + ["--flops-budget", str(budget)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    assert [r["name"] for r in read_csv(out / "summary.csv")] == [name for name, _ in runs]
    assert ledger.ledger_total(out / "ledger.jsonl") <= budget
    assert ledger.held(ledger.read_ledger(out / "ledger.jsonl", reservations=True)) == {}


def test_the_fitted_plan_shortens_the_grid_and_says_so(tiny, tmp_path, capsys, monkeypatch):
    """--plan fit (the default) on the published stage lengths, with a budget the plan
    overruns: the grid runs are shortened, the sweep prints why, and train.py gets the new
    length. (run() is replaced: the first train.py is answered 'refused'.)"""
    out = tmp_path / "sweep"
    args = sweep_args(tiny, out)
    for flag in ("--grid-steps", "--context-steps", "--final-steps"):
        del args[args.index(flag): args.index(flag) + 2]
    published = sweep.choose_plan(sweep.parse_args(args + ["--plan", "published"]), TINY,
                                  sweep.evaluation_size(sweep.parse_args(args)))
    assert published[1] == []
    total = flops.plan_flops(published[0], TINY)["total"]
    budget = total / 1.05
    commands = []
    monkeypatch.setattr(sweep, "run", lambda cmd, reservation=None: commands.append(cmd)
                        or sweep.BUDGET_EXIT)
    assert sweep.main(args + ["--flops-budget", str(budget)]) == sweep.BUDGET_EXIT
    printed = capsys.readouterr().out.splitlines()
    fitted_steps = int(commands[0][commands[0].index("--steps") + 1])
    assert 0 < fitted_steps < 1000 and fitted_steps % 50 == 0
    fitted = flops.with_stage_steps(published[0], "grid", fitted_steps)
    assert flops.plan_flops(fitted, TINY)["total"] <= 0.98 * budget
    longer = flops.with_stage_steps(published[0], "grid", fitted_steps + 50)
    assert flops.plan_flops(longer, TINY)["total"] > 0.98 * budget
    assert printed[1].startswith(f"  the plan totals {total:.3e} FLOPs (evaluations included)")
    assert printed[2] == f"  grid: 2 run(s) cut from 1000 to {fitted_steps} steps"
    assert printed[0].startswith(f"plan (fit): grid {fitted_steps}, context 1000, final 3000 steps")


def test_a_plan_that_cannot_fit_is_refused_before_any_run(tiny, tmp_path, capsys):
    assert sweep.main(sweep_args(tiny, tmp_path / "s", "--flops-budget", "1e6")) == 3
    err = capsys.readouterr().err
    assert err.startswith("sweep.py: error: --plan fit: the plan needs ")
    assert err.endswith("more than 98% of the 1e+06 budget; raise the budget or evaluate fewer "
                        "series; or run --plan published\n")
    assert not (tmp_path / "s").exists()


def test_a_missing_data_file_is_a_one_line_error(tiny, tmp_path, capsys):
    missing = tmp_path / "none.h5"
    assert sweep.main(["--model", str(tiny[0]), "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sweep.py: error: {missing}: no such file; ") and err.count("\n") == 1


@pytest.mark.parametrize("flag, value, expected", [
    ("--grid-steps", "0", "expected a value ≥ 1, got '0'"),
    ("--context-steps", "-5", "expected a value ≥ 1, got '-5'"),
    ("--final-steps", "1.5", "expected an integer ≥ 1, got '1.5'"),
    ("--batch-size", "0", "expected a value ≥ 1, got '0'"),
    ("--eval-limit", "0", "expected a value ≥ 1, got '0'"),
    ("--forecast-steps", "ten", "expected an integer ≥ 1, got 'ten'"),
    ("--grid-context", "1", "expected a value ≥ 2, got '1'"),
    ("--flops-budget", "0", "expected a value > 0, got '0'"),
    ("--flops-budget", "nan", "expected a value > 0, got 'nan'"),
    ("--ranks", "2,0", "expected a value ≥ 1, got '0'"),
    ("--lrs", "1e-4,", "expected a comma-separated list, got '1e-4,'"),
    ("--lrs", "-1e-4", "expected a value > 0, got '-1e-4'"),
    ("--contexts", "64,abc", "expected an integer ≥ 2, got 'abc'"),
    ("--eval-batch-size", "0", "expected a value ≥ 1, got '0'"),
    ("--early-stop", "0", "expected a value ≥ 1, got '0'"),
])
def test_every_numeric_flag_is_checked(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main([f"{flag}={value}"])  # = : argparse would read -5 as a flag
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"sweep.py: error: argument {flag}: {expected} (see python sweep.py --help)\n")


def test_best_is_the_lowest_filled_mse_then_mse_then_cross_entropy():
    row = lambda name, mse, filled, ce: dict(name=name, mse_scaled=mse,  # noqa: E731
                                             mse_scaled_filled=filled, teacher_forced_ce=ce)
    # a: best parsed-only MSE but fails often (filled 0.5); b: best once failures are filled
    a, b = row("a", 0.1, 0.5, 1.0), row("b", 0.3, 0.2, 2.0)
    assert sweep.best([a, b])["name"] == "b"
    old = [row("c", 0.3, None, 1.0), row("d", 0.2, None, 2.0)]  # an older evaluate.py
    assert sweep.best(old)["name"] == "d"
    nothing_parsed = [row("e", None, None, 3.0), row("f", None, None, 2.5)]
    assert sweep.best(nothing_parsed)["name"] == "f"
    assert sweep.best(nothing_parsed + old)["name"] == "d"


def test_summary_shows_both_mse_and_the_parse_failure_rate(tmp_path):
    """Rows come from each run's eval/metrics.json (present: no process runs)."""
    args = sweep.parse_args(["--out", str(tmp_path)])
    metrics = {"mse_scaled": 0.25, "mse_scaled_filled": 0.5, "parse_failure_rate": 0.125,
               "mae_scaled": 0.375, "teacher_forced_ce": 1.5, "n_series": 4}
    old = {k: v for k, v in metrics.items() if k != "mse_scaled_filled"}
    rows = []
    for name, m in (("grid-r2-lr0.001", metrics), ("grid-r4-lr0.001", old)):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(m))
        rows.append(sweep.train_and_eval(args, name, 2, 1e-3, 128, 5))
    sweep.write_summary(tmp_path, rows, "note")
    got = read_csv(tmp_path / "summary.csv")
    assert list(got[0]) == sweep.SUMMARY_KEYS
    assert [(r["mse_scaled"], r["mse_scaled_filled"], r["parse_failure_rate"]) for r in got] == [
        ("0.25", "0.5", "0.125"), ("0.25", "", "0.125")]
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| " + " | ".join(sweep.SUMMARY_KEYS) + " |"
    assert md[2] == "| grid-r2-lr0.001 | grid | 2 | 0.001 | 128 | 5 | 0.25 | 0.5 | 0.125 | 0.375 " \
                    "| 1.5 | 4 |"
    assert md[3] == "| grid-r4-lr0.001 | grid | 2 | 0.001 | 128 | 5 | 0.25 | — | 0.125 | 0.375 " \
                    "| 1.5 | 4 |"


def test_commands_carry_stride_budget_early_stop_and_tensorboard(tmp_path):
    args = sweep.parse_args(["--out", str(tmp_path), "--ledger", "l.jsonl", "--flops-budget",
                             "5e16", "--early-stop", "3", "--tensorboard", "--eval-batch-size",
                             "auto", "--extra", "--dtype fp32"])
    run = tmp_path / "context-128"
    assert sweep.train_command(args, run, 8, 1e-4, 128, 20) == [
        "train.py", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data",
        "data/lotka_volterra_data.h5", "--ledger", "l.jsonl", "--out", str(run), "--rank", "8",
        "--lr", "0.0001", "--context-length", "128", "--stride", "128", "--steps", "20",
        "--batch-size", "4", "--flops-budget", "5e+16", "--early-stop", "3", "--tensorboard",
        "--dtype", "fp32"]
    assert sweep.eval_command(args, run) == [
        "evaluate.py", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data",
        "data/lotka_volterra_data.h5", "--ledger", "l.jsonl", "--flops-budget", "5e+16",
        "--adapter", str(run / "adapter"), "--out", str(run / "eval"), "--split", "val",
        "--forecast-steps", "10", "--batch-size", "auto"]
    plain = sweep.parse_args(["--out", str(tmp_path)])
    (run / "state.pt").parent.mkdir()
    (run / "state.pt").write_bytes(b"")
    cmd = sweep.train_command(plain, run, 8, 1e-4, 768, 20)
    assert cmd[cmd.index("--stride") + 1] == "256" and cmd[-1] == "--resume"
    assert "--early-stop" not in cmd and "--tensorboard" not in cmd


def test_make_sweep_fits_the_plan_make_flops_prints(tmp_path):
    """With its defaults on a 1000-system file (150 validation series of 100 steps), the sweep
    fits exactly the plan that flops.py prints as fitted (grid 800 steps, measured)."""
    h5 = data.write_h5(tmp_path / "lv.h5", np.ones((1000, 100, 2), np.float32),
                       np.linspace(0, 200, 100))
    args = sweep.parse_args(["--data", str(h5)])
    evaluation = sweep.evaluation_size(args)
    assert evaluation == flops.DEFAULT_PLAN.evaluation
    plan, changes = sweep.choose_plan(args, Qwen2Config(), evaluation)
    assert (plan, changes) == flops.fit_plan()
    assert [sweep.stage_steps(plan, s) for s in ("context", "final")] == [1000, 3000]


@pytest.mark.slow
def test_two_cpu_slots_run_a_stage_at_once_and_end_as_the_sequential_sweep(tiny, finished,
                                                                         tmp_path):
    """--devices cpu,cpu: two train.py/evaluate.py pairs at a time, each given --device cpu.
    Training is deterministic, so summary.csv is the sequential sweep's. Overlap without a
    clock: the ledger is appended in time order, so a record of one grid run written between
    the first and last records of the other proves both were in flight together (one at a
    time, each run's records are contiguous)."""
    out = tmp_path / "sweep"
    log = tmp_path / "log.txt"
    proc = start_sweep(sweep_args(tiny, out, "--devices", "cpu,cpu"), log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    assert (out / "summary.csv").read_text() == (finished[0] / "summary.csv").read_text()
    assert [json.loads((out / n / "config.json").read_text())["device"] for n in NAMES] == \
        ["cpu"] * len(NAMES)
    owners = [Path(r["name"]).relative_to(out).parts[0] for r in
              ledger.read_ledger(out / "ledger.jsonl")]

    def span(name: str) -> range:
        where = [i for i, owner in enumerate(owners) if owner == name]
        return range(where[0], where[-1] + 1)

    for stage in (NAMES[:2], NAMES[2:4]):
        a, b = (span(name) for name in stage)
        assert set(a) & set(b), (stage, owners)


@pytest.mark.parametrize("value, expected", [
    ("cpu,", "expected a comma-separated list of devices like cuda:0,cuda:1, got 'cpu,'"),
    ("cpu,,cpu", "expected a comma-separated list of devices like cuda:0,cuda:1, got 'cpu,,cpu'"),
    ("gpu0", "expected devices like cpu, cuda:0 or mps, got 'gpu0'"),
    ("cpu,cuda:x", "expected devices like cpu, cuda:0 or mps, got 'cuda:x'"),
    ("cuda:99", f"cuda:99: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "name devices from cuda:0 up, or cpu"),
])
def test_bad_devices_are_a_one_line_error(value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--devices", value])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"sweep.py: error: argument --devices: {expected} (see python sweep.py --help)\n")


def test_admission_reserves_each_runs_price_and_waits_while_two_do_not_fit(tiny, tmp_path):
    """--devices: a run starts beside another only when the ledger (spent + live reservations)
    holds room for its whole price, and it holds that price while it runs. Budget 1.5 run
    prices: the second grid run waits until the first has ended and released what it did not
    spend. A run that alone does not fit starts without a reservation (its scripts decide)."""
    path = tmp_path / "sweep" / "ledger.jsonl"
    args = sweep.parse_args(sweep_args(tiny, tmp_path / "sweep"))
    admission = sweep.Admission(args, TINY, sweep.evaluation_size(args))
    price = admission.price(NAMES[0], 2, 128, 2)
    assert price == flops.plan_flops(flops.Plan(
        (flops.Run("grid", 2, 128, 2, batch=2),), sweep.evaluation_size(args)), TINY)["total"]
    args.flops_budget = 1.5 * price
    started = []

    def second():
        with admission.slot(1, NAMES[1], price) as booking:
            started.append(booking.id)

    with admission.slot(0, NAMES[0], price) as first:
        assert ledger.held(ledger.read_ledger(path, reservations=True)) == {first.id: price}
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.5)
        assert started == []  # 2 prices > 1.5
        first.append({"kind": "train", "name": NAMES[0], "flops": price // 2})
    waiting.join(timeout=60)
    assert len(started) == 1 and started[0] != first.id  # 0.5 + 1 prices fit: it reserved
    assert ledger.held(ledger.read_ledger(path, reservations=True)) == {}
    args.flops_budget = price / 2
    admission.turn = 0
    with admission.slot(0, NAMES[0], price) as alone:
        assert alone is None
